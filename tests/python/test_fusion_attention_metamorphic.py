"""Metamorphic tests of npufa.npu_fusion_attention: two calls of the op that must agree.

Spec: /work/shared/spec/torch_npu_attention.md §1-§2. No reference implementation is used here:
each test rewrites the same problem in another form (compressed vs explicit mask, TND vs per-batch
BNSD, compressed vs full alibi pse, layout permutations, GQA vs repeated heads, strided vs contiguous
inputs, thread counts) and compares the two results.
"""
import math

import pytest
import torch

import npufa
from attn_helpers import cum, rbool, rnd

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
FLT_MAX = 3.4028234663852886e38
INT_MAX = 2147483647
TRIU2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
fa = npufa.npu_fusion_attention


def bnsd(B, Nq, Nkv, Sq, Skv, D, Dv, dtype=F32, seed=0):
    return rnd((B, Nq, Sq, D), dtype, seed), rnd((B, Nkv, Skv, D), dtype, seed + 1), rnd((B, Nkv, Skv, Dv), dtype,
                                                                                         seed + 2)


def same(a, b, tight=True):
    """Two op results (attention_out, max, sum) agree: tightly (float32 rounding) or exactly."""
    for x, y in zip(a[:3], b[:3]):
        assert x.shape == y.shape and x.dtype == y.dtype
        if tight:
            torch.testing.assert_close(x.to(F64), y.to(F64), rtol=2e-6, atol=2e-6)
        else:
            assert torch.equal(x, y)


def band_mask(Sq, Skv, pre, nxt):
    """True = masked outside the left-up band (j - i <= nxt) and (i - j <= pre)."""
    i = torch.arange(Sq).view(Sq, 1)
    j = torch.arange(Skv).view(1, Skv)
    return ((j - i) > nxt) | ((i - j) > pre)


# ------------------------------------------------------------------------------------------------
# compressed sparse modes == explicit masks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Sq,Skv", [(70, 70), (40, 100), (100, 40), (1, 65), (130, 1)])
def test_mode2_equals_explicit_triangle(Sq, Skv):
    q, k, v = bnsd(2, 4, 2, Sq, Skv, 16, 16, seed=1)
    a = fa(q, k, v, 4, "BNSD", scale=0.3, atten_mask=TRIU2048, sparse_mode=2)
    m = torch.triu(torch.ones(Sq, Skv, dtype=torch.bool), 1)
    same(a, fa(q, k, v, 4, "BNSD", scale=0.3, atten_mask=m, sparse_mode=1))
    same(a, fa(q, k, v, 4, "BNSD", scale=0.3, atten_mask=m, sparse_mode=0))
    same(a, fa(q, k, v, 4, "BNSD", scale=0.3, atten_mask=m, sparse_mode=0, pre_tockens=INT_MAX, next_tockens=0))
    # and the band alone (mode 0 with an all-false mask, next = 0) is the same triangle
    z = torch.zeros(Sq, Skv, dtype=torch.bool)
    same(a, fa(q, k, v, 4, "BNSD", scale=0.3, atten_mask=z, sparse_mode=0, pre_tockens=INT_MAX, next_tockens=0))


@pytest.mark.parametrize("Sq,Skv", [(70, 70), (40, 100), (100, 40), (64, 130), (130, 64), (1, 70)])
def test_mode3_equals_explicit_rightdown_triangle(Sq, Skv):
    q, k, v = bnsd(2, 4, 2, Sq, Skv, 16, 16, seed=2)
    a = fa(q, k, v, 4, "BNSD", scale=0.3, atten_mask=TRIU2048, sparse_mode=3)
    m = torch.triu(torch.ones(Sq, Skv, dtype=torch.bool), Skv - Sq + 1)
    same(a, fa(q, k, v, 4, "BNSD", scale=0.3, atten_mask=m, sparse_mode=1))
    same(a, fa(q, k, v, 4, "BNSD", scale=0.3, atten_mask=m.view(1, 1, Sq, Skv).expand(2, 4, Sq, Skv).contiguous(),
                sparse_mode=0))
    if Sq != Skv:  # really differs from left-up
        b = fa(q, k, v, 4, "BNSD", scale=0.3, atten_mask=TRIU2048, sparse_mode=2)
        assert (a[0] - b[0]).abs().max() > 1e-3


