"""Shared helpers of the inference-op test files (PFA, IFA, FIA v1/v2, _npu_reshape_and_cache).

Conventions: /work/main/docs/inference.md; spec /work/shared/spec/torch_npu_attention.md §1, §5-§8, §11, §12.

Everything is built from a canonical BNSD problem (q [B, Nq, Sq, D], k [B, Nkv, Skv, D], v [B, Nkv, Skv, Dv])
and converted to the layout under test: dense layouts, packed TND/NTD, paged block pools with a random block
permutation, left-padded tensors, shared prefixes.
"""
import importlib.util
import math
import pathlib
import random

import npufa
import torch

from attn_helpers import BF16, F16, F32, F64, TRIU2048, cum, rbool, rnd  # noqa: F401  (re-exported)

FLT_MAX = 3.4028234663852886e38
INT_MAX = 2147483647

PFA, IFA, FIA, FIA2, CACHE = ("npu_prompt_flash_attention", "npu_incre_flash_attention",
                              "npu_fused_infer_attention_score", "npu_fused_infer_attention_score_v2",
                              "_npu_reshape_and_cache")



def load_reference():
    """npufa.reference.<op> once the package exports the inference reference; until then the float64 reference
    file of the source tree (python/npufa/reference_infer.py), loaded by path."""
    if hasattr(npufa.reference, "npu_incre_flash_attention"):
        return npufa.reference
    path = pathlib.Path(__file__).resolve().parents[2] / "python" / "npufa" / "reference_infer.py"
    spec = importlib.util.spec_from_file_location("npufa_reference_infer_for_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


REF = load_reference()


def _up(x):
    return x.to(F64) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def ref_call(name, args, kw):
    """The float64 reference on the same problem with every floating tensor upcast (exactly) to float64, so its
    attention_out is the exact result (the reference returns attention_out in the query's dtype)."""
    return getattr(REF, name)(*(_up(a) for a in args), **{k: _up(v) for k, v in kw.items()})

# input_layout -> (query/key kind, output kind)
LAYOUT_IO = {
    "BSH": ("BSH", "BSH"), "BSND": ("BSND", "BSND"), "BNSD": ("BNSD", "BNSD"),
    "BNSD_BSND": ("BNSD", "BSND"), "BSH_BNSD": ("BSH", "BNSD"), "BSND_BNSD": ("BSND", "BNSD"),
    "BSH_NBSD": ("BSH", "NBSD"), "BSND_NBSD": ("BSND", "NBSD"), "BNSD_NBSD": ("BNSD", "NBSD"),
    "TND": ("TND", "TND"), "TND_NTD": ("TND", "NTD"), "NTD": ("NTD", "NTD"), "NTD_TND": ("NTD", "TND"),
}
TND_FAMILY = ("TND", "TND_NTD", "NTD", "NTD_TND")
PFA_LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND", "TND")
IFA_LAYOUTS = ("BSH", "BSND", "BNSD")
FIA_LAYOUTS = tuple(LAYOUT_IO)
NBSD_LAYOUTS = ("BSH_NBSD", "BSND_NBSD", "BNSD_NBSD")


# ------------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------------
def from_bnsd(x, kind):
    """x [B, N, S, D] -> the (contiguous) tensor of a dense kind: BSH, BSND, BNSD or NBSD."""
    b, n, s, d = x.shape
    if kind == "BSH":
        return x.permute(0, 2, 1, 3).reshape(b, s, n * d).contiguous()
    if kind == "BSND":
        return x.permute(0, 2, 1, 3).contiguous()
    if kind == "NBSD":
        return x.permute(1, 0, 2, 3).contiguous()
    assert kind == "BNSD", kind
    return x.contiguous()


def to_bnsd(x, kind, n=None):
    """Inverse of from_bnsd (BSH needs the head count n)."""
    if kind == "BSH":
        b, s, h = x.shape
        return x.reshape(b, s, n, h // n).permute(0, 2, 1, 3)
    if kind == "BSND":
        return x.permute(0, 2, 1, 3)
    if kind == "NBSD":
        return x.permute(1, 0, 2, 3)
    assert kind == "BNSD", kind
    return x


def pack(x, lengths, T=None):
    """x [B, N, S, D] -> packed [T, N, D] of the first lengths[b] tokens of each batch (T >= sum: zero tail)."""
    parts = [x[b, :, :L].permute(1, 0, 2) for b, L in enumerate(lengths)]
    out = torch.cat(parts, 0) if parts else x.new_zeros(0, x.shape[1], x.shape[3])
    if T is not None and T > out.shape[0]:
        out = torch.cat([out, torch.zeros(T - out.shape[0], x.shape[1], x.shape[3], dtype=x.dtype)], 0)
    return out.contiguous()


def tnd_kind(x, kind):
    """A packed [T, N, D] tensor in kind TND or NTD."""
    return x.contiguous() if kind == "TND" else x.transpose(0, 1).contiguous()


def out_to_tnd(out, kind):
    return out if kind == "TND" else out.transpose(0, 1)


# ------------------------------------------------------------------------------------------------
# paged KV (block pools, §11)
# ------------------------------------------------------------------------------------------------
def make_paged(tensors, lengths, block_size, cache_layout, seed, extra_blocks=2, extra_cols=1, unused_fill="valid",
               garbage=None):
    """Scatter the valid tokens of per-batch KV tensors into block pools with a random block permutation.

    tensors: list of [B, N, S, D] tensors sharing B, N, S (key, value, key_rope, ...).
    cache_layout: "BnBsH" -> pool (blocknum, block_size, N*D); "BnNBsD" -> (blocknum, N, block_size, D).
    unused_fill: what the table holds beyond a batch's blocks: "valid" (random valid ids), "neg" (-1), "zero".
    garbage: value for pool slots that hold no token (default: random numbers; may be float("nan")).
    Returns (pools, block_table int32 [B, W]).
    """
    rng = random.Random(seed)
    B = tensors[0].shape[0]
    need = [math.ceil(L / block_size) for L in lengths]
    W = max(need + [1]) + extra_cols
    nblocks = sum(need) + extra_blocks
    ids = list(range(nblocks))
    rng.shuffle(ids)
    table = torch.zeros(B, W, dtype=torch.int32)
    pools = []
    for t in tensors:
        _, N, _, D = t.shape
        g = torch.Generator().manual_seed(seed + 7)
        if garbage is None:
            pool = torch.randn(nblocks, N, block_size, D, generator=g, dtype=F64).mul(3).to(t.dtype)
        else:
            pool = torch.full((nblocks, N, block_size, D), garbage, dtype=t.dtype)
        pools.append(pool)
    pos = 0
    for b in range(B):
        for i in range(W):
            if i < need[b]:
                blk = ids[pos]
                pos += 1
                table[b, i] = blk
                lo, hi = i * block_size, min((i + 1) * block_size, lengths[b])
                for t, pool in zip(tensors, pools):
                    pool[blk, :, : hi - lo] = t[b, :, lo:hi]
            else:
                table[b, i] = {"valid": rng.randrange(nblocks), "neg": -1, "zero": 0}[unused_fill]
    out = []
    for pool in pools:
        if cache_layout == "BnBsH":
            n, bs, d = pool.shape[1], pool.shape[2], pool.shape[3]
            out.append(pool.permute(0, 2, 1, 3).reshape(nblocks, bs, n * d).contiguous())
        else:
            assert cache_layout == "BnNBsD", cache_layout
            out.append(pool.contiguous())
    return out, table


def slots_for(table, lengths, block_size):
    """vLLM slot mapping of the tokens [0, lengths[b]) of every batch: list of (b, s, slot)."""
    res = []
    for b, L in enumerate(lengths):
        for s in range(L):
            res.append((b, s, int(table[b, s // block_size]) * block_size + s % block_size))
    return res


# ------------------------------------------------------------------------------------------------
# left padding, shared prefix
# ------------------------------------------------------------------------------------------------
def left_pad(x, lengths, pad, seed=0):
    """x [B, N, S, D] right-padded (token t of batch b at t < lengths[b]) -> the same tokens left-padded at
    [S - pad - L_b, S - pad); other positions hold random garbage."""
    B, N, S, D = x.shape
    out = rnd((B, N, S, D), x.dtype, seed + 1234, scale=3.0)
    for b, L in enumerate(lengths):
        start = S - pad - L
        if start < 0:  # the window leaves the tensor (decode: that batch gives 0)
            continue
        out[b, :, start:start + L] = x[b, :, :L]
    return out


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------
def rmask(shape, p, seed, dtype=torch.bool, full_rows=0):
    """Random 0/1 mask (True = masked) with some fully-masked rows at the end of the last axis' rows."""
    m = rbool(shape, p, seed)
    if full_rows and len(shape) >= 2:
        g = torch.Generator().manual_seed(seed + 1)
        rows = m.reshape(-1, shape[-1])
        idx = torch.randint(0, rows.shape[0], (full_rows,), generator=g)
        rows[idx] = True
        m = rows.reshape(shape)
    return m.to(dtype)


def band_mask(Sq, Skv, pre, nxt):
    """True = masked outside the left-up band (j - i <= nxt) and (i - j <= pre)."""
    i = torch.arange(Sq).view(Sq, 1)
    j = torch.arange(Skv).view(1, Skv)
    return ((j - i) > nxt) | ((i - j) > pre)


# ------------------------------------------------------------------------------------------------
# comparisons
# ------------------------------------------------------------------------------------------------
SLACK = {F32: 0.0, F16: 1e-4, BF16: 1e-3}
EPS = {F32: 2.0 ** -23, F16: 2.0 ** -10, BF16: 2.0 ** -7}


def check_out(out, r, dtype, k=3.0):
    """Attention output vs the float64 reference.

    float32: rtol 1e-4 / atol 1e-5. float16/bfloat16 (FlashAttention's rule): max error <= k x the max error of
    a naive low-precision result + slack; the naive error used is the rounding of the exact result to the dtype,
    a lower bound of every low-precision implementation's error (the rule of test_fusion_attention.py)."""
    assert out.dtype == dtype, (out.dtype, dtype)
    assert tuple(out.shape) == tuple(r.shape), (tuple(out.shape), tuple(r.shape))
    assert torch.isfinite(out).all(), "non-finite output"
    o = out.to(F64)
    r = r.to(F64)
    if dtype == F32:
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)
        return
    if not r.numel():
        return
    err = (o - r).abs().max().item()
    naive = (r.to(dtype).to(F64) - r).abs().max().item()
    assert err <= k * naive + SLACK[dtype], f"{dtype}: op error {err:.3e} > {k} x naive error {naive:.3e} + slack"
    # rows the reference zeroes are exactly zero
    zero = r == 0
    assert torch.equal(o[zero], r[zero]), "rows/elements that must be exactly 0 are not"


def check_lse(x, r):
    """softmax_lse: float32, special values (-FLT_MAX) exact, others at float32 precision."""
    assert x.dtype == F32, x.dtype
    assert tuple(x.shape) == tuple(r.shape), (tuple(x.shape), tuple(r.shape))
    if not r.numel():
        return
    xd, r = x.to(F64), r.to(F64)
    special = r.abs() >= FLT_MAX * 0.999999
    assert torch.equal(xd[special], r[special]), "lse of rows without a key must be exactly -FLT_MAX"
    assert torch.isfinite(xd[~special]).all()
    torch.testing.assert_close(xd[~special], r[~special], rtol=2e-5, atol=3e-5)


def agree(a, b, dtype=None, ulps=2.0, exact=False):
    """Two op outputs of the same problem written differently: equal up to a few units in the last place
    of the output dtype (accumulation order may differ), or exactly."""
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    if exact:
        assert torch.equal(a, b), f"not bitwise equal: max diff {(a.to(F64) - b.to(F64)).abs().max().item():.3e}"
        return
    dtype = dtype or a.dtype
    ad, bd = a.to(F64), b.to(F64)
    if dtype in EPS and a.dtype != F32:
        # P is rounded to the dtype before P.V (decision 9) relative to a running max that depends on the
        # tiling: allow a few ulps of the element and of the tensor's largest magnitude
        big = max(ad.abs().max().item(), bd.abs().max().item()) if ad.numel() else 0.0
        tol = ulps * EPS[dtype] * (torch.maximum(ad.abs(), bd.abs()) + 0.25 * big) + 1e-6
    else:
        tol = 4e-6 * torch.maximum(ad.abs(), bd.abs()) + 2e-6
    diff = (ad - bd).abs()
    bad = diff > tol
    assert not bad.any(), f"{int(bad.sum())} elements differ, max diff {diff.max().item():.3e}"


def agree_lse(a, b, exact=False):
    assert a.shape == b.shape and a.dtype == b.dtype == F32, (tuple(a.shape), tuple(b.shape), a.dtype, b.dtype)
    if exact:
        assert torch.equal(a, b)
        return
    sa, sb = a.abs() >= 3.4e38, b.abs() >= 3.4e38
    assert torch.equal(sa, sb) and torch.equal(a[sa], b[sb])
    torch.testing.assert_close(a[~sa].to(F64), b[~sb].to(F64), rtol=4e-6, atol=4e-6)


def differs(a, b, thresh=1e-3):
    """Negative control: two results that must NOT agree."""
    if a.shape != b.shape:
        return True
    return (a.to(F64) - b.to(F64)).abs().max().item() > thresh


def lse_merge(outs, lses):
    """Ring-attention merge: O = sum_k e^{lse_k - M} O_k / sum_k e^{lse_k - M}; lse = M + log(sum e^{lse_k - M}).
    outs: [..., Dv] float64 in a BNSD-like layout whose leading axes match lses[..., 0]."""
    L = torch.stack([x.to(F64)[..., 0] for x in lses])  # [K, ...]
    dead = L <= -FLT_MAX * 0.999999
    Lm = L.masked_fill(dead, float("-inf"))
    M = Lm.amax(0)
    Msafe = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    w = torch.exp(Lm - Msafe)  # dead -> 0
    tot = w.sum(0)
    o = sum(wk.unsqueeze(-1) * ok.to(F64) for wk, ok in zip(w, outs))
    alive = tot > 0
    o = torch.where(alive.unsqueeze(-1), o / torch.where(alive, tot, torch.ones_like(tot)).unsqueeze(-1),
                    torch.zeros_like(o))
    lse = torch.where(alive, Msafe + torch.log(torch.where(alive, tot, torch.ones_like(tot))),
                      torch.full_like(tot, -FLT_MAX))
    return o, lse.unsqueeze(-1)


# ------------------------------------------------------------------------------------------------
# grid sampling
# ------------------------------------------------------------------------------------------------
def sample_grid(factors, n, seed):
    """n configurations where each factor cycles through a fresh random permutation of its values, so every
    value of every factor appears at least once when n >= the longest value list."""
    rng = random.Random(seed)
    pools = {f: [] for f in factors}
    out = []
    for _ in range(n):
        cfg = {}
        for f, vals in factors.items():
            if not pools[f]:
                pools[f] = rng.sample(list(vals), len(vals))
            cfg[f] = pools[f].pop()
        out.append(cfg)
    return out


def cfg_id(cfg):
    parts = []
    for k, v in cfg.items():
        if isinstance(v, torch.dtype):
            v = {F32: "fp32", F16: "fp16", BF16: "bf16"}[v]
        parts.append(f"{k}={v}")
    return ",".join(parts).replace(" ", "")


def lengths_list(kind, B, S, rng, allow_zero=True):
    """Per-batch lengths in [0, S]: 'full' -> None; 'rand' -> B random values (with a 0 when allowed and B > 1);
    'one' -> a single value that broadcasts; 'long' -> B + 2 values (only the first B count)."""
    if kind == "full":
        return None, [S] * B
    if kind == "one":
        L = rng.randint(1 if not allow_zero else 0, S)
        return [L], [L] * B
    vals = [rng.randint(0, S) for _ in range(B)]
    if B > 1 and allow_zero:
        vals[rng.randrange(B)] = 0
    if B > 1:
        vals[rng.randrange(B)] = S
    if not allow_zero:
        vals = [max(1, x) for x in vals]
    if kind == "long":
        return vals + [rng.randint(0, S), S], vals
    return vals, vals
