"""Shared helpers of the npu_fusion_attention test files (inputs in every layout, masks)."""
import torch

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
TRIU2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def prefix_compressed_mask():
    """The 3072x2048 mask of sparse_mode 6 (§1.6.1): triu(2048) on top, then [0 | 1] halves."""
    m = torch.zeros(3072, 2048, dtype=torch.bool)
    m[:2048] = TRIU2048
    m[2048:, 1024:] = True
    return m


def rnd(shape, dtype=F32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def rbool(shape, p, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) < p


def to_layout(x, layout):
    """x is [B, N, S, D] -> the tensor of `layout` (contiguous)."""
    b, n, s, d = x.shape
    lay = layout.upper()
    if lay == "BSH":
        return x.permute(0, 2, 1, 3).reshape(b, s, n * d).contiguous()
    if lay == "SBH":
        return x.permute(2, 0, 1, 3).reshape(s, b, n * d).contiguous()
    if lay == "BSND":
        return x.permute(0, 2, 1, 3).contiguous()
    assert lay == "BNSD"
    return x.contiguous()


def dense_qkv(layout, B, Nq, Nkv, Sq, Skv, D, Dv, dtype=F32, seed=0):
    q = rnd((B, Nq, Sq, D), dtype, seed)
    k = rnd((B, Nkv, Skv, D), dtype, seed + 1)
    v = rnd((B, Nkv, Skv, Dv), dtype, seed + 2)
    return to_layout(q, layout), to_layout(k, layout), to_layout(v, layout)


def cum(lengths):
    out, s = [], 0
    for x in lengths:
        s += x
        out.append(s)
    return out


def tnd_qkv(Tq, Tkv, Nq, Nkv, D, Dv, dtype=F32, seed=0):
    return (rnd((Tq, Nq, D), dtype, seed), rnd((Tkv, Nkv, D), dtype, seed + 1),
            rnd((Tkv, Nkv, Dv), dtype, seed + 2))