@pytest.mark.parametrize("Sq,Skv", [(70, 70), (40, 100), (100, 40), (65, 129)])
@pytest.mark.parametrize("pre,nxt", [(10, 10), (30, 0), (9, -3), (-3, 7), (0, 0), (INT_MAX, 5), (5, INT_MAX)])
def test_mode4_equals_explicit_band(Sq, Skv, pre, nxt):
    q, k, v = bnsd(1, 2, 2, Sq, Skv, 16, 16, seed=3)
    a = fa(q, k, v, 2, "BNSD", scale=0.3, atten_mask=TRIU2048, sparse_mode=4, pre_tockens=pre, next_tockens=nxt)
    # right-down anchored band == left-up band with P = pre + Sq - Skv, X = next + Skv - Sq (§1.6 note 2)
    P = pre + Sq - Skv if pre != INT_MAX else INT_MAX
    X = nxt + Skv - Sq if nxt != INT_MAX else INT_MAX
    m = band_mask(Sq, Skv, P, X)
    same(a, fa(q, k, v, 2, "BNSD", scale=0.3, atten_mask=m, sparse_mode=1))
    if P >= -(Sq - 1) and X >= -(Skv - 1) and not (P < 0 and X < 0):
        # the same band expressed through mode 0 (left-up pre/next + an all-false mask), when note 5 allows it
        ok_next = X >= 0 or (P >= -X and -X < Skv)
        ok_pre = P >= 0 or (X >= -P and -P < Sq)
        if ok_next and ok_pre:
            z = torch.zeros(Sq, Skv, dtype=torch.bool)
            same(a, fa(q, k, v, 2, "BNSD", scale=0.3, atten_mask=z, sparse_mode=0, pre_tockens=P, next_tockens=X))


def test_mode0_with_default_tokens_equals_mode1():
    q, k, v = bnsd(2, 2, 2, 50, 77, 8, 8, seed=4)
    m = rbool((2, 1, 50, 77), 0.4, 5)
    same(fa(q, k, v, 2, "BNSD", atten_mask=m, sparse_mode=0), fa(q, k, v, 2, "BNSD", atten_mask=m, sparse_mode=1))
    # mode 1 ignores pre/next
    same(fa(q, k, v, 2, "BNSD", atten_mask=m, sparse_mode=1),
         fa(q, k, v, 2, "BNSD", atten_mask=m, sparse_mode=1, pre_tockens=1, next_tockens=1))


@pytest.mark.parametrize("Sq,Skv,prefix", [(70, 70, [0, 33]), (40, 100, [60, 100]), (100, 40, [0, 17])])
def test_mode5_equals_mode6_equals_explicit(Sq, Skv, prefix):
    q, k, v = bnsd(2, 2, 2, Sq, Skv, 16, 16, seed=6)
    i = torch.arange(Sq).view(Sq, 1)
    j = torch.arange(Skv).view(1, Skv)
    m = torch.stack([((j > i + Skv - Sq) & (j >= p)) for p in prefix]).unsqueeze(1)
    c6 = torch.zeros(3072, 2048, dtype=torch.bool)
    c6[:2048] = TRIU2048
    c6[2048:, 1024:] = True
    a = fa(q, k, v, 2, "BNSD", atten_mask=m, sparse_mode=5, prefix=prefix, scale=0.3)
    same(a, fa(q, k, v, 2, "BNSD", atten_mask=c6, sparse_mode=6, prefix=prefix, scale=0.3))
    same(a, fa(q, k, v, 2, "BNSD", atten_mask=m, sparse_mode=1, scale=0.3))


# ------------------------------------------------------------------------------------------------
# TND == per-batch BNSD
# ------------------------------------------------------------------------------------------------
def _pack_bits(bits):
    """bool [n] -> LSB-first uint8 bytes."""
    n = bits.numel()
    pad = (-n) % 8
    b = torch.cat([bits.to(torch.int64), torch.zeros(pad, dtype=torch.int64)]).view(-1, 8)
    return (b << torch.arange(8)).sum(1).to(torch.uint8)


