"""npufa.npu_fusion_attention (the optimised op) against npufa.reference (float64 oracle).

Spec: /work/shared/spec/torch_npu_attention.md §1-§2, project decisions /work/shared/spec/README.md.

Tolerances
----------
* float32 inputs: attention_out within rtol 1e-4 / atol 1e-5 of the float64 reference.
* float16 / bfloat16 inputs (FlashAttention's rule): the op's max error against the float64
  reference must be at most 3x the max error of a naive low-precision result (here: the float64
  reference rounded to the dtype) plus a small absolute slack.
* softmax_max / softmax_sum are float32 for every input dtype and are compared at float32 precision;
  special values (0, +-FLT_MAX) must match exactly.
"""
import math

import pytest
import torch

import npufa
from attn_helpers import cum, dense_qkv, prefix_compressed_mask, rbool, rnd, tnd_qkv
from npufa import reference as ref

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
FLT_MAX = 3.4028234663852886e38
INT_MAX = 2147483647
DENSE = ("BSH", "SBH", "BSND", "BNSD")
TRIU2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


PREFIX3072 = prefix_compressed_mask()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def both(*args, **kw):
    """(op result, reference result) for the same arguments."""
    return npufa.npu_fusion_attention(*args, **kw), ref.npu_fusion_attention(*args, **kw)


SLACK = {F32: 0.0, F16: 1e-4, BF16: 1e-3}


def check_out(out, r, dtype):
    assert out.dtype == dtype, (out.dtype, dtype)
    assert tuple(out.shape) == tuple(r.shape), (tuple(out.shape), tuple(r.shape))
    assert torch.isfinite(out).all()
    o = out.to(F64)
    if dtype == F32:
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-5)
        return
    err = (o - r).abs().max().item() if r.numel() else 0.0
    naive = (r.to(dtype).to(F64) - r).abs().max().item() if r.numel() else 0.0
    assert err <= 3 * naive + SLACK[dtype], f"{dtype}: op error {err:.3e} > 3 x naive error {naive:.3e} + slack"


def check_stat(x, r):
    assert x.dtype == F32
    assert tuple(x.shape) == tuple(r.shape), (tuple(x.shape), tuple(r.shape))
    # the 8 copies of the last axis are identical (§2.3)
    assert torch.equal(x, x[..., :1].expand_as(x))
    xd = x.to(F64)
    special = (r.abs() == FLT_MAX) | (r == 0)
    assert torch.equal(xd[special], r[special]), "special values (0, +-FLT_MAX) must match exactly"
    torch.testing.assert_close(xd[~special], r[~special], rtol=2e-5, atol=2e-5)


def check(res, rres, dtype, stats=True):
    out, smax, ssum, sout, seed, offset, numels = res
    check_out(out, rres[0], dtype)
    if stats:
        check_stat(smax, rres[1])
        check_stat(ssum, rres[2])
    assert tuple(sout.shape) == (0,) and sout.dtype == dtype
    assert (seed, offset, numels) == tuple(rres[4:]), ((seed, offset, numels), tuple(rres[4:]))


def run_check(*args, dtype=F32, **kw):
    res, rres = both(*args, **kw)
    check(res, rres, dtype)
    return res, rres


# ------------------------------------------------------------------------------------------------
# layouts x dtypes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "BNSD", "TND", "bsh", "sbh", "bsnd", "bnsd", "tnd", "Bsnd"])
def test_layouts_dtypes(layout, dtype):
    Nq, Nkv, D, Dv = 4, 2, 24, 16
    if layout.upper() == "TND":
        lq, lkv = [17, 65, 3], [20, 70, 3]
        q, k, v = tnd_qkv(sum(lq), sum(lkv), Nq, Nkv, D, Dv, dtype, seed=3)
        res, _ = run_check(q, k, v, Nq, layout, scale=D ** -0.5, actual_seq_qlen=cum(lq),
                           actual_seq_kvlen=cum(lkv), dtype=dtype)
        assert tuple(res[0].shape) == (sum(lq), Nq, Dv) and tuple(res[1].shape) == (sum(lq), Nq, 8)
        assert res[6] == Nq * sum(a * b for a, b in zip(lq, lkv))
        return
    B, Sq, Skv = 2, 65, 70
    q, k, v = dense_qkv(layout, B, Nq, Nkv, Sq, Skv, D, Dv, dtype, seed=5)
    res, _ = run_check(q, k, v, Nq, layout, scale=D ** -0.5, dtype=dtype)
    expect = {"BSH": (B, Sq, Nq * Dv), "SBH": (Sq, B, Nq * Dv), "BSND": (B, Sq, Nq, Dv),
              "BNSD": (B, Nq, Sq, Dv)}[layout.upper()]
    assert tuple(res[0].shape) == expect
    assert tuple(res[1].shape) == (B, Nq, Sq, 8) and tuple(res[2].shape) == (B, Nq, Sq, 8)
    assert res[4:] == (0, 0, B * Nq * Sq * Skv)


def test_default_scale_is_one():
    """scale defaults to 1.0 (not 1/sqrt(D), §2.2)."""
    q, k, v = dense_qkv("BNSD", 1, 2, 2, 9, 11, 8, 8, seed=7)
    a = npufa.npu_fusion_attention(q, k, v, 2, "BNSD")
    b = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", scale=1.0)
    assert torch.equal(a[0], b[0])
    check(a, ref.npu_fusion_attention(q, k, v, 2, "BNSD", scale=1.0), F32)
    c = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", scale=8 ** -0.5)
    assert (c[0] - a[0]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# GQA and head dims
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["BSH", "SBH", "BNSD", "TND"])
@pytest.mark.parametrize("ratio", [1, 2, 3, 4])
def test_gqa_ratios(ratio, layout):
    Nkv = 2
    Nq = Nkv * ratio
    D, Dv = 16, 12
    if layout == "TND":
        lq, lkv = [5, 40, 66], [9, 40, 70]
        q, k, v = tnd_qkv(sum(lq), sum(lkv), Nq, Nkv, D, Dv, seed=11)
        run_check(q, k, v, Nq, layout, scale=0.25, actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv),
                  atten_mask=TRIU2048, sparse_mode=3)
    else:
        q, k, v = dense_qkv(layout, 2, Nq, Nkv, 33, 70, D, Dv, seed=13)
        run_check(q, k, v, Nq, layout, scale=0.25)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D,Dv", [(1, 1), (17, 17), (17, 1), (17, 9), (80, 80), (80, 48), (64, 63), (96, 64),
                                  (128, 128), (256, 256), (576, 512)])
def test_head_dims(D, Dv, dtype):
    q, k, v = dense_qkv("BSND", 1, 3, 3, 40, 67, D, Dv, dtype, seed=D * 100 + Dv)
    run_check(q, k, v, 3, "BSND", scale=1 / math.sqrt(D), dtype=dtype)


def test_many_batches_and_heads():
    """B = 17 with per-batch masks and pse; Nq = 64 over Nkv = 8."""
    B, Nq, Nkv, Sq, Skv = 17, 64, 8, 5, 7
    q, k, v = dense_qkv("SBH", B, Nq, Nkv, Sq, Skv, 8, 8, seed=19)
    m = rbool((B, Nq, Sq, Skv), 0.3, 20)
    pse = rnd((B, Nq, Sq, Skv), seed=21)
    run_check(q, k, v, Nq, "SBH", atten_mask=m, pse=pse, scale=0.4)


# ------------------------------------------------------------------------------------------------
# sequence lengths around the 64-row/column tiles
# ------------------------------------------------------------------------------------------------
S_EDGE = [1, 63, 64, 65, 130]


@pytest.mark.parametrize("Skv", S_EDGE)
@pytest.mark.parametrize("Sq", S_EDGE)
@pytest.mark.parametrize("masking", ["none", "rightdown", "band0"])
def test_tile_edges(Sq, Skv, masking):
    q, k, v = dense_qkv("BNSD", 1, 2, 1, Sq, Skv, 16, 16, seed=Sq * 1000 + Skv)
    kw = {}
    if masking == "rightdown":
        kw = dict(atten_mask=TRIU2048, sparse_mode=3)
    elif masking == "band0":
        # explicit random mask + a band (pre 20, next 3) in mode 0
        kw = dict(atten_mask=rbool((Sq, Skv), 0.2, Sq + Skv), sparse_mode=0, pre_tockens=20, next_tockens=3)
    run_check(q, k, v, 2, "BNSD", scale=0.25, **kw)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("Sq,Skv", [(1, 130), (63, 65), (130, 64), (65, 1)])
