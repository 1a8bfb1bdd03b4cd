"""The inference ops (PFA, IFA, FIA v1, FIA v2, _npu_reshape_and_cache) against npufa.reference (float64 oracle)
over seeded grids.

Conventions: /work/main/docs/inference.md. Spec: /work/shared/spec/torch_npu_attention.md §1, §5-§8, §11, §12;
project decisions /work/shared/spec/README.md.

Grid factors: dtype (fp16, bf16, fp32) x input_layout (all the op accepts, FIA's output layouts included) x head
dims (odd ones, Dv != D with the TND family) x GQA ratio (1, 2, 4, 7) x lengths around the 64-tiles (1, 63, 64,
65, 130) x sparse mode (0 with/without mask, with a pre/next band incl. negative values, 1, 2, 3, 4; PFA's aliases
10-14 and its default next_tokens = 0) x actual lengths (None, per batch incl. zeros, one value broadcast, a longer
list, as a tensor) x pse_shift x paged KV (block_size 1, 5, 16, 64, 128; both pool layouts; random block
permutations; garbage in unused slots) x left padding x shared prefix x query_rope/key_rope x lse x learnable_sink.

By default each op runs a seeded sample in which every value of every factor appears at least once; with
NPUFA_SLOW=1 the full product of the main factors (dtype x layout x GQA x lengths) runs, the other factors drawn
per case.

Tolerances (check_out / check_lse in infer_helpers.py): float32 rtol 1e-4 / atol 1e-5; float16/bfloat16 max error
<= 3 x the error of the exact result rounded to the dtype (a lower bound of a naive low-precision implementation's
error, so stricter than FlashAttention's rule) + slack 1e-4 / 1e-3; elements the reference zeroes are exactly 0;
lse fp32 at rtol 2e-5, -FLT_MAX exact.
"""
import itertools
import math
import os
import random

import pytest
import torch

import npufa
from infer_helpers import (BF16, CACHE, F16, F32, FIA, FIA2, FIA_LAYOUTS, IFA, IFA_LAYOUTS, INT_MAX, LAYOUT_IO,
                           NBSD_LAYOUTS, PFA, PFA_LAYOUTS, REF, TND_FAMILY, TRIU2048, cfg_id, check_lse, check_out, cum,
                           from_bnsd, left_pad, lengths_list, make_paged, pack, ref_call, rmask, rnd, sample_grid,
                           tnd_kind)

ref = REF  # npufa.reference (float64), see infer_helpers.load_reference

DTYPES = [F16, BF16, F32]
S_EDGE = [1, 63, 64, 65, 130]
DIMS = [(40, 40), (72, 72), (128, 128), (16, 16), (72, 40), (128, 64)]  # (D, Dv); Dv != D only in the TND family
GQA = [1, 2, 4, 7]
MASK_DTYPES = [torch.bool, torch.int8, torch.uint8]
SPARSE = ["none", "none_prenext", "m0", "m0_band", "m0_negnext", "m0_negpre", "m1", "m2", "m3", "m4"]
M4_PN = [(20, 5), (INT_MAX, 0), (10, -3), (-2, 30), (0, 0), (INT_MAX, INT_MAX)]
PAGED = ["none", ("BnBsH", 1), ("BnBsH", 5), ("BnBsH", 16), ("BnBsH", 64), ("BnBsH", 128), ("BnNBsD", 1),
         ("BnNBsD", 5), ("BnNBsD", 16), ("BnNBsD", 64), ("BnNBsD", 128)]


def _maybe_tensor(lst, rng):
    if lst is None:
        return None
    r = rng.random()
    if r < 0.2:
        return torch.tensor(lst, dtype=torch.int64)
    if r < 0.3:
        return torch.tensor(lst, dtype=torch.int32)
    if r < 0.4:
        return tuple(lst)
    return list(lst)


def _sparse_kwargs(kind, rng):
    """(sparse_mode, pre, next, needs_explicit_mask, compressed)"""
    if kind == "none":
        return 0, None, None, False, False
    if kind == "none_prenext":  # no mask: pre/next are ignored (both negative: see test_infer_errors LEGAL)
        pre, nxt = rng.choice([(0, -1), (3, 0), (-2, 4), (0, 0)])
        return 0, pre, nxt, False, False
    if kind == "m0":
        return 0, None, None, True, False
    if kind == "m0_band":
        return 0, rng.randint(0, 40), rng.randint(0, 40), True, False
    if kind == "m0_negnext":
        return 0, rng.choice([INT_MAX, 80]), -rng.randint(1, 5), True, False
    if kind == "m0_negpre":
        return 0, -rng.randint(1, 5), rng.choice([INT_MAX, 80]), True, False
    if kind == "m1":
        return 1, rng.choice([None, 0, 5]), rng.choice([None, 0, -1]), True, False
    if kind == "m2":
        return 2, None, None, False, True
    if kind == "m3":
        return 3, rng.choice([None, 7]), rng.choice([None, 0]), False, True
    assert kind == "m4"
    pre, nxt = rng.choice(M4_PN)
    return 4, pre, nxt, False, True


