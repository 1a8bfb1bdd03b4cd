"""Sanity tests of the float64 reference (python/npufa/reference.py) on its own."""

import importlib.util
import math
import pathlib
import time

import pytest
import torch
import torch.nn.functional as F

_PATH = pathlib.Path(__file__).resolve().parents[2] / "python" / "npufa" / "reference.py"
_spec = importlib.util.spec_from_file_location("npufa_reference_under_test", _PATH)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

F64 = torch.float64
FLT_MAX = 3.4028234663852886e38
TRIU2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def rnd(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def sdpa(q, k, v, scale, mask=None, is_causal=False):
    """q,k,v BNSD; mask True = masked (opposite of SDPA's convention)."""
    attn_mask = None if mask is None else ~mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


def naive(q, k, v, scale, masked=None, pse=None, sink=None):
    """Tiny loop-free softmax reference over BNSD (masked: True = masked, broadcastable)."""
    s = q @ k.transpose(-1, -2)
    if pse is not None:
        s = s + pse
    s = s * scale
    if masked is not None:
        s = s.masked_fill(masked, float("-inf"))
    if sink is not None:
        col = sink.view(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1).to(F64)
        p = torch.softmax(torch.cat([s, col], -1), -1)[..., :-1]
    else:
        p = torch.softmax(s, -1)
    return p @ v


def call(q, k, v, n, layout, **kw):
    return ref.npu_fusion_attention(q, k, v, n, layout, **kw)


# ------------------------------------------------------------------------------------------------
def test_hand_computed_2x3():
    q = torch.tensor([[[[1.0], [0.0]]]], dtype=F64)  # [1,1,2,1]
    k = torch.tensor([[[[0.0], [1.0], [2.0]]]], dtype=F64)  # [1,1,3,1]
    v = torch.tensor([[[[1.0], [2.0], [3.0]]]], dtype=F64)
    out, mx, sm, so, seed, off, numels = call(q, k, v, 1, "BNSD")
    e = math.e
    exp_out0 = (1 + 2 * e + 3 * e * e) / (1 + e + e * e)
    assert out.shape == (1, 1, 2, 1) and out.dtype == F64
    assert out[0, 0, 0, 0].item() == pytest.approx(exp_out0, rel=1e-14)
    assert out[0, 0, 1, 0].item() == pytest.approx(2.0, rel=1e-14)
    assert mx.shape == (1, 1, 2, 8) and sm.shape == (1, 1, 2, 8)
    assert torch.all(mx[0, 0, 0] == 2.0) and torch.all(mx[0, 0, 1] == 0.0)
    assert sm[0, 0, 0, 3].item() == pytest.approx(math.exp(-2) + math.exp(-1) + 1, rel=1e-14)
    assert sm[0, 0, 1, 7].item() == pytest.approx(3.0, rel=1e-14)
    assert so.shape == (0,) and (seed, off, numels) == (0, 0, 6)


def test_plain_equals_sdpa_and_float_inputs():
    q, k, v = rnd(2, 4, 7, 16, seed=1), rnd(2, 4, 9, 16, seed=2), rnd(2, 4, 9, 12, seed=3)
    out, mx, sm, *_ = call(q, k, v, 4, "BNSD", scale=0.25)
    torch.testing.assert_close(out, sdpa(q, k, v, 0.25), rtol=1e-12, atol=1e-12)
    s = (q @ k.transpose(-1, -2)) * 0.25
    torch.testing.assert_close(mx[..., 0], s.amax(-1), rtol=0, atol=0)
    torch.testing.assert_close(sm[..., 5], torch.exp(s - s.amax(-1, keepdim=True)).sum(-1), rtol=1e-13, atol=0)
    # float32 inputs are upcast: result is the float64 result on the rounded inputs
    out32, *_ = call(q.float(), k.float(), v.float(), 4, "BNSD", scale=0.25)
    assert out32.dtype == F64
    torch.testing.assert_close(out32, sdpa(q.float().double(), k.float().double(), v.float().double(), 0.25))


@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "bnsd"])
def test_layouts_agree(layout):
    B, N, Nkv, Sq, Skv, D, Dv = 2, 4, 2, 5, 6, 8, 4
    q, k, v = rnd(B, N, Sq, D, seed=4), rnd(B, Nkv, Skv, D, seed=5), rnd(B, Nkv, Skv, Dv, seed=6)
    base, bmx, bsm, *_ = call(q, k, v, N, "BNSD", scale=0.3)

    def conv(x):
        b, n, s, d = x.shape
        if layout == "BSH":
            return x.permute(0, 2, 1, 3).reshape(b, s, n * d)
        if layout == "SBH":
            return x.permute(2, 0, 1, 3).reshape(s, b, n * d)
        if layout == "BSND":
            return x.permute(0, 2, 1, 3)
        return x

    out, mx, sm, _, _, _, numels = call(conv(q), conv(k), conv(v), N, layout, scale=0.3)
    torch.testing.assert_close(out, conv(base), rtol=0, atol=0)
    torch.testing.assert_close(mx, bmx, rtol=0, atol=0)
    torch.testing.assert_close(sm, bsm, rtol=0, atol=0)
    assert numels == B * N * Sq * Skv