def test_tile_edges_lowp(Sq, Skv, dtype):
    q, k, v = dense_qkv("BSH", 2, 2, 2, Sq, Skv, 32, 32, dtype, seed=Sq + Skv)
    run_check(q, k, v, 2, "BSH", scale=32 ** -0.5, atten_mask=TRIU2048, sparse_mode=2, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# explicit masks: shapes and dtypes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mdtype", [torch.bool, torch.uint8], ids=["bool", "uint8"])
@pytest.mark.parametrize("mshape", ["BNSS", "B1SS", "11SS", "SS"])
@pytest.mark.parametrize("mode,pre,nxt", [(0, INT_MAX, INT_MAX), (0, 12, 4), (1, INT_MAX, INT_MAX), (1, 0, 0)])
def test_mask_shapes(mshape, mdtype, mode, pre, nxt):
    B, N, Sq, Skv = 2, 4, 45, 70
    q, k, v = dense_qkv("BNSD", B, N, 2, Sq, Skv, 16, 16, seed=21)  # GQA: the mask is per query head
    full = {"BNSS": (B, N, Sq, Skv), "B1SS": (B, 1, Sq, Skv), "11SS": (1, 1, Sq, Skv), "SS": (Sq, Skv)}[mshape]
    m = rbool(full, 0.35, 99).to(mdtype)
    res, _ = run_check(q, k, v, N, "BNSD", scale=0.25, atten_mask=m, sparse_mode=mode, pre_tockens=pre,
                       next_tockens=nxt)
    # the mask has an effect
    plain = npufa.npu_fusion_attention(q, k, v, N, "BNSD", scale=0.25)
    assert (res[0] - plain[0]).abs().max() > 1e-3


def test_uint8_mask_values_other_than_one():
    """A uint8 mask is read as byte != 0 (spec allows only 0/1; npufa treats any non-zero as masked)."""
    q, k, v = dense_qkv("BNSD", 1, 2, 2, 20, 30, 8, 8, seed=4)
    m = rbool((20, 30), 0.3, 5)
    a = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=m.to(torch.uint8))
    b = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", atten_mask=m)
    assert torch.equal(a[0], b[0])


# ------------------------------------------------------------------------------------------------
# sparse modes, dense layouts
# ------------------------------------------------------------------------------------------------
SHAPES_SQ_SKV = [(70, 70), (40, 100), (100, 40)]
MODE0_PN = [(INT_MAX, INT_MAX), (30, 0), (10, 10), (9, -3), (-3, 7), (0, 0), (200, 200)]
MODE4_PN = [(INT_MAX, INT_MAX), (30, 0), (10, 10), (9, -3), (-3, 7), (0, 0), (INT_MAX, 0), (0, INT_MAX)]


def _dense_case(Sq, Skv, layout="BSND", B=2, Nq=4, Nkv=2, D=16, Dv=16, dtype=F32, seed=0):
    return dense_qkv(layout, B, Nq, Nkv, Sq, Skv, D, Dv, dtype, seed)


@pytest.mark.parametrize("Sq,Skv", SHAPES_SQ_SKV)
@pytest.mark.parametrize("pre,nxt", MODE0_PN)
def test_mode0_band_with_mask(Sq, Skv, pre, nxt):
    """Mode 0 with a mask: masked = M or not inBand(pre, next) in left-up coordinates (§1.6)."""
    q, k, v = _dense_case(Sq, Skv, seed=Sq + Skv)
    m = rbool((1, 1, Sq, Skv), 0.15, 3)
    run_check(q, k, v, 4, "BSND", scale=0.25, atten_mask=m, sparse_mode=0, pre_tockens=pre, next_tockens=nxt)


@pytest.mark.parametrize("Sq,Skv", SHAPES_SQ_SKV)
@pytest.mark.parametrize("mode", [2, 3])
@pytest.mark.parametrize("pre,nxt", [(INT_MAX, INT_MAX), (0, 0), (5, -2)])
@pytest.mark.parametrize("mshape", [(2048, 2048), (1, 2048, 2048), (1, 1, 2048, 2048)])
def test_modes_2_3(Sq, Skv, mode, pre, nxt, mshape):
    """Compressed causal masks; pre/next have no effect (§1.6 note 6)."""
    q, k, v = _dense_case(Sq, Skv, layout="BSH", seed=7)
    res, _ = run_check(q, k, v, 4, "BSH", scale=0.25, atten_mask=TRIU2048.reshape(mshape), sparse_mode=mode,
                       pre_tockens=pre, next_tockens=nxt)
    if mode == 3 and Sq > Skv:  # rows i < Sq - Skv see no key: fully masked (decision 4)
        o = res[0].reshape(2, Sq, 4, 16)
        assert torch.all(o[:, :Sq - Skv] == 0)
        assert torch.all(res[1][:, :, :Sq - Skv] == -FLT_MAX) and torch.all(res[2][:, :, :Sq - Skv] == FLT_MAX)
        assert torch.all(res[1][:, :, Sq - Skv:] > -1e30)


def test_compressed_mask_uint8_and_content_ignored():
    """The compressed mask is only a marker: its content is not read (§1.6.1)."""
    q, k, v = _dense_case(50, 50, seed=9)
    a = npufa.npu_fusion_attention(q, k, v, 4, "BSND", atten_mask=TRIU2048, sparse_mode=2, scale=0.3)
    b = npufa.npu_fusion_attention(q, k, v, 4, "BSND", atten_mask=TRIU2048.to(torch.uint8), sparse_mode=2, scale=0.3)
    c = npufa.npu_fusion_attention(q, k, v, 4, "BSND", atten_mask=torch.zeros(2048, 2048, dtype=torch.bool),
                                   sparse_mode=2, scale=0.3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])
    check(a, ref.npu_fusion_attention(q, k, v, 4, "BSND", atten_mask=TRIU2048, sparse_mode=2, scale=0.3), F32)


@pytest.mark.parametrize("Sq,Skv", SHAPES_SQ_SKV + [(64, 130), (130, 64)])
@pytest.mark.parametrize("pre,nxt", MODE4_PN)
def test_mode4_band_rightdown(Sq, Skv, pre, nxt):
    """Mode 4: band anchored at the bottom-right corner (§1.6 table, note 2)."""
    q, k, v = _dense_case(Sq, Skv, layout="SBH", seed=Sq * 3 + Skv)
    res, _ = run_check(q, k, v, 4, "SBH", scale=0.25, atten_mask=TRIU2048, sparse_mode=4, pre_tockens=pre,
                       next_tockens=nxt)


def test_mode4_anchor_is_bottom_right():
    """Hand check: Sq=2, Skv=5, pre=0, next=0 keeps exactly j = i + 3 (diagonal through the corner)."""
    q = torch.zeros(1, 1, 2, 4)
    k = torch.zeros(1, 1, 5, 4)
    v = torch.arange(5, dtype=F32).reshape(1, 1, 5, 1).expand(1, 1, 5, 4).contiguous()
    out = npufa.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=TRIU2048, sparse_mode=4, pre_tockens=0,
                                     next_tockens=0)[0]
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([3.0, 4.0]))
    # mode 0 with the same numbers is anchored top-left: j = i
    out0 = npufa.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=torch.zeros(2, 5, dtype=torch.bool),
                                      sparse_mode=0, pre_tockens=0, next_tockens=0)[0]
    torch.testing.assert_close(out0[0, 0, :, 0], torch.tensor([0.0, 1.0]))
    # mode 3: row i sees j <= i + 3 -> means 1.5 and 2
    out3 = npufa.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=TRIU2048, sparse_mode=3)[0]
    torch.testing.assert_close(out3[0, 0, :, 0], torch.tensor([1.5, 2.0]))
    # mode 2: row i sees j <= i -> means 0 and 0.5
    out2 = npufa.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=TRIU2048, sparse_mode=2)[0]
    torch.testing.assert_close(out2[0, 0, :, 0], torch.tensor([0.0, 0.5]))


