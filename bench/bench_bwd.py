"""Backward benchmark: npufa's npu_fusion_attention backward next to SDPA's backward.

Times the backward alone (forward done once outside the timed region; graph kept with
retain_graph). Backward FLOPs counted as 2.5x the forward's (shared/perf/limits.md).

    python bench/bench_bwd.py [--quick] [--threads N]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import npufa
from cases import CAUSAL_MASK, bench_main, forward_flops, interleaved_best, make_inputs


def run_case(name, B, Nq, Nkv, S, D, causal, dtype, reps):
    q, k, v = make_inputs(B, Nq, Nkv, S, D, dtype, requires_grad=True)
    scale = D ** -0.5
    mask, mode = (CAUSAL_MASK, 3) if causal else (None, 0)
    out = npufa.npu_fusion_attention(q, k, v, Nq, "BNSD", atten_mask=mask, sparse_mode=mode, scale=scale)[0]
    kr = k.detach().repeat_interleave(Nq // Nkv, 1).requires_grad_()
    vr = v.detach().repeat_interleave(Nq // Nkv, 1).requires_grad_()
    ref = F.scaled_dot_product_attention(q, kr, vr, is_causal=causal, scale=scale)
    dy = torch.randn_like(out)
    to, ts = interleaved_best([
        lambda: torch.autograd.grad(out, (q, k, v), dy, retain_graph=True),
        lambda: torch.autograd.grad(ref, (q, kr, vr), dy, retain_graph=True),
    ], reps)
    flops = 2.5 * forward_flops(B, Nq, S, D, causal)
    return flops / to / 1e9, flops / ts / 1e9, ts / to


if __name__ == "__main__":
    bench_main("backward", run_case, 5)