def test_sparse_mode2_equals_causal_and_mask_none_ignores_mode():
    q, k, v = rnd(1, 3, 10, 8, seed=7), rnd(1, 3, 10, 8, seed=8), rnd(1, 3, 10, 8, seed=9)
    out, *_ = call(q, k, v, 3, "BNSD", scale=0.5, atten_mask=TRIU2048, sparse_mode=2)
    torch.testing.assert_close(out, sdpa(q, k, v, 0.5, is_causal=True), rtol=1e-12, atol=1e-12)
    # no atten_mask => full attention whatever sparse_mode / pre / next say
    for mode in (0, 2, 3, 4):
        out2, *_ = call(q, k, v, 3, "BNSD", scale=0.5, sparse_mode=mode, pre_tockens=0, next_tockens=0)
        torch.testing.assert_close(out2, sdpa(q, k, v, 0.5), rtol=1e-12, atol=1e-12)


def test_sparse_mode3_and_mode4_right_down():
    Sq, Skv = 5, 9
    q, k, v = rnd(1, 2, Sq, 8, seed=10), rnd(1, 2, Skv, 8, seed=11), rnd(1, 2, Skv, 8, seed=12)
    i = torch.arange(Sq).view(-1, 1)
    j = torch.arange(Skv).view(1, -1)
    out, *_ = call(q, k, v, 2, "BNSD", atten_mask=TRIU2048, sparse_mode=3)
    torch.testing.assert_close(out, sdpa(q, k, v, 1.0, mask=j > i + (Skv - Sq)), rtol=1e-12, atol=1e-12)
    # mode 4: band anchored at the bottom-right corner
    pre, nxt = 2, 1
    d = j - i - (Skv - Sq)
    band_masked = (d > nxt) | (-d > pre)
    out4, *_ = call(q, k, v, 2, "BNSD", atten_mask=TRIU2048, sparse_mode=4, pre_tockens=pre, next_tockens=nxt)
    torch.testing.assert_close(out4, sdpa(q, k, v, 1.0, mask=band_masked), rtol=1e-12, atol=1e-12)