def _set_sparse(kw, sparse, rng, B, rows, cols, seed, tnd, alias=False, sq1=False):
    """sparse_mode / pre_tokens / next_tokens / atten_mask of a prefill case (alias: PFA's 10-14)."""
    mode, pre, nxt, explicit, compressed = _sparse_kwargs(sparse, rng)
    kw["sparse_mode"] = mode + (10 if alias else 0)
    if pre is not None:
        kw["pre_tokens"] = pre
    if nxt is not None:
        kw["next_tokens"] = nxt
    if explicit:
        kw["atten_mask"] = _prefill_mask(rng, B, rows, cols, rng.choice(MASK_DTYPES), seed, tnd, sq1=sq1)
    elif compressed:
        kw["atten_mask"] = rng.choice([TRIU2048, TRIU2048.view(1, 2048, 2048), TRIU2048.view(1, 1, 2048, 2048)])


def _prefill_mask(rng, B, rows, cols, dtype, seed, tnd=False, sq1=False):
    """An explicit prefill mask covering `rows` x `cols` (possibly wider) in one of the accepted shapes."""
    r = rows + (0 if sq1 else rng.choice([0, 0, 3]))
    c = cols + rng.choice([0, 0, 5])
    if sq1:  # keep it unambiguous between the prefill and decode readings
        shapes = [(B, 1, r, c), (1, 1, r, c)]
    else:
        shapes = [(r, c), (B, r, c), (1, r, c), (B, 1, r, c), (1, 1, r, c)]
    shape = rng.choice(shapes)
    return rmask(shape, rng.choice([0.15, 0.3]), seed, dtype, full_rows=rng.choice([0, 1]))


def _decode_mask(rng, B, cols, dtype, seed):
    c = cols + rng.choice([0, 0, 5])
    shape = rng.choice([(B, c), (1, c), (B, 1, c), (1, 1, c), (B, 1, 1, c), (1, 1, 1, c)])
    return rmask(shape, 0.3, seed, dtype, full_rows=rng.choice([0, 1]))


def _pse(rng, B, Nq, rows, cols, qdtype, seed, sq1=False):
    r = rows + (0 if sq1 else rng.choice([0, 2]))
    c = cols + rng.choice([0, 3])
    pb = rng.choice([B, 1])
    return rnd((pb, Nq, r, c), qdtype, seed, scale=rng.choice([0.5, 2.0]))


def _expected_out_shape(layout, B, Nq, Sq, Dv, T=None):
    ok = LAYOUT_IO[layout][1]
    return {"BSH": (B, Sq, Nq * Dv), "BSND": (B, Sq, Nq, Dv), "BNSD": (B, Nq, Sq, Dv), "NBSD": (Nq, B, Sq, Dv),
            "TND": (T, Nq, Dv), "NTD": (Nq, T, Dv)}[ok]


# ------------------------------------------------------------------------------------------------
# PFA
# ------------------------------------------------------------------------------------------------
PFA_FACTORS = dict(dtype=DTYPES, layout=list(PFA_LAYOUTS), dims=DIMS, gqa=GQA, Sq=S_EDGE, Skv=S_EDGE,
                   sparse=SPARSE, alias=[False, True], qlens=["full", "rand", "one", "long"],
                   kvlens=["full", "rand", "one", "long"], pse=[None, "pse"], B=[1, 2, 3])


def build_pfa(cfg, seed):
    rng = random.Random(seed)
    dtype, layout = cfg["dtype"], cfg["layout"]
    D, Dv = cfg["dims"]
    tnd = layout == "TND"
    if not tnd:
        Dv = D
    Sq, Skv, B = cfg["Sq"], cfg["Skv"], cfg["B"]
    Nkv = rng.choice([1, 2])
    Nq = Nkv * cfg["gqa"]
    qk = LAYOUT_IO[layout][0]
    qb = rnd((B, Nq, Sq, D), dtype, seed)
    kb = rnd((B, Nkv, Skv, D), dtype, seed + 1)
    vb = rnd((B, Nkv, Skv, Dv), dtype, seed + 2)
    kw = dict(num_heads=Nq, scale_value=1 / math.sqrt(D), input_layout=layout)
    if Nkv != Nq or rng.random() < 0.5:
        kw["num_key_value_heads"] = Nkv
    if tnd:
        _, lq = lengths_list("rand", B, Sq, rng)
        _, lkv = lengths_list("rand", B, Skv, rng)
        q = pack(qb, lq, sum(lq) + rng.choice([0, 3]))
        k = pack(kb, lkv, sum(lkv) + rng.choice([0, 2]))
        v = pack(vb, lkv, k.shape[0])
        kw.update(actual_seq_lengths=_maybe_tensor(cum(lq), rng), actual_seq_lengths_kv=_maybe_tensor(cum(lkv), rng))
        rows, cols = max(lq + [1]), max(lkv + [1])
        T = q.shape[0]
    else:
        q, k, v = from_bnsd(qb, qk), from_bnsd(kb, qk), from_bnsd(vb, qk)
        ql, _ = lengths_list(cfg["qlens"], B, Sq, rng)
        kl, _ = lengths_list(cfg["kvlens"], B, Skv, rng)
        if ql is not None:
            kw["actual_seq_lengths"] = _maybe_tensor(ql, rng)
        if kl is not None:
            kw["actual_seq_lengths_kv"] = _maybe_tensor(kl, rng)
        rows, cols = Sq, Skv
        T = None
    _set_sparse(kw, cfg["sparse"], rng, B, rows, cols, seed + 5, tnd, alias=cfg["alias"], sq1=(Sq == 1 and not tnd))
    if cfg["pse"]:
        kw["pse_shift"] = _pse(rng, B, Nq, rows, cols, dtype, seed + 6, sq1=(Sq == 1 and not tnd))
    exp_shape = (T, Nq, Dv) if tnd else _expected_out_shape("BSND" if layout == "BNSD_BSND" else layout, B, Nq, Sq,
                                                           Dv)
    return (q, k, v), kw, exp_shape


