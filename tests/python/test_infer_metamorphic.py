"""Metamorphic tests of the inference ops: two calls that state the same problem differently must agree.

Conventions: /work/main/docs/inference.md. Spec: /work/shared/spec/torch_npu_attention.md §1, §5-§8, §11, §12.
No reference implementation is used: paged == contiguous KV, FIA decode == IFA, FIA prefill == PFA, left padding
== right padding, TND == per-batch BNSD, shared prefix == prefix concatenated to the KV, GQA == repeated KV heads,
lse-merge of two KV halves == full attention, output layouts are permutations of each other, reshape_and_cache +
paged decode == contiguous decode, thread-count independence. Each test carries a negative control (a variant that
must NOT agree), so a check cannot pass vacuously.
"""
import math

import pytest
import torch

import npufa
from infer_helpers import (BF16, F16, F32, F64, FLT_MAX, INT_MAX, TRIU2048, agree, agree_lse, cum, differs,
                           from_bnsd, left_pad, lse_merge, make_paged, pack, rmask, rnd, slots_for, tnd_kind,
                           to_bnsd)

pfa = npufa.npu_prompt_flash_attention
ifa = npufa.npu_incre_flash_attention
fia = npufa.npu_fused_infer_attention_score
fia2 = npufa.npu_fused_infer_attention_score_v2


def bnsd(B, Nq, Nkv, Sq, Skv, D, Dv=None, dtype=F32, seed=0):
    Dv = D if Dv is None else Dv
    return (rnd((B, Nq, Sq, D), dtype, seed), rnd((B, Nkv, Skv, D), dtype, seed + 1),
            rnd((B, Nkv, Skv, Dv), dtype, seed + 2))


def both(a, b, exact=False):
    """Two FIA results (out, lse) agree."""
    agree(a[0], b[0], exact=exact)
    assert a[1].shape == b[1].shape
    if a[1].numel():
        agree_lse(a[1], b[1], exact=exact)


# ------------------------------------------------------------------------------------------------
# paged KV == contiguous KV (§11)
# ------------------------------------------------------------------------------------------------
PAGE_CASES = [("BnBsH", 1), ("BnBsH", 16), ("BnBsH", 5), ("BnNBsD", 1), ("BnNBsD", 16), ("BnNBsD", 5),
              ("BnBsH", 64), ("BnNBsD", 128)]


@pytest.mark.parametrize("cache,bs", PAGE_CASES, ids=[f"{c}-{b}" for c, b in PAGE_CASES])
@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD"])
def test_ifa_paged_equals_contiguous(layout, cache, bs):
    B, Nq, Nkv, Skv, D = 3, 4, 2, 70, 32
    lens = [70, 0, 33]
    q, k, v = bnsd(B, Nq, Nkv, 1, Skv, D, seed=1)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, scale_value=D ** -0.5, input_layout=layout,
              actual_seq_lengths=lens)
    (kp, vp), table = make_paged([k, v], lens, bs, cache, seed=bs + 3)
    W = table.shape[1]
    m = rmask((B, W * bs), 0.3, 4)
    pse = rnd((B, Nq, 1, W * bs), seed=5)
    for extra in (dict(), dict(atten_mask=m, pse_shift=pse)):
        a = ifa(from_bnsd(q, layout), from_bnsd(k, layout), from_bnsd(v, layout), **kw,
                **{n: t[..., :Skv].contiguous() for n, t in extra.items()})  # same columns, cropped
        p = ifa(from_bnsd(q, layout), kp, vp, block_table=table, block_size=bs, **kw, **extra)
        agree(p, a)
    # the batch without keys is 0
    assert torch.equal(to_bnsd(p, layout, Nq)[1], torch.zeros(Nq, 1, D))
    # negative control: batch 0's first block replaced by another block (keys and values change)
    bad = table.clone()
    bad[0, 0] = (table[0, 0].item() + 1) % kp.shape[0]
    assert differs(ifa(from_bnsd(q, layout), kp, vp, block_table=bad, block_size=bs, **kw, **extra), p)


@pytest.mark.parametrize("cache,bs", PAGE_CASES[:6], ids=[f"{c}-{b}" for c, b in PAGE_CASES[:6]])
@pytest.mark.parametrize("Sq", [1, 9])
def test_fia_paged_equals_contiguous(Sq, cache, bs):
    B, Nq, Nkv, Skv, D = 3, 4, 1, 70, 24
    lens = [12, 70, 0] if Sq > 1 else [70, 0, 33]
    q, k, v = bnsd(B, Nq, Nkv, Sq, Skv, D, seed=10)
    qr, kr = rnd((B, Nq, Sq, 64), seed=11), rnd((B, Nkv, Skv, 64), seed=12)
    (kp, vp, krp), table = make_paged([k, v, kr], lens, bs, cache, seed=bs + 13)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, scale=(D + 64) ** -0.5, input_layout="BNSD",
              actual_seq_lengths_kv=lens, softmax_lse_flag=True, query_rope=qr)
    if Sq > 1:
        kw.update(atten_mask=TRIU2048, sparse_mode=3)
    a = fia(q, k, v, key_rope=kr, **kw)
    p = fia(q, kp, vp, key_rope=krp, block_table=table, block_size=bs, **kw)
    both(p, a)
    bad = table.clone()  # batch 0's first block replaced by another block
    bad[0, 0] = (table[0, 0].item() + 1) % kp.shape[0]
    assert differs(fia(q, kp, vp, key_rope=krp, block_table=bad, block_size=bs, **kw)[0], a[0])


@pytest.mark.parametrize("cache,bs", [("BnBsH", 16), ("BnNBsD", 5), ("BnBsH", 1)])
@pytest.mark.parametrize("v2", [False, True])
def test_fia_tnd_paged_equals_contiguous(v2, cache, bs):
    """TND query + block_table: KV lengths per batch (docs/inference.md) == packed KV with cumulative lengths."""
    Nq, Nkv, D = 4, 2, 16
    lq, lkv = [3, 0, 9, 1], [40, 5, 9, 0]
    B = len(lq)
    qb, kb, vb = bnsd(B, Nq, Nkv, 9, 40, D, seed=20)
    q = pack(qb, lq)
    (kp, vp), table = make_paged([kb, vb], lkv, bs, cache, seed=21)
    if v2:
        kw = dict(num_query_heads=Nq, num_key_value_heads=Nkv, softmax_scale=0.3, input_layout="TND",
                  actual_seq_qlen=cum(lq), return_softmax_lse=True, atten_mask=TRIU2048, sparse_mode=3)
        a = fia2(q, pack(kb, lkv), pack(vb, lkv), actual_seq_kvlen=cum(lkv), **kw)
        p = fia2(q, kp, vp, actual_seq_kvlen=lkv, block_table=table, block_size=bs, **kw)
    else:
        kw = dict(num_heads=Nq, num_key_value_heads=Nkv, scale=0.3, input_layout="TND",
                  actual_seq_lengths=cum(lq), softmax_lse_flag=True, atten_mask=TRIU2048, sparse_mode=3)
        a = fia(q, pack(kb, lkv), pack(vb, lkv), actual_seq_lengths_kv=cum(lkv), **kw)
        p = fia(q, kp, vp, actual_seq_lengths_kv=lkv, block_table=table, block_size=bs, **kw)
    both(p, a)


