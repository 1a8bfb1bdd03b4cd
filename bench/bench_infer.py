"""Inference benchmark: decode GB/s against the read bandwidth measured in the same run (paged and
contiguous KV), and prefill GFLOP/s next to torch's scaled_dot_product_attention.

    python bench/bench_infer.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import npufa
from cases import CAUSAL_MASK, forward_flops, interleaved_best

# name, B, Nq, Nkv, D, kv_len, block_size (0: contiguous), dtype
DECODE = [
    ("llama3-8b B=1 KV=8k paged16", 1, 32, 8, 128, 8192, 16, torch.bfloat16),
    ("llama3-8b B=8 KV=2k paged128", 8, 32, 8, 128, 2048, 128, torch.bfloat16),
    ("llama3-8b B=8 KV=2k contiguous", 8, 32, 8, 128, 2048, 0, torch.bfloat16),
    ("llama3-8b B=64 KV=2k paged16 fp16", 64, 32, 8, 128, 2048, 16, torch.float16),
    ("qwen2-7b B=8 KV=4k paged128 GQA7", 8, 28, 4, 128, 4096, 128, torch.bfloat16),
]
# name, B, Nq, Nkv, S, D, dtype (causal prefill through PFA sparse_mode 3)
PREFILL = [
    ("llama3-8b S=1024 causal", 1, 32, 8, 1024, 128, torch.bfloat16),
    ("llama3-8b S=1024 causal fp32", 1, 32, 8, 1024, 128, torch.float32),
    ("qwen2-7b S=512 causal GQA7", 2, 28, 4, 512, 128, torch.bfloat16),
]
INT8 = {"llama3-8b B=1 KV=8k paged16", "llama3-8b B=8 KV=2k paged128", "llama3-8b B=8 KV=2k contiguous"}
QUICK = {"llama3-8b B=8 KV=2k paged128", "llama3-8b S=1024 causal"}


def read_bandwidth(reps):
    """Streaming read GB/s of this run: torch.sum over 1 GiB (every thread)."""
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    (t,) = interleaved_best([lambda: x.sum()], reps)
    return x.numel() * 4 / t / 1e9


def decode_case(B, Nq, Nkv, D, L, bs, dtype, reps, int8_kv=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Nq, 1, D, generator=g).to(dtype)
    lens = [L] * B
    kv_dtype = torch.int8 if int8_kv else dtype

    def cache(*shape):
        x = torch.randn(*shape, generator=g)
        return (x * 40).to(torch.int8) if int8_kv else x.to(dtype)

    if bs:
        per = (L + bs - 1) // bs
        nb = B * per
        kc = cache(nb, Nkv, bs, D)
        vc = cache(nb, Nkv, bs, D)
        table = torch.randperm(nb, generator=g).view(B, per).to(torch.int32)  # scattered blocks
        kw = dict(block_table=table, block_size=bs, actual_seq_lengths=lens)
    else:
        kc = cache(B, Nkv, L, D)
        vc = cache(B, Nkv, L, D)
        kw = {}
    if int8_kv:  # per-channel scales and offsets, FIA v1's separate form (vLLM's int8 cache)
        kw.update(key_antiquant_scale=(torch.rand(Nkv, 1, D, generator=g) * 0.05).to(dtype),
                  value_antiquant_scale=(torch.rand(Nkv, 1, D, generator=g) * 0.05).to(dtype),
                  key_antiquant_offset=torch.randn(Nkv, 1, D, generator=g).to(dtype),
                  value_antiquant_offset=torch.randn(Nkv, 1, D, generator=g).to(dtype))
        if "actual_seq_lengths" in kw:
            kw["actual_seq_lengths_kv"] = kw.pop("actual_seq_lengths")
        fn = lambda: npufa.npu_fused_infer_attention_score(  # noqa: E731
            q, kc, vc, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", scale=D ** -0.5, **kw)
    else:
        fn = lambda: npufa.npu_incre_flash_attention(  # noqa: E731
            q, kc, vc, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", scale_value=D ** -0.5, **kw)
    return fn, B * L * Nkv * 2 * D * (1 if int8_kv else q.element_size())


def prefill_case(B, Nq, Nkv, S, D, dtype, reps):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, S, D, generator=g).to(dtype) for n in (Nq, Nkv, Nkv))
    kr, vr = k.repeat_interleave(Nq // Nkv, 1), v.repeat_interleave(Nq // Nkv, 1)
    to, ts = interleaved_best([
        lambda: npufa.npu_prompt_flash_attention(q, k, v, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
                                                 scale_value=D ** -0.5, sparse_mode=3, atten_mask=CAUSAL_MASK),
        lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=D ** -0.5),
    ], reps)
    flops = forward_flops(B, Nq, S, D, True)
    return flops / to / 1e9, flops / ts / 1e9, ts / to


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 7
    print(f"inference; threads: {torch.get_num_threads()}  torch {torch.__version__}")
    print(f"{'decode case':36s} {'dtype':9s} {'GB/s':>7s} {'read BW':>8s} {'of BW':>6s}")
    for name, *c, dtype in DECODE:
        if args.quick and name not in QUICK:
            continue
        fn, nbytes = decode_case(*c, dtype, reps)
        if name in INT8:  # the int8-KV run interleaved with the float one: their ratio is what counts
            fn8, nbytes8 = decode_case(*c, dtype, reps, int8_kv=True)
            t, t8 = interleaved_best([fn, fn8], reps)
        else:
            (t,) = interleaved_best([fn], reps)
        bw = read_bandwidth(3)  # measured next to each case: the host drifts
        gbs = nbytes / t / 1e9
        print(f"{name:36s} {str(dtype)[6:]:9s} {gbs:7.1f} {bw:8.1f} {gbs / bw:6.0%}")
        if name in INT8:
            gbs8 = nbytes8 / t8 / 1e9
            print(f"{'  same, int8 KV (antiquant)':36s} {'int8':9s} {gbs8:7.1f} {bw:8.1f} {gbs8 / bw:6.0%}"
                  f"   {t / t8:.2f}x the {str(dtype)[6:]}-KV decode")
    print(f"{'prefill case':36s} {'dtype':9s} {'npufa GFLOP/s':>14s} {'SDPA GFLOP/s':>13s} {'speed-up':>9s}")
    for name, *c, dtype in PREFILL:
        if args.quick and name not in QUICK:
            continue
        ours, sdpa, ratio = prefill_case(*c, dtype, reps)
        print(f"{name:36s} {str(dtype)[6:]:9s} {ours:14.1f} {sdpa:13.1f} {ratio:8.2f}x")


if __name__ == "__main__":
    main()