def run_pfa(cfg, seed):
    args, kw, exp_shape = build_pfa(cfg, seed)
    out = npufa.npu_prompt_flash_attention(*args, **kw)
    r = ref_call(PFA, args, kw)
    assert tuple(out.shape) == exp_shape, (tuple(out.shape), exp_shape)
    check_out(out, r, cfg["dtype"])


# ------------------------------------------------------------------------------------------------
# IFA
# ------------------------------------------------------------------------------------------------
IFA_FACTORS = dict(dtype=DTYPES, layout=list(IFA_LAYOUTS), dims=[d for d in DIMS if d[0] == d[1]], gqa=GQA,
                   Skv=S_EDGE, kvlens=["full", "rand", "one", "long"], paged=PAGED,
                   kvpad=["none", "none", "small", "neg", "overflow"], mask=[None, "mask"], pse=[None, "pse"],
                   B=[1, 2, 3], inner_precise=[0, 1, None])


def build_ifa(cfg, seed):
    rng = random.Random(seed)
    dtype, layout = cfg["dtype"], cfg["layout"]
    D, _ = cfg["dims"]
    Skv, B = cfg["Skv"], cfg["B"]
    Nkv = rng.choice([1, 2])
    Nq = Nkv * cfg["gqa"]
    qb = rnd((B, Nq, 1, D), dtype, seed)
    kb = rnd((B, Nkv, Skv, D), dtype, seed + 1)
    vb = rnd((B, Nkv, Skv, D), dtype, seed + 2)
    kw = dict(num_heads=Nq, scale_value=1 / math.sqrt(D), input_layout=layout)
    if Nkv != Nq or rng.random() < 0.5:
        kw["num_key_value_heads"] = Nkv
    if cfg["inner_precise"] is not None:
        kw["inner_precise"] = cfg["inner_precise"]
    q = from_bnsd(qb, layout)
    paged = cfg["paged"]
    kvpad = cfg["kvpad"] if paged == "none" else "none"
    lens_kind = cfg["kvlens"]
    if (paged != "none" or kvpad != "none") and lens_kind == "full":
        lens_kind = "rand"
    pad = {"none": 0, "small": min(2, Skv - 1), "neg": -3, "overflow": Skv - 1}[kvpad]
    lst, lens = lengths_list(lens_kind, B, Skv, rng)
    if kvpad == "small":
        cap = Skv - pad
        lens = [min(x, cap) for x in lens]
        lst = lens[:] if lens_kind != "one" else lens[:1]
    cols = Skv
    if paged != "none":
        layout_c, bs = paged
        (k, v), table = make_paged([kb, vb], lens, bs, layout_c, seed + 3, extra_cols=rng.choice([0, 1]),
                                   unused_fill=rng.choice(["valid", "zero"]))
        kw.update(block_table=table, block_size=bs)
        cols = table.shape[1] * bs
    elif kvpad != "none":
        padded_b = left_pad(kb, lens, max(pad, 0), seed + 3) if kvpad != "overflow" else None
        if kvpad == "overflow":  # some windows start before 0 -> those batches give 0 (§1.8)
            kp = rnd((B, Nkv, Skv, D), dtype, seed + 4)
            vp = rnd((B, Nkv, Skv, D), dtype, seed + 5)
            k, v = from_bnsd(kp, layout), from_bnsd(vp, layout)
        else:
            k = from_bnsd(padded_b, layout)
            v = from_bnsd(left_pad(vb, lens, max(pad, 0), seed + 4), layout)
        kw["kv_padding_size"] = torch.tensor([pad], dtype=torch.int64)
    else:
        k, v = from_bnsd(kb, layout), from_bnsd(vb, layout)
    if lst is not None:
        kw["actual_seq_lengths"] = _maybe_tensor(lst, rng)
    if cfg["mask"]:
        kw["atten_mask"] = _decode_mask(rng, B, cols, rng.choice(MASK_DTYPES), seed + 6)
    if cfg["pse"]:
        kw["pse_shift"] = _pse(rng, B, Nq, 1, cols, dtype, seed + 7, sq1=True)
    return (q, k, v), kw, tuple(q.shape)


def run_ifa(cfg, seed):
    args, kw, exp_shape = build_ifa(cfg, seed)
    out = npufa.npu_incre_flash_attention(*args, **kw)
    r = ref_call(IFA, args, kw)
    assert tuple(out.shape) == exp_shape, (tuple(out.shape), exp_shape)
    check_out(out, r, cfg["dtype"])


# ------------------------------------------------------------------------------------------------
# FIA v1 / v2
# ------------------------------------------------------------------------------------------------
FIA_FACTORS = dict(dtype=DTYPES, layout=list(FIA_LAYOUTS), dims=DIMS, gqa=GQA, Sq=S_EDGE, Skv=S_EDGE,
                   sparse=SPARSE, qlens=["full", "rand", "one", "long"], kvlens=["full", "rand", "one", "long"],
                   kv=["contig", "contig", "paged", "leftpad", "prefix"], paged=PAGED[1:], pse=[None, "pse"],
                   rope=[False, True], lse=[False, True], B=[1, 2, 3])