@pytest.mark.parametrize("garbage", [1e4, float("nan"), float("inf")], ids=["big", "nan", "inf"])
@pytest.mark.parametrize("op", ["ifa", "fia_decode", "fia_prefill"])
def test_paged_unused_slots_and_table_entries_are_not_read(op, garbage):
    """Pool slots beyond a batch's length and table entries beyond its blocks (here -1) are never read: a vLLM
    cache holds uninitialised memory there."""
    B, Nq, Nkv, Skv, D, bs = 2, 4, 2, 37, 16, 16
    Sq = 6 if op == "fia_prefill" else 1
    lens = [37, 20]
    q, k, v = bnsd(B, Nq, Nkv, Sq, Skv, D, seed=30)
    (kp, vp), table = make_paged([k, v], lens, bs, "BnBsH", seed=31, extra_cols=2, unused_fill="zero")
    (kg, vg), tg = make_paged([k, v], lens, bs, "BnBsH", seed=31, extra_cols=2, unused_fill="neg", garbage=garbage)
    assert (tg == -1).any()
    if op == "ifa":
        f = lambda kk, vv, t: ifa(q.transpose(1, 2).reshape(B, 1, Nq * D), kk, vv, num_heads=Nq,
                                  num_key_value_heads=Nkv, input_layout="BSH", actual_seq_lengths=lens,
                                  block_table=t, block_size=bs, scale_value=0.25)
        a, b = f(kp, vp, table), f(kg, vg, tg)
    else:
        f = lambda kk, vv, t: fia(q, kk, vv, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
                                  actual_seq_lengths_kv=lens, block_table=t, block_size=bs, scale=0.25,
                                  softmax_lse_flag=True)[0]
        a, b = f(kp, vp, table), f(kg, vg, tg)
    assert torch.isfinite(b).all()
    agree(b, a, exact=True)


@pytest.mark.parametrize("garbage", [float("nan"), 1e4], ids=["nan", "big"])
def test_contiguous_padding_beyond_lengths_not_read(garbage):
    """Right padding: KV positions at or beyond actual_seq_lengths_kv (and query rows beyond actual_seq_lengths)
    do not influence the valid rows."""
    B, Nq, Nkv, Sq, Skv, D = 2, 2, 2, 20, 50, 16
    q, k, v = bnsd(B, Nq, Nkv, Sq, Skv, D, seed=35)
    lq, lkv = [20, 7], [31, 50]
    kg, vg, qg = k.clone(), v.clone(), q.clone()
    kg[0, :, 31:] = garbage
    vg[0, :, 31:] = garbage
    qg[1, :, 7:] = garbage
    kw = dict(num_heads=Nq, input_layout="BNSD", actual_seq_lengths=lq, actual_seq_lengths_kv=lkv, scale=0.25,
              softmax_lse_flag=True)
    a, b = fia(q, k, v, **kw), fia(qg, kg, vg, **kw)
    assert torch.isfinite(b[0]).all()
    both(b, a, exact=True)
    kw_p = dict(num_heads=Nq, input_layout="BNSD", actual_seq_lengths=lq, actual_seq_lengths_kv=lkv,
                scale_value=0.25, next_tokens=INT_MAX)
    agree(pfa(qg, kg, vg, **kw_p), pfa(q, k, v, **kw_p), exact=True)
    kw_i = dict(num_heads=Nq, input_layout="BNSD", actual_seq_lengths=lkv, scale_value=0.25)
    q1 = q[:, :, :1].contiguous()
    agree(ifa(q1, kg, vg, **kw_i), ifa(q1, k, v, **kw_i), exact=True)


# ------------------------------------------------------------------------------------------------
# FIA decode == IFA, FIA prefill == PFA, FIA v2 == FIA v1
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", ["plain", "lengths_mask_pse", "paged", "kvpad"])
@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD"])
def test_fia_decode_equals_ifa(layout, kind, dtype):
    B, Nq, Nkv, Skv, D = 3, 8, 2, 65, 40
    q, k, v = bnsd(B, Nq, Nkv, 1, Skv, D, dtype=dtype, seed=40)
    ql, kl, vl = from_bnsd(q, layout), from_bnsd(k, layout), from_bnsd(v, layout)
    common_i = dict(num_heads=Nq, num_key_value_heads=Nkv, scale_value=D ** -0.5, input_layout=layout)
    common_f = dict(num_heads=Nq, num_key_value_heads=Nkv, scale=D ** -0.5, input_layout=layout)
    ki, kf = {}, {}
    lens = [65, 0, 40]
    if kind == "lengths_mask_pse":
        m = rmask((B, 1, 1, Skv), 0.3, 41, torch.uint8, full_rows=1)
        pse = rnd((1, Nq, 1, Skv), dtype, 42)
        ki = dict(actual_seq_lengths=lens, atten_mask=m, pse_shift=pse)
        kf = dict(actual_seq_lengths_kv=lens, atten_mask=m, pse_shift=pse)
    elif kind == "paged":
        (kl, vl), table = make_paged([k, v], lens, 16, "BnBsH", seed=43)
        ki = dict(actual_seq_lengths=lens, block_table=table, block_size=16)
        kf = dict(actual_seq_lengths_kv=lens, block_table=table, block_size=16)
    elif kind == "kvpad":
        lens = [60, 3, 64]
        kl, vl = from_bnsd(left_pad(k, lens, 1, 44), layout), from_bnsd(left_pad(v, lens, 1, 45), layout)
        pad = torch.tensor([1])
        ki = dict(actual_seq_lengths=lens, kv_padding_size=pad)
        kf = dict(actual_seq_lengths_kv=lens, kv_padding_size=pad)
    a = ifa(ql, kl, vl, **common_i, **ki)
    b, lse = fia(ql, kl, vl, **common_f, **kf)
    agree(b, a)
    assert tuple(lse.shape) == (0,) and lse.dtype == F32
    assert differs(ifa(ql, kl, vl, **dict(common_i, scale_value=0.5), **ki), a)


PFA_FIA_CASES = {
    "none": dict(),
    "mode0_mask_next0": dict(atten_mask="mask", sparse_mode=0, pre_tokens=INT_MAX, next_tokens=0),
    "mode0_band": dict(atten_mask="mask", sparse_mode=0, pre_tokens=20, next_tokens=5),
    "mode0_negnext": dict(atten_mask="mask", sparse_mode=0, pre_tokens=INT_MAX, next_tokens=-3),
    "mode1": dict(atten_mask="mask", sparse_mode=1),
    "mode2": dict(atten_mask=TRIU2048, sparse_mode=2),
    "mode3": dict(atten_mask=TRIU2048, sparse_mode=3),
    "mode4": dict(atten_mask=TRIU2048, sparse_mode=4, pre_tokens=12, next_tokens=-2),
    "pse_lengths": dict(pse_shift="pse", actual_seq_lengths=[17, 40], actual_seq_lengths_kv=[70, 9]),
}