def _prefix_mask(B, Sq, Skv, prefix):
    i = torch.arange(Sq).view(Sq, 1)
    j = torch.arange(Skv).view(1, Skv)
    return torch.stack([((j > i + Skv - Sq) & (j >= p)) for p in prefix]).unsqueeze(1)  # [B,1,Sq,Skv]


@pytest.mark.parametrize("Sq,Skv,prefix", [(70, 70, [0, 33]), (40, 100, [60, 100]), (100, 40, [0, 17]),
                                           (64, 130, [66, 129]), (130, 65, [40, 65])])
@pytest.mark.parametrize("mode,mform", [(5, "B1SS"), (5, "BNSS"), (6, "3072")])
def test_prefix_modes(Sq, Skv, prefix, mode, mform):
    q, k, v = _dense_case(Sq, Skv, layout="BNSD", B=2, Nq=2, Nkv=2, seed=Sq + 2 * Skv)
    if mode == 6:
        m = PREFIX3072
    else:
        m = _prefix_mask(2, Sq, Skv, prefix)
        if mform == "BNSS":
            m = m.expand(2, 2, Sq, Skv).contiguous()
    res, _ = run_check(q, k, v, 2, "BNSD", scale=0.25, atten_mask=m, sparse_mode=mode, prefix=prefix,
                       pre_tockens=3, next_tockens=1)
    # the prefix changes the result vs plain right-down causal unless it is inside the causal region
    plain = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.25, atten_mask=TRIU2048, sparse_mode=3)
    if max(prefix) > max(Skv - Sq, 0) + 1:
        assert (res[0] - plain[0]).abs().max() > 1e-4


def test_prefix_as_tensor_or_tuple():
    q, k, v = _dense_case(30, 50, layout="BNSD", B=2, Nq=2, Nkv=2, seed=1)
    kw = dict(atten_mask=PREFIX3072, sparse_mode=6, scale=0.3)
    a = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", prefix=[25, 40], **kw)
    b = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", prefix=(25, 40), **kw)
    c = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", prefix=torch.tensor([25, 40]), **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0])
    check(a, ref.npu_fusion_attention(q, k, v, 2, "BNSD", prefix=[25, 40], **kw), F32)


# ------------------------------------------------------------------------------------------------
# no mask => full computation whatever sparse_mode / pre / next / prefix say (§1.6 note 1)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("pre,nxt", [(0, 0), (3, -2), (INT_MAX, 0)])
def test_no_mask_is_full_dense(mode, pre, nxt):
    q, k, v = _dense_case(50, 70, layout="BSND", seed=31)
    res = npufa.npu_fusion_attention(q, k, v, 4, "BSND", scale=0.25, sparse_mode=mode, pre_tockens=pre,
                                     next_tockens=nxt, prefix=[1, 2] if mode in (5, 6) else None)
    full = ref.npu_fusion_attention(q, k, v, 4, "BSND", scale=0.25)
    check(res, full, F32)


@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4, 6, 7, 8])
@pytest.mark.parametrize("pre,nxt", [(0, 0), (1, -1)])
def test_no_mask_is_full_tnd(mode, pre, nxt):
    lq, lkv = [20, 30, 9], [10, 40, 5]  # Sq_b > Skv_b in two batches: would violate 3/7 if a mask were given
    q, k, v = tnd_qkv(sum(lq), sum(lkv), 4, 2, 16, 16, seed=33)
    kw = dict(actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv))
    res = npufa.npu_fusion_attention(q, k, v, 4, "TND", scale=0.25, sparse_mode=mode, pre_tockens=pre,
                                     next_tockens=nxt, prefix=[0, 0, 0] if mode == 6 else None, **kw)
    full = ref.npu_fusion_attention(q, k, v, 4, "TND", scale=0.25, **kw)
    check(res, full, F32)


# ------------------------------------------------------------------------------------------------
# TND sparse modes
# ------------------------------------------------------------------------------------------------
def _tnd(lq, lkv, Nq=4, Nkv=2, D=16, Dv=16, dtype=F32, seed=0, extra_q=0, extra_kv=0):
    q, k, v = tnd_qkv(sum(lq) + extra_q, sum(lkv) + extra_kv, Nq, Nkv, D, Dv, dtype, seed)
    return q, k, v, dict(actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv))


LQ, LKV = [30, 0, 65, 20], [40, 0, 70, 64]  # Sq_b <= Skv_b everywhere, a zero-length batch in the middle


@pytest.mark.parametrize("pre,nxt", [(INT_MAX, INT_MAX), (5, 3), (0, 0), (40, 0), (INT_MAX, 0), (-3, 10)])
@pytest.mark.parametrize("mform", ["max", "sum", "1111"])
@pytest.mark.parametrize("mode", [0, 1])
def test_tnd_modes_0_1(mode, mform, pre, nxt):
    q, k, v, kw = _tnd(LQ, LKV, seed=41)
    if mform == "sum":
        m = rbool((sum(LQ), sum(LKV)), 0.2, 8)
    else:
        m = rbool((max(LQ), max(LKV)), 0.2, 8)
        if mform == "1111":
            m = m.view(1, 1, *m.shape)
    run_check(q, k, v, 4, "TND", scale=0.25, atten_mask=m, sparse_mode=mode, pre_tockens=pre, next_tockens=nxt,
              **kw)


@pytest.mark.parametrize("lq,lkv", [(LQ, LKV), ([63, 1, 65, 0], [64, 130, 66, 0]), ([129], [130])])
@pytest.mark.parametrize("mode,pre,nxt", [(2, 0, 0), (3, 0, 0), (4, INT_MAX, INT_MAX), (4, 10, 0), (4, 0, 5),
                                          (4, INT_MAX, 0), (4, 8, -1), (4, 200, 200)])
def test_tnd_modes_2_3_4(lq, lkv, mode, pre, nxt):
    q, k, v, kw = _tnd(lq, lkv, seed=43)
    run_check(q, k, v, 4, "TND", scale=0.25, atten_mask=TRIU2048, sparse_mode=mode, pre_tockens=pre,
              next_tockens=nxt, **kw)


def test_tnd_mode2_sq_gt_skv():
    """Mode 2 (left-up) allows Sq_b > Skv_b; rows past Skv_b still see every key."""
    q, k, v, kw = _tnd([40, 10], [20, 30], seed=45)
    run_check(q, k, v, 4, "TND", scale=0.25, atten_mask=TRIU2048, sparse_mode=2, **kw)


@pytest.mark.parametrize("lq,lkv,prefix", [([30, 0, 65, 20], [40, 0, 70, 64], [10, 0, 5, 64]),
                                           ([20, 50], [10, 50], [3, 0])])
def test_tnd_mode6(lq, lkv, prefix):
    q, k, v, kw = _tnd(lq, lkv, seed=47)
    run_check(q, k, v, 4, "TND", scale=0.25, atten_mask=PREFIX3072, sparse_mode=6, prefix=prefix, **kw)


@pytest.mark.parametrize("lq,lkv", [([30, 0, 65, 20, 0], [40, 0, 70, 64, 0]), ([3, 2], [3, 6]), ([70], [130])])
@pytest.mark.parametrize("nxt", [0, -2, -10])
@pytest.mark.parametrize("pre_kind", ["last", "max"])
def test_tnd_mode7(lq, lkv, nxt, pre_kind):
    """Mode 7: right-down causal; the last non-empty batch is banded by next (<= 0) (§1.6 table, note 7)."""
    last = [b for b in range(len(lq)) if lq[b] > 0][-1]
    pre = lkv[last] if pre_kind == "last" else INT_MAX
    q, k, v, kw = _tnd(lq, lkv, seed=49)
    run_check(q, k, v, 4, "TND", scale=0.25, atten_mask=TRIU2048, sparse_mode=7, pre_tockens=pre,
              next_tockens=nxt, **kw)


@pytest.mark.parametrize("lq,lkv,nxt", [([0, 3, 5], [0, 4, 4], 1), ([0, 3, 5], [0, 4, 4], -1),
                                        ([40, 20, 70], [50, 20, 65], 5), ([40, 20, 70], [50, 20, 65], -10),
                                        ([66], [65], 1), ([30, 80], [30, 20], 200)])