FIA2_FACTORS = dict(FIA_FACTORS, kv=["contig", "contig", "paged"], sink=[None, "sink"])

V1_NAMES = dict(heads="num_heads", scale="scale", qlen="actual_seq_lengths", kvlen="actual_seq_lengths_kv",
                lse="softmax_lse_flag")
V2_NAMES = dict(heads="num_query_heads", scale="softmax_scale", qlen="actual_seq_qlen", kvlen="actual_seq_kvlen",
                lse="return_softmax_lse")


def build_fia(cfg, seed, v2=False):
    rng = random.Random(seed)
    names = V2_NAMES if v2 else V1_NAMES
    dtype, layout = cfg["dtype"], cfg["layout"]
    D, Dv = cfg["dims"]
    tnd = layout in TND_FAMILY
    if not tnd:
        Dv = D
    Sq, Skv, B = cfg["Sq"], cfg["Skv"], cfg["B"]
    decode = Sq == 1 and not tnd
    kvmode = cfg["kv"]
    if tnd and kvmode in ("leftpad", "prefix"):
        kvmode = "contig"
    rope = cfg["rope"] and kvmode != "prefix"
    Dr = 64 if rope else 0
    Nkv = rng.choice([1, 2])
    Nq = Nkv * cfg["gqa"]
    qk, ok = LAYOUT_IO[layout]
    qb = rnd((B, Nq, Sq, D), dtype, seed)
    kb = rnd((B, Nkv, Skv, D), dtype, seed + 1)
    vb = rnd((B, Nkv, Skv, Dv), dtype, seed + 2)
    qrb = rnd((B, Nq, Sq, Dr), dtype, seed + 3) if rope else None
    krb = rnd((B, Nkv, Skv, Dr), dtype, seed + 4) if rope else None
    kw = {names["heads"]: Nq, names["scale"]: 1 / math.sqrt(D + Dr), "input_layout": layout}
    if Nkv != Nq or rng.random() < 0.5:
        kw["num_key_value_heads"] = Nkv
    if decode:
        kw["inner_precise"] = rng.choice([0, 1])
    else:
        kw["inner_precise"] = rng.choice([0, 1, 2, 3])
    Lp = 0
    T = None
    # ---- query ----
    if tnd:
        _, lq = lengths_list("rand", B, Sq, rng)
        q = tnd_kind(pack(qb, lq, sum(lq) + rng.choice([0, 2])), qk)
        if rope:
            kw["query_rope"] = tnd_kind(pack(qrb, lq, q.shape[0 if qk == "TND" else 1]), qk)
        kw[names["qlen"]] = _maybe_tensor(cum(lq), rng)
        T = q.shape[0] if qk == "TND" else q.shape[1]
        rows = max(lq + [1])
    else:
        q = from_bnsd(qb, qk)
        if rope:
            kw["query_rope"] = from_bnsd(qrb, qk)
        rows = Sq
    # ---- key / value ----
    lens_kind = cfg["kvlens"]
    if kvmode in ("paged", "leftpad") and lens_kind == "full":
        lens_kind = "rand"
    if tnd:  # TND + block_table: one KV length per batch (B = len(query lengths))
        lens_kind = "rand"
    kvpad = 0
    if kvmode == "leftpad":
        kvpad = rng.choice([0, 3, -1]) if Skv > 3 else rng.choice([0, -1])
    cap = Skv - max(kvpad, 0)
    if kvmode == "leftpad" and decode and rng.random() < 0.4:
        cap = Skv  # decode: windows starting before 0 give 0 for that batch
    if tnd and kvmode != "paged":
        _, lkv = lengths_list("rand", B, Skv, rng)
        k = tnd_kind(pack(kb, lkv, sum(lkv) + rng.choice([0, 3])), qk)
        v = tnd_kind(pack(vb, lkv, k.shape[0 if qk == "TND" else 1]), qk)
        if rope:
            kw["key_rope"] = tnd_kind(pack(krb, lkv, k.shape[0 if qk == "TND" else 1]), qk)
        kw[names["kvlen"]] = _maybe_tensor(cum(lkv), rng)
        cols = max(lkv + [1])
    else:
        kl, lens = lengths_list(lens_kind, B, cap, rng)
        if kvmode == "paged":
            layout_c, bs = cfg["paged"]
            tens = [kb, vb] + ([krb] if rope else [])
            pools, table = make_paged(tens, lens, bs, layout_c, seed + 5, extra_cols=rng.choice([0, 1]),
                                      unused_fill=rng.choice(["valid", "zero"]))
            k, v = pools[0], pools[1]
            if rope:
                kw["key_rope"] = pools[2]
            kw.update(block_table=table, block_size=bs)
            if kl is None:
                kl = lens
            cols = table.shape[1] * bs
        elif kvmode == "leftpad":
            k = from_bnsd(left_pad(kb, lens, max(kvpad, 0), seed + 6), qk)
            v = from_bnsd(left_pad(vb, lens, max(kvpad, 0), seed + 7), qk)
            if rope:
                kw["key_rope"] = from_bnsd(left_pad(krb, lens, max(kvpad, 0), seed + 8), qk)
            kw["kv_padding_size"] = torch.tensor([kvpad], dtype=torch.int64)
            if kl is None:
                kl = lens
            cols = Skv
        else:
            k, v = from_bnsd(kb, qk), from_bnsd(vb, qk)
            if rope:
                kw["key_rope"] = from_bnsd(krb, qk)
            cols = Skv
        if kl is not None:
            kw[names["kvlen"]] = _maybe_tensor(kl, rng)
        if kvmode == "prefix":
            Sp = rng.choice([1, 17, 64])
            kp = rnd((1, Nkv, Sp, D), dtype, seed + 9)
            vp = rnd((1, Nkv, Sp, Dv), dtype, seed + 10)
            kw.update(key_shared_prefix=from_bnsd(kp, qk), value_shared_prefix=from_bnsd(vp, qk))
            if rng.random() < 0.5:
                Lp = rng.randint(1, Sp)
                kw["actual_shared_prefix_len"] = _maybe_tensor([Lp], rng)
            else:
                Lp = Sp
            cols += Lp
        # query lengths (prefill only; decode passes none or ones)
        if tnd:
            pass
        elif decode:
            if rng.random() < 0.3:
                kw[names["qlen"]] = [1] * B
        else:
            qpad = 0
            if kvmode == "leftpad":
                qpad = rng.choice([0, 2, -1]) if Sq > 2 else 0
            ql, qlens = lengths_list(cfg["qlens"] if kvmode != "leftpad" else "rand", B, Sq - max(qpad, 0), rng)
            if ql is not None:
                kw[names["qlen"]] = _maybe_tensor(ql, rng)
            if kvmode == "leftpad":
                kw["query_padding_size"] = torch.tensor([qpad], dtype=torch.int64)
    # ---- masks / sparse (prefill only) ----
    if decode:
        if cfg["sparse"] not in ("none", "none_prenext", "m2", "m3", "m4"):
            kw["atten_mask"] = _decode_mask(rng, B, cols, rng.choice(MASK_DTYPES), seed + 11)
    else:
        _set_sparse(kw, cfg["sparse"], rng, B, rows, cols, seed + 11, tnd)
    if cfg["pse"]:
        kw["pse_shift"] = _pse(rng, B, Nq, rows, cols, dtype, seed + 12, sq1=decode)
    want_lse = cfg["lse"] and layout not in NBSD_LAYOUTS
    if want_lse or rng.random() < 0.3:
        kw[names["lse"]] = want_lse
    if v2 and cfg.get("sink"):
        kw["learnable_sink"] = rnd((Nq,), rng.choice([F32, BF16, dtype]), seed + 13, scale=2.0)
    exp_out = _expected_out_shape(layout, B, Nq, Sq, Dv, T)
    exp_lse = ((T, Nq, 1) if tnd else (B, Nq, Sq, 1)) if want_lse else (0,)
    return (q, k, v), kw, exp_out, exp_lse