def _unpack_bits(mask, n):
    return ((mask.to(torch.int64).unsqueeze(1) >> torch.arange(8)) & 1).reshape(-1)[:n].bool()


TND_CASES = {
    "none": dict(),
    "mode2": dict(atten_mask=TRIU2048, sparse_mode=2),
    "mode3": dict(atten_mask=TRIU2048, sparse_mode=3),
    "mode4": dict(atten_mask=TRIU2048, sparse_mode=4, pre_tockens=12, next_tockens=3),
    "mode0": "local-mask",
    "pse": "pse",
    "sink": "sink",
    "dropout": "dropout",
}


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(TND_CASES))
def test_tnd_equals_per_batch_bnsd(case, dtype):
    lq, lkv = [30, 0, 70, 1, 64], [40, 0, 75, 3, 130]
    Nq, Nkv, D, Dv = 4, 2, 16, 12
    B = len(lq)
    Tq, Tkv = sum(lq), sum(lkv)
    q, k, v = rnd((Tq, Nq, D), dtype, 10), rnd((Tkv, Nkv, D), dtype, 11), rnd((Tkv, Nkv, Dv), dtype, 12)
    kw_t = dict(actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv), scale=0.25, softmax_layout="TND")
    spec = TND_CASES[case]
    per_batch_kw = [dict() for _ in range(B)]
    if isinstance(spec, dict):
        kw_t.update(spec)
        for d in per_batch_kw:
            d.update(spec)
    elif spec == "local-mask":
        m = rbool((max(lq), max(lkv)), 0.2, 13)
        kw_t.update(atten_mask=m, sparse_mode=0, pre_tockens=20, next_tockens=5)
        for b, d in enumerate(per_batch_kw):
            d.update(atten_mask=m[:lq[b], :lkv[b]].contiguous(), sparse_mode=0, pre_tockens=20, next_tockens=5)
    elif spec == "pse":
        lq, lkv = [30, 70, 1, 64], [40, 75, 3, 130]  # pse: no zero-length batch allowed
        B = len(lq)
        Tq, Tkv = sum(lq), sum(lkv)
        q, k, v = rnd((Tq, Nq, D), dtype, 10), rnd((Tkv, Nkv, D), dtype, 11), rnd((Tkv, Nkv, Dv), dtype, 12)
        kw_t.update(actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv))
        pse = rnd((B, Nq, max(lq), max(lkv)), dtype, 14)
        kw_t.update(pse=pse)
        per_batch_kw = [dict(pse=pse[b:b + 1, :, :lq[b], :lkv[b]].contiguous()) for b in range(B)]
    elif spec == "sink":
        sink = rnd((Nq,), F32, 15)
        kw_t.update(sink=sink)
        per_batch_kw = [dict(sink=sink) for _ in range(B)]
    elif spec == "dropout":
        kw_t.update(keep_prob=0.7, seed=99, offset=32)
        res_t = fa(q, k, v, Nq, "TND", **kw_t)
        elements = Nq * sum(a * c for a, c in zip(lq, lkv))
        bits = _unpack_bits(npufa.dropout_gen_mask(elements, 0.7, 99, 32), elements)
        off = 0
        for b in range(B):
            n = Nq * lq[b] * lkv[b]
            per_batch_kw[b].update(keep_prob=0.7, dropout_mask=_pack_bits(bits[off:off + n]))
            off += n
    res_t = fa(q, k, v, Nq, "TND", **kw_t)
    qo = ko = 0
    for b in range(B):
        sq, skv = lq[b], lkv[b]
        if sq == 0:
            qo += sq
            ko += skv
            continue
        qb = q[qo:qo + sq].permute(1, 0, 2).unsqueeze(0).contiguous()
        kb = k[ko:ko + skv].permute(1, 0, 2).unsqueeze(0).contiguous()
        vb = v[ko:ko + skv].permute(1, 0, 2).unsqueeze(0).contiguous()
        r = fa(qb, kb, vb, Nq, "BNSD", scale=0.25, **per_batch_kw[b])
        got = (res_t[0][qo:qo + sq], res_t[1][qo:qo + sq], res_t[2][qo:qo + sq])
        want = (r[0][0].permute(1, 0, 2), r[1][0].permute(1, 0, 2), r[2][0].permute(1, 0, 2))
        same(got, want, tight=False)
        qo += sq
        ko += skv