@pytest.mark.parametrize("pre_kind", ["first", "max"])
def test_tnd_mode8(lq, lkv, nxt, pre_kind):
    """Mode 8: left-up causal; the first non-empty batch is banded (§1.6 table, note 7)."""
    first = [b for b in range(len(lq)) if lq[b] > 0][0]
    pre = lkv[first] if pre_kind == "first" else INT_MAX
    q, k, v, kw = _tnd(lq, lkv, seed=51)
    run_check(q, k, v, 4, "TND", scale=0.25, atten_mask=TRIU2048, sparse_mode=8, pre_tockens=pre,
              next_tockens=nxt, **kw)


def test_tnd_mode7_mode8_hand():
    """Hand-made reading of the spec's mode 7/8 examples (OP-DOC-FA card 1 / card 2 layouts)."""
    # mode 7, card 1: actual_seq_qlen {3,5}, actual_seq_kvlen {3,9}, pre 6, next -2
    lq, lkv = [3, 2], [3, 6]
    q = torch.zeros(5, 1, 4)
    k = torch.zeros(9, 1, 4)
    v = torch.arange(9, dtype=F32).view(9, 1, 1).expand(9, 1, 4).contiguous()
    out = npufa.npu_fusion_attention(q, k, v, 1, "TND", atten_mask=TRIU2048, sparse_mode=7, pre_tockens=6,
                                     next_tockens=-2, actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv))[0]
    # batch 0 causal: rows see kv 0..i ; batch 1 (local kv 0..5 = global 3..8): row i sees j <= i + 4 - 2
    expect = [0.0, 0.5, 1.0, 3 + 1.0, 3 + 1.5]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(expect))
    # mode 8, card 2: actual_seq_qlen {3,8,12}, actual_seq_kvlen {4,9,13}, pre 4, next 1
    lq, lkv = [3, 5, 4], [4, 5, 4]
    q = torch.zeros(12, 1, 4)
    k = torch.zeros(13, 1, 4)
    v = torch.arange(13, dtype=F32).view(13, 1, 1).expand(13, 1, 4).contiguous()
    out = npufa.npu_fusion_attention(q, k, v, 1, "TND", atten_mask=TRIU2048, sparse_mode=8, pre_tockens=4,
                                     next_tockens=1, actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv))[0]
    # batch 0 (first): j - i <= Skv - max(Sq - next, 0) = 4 - 2 = 2 -> row0 sees 0..2, row1 0..3, row2 0..3
    # batch 1 (kv 4..8): left-up causal j <= i ; batch 2 (kv 9..12): j <= i
    b0 = [1.0, 1.5, 1.5]
    b1 = [4 + sum(range(i + 1)) / (i + 1) for i in range(5)]
    b2 = [9 + sum(range(i + 1)) / (i + 1) for i in range(4)]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(b0 + b1 + b2))


# ------------------------------------------------------------------------------------------------
# varlen details: zero-length batches, trailing zeros, softmax_layout, stats shapes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("softmax_layout", ["", "TND"])
@pytest.mark.parametrize("cq,ckv,Tq,Tkv", [([2, 2, 7, 10], [3, 3, 9, 12], 10, 12),
                                           ([2, 5, 9, 0, 0], [3, 6, 10, 0, 0], 12, 10),
                                           ([2, 5, 9, 0, 0], [3, 6, 10, 0, 0], 9, 14),
                                           ([0, 4, 4, 70], [0, 6, 6, 90], 75, 95)])
def test_tnd_zero_length_batches(cq, ckv, Tq, Tkv, softmax_layout):
    Nq, Nkv = 4, 2
    q, k, v = tnd_qkv(Tq, Tkv, Nq, Nkv, 16, 8, seed=61)
    kw = dict(actual_seq_qlen=cq, actual_seq_kvlen=ckv, softmax_layout=softmax_layout, scale=0.25)
    res, rres = run_check(q, k, v, Nq, "TND", **kw)
    # numels on the raw lists (§2.4), including the trailing-zero quirk
    raw = cq[0] * ckv[0] + sum((cq[i] - cq[i - 1]) * (ckv[i] - ckv[i - 1]) for i in range(1, len(cq)))
    assert res[6] == Nq * raw
    # rows beyond the last batch are written as zeros (decision 12)
    covered = max(cq)
    assert torch.all(res[0][covered:] == 0)
    assert tuple(res[1].shape) == (Tq, Nq, 8)


def test_tnd_trailing_zeros_numels_quirk():
    """[2,5,9,0,0] x [3,6,10,0,0]: the raw-list formula over-counts (§2.4 quirk)."""
    cq, ckv = [2, 5, 9, 0, 0], [3, 6, 10, 0, 0]
    q, k, v = tnd_qkv(9, 10, 2, 2, 8, 8, seed=62)
    res = npufa.npu_fusion_attention(q, k, v, 2, "TND", actual_seq_qlen=cq, actual_seq_kvlen=ckv)
    true = 2 * (2 * 3 + 3 * 3 + 4 * 4)
    quirk = 2 * (2 * 3 + 3 * 3 + 4 * 4 + (0 - 9) * (0 - 10) + 0)
    assert res[6] == quirk and quirk != true


def test_tnd_softmax_layout_relation():
    """"" stores N-major data in the [Tq,Nq,8] buffer; "TND" stores t-major (§2.3)."""
    lq, lkv = [5, 7, 3], [6, 7, 9]
    q, k, v, kw = _tnd(lq, lkv, Nq=3, Nkv=3, seed=63)
    a = npufa.npu_fusion_attention(q, k, v, 3, "TND", softmax_layout="", **kw)
    b = npufa.npu_fusion_attention(q, k, v, 3, "TND", softmax_layout="TND", **kw)
    assert torch.equal(a[0], b[0])
    T = sum(lq)
    for x, y in ((a[1], b[1]), (a[2], b[2])):
        assert tuple(x.shape) == (T, 3, 8) and tuple(y.shape) == (T, 3, 8)
        assert torch.equal(x.reshape(3, T, 8), y.permute(1, 0, 2))
        assert not torch.equal(x, y)