def test_mode0_mask_and_band_mode1_mask_only():
    B, N, S = 2, 2, 8
    q, k, v = rnd(B, N, S, 4, seed=13), rnd(B, N, S, 4, seed=14), rnd(B, N, S, 4, seed=15)
    g = torch.Generator().manual_seed(0)
    M = torch.rand(B, 1, S, S, generator=g) < 0.3
    M[..., 0] = False  # keep column 0 so no row is fully masked
    i = torch.arange(S).view(-1, 1)
    j = torch.arange(S).view(1, -1)
    out0, *_ = call(q, k, v, N, "BNSD", atten_mask=M.to(torch.uint8), sparse_mode=0, pre_tockens=3, next_tockens=1)
    exp0 = naive(q, k, v, 1.0, masked=M | ~(((j - i) <= 1) & ((i - j) <= 3)))
    torch.testing.assert_close(out0, exp0, rtol=1e-12, atol=1e-12)
    out1, *_ = call(q, k, v, N, "BNSD", atten_mask=M, sparse_mode=1, pre_tockens=0, next_tockens=0)
    torch.testing.assert_close(out1, naive(q, k, v, 1.0, masked=M), rtol=1e-12, atol=1e-12)
    # 2-D [S,S] mask and [1,N,S,S] mask broadcast
    out2, *_ = call(q, k, v, N, "BNSD", atten_mask=M[0, 0], sparse_mode=1)
    torch.testing.assert_close(out2, naive(q, k, v, 1.0, masked=M[0, 0]), rtol=1e-12, atol=1e-12)


def test_prefix_modes_5_6():
    B, N, Sq, Skv = 2, 2, 4, 8
    q, k, v = rnd(B, N, Sq, 4, seed=16), rnd(B, N, Skv, 4, seed=17), rnd(B, N, Skv, 4, seed=18)
    prefix = [2, 6]
    i = torch.arange(Sq).view(-1, 1)
    j = torch.arange(Skv).view(1, -1)
    masks = torch.stack([(j > i + Skv - Sq) & (j >= p) for p in prefix]).unsqueeze(1)  # [B,1,Sq,Skv]
    out6, *_ = call(q, k, v, N, "BNSD", atten_mask=torch.zeros(3072, 2048, dtype=torch.bool), sparse_mode=6,
                    prefix=prefix)
    exp = naive(q, k, v, 1.0, masked=masks)
    torch.testing.assert_close(out6, exp, rtol=1e-12, atol=1e-12)
    out5, *_ = call(q, k, v, N, "BNSD", atten_mask=masks, sparse_mode=5, prefix=prefix)
    torch.testing.assert_close(out5, exp, rtol=1e-12, atol=1e-12)


def test_gqa_equals_repeat_interleave():
    B, Nq, Nkv, S = 2, 6, 2, 7
    q, k, v = rnd(B, Nq, S, 8, seed=19), rnd(B, Nkv, S, 8, seed=20), rnd(B, Nkv, S, 5, seed=21)
    out, *_ = call(q, k, v, Nq, "BNSD", scale=0.2, atten_mask=TRIU2048, sparse_mode=2)
    kk, vv = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    torch.testing.assert_close(out, sdpa(q, kk, vv, 0.2, is_causal=True), rtol=1e-12, atol=1e-12)


def test_sink_equals_appended_column():
    B, N, S = 2, 3, 6
    q, k, v = rnd(B, N, S, 8, seed=22), rnd(B, N, S, 8, seed=23), rnd(B, N, S, 8, seed=24)
    sink = torch.tensor([0.5, -1.0, 3.0], dtype=torch.float32)
    out, mx, sm, *_ = call(q, k, v, N, "BNSD", scale=0.35, sink=sink)
    torch.testing.assert_close(out, naive(q, k, v, 0.35, sink=sink), rtol=1e-12, atol=1e-12)
    s = (q @ k.transpose(-1, -2)) * 0.35
    m = s.amax(-1)  # the sink is not part of the max
    torch.testing.assert_close(mx[..., 0], m, rtol=0, atol=0)
    l = torch.exp(s - m.unsqueeze(-1)).sum(-1) + torch.exp(sink.double().view(1, N, 1) - m)
    torch.testing.assert_close(sm[..., 0], l, rtol=1e-13, atol=0)


