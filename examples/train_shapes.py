"""npufa's main job for now: realistic training shapes through npufa.npu_fusion_attention.

Each case runs the op as torch_npu code would call it and compares it with npufa.reference (float64,
materialised scores). Prints: case, layout, shape, dtype, max abs error vs the reference, time.

    python examples/train_shapes.py
"""
from __future__ import annotations

import time

import torch

import npufa
from npufa import reference

CAUSAL = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)  # torch_npu's compressed mask


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, N, S, D] -> the given dense layout."""
    b, n, s, d = x.shape
    if layout == "BNSD":
        return x
    if layout == "BSND":
        return x.transpose(1, 2).contiguous()
    if layout == "BSH":
        return x.transpose(1, 2).reshape(b, s, n * d)
    if layout == "SBH":
        return x.permute(2, 0, 1, 3).reshape(s, b, n * d)
    raise ValueError(layout)


def dense_case(name, layout, B, Nq, Nkv, S, D, dtype, **kw):
    g = torch.Generator().manual_seed(0)
    q = to_layout(torch.randn(B, Nq, S, D, generator=g).to(dtype), layout)
    k = to_layout(torch.randn(B, Nkv, S, D, generator=g).to(dtype), layout)
    v = to_layout(torch.randn(B, Nkv, S, D, generator=g).to(dtype), layout)
    return name, layout, f"B={B} Nq={Nq} Nkv={Nkv} S={S} D={D}", dtype, (q, k, v, Nq, layout), kw


def varlen_case(name, lens, Nq, Nkv, D, dtype, **kw):
    g = torch.Generator().manual_seed(0)
    T = sum(lens)
    q = torch.randn(T, Nq, D, generator=g).to(dtype)
    k = torch.randn(T, Nkv, D, generator=g).to(dtype)
    v = torch.randn(T, Nkv, D, generator=g).to(dtype)
    cum = torch.tensor(lens).cumsum(0).tolist()
    kw.update(actual_seq_qlen=cum, actual_seq_kvlen=cum)
    return name, "TND", f"T={T} batches={len(lens)} Nq={Nq} Nkv={Nkv} D={D}", dtype, (q, k, v, Nq, "TND"), kw


CASES = [
    dense_case("GPT-2 small, causal", "BSH", 4, 12, 12, 512, 64, torch.float32,
               atten_mask=CAUSAL, sparse_mode=2, scale=64 ** -0.5),
    dense_case("BERT-base, no mask", "SBH", 8, 12, 12, 256, 64, torch.float16, scale=64 ** -0.5),
    dense_case("Llama-3-8B, GQA 4, causal", "BSND", 1, 32, 8, 1024, 128, torch.bfloat16,
               atten_mask=CAUSAL, sparse_mode=3, scale=128 ** -0.5),
    dense_case("Qwen2-7B, GQA 7, causal", "BNSD", 1, 28, 4, 512, 128, torch.bfloat16,
               atten_mask=CAUSAL, sparse_mode=3, scale=128 ** -0.5),
    dense_case("Mistral-7B, sliding window 256", "BNSD", 1, 32, 8, 1024, 128, torch.float16,
               atten_mask=CAUSAL, sparse_mode=4, pre_tockens=256, next_tockens=0, scale=128 ** -0.5),
    dense_case("ViT-B/16, S=197", "BSND", 16, 12, 12, 197, 64, torch.float32, scale=64 ** -0.5),
    dense_case("GPT-2 small, dropout 0.1", "BSH", 2, 12, 12, 512, 64, torch.float32,
               atten_mask=CAUSAL, sparse_mode=2, scale=64 ** -0.5, keep_prob=0.9, seed=1234),
    varlen_case("MiniLM packed, varlen", [37, 128, 5, 96, 64, 1], 12, 12, 32, torch.float32, scale=32 ** -0.5),
    varlen_case("Llama packed, varlen causal", [300, 700, 24], 32, 8, 128, torch.bfloat16,
                atten_mask=CAUSAL, sparse_mode=3, scale=128 ** -0.5),
]


def main() -> None:
    print(f"npufa {npufa.__version__}, torch {torch.__version__}, threads {npufa.get_num_threads()}")
    head = f"{'case':32s} {'layout':6s} {'shape':38s} {'dtype':9s} {'max err':>9s} {'ms':>8s}"
    print(head)
    print("-" * len(head))
    worst = 0.0
    for name, layout, shape, dtype, args, kw in CASES:
        npufa.npu_fusion_attention(*args, **kw)  # warm-up
        t0 = time.perf_counter()
        out = npufa.npu_fusion_attention(*args, **kw)
        ms = (time.perf_counter() - t0) * 1e3
        ref_kw = dict(kw)
        if kw.get("keep_prob", 1.0) < 1.0:  # the reference takes the mask the op drew
            ref_kw["dropout_mask"] = npufa.dropout_gen_mask(out[6], kw["keep_prob"], out[4], out[5])
        ref = reference.npu_fusion_attention(*args, **ref_kw)
        err = (out[0].double() - ref[0]).abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        worst = max(worst, err / tol)
        flag = "" if err <= tol else "  <-- above tolerance"
        print(f"{name:32s} {layout:6s} {shape:38s} {str(dtype)[6:]:9s} {err:9.2e} {ms:8.1f}{flag}")
    print(f"worst error / tolerance: {worst:.2f}")
    if worst > 1.0:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