@pytest.mark.parametrize("layout", DENSE)
def test_stats_shape_and_values_dense(layout):
    """softmax_max/sum are [B, Nq, Sq, 8] for every dense layout, 8 equal copies of the row max / sum."""
    B, Nq, Sq, Skv, D = 2, 3, 5, 7, 8
    q, k, v = dense_qkv(layout, B, Nq, Nq, Sq, Skv, D, D, seed=65)
    res = npufa.npu_fusion_attention(q, k, v, Nq, layout, scale=0.5)
    qb, kb = rnd((B, Nq, Sq, D), seed=65).double(), rnd((B, Nq, Skv, D), seed=66).double()
    s = (qb @ kb.transpose(-1, -2)) * 0.5
    mx = s.amax(-1)
    sm = torch.exp(s - mx.unsqueeze(-1)).sum(-1)
    for k8 in range(8):
        torch.testing.assert_close(res[1][..., k8].double(), mx, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res[2][..., k8].double(), sm, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# fully masked rows and empty KV
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mode", [0, 1])
def test_fully_masked_rows(mode, dtype):
    B, N, Sq, Skv = 2, 2, 70, 66
    q, k, v = dense_qkv("BNSD", B, N, N, Sq, Skv, 16, 16, dtype, seed=71)
    m = rbool((B, N, Sq, Skv), 0.3, 72)
    dead = [(0, 0, 3), (0, 1, 64), (1, 0, 0), (1, 1, 69)]
    for b, n, i in dead:
        m[b, n, i] = True
    m[1, :, 10:20] = True  # a run of dead rows in both heads
    res, _ = run_check(q, k, v, N, "BNSD", scale=0.25, atten_mask=m, sparse_mode=mode, dtype=dtype)
    out, mx, sm = res[:3]
    for b, n, i in dead + [(1, 0, r) for r in range(10, 20)] + [(1, 1, r) for r in range(10, 20)]:
        assert torch.all(out[b, n, i] == 0)
        assert torch.all(mx[b, n, i] == -FLT_MAX) and torch.all(sm[b, n, i] == FLT_MAX)
    assert mx[0, 0, 4, 0].item() > -1e30  # neighbours are normal


def test_fully_masked_rows_by_band():
    """Mode 0 band with negative next cuts the first rows completely (inner_precise irrelevant, decision 4)."""
    q, k, v = dense_qkv("BNSD", 1, 2, 2, 40, 40, 8, 8, seed=73)
    for ip in (0, 1, 2):
        res, _ = run_check(q, k, v, 2, "BNSD", atten_mask=torch.zeros(40, 40, dtype=torch.bool), sparse_mode=0,
                           pre_tockens=10, next_tockens=-3, inner_precise=ip)
        assert torch.all(res[0][:, :, :3] == 0) and torch.all(res[1][:, :, :3] == -FLT_MAX)
        assert torch.all(res[2][:, :, :3] == FLT_MAX)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", DENSE + ("TND",))
def test_empty_kv(layout, dtype):
    """Skv = 0: attention_out 0, softmax_max = softmax_sum = 0 (§1.8)."""
    B, Nq, Nkv, Sq, D, Dv = 2, 4, 2, 9, 16, 8
    if layout == "TND":
        q, k, v = tnd_qkv(Sq, 0, Nq, Nkv, D, Dv, dtype, seed=75)
        kw = dict(actual_seq_qlen=[4, 9], actual_seq_kvlen=[0, 0])
    else:
        q, k, v = dense_qkv(layout, B, Nq, Nkv, Sq, 0, D, Dv, dtype, seed=75)
        kw = {}
    # poison-free: the op must write every element
    res, _ = run_check(q, k, v, Nq, layout, scale=0.3, dtype=dtype, **kw)
    assert res[0].numel() > 0 and torch.all(res[0] == 0)
    assert torch.all(res[1] == 0) and torch.all(res[2] == 0)
    assert res[6] == 0


def test_empty_kv_with_mask_sink_dropout():
    """Skv = 0 stays "empty" (0 / 0 / 0) with a compressed mask, an explicit [Sq, 0] mask, a sink or dropout."""
    q, k, v = dense_qkv("BNSD", 1, 2, 2, 3, 0, 8, 8, seed=76)
    for kw in (dict(atten_mask=TRIU2048, sparse_mode=3), dict(atten_mask=torch.zeros(3, 0, dtype=torch.bool)),
               dict(sink=torch.ones(2)), dict(keep_prob=0.5, seed=1)):
        res = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", **kw)
        assert torch.all(res[0] == 0) and torch.all(res[1] == 0) and torch.all(res[2] == 0), kw
        assert res[6] == 0


def test_head_dim_zero_is_empty():
    """D = 0 (nothing to multiply): same as empty KV, max = sum = 0 (§1.8)."""
    q, k, v = torch.zeros(1, 2, 3, 0), torch.zeros(1, 2, 5, 0), torch.zeros(1, 2, 5, 0)
    res = npufa.npu_fusion_attention(q, k, v, 2, "BNSD")
    assert tuple(res[0].shape) == (1, 2, 3, 0) and tuple(res[1].shape) == (1, 2, 3, 8)
    assert torch.all(res[1] == 0) and torch.all(res[2] == 0)


@pytest.mark.parametrize("layout", ["BNSD", "BSH"])
def test_empty_query_or_batch(layout):
    for B, Sq in ((2, 0), (0, 5)):
        q, k, v = dense_qkv(layout, B, 2, 2, Sq, 7, 8, 8, seed=77)
        res = npufa.npu_fusion_attention(q, k, v, 2, layout)
        exp = (B, 2, Sq, 8) if layout == "BNSD" else (B, Sq, 16)
        assert tuple(res[0].shape) == exp and tuple(res[1].shape) == (B, 2, Sq, 8)
        assert res[6] == 0


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_online_softmax_stress(dtype):
    """Row maxima that appear only in late key tiles, rows whose first key tiles are fully masked while
    other rows of the same tile are not, and a row keeping only the very last key."""
    B, N, Sq, Skv, D = 1, 2, 70, 300, 16
    q = rnd((B, N, Sq, D), dtype, seed=78)
    k = rnd((B, N, Skv, D), F64, seed=79)
    k = (k * torch.linspace(0.1, 2.0, Skv, dtype=F64).view(1, 1, Skv, 1)).to(dtype)  # later keys larger
    v = rnd((B, N, Skv, D), dtype, seed=80)
    m = torch.zeros(Sq, Skv, dtype=torch.bool)
    m[::2, :128] = True  # even rows: first two tiles masked
    m[5, :-1] = True  # row 5: only the last key
    m[7, :] = True  # row 7: nothing
    m[9, 64:] = True  # row 9: only the first tile
    res, _ = run_check(q, k, v, N, "BNSD", scale=0.5, atten_mask=m, dtype=dtype)
    torch.testing.assert_close(res[0][0, :, 5].double(), v[0, :, -1].double(), rtol=0, atol=0)
    assert torch.all(res[0][0, :, 7] == 0) and torch.all(res[2][0, :, 5] == 1.0)


def test_long_kv_decode_like():
    q, k, v = dense_qkv("BSND", 2, 4, 1, 1, 1000, 64, 64, seed=81)
    run_check(q, k, v, 4, "BSND", scale=0.125)
    run_check(q, k, v, 4, "BSND", scale=0.125, atten_mask=TRIU2048, sparse_mode=4, pre_tockens=300, next_tockens=0)


def test_scale_zero_is_mean_of_v():
    q, k, v = dense_qkv("BNSD", 1, 2, 2, 4, 9, 8, 8, seed=82)
    res = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.0)
    torch.testing.assert_close(res[0], v.mean(2, keepdim=True).expand(1, 2, 4, 8), rtol=1e-6, atol=1e-6)
    assert torch.all(res[1] == 0) and torch.all(res[2] == 9)


def test_tnd_global_mask_with_unused_rows():
    """TND explicit mask of shape [Tq, Tkv] (tensor T, larger than the sums) indexed globally (§1.6.1)."""
    lq, lkv = [10, 0, 20], [15, 0, 25]
    q, k, v = tnd_qkv(35, 45, 2, 2, 8, 8, seed=83)
    m = rbool((35, 45), 0.25, 84)
    kw = dict(actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv), atten_mask=m, sparse_mode=1, scale=0.3)
    res, _ = run_check(q, k, v, 2, "TND", **kw)
    assert torch.all(res[0][30:] == 0)


# ------------------------------------------------------------------------------------------------
# pse
# ------------------------------------------------------------------------------------------------
def test_pse_with_infinite_and_lowest_entries():
    """pse used as a soft mask: -inf / float32 lowest on some (not all) keys of every row."""
    q, k, v = dense_qkv("BNSD", 1, 2, 2, 70, 130, 16, 16, seed=85)
    for fill, sc in ((float("-inf"), 0.3), (torch.finfo(F32).min, 0.3), (torch.finfo(F32).min, 3.0)):
        pse = rnd((1, 2, 70, 130), seed=86)
        pse[..., :100] = fill
        res, _ = run_check(q, k, v, 2, "BNSD", pse=pse, scale=sc)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("pshape", ["BNSS", "BN1S", "1NSS", "1N1S"])
@pytest.mark.parametrize("layout,masking", [("BNSD", None), ("BSH", 3), ("SBH", 0)])
def test_pse_dense(pshape, dtype, layout, masking):
    B, Nq, Nkv, Sq, Skv = 2, 4, 2, 67, 45
    q, k, v = dense_qkv(layout, B, Nq, Nkv, Sq, Skv, 16, 16, dtype, seed=81)
    shape = {"BNSS": (B, Nq, Sq, Skv), "BN1S": (B, Nq, 1, Skv), "1NSS": (1, Nq, Sq, Skv),
             "1N1S": (1, Nq, 1, Skv)}[pshape]
    pse = rnd(shape, dtype, seed=82, scale=2.0)
    kw = {}
    if masking == 3:
        kw = dict(atten_mask=TRIU2048, sparse_mode=3)
    elif masking == 0:
        kw = dict(atten_mask=rbool((Sq, Skv), 0.2, 83), pre_tockens=30, next_tockens=5)
    res, _ = run_check(q, k, v, Nq, layout, pse=pse, scale=0.3, dtype=dtype, **kw)
    nopse = npufa.npu_fusion_attention(q, k, v, Nq, layout, scale=0.3, **kw)
    assert (res[0].double() - nopse[0].double()).abs().max() > 1e-2