def run_fia(cfg, seed, v2=False):
    args, kw, exp_out, exp_lse = build_fia(cfg, seed, v2)
    name = FIA2 if v2 else FIA
    out, lse = getattr(npufa, name)(*args, **kw)
    r_out, r_lse = ref_call(name, args, kw)
    assert tuple(out.shape) == exp_out, (tuple(out.shape), exp_out)
    assert tuple(lse.shape) == exp_lse and lse.dtype == F32, (tuple(lse.shape), exp_lse, lse.dtype)
    check_out(out, r_out, cfg["dtype"])
    check_lse(lse, r_lse)


# ------------------------------------------------------------------------------------------------
# _npu_reshape_and_cache
# ------------------------------------------------------------------------------------------------
CACHE_FACTORS = dict(dtype=DTYPES, form=["4d", "3d", "4d_view"], bs=[1, 5, 16, 128], heads=[1, 2, 4],
                     dims=[(16, 16), (40, 24), (128, 128)], T=[0, 1, 7, 40])


def build_cache(cfg, seed):
    rng = random.Random(seed)
    dtype, bs = cfg["dtype"], cfg["bs"]
    Nkv = cfg["heads"]
    D, Dv = cfg["dims"]
    T = cfg["T"]
    nb = max(2, math.ceil(T * 1.5 / bs) + 1)
    k = rnd((T, Nkv, D), dtype, seed)
    v = rnd((T, Nkv, Dv), dtype, seed + 1)
    kc0 = rnd((nb, bs, Nkv, D), dtype, seed + 2)
    vc0 = rnd((nb, bs, Nkv, Dv), dtype, seed + 3)
    cap = nb * bs
    slots = rng.sample(range(cap), min(T, cap))
    slots += [rng.randrange(cap) for _ in range(T - len(slots))]
    for i in range(T):  # vLLM's padding slots and a repeated slot
        if rng.random() < 0.15:
            slots[i] = -1
    if T >= 3:
        slots[-1] = slots[0] if slots[0] >= 0 else slots[-1]
    sl = torch.tensor(slots, dtype=rng.choice([torch.int32, torch.int64]))

    def caches():
        if cfg["form"] == "4d":
            return kc0.clone(), vc0.clone()
        if cfg["form"] == "3d":
            return kc0.reshape(nb, bs, Nkv * D).clone(), vc0.reshape(nb, bs, Nkv * Dv).clone()
        # a (blocknum, block_size, Nkv, D) view of a (blocknum, Nkv, block_size, D) cache
        return (kc0.transpose(1, 2).contiguous().transpose(1, 2), vc0.transpose(1, 2).contiguous().transpose(1, 2))
    return k, v, caches, sl