@pytest.mark.parametrize("case", list(PFA_FIA_CASES))
@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD", "BNSD_BSND", "TND"])
def test_fia_prefill_equals_pfa(layout, case):
    B, Nq, Nkv, Sq, Skv, D = 2, 4, 2, 40, 70, 24
    extra = dict(PFA_FIA_CASES[case])
    if extra.get("atten_mask") == "mask":
        extra["atten_mask"] = rmask((B, 1, Sq, Skv), 0.25, 50, full_rows=1)
    if extra.get("pse_shift") == "pse":
        extra["pse_shift"] = rnd((B, Nq, Sq, Skv), seed=51)
    qb, kb, vb = bnsd(B, Nq, Nkv, Sq, Skv, D, Dv=(16 if layout == "TND" else D), seed=52)
    if layout == "TND":
        lq = extra.pop("actual_seq_lengths", [Sq, 25])
        lkv = extra.pop("actual_seq_lengths_kv", [Skv, 60])
        if "atten_mask" in extra and extra["atten_mask"].dim() == 4:
            extra["atten_mask"] = extra["atten_mask"][0, 0]
        q, k, v = pack(qb, lq), pack(kb, lkv), pack(vb, lkv)
        extra.update(actual_seq_lengths=cum(lq), actual_seq_lengths_kv=cum(lkv))
    else:
        qk = "BNSD" if layout == "BNSD_BSND" else layout
        q, k, v = from_bnsd(qb, qk), from_bnsd(kb, qk), from_bnsd(vb, qk)
    nt = extra.pop("next_tokens", INT_MAX)
    a = pfa(q, k, v, num_heads=Nq, num_key_value_heads=Nkv, scale_value=0.3, input_layout=layout, next_tokens=nt,
            **extra)
    b, _ = fia(q, k, v, num_heads=Nq, num_key_value_heads=Nkv, scale=0.3, input_layout=layout, next_tokens=nt,
               **extra)
    agree(b, a)
    if "sparse_mode" in extra:  # PFA's aliases 10-14 == 0-4
        agree(pfa(q, k, v, num_heads=Nq, num_key_value_heads=Nkv, scale_value=0.3, input_layout=layout,
                  next_tokens=nt, **dict(extra, sparse_mode=extra["sparse_mode"] + 10)), a, exact=True)


def test_pfa_default_next_tokens_is_zero():
    """PFA's next_tokens defaults to 0: a mode-0 mask is clipped to the left-up causal band (§5.1)."""
    B, Nq, Sq, Skv, D = 2, 2, 30, 30, 16
    q, k, v = bnsd(B, Nq, Nq, Sq, Skv, D, seed=55)
    m = rmask((Sq, Skv), 0.2, 56)
    a = pfa(q, k, v, num_heads=Nq, input_layout="BNSD", atten_mask=m)
    agree(a, pfa(q, k, v, num_heads=Nq, input_layout="BNSD", atten_mask=m, next_tokens=0), exact=True)
    agree(a, fia(q, k, v, num_heads=Nq, input_layout="BNSD", atten_mask=m, next_tokens=0)[0])
    agree(a, fia(q, k, v, num_heads=Nq, input_layout="BNSD", atten_mask=m | torch.triu(torch.ones(Sq, Skv, dtype=
                                                                                             torch.bool), 1))[0])
    # FIA's default is INT_MAX: differs
    assert differs(fia(q, k, v, num_heads=Nq, input_layout="BNSD", atten_mask=m)[0], a)


@pytest.mark.parametrize("layout", ["BSND", "TND", "NTD_TND", "BNSD_NBSD"])
@pytest.mark.parametrize("paged", [False, True])
def test_fia_v2_equals_v1(layout, paged):
    B, Nq, Nkv, Sq, Skv, D = 2, 4, 2, 5, 40, 16
    qb, kb, vb = bnsd(B, Nq, Nkv, Sq, Skv, D, seed=57)
    qr, kr = rnd((B, Nq, Sq, 64), seed=58), rnd((B, Nkv, Skv, 64), seed=59)
    lq, lkv = [5, 2], [40, 17]
    tnd = layout in ("TND", "NTD_TND")
    qk = {"BSND": "BSND", "TND": "TND", "NTD_TND": "NTD", "BNSD_NBSD": "BNSD"}[layout]
    if tnd:
        q, qrr = tnd_kind(pack(qb, lq), qk), tnd_kind(pack(qr, lq), qk)
        ql = cum(lq)
    else:
        q, qrr = from_bnsd(qb, qk), from_bnsd(qr, qk)
        ql = lq
    if paged:
        (k, v, krr), table = make_paged([kb, vb, kr], lkv, 16, "BnNBsD", seed=60)
        kvl = lkv
        pg = dict(block_table=table, block_size=16)
    elif tnd:
        k, v, krr = (tnd_kind(pack(x, lkv), qk) for x in (kb, vb, kr))
        kvl = cum(lkv)
        pg = {}
    else:
        k, v, krr = (from_bnsd(x, qk) for x in (kb, vb, kr))
        kvl = lkv
        pg = {}
    lse = layout != "BNSD_NBSD"
    m = TRIU2048
    a = fia(q, k, v, query_rope=qrr, key_rope=krr, num_heads=Nq, num_key_value_heads=Nkv, scale=0.2,
            input_layout=layout, actual_seq_lengths=ql, actual_seq_lengths_kv=kvl, softmax_lse_flag=lse,
            atten_mask=m, sparse_mode=4, pre_tokens=20, next_tokens=0, **pg)
    b = fia2(q, k, v, query_rope=qrr, key_rope=krr, num_query_heads=Nq, num_key_value_heads=Nkv, softmax_scale=0.2,
             input_layout=layout, actual_seq_qlen=ql, actual_seq_kvlen=kvl, return_softmax_lse=lse,
             atten_mask=m, sparse_mode=4, pre_tokens=20, next_tokens=0, **pg)
    both(b, a, exact=True)


# ------------------------------------------------------------------------------------------------
# left padding == right padding (§12.1, decision 5: masks/pse relative to the valid window)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["plain", "mask_pse", "mode3", "mode4", "mode0_prenext_ignored"])
@pytest.mark.parametrize("layout", ["BSH", "BNSD"])
def test_fia_left_padding_equals_right_padding(layout, case, dtype):
    B, Nq, Nkv, Sq, Skv, D = 3, 4, 2, 20, 50, 16
    qpad, kvpad = 3, 5
    lq, lkv = [17, 5, 0], [45, 12, 30]
    q, k, v = bnsd(B, Nq, Nkv, Sq, Skv, D, dtype=dtype, seed=61)
    ql_, kl_, vl_ = (left_pad(x, L, p, s) for x, L, p, s in ((q, lq, qpad, 62), (k, lkv, kvpad, 63),
                                                              (v, lkv, kvpad, 64)))
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, scale=0.25, input_layout=layout, actual_seq_lengths=lq,
              actual_seq_lengths_kv=lkv, softmax_lse_flag=True)
    kw_right = {}
    if case == "mask_pse":
        kw.update(atten_mask=rmask((B, 1, Sq, Skv), 0.3, 65, full_rows=1),
                  pse_shift=rnd((B, Nq, Sq, Skv), dtype, seed=66))
    elif case == "mode3":
        kw.update(atten_mask=TRIU2048, sparse_mode=3)
    elif case == "mode4":
        kw.update(atten_mask=TRIU2048, sparse_mode=4, pre_tokens=8, next_tokens=2)
    elif case == "mode0_prenext_ignored":
        m = rmask((Sq, Skv), 0.3, 67)
        kw.update(atten_mask=m, pre_tokens=1, next_tokens=0)  # ignored with left padding (docs/inference.md)
        kw_right = dict(pre_tokens=INT_MAX, next_tokens=INT_MAX)
    left = fia(from_bnsd(ql_, layout), from_bnsd(kl_, layout), from_bnsd(vl_, layout),
               query_padding_size=torch.tensor([qpad]), kv_padding_size=torch.tensor([kvpad]), **kw)
    right = fia(from_bnsd(q, layout), from_bnsd(k, layout), from_bnsd(v, layout), **dict(kw, **kw_right))
    lo, ro = to_bnsd(left[0], layout, Nq), to_bnsd(right[0], layout, Nq)
    for b in range(B):
        s0 = Sq - qpad - lq[b]
        agree(lo[b, :, s0:s0 + lq[b]].contiguous(), ro[b, :, :lq[b]].contiguous())
        agree_lse(left[1][b, :, s0:s0 + lq[b]].contiguous(), right[1][b, :, :lq[b]].contiguous())
        rest = torch.ones(Sq, dtype=torch.bool)
        rest[s0:s0 + lq[b]] = False
        assert (lo[b, :, rest] == 0).all(), "rows outside the left-padded query window must be 0"
        assert (left[1][b, :, rest] == -FLT_MAX).all()
        assert (ro[b, :, lq[b]:] == 0).all()
    # negative control: the left-padded tensors read as right-padded
    wrong = fia(from_bnsd(ql_, layout), from_bnsd(kl_, layout), from_bnsd(vl_, layout), **kw)
    assert differs(wrong[0], left[0])


