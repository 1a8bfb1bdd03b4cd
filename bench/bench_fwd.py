"""Forward benchmark: npufa.npu_fusion_attention next to torch's scaled_dot_product_attention.

Same shapes, same run, interleaved repetitions (the host is shared and noisy: read the ratios).

    python bench/bench_fwd.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import npufa
from cases import CASES, CAUSAL_MASK, QUICK, forward_flops, interleaved_best, make_inputs


def run_case(name, B, Nq, Nkv, S, D, causal, dtype, reps):
    q, k, v = make_inputs(B, Nq, Nkv, S, D, dtype)
    scale = D ** -0.5
    mask, mode = (CAUSAL_MASK, 3) if causal else (None, 0)
    kr, vr = k.repeat_interleave(Nq // Nkv, 1), v.repeat_interleave(Nq // Nkv, 1)
    to, ts = interleaved_best([
        lambda: npufa.npu_fusion_attention(q, k, v, Nq, "BNSD", atten_mask=mask, sparse_mode=mode, scale=scale),
        lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=causal, scale=scale),
    ], reps)
    flops = forward_flops(B, Nq, S, D, causal)
    return flops / to / 1e9, flops / ts / 1e9, ts / to


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="three small cases, few repetitions")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 7
    print(f"forward; threads: {torch.get_num_threads()}  torch {torch.__version__}")
    print(f"{'case':34s} {'dtype':9s} {'npufa GFLOP/s':>14s} {'SDPA GFLOP/s':>13s} {'speed-up':>9s}")
    for c in CASES:
        if args.quick and c[0] not in QUICK:
            continue
        ours, sdpa, ratio = run_case(*c, reps=reps)
        print(f"{c[0]:34s} {str(c[7]).replace('torch.', ''):9s} {ours:14.1f} {sdpa:13.1f} {ratio:8.2f}x")


if __name__ == "__main__":
    main()