def run_cache(cfg, seed):
    k, v, caches, sl = build_cache(cfg, seed)
    kc, vc = caches()
    rkc, rvc = caches()
    kc_ptr = kc.data_ptr()
    npufa._npu_reshape_and_cache(k, v, kc, vc, sl)
    ref._npu_reshape_and_cache(k, v, rkc, rvc, sl)
    assert kc.data_ptr() == kc_ptr  # in place
    assert torch.equal(kc, rkc) and torch.equal(vc, rvc)
    # written rows changed as expected
    nb, bs = kc.shape[0], kc.shape[1]
    last = {}
    for t, s in enumerate(sl.tolist()):
        if s >= 0:
            last[s] = t
    kc4 = kc.reshape(nb, bs, k.shape[1], -1)
    for s, t in last.items():
        assert torch.equal(kc4[s // bs, s % bs], k[t])


# ------------------------------------------------------------------------------------------------
# the grids
# ------------------------------------------------------------------------------------------------
RUN = {PFA: run_pfa, IFA: run_ifa, FIA: lambda c, s: run_fia(c, s, False), FIA2: lambda c, s: run_fia(c, s, True),
       CACHE: run_cache}
FACTORS = {PFA: PFA_FACTORS, IFA: IFA_FACTORS, FIA: FIA_FACTORS, FIA2: FIA2_FACTORS, CACHE: CACHE_FACTORS}
N_DEFAULT = {PFA: 240, IFA: 240, FIA: 320, FIA2: 240, CACHE: 32}
SEED0 = {PFA: 1000, IFA: 2000, FIA: 3000, FIA2: 4000, CACHE: 5000}


def _default_cases():
    cases = []
    for op, fac in FACTORS.items():
        for i, cfg in enumerate(sample_grid(fac, N_DEFAULT[op], SEED0[op])):
            cases.append(pytest.param(op, cfg, SEED0[op] + 17 * i, id=f"{op}-{i}-{cfg_id(cfg)}"))
    return cases


MAIN_AXES = {PFA: ("dtype", "layout", "gqa", "Sq", "Skv"), IFA: ("dtype", "layout", "gqa", "Skv", "paged"),
             FIA: ("dtype", "layout", "gqa", "Sq", "kv"), FIA2: ("dtype", "layout", "gqa", "Sq", "kv"),
             CACHE: ("dtype", "form", "bs", "heads", "dims", "T")}


def _slow_cases():
    if os.environ.get("NPUFA_SLOW", "") != "1":  # keep the default collection small (these would be skipped)
        return [pytest.param(None, None, None, id="full-grid-needs-NPUFA_SLOW=1")]
    cases = []
    for op, fac in FACTORS.items():
        axes = MAIN_AXES[op]
        rest = {k: v for k, v in fac.items() if k not in axes}
        prod = list(itertools.product(*(fac[a] for a in axes)))
        others = sample_grid(rest, len(prod), SEED0[op] + 99)
        for i, (vals, oth) in enumerate(zip(prod, others)):
            cfg = dict(zip(axes, vals), **oth)
            cases.append(pytest.param(op, cfg, SEED0[op] + 100003 + 31 * i, id=f"{op}-full-{i}-{cfg_id(cfg)}"))
    return cases


@pytest.mark.parametrize("op,cfg,seed", _default_cases())
def test_grid(op, cfg, seed):
    RUN[op](cfg, seed)


@pytest.mark.slow
@pytest.mark.parametrize("op,cfg,seed", _slow_cases())
def test_grid_full(op, cfg, seed):
    RUN[op](cfg, seed)


# ------------------------------------------------------------------------------------------------
# targeted cases the samples might not hit at every seed
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4, 10, 11, 12, 13, 14])
def test_pfa_modes_and_aliases(mode, dtype):
    """Every PFA sparse mode and alias, with the default next_tokens (0) and a mask where one is read."""
    B, Nq, Nkv, Sq, Skv, D = 2, 4, 2, 65, 130, 40
    q, k, v = (from_bnsd(rnd(s, dtype, 70 + i), "BSND") for i, s in
               enumerate([(B, Nq, Sq, D), (B, Nkv, Skv, D), (B, Nkv, Skv, D)]))
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, scale_value=D ** -0.5, input_layout="BSND", sparse_mode=mode,
              actual_seq_lengths=[65, 30], actual_seq_lengths_kv=[100, 130])
    if mode % 10 in (0, 1):
        kw["atten_mask"] = rmask((B, 1, Sq, Skv), 0.3, 73, full_rows=1)
    elif mode % 10 in (2, 3, 4):
        kw["atten_mask"] = TRIU2048
    if mode % 10 == 4:
        kw.update(pre_tokens=30, next_tokens=-5)
    out = npufa.npu_prompt_flash_attention(q, k, v, **kw)
    check_out(out, ref_call(PFA, (q, k, v), kw), dtype)