@pytest.mark.parametrize("op", ["ifa", "fia"])
@pytest.mark.parametrize("pad", [0, 4, -2])
def test_decode_kv_left_padding(op, pad):
    """Decode KV left padding (IFA and FIA): window [Skv - pad - L, Skv - pad); a window starting before 0 gives
    that batch 0 (and lse -FLT_MAX); a negative pad means 0."""
    B, Nq, Nkv, Skv, D = 3, 4, 4, 30, 16
    p = max(pad, 0)
    lens = [26 if p else 30, 7, 29 if p == 4 else 30]  # batch 2 overflows when pad = 4
    q, k, v = bnsd(B, Nq, Nkv, 1, Skv, D, seed=70)
    kl_, vl_ = left_pad(k, lens, p, 71), left_pad(v, lens, p, 72)
    m = rmask((B, Skv), 0.2, 73)
    if op == "ifa":
        left = ifa(q, kl_, vl_, num_heads=Nq, input_layout="BNSD", actual_seq_lengths=lens, atten_mask=m,
                   kv_padding_size=torch.tensor([pad]), scale_value=0.3)
        right = ifa(q, k, v, num_heads=Nq, input_layout="BNSD", actual_seq_lengths=lens, atten_mask=m,
                    scale_value=0.3)
        llse = None
    else:
        left, llse = fia(q, kl_, vl_, num_heads=Nq, input_layout="BNSD", actual_seq_lengths_kv=lens, atten_mask=m,
                         kv_padding_size=torch.tensor([pad]), scale=0.3, softmax_lse_flag=True)
        right, rlse = fia(q, k, v, num_heads=Nq, input_layout="BNSD", actual_seq_lengths_kv=lens, atten_mask=m,
                          scale=0.3, softmax_lse_flag=True)
    for b in range(B):
        if Skv - p - lens[b] < 0:
            assert (left[b] == 0).all()
            if llse is not None:
                assert (llse[b] == -FLT_MAX).all()
        else:
            agree(left[b], right[b])
            if llse is not None:
                agree_lse(llse[b], rlse[b])
    if p:
        assert differs(left[:2], (ifa(q, kl_, vl_, num_heads=Nq, input_layout="BNSD", actual_seq_lengths=lens,
                                      atten_mask=m, scale_value=0.3))[:2])


# ------------------------------------------------------------------------------------------------
# TND == per-batch BNSD
# ------------------------------------------------------------------------------------------------
TND_CASES = {
    "none": dict(),
    "mode0_mask": dict(sparse_mode=0, pre_tokens=30, next_tokens=4),
    "mode1_mask_pse": dict(sparse_mode=1),
    "mode2": dict(atten_mask=TRIU2048, sparse_mode=2),
    "mode3": dict(atten_mask=TRIU2048, sparse_mode=3),
    "mode4": dict(atten_mask=TRIU2048, sparse_mode=4, pre_tokens=10, next_tokens=3),
}


@pytest.mark.parametrize("case", list(TND_CASES))
@pytest.mark.parametrize("op,layout", [(o, lay) for o in ("fia", "fia2") for lay in ("TND", "TND_NTD", "NTD", "NTD_TND")]
                         + [("pfa", "TND")])
def test_tnd_equals_per_batch_bnsd(op, case, layout):
    Nq, Nkv, D, Dv = 4, 2, 24, 16
    lq, lkv = [9, 0, 65, 1, 7], [12, 5, 70, 0, 7]
    B = len(lq)
    mq, mkv = max(lq), max(lkv)
    qb, kb, vb = bnsd(B, Nq, Nkv, mq, mkv, D, Dv, seed=80)
    qk, okind = {"TND": ("TND", "TND"), "TND_NTD": ("TND", "NTD"), "NTD": ("NTD", "NTD"),
                 "NTD_TND": ("NTD", "TND")}[layout]
    extra = dict(TND_CASES[case])
    pse = None
    if case in ("mode0_mask", "mode1_mask_pse"):
        extra["atten_mask"] = rmask((mq + 2, mkv + 3), 0.25, 81)
    if case == "mode1_mask_pse":
        pse = rnd((B, Nq, mq, mkv), seed=82)
        extra["pse_shift"] = pse
    q, k, v = (tnd_kind(pack(x, L), qk) for x, L in ((qb, lq), (kb, lkv), (vb, lkv)))

    def call(q, k, v, layout, ql, kvl, **kw):
        if op == "fia":
            return fia(q, k, v, num_heads=Nq, num_key_value_heads=Nkv, scale=0.3, input_layout=layout,
                       actual_seq_lengths=ql, actual_seq_lengths_kv=kvl, softmax_lse_flag=True, **kw)
        if op == "fia2":
            return fia2(q, k, v, num_query_heads=Nq, num_key_value_heads=Nkv, softmax_scale=0.3, input_layout=layout,
                        actual_seq_qlen=ql, actual_seq_kvlen=kvl, return_softmax_lse=True, **kw)
        o = pfa(q, k, v, num_heads=Nq, num_key_value_heads=Nkv, scale_value=0.3, input_layout=layout,
                actual_seq_lengths=ql, actual_seq_lengths_kv=kvl, next_tokens=kw.pop("next_tokens", INT_MAX), **kw)
        return o, None

    out, lse = call(q, k, v, layout, cum(lq), cum(lkv), **extra)
    out_t = out if okind == "TND" else out.transpose(0, 1)  # [T, Nq, Dv]
    off = 0
    for b in range(B):
        L, Lk = lq[b], lkv[b]
        if L == 0:
            continue
        rows = out_t[off:off + L]
        if Lk == 0:
            assert (rows == 0).all()
            if lse is not None:
                assert (lse[off:off + L] == -FLT_MAX).all()
        else:
            kwb = dict(extra)
            if "atten_mask" in kwb and kwb["atten_mask"] is not TRIU2048:
                kwb["atten_mask"] = kwb["atten_mask"][:L, :Lk].contiguous()
            if pse is not None:
                kwb["pse_shift"] = pse[b:b + 1, :, :L, :Lk].contiguous()
            ob, lb = call(qb[b:b + 1, :, :L].contiguous(), kb[b:b + 1, :, :Lk].contiguous(),
                          vb[b:b + 1, :, :Lk].contiguous(), "BNSD", [L], [Lk], **kwb)
            agree(rows.contiguous(), ob[0].transpose(0, 1).contiguous())
            if lse is not None:
                agree_lse(lse[off:off + L].contiguous(), lb[0].transpose(0, 1).contiguous())
        off += L
    if lse is not None:
        assert tuple(lse.shape) == (sum(lq), Nq, 1)
    # negative control: cumulative lengths read as per-batch lengths
    if op == "fia" and case == "none":
        assert cum(lkv) == [12, 17, 87, 87, 94]
        assert differs(out, call(q, k, v, layout, cum(lq), [12, 17, 80, 87, 94], **extra)[0])