def test_pse_added_before_scale_and_broadcast():
    B, N, Sq, Skv = 2, 2, 4, 5
    q, k, v = rnd(B, N, Sq, 4, seed=25), rnd(B, N, Skv, 4, seed=26), rnd(B, N, Skv, 4, seed=27)
    pse = rnd(B, N, Sq, Skv, seed=28)
    out, *_ = call(q, k, v, N, "BNSD", scale=0.5, pse=pse)
    torch.testing.assert_close(out, naive(q, k, v, 0.5, pse=pse), rtol=1e-12, atol=1e-12)
    for p in (pse[:, :, :1], pse[:1], pse[:1, :, :1]):
        o, *_ = call(q, k, v, N, "BNSD", scale=0.5, pse=p)
        torch.testing.assert_close(o, naive(q, k, v, 0.5, pse=p), rtol=1e-12, atol=1e-12)


def test_alibi_compressed_pse_matches_full():
    S, N = 1100, 2
    q, k, v = rnd(1, N, S, 4, seed=29), rnd(1, N, S, 4, seed=30), rnd(1, N, S, 4, seed=31)
    slopes = torch.tensor([0.5, 0.125], dtype=F64).view(1, N, 1, 1)
    i = torch.arange(S).view(-1, 1)
    j = torch.arange(S).view(1, -1)
    full = -(slopes * (i - j).to(F64))  # Toeplitz alibi bias, [1,N,S,S]
    comp = full[:, :, S - 1024:, :].contiguous()  # last 1024 rows
    o_full, *_ = call(q, k, v, N, "BNSD", pse=full, atten_mask=TRIU2048, sparse_mode=2, scale=0.5)
    o_comp, *_ = call(q, k, v, N, "BNSD", pse=comp, atten_mask=TRIU2048, sparse_mode=2, scale=0.5)
    torch.testing.assert_close(o_comp, o_full, rtol=1e-12, atol=1e-12)


def test_fully_masked_row_and_empty_kv():
    q, k, v = rnd(1, 1, 3, 4, seed=32), rnd(1, 1, 4, 4, seed=33), rnd(1, 1, 4, 4, seed=34)
    M = torch.zeros(3, 4, dtype=torch.bool)
    M[1] = True
    out, mx, sm, *_ = call(q, k, v, 1, "BNSD", atten_mask=M, sparse_mode=1, sink=torch.tensor([1.0]))
    assert torch.all(out[0, 0, 1] == 0)
    assert torch.all(mx[0, 0, 1] == -FLT_MAX) and torch.all(sm[0, 0, 1] == FLT_MAX)
    torch.testing.assert_close(out[0, 0, 0], naive(q, k, v, 1.0, sink=torch.tensor([1.0]))[0, 0, 0])
    # empty KV: all zeros
    ke, ve = torch.zeros(1, 1, 0, 4, dtype=F64), torch.zeros(1, 1, 0, 4, dtype=F64)
    out, mx, sm, _, _, _, numels = call(q, ke, ve, 1, "BNSD")
    assert out.shape == (1, 1, 3, 4) and torch.all(out == 0) and torch.all(mx == 0) and torch.all(sm == 0)
    assert numels == 0


def test_unpack_dropout_mask_bit_order():
    bits = ref.unpack_dropout_mask(torch.tensor([0b00000101, 0b10000000], dtype=torch.uint8), 16)
    assert bits.dtype == torch.bool
    assert bits.tolist() == [True, False, True] + [False] * 12 + [True]
    assert ref.unpack_dropout_mask(torch.tensor([0xFF], dtype=torch.uint8), 3).tolist() == [True] * 3


def _pack(bits):
    n = bits.numel()
    nbytes = (n + 127) // 128 * 16
    padded = torch.zeros(nbytes * 8, dtype=torch.int64)
    padded[:n] = bits.to(torch.int64)
    return (padded.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)