@pytest.mark.parametrize("layout", FIA_LAYOUTS)
@pytest.mark.parametrize("Sq", [1, 5])
def test_fia_all_layouts_lse(layout, Sq):
    """Every FIA input/output layout, decode and prefill, with lse where allowed and a masked-out batch."""
    tnd = layout in TND_FAMILY
    B, Nq, Nkv, Skv, D, Dv = 3, 4, 2, 20, 24, (16 if tnd else 24)
    qk = LAYOUT_IO[layout][0]
    qb, kb, vb = rnd((B, Nq, Sq, D), seed=80), rnd((B, Nkv, Skv, D), seed=81), rnd((B, Nkv, Skv, Dv), seed=82)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, scale=D ** -0.5, input_layout=layout,
              softmax_lse_flag=layout not in NBSD_LAYOUTS)
    if tnd:
        lq, lkv = [Sq, 0, Sq], [Skv, 3, 0]
        q = tnd_kind(pack(qb, lq), qk)
        k, v = tnd_kind(pack(kb, lkv), qk), tnd_kind(pack(vb, lkv), qk)
        kw.update(actual_seq_lengths=cum(lq), actual_seq_lengths_kv=cum(lkv))
    else:
        q, k, v = from_bnsd(qb, qk), from_bnsd(kb, qk), from_bnsd(vb, qk)
        kw.update(actual_seq_lengths_kv=[Skv, 0, 7])
    out, lse = npufa.npu_fused_infer_attention_score(q, k, v, **kw)
    r_out, r_lse = ref_call(FIA, (q, k, v), kw)
    check_out(out, r_out, F32)
    check_lse(lse, r_lse)
    if kw["softmax_lse_flag"]:
        assert (lse == -3.4028234663852886e38).any()  # the batch without keys


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("layout", ["TND", "NTD_TND", "BSND"])
def test_fia2_learnable_sink(layout, dtype):
    B, Nq, Nkv, D = 2, 4, 1, 64
    lq, lkv = [5, 1], [40, 0]
    qk = LAYOUT_IO[layout][0]
    qb, kb, vb = rnd((B, Nq, 5, D), dtype, 90), rnd((B, Nkv, 40, D), dtype, 91), rnd((B, Nkv, 40, D), dtype, 92)
    sink = rnd((Nq,), BF16, 93, scale=2.0)
    kw = dict(num_query_heads=Nq, num_key_value_heads=Nkv, softmax_scale=D ** -0.5, input_layout=layout,
              learnable_sink=sink, return_softmax_lse=True, atten_mask=TRIU2048, sparse_mode=3)
    if layout in TND_FAMILY:
        q = tnd_kind(pack(qb, lq), qk)
        k, v = tnd_kind(pack(kb, lkv), qk), tnd_kind(pack(vb, lkv), qk)
        kw.update(actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv))
    else:
        q, k, v = from_bnsd(qb, qk), from_bnsd(kb, qk), from_bnsd(vb, qk)
        kw.update(actual_seq_qlen=lq, actual_seq_kvlen=lkv)
    out, lse = npufa.npu_fused_infer_attention_score_v2(q, k, v, **kw)
    r_out, r_lse = ref_call(FIA2, (q, k, v), kw)
    check_out(out, r_out, dtype)
    check_lse(lse, r_lse)


# ------------------------------------------------------------------------------------------------
# masks / pse of the minimal extent (exactly the rows and key columns read)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv", ["contig", "paged", "prefix", "leftpad"])
@pytest.mark.parametrize("Sq", [1, 9])
def test_minimal_mask_and_pse_extent(Sq, kv):
    """docs/inference.md: masks/pse need Sq' >= the query rows read and Skv' >= the key columns read (relative to
    the valid window): here exactly max(act_q) x (Lp +) max(act_kv), narrower than the tensors / block pools."""
    B, Nq, Nkv, Skv, D = 2, 4, 2, 40, 16
    lq, lkv = [min(Sq, 5), min(Sq, 3)], [20, 7]
    q, k, v = rnd((B, Nq, Sq, D), seed=100), rnd((B, Nkv, Skv, D), seed=101), rnd((B, Nkv, Skv, D), seed=102)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", scale=0.3, softmax_lse_flag=True,
              actual_seq_lengths_kv=lkv)
    cols = max(lkv)
    if kv == "paged":
        (k, v), table = make_paged([k, v], lkv, 16, "BnBsH", seed=103, extra_cols=2)
        kw.update(block_table=table, block_size=16)
    elif kv == "prefix":
        kw.update(key_shared_prefix=rnd((1, Nkv, 6, D), seed=104), value_shared_prefix=rnd((1, Nkv, 6, D), seed=105),
                  actual_shared_prefix_len=[4])
        cols += 4
    elif kv == "leftpad":
        k, v = left_pad(k, lkv, 2, 106), left_pad(v, lkv, 2, 107)
        kw["kv_padding_size"] = torch.tensor([2])
    if Sq > 1:
        kw["actual_seq_lengths"] = lq
        kw["atten_mask"] = rmask((B, 1, max(lq), cols), 0.3, 108, full_rows=1)
        kw["pse_shift"] = rnd((1, Nq, max(lq), cols), seed=109)
    else:
        kw["atten_mask"] = rmask((B, cols), 0.3, 108)
        kw["pse_shift"] = rnd((B, Nq, 1, cols), seed=109)
    out, lse = npufa.npu_fused_infer_attention_score(q, k, v, **kw)
    r_out, r_lse = ref_call(FIA, (q, k, v), kw)
    check_out(out, r_out, F32)
    check_lse(lse, r_lse)