def test_pse_added_before_scale():
    """pse_type 1: s = (qk + pse) * scale (§1.4): with q = 0 the row max is pse * scale."""
    q = torch.zeros(1, 1, 1, 4)
    k = torch.zeros(1, 1, 3, 4)
    v = torch.eye(3, 4).view(1, 1, 3, 4)
    pse = torch.tensor([0.0, 1.0, 2.0]).view(1, 1, 1, 3)
    res = npufa.npu_fusion_attention(q, k, v, 1, "BNSD", pse=pse, scale=0.5)
    e = torch.exp(torch.tensor([0.0, 0.5, 1.0], dtype=F64))
    torch.testing.assert_close(res[0][0, 0, 0, :3].double(), e / e.sum(), rtol=1e-6, atol=1e-7)
    assert res[1][0, 0, 0, 0].item() == pytest.approx(1.0, abs=1e-7)


def _alibi_rows(nq, S, seed):
    """Rows of an arbitrary Toeplitz-like source table C [1 or B, N, 1024, S] (random: checks indexing)."""
    return rnd((nq[0], nq[1], 1024, S), seed=seed)


@pytest.mark.parametrize("pb", [1, 2])
@pytest.mark.parametrize("mode", [2, 3, 0])
def test_pse_alibi_compressed_dense(pb, mode):
    """pse [B or 1, N, 1024, S] with Sq = Skv = 1100 > 1024 and a causal mask (§2.5)."""
    B, N, S = 2, 2, 1100
    q, k, v = dense_qkv("BNSD", B, N, N, S, S, 8, 8, seed=85)
    pse = _alibi_rows((pb, N), S, seed=86)
    if mode == 0:
        kw = dict(atten_mask=torch.triu(torch.ones(S, S, dtype=torch.bool), 1), sparse_mode=0, pre_tockens=INT_MAX,
                  next_tockens=0)
    else:
        kw = dict(atten_mask=TRIU2048, sparse_mode=mode)
    run_check(q, k, v, N, "BNSD", pse=pse, scale=0.3, **kw)


@pytest.mark.parametrize("pform", ["BNSS", "1NSS", "BN1S", "flatBNSS", "flatBN1S"])
def test_pse_tnd(pform):
    lq, lkv = [5, 40, 70], [9, 40, 66]
    Nq = 4
    q, k, v, kw = _tnd(lq, lkv, Nq=Nq, Nkv=2, seed=87)
    mq, mkv = max(lq), max(lkv)
    if pform == "BNSS":
        pse = rnd((3, Nq, mq, mkv), seed=88)
    elif pform == "1NSS":
        pse = rnd((1, Nq, mq, mkv), seed=88)
    elif pform == "BN1S":
        pse = rnd((3, Nq, 1, mkv), seed=88)
    elif pform == "flatBNSS":
        pse = rnd((Nq * sum(a * b for a, b in zip(lq, lkv)),), seed=88)
    else:
        pse = rnd((Nq * sum(lkv),), seed=88)
    res, _ = run_check(q, k, v, Nq, "TND", pse=pse, scale=0.3, **kw)
    nopse = npufa.npu_fusion_attention(q, k, v, Nq, "TND", scale=0.3, **kw)
    assert (res[0] - nopse[0]).abs().max() > 1e-2


def test_pse_tnd_alibi_compressed():
    """TND alibi [B, N, 1024, S] with max Sq > 1024, Sq_b == Skv_b, causal (§2.5 varlen branch)."""
    lq = [1100, 40]
    Nq = 2
    q, k, v, kw = _tnd(lq, lq, Nq=Nq, Nkv=1, D=8, Dv=8, seed=89)
    pse = rnd((2, Nq, 1024, 1100), seed=90)
    run_check(q, k, v, Nq, "TND", pse=pse, scale=0.3, atten_mask=TRIU2048, sparse_mode=3, **kw)


# ------------------------------------------------------------------------------------------------
# sink
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["BNSD", "BSH", "TND"])
def test_sink(layout, dtype):
    Nq, Nkv = 4, 2
    sink = torch.tensor([-1.0, 0.5, 3.0, 8.0])
    if layout == "TND":
        q, k, v, kw = _tnd([30, 20], [40, 10], Nq=Nq, Nkv=Nkv, dtype=dtype, seed=91)
        kw.update(atten_mask=TRIU2048, sparse_mode=2)
    else:
        q, k, v = dense_qkv(layout, 2, Nq, Nkv, 40, 30, 16, 16, dtype, seed=92)
        kw = dict(atten_mask=TRIU2048, sparse_mode=3)  # Sq > Skv: some rows fully masked
    res, _ = run_check(q, k, v, Nq, layout, sink=sink, scale=0.3, dtype=dtype, **kw)
    nosink = npufa.npu_fusion_attention(q, k, v, Nq, layout, scale=0.3, **kw)
    assert (res[0].double() - nosink[0].double()).abs().max() > 1e-2
    # the sink enters the sum: sum(with sink) > sum(no sink) on valid rows, max unchanged
    valid = nosink[1] > -1e30
    assert torch.all(res[2][valid] > nosink[2][valid])
    assert torch.equal(res[1], nosink[1])