# ------------------------------------------------------------------------------------------------
# shared prefix == prefix concatenated to the KV (§12.2)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Lp", [None, 13, 1])
@pytest.mark.parametrize("case", ["plain", "mask_pse", "mode3", "mode4", "decode"])
@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD"])
def test_shared_prefix_equals_concatenation(layout, case, Lp):
    B, Nq, Nkv, Skv, D, Sp = 3, 4, 2, 40, 16, 20
    Sq = 1 if case == "decode" else 12
    lens = [40, 0, 17]
    q, k, v = bnsd(B, Nq, Nkv, Sq, Skv, D, seed=90)
    kp, vp = rnd((1, Nkv, Sp, D), seed=91), rnd((1, Nkv, Sp, D), seed=92)
    lp = Sp if Lp is None else Lp
    kc = torch.zeros(B, Nkv, lp + Skv, D)
    vc = torch.zeros(B, Nkv, lp + Skv, D)
    for b in range(B):
        kc[b, :, :lp + lens[b]] = torch.cat([kp[0, :, :lp], k[b, :, :lens[b]]], 1)
        vc[b, :, :lp + lens[b]] = torch.cat([vp[0, :, :lp], v[b, :, :lens[b]]], 1)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, scale=0.25, input_layout=layout, softmax_lse_flag=True)
    if case == "mask_pse":
        kw.update(atten_mask=rmask((B, 1, Sq, lp + Skv), 0.3, 93, full_rows=1),
                  pse_shift=rnd((1, Nq, Sq, lp + Skv), seed=94))
    elif case == "mode3":
        kw.update(atten_mask=TRIU2048, sparse_mode=3)
    elif case == "mode4":
        kw.update(atten_mask=TRIU2048, sparse_mode=4, pre_tokens=15, next_tokens=-1)
    elif case == "decode":
        kw.update(atten_mask=rmask((B, lp + Skv), 0.3, 95), pse_shift=rnd((B, Nq, 1, lp + Skv), seed=96))
    pk = dict(key_shared_prefix=from_bnsd(kp, layout), value_shared_prefix=from_bnsd(vp, layout))
    if Lp is not None:
        pk["actual_shared_prefix_len"] = [Lp]
    a = fia(from_bnsd(q, layout), from_bnsd(k, layout), from_bnsd(v, layout), actual_seq_lengths_kv=lens, **pk, **kw)
    b = fia(from_bnsd(q, layout), from_bnsd(kc, layout), from_bnsd(vc, layout),
            actual_seq_lengths_kv=[x + lp for x in lens], **kw)
    both(a, b)
    # negative control: another prefix
    pk2 = dict(pk, key_shared_prefix=from_bnsd(kp.flip(2).contiguous(), layout))
    assert differs(fia(from_bnsd(q, layout), from_bnsd(k, layout), from_bnsd(v, layout), actual_seq_lengths_kv=lens,
                       **pk2, **kw)[0], a[0])


# ------------------------------------------------------------------------------------------------
# GQA == repeated KV heads
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("g", [2, 4, 7])
@pytest.mark.parametrize("op", ["pfa", "ifa", "fia_prefill", "fia_decode_paged"])
def test_gqa_equals_repeated_kv(op, g):
    B, Nkv, D = 2, 2, 16
    Nq = Nkv * g
    Sq = 1 if op in ("ifa", "fia_decode_paged") else 33
    Skv = 70
    q, k, v = bnsd(B, Nq, Nkv, Sq, Skv, D, seed=100)
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    perm = torch.arange(Nq) % Nkv
    kwrong, vwrong = k[:, perm], v[:, perm]
    lens = [70, 41]

    def run(kk, vv, nkv):
        if op == "pfa":
            return pfa(from_bnsd(q, "BSH"), from_bnsd(kk, "BSH"), from_bnsd(vv, "BSH"), num_heads=Nq,
                       num_key_value_heads=nkv, input_layout="BSH", scale_value=0.3, atten_mask=TRIU2048,
                       sparse_mode=3, actual_seq_lengths_kv=lens)
        if op == "ifa":
            return ifa(from_bnsd(q, "BSND"), from_bnsd(kk, "BSND"), from_bnsd(vv, "BSND"), num_heads=Nq,
                       num_key_value_heads=nkv, input_layout="BSND", scale_value=0.3, actual_seq_lengths=lens)
        if op == "fia_prefill":
            return fia(q, kk, vv, num_heads=Nq, num_key_value_heads=nkv, input_layout="BNSD", scale=0.3,
                       pse_shift=rnd((1, Nq, Sq, Skv), seed=101), actual_seq_lengths_kv=lens)[0]
        (kp, vp), table = make_paged([kk, vv], lens, 16, "BnNBsD", seed=102)
        return fia(q, kp, vp, num_heads=Nq, num_key_value_heads=nkv, input_layout="BNSD", scale=0.3,
                   block_table=table, block_size=16, actual_seq_lengths_kv=lens)[0]

    a = run(k, v, Nkv)
    agree(a, run(kr, vr, Nq))
    # head n reads KV head n // g, not n % Nkv
    assert differs(a, run(kwrong, vwrong, Nq))


