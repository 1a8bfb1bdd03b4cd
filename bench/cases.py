"""Shapes shared by the benchmarks (from real models; see shared/perf/limits.md) and timing helpers."""
from __future__ import annotations

import argparse
import time

import torch

# name, B, Nq, Nkv, S, D, causal, dtype
CASES = [
    ("gpt2-small S=512", 8, 12, 12, 512, 64, False, torch.float32),
    ("gpt2-small S=512 causal", 8, 12, 12, 512, 64, True, torch.float32),
    ("llama3-8b S=1024 causal GQA4", 1, 32, 8, 1024, 128, True, torch.float32),
    ("llama3-8b S=2048 GQA4", 1, 32, 8, 2048, 128, False, torch.float32),
    ("vit-b16 S=197", 16, 12, 12, 197, 64, False, torch.float32),
    ("minilm S=128 D=32", 32, 12, 12, 128, 32, False, torch.float32),
    ("B*N=2 < threads? S=2048 causal", 1, 2, 2, 2048, 64, True, torch.float32),
    ("llama3-8b S=1024 causal bf16", 1, 32, 8, 1024, 128, True, torch.bfloat16),
    ("gpt2-small S=512 fp16", 8, 12, 12, 512, 64, False, torch.float16),
]
QUICK = {"gpt2-small S=512 causal", "vit-b16 S=197", "llama3-8b S=1024 causal bf16"}

CAUSAL_MASK = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)


def make_inputs(B, Nq, Nkv, S, D, dtype, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, S, D, generator=g).to(dtype) for n in (Nq, Nkv, Nkv))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def forward_flops(B, Nq, S, D, causal):
    """4·B·Nq·D·(kept score elements): only unmasked work counts."""
    kept = S * (S + 1) // 2 if causal else S * S
    return 4.0 * B * Nq * D * kept


def interleaved_best(fns, reps):
    """Best time of each fn over reps rounds, the fns alternating so they see the same machine."""
    for f in fns:
        f()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def bench_main(title, run_case, reps_full):
    """Command line of the benchmarks: [--quick] [--threads N]; prints one row per case."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="three small cases, few repetitions")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else reps_full
    print(f"{title}; threads: {torch.get_num_threads()}  torch {torch.__version__}")
    print(f"{'case':34s} {'dtype':9s} {'npufa GFLOP/s':>14s} {'SDPA GFLOP/s':>13s} {'speed-up':>9s}")
    for c in CASES:
        if args.quick and c[0] not in QUICK:
            continue
        ours, sdpa, ratio = run_case(*c, reps=reps)
        print(f"{c[0]:34s} {str(c[7]).replace('torch.', ''):9s} {ours:14.1f} {sdpa:13.1f} {ratio:8.2f}x")
