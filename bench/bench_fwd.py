"""Forward benchmark: npufa.npu_fusion_attention next to torch's scaled_dot_product_attention.

Same shapes, same run, interleaved repetitions (the host is shared and noisy: read the ratios).

    python bench/bench_fwd.py [--quick] [--threads N]
"""
from __future__ import annotations

import torch.nn.functional as F

import npufa
from cases import CAUSAL_MASK, bench_main, forward_flops, interleaved_best, make_inputs


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


if __name__ == "__main__":
    bench_main("forward", run_case, 7)