def test_sink_hand():
    """Single key: out = v * e^s / (e^s + e^sink); sink not scaled (§1.10)."""
    q = torch.ones(1, 1, 1, 2)
    k = torch.ones(1, 1, 1, 2)  # qk = 2, scale 0.5 -> s = 1
    v = torch.full((1, 1, 1, 2), 3.0)
    res = npufa.npu_fusion_attention(q, k, v, 1, "BNSD", scale=0.5, sink=torch.tensor([2.0]))
    w = math.e / (math.e + math.e ** 2)
    assert res[0][0, 0, 0, 0].item() == pytest.approx(3 * w, rel=1e-6)
    assert res[1][0, 0, 0, 0].item() == pytest.approx(1.0, rel=1e-6)
    assert res[2][0, 0, 0, 0].item() == pytest.approx(1 + math.e, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# dropout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "BNSD"])
@pytest.mark.parametrize("keep_prob,seed,offset", [(0.9, 1, 0), (0.5, 12345, 16), (0.25, 2 ** 40 + 7, 1024),
                                                    (0.5, 3, 3), (0.75, 4, 2 ** 33 + 5)])
def test_dropout_generated_dense(layout, dtype, keep_prob, seed, offset):
    """(a) seed/offset without a mask == reference given dropout_gen_mask(B*N*Sq*Skv, ...)."""
    B, Nq, Nkv, Sq, Skv = 2, 4, 2, 67, 70
    q, k, v = dense_qkv(layout, B, Nq, Nkv, Sq, Skv, 16, 16, dtype, seed=101)
    res = npufa.npu_fusion_attention(q, k, v, Nq, layout, scale=0.25, keep_prob=keep_prob, seed=seed,
                                     offset=offset)
    numels = B * Nq * Sq * Skv
    mask = npufa.dropout_gen_mask(numels, keep_prob, seed, offset)
    assert mask.dtype == torch.uint8 and mask.numel() == math.ceil(numels / 128) * 128 // 8
    rres = ref.npu_fusion_attention(q, k, v, Nq, layout, scale=0.25, keep_prob=keep_prob, dropout_mask=mask,
                                    seed=seed, offset=offset)
    check(res, rres, dtype)
    assert res[4:] == (seed, offset, numels)
    # dropout did something
    nodrop = npufa.npu_fusion_attention(q, k, v, Nq, layout, scale=0.25)
    assert (res[0].double() - nodrop[0].double()).abs().max() > 1e-2
    # and the stats exclude dropout (§2.4)
    torch.testing.assert_close(res[1], nodrop[1], rtol=0, atol=0)
    torch.testing.assert_close(res[2], nodrop[2], rtol=0, atol=0)


@pytest.mark.parametrize("cq,ckv", [([30, 30, 95, 115], [40, 40, 110, 174]), ([2, 5, 9, 0, 0], [3, 6, 10, 0, 0])])
@pytest.mark.parametrize("keep_prob", [0.6, 0.95])
def test_dropout_generated_tnd(cq, ckv, keep_prob):
    """(a) TND: mask elements are per-batch blocks [Nq, Sq_b, Skv_b] (§2.4)."""
    Nq, Nkv = 4, 2
    q, k, v = tnd_qkv(max(cq), max(ckv), Nq, Nkv, 16, 16, seed=103)
    seed, offset = 77, 64
    res = npufa.npu_fusion_attention(q, k, v, Nq, "TND", scale=0.25, keep_prob=keep_prob, seed=seed, offset=offset,
                                     actual_seq_qlen=cq, actual_seq_kvlen=ckv)
    lq = [max(c - p, 0) for c, p in zip(cq, [0] + cq[:-1])]
    lkv = [max(c - p, 0) for c, p in zip(ckv, [0] + ckv[:-1])]
    elements = Nq * sum(a * b for a, b in zip(lq, lkv))
    mask = npufa.dropout_gen_mask(elements, keep_prob, seed, offset)
    rres = ref.npu_fusion_attention(q, k, v, Nq, "TND", scale=0.25, keep_prob=keep_prob, dropout_mask=mask,
                                    seed=seed, offset=offset, actual_seq_qlen=cq, actual_seq_kvlen=ckv)
    check(res, rres, F32)


@pytest.mark.parametrize("layout", ["BSH", "BNSD", "TND"])
def test_dropout_external_mask(layout):
    """(b) an external dropout_mask is used as is (same result as the reference with that mask)."""
    Nq, Nkv, keep_prob = 4, 2, 0.7
    g = torch.Generator().manual_seed(5)
    if layout == "TND":
        lq, lkv = [10, 0, 70], [20, 0, 65]
        q, k, v, kw = _tnd(lq, lkv, Nq=Nq, Nkv=Nkv, seed=105)
        elements = Nq * sum(a * b for a, b in zip(lq, lkv))
    else:
        q, k, v = dense_qkv(layout, 2, Nq, Nkv, 33, 65, 16, 16, seed=105)
        kw = {}
        elements = 2 * Nq * 33 * 65
    mask = torch.randint(0, 256, (math.ceil(elements / 128) * 16,), generator=g, dtype=torch.uint8)
    res = npufa.npu_fusion_attention(q, k, v, Nq, layout, scale=0.25, keep_prob=keep_prob, dropout_mask=mask,
                                     seed=3, offset=9, **kw)
    rres = ref.npu_fusion_attention(q, k, v, Nq, layout, scale=0.25, keep_prob=keep_prob, dropout_mask=mask,
                                    seed=3, offset=9, **kw)
    check(res, rres, F32)
    assert res[4:6] == (3, 9)
    # a mask of exactly ceil(elements / 8) bytes is enough
    small = mask[:math.ceil(elements / 8)].clone()
    res2 = npufa.npu_fusion_attention(q, k, v, Nq, layout, scale=0.25, keep_prob=keep_prob, dropout_mask=small,
                                      **kw)
    assert torch.equal(res[0], res2[0])
    # with keep_prob == 1 the mask is ignored
    res3 = npufa.npu_fusion_attention(q, k, v, Nq, layout, scale=0.25, keep_prob=1.0, dropout_mask=mask, **kw)
    check(res3, ref.npu_fusion_attention(q, k, v, Nq, layout, scale=0.25, **kw), F32)


def test_dropout_all_ones_mask_is_rescale():
    """keep every element: output = no-dropout output / keep_prob."""
    q, k, v = dense_qkv("BNSD", 1, 2, 2, 20, 30, 8, 8, seed=107)
    mask = torch.full((math.ceil(2 * 20 * 30 / 128) * 16,), 255, dtype=torch.uint8)
    a = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", keep_prob=0.8, dropout_mask=mask)
    b = npufa.npu_fusion_attention(q, k, v, 2, "BNSD")
    torch.testing.assert_close(a[0], b[0] / 0.8, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["BNSD", "TND"])
def test_dropout_threads_independent(layout):
    """(c) same (seed, offset) -> bitwise identical outputs at 1 and 2 threads."""
    Nq = 4
    if layout == "TND":
        q, k, v, kw = _tnd([70, 130, 1], [65, 129, 3], Nq=Nq, Nkv=2, seed=109)
    else:
        q, k, v = dense_qkv("BNSD", 2, Nq, 2, 130, 129, 16, 16, seed=109)
        kw = {}
    outs = []
    try:
        for nt in (1, 2, 1):
            npufa.set_num_threads(nt)
            assert npufa.get_num_threads() == nt
            outs.append(npufa.npu_fusion_attention(q, k, v, Nq, layout, scale=0.3, keep_prob=0.6, seed=2024,
                                                   offset=128, **kw))
    finally:
        npufa.set_num_threads(None)
    for o in outs[1:]:
        for x, y in zip(o[:3], outs[0][:3]):
            assert torch.equal(x, y)
        assert o[4:] == outs[0][4:]


def test_dropout_returned_ints():
    """(d) returned seed / offset / numels."""
    B, Nq, Sq, Skv = 2, 3, 7, 9
    q, k, v = dense_qkv("BSND", B, Nq, Nq, Sq, Skv, 8, 8, seed=111)
    numels = B * Nq * Sq * Skv
    # keep_prob == 1: seed/offset are returned unchanged (defaults 0)
    assert npufa.npu_fusion_attention(q, k, v, Nq, "BSND")[4:] == (0, 0, numels)
    assert npufa.npu_fusion_attention(q, k, v, Nq, "BSND", seed=5, offset=6)[4:] == (5, 6, numels)
    # explicit seed
    assert npufa.npu_fusion_attention(q, k, v, Nq, "BSND", keep_prob=0.5, seed=5, offset=6)[4:] == (5, 6, numels)
    # external mask: arguments returned, numels = B*N*Sq*Skv (not the plugin's uninitialised value)
    mask = npufa.dropout_gen_mask(numels, 0.5, 1, 0)
    assert npufa.npu_fusion_attention(q, k, v, Nq, "BSND", keep_prob=0.5, dropout_mask=mask, seed=8,
                                      offset=4)[4:] == (8, 4, numels)
    # BSH / SBH numels from the shapes
    for lay in ("BSH", "SBH"):
        qq, kk, vv = dense_qkv(lay, B, Nq, 1, Sq, Skv, 8, 8, seed=112)
        assert npufa.npu_fusion_attention(qq, kk, vv, Nq, lay)[6] == numels
    # TND raw-list quirk
    cq, ckv = [2, 5, 9, 0, 0], [3, 6, 10, 0, 0]
    q, k, v = tnd_qkv(9, 10, 2, 1, 8, 8, seed=113)
    r = npufa.npu_fusion_attention(q, k, v, 2, "TND", actual_seq_qlen=cq, actual_seq_kvlen=ckv, keep_prob=0.5,
                                   seed=3, offset=0)
    assert r[4:] == (3, 0, 2 * (6 + 9 + 16 + 90))


def test_dropout_seed_zero_draws_from_torch():
    """(e) seed 0 + keep_prob < 1: a seed from torch's generator, reproducible under manual_seed,
    returned so that it regenerates the same result (decision 1)."""
    q, k, v = dense_qkv("BNSD", 2, 2, 2, 40, 50, 16, 16, seed=115)
    torch.manual_seed(1234)
    a = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", keep_prob=0.7, offset=32)
    torch.manual_seed(1234)
    b = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", keep_prob=0.7, offset=32)
    assert a[4] != 0 and a[4] == b[4] and a[5] == 32
    assert torch.equal(a[0], b[0])
    c = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", keep_prob=0.7)  # generator advanced: another seed
    assert c[4] != a[4]
    # the returned seed regenerates the result
    d = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", keep_prob=0.7, seed=a[4], offset=a[5])
    assert torch.equal(a[0], d[0])
    mask = npufa.dropout_gen_mask(a[6], 0.7, a[4], a[5])
    check(a, ref.npu_fusion_attention(q, k, v, 2, "BNSD", keep_prob=0.7, dropout_mask=mask, seed=a[4],
                                      offset=a[5]), F32)
    # the draw only happens when dropout is on
    torch.manual_seed(1234)
    e = npufa.npu_fusion_attention(q, k, v, 2, "BNSD")
    assert e[4] == 0


@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 0.9])
def test_dropout_keep_fraction_and_bit_order(keep_prob):
    """Uniform attention over one-hot values exposes the keep bits: out[b,n,i,j] = keep/(kp*Skv).
    Checks the keep fraction, the [B, N, Sq, Skv] element order and LSB-first packing."""
    B, N, Sq, Skv = 2, 2, 70, 64
    q = torch.zeros(B, N, Sq, Skv)
    k = rnd((B, N, Skv, Skv), seed=117)
    v = torch.eye(Skv).expand(B, N, Skv, Skv).contiguous()
    seed, offset = 99, 8
    res = npufa.npu_fusion_attention(q, k, v, N, "BNSD", keep_prob=keep_prob, seed=seed, offset=offset)
    bits = (res[0].double() * keep_prob * Skv).round()
    assert torch.all((bits == 0) | (bits == 1))
    frac = bits.mean().item()
    n = bits.numel()
    assert abs(frac - keep_prob) < 5 * math.sqrt(keep_prob * (1 - keep_prob) / n)
    mask = npufa.dropout_gen_mask(B * N * Sq * Skv, keep_prob, seed, offset)
    expect = ref.unpack_dropout_mask(mask, B * N * Sq * Skv).reshape(B, N, Sq, Skv)
    assert torch.equal(bits.bool(), expect)
    # LSB first: bit k of byte t is element 8t + k
    manual = torch.stack([(mask.to(torch.int64) >> s) & 1 for s in range(8)], dim=1).reshape(-1)
    assert torch.equal(manual[:B * N * Sq * Skv].bool(), expect.reshape(-1))