def test_dropout_explicit_mask():
    B, N, Sq, Skv = 2, 2, 3, 5
    q, k, v = rnd(B, N, Sq, 4, seed=35), rnd(B, N, Skv, 4, seed=36), rnd(B, N, Skv, 4, seed=37)
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(B, N, Sq, Skv, generator=g) < 0.7
    out, mx, sm, _, seed, off, numels = call(q, k, v, N, "BNSD", keep_prob=0.7, dropout_mask=_pack(keep.reshape(-1)),
                                             seed=11, offset=22)
    p = torch.softmax(q @ k.transpose(-1, -2), -1)
    torch.testing.assert_close(out, (p * keep / 0.7) @ v, rtol=1e-12, atol=1e-12)
    base, bmx, bsm, *_ = call(q, k, v, N, "BNSD")
    torch.testing.assert_close(mx, bmx, rtol=0, atol=0)  # stats exclude dropout
    torch.testing.assert_close(sm, bsm, rtol=0, atol=0)
    assert (seed, off, numels) == (11, 22, B * N * Sq * Skv)
    with pytest.raises(ValueError):
        call(q, k, v, N, "BNSD", keep_prob=0.5)


# ------------------------------------------------------------------------------------------------
# TND
def _tnd_inputs(lq, lkv, Nq=4, Nkv=2, D=8, Dv=6, extra_q=0, seed=40):
    Tq, Tkv = sum(lq) + extra_q, sum(lkv)
    return rnd(Tq, Nq, D, seed=seed), rnd(Tkv, Nkv, D, seed=seed + 1), rnd(Tkv, Nkv, Dv, seed=seed + 2)


def _cum(lens):
    out, c = [], 0
    for x in lens:
        c += x
        out.append(c)
    return out


def test_tnd_equals_per_batch_bnsd_and_softmax_layouts():
    lq, lkv = [3, 0, 5, 2], [4, 2, 5, 6]
    Nq, Nkv = 4, 2
    q, k, v = _tnd_inputs(lq, lkv, Nq, Nkv, extra_q=2)
    res = call(q, k, v, Nq, "TND", scale=0.4, actual_seq_qlen=_cum(lq), actual_seq_kvlen=_cum(lkv),
               atten_mask=TRIU2048, sparse_mode=3)
    out, mx, sm, _, _, _, numels = res
    assert out.shape == (sum(lq) + 2, Nq, 6) and mx.shape == (sum(lq) + 2, Nq, 8)
    mx_nt = mx.reshape(Nq, -1, 8)  # default: N-major data
    res_t = call(q, k, v, Nq, "TND", scale=0.4, actual_seq_qlen=_cum(lq), actual_seq_kvlen=_cum(lkv),
                 atten_mask=TRIU2048, sparse_mode=3, softmax_layout="TND")
    torch.testing.assert_close(res_t[0], out, rtol=0, atol=0)
    torch.testing.assert_close(res_t[1], mx_nt.permute(1, 0, 2), rtol=0, atol=0)
    torch.testing.assert_close(res_t[2], sm.reshape(Nq, -1, 8).permute(1, 0, 2), rtol=0, atol=0)
    qo = ko = 0
    for sq, skv in zip(lq, lkv):
        if sq:
            qb = q[qo:qo + sq].permute(1, 0, 2).unsqueeze(0)
            kb = k[ko:ko + skv].permute(1, 0, 2).unsqueeze(0)
            vb = v[ko:ko + skv].permute(1, 0, 2).unsqueeze(0)
            o, m, s, *_ = call(qb, kb, vb, Nq, "BNSD", scale=0.4, atten_mask=TRIU2048, sparse_mode=3)
            torch.testing.assert_close(out[qo:qo + sq], o[0].permute(1, 0, 2), rtol=0, atol=0)
            torch.testing.assert_close(mx_nt[:, qo:qo + sq], m[0], rtol=0, atol=0)
        qo += sq
        ko += skv
    # rows beyond sum(Sq_b) are zeros
    assert torch.all(out[sum(lq):] == 0) and torch.all(mx_nt[:, sum(lq):] == 0)
    assert numels == Nq * sum(a * b for a, b in zip(lq, lkv))


