"""Forward benchmark: npufa.npu_fusion_attention next to torch's scaled_dot_product_attention.

Same shapes, same run, interleaved repetitions (the host is shared and noisy: read the ratios).
GFLOP/s counts unmasked work only: 4·B·Nq·D·(kept score elements).

    python bench/bench_fwd.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import npufa

CASES = [
    # name, B, Nq, Nkv, S, D, causal, dtype
    ("gpt2-small S=512", 8, 12, 12, 512, 64, False, torch.float32),
    ("gpt2-small S=512 causal", 8, 12, 12, 512, 64, True, torch.float32),
    ("llama3-8b S=1024 causal GQA4", 1, 32, 8, 1024, 128, True, torch.float32),
    ("llama3-8b S=2048 GQA4", 1, 32, 8, 2048, 128, False, torch.float32),
    ("vit-b16 S=197", 16, 12, 12, 197, 64, False, torch.float32),
    ("minilm S=128 D=32", 32, 12, 12, 128, 32, False, torch.float32),
    ("llama3-8b S=1024 causal bf16", 1, 32, 8, 1024, 128, True, torch.bfloat16),
    ("gpt2-small S=512 fp16", 8, 12, 12, 512, 64, False, torch.float16),
]
QUICK = {"gpt2-small S=512 causal", "vit-b16 S=197", "llama3-8b S=1024 causal bf16"}


def best_time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_case(name, B, Nq, Nkv, S, D, causal, dtype, reps):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Nq, S, D, generator=g).to(dtype)
    k = torch.randn(B, Nkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Nkv, S, D, generator=g).to(dtype)
    scale = D ** -0.5
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1) if causal else None
    mode = 3 if causal else 0

    def ours():
        npufa.npu_fusion_attention(q, k, v, Nq, "BNSD", atten_mask=mask, sparse_mode=mode, scale=scale)

    kr, vr = (k.repeat_interleave(Nq // Nkv, 1), v.repeat_interleave(Nq // Nkv, 1))

    def sdpa():
        F.scaled_dot_product_attention(q, kr, vr, is_causal=causal, scale=scale)

    kept = S * (S + 1) // 2 if causal else S * S
    flops = 4.0 * B * Nq * D * kept
    t_ours, t_sdpa = [], []
    for _ in range(reps):  # interleave so both see the same machine state
        t_ours.append(best_time(ours, 1))
        t_sdpa.append(best_time(sdpa, 1))
    to, ts = min(t_ours), min(t_sdpa)
    return flops / to / 1e9, flops / ts / 1e9, ts / to


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="three small cases, few repetitions")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 7
    print(f"threads: {torch.get_num_threads()}  torch {torch.__version__}")
    print(f"{'case':34s} {'dtype':9s} {'npufa GFLOP/s':>14s} {'SDPA GFLOP/s':>13s} {'speed-up':>9s}")
    for c in CASES:
        if args.quick and c[0] not in QUICK:
            continue
        ours, sdpa, ratio = run_case(*c, reps=reps)
        print(f"{c[0]:34s} {str(c[7]).replace('torch.', ''):9s} {ours:14.1f} {sdpa:13.1f} {ratio:8.2f}x")


if __name__ == "__main__":
    main()