def test_dropout_gen_mask_properties():
    m1 = npufa.dropout_gen_mask(1_000_000, 0.3, 42, 0)
    bits = ref.unpack_dropout_mask(m1, 1_000_000)
    assert abs(bits.double().mean().item() - 0.3) < 0.003
    assert torch.equal(m1, npufa.dropout_gen_mask(1_000_000, 0.3, 42, 0))
    assert not torch.equal(m1, npufa.dropout_gen_mask(1_000_000, 0.3, 43, 0))
    assert not torch.equal(m1, npufa.dropout_gen_mask(1_000_000, 0.3, 42, 1024))
    assert npufa.dropout_gen_mask(1000, 0.5, 1, 0).numel() == 128  # ceil(1000/128)*128/8
    assert torch.all(npufa.dropout_gen_mask(1024, 1.0, 1, 0) == 255)
    # torch_npu's _npu_dropout_gen_mask(self, size, p=drop probability, seed, offset)
    t = torch.empty(3)
    a = npufa._npu_dropout_gen_mask(t, [4, 5, 6], 0.25, 7, 0)
    assert torch.equal(a, npufa.dropout_gen_mask(120, 0.75, 7, 0))
    assert npufa.dropout_mask_bytes(129) == 32


# ------------------------------------------------------------------------------------------------
# a few combinations
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
def test_everything_together_dense(dtype):
    B, Nq, Nkv, Sq, Skv, D, Dv = 2, 6, 2, 90, 130, 40, 24
    q, k, v = dense_qkv("BSH", B, Nq, Nkv, Sq, Skv, D, Dv, dtype, seed=121)
    pse = rnd((1, Nq, Sq, Skv), dtype, seed=122)
    sink = rnd((Nq,), F32, seed=123)
    numels = B * Nq * Sq * Skv
    mask = npufa.dropout_gen_mask(numels, 0.8, 5, 0)
    kw = dict(pse=pse, atten_mask=TRIU2048, sparse_mode=4, pre_tockens=50, next_tockens=-5, scale=D ** -0.5,
              keep_prob=0.8, sink=sink)
    res = npufa.npu_fusion_attention(q, k, v, Nq, "BSH", seed=5, **kw)
    rres = ref.npu_fusion_attention(q, k, v, Nq, "BSH", dropout_mask=mask, seed=5, **kw)
    check(res, rres, dtype)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_everything_together_tnd(dtype):
    lq, lkv = [70, 1, 64, 33], [70, 5, 130, 40]
    Nq, Nkv = 6, 3
    q, k, v, kw = _tnd(lq, lkv, Nq=Nq, Nkv=Nkv, D=24, Dv=20, dtype=dtype, seed=125)
    pse = rnd((4, Nq, max(lq), max(lkv)), dtype, seed=126)
    sink = rnd((Nq,), F32, seed=127)
    elements = Nq * sum(a * b for a, b in zip(lq, lkv))
    mask = npufa.dropout_gen_mask(elements, 0.9, 11, 4)
    kw.update(pse=pse, atten_mask=TRIU2048, sparse_mode=3, scale=0.2, keep_prob=0.9, sink=sink,
              softmax_layout="TND")
    res = npufa.npu_fusion_attention(q, k, v, Nq, "TND", seed=11, offset=4, **kw)
    rres = ref.npu_fusion_attention(q, k, v, Nq, "TND", dropout_mask=mask, seed=11, offset=4, **kw)
    check(res, rres, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "BNSD"])
@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("Sq,Skv", [(129, 257), (257, 129), (200, 200), (1, 300), (513, 1025), (1025, 513)])
def test_large_grid_slow(layout, dtype, mode, Sq, Skv):
    B, Nq, Nkv, D, Dv = 2, 6, 3, 72, 40
    q, k, v = dense_qkv(layout, B, Nq, Nkv, Sq, Skv, D, Dv, dtype, seed=Sq * 7 + Skv + mode)
    kw = dict(sparse_mode=mode, scale=D ** -0.5)
    if mode in (0, 1):
        kw.update(atten_mask=rbool((B, 1, Sq, Skv), 0.2, mode), pre_tockens=60, next_tockens=30)
    elif mode in (2, 3):
        kw.update(atten_mask=TRIU2048)
    elif mode == 4:
        kw.update(atten_mask=TRIU2048, pre_tockens=40, next_tockens=10)
    else:
        pf = [min(Skv - Sq + 3, Skv), Skv] if Sq <= Skv else [0, Skv // 2]
        kw.update(prefix=pf, atten_mask=PREFIX3072 if mode == 6 else _prefix_mask(B, Sq, Skv, pf))
    kw.update(pse=rnd((B, Nq, 1, Skv), dtype, seed=3), sink=rnd((Nq,), seed=4))
    run_check(q, k, v, Nq, layout, dtype=dtype, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4, 6, 7, 8])
@pytest.mark.parametrize("lq,lkv", [([129, 0, 300, 64, 1], [200, 0, 300, 65, 64]),
                                    ([700, 1, 0, 0], [1000, 33, 0, 0])])
def test_large_tnd_grid_slow(lq, lkv, mode, dtype):
    Nq, Nkv, D, Dv = 8, 2, 64, 48
    q, k, v, kw = _tnd(lq, lkv, Nq=Nq, Nkv=Nkv, D=D, Dv=Dv, dtype=dtype, seed=len(lq) + mode)
    kw.update(sparse_mode=mode, scale=D ** -0.5, sink=rnd((Nq,), seed=5), softmax_layout="TND" if mode % 2 else "")
    if mode in (0, 1):
        kw.update(atten_mask=rbool((max(lq), max(lkv)), 0.2, mode), pre_tockens=300, next_tockens=40)
    elif mode == 6:
        kw.update(atten_mask=PREFIX3072, prefix=[b - a + 2 if b - a + 2 <= b else b for a, b in zip(lq, lkv)])
    else:
        kw.update(atten_mask=TRIU2048, pre_tockens=INT_MAX if mode != 4 else 100, next_tockens=0 if mode != 8 else 7)
    if mode not in (7, 8) and 0 not in lq:
        kw.update(pse=rnd((len(lq), Nq, 1, max(lkv)), dtype, seed=6))
    elements = Nq * sum(a * b for a, b in zip(lq, lkv))
    mask = npufa.dropout_gen_mask(elements, 0.9, 21, 0)
    res = npufa.npu_fusion_attention(q, k, v, Nq, "TND", keep_prob=0.9, seed=21, **kw)
    check(res, ref.npu_fusion_attention(q, k, v, Nq, "TND", keep_prob=0.9, dropout_mask=mask, seed=21, **kw), dtype)