def test_tnd_trailing_zeros_numels_quirk_and_empty_kv_batch():
    cq, ckv = [2, 5, 9, 0, 0], [3, 6, 10, 0, 0]
    q, k, v = _tnd_inputs([2, 3, 4], [3, 3, 4], Nq=2, Nkv=2)
    out, mx, sm, _, _, _, numels = call(q, k, v, 2, "TND", actual_seq_qlen=cq, actual_seq_kvlen=ckv)
    raw = 2 * (cq[0] * ckv[0] + sum((cq[i] - cq[i - 1]) * (ckv[i] - ckv[i - 1]) for i in range(1, 5)))
    assert numels == raw and raw != 2 * (2 * 3 + 3 * 3 + 4 * 4)
    qb = q[2:5].permute(1, 0, 2).unsqueeze(0)
    kb, vb = k[3:6].permute(1, 0, 2).unsqueeze(0), v[3:6].permute(1, 0, 2).unsqueeze(0)
    o, *_ = call(qb, kb, vb, 2, "BNSD")
    torch.testing.assert_close(out[2:5], o[0].permute(1, 0, 2), rtol=0, atol=0)
    # a batch with Sq_b > 0 and Skv_b == 0: zeros
    out, mx, sm, *_ = call(q[:5], k[:3], v[:3], 2, "TND", actual_seq_qlen=[2, 5], actual_seq_kvlen=[3, 3])
    assert torch.all(out[2:5] == 0) and torch.all(mx.reshape(2, 5, 8)[:, 2:5] == 0)


def test_tnd_modes_7_8():
    lq, lkv = [3, 0, 4, 2, 0], [5, 1, 6, 3, 0]
    Nq = Nkv = 2
    q, k, v = _tnd_inputs(lq, lkv, Nq, Nkv)
    nxt = -1

    def expected(mode):
        outs, qo, ko = [], 0, 0
        nonempty = [b for b, x in enumerate(lq) if x > 0]
        for b, (sq, skv) in enumerate(zip(lq, lkv)):
            if sq:
                i = torch.arange(sq).view(-1, 1)
                j = torch.arange(skv).view(1, -1)
                if mode == 7:
                    msk = j > i + skv - sq + (nxt if b == nonempty[-1] else 0)
                else:
                    msk = ((j - i) > skv - max(sq - nxt2, 0)) if b == nonempty[0] else (j > i)
                qb = q[qo:qo + sq].permute(1, 0, 2).unsqueeze(0)
                kb = k[ko:ko + skv].permute(1, 0, 2).unsqueeze(0)
                vb = v[ko:ko + skv].permute(1, 0, 2).unsqueeze(0)
                outs.append(naive(qb, kb, vb, 1.0, masked=msk)[0].permute(1, 0, 2))
            qo += sq
            ko += skv
        return torch.cat(outs)

    out7, *_ = call(q, k, v, Nq, "TND", actual_seq_qlen=_cum(lq), actual_seq_kvlen=_cum(lkv),
                    atten_mask=TRIU2048, sparse_mode=7, next_tockens=nxt)
    torch.testing.assert_close(out7, expected(7), rtol=1e-12, atol=1e-12)
    nxt2 = 1
    out8, *_ = call(q, k, v, Nq, "TND", actual_seq_qlen=_cum(lq), actual_seq_kvlen=_cum(lkv),
                    atten_mask=TRIU2048, sparse_mode=8, next_tockens=nxt2)
    torch.testing.assert_close(out8, expected(8), rtol=1e-12, atol=1e-12)