def test_tnd_mode7_mode8_reduce_to_3_and_2():
    """Mode 7: every batch except the last non-empty one is right-down causal (== mode 3);
    mode 8: every batch except the first non-empty one is left-up causal (== mode 2)."""
    lq, lkv = [0, 20, 30, 25, 0], [0, 20, 50, 40, 0]
    q, k, v = rnd((75, 2, 8), seed=20), rnd((110, 2, 8), seed=21), rnd((110, 2, 8), seed=22)
    kw = dict(actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv), atten_mask=TRIU2048, scale=0.3)
    # softmax_layout "TND": stats rows are token rows, so slicing by tokens is meaningful
    m7 = fa(q, k, v, 2, "TND", sparse_mode=7, pre_tockens=INT_MAX, next_tockens=-4, softmax_layout="TND", **kw)
    m3 = fa(q, k, v, 2, "TND", sparse_mode=3, softmax_layout="TND", **kw)
    same((m7[0][:50], m7[1][:50], m7[2][:50]), (m3[0][:50], m3[1][:50], m3[2][:50]))
    assert (m7[0][50:] - m3[0][50:]).abs().max() > 1e-3
    # next = 0 makes mode 7 exactly mode 3
    same(fa(q, k, v, 2, "TND", sparse_mode=7, pre_tockens=INT_MAX, next_tockens=0, softmax_layout="TND", **kw),
         fa(q, k, v, 2, "TND", sparse_mode=3, softmax_layout="TND", **kw))
    m8 = fa(q, k, v, 2, "TND", sparse_mode=8, pre_tockens=INT_MAX, next_tockens=5, softmax_layout="TND", **kw)
    m2 = fa(q, k, v, 2, "TND", sparse_mode=2, softmax_layout="TND", **kw)
    same((m8[0][20:], m8[1][20:], m8[2][20:]), (m2[0][20:], m2[1][20:], m2[2][20:]))
    assert (m8[0][:20] - m2[0][:20]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# alibi-compressed pse == full Toeplitz pse
# ------------------------------------------------------------------------------------------------
def _toeplitz(f, S):
    """f [..., 2S-1] indexed by (i - j) + S - 1 -> [..., S, S]."""
    i = torch.arange(S).view(S, 1)
    j = torch.arange(S).view(1, S)
    return f[..., (i - j) + S - 1]


@pytest.mark.parametrize("mode", [2, 3, 0])
@pytest.mark.parametrize("pb", [1, 2])
def test_alibi_compressed_equals_full(pb, mode):
    B, N, S = 2, 2, 1100
    q, k, v = bnsd(B, N, N, S, S, 8, 8, seed=30)
    f = rnd((pb, N, 2 * S - 1), seed=31)
    full = _toeplitz(f, S).contiguous()
    comp = full[:, :, -1024:, :].contiguous()
    if mode == 0:
        kw = dict(atten_mask=torch.triu(torch.ones(S, S, dtype=torch.bool), 1), sparse_mode=0, next_tockens=0)
    else:
        kw = dict(atten_mask=TRIU2048, sparse_mode=mode)
    a = fa(q, k, v, N, "BNSD", pse=comp, scale=0.3, **kw)
    b = fa(q, k, v, N, "BNSD", pse=full, scale=0.3, **kw)
    same(a, b)
    # the pse matters
    c = fa(q, k, v, N, "BNSD", scale=0.3, **kw)
    assert (a[0] - c[0]).abs().max() > 1e-2


@pytest.mark.parametrize("S", [2100, 3000])
def test_alibi_compressed_equals_full_multiple_wraps(S):
    """Sq > 2048: rows before R = Sq - 1024 wrap around the 1024 stored rows more than once."""
    q, k, v = bnsd(1, 1, 1, S, S, 4, 4, seed=36)
    f = rnd((1, 1, 2 * S - 1), seed=37)
    full = _toeplitz(f, S).contiguous()
    kw = dict(atten_mask=TRIU2048, sparse_mode=3, scale=0.5)
    same(fa(q, k, v, 1, "BNSD", pse=full[:, :, -1024:, :].contiguous(), **kw), fa(q, k, v, 1, "BNSD", pse=full, **kw))


def test_alibi_compressed_tnd_equals_full():
    lq = [1100, 40, 300]
    N, S = 2, 1100
    T = sum(lq)
    q, k, v = rnd((T, N, 8), seed=32), rnd((T, N, 8), seed=33), rnd((T, N, 8), seed=34)
    f = rnd((len(lq), N, 2 * S - 1), seed=35)
    full = _toeplitz(f, S).contiguous()  # [B, N, S, S], local indices per batch
    comp = full[:, :, -1024:, :].contiguous()
    kw = dict(actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lq), atten_mask=TRIU2048, sparse_mode=3, scale=0.3)
    same(fa(q, k, v, N, "TND", pse=comp, **kw), fa(q, k, v, N, "TND", pse=full, **kw))