# ------------------------------------------------------------------------------------------------
# lse merge of two KV halves == full attention (ring attention)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [1, 30, 64])
@pytest.mark.parametrize("case", ["bnsd_prefill", "bsh_decode", "tnd", "v2_paged", "mask_pse"])
def test_lse_merge_of_kv_halves_equals_full(case, split):
    B, Nq, Nkv, D = 2, 4, 2, 16
    Sq = 1 if case == "bsh_decode" else 9
    Skv = 80
    lens = [80, 25]  # batch 1 has no key in the second half when split >= 25
    q, k, v = bnsd(B, Nq, Nkv, Sq, Skv, D, seed=110)
    l1 = [min(L, split) for L in lens]
    l2 = [max(L - split, 0) for L in lens]
    k1, v1 = k[:, :, :split].contiguous(), v[:, :, :split].contiguous()
    k2 = torch.zeros_like(k)
    v2 = torch.zeros_like(v)
    for b in range(B):
        k2[b, :, :l2[b]] = k[b, :, split:split + l2[b]]
        v2[b, :, :l2[b]] = v[b, :, split:split + l2[b]]
    if case == "bnsd_prefill":
        f = lambda kk, vv, L: fia(q, kk, vv, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", scale=0.3,
                                  actual_seq_lengths_kv=L, softmax_lse_flag=True)
        parts = [f(k, v, lens), f(k1, v1, l1), f(k2, v2, l2)]
        outs = [p[0] for p in parts]
        lses = [p[1] for p in parts]
    elif case == "mask_pse":
        m = rmask((B, 1, Sq, Skv), 0.3, 111, full_rows=1)
        pse = rnd((B, Nq, Sq, Skv), seed=112)
        m2 = torch.ones_like(m)
        p2 = torch.zeros_like(pse)
        for b in range(B):
            m2[b, :, :, :l2[b]] = m[b, :, :, split:split + l2[b]]
            p2[b, :, :, :l2[b]] = pse[b, :, :, split:split + l2[b]]
        f = lambda kk, vv, L, mm, pp: fia(q, kk, vv, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
                                          scale=0.3, actual_seq_lengths_kv=L, softmax_lse_flag=True, atten_mask=mm,
                                          sparse_mode=1, pse_shift=pp)
        parts = [f(k, v, lens, m, pse), f(k1, v1, l1, m[..., :split].contiguous(), pse[..., :split].contiguous()),
                 f(k2, v2, l2, m2, p2)]
        outs = [p[0] for p in parts]
        lses = [p[1] for p in parts]
    elif case == "bsh_decode":
        f = lambda kk, vv, L: fia(from_bnsd(q, "BSH"), from_bnsd(kk, "BSH"), from_bnsd(vv, "BSH"), num_heads=Nq,
                                  num_key_value_heads=Nkv, input_layout="BSH", scale=0.3, actual_seq_lengths_kv=L,
                                  softmax_lse_flag=True)
        parts = [f(k, v, lens), f(k1, v1, l1), f(k2, v2, l2)]
        outs = [to_bnsd(p[0], "BSH", Nq) for p in parts]
        lses = [p[1] for p in parts]
    elif case == "tnd":
        lq = [9, 4]
        qt = pack(q, lq)
        f = lambda kk, vv, L: fia(qt, pack(kk, L), pack(vv, L), num_heads=Nq, num_key_value_heads=Nkv,
                                  input_layout="TND", scale=0.3, actual_seq_lengths=cum(lq),
                                  actual_seq_lengths_kv=cum(L), softmax_lse_flag=True)
        parts = [f(k, v, lens), f(k1, v1, l1), f(k2, v2, l2)]
        outs = [p[0] for p in parts]
        lses = [p[1] for p in parts]
    else:  # v2 paged
        def f(kk, vv, L):
            (kp, vp), table = make_paged([kk, vv], L, 16, "BnBsH", seed=113)
            return fia2(q, kp, vp, num_query_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
                        softmax_scale=0.3, actual_seq_kvlen=L, block_table=table, block_size=16,
                        return_softmax_lse=True)
        parts = [f(k, v, lens), f(k1, v1, l1), f(k2, v2, l2)]
        outs = [p[0] for p in parts]
        lses = [p[1] for p in parts]
    full_o, full_l = outs[0].to(F64), lses[0].to(F64)
    mo, ml = lse_merge(outs[1:], lses[1:])
    torch.testing.assert_close(mo, full_o, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(ml, full_l, rtol=2e-6, atol=2e-6)
    # negative control: a plain average of the halves is not the full result
    naive = (outs[1].to(F64) + outs[2].to(F64)) / 2
    assert differs(naive, full_o)


def test_learnable_sink_identity():
    """A sink only enlarges the denominator: out_sink = out * e^lse / (e^lse + e^sink), lse_sink = logaddexp."""
    B, Nq, Nkv, Sq, Skv, D = 2, 4, 2, 6, 50, 16
    lq, lkv = [6, 3], [50, 0]
    qb, kb, vb = bnsd(B, Nq, Nkv, Sq, Skv, D, seed=120)
    q, k, v = pack(qb, lq), pack(kb, lkv), pack(vb, lkv)
    sink = rnd((Nq,), seed=121, scale=2.0)
    kw = dict(num_query_heads=Nq, num_key_value_heads=Nkv, softmax_scale=0.3, input_layout="TND",
              actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv), return_softmax_lse=True, atten_mask=TRIU2048,
              sparse_mode=3)
    o0, l0 = fia2(q, k, v, **kw)
    o1, l1 = fia2(q, k, v, learnable_sink=sink, **kw)
    L = l0.to(F64)[..., 0]  # [T, Nq]
    alive = L > -FLT_MAX
    s = sink.to(F64).view(1, Nq)
    w = torch.where(alive, torch.sigmoid(L - s), torch.zeros_like(L))
    torch.testing.assert_close(o1.to(F64), o0.to(F64) * w.unsqueeze(-1), rtol=2e-5, atol=2e-6)
    want_l = torch.where(alive, torch.logaddexp(L, s.expand_as(L)), torch.full_like(L, -FLT_MAX))
    torch.testing.assert_close(l1.to(F64)[..., 0], want_l, rtol=2e-6, atol=2e-6)
    assert (o1[sum(lq[:1]):] == 0).all() and (l1[sum(lq[:1]):] == -FLT_MAX).all()
    assert differs(o1, o0)


# ------------------------------------------------------------------------------------------------
# output layouts are permutations of each other; input layouts agree
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("Sq", [1, 7])
def test_output_layouts_are_permutations(Sq, dtype):
    B, Nq, Nkv, Skv, D = 2, 4, 2, 33, 16
    q, k, v = bnsd(B, Nq, Nkv, Sq, Skv, D, dtype=dtype, seed=130)
    lens = [33, 10]
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, scale=0.25, actual_seq_lengths_kv=lens)
    if Sq > 1:
        kw.update(atten_mask=TRIU2048, sparse_mode=3)
    base, base_lse = fia(q, k, v, input_layout="BNSD", softmax_lse_flag=True, **kw)
    assert tuple(base.shape) == (B, Nq, Sq, D)
    combos = [("BSH", "BSH", "BSH"), ("BSH", "BSH_BNSD", "BNSD"), ("BSH", "BSH_NBSD", "NBSD"),
              ("BSND", "BSND", "BSND"), ("BSND", "BSND_BNSD", "BNSD"), ("BSND", "BSND_NBSD", "NBSD"),
              ("BNSD", "BNSD", "BNSD"), ("BNSD", "BNSD_BSND", "BSND"), ("BNSD", "BNSD_NBSD", "NBSD")]
    for inp, lay, out_kind in combos:
        qi, ki, vi = from_bnsd(q, inp), from_bnsd(k, inp), from_bnsd(v, inp)
        if True:
            lse_ok = "NBSD" not in lay
            o, lse = fia(qi, ki, vi, input_layout=lay, softmax_lse_flag=lse_ok, **kw)
            agree(to_bnsd(o, out_kind, Nq).contiguous(), base)
            if lse_ok:
                agree_lse(lse, base_lse)
            else:
                assert tuple(lse.shape) == (0,)
    # PFA BNSD_BSND is BNSD transposed
    if Sq > 1:
        pk = dict(num_heads=Nq, num_key_value_heads=Nkv, scale_value=0.25, actual_seq_lengths_kv=lens,
                  atten_mask=TRIU2048, sparse_mode=3)
        a = pfa(q, k, v, input_layout="BNSD", **pk)
        agree(pfa(q, k, v, input_layout="BNSD_BSND", **pk).transpose(1, 2).contiguous(), a)
        assert differs(a[:, 0], a[:, 1])  # heads differ, so a head/axis mix-up would show


@pytest.mark.parametrize("v2", [False, True])
def test_tnd_output_layouts_are_permutations(v2):
    Nq, Nkv, D, Dv = 4, 2, 24, 16
    lq, lkv = [5, 0, 9], [7, 3, 20]
    qb, kb, vb = bnsd(3, Nq, Nkv, 9, 20, D, Dv, seed=140)
    res = {}
    for lay in ("TND", "TND_NTD", "NTD", "NTD_TND"):
        kind = "TND" if lay.startswith("TND") else "NTD"
        q, k, v = (tnd_kind(pack(x, L), kind) for x, L in ((qb, lq), (kb, lkv), (vb, lkv)))
        if v2:
            o, lse = fia2(q, k, v, num_query_heads=Nq, num_key_value_heads=Nkv, softmax_scale=0.3, input_layout=lay,
                          actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv), return_softmax_lse=True,
                          atten_mask=TRIU2048, sparse_mode=2)
        else:
            o, lse = fia(q, k, v, num_heads=Nq, num_key_value_heads=Nkv, scale=0.3, input_layout=lay,
                         actual_seq_lengths=cum(lq), actual_seq_lengths_kv=cum(lkv), softmax_lse_flag=True,
                         atten_mask=TRIU2048, sparse_mode=2)
        out_kind = "NTD" if lay in ("TND_NTD", "NTD") else "TND"
        res[lay] = (o if out_kind == "TND" else o.transpose(0, 1).contiguous(), lse)
        assert tuple(lse.shape) == (sum(lq), Nq, 1)
    for lay in ("TND_NTD", "NTD", "NTD_TND"):
        agree(res[lay][0], res["TND"][0])
        agree_lse(res[lay][1], res["TND"][1])
    assert differs(res["TND"][0], res["TND"][0].flip(0))