def test_tnd_mask_local_vs_global_and_pse_forms():
    lq, lkv = [3, 4], [5, 4]
    Nq = Nkv = 2
    q, k, v = _tnd_inputs(lq, lkv, Nq, Nkv, D=4, Dv=4)
    g = torch.Generator().manual_seed(3)
    local = torch.rand(4, 5, generator=g) < 0.3
    local[:, 0] = False
    glob = torch.ones(7, 9, dtype=torch.bool)
    glob[0:3, 0:5] = local[:3, :5]
    glob[3:7, 5:9] = local[:4, :4]
    kw = dict(actual_seq_qlen=_cum(lq), actual_seq_kvlen=_cum(lkv), sparse_mode=1)
    o_loc, *_ = call(q, k, v, Nq, "TND", atten_mask=local, **kw)
    o_glob, *_ = call(q, k, v, Nq, "TND", atten_mask=glob, **kw)
    torch.testing.assert_close(o_loc, o_glob, rtol=0, atol=0)
    # pse: 4-D local [1,N,maxSq,maxSkv] vs flattened BNSS blocks vs BN1S
    p4 = rnd(1, Nq, 4, 5, seed=50)
    flat = torch.cat([p4[0, :, :3, :5].reshape(-1), p4[0, :, :4, :4].reshape(-1)])
    kw = dict(actual_seq_qlen=_cum(lq), actual_seq_kvlen=_cum(lkv))
    o4, *_ = call(q, k, v, Nq, "TND", pse=p4, **kw)
    of, *_ = call(q, k, v, Nq, "TND", pse=flat, **kw)
    torch.testing.assert_close(o4, of, rtol=0, atol=0)
    p1 = p4[:, :, :1]
    flat1 = torch.cat([p1[0, :, 0, :5].reshape(-1), p1[0, :, 0, :4].reshape(-1)])
    o1, *_ = call(q, k, v, Nq, "TND", pse=p1, **kw)
    of1, *_ = call(q, k, v, Nq, "TND", pse=flat1, **kw)
    torch.testing.assert_close(o1, of1, rtol=0, atol=0)
    qb = q[:3].permute(1, 0, 2).unsqueeze(0)
    kb, vb = k[:5].permute(1, 0, 2).unsqueeze(0), v[:5].permute(1, 0, 2).unsqueeze(0)
    torch.testing.assert_close(o4[:3], naive(qb, kb, vb, 1.0, pse=p4[:, :, :3, :5])[0].permute(1, 0, 2))


def test_tnd_dropout_offsets():
    lq, lkv = [2, 3], [3, 4]
    Nq = Nkv = 2
    q, k, v = _tnd_inputs(lq, lkv, Nq, Nkv, D=4, Dv=4)
    g = torch.Generator().manual_seed(5)
    keeps = [torch.rand(Nq, a, b, generator=g) < 0.6 for a, b in zip(lq, lkv)]
    packed = _pack(torch.cat([x.reshape(-1) for x in keeps]))
    out, *_ = call(q, k, v, Nq, "TND", actual_seq_qlen=_cum(lq), actual_seq_kvlen=_cum(lkv), keep_prob=0.6,
                   dropout_mask=packed)
    qo = ko = 0
    for (sq, skv), keep in zip(zip(lq, lkv), keeps):
        qb = q[qo:qo + sq].permute(1, 0, 2)
        kb, vb = k[ko:ko + skv].permute(1, 0, 2), v[ko:ko + skv].permute(1, 0, 2)
        p = torch.softmax(qb @ kb.transpose(-1, -2), -1) * keep / 0.6
        torch.testing.assert_close(out[qo:qo + sq], (p @ vb).permute(1, 0, 2), rtol=1e-12, atol=1e-12)
        qo += sq
        ko += skv


def test_speed_2x8x512():
    q, k, v = rnd(2, 8, 512, 64, seed=60), rnd(2, 8, 512, 64, seed=61), rnd(2, 8, 512, 64, seed=62)
    t0 = time.perf_counter()
    call(q, k, v, 8, "BNSD", scale=0.125, atten_mask=TRIU2048, sparse_mode=2)
    assert time.perf_counter() - t0 < 1.0