# ------------------------------------------------------------------------------------------------
# layouts agree
# ------------------------------------------------------------------------------------------------
def _from_bnsd(x, layout):
    b, n, s, d = x.shape
    if layout == "BSH":
        return x.permute(0, 2, 1, 3).reshape(b, s, n * d).contiguous()
    if layout == "SBH":
        return x.permute(2, 0, 1, 3).reshape(s, b, n * d).contiguous()
    if layout == "BSND":
        return x.permute(0, 2, 1, 3).contiguous()
    return x.contiguous()


def _to_bnsd(x, layout, n):
    if layout == "BSH":
        b, s, h = x.shape
        return x.reshape(b, s, n, h // n).permute(0, 2, 1, 3)
    if layout == "SBH":
        s, b, h = x.shape
        return x.reshape(s, b, n, h // n).permute(1, 2, 0, 3)
    if layout == "BSND":
        return x.permute(0, 2, 1, 3)
    return x


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("extras", ["none", "mask_pse_sink", "dropout", "mode4"])
def test_dense_layouts_agree(extras, dtype):
    B, Nq, Nkv, Sq, Skv, D, Dv = 2, 6, 3, 67, 130, 24, 16
    q, k, v = bnsd(B, Nq, Nkv, Sq, Skv, D, Dv, dtype, seed=40)
    kw = dict(scale=D ** -0.5)
    if extras == "mask_pse_sink":
        kw.update(atten_mask=rbool((B, 1, Sq, Skv), 0.3, 41), pse=rnd((B, Nq, 1, Skv), dtype, 42),
                  sink=rnd((Nq,), F32, 43), pre_tockens=40, next_tockens=70)
    elif extras == "dropout":
        kw.update(keep_prob=0.6, seed=7, offset=12)
    elif extras == "mode4":
        kw.update(atten_mask=TRIU2048, sparse_mode=4, pre_tockens=20, next_tockens=-10)
    base = fa(q, k, v, Nq, "BNSD", **kw)
    for lay in ("BSH", "SBH", "BSND"):
        r = fa(_from_bnsd(q, lay), _from_bnsd(k, lay), _from_bnsd(v, lay), Nq, lay, **kw)
        assert r[4:] == base[4:]
        same((_to_bnsd(r[0], lay, Nq), r[1], r[2]), base[:3], tight=False)


# ------------------------------------------------------------------------------------------------
# GQA == repeated KV heads
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["BNSD", "BSH", "TND"])
@pytest.mark.parametrize("g", [2, 3, 4])
def test_gqa_equals_repeated_kv(g, layout):
    Nkv, D, Dv = 2, 16, 8
    Nq = Nkv * g
    if layout == "TND":
        lq, lkv = [10, 70], [20, 66]
        q, k, v = rnd((80, Nq, D), seed=50), rnd((86, Nkv, D), seed=51), rnd((86, Nkv, Dv), seed=52)
        kw = dict(actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv), atten_mask=TRIU2048, sparse_mode=2)
        a = fa(q, k, v, Nq, "TND", **kw)
        b = fa(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), Nq, "TND", **kw)
    else:
        q, k, v = bnsd(2, Nq, Nkv, 40, 70, D, Dv, seed=53)
        kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        kw = dict(atten_mask=TRIU2048, sparse_mode=3, keep_prob=0.8, seed=5)
        a = fa(_from_bnsd(q, layout), _from_bnsd(k, layout), _from_bnsd(v, layout), Nq, layout, **kw)
        b = fa(_from_bnsd(q, layout), _from_bnsd(kr, layout), _from_bnsd(vr, layout), Nq, layout, **kw)
    same(a, b)
    # head n reads KV head n // g (not n % Nkv)
    if layout == "BNSD":
        perm = torch.arange(Nq) % Nkv
        c = fa(q, k[:, perm], v[:, perm], Nq, "BNSD", **kw)
        assert (a[0] - c[0]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# non-contiguous inputs
# ------------------------------------------------------------------------------------------------
def test_noncontiguous_dense():
    B, N, Sq, Skv, D = 2, 4, 70, 65, 16
    q, k, v = bnsd(B, N, N, Sq, Skv, D, D, seed=60)
    m = rbool((B, N, Skv, Sq), 0.3, 61).transpose(2, 3)  # [B,N,Sq,Skv] view
    pse = rnd((1, N, Skv, Sq), seed=62).transpose(2, 3)
    sink = rnd((N,), seed=63)
    kw = dict(scale=0.3, keep_prob=0.9, seed=3, sink=sink)
    base = fa(q, k, v, N, "BNSD", atten_mask=m.contiguous(), pse=pse.contiguous(), **kw)
    # BNSD views of BSND storage
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous() and not m.is_contiguous() and not pse.is_contiguous()
    same(fa(qt, kt, vt, N, "BNSD", atten_mask=m, pse=pse, **kw), base, tight=False)
    # slices along D of a wider tensor, every other batch of a larger batch
    wide = torch.cat([q, torch.randn(B, N, Sq, 5)], dim=-1)[..., :D]
    kk = torch.stack([k, torch.randn_like(k)], 1).reshape(2 * B, N, Skv, D)[::2]
    assert not wide.is_contiguous() and not kk.is_contiguous()
    same(fa(wide, kk, v, N, "BNSD", atten_mask=m, pse=pse, **kw), base, tight=False)
    # broadcast (stride-0) views: BN1S pse expanded to BNSS, an expanded SS mask
    p1 = rnd((B, N, 1, Skv), seed=64)
    m1 = rbool((Sq, Skv), 0.3, 65)
    r1 = fa(q, k, v, N, "BNSD", pse=p1, atten_mask=m1)
    r2 = fa(q, k, v, N, "BNSD", pse=p1.expand(B, N, Sq, Skv), atten_mask=m1.expand(B, N, Sq, Skv))
    same(r1, r2, tight=False)


@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND"])
def test_noncontiguous_3d_4d_layouts(layout):
    B, N, S, D = 2, 3, 40, 8
    q, k, v = bnsd(B, N, N, S, S, D, D, seed=66)
    ql, kl, vl = (_from_bnsd(x, layout) for x in (q, k, v))
    # same values, transposed storage
    qn, kn, vn = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (ql, kl, vl))
    assert not qn.is_contiguous()
    same(fa(qn, kn, vn, N, layout, atten_mask=TRIU2048, sparse_mode=2),
         fa(ql, kl, vl, N, layout, atten_mask=TRIU2048, sparse_mode=2), tight=False)