# ------------------------------------------------------------------------------------------------
# compressed sparse modes == explicit masks; decode ignores sparse arguments
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Sq,Skv", [(40, 70), (70, 40), (65, 65)])
def test_fia_compressed_modes_equal_explicit_masks(Sq, Skv):
    B, Nq, D = 2, 2, 16
    q, k, v = bnsd(B, Nq, Nq, Sq, Skv, D, seed=150)
    lq, lkv = [Sq, Sq - 9], [Skv, Skv - 20]
    kw = dict(num_heads=Nq, input_layout="BNSD", scale=0.3, actual_seq_lengths=lq, actual_seq_lengths_kv=lkv)
    i = torch.arange(Sq).view(Sq, 1)
    j = torch.arange(Skv).view(1, Skv)
    # mode 3: j > i + Skv_b - Sq_b, per batch
    m3 = torch.stack([(j > i + lkv[b] - lq[b]) for b in range(B)]).unsqueeze(1)
    a = fia(q, k, v, atten_mask=TRIU2048, sparse_mode=3, **kw)[0]
    agree(a, fia(q, k, v, atten_mask=m3, sparse_mode=1, **kw)[0])
    # mode 2: j > i
    a2 = fia(q, k, v, atten_mask=TRIU2048, sparse_mode=2, **kw)[0]
    agree(a2, fia(q, k, v, atten_mask=(j > i), sparse_mode=1, **kw)[0])
    # mode 4: band anchored bottom-right
    pre, nxt = 12, -2
    m4 = torch.stack([((j - i) > nxt + lkv[b] - lq[b]) | ((i - j) > pre - lkv[b] + lq[b])
                      for b in range(B)]).unsqueeze(1)
    a4 = fia(q, k, v, atten_mask=TRIU2048, sparse_mode=4, pre_tokens=pre, next_tokens=nxt, **kw)[0]
    agree(a4, fia(q, k, v, atten_mask=m4, sparse_mode=1, **kw)[0])
    if Sq != Skv:
        assert differs(a, a2)


def test_decode_ignores_sparse_mode_and_band():
    B, Nq, Skv, D = 2, 4, 40, 16
    q, k, v = bnsd(B, Nq, Nq, 1, Skv, D, seed=160)
    m = rmask((B, Skv), 0.3, 161)
    kw = dict(num_heads=Nq, input_layout="BNSD", scale=0.3, atten_mask=m)
    a = fia(q, k, v, **kw)[0]
    agree(fia(q, k, v, pre_tokens=0, next_tokens=0, **kw)[0], a, exact=True)
    agree(fia(q, k, v, pre_tokens=-1, next_tokens=3, sparse_mode=0, **kw)[0], a, exact=True)
    assert differs(a, fia(q, k, v, num_heads=Nq, input_layout="BNSD", scale=0.3)[0])


def test_inner_precise_and_mask_forms_have_no_effect():
    B, Nq, Sq, Skv, D = 2, 2, 20, 40, 16
    q, k, v = bnsd(B, Nq, Nq, Sq, Skv, D, seed=170)
    m = rmask((B, 1, Sq, Skv), 0.3, 171, full_rows=1)
    kw = dict(num_heads=Nq, input_layout="BNSD", scale=0.3, softmax_lse_flag=True)
    base = fia(q, k, v, atten_mask=m, **kw)
    for ip in (1, 2, 3):
        both(fia(q, k, v, atten_mask=m, inner_precise=ip, **kw), base, exact=True)
    for mm in (m.to(torch.int8), m.to(torch.uint8)):
        both(fia(q, k, v, atten_mask=mm, **kw), base, exact=True)
    wide = torch.ones(B, 1, Sq + 3, Skv + 8, dtype=torch.bool)
    wide[:, :, :Sq, :Skv] = m
    both(fia(q, k, v, atten_mask=wide, **kw), base, exact=True)
    # a (B, 1, ...) mask per batch vs a shared one differ
    assert differs(fia(q, k, v, atten_mask=m[:1], **kw)[0], base[0])