# ------------------------------------------------------------------------------------------------
# pse_shift dtype: docs/inference.md says "any float dtype"
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", [PFA, IFA, FIA, FIA2])
@pytest.mark.parametrize("qd,pd", [(BF16, F32), (F16, F32), (F32, BF16), (BF16, F16)],
                         ids=["bf16-f32", "fp16-f32", "f32-bf16", "bf16-fp16"])
def test_pse_shift_any_float_dtype(qd, pd, op):
    B, Nq, Sq, Skv, D = 2, 2, (1 if op == IFA else 6), 30, 16
    q, k, v = rnd((B, Nq, Sq, D), qd, 110), rnd((B, Nq, Skv, D), qd, 111), rnd((B, Nq, Skv, D), qd, 112)
    pse = rnd((B, Nq, Sq, Skv), pd, 113)
    kw = {PFA: dict(num_heads=Nq, input_layout="BNSD", next_tokens=INT_MAX),
          IFA: dict(num_heads=Nq, input_layout="BNSD"), FIA: dict(num_heads=Nq, input_layout="BNSD"),
          FIA2: dict(num_query_heads=Nq, input_layout="BNSD")}[op]
    kw["pse_shift"] = pse
    out = getattr(npufa, op)(q, k, v, **kw)
    out = out[0] if isinstance(out, tuple) else out
    r = ref_call(op, (q, k, v), kw)
    check_out(out, r[0] if isinstance(r, tuple) else r, qd)


# ------------------------------------------------------------------------------------------------
# an oracle independent of npufa.reference: softmax(q k^T * scale + pse, masked) v in float64, plain BNSD
# ------------------------------------------------------------------------------------------------
def _naive(q, k, v, scale, pse=None, masked=None):
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, 1).to(torch.float64)
    v = v.repeat_interleave(g, 1).to(torch.float64)
    s = q.to(torch.float64) @ k.transpose(-1, -2) * scale
    if pse is not None:
        s = s + pse.to(torch.float64)
    if masked is not None:
        s = s.masked_fill(masked, float("-inf"))
    lse = torch.logsumexp(s, -1, keepdim=True)
    alive = torch.isfinite(lse)
    p = torch.where(alive, torch.exp(s - torch.where(alive, lse, torch.zeros_like(lse))), torch.zeros_like(s))
    return p @ v, torch.where(alive, lse, torch.full_like(lse, -3.4028234663852886e38))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("op", [PFA, IFA, FIA, FIA2])
def test_independent_naive_formula(op, dtype):
    B, Nq, Nkv, Skv, D = 2, 6, 2, 67, 24
    Sq = 1 if op == IFA else 19
    q, k, v = rnd((B, Nq, Sq, D), dtype, 120), rnd((B, Nkv, Skv, D), dtype, 121), rnd((B, Nkv, Skv, D), dtype, 122)
    m = rmask((B, 1, Sq, Skv), 0.3, 123, full_rows=1)
    pse = rnd((1, Nq, Sq, Skv), dtype, 124)
    want, want_lse = _naive(q, k, v, 0.2, pse, m)
    mk = m if Sq > 1 else m.view(B, Skv)
    if op == PFA:
        out = npufa.npu_prompt_flash_attention(q, k, v, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
                                               scale_value=0.2, pse_shift=pse, atten_mask=m, sparse_mode=1)
        lse = None
    elif op == IFA:
        out = npufa.npu_incre_flash_attention(q, k, v, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
                                              scale_value=0.2, pse_shift=pse, atten_mask=mk)
        lse = None
    elif op == FIA:
        out, lse = npufa.npu_fused_infer_attention_score(q, k, v, num_heads=Nq, num_key_value_heads=Nkv,
                                                         input_layout="BNSD", scale=0.2, pse_shift=pse, atten_mask=m,
                                                         sparse_mode=1, softmax_lse_flag=True)
    else:
        out, lse = npufa.npu_fused_infer_attention_score_v2(q, k, v, num_query_heads=Nq, num_key_value_heads=Nkv,
                                                            input_layout="BNSD", softmax_scale=0.2, pse_shift=pse,
                                                            atten_mask=m, sparse_mode=1, return_softmax_lse=True)
    check_out(out, want, dtype)
    if lse is not None:
        check_lse(lse, want_lse)


@pytest.mark.parametrize("op", [PFA, FIA, FIA2])
def test_no_mask_both_negative_pre_next_ignored(op):
    q, k, v = rnd((2, 2, 5, 8), seed=130), rnd((2, 2, 7, 8), seed=131), rnd((2, 2, 7, 8), seed=132)
    kw = dict(num_query_heads=2) if op == FIA2 else dict(num_heads=2)
    kw.update(input_layout="BNSD", pre_tokens=-1, next_tokens=-2)
    out = getattr(npufa, op)(q, k, v, **kw)
    plain = getattr(npufa, op)(q, k, v, **dict(kw, pre_tokens=INT_MAX, next_tokens=INT_MAX))
    out, plain = (out[0], plain[0]) if isinstance(out, tuple) else (out, plain)
    assert torch.equal(out, plain)
    r = ref_call(op, (q, k, v), kw)
    check_out(out, r[0] if isinstance(r, tuple) else r, F32)