def test_noncontiguous_tnd():
    lq, lkv = [10, 70], [20, 76]
    q, k, v = rnd((80, 4, 16), seed=67), rnd((96, 2, 16), seed=68), rnd((96, 2, 16), seed=69)
    kw = dict(actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv), atten_mask=TRIU2048, sparse_mode=3,
              softmax_layout="TND")
    qn = q.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    kn = torch.cat([k, k], -1)[..., :16]
    vn = v.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    assert not (qn.is_contiguous() or kn.is_contiguous() or vn.is_contiguous())
    same(fa(qn, kn, vn, 4, "TND", **kw), fa(q, k, v, 4, "TND", **kw), tight=False)
    m = rbool((70, 76), 0.2, 70)
    kw2 = dict(actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv), sparse_mode=1)
    same(fa(q, k, v, 4, "TND", atten_mask=m.t().contiguous().t(), **kw2), fa(q, k, v, 4, "TND", atten_mask=m, **kw2),
         tight=False)


def test_noncontiguous_sink():
    q, k, v = bnsd(1, 4, 2, 9, 11, 8, 8, seed=71)
    s = rnd((8,), seed=72)
    same(fa(q, k, v, 4, "BNSD", sink=s[::2]), fa(q, k, v, 4, "BNSD", sink=s[::2].contiguous()), tight=False)