# ------------------------------------------------------------------------------------------------
# _npu_reshape_and_cache then paged decode == contiguous decode
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["4d", "3d", "4d_view_of_BnNBsD"])
@pytest.mark.parametrize("bs", [1, 5, 16])
def test_reshape_and_cache_then_paged_decode(bs, form):
    B, Nq, Nkv, D = 3, 4, 2, 16
    lens = [23, 1, 40]
    S = max(lens)
    q, k, v = bnsd(B, Nq, Nkv, 1, S + 1, D, seed=180)
    need = [math.ceil((L + 1) / bs) for L in lens]
    nb = sum(need) + 3
    W = max(need)
    g = torch.Generator().manual_seed(181)
    ids = torch.randperm(nb, generator=g).tolist()
    table = torch.zeros(B, W, dtype=torch.int32)
    pos = 0
    for b in range(B):
        for i in range(need[b]):
            table[b, i] = ids[pos]
            pos += 1
    if form == "4d_view_of_BnNBsD":
        kbase = torch.full((nb, Nkv, bs, D), 1e4)
        vbase = torch.full((nb, Nkv, bs, D), 1e4)
        kc, vc = kbase.transpose(1, 2), vbase.transpose(1, 2)
        pool_k, pool_v = kbase, vbase
    elif form == "4d":
        kc = torch.full((nb, bs, Nkv, D), 1e4)
        vc = torch.full((nb, bs, Nkv, D), 1e4)
        pool_k, pool_v = kc.view(nb, bs, Nkv * D), vc.view(nb, bs, Nkv * D)
    else:
        kc = torch.full((nb, bs, Nkv * D), 1e4)
        vc = torch.full((nb, bs, Nkv * D), 1e4)
        pool_k, pool_v = kc, vc
    # prefill: write every token of every batch, with vLLM padding slots (-1) carrying garbage rows
    sm = slots_for(table, lens, bs)
    tok_k = torch.stack([k[b, :, s] for b, s, _ in sm] + [torch.full((Nkv, D), 1e4)])
    tok_v = torch.stack([v[b, :, s] for b, s, _ in sm] + [torch.full((Nkv, D), 1e4)])
    slots = torch.tensor([sl for _, _, sl in sm] + [-1], dtype=torch.int32)
    npufa._npu_reshape_and_cache(tok_k, tok_v, kc, vc, slots)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, scale_value=0.3, input_layout="BNSD")
    a = ifa(q, pool_k, pool_v, block_table=table, block_size=bs, actual_seq_lengths=lens, **kw)
    agree(a, ifa(q, k, v, actual_seq_lengths=lens, **kw))
    # decode step: one more token per batch
    step = [(b, lens[b], int(table[b, lens[b] // bs]) * bs + lens[b] % bs) for b in range(B)]
    npufa._npu_reshape_and_cache(torch.stack([k[b, :, s] for b, s, _ in step]),
                                 torch.stack([v[b, :, s] for b, s, _ in step]), kc, vc,
                                 torch.tensor([sl for _, _, sl in step], dtype=torch.int64))
    lens1 = [L + 1 for L in lens]
    a1 = ifa(q, pool_k, pool_v, block_table=table, block_size=bs, actual_seq_lengths=lens1, **kw)
    agree(a1, ifa(q, k, v, actual_seq_lengths=lens1, **kw))
    b1, _ = fia(q, pool_k, pool_v, block_table=table, block_size=bs, actual_seq_lengths_kv=lens1, num_heads=Nq,
                num_key_value_heads=Nkv, scale=0.3, input_layout="BNSD")
    agree(b1, a1)
    assert differs(a1, a)


def test_reshape_and_cache_semantics():
    """Token order (a repeated slot keeps the last row), slots < 0 skipped, other slots untouched."""
    T, N, D, bs, nb = 6, 2, 4, 3, 4
    k = rnd((T, N, D), seed=190)
    v = rnd((T, N, D + 2), seed=191)
    kc = torch.zeros(nb, bs, N, D)
    vc = torch.zeros(nb, bs, N, D + 2)
    slots = torch.tensor([4, -1, 7, 4, 11, -5], dtype=torch.int32)
    npufa._npu_reshape_and_cache(k, v, kc, vc, slots)
    want_k = torch.zeros(nb, bs, N, D)
    want_v = torch.zeros(nb, bs, N, D + 2)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // bs, s % bs] = k[t]
            want_v[s // bs, s % bs] = v[t]
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    assert torch.equal(kc[1, 1], k[3])  # the later of the two writes to slot 4


# ------------------------------------------------------------------------------------------------
# thread count
# ------------------------------------------------------------------------------------------------
def _thread_cases():
    B, Nq, Nkv, D = 3, 8, 2, 40
    q, k, v = bnsd(B, Nq, Nkv, 130, 130, D, dtype=BF16, seed=200)
    lens = [130, 0, 77]
    (kp, vp), table = make_paged([k, v], lens, 16, "BnBsH", seed=201)
    lq = [100, 0, 30]
    return {
        "fia_prefill_bf16": lambda: fia(q, k, v, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
                                        scale=0.2, atten_mask=TRIU2048, sparse_mode=3, actual_seq_lengths=lq,
                                        actual_seq_lengths_kv=lens, softmax_lse_flag=True,
                                        pse_shift=rnd((1, Nq, 130, 130), BF16, 202)),
        "ifa_paged": lambda: (ifa(q[:, :, :1].contiguous(), kp, vp, num_heads=Nq, num_key_value_heads=Nkv,
                                  input_layout="BNSD", block_table=table, block_size=16, actual_seq_lengths=lens,
                                  scale_value=0.2),),
        "fia_decode_f32": lambda: fia(q[:, :, :1].float().contiguous(), k.float(), v.float(), num_heads=Nq,
                                      num_key_value_heads=Nkv, input_layout="BNSD", actual_seq_lengths_kv=lens,
                                      scale=0.2, softmax_lse_flag=True),
        "fia_prefill_sq8_f32": lambda: fia(q[:, :, :8].float().contiguous(), k.float(), v.float(), num_heads=Nq,
                                           num_key_value_heads=Nkv, input_layout="BNSD", actual_seq_lengths_kv=lens,
                                           scale=0.2, softmax_lse_flag=True),
        "pfa_sq16_f32": lambda: (pfa(q[:, :, :16].float().contiguous(), k.float(), v.float(), num_heads=Nq,
                                     num_key_value_heads=Nkv, input_layout="BNSD", actual_seq_lengths_kv=lens,
                                     scale_value=0.2),),
        "pfa_tnd": lambda: (pfa(pack(q, lq), pack(k, lens), pack(v, lens), num_heads=Nq, num_key_value_heads=Nkv,
                                input_layout="TND", actual_seq_lengths=cum(lq), actual_seq_lengths_kv=cum(lens),
                                atten_mask=TRIU2048, sparse_mode=2, scale_value=0.2),),
        "fia2_sink_tnd": lambda: fia2(pack(q, lq), pack(k, lens), pack(v, lens), num_query_heads=Nq,
                                      num_key_value_heads=Nkv, input_layout="TND", actual_seq_qlen=cum(lq),
                                      actual_seq_kvlen=cum(lens), learnable_sink=rnd((Nq,), BF16, 203),
                                      return_softmax_lse=True, softmax_scale=0.2),
    }


@pytest.mark.parametrize("case", ["fia_prefill_bf16", "ifa_paged", "fia_decode_f32", "fia_prefill_sq8_f32",
                                  "pfa_sq16_f32", "pfa_tnd", "fia2_sink_tnd"])
def test_thread_count_independent(case):
    f = _thread_cases()[case]
    results = []
    try:
        for nt in (1, 2):
            npufa.set_num_threads(nt)
            results.append(f())
    finally:
        npufa.set_num_threads(None)
    for x, y in zip(results[0], results[1]):
        assert torch.equal(x, y), "results depend on the thread count"


# ------------------------------------------------------------------------------------------------
# strided (non-contiguous) inputs == contiguous copies
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["pfa", "ifa_paged", "fia_prefill", "fia2_tnd"])
def test_noncontiguous_inputs(op):
    B, Nq, Nkv, Sq, Skv, D = 2, 4, 2, 9, 40, 16
    q, k, v = bnsd(B, Nq, Nkv, Sq, Skv, D, seed=210)
    m = rmask((B, 1, Skv, Sq), 0.3, 211).transpose(2, 3)  # [B, 1, Sq, Skv] view
    pse = rnd((1, Nq, Skv, Sq), seed=212).transpose(2, 3)
    qn = q.transpose(1, 2).contiguous().transpose(1, 2)
    kn = torch.cat([k, k], -1)[..., :D]
    vn = v.transpose(2, 3).contiguous().transpose(2, 3)
    assert not (qn.is_contiguous() or kn.is_contiguous() or vn.is_contiguous() or m.is_contiguous())
    if op == "pfa":
        f = lambda q, k, v, m, p: pfa(q, k, v, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
                                      atten_mask=m, pse_shift=p, scale_value=0.3, sparse_mode=1)
        agree(f(qn, kn, vn, m, pse), f(q, k, v, m.contiguous(), pse.contiguous()), exact=True)
    elif op == "fia_prefill":
        f = lambda q, k, v, m, p: fia(q, k, v, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
                                      atten_mask=m, pse_shift=p, scale=0.3, softmax_lse_flag=True)
        both(f(qn, kn, vn, m, pse), f(q, k, v, m.contiguous(), pse.contiguous()), exact=True)
    elif op == "ifa_paged":
        lens = [40, 13]
        (kp, vp), table = make_paged([k, v], lens, 8, "BnNBsD", seed=213)
        q1 = q[:, :, :1]
        f = lambda q, kp, vp, t: ifa(q, kp, vp, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
                                     block_table=t, block_size=8, actual_seq_lengths=lens)
        tn = table.t().contiguous().t()
        kpn = kp.transpose(0, 1).contiguous().transpose(0, 1)
        assert not (tn.is_contiguous() or kpn.is_contiguous() or q1.is_contiguous())
        agree(f(q1, kpn, vp, tn), f(q1.contiguous(), kp, vp, table), exact=True)
    else:
        lq, lkv = [9, 4], [40, 11]
        qt, kt, vt = pack(q, lq), pack(k, lkv), pack(v, lkv)
        sink = rnd((2 * Nq,), seed=214)[::2]
        f = lambda q, k, v, s: fia2(q, k, v, num_query_heads=Nq, num_key_value_heads=Nkv, input_layout="TND",
                                    actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv), learnable_sink=s,
                                    return_softmax_lse=True)
        qtn = qt.transpose(0, 1).contiguous().transpose(0, 1)
        vtn = vt.permute(2, 1, 0).contiguous().permute(2, 1, 0)
        both(f(qtn, kt, vtn, sink), f(qt, kt, vt, sink.contiguous()), exact=True)