def test_noncontiguous_dropout_mask():
    q, k, v = bnsd(1, 4, 2, 9, 11, 8, 8, seed=73)
    m = torch.randint(0, 256, (400,), dtype=torch.uint8, generator=torch.Generator().manual_seed(74))[::2]
    same(fa(q, k, v, 4, "BNSD", keep_prob=0.5, dropout_mask=m),
         fa(q, k, v, 4, "BNSD", keep_prob=0.5, dropout_mask=m.contiguous()), tight=False)


def test_noncontiguous_flat_tnd_pse():
    lq, lkv = [4, 5], [6, 5]
    q, k, v = rnd((9, 2, 8), seed=75), rnd((11, 2, 8), seed=76), rnd((11, 2, 8), seed=77)
    pse = rnd((2 * 2 * sum(lkv),), seed=78)[::2]
    kw = dict(actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv))
    same(fa(q, k, v, 2, "TND", pse=pse, **kw), fa(q, k, v, 2, "TND", pse=pse.contiguous(), **kw), tight=False)


# ------------------------------------------------------------------------------------------------
# thread count
# ------------------------------------------------------------------------------------------------
def _tnd_case():
    lq, lkv = [70, 0, 130, 5], [75, 0, 140, 5]
    q, k, v = rnd((205, 4, 16), seed=80), rnd((220, 2, 16), seed=81), rnd((220, 2, 16), seed=82)
    return (q, k, v, 4, "TND"), dict(actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv), atten_mask=TRIU2048,
                                     sparse_mode=3, sink=rnd((4,), seed=83), keep_prob=0.8, seed=9)


def _dense_case(dtype):
    q, k, v = bnsd(2, 4, 2, 130, 129, 24, 24, dtype, seed=84)
    return (q, k, v, 4, "BNSD"), dict(atten_mask=rbool((2, 1, 130, 129), 0.2, 85), pse=rnd((1, 4, 130, 129), dtype, 86),
                                      pre_tockens=70, next_tockens=20, scale=0.2)


@pytest.mark.parametrize("case", ["dense_fp32", "dense_bf16", "tnd"])
def test_thread_count_independent(case):
    args, kw = _tnd_case() if case == "tnd" else _dense_case(F32 if case == "dense_fp32" else BF16)
    results = []
    try:
        for nt in (1, 2, 3):
            npufa.set_num_threads(nt)
            results.append(fa(*args, **kw))
    finally:
        npufa.set_num_threads(None)
    for r in results[1:]:
        same(r, results[0], tight=False)
        assert r[4:] == results[0][4:]


# ------------------------------------------------------------------------------------------------
# arguments without numeric effect
# ------------------------------------------------------------------------------------------------
def test_scheduling_flags_and_inner_precise_have_no_effect():
    """gen_mask_parallel / sync only schedule mask generation; inner_precise 0-3 do not change results
    (invalid-row correction is always on, decision 4)."""
    q, k, v = bnsd(2, 4, 2, 70, 66, 16, 16, seed=90)
    m = rbool((2, 1, 70, 66), 0.3, 91)
    m[0, 0, 3] = True
    kw = dict(atten_mask=m, scale=0.3, keep_prob=0.7, seed=17, offset=8)
    base = fa(q, k, v, 4, "BNSD", **kw)
    for extra in (dict(gen_mask_parallel=False), dict(sync=True), dict(gen_mask_parallel=False, sync=True),
                  dict(inner_precise=1), dict(inner_precise=2), dict(inner_precise=3)):
        r = fa(q, k, v, 4, "BNSD", **kw, **extra)
        same(r, base, tight=False)
        assert r[4:] == base[4:]


def test_keep_prob_one_equals_no_dropout():
    q, k, v = bnsd(1, 2, 2, 40, 50, 8, 8, seed=92)
    same(fa(q, k, v, 2, "BNSD", keep_prob=1.0, seed=5, offset=3), fa(q, k, v, 2, "BNSD"), tight=False)
