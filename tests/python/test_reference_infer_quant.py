"""Self-tests of the quantisation in the float64 inference reference (python/npufa/reference_infer.py).

Conventions: docs/inference.md "Quantisation"; spec /work/shared/spec/torch_npu_attention.md §10.
The reference is loaded by file path (no compiled npufa needed).  Every check compares against an independent
formulation written here:
  * KV antiquant == dequantise by hand (explicit per-element index formulas), then the float reference;
  * paged per-token modes 4/5 == modes 1/3 with the same values placed by the block table;
  * the full int8 pipeline == a scalar loop of the documented formula;
  * output quantisation == literal hand-computed int8 values and a numpy formulation (numpy's own float16 /
    float32 rounding);
  * npu_trans_quant_param == literal bit patterns.
The last section shows that these comparisons do fail when the reference is given something else.
"""

import importlib.util
import math
import pathlib

import numpy as np
import pytest
import torch
from attn_helpers import to_layout

_PATH = pathlib.Path(__file__).resolve().parents[2] / "python" / "npufa" / "reference_infer.py"
_spec = importlib.util.spec_from_file_location("npufa_reference_infer_quant_under_test", _PATH)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

F64, F32, F16, I8 = torch.float64, torch.float32, torch.float16, torch.int8
NAN = float("nan")
PFA = ref.npu_prompt_flash_attention
IFA = ref.npu_incre_flash_attention
FIA = ref.npu_fused_infer_attention_score
FIA2 = ref.npu_fused_infer_attention_score_v2
TQP = ref.npu_trans_quant_param
FLAG46 = 1 << 46


def rnd(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def runif(lo, hi, *shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(tuple(shape), generator=g, dtype=F64)


def rint8(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, generator=g, dtype=I8)


def paged(x, lens, bs, blocknum, seed, filler):
    """x [B, Nkv, S, D] -> (pool3 (blocknum, bs, Nkv*D), pool4 (blocknum, Nkv, bs, D), table [B, W]): the tokens
    [0, len_b) of each batch in blocks of a random permutation; unused pool slots hold `filler` (same shape as the
    pool4), unused table entries are out of range."""
    B, Nkv, _, D = x.shape
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(blocknum, generator=g).tolist()
    W = max(1, max(-(-n // bs) for n in lens))
    table = torch.full((B, W), 10 ** 6, dtype=torch.int32)
    pool = filler.clone()
    for b, n in enumerate(lens):
        for s in range(n):
            if s % bs == 0:
                table[b, s // bs] = perm.pop()
            pool[table[b, s // bs], :, s % bs] = x[b, :, s]
    return pool.permute(0, 2, 1, 3).reshape(blocknum, bs, Nkv * D).contiguous(), pool, table


def same(a, b):
    """Bitwise equal (NaN-free), same shape and dtype."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert torch.equal(a, b), (a - b).abs().max() if a.is_floating_point() else (a != b).sum()


# ------------------------------------------------------------------------------------------------
# KV antiquant parameters: a tensor of every documented shape, and its by-hand expansion
# ------------------------------------------------------------------------------------------------
# (mode, form): the documented shapes of docs/inference.md
SEPARATE_FORMS = [(0, "1N1D"), (0, "1ND"), (0, "N1D"), (0, "ND"), (0, "1H"), (0, "H"), (0, "t1"), (0, "t0"),
                  (1, "1BS"), (1, "BS"), (2, "N"), (3, "BNS"), (4, "pool"), (5, "pool")]


def make_param(mode, form, *, B, Nkv, D, kv_s, blocknum, bs, lo, hi, seed):
    """A scale (values in [lo, hi)) or offset of the given documented shape.  kv_s: the per-token S axis."""
    shapes = {"1N1D": (1, Nkv, 1, D), "1ND": (1, Nkv, D), "N1D": (Nkv, 1, D), "ND": (Nkv, D), "1H": (1, Nkv * D),
              "H": (Nkv * D,), "t1": (1,), "t0": (), "1BS": (1, B, kv_s), "BS": (B, kv_s), "N": (Nkv,),
              "BNS": (B, Nkv, kv_s)}
    if form == "pool":
        shape = (blocknum, bs) if mode == 4 else (blocknum, Nkv, bs)
    else:
        shape = shapes[form]
    return runif(lo, hi, *shape, seed=seed)


def expand(mode, t, *, B, Nkv, S, D, table=None, bs=None, lens=None, start=0):
    """By hand: the value of an antiquant parameter for every element [b, n, s, d] of the key (or value) of
    canonical shape [B, Nkv, S, D].  Positions outside a batch's valid keys are NaN (they must never be read).
    start: absolute position of token 0 (left padding); lens: valid keys per batch."""
    full = torch.full((B, Nkv, S, D), NAN, dtype=F64)
    flat = t.reshape(-1)
    for b in range(B):
        n_valid = S if lens is None else lens[b]
        for n in range(Nkv):
            for s in range(start, start + n_valid):
                for d in range(D):
                    if mode == 0 and t.numel() == 1:  # per tensor
                        v = flat[0]
                    elif mode == 0:  # per channel, channel n*D + d
                        v = flat[n * D + d]
                    elif mode == 1:  # per token (1, B, KV_S) or (B, KV_S)
                        v = flat[b * t.shape[-1] + s]
                    elif mode == 2:  # per head
                        v = flat[n]
                    elif mode == 3:  # per token + per head
                        v = t[b, n, s]
                    elif mode == 4:  # per token, physical block / offset
                        v = t[table[b, s // bs], s % bs]
                    else:  # mode 5
                        v = t[table[b, s // bs], n, s % bs]
                    full[b, n, s, d] = v
    return full


def antiquant_case(op, layout, sq, kspec, vspec, *, pool_dim, offsets, seed, combined=None):
    """Runs op on int8 K/V with the given antiquant (key (mode, form), value (mode, form)), and the float
    reference on the K/V dequantised by hand; both must agree bit for bit.
    pool_dim: None (contiguous), 3 or 4 (paged pool).  combined: None, or True for the combined
    antiquant_scale/offset (FIA v1, IFA)."""
    B, Nq, Nkv, S, D, Dv, bs, blocknum = 2, 4, 2, 9, 4, 4, 4, 7
    lens = [9, 6]
    kmode, kform = kspec
    vmode, vform = vspec
    paged_kv = pool_dim is not None
    kv_s = S if not paged_kv else 3 * bs  # per-token S axis: W * block_size with block_table
    q = rnd(B, Nq, sq, D, seed=seed)
    k8, v8 = rint8(B, Nkv, S, D, seed=seed + 1), rint8(B, Nkv, S, Dv, seed=seed + 2)
    table = None
    if paged_kv:
        k3, k4, table = paged(k8, lens, bs, blocknum, seed + 3, rint8(blocknum, Nkv, bs, D, seed=seed + 4))
        v3, v4, table2 = paged(v8, lens, bs, blocknum, seed + 3, rint8(blocknum, Nkv, bs, Dv, seed=seed + 5))
        assert torch.equal(table, table2)
        key, value = (k3, v3) if pool_dim == 3 else (k4, v4)
    else:
        key, value = to_layout(k8, layout), to_layout(v8, layout)
    dims = dict(B=B, Nkv=Nkv, kv_s=kv_s, blocknum=blocknum, bs=bs)
    ks = make_param(kmode, kform, D=D, lo=0.01, hi=0.1, seed=seed + 6, **dims)
    vs = make_param(vmode, vform, D=Dv, lo=0.01, hi=0.1, seed=seed + 7, **dims)
    ko = make_param(kmode, kform, D=D, lo=-3, hi=3, seed=seed + 8, **dims) if offsets else None
    vo = make_param(vmode, vform, D=Dv, lo=-3, hi=3, seed=seed + 9, **dims) if offsets else None

    # dequantise by hand, then the float reference on contiguous tensors
    ex = dict(B=B, Nkv=Nkv, S=S, table=table, bs=bs, lens=lens)
    kf = (k8.to(F64) + (expand(kmode, ko, D=D, **ex) if offsets else 0)) * expand(kmode, ks, D=D, **ex)
    vf = (v8.to(F64) + (expand(vmode, vo, D=Dv, **ex) if offsets else 0)) * expand(vmode, vs, D=Dv, **ex)

    common = dict(input_layout=layout, num_key_value_heads=Nkv)
    paged_kw = dict(block_table=table, block_size=bs) if paged_kv else {}
    qq = to_layout(q, layout)
    if op is FIA2:
        kw = dict(num_query_heads=Nq, softmax_scale=0.4, actual_seq_kvlen=lens, **common)
        got, _ = FIA2(qq, key, value, dequant_scale_key=ks, dequant_offset_key=ko, dequant_scale_value=vs,
                      dequant_offset_value=vo, key_quant_mode=kmode, value_quant_mode=vmode, **paged_kw, **kw)
        want, _ = FIA2(qq, to_layout(kf, layout), to_layout(vf, layout), **kw)
    elif op is IFA:
        kw = dict(num_heads=Nq, scale_value=0.4, actual_seq_lengths=lens, **common)
        sc = torch.stack([ks, vs])
        off = torch.stack([ko, vo]) if offsets else None
        got = IFA(qq, key, value, antiquant_scale=sc, antiquant_offset=off, **paged_kw, **kw)
        want = IFA(qq, to_layout(kf, layout), to_layout(vf, layout), **kw)
    else:
        kw = dict(num_heads=Nq, scale=0.4, actual_seq_lengths_kv=lens, **common)
        if combined:
            assert kmode == vmode
            qkw = dict(antiquant_scale=torch.stack([ks, vs]), antiquant_offset=torch.stack([ko, vo]) if offsets
                       else None, antiquant_mode=kmode)
        else:
            qkw = dict(key_antiquant_scale=ks, key_antiquant_offset=ko, value_antiquant_scale=vs,
                       value_antiquant_offset=vo, key_antiquant_mode=kmode, value_antiquant_mode=vmode)
        got, _ = FIA(qq, key, value, **qkw, **paged_kw, **kw)
        want, _ = FIA(qq, to_layout(kf, layout), to_layout(vf, layout), **kw)
    assert not torch.isnan(want).any()
    same(got, want)
    return got


_SEP_CASES = [(spec, spec) for spec in SEPARATE_FORMS] + [((0, "ND"), (1, "BS")), ((0, "1H"), (1, "1BS")),
                                                           ((0, "t0"), (1, "BS"))]  # key 0 + value 1


@pytest.mark.parametrize("op", [FIA, FIA2], ids=["fia", "fia2"])
@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize("pool_dim", [None, 3, 4])
@pytest.mark.parametrize("kspec,vspec", _SEP_CASES, ids=[f"k{k[0]}{k[1]}-v{v[0]}{v[1]}" for k, v in _SEP_CASES])
def test_separate_antiquant_equals_dequantise_by_hand(op, sq, pool_dim, kspec, vspec):
    if kspec[0] in (4, 5) and pool_dim is None:
        pytest.skip("modes 4/5 need block_table")
    i = SEPARATE_FORMS.index(kspec) if kspec in SEPARATE_FORMS else 0
    layout = ("BSH", "BSND", "BNSD")[(i + sq + (pool_dim or 0)) % 3]
    for offsets in (True, False):
        antiquant_case(op, layout, sq, kspec, vspec, pool_dim=pool_dim, offsets=offsets, seed=10 * i + sq)


# stacked: (2, Nkv, 1, D), (2, Nkv, D), (2, H), (2,), (2, 1), (2, B, KV_S)
_COMBINED = [(0, "N1D"), (0, "ND"), (0, "H"), (0, "t0"), (0, "t1"), (1, "BS")]


@pytest.mark.parametrize("op", [FIA, IFA], ids=["fia", "ifa"])
@pytest.mark.parametrize("pool_dim", [None, 3, 4])
@pytest.mark.parametrize("spec", _COMBINED, ids=[f"{m}{f}" for m, f in _COMBINED])
def test_combined_antiquant_equals_dequantise_by_hand(op, pool_dim, spec):
    if op is IFA and spec[0] == 1:
        pytest.skip("IFA has no antiquant_mode: per channel / per tensor only")
    for j, layout in enumerate(("BSH", "BSND", "BNSD")):
        for sq in ((1,) if op is IFA else (1, 3)):
            antiquant_case(op, layout, sq, spec, spec, pool_dim=pool_dim, offsets=j != 1, seed=7 * j + sq,
                           combined=True)


def test_fp16_query_with_int8_kv():
    """fp16 query, int8 KV, fp16 scales: output fp16 == the float reference on the by-hand dequantised K/V."""
    B, Nq, Nkv, S, D = 2, 2, 1, 5, 8
    q = rnd(B, Nq, 1, D, seed=1).to(F16)
    k8, v8 = rint8(B, Nkv, S, D, seed=2), rint8(B, Nkv, S, D, seed=3)
    sc = runif(0.01, 0.05, 2, Nkv, D, seed=4).to(F16)
    off = runif(-2, 2, 2, Nkv, D, seed=5).to(F16)
    kf = (k8.to(F64) + off[0].to(F64).view(1, Nkv, 1, D)) * sc[0].to(F64).view(1, Nkv, 1, D)
    vf = (v8.to(F64) + off[1].to(F64).view(1, Nkv, 1, D)) * sc[1].to(F64).view(1, Nkv, 1, D)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout="BSND")
    got = IFA(to_layout(q, "BSND"), to_layout(k8, "BSND"), to_layout(v8, "BSND"), antiquant_scale=sc,
              antiquant_offset=off, **kw)
    want = IFA(to_layout(q, "BSND"), to_layout(kf, "BSND"), to_layout(vf, "BSND"), **kw)
    assert got.dtype == F16
    same(got, want)


@pytest.mark.parametrize("kmode,form", [(0, "ND"), (1, "BS"), (3, "BNS")])
def test_antiquant_with_left_padding_uses_absolute_positions(kmode, form):
    """With kv_padding_size the per-token scales are indexed by the tensor's S position."""
    B, Nq, Nkv, S, D, pad = 2, 2, 2, 10, 4, 2
    lens = [5, 8]
    q = rnd(B, Nq, 1, D, seed=1)
    k8, v8 = rint8(B, Nkv, S, D, seed=2), rint8(B, Nkv, S, D, seed=3)
    dims = dict(B=B, Nkv=Nkv, D=D, kv_s=S, blocknum=1, bs=1)
    ks, vs = (make_param(kmode, form, lo=0.01, hi=0.1, seed=s, **dims) for s in (4, 5))
    ko, vo = (make_param(kmode, form, lo=-3, hi=3, seed=s, **dims) for s in (6, 7))
    kf = (k8.to(F64) + expand(kmode, ko, B=B, Nkv=Nkv, S=S, D=D)) * expand(kmode, ks, B=B, Nkv=Nkv, S=S, D=D)
    vf = (v8.to(F64) + expand(kmode, vo, B=B, Nkv=Nkv, S=S, D=D)) * expand(kmode, vs, B=B, Nkv=Nkv, S=S, D=D)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", actual_seq_lengths_kv=lens,
              kv_padding_size=torch.tensor([pad]))
    got, _ = FIA(q, k8, v8, key_antiquant_scale=ks, key_antiquant_offset=ko, value_antiquant_scale=vs,
                 value_antiquant_offset=vo, key_antiquant_mode=kmode, value_antiquant_mode=kmode, **kw)
    want, _ = FIA(q, kf, vf, **kw)
    same(got, want)
    # the window [S - pad - len, S - pad) really is what is read: shifting the scales changes the result
    got2, _ = FIA(q, k8, v8, key_antiquant_scale=ks.roll(1, -1), key_antiquant_offset=ko, value_antiquant_scale=vs,
                  value_antiquant_offset=vo, key_antiquant_mode=kmode, value_antiquant_mode=kmode, **kw)
    if kmode != 0:
        assert not torch.equal(got2, got)


def test_antiquant_tnd_paged_per_token_and_tnd_per_channel():
    """TND queries: per-token scales with block_table (per batch, logical position); per-channel without."""
    Nq, Nkv, D, bs, blocknum = 2, 1, 4, 4, 6
    qlens, kvlens = [2, 3], [5, 7]
    B = len(qlens)
    q_tnd = rnd(sum(qlens), Nq, D, seed=1)
    k8, v8 = rint8(B, Nkv, 8, D, seed=2), rint8(B, Nkv, 8, D, seed=3)
    k3, _, table = paged(k8, kvlens, bs, blocknum, 4, rint8(blocknum, Nkv, bs, D, seed=5))
    v3, _, _ = paged(v8, kvlens, bs, blocknum, 4, rint8(blocknum, Nkv, bs, D, seed=6))
    ks, vs = runif(0.01, 0.1, B, 8, seed=7), runif(0.01, 0.1, B, 8, seed=8)
    kf = k8.to(F64) * expand(1, ks, B=B, Nkv=Nkv, S=8, D=D, lens=kvlens)
    vf = v8.to(F64) * expand(1, vs, B=B, Nkv=Nkv, S=8, D=D, lens=kvlens)
    kf3, _, _ = paged(kf, kvlens, bs, blocknum, 4, torch.full((blocknum, Nkv, bs, D), NAN, dtype=F64))
    vf3, _, _ = paged(vf, kvlens, bs, blocknum, 4, torch.full((blocknum, Nkv, bs, D), NAN, dtype=F64))
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout="TND", actual_seq_lengths=[2, 5],
              actual_seq_lengths_kv=kvlens, block_table=table, block_size=bs, sparse_mode=0)
    got, _ = FIA(q_tnd, k3, v3, key_antiquant_scale=ks, value_antiquant_scale=vs, key_antiquant_mode=1,
                 value_antiquant_mode=1, **kw)
    want, _ = FIA(q_tnd, kf3, vf3, **kw)
    same(got, want)
    # contiguous TND: per channel works, per token needs a batched layout or block_table
    k_tnd, v_tnd = rint8(12, Nkv, D, seed=9), rint8(12, Nkv, D, seed=10)
    sc = runif(0.01, 0.1, Nkv, D, seed=11)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout="TND", actual_seq_lengths=[2, 5],
              actual_seq_lengths_kv=[5, 12])
    got, _ = FIA(q_tnd, k_tnd, v_tnd, key_antiquant_scale=sc, value_antiquant_scale=sc, **kw)
    want, _ = FIA(q_tnd, k_tnd.to(F64) * sc, v_tnd.to(F64) * sc, **kw)
    same(got, want)
    with pytest.raises(ValueError):
        FIA(q_tnd, k_tnd, v_tnd, key_antiquant_scale=runif(0.01, 0.1, B, 12), value_antiquant_scale=runif(
            0.01, 0.1, B, 12), key_antiquant_mode=1, value_antiquant_mode=1, **kw)


def test_separate_antiquant_wins_over_combined():
    B, Nq, Nkv, S, D = 1, 2, 2, 6, 4
    q = rnd(B, Nq, 1, D, seed=1)
    k8, v8 = rint8(B, Nkv, S, D, seed=2), rint8(B, Nkv, S, D, seed=3)
    sep = dict(key_antiquant_scale=runif(0.01, 0.1, Nkv, D, seed=4), value_antiquant_scale=runif(
        0.01, 0.1, Nkv, D, seed=5))
    kw = dict(num_heads=Nq, input_layout="BNSD")
    got, _ = FIA(q, k8, v8, antiquant_scale=torch.full((2,), 7.0), antiquant_offset=torch.full((2,), 3.0),
                 antiquant_mode=0, **sep, **kw)
    want, _ = FIA(q, k8, v8, **sep, **kw)
    same(got, want)


# ------------------------------------------------------------------------------------------------
# Paged per-token modes 4/5 == modes 1/3 with the same values
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool_dim", [3, 4])
@pytest.mark.parametrize("op", [FIA, FIA2], ids=["fia", "fia2"])
@pytest.mark.parametrize("sq", [1, 2])
def test_paged_per_token_modes_4_5_equal_modes_1_3(pool_dim, op, sq):
    B, Nq, Nkv, S, D, bs, blocknum = 3, 4, 2, 11, 4, 3, 12
    lens = [11, 4, 7]
    q = rnd(B, Nq, sq, D, seed=1)
    k8, v8 = rint8(B, Nkv, S, D, seed=2), rint8(B, Nkv, S, D, seed=3)
    k3, k4, table = paged(k8, lens, bs, blocknum, 4, rint8(blocknum, Nkv, bs, D, seed=5))
    v3, v4, _ = paged(v8, lens, bs, blocknum, 4, rint8(blocknum, Nkv, bs, D, seed=6))
    key, value = (k3, v3) if pool_dim == 3 else (k4, v4)
    W = table.shape[1]
    for per_head in (False, True):
        logical = [runif(0.01, 0.1, B, Nkv, W * bs, seed=s) for s in (7, 8)]  # scale_k, scale_v [b, n, s]
        logical += [runif(-3, 3, B, Nkv, W * bs, seed=s) for s in (9, 10)]  # offset_k, offset_v
        if not per_head:
            logical = [t[:, :1] for t in logical]  # one value for all heads
        physical = []  # the same values stored by physical block / offset, NaN where no token lives
        for t in logical:
            p = torch.full((blocknum, t.shape[1], bs), NAN, dtype=F64)
            for b, n in enumerate(lens):
                for s in range(n):
                    p[table[b, s // bs], :, s % bs] = t[b, :, s]
            physical.append(p)
        if per_head:
            m_log, m_phys = 3, 5
        else:
            m_log, m_phys = 1, 4
            logical = [t[:, 0] for t in logical]  # (B, KV_S)
            physical = [t[:, 0] for t in physical]  # (blocknum, block_size)

        def run(params, mode):
            ks, vs, ko, vo = params
            if op is FIA2:
                return FIA2(to_layout(q, "BSH"), key, value, dequant_scale_key=ks, dequant_scale_value=vs,
                            dequant_offset_key=ko, dequant_offset_value=vo, key_quant_mode=mode,
                            value_quant_mode=mode, num_query_heads=Nq, num_key_value_heads=Nkv,
                            input_layout="BSH", actual_seq_kvlen=lens, block_table=table, block_size=bs)[0]
            return FIA(to_layout(q, "BSH"), key, value, key_antiquant_scale=ks, value_antiquant_scale=vs,
                       key_antiquant_offset=ko, value_antiquant_offset=vo, key_antiquant_mode=mode,
                       value_antiquant_mode=mode, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BSH",
                       actual_seq_lengths_kv=lens, block_table=table, block_size=bs)[0]

        a, b_ = run(logical, m_log), run(physical, m_phys)
        assert not torch.isnan(a).any()
        same(a, b_)


# ------------------------------------------------------------------------------------------------
# Full int8 pipeline
# ------------------------------------------------------------------------------------------------
def f32_trunc19(x):
    """The value an npu_trans_quant_param word carries: the float32 bits & 0xFFFFE000 (numpy bit view)."""
    bits = np.array([x], dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)
    return float(bits.view(np.float32)[0])


def hand_int8(q, k, v, ds1, qs1, ds2, scale, pse=None, masked=None):
    """The documented full-int8 formula as a scalar loop over canonical [B, N, S, D] integer tensors:
    s = (q_i8·k_i8)·ds1·scale + pse; masked keys drop out; o = Σ_j exp(s_j - m)·v_j·qs1·ds2 / Σ_j exp(s_j - m)."""
    B, N, Sq, _ = q.shape
    Skv, Dv = k.shape[2], v.shape[3]
    out = torch.zeros(B, N, Sq, Dv, dtype=F64)
    for b in range(B):
        for n in range(N):
            for i in range(Sq):
                s = {}
                for j in range(Skv):
                    if masked is not None and masked[i, j]:
                        continue
                    dot = sum(int(q[b, n, i, d]) * int(k[b, n, j, d]) for d in range(q.shape[3]))
                    s[j] = dot * ds1 * scale + (0.0 if pse is None else float(pse[b, n, i, j]))
                m = max(s.values())
                l_ = sum(math.exp(x - m) for x in s.values())
                for d in range(Dv):
                    out[b, n, i, d] = sum(math.exp(x - m) * int(v[b, n, j, d]) for j, x in s.items()) * qs1 * ds2 / l_
    return out


@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD"])
def test_int8_pipeline_matches_hand_formula(layout):
    B, N, Sq, Skv, D = 2, 2, 3, 5, 8
    q8, k8, v8 = rint8(B, N, Sq, D, seed=1), rint8(B, N, Skv, D, seed=2), rint8(B, N, Skv, D, seed=3)
    ds1, qs1, ds2, scale = 0.0004, 120.0, 0.00003, 0.35
    pse = rnd(B, N, Sq, Skv, seed=4)
    masked = torch.tensor([[0, 1, 0, 0, 1], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    want = hand_int8(q8, k8, v8, ds1, qs1, ds2, scale, pse, masked)
    scales = [torch.tensor([x], dtype=F32) for x in (ds1, qs1, ds2)]
    kw = dict(num_heads=N, input_layout=layout, pse_shift=pse, atten_mask=masked, sparse_mode=1)
    got_fia, _ = FIA(to_layout(q8, layout), to_layout(k8, layout), to_layout(v8, layout), scale=scale,
                     dequant_scale1=scales[0], quant_scale1=scales[1], dequant_scale2=scales[2], **kw)
    got_pfa = PFA(to_layout(q8, layout), to_layout(k8, layout), to_layout(v8, layout), scale_value=scale,
                  deq_scale1=scales[0], quant_scale1=scales[1], deq_scale2=scales[2], **kw)
    assert got_fia.dtype == F16 and got_pfa.dtype == F16
    same(got_fia, got_pfa)
    # the scales are read as given (fp32 values), the output is fp16: within half an fp16 ulp of the hand value
    want_f32 = hand_int8(q8, k8, v8, *(float(s) for s in scales), scale, pse, masked)
    torch.testing.assert_close(got_fia.to(F64), to_layout(want_f32, layout), rtol=2 ** -11, atol=2 ** -24)
    torch.testing.assert_close(want_f32, want, rtol=1e-5, atol=1e-6)  # (sanity: fp32 scales ~ the decimals)


def test_int8_pipeline_int64_scales_are_fp19_truncated():
    B, N, Sq, Skv, D = 1, 2, 4, 6, 8
    q8, k8, v8 = rint8(B, N, Sq, D, seed=5), rint8(B, N, Skv, D, seed=6), rint8(B, N, Skv, D, seed=7)
    ds1, qs1, ds2 = 0.000123456, 101.3, 0.0000789  # not representable in 19 bits
    words = [TQP(torch.tensor([x], dtype=F32)) for x in (ds1, qs1, ds2)]
    assert all(w.dtype == torch.int64 for w in words)
    kw = dict(num_heads=N, input_layout="BNSD", scale=0.3)
    got, _ = FIA(q8, k8, v8, dequant_scale1=words[0], quant_scale1=words[1], dequant_scale2=words[2], **kw)
    trunc = [torch.tensor([f32_trunc19(x)], dtype=F32) for x in (ds1, qs1, ds2)]
    want, _ = FIA(q8, k8, v8, dequant_scale1=trunc[0], quant_scale1=trunc[1], dequant_scale2=trunc[2], **kw)
    same(got, want)
    torch.testing.assert_close(got.to(F64), hand_int8(q8, k8, v8, *(float(t) for t in trunc), 0.3),
                               rtol=2 ** -11, atol=2 ** -24)
    untrunc = [torch.tensor([x], dtype=F32) for x in (ds1, qs1, ds2)]
    other, _ = FIA(q8, k8, v8, dequant_scale1=untrunc[0], quant_scale1=untrunc[1], dequant_scale2=untrunc[2], **kw)
    assert not torch.equal(other, got)  # the truncation is visible
    # a word with a packed offset (bits 37-45) is refused
    with pytest.raises(ValueError):
        FIA(q8, k8, v8, dequant_scale1=TQP(torch.tensor([ds1]), torch.tensor([3.0])), quant_scale1=words[1],
            dequant_scale2=words[2], **kw)


def test_int8_pipeline_with_int8_output_exact():
    """One key per row: p = 1 and o = v_i8 · quant_scale1 · dequant_scale2 exactly (powers of two), so the int8
    output is predictable by hand: round half to even of fp16(fp16(o)·fp16(s)), saturated."""
    B, N, D = 1, 1, 6
    q8 = rint8(B, N, 2, D, seed=1)
    k8 = rint8(B, N, 1, D, seed=2)
    v8 = torch.tensor([[[[5, -5, 7, 100, -127, 1]]]], dtype=I8)
    one = dict(dequant_scale1=torch.tensor([0.01]), quant_scale1=torch.tensor([0.5]),
               dequant_scale2=torch.tensor([0.25]))  # o = v / 8 = 0.625, -0.625, 0.875, 12.5, -15.875, 0.125
    out, _ = FIA(q8, k8, v8, input_layout="BNSD", quant_scale2=torch.tensor([4.0]), **one)
    # y = o*4 = 2.5, -2.5, 3.5, 50, -63.5, 0.5 -> 2, -2, 4, 50, -64, 0 (ties to even)
    assert out.dtype == I8
    assert out[0, 0].tolist() == [[2, -2, 4, 50, -64, 0]] * 2
    out, _ = FIA(q8, k8, v8, input_layout="BNSD", quant_scale2=torch.tensor([16.0]),
                 quant_offset2=torch.tensor([1.0]), **one)
    # y = o*16 + 1 = 11, -9, 15, 201, -253, 3 -> saturated 11, -9, 15, 127, -128, 3
    assert out[0, 0].tolist() == [[11, -9, 15, 127, -128, 3]] * 2
    pfa = PFA(q8, k8, v8, input_layout="BNSD", quant_scale2=torch.tensor([16.0]), quant_offset2=torch.tensor([1.0]),
              deq_scale1=one["dequant_scale1"], quant_scale1=one["quant_scale1"], deq_scale2=one["dequant_scale2"],
              next_tokens=2147483647)
    same(pfa, out)


# ------------------------------------------------------------------------------------------------
# Output quantisation
# ------------------------------------------------------------------------------------------------
def one_key_problem(o_rows, nq):
    """A decode problem whose output rows are exactly o_rows [B, Nq, Dv] (one key, p = 1): returns q, k, v in BNSD."""
    B, _, Dv = o_rows.shape
    q = rnd(B, nq, 1, 4, seed=1)
    k = rnd(B, 1, 1, 4, seed=2)
    v = torch.as_tensor(o_rows, dtype=F64).reshape(B, nq, 1, Dv)
    return q, k.expand(B, nq, 1, 4).contiguous(), v


def numpy_quant(o, scale, offset, nq, dv):
    """The formula of docs/inference.md written with numpy scalars (numpy's own float16 / float32 rounding).
    o float64 [..., Nq, Dv] (the rows, in this shape); scale/offset: 1 or Nq*Dv values."""
    o32 = np.asarray(o, dtype=np.float64).astype(np.float32)
    s = np.asarray(scale, dtype=np.float64).astype(np.float32).reshape(-1)
    off = np.zeros_like(s) if offset is None else np.asarray(offset, dtype=np.float64).astype(np.float32).reshape(-1)
    if s.size == 1:
        o16 = o32.astype(np.float16).astype(np.float64)
        prod = (o16 * np.float64(np.float16(s[0]))).astype(np.float16)  # fp16 product, rounded once
        y = (prod.astype(np.float64) + np.float64(np.float16(off[0]))).astype(np.float16)  # fp16 sum, rounded once
    else:
        t = o32 * s.reshape(nq, dv)  # float32 multiply
        t = t + off.reshape(nq, dv)  # float32 add
        y = t.astype(np.float16)
    with np.errstate(invalid="ignore"):
        r = np.clip(np.rint(y.astype(np.float64)), -128, 127)
    return torch.from_numpy(np.nan_to_num(r, nan=0.0).astype(np.int8))


def test_output_quant_per_tensor_hand_examples():
    """Ties to even, the fp16 step, saturation at 127 / -128 and an fp16 overflow, computed by hand."""
    o = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, 128.0, 300.0, -128.5, -129.0, -1000.0, 70000.0,
         3.4, 2.5 + 2 ** -12]
    want = [0, 2, 2, 0, -2, -2, 126, 127, 127, 127, -128, -128, -128, 127,
            3, 2]  # 2.5 + 2**-12 is 2.5 in fp16 -> 2 (a plain round of the fp32 value would give 3)
    q, k, v = one_key_problem(torch.tensor(o).view(1, 1, -1), 1)
    out = IFA(q, k, v, input_layout="BNSD", quant_scale2=torch.tensor([1.0]))
    assert out.dtype == I8 and out.reshape(-1).tolist() == want
    # with a scale and an offset: y = fp16(fp16(o·s) + off)
    o = [1.0, 1.0, 0.75, -0.75, 10.0, 0.1]
    s, off = 2.5, -0.5  # o·s = 2.5, 2.5, 1.875, -1.875, 25, 0.25 ; + off = 2, 2, 1.375, -2.375, 24.5, -0.25
    q, k, v = one_key_problem(torch.tensor(o).view(1, 1, -1), 1)
    out = IFA(q, k, v, input_layout="BNSD", quant_scale2=torch.tensor([s]), quant_offset2=torch.tensor([off]))
    assert out.reshape(-1).tolist() == [2, 2, 1, -2, 24, 0]
    # fp16(scale): 1/3 -> 0.333251953125; 7.5 · that = 2.4993896484375 -> fp16 2.5 -> 2
    q, k, v = one_key_problem(torch.tensor([7.5]).view(1, 1, 1), 1)
    assert IFA(q, k, v, input_layout="BNSD", quant_scale2=torch.tensor([1 / 3])).item() == 2
    # fp16(o) first: fp16(37.15) = 37.15625; · 3 = 111.46875, an fp16 tie -> 111.5 -> 112.
    # (Without that step: 111.45 -> fp16 111.4375 -> 111, which is what the per-channel fp32 formula gives.)
    q, k, v = one_key_problem(torch.tensor([37.15, 37.15]).view(1, 1, 2), 1)
    assert IFA(q, k, v, input_layout="BNSD", quant_scale2=torch.tensor([3.0])).reshape(-1).tolist() == [112, 112]
    assert IFA(q, k, v, input_layout="BNSD", quant_scale2=torch.tensor([3.0, 3.0])).reshape(-1).tolist() == [111, 111]


def test_output_quant_per_channel_hand_examples():
    """Channel c = n·Dv + d; y = fp16(fp32(o·s[c]) + off[c]) then ties to even and saturation."""
    nq, dv = 2, 3
    o = torch.tensor([[[1.0, 1.0, 1.0], [0.25, -3.0, 100.0]]])  # [B=1, Nq, Dv]
    s = torch.tensor([2.5, 3.5, 0.5, 2.0, 0.5, 2.0])  # per channel
    off = torch.tensor([0.0, 0.0, 0.0, 0.0, -0.5, -73.0])
    # o·s + off = 2.5, 3.5, 0.5 | 0.5, -2.0, 127 ; with o[1,1] = -3: -1.5 - 0.5 = -2 ; 200 - 73 = 127
    q, k, v = one_key_problem(o, nq)
    for shape in [(6,), (1, 6), (nq, dv), (1, nq, 1, dv), (1, 1, nq, dv)]:  # any shape with Nq·Dv elements
        out = IFA(q, k, v, num_heads=nq, input_layout="BNSD", quant_scale2=s.reshape(shape),
                  quant_offset2=off.reshape(shape))
        assert out.reshape(-1).tolist() == [2, 4, 0, 0, -2, 127]
    out = IFA(q, k, v, num_heads=nq, input_layout="BNSD", quant_scale2=s * 100)
    assert out.reshape(-1).tolist() == [127, 127, 50, 50, -128, 127]


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD", "BNSD_NBSD", "BSH_BNSD"])
def test_output_quant_matches_numpy_formula(per_channel, layout):
    """Random rows near ties: the int8 output equals the numpy formulation on the float32 rows, in any layout."""
    B, Nq, Dv = 3, 2, 8
    g = torch.Generator().manual_seed(3)
    o = (torch.randint(-400, 400, (B, Nq, Dv), generator=g) / 2 + torch.randn(B, Nq, Dv, generator=g,
                                                                               dtype=F64) * 1e-3)
    n = Nq * Dv if per_channel else 1
    s = runif(0.2, 0.9, n, seed=4).to(F32)
    off = runif(-5, 5, n, seed=5).to(F32)
    q, k, v = one_key_problem(o, Nq)
    kw = dict(num_heads=Nq, scale=0.5)
    in_kind = layout.split("_")[0]
    got, _ = FIA(to_layout(q, in_kind), to_layout(k, in_kind), to_layout(v, in_kind), input_layout=layout,
                 quant_scale2=s, quant_offset2=off, **kw)
    want = numpy_quant(o.to(F32).to(F64), s, off, Nq, Dv)  # [B, Nq, Dv]
    canon = want.view(B, Nq, 1, Dv)
    out_kind = layout.split("_")[-1] if "_" in layout else layout
    expect = {"BSH": to_layout(canon, "BSH"), "BSND": to_layout(canon, "BSND"), "BNSD": canon,
              "NBSD": canon.permute(1, 0, 2, 3)}[out_kind]
    same(got, expect.contiguous())


@pytest.mark.parametrize("per_channel", [False, True])
def test_output_quant_random_attention_vs_numpy(per_channel):
    """A real attention (many keys): int8 output == the numpy formula applied to the float32 value of the float
    reference's output (the same float64 rows)."""
    B, Nq, Nkv, Sq, Skv, D = 2, 4, 2, 3, 7, 8
    q, k, v = rnd(B, Nq, Sq, D, seed=1), rnd(B, Nkv, Skv, D, seed=2), rnd(B, Nkv, Skv, D, seed=3) * 60
    n = Nq * D if per_channel else 1
    s, off = runif(0.5, 2.0, n, seed=4).to(F32), runif(-3, 3, n, seed=5).to(F32)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", scale=0.3)
    fo, _ = FIA(q, k, v, **kw)
    got, _ = FIA(q, k, v, quant_scale2=s, quant_offset2=off, **kw)
    want = numpy_quant(fo.permute(0, 2, 1, 3), s, off, Nq, D).permute(0, 2, 1, 3)
    same(got, want.contiguous())
    # v2 names
    got2, _ = FIA2(q, k, v, num_query_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", softmax_scale=0.3,
                   quant_scale_out=s, quant_offset_out=off)
    same(got2, got)


def test_output_quant_rows_without_keys_are_zero():
    """Rows that see no key, and rows outside the valid query window, are int8 0 (not quantise(0) = offset)."""
    B, N, Sq, Skv, D = 2, 2, 4, 5, 4
    q, k, v = rnd(B, N, Sq, D, seed=1), rnd(B, N, Skv, D, seed=2), rnd(B, N, Skv, D, seed=3)
    off = torch.tensor([9.0])
    # PFA: batch 0 has 2 valid query rows, batch 1 has no KV at all
    out = PFA(q, k, v, num_heads=N, input_layout="BNSD", actual_seq_lengths=[2, 4], actual_seq_lengths_kv=[5, 0],
              quant_scale2=torch.tensor([1.0]), quant_offset2=off, next_tokens=2147483647)
    assert (out[0, :, 2:] == 0).all() and (out[1] == 0).all()
    assert (out[0, :, :2] != 0).any()
    # a fully masked row (FIA, explicit mask)
    mask = torch.zeros(Sq, Skv, dtype=torch.bool)
    mask[1] = True
    out, _ = FIA(q, k, v, num_heads=N, input_layout="BNSD", atten_mask=mask, quant_scale2=torch.tensor([1.0]),
                 quant_offset2=off)
    assert (out[:, :, 1] == 0).all() and (out[:, :, 0] != 0).any()
    # decode: a batch whose left-padded KV window starts before 0 (IFA)
    out = IFA(q[:, :, :1], k, v, num_heads=N, input_layout="BNSD", actual_seq_lengths=[3, 5],
              kv_padding_size=torch.tensor([1]), quant_scale2=torch.full((N * D,), 0.5), quant_offset2=torch.full(
                  (N * D,), 20.0))
    assert (out[1] == 0).all() and (out[0] != 0).all()


def test_fp16_rounding_helper_is_correctly_rounded():
    """_to_fp16 (used by the per-tensor formula) == numpy's direct float64 -> float16 conversion, on every fp16
    value, every midpoint (ties) and their neighbours, and the overflow threshold."""
    h = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(F16).to(F64)
    mid = (h[:-1] + h[1:]) / 2
    x = torch.cat([h, mid, mid * (1 + 1e-12), mid * (1 - 1e-12), torch.tensor([65519.99, 65520.0, 1e10, 2.0 ** -26],
                                                                               dtype=F64)])
    x = torch.cat([x, -x])
    got = ref._to_fp16(x)
    with np.errstate(over="ignore"):
        want = torch.from_numpy(x.numpy().astype(np.float16))
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


# ------------------------------------------------------------------------------------------------
# npu_trans_quant_param
# ------------------------------------------------------------------------------------------------
def test_trans_quant_param_bit_patterns():
    assert "npu_trans_quant_param" in ref.__all__
    s = torch.tensor([1.0, 0.1, -2.0, 1.0 + 2 ** -11, 1.0 + 2 ** -11 + 2 ** -20, 3.0e-5], dtype=F32)
    # fp32 bits: 3F800000, 3DCCCCCD, C0000000, 3F801000 (exactly half of the dropped bits), 3F801008, 37FBA882
    words = TQP(s)
    assert words.dtype == torch.int64 and words.shape == (6,)
    assert words.tolist() == [FLAG46 | 0x3F800000, FLAG46 | 0x3DCCC000, FLAG46 | 0xC0000000, FLAG46 | 0x3F800000,
                              FLAG46 | 0x3F800000, FLAG46 | 0x37FBA000]
    # round_mode 1: the dropped 13 bits are rounded (+0x1000): ...1000 -> up, ...1008 -> up, CCCD -> down
    assert TQP(s, round_mode=1).tolist() == [FLAG46 | 0x3F800000, FLAG46 | 0x3DCCC000, FLAG46 | 0xC0000000,
                                             FLAG46 | 0x3F802000, FLAG46 | 0x3F802000, FLAG46 | 0x37FBA000]
    # offsets: round half away from zero, clamp to [-256, 255], 9 bits in 37-45; scale (1,) broadcasts
    off = torch.tensor([3.5, -1.5, 300.0, -300.0, 0.49, -0.5, 2.5, 0.0])
    w = TQP(torch.tensor([1.0]), off)
    assert w.shape == (8,)
    want_off = [4, -2 & 0x1FF, 255, 0x100, 0, 0x1FF, 3, 0]
    assert w.tolist() == [FLAG46 | (o << 37) | 0x3F800000 for o in want_off]
    # 2-D scale, fp16 input (read as fp32)
    w2 = TQP(torch.tensor([[0.5, 0.25]], dtype=F16))
    assert w2.shape == (1, 2) and w2.tolist() == [[FLAG46 | 0x3F000000, FLAG46 | 0x3E800000]]
    with pytest.raises(ValueError):
        TQP(s, round_mode=2)


def test_trans_quant_param_decodes_back():
    """The int8 pipeline reads a word as bitcast<float32>((u & 0xFFFFFFFF) & 0xFFFFE000)."""
    for x in (0.1, 3.0e-5, 123.456, 1.0):
        w = TQP(torch.tensor([x]))
        assert ref._quant_scalar(w, "op", "s") == f32_trunc19(x)
    assert ref._quant_scalar(torch.tensor([0.1], dtype=F32), "op", "s") == float(torch.tensor(0.1, dtype=F32))
    # a word whose low 13 bits are set (not made by npu_trans_quant_param): they are dropped; bits above 31 other
    # than the offset field are ignored
    bits_01 = int(np.array([0.1], dtype=np.float32).view(np.uint32)[0])  # 0x3DCCCCCD
    assert ref._quant_scalar(torch.tensor([bits_01]), "op", "s") == f32_trunc19(0.1)
    assert ref._quant_scalar(torch.tensor([FLAG46 | (1 << 33) | bits_01]), "op", "s") == f32_trunc19(0.1)
    assert f32_trunc19(0.1) != float(torch.tensor(0.1, dtype=F32))


# ------------------------------------------------------------------------------------------------
# Combination rules (ValueError)
# ------------------------------------------------------------------------------------------------
def _err_cases():
    B, N, S, D = 1, 2, 4, 8
    q, k = rnd(B, N, S, D, seed=1), rnd(B, N, S, D, seed=2)
    q1 = q[:, :, :1].contiguous()
    q8, k8 = rint8(B, N, S, D, seed=3), rint8(B, N, S, D, seed=4)
    one = torch.tensor([0.5])
    full = dict(dequant_scale1=one, quant_scale1=one, dequant_scale2=one)
    kw = dict(num_heads=N, input_layout="BNSD")
    ch = torch.ones(N, D)
    band = torch.zeros(S, S, dtype=torch.bool)
    return {
        "int8 query without the scales": lambda: FIA(q8, k8, k8, dequant_scale1=one, quant_scale1=one, **kw),
        "int8 query, float kv": lambda: FIA(q8, k, k, **full, **kw),
        "float query with dequant_scale1": lambda: FIA(q, k, k, dequant_scale1=one, **kw),
        "PFA float query with deq_scale2": lambda: PFA(q, k, k, deq_scale2=one, **kw),
        "IFA with dequant_scale1": lambda: IFA(q1, k, k, dequant_scale1=one, **kw),
        "IFA int8 query": lambda: IFA(q8[:, :, :1], k8, k8, **kw),
        "v2 dequant_scale_query": lambda: FIA2(q, k, k, dequant_scale_query=one, num_query_heads=N,
                                               input_layout="BNSD"),
        "v2 int8 query": lambda: FIA2(q8, k8, k8, num_query_heads=N, input_layout="BNSD"),
        "int4 kv": lambda: FIA(q1, k8.to(torch.int32), k8.to(torch.int32), key_antiquant_scale=ch,
                               value_antiquant_scale=ch, **kw),
        "packed offset": lambda: PFA(q8, k8, k8, deq_scale1=TQP(one, torch.tensor([2.0])), quant_scale1=one,
                                     deq_scale2=one, **kw),
        "quant_offset2 without quant_scale2": lambda: FIA(q, k, k, quant_offset2=one, **kw),
        "quant_scale2 wrong size": lambda: FIA(q, k, k, quant_scale2=torch.ones(3), **kw),
        "int8 output with negative next": lambda: FIA(q, k, k, atten_mask=band, next_tokens=-1, pre_tokens=10,
                                                      quant_scale2=one, **kw),
        "int8 output with negative pre (mode 4)": lambda: FIA(q, k, k, atten_mask=torch.ones(2048, 2048,
                                                                                             dtype=torch.bool).triu(1),
                                                              sparse_mode=4, pre_tokens=-1, next_tokens=3,
                                                              quant_scale2=one, **kw),
        "int8 kv without scales": lambda: FIA(q1, k8, k8, **kw),
        "antiquant on float kv": lambda: FIA(q1, k, k, key_antiquant_scale=ch, value_antiquant_scale=ch, **kw),
        "key scale without value scale": lambda: FIA(q1, k8, k8, key_antiquant_scale=ch, **kw),
        "key offset without value offset": lambda: FIA(q1, k8, k8, key_antiquant_scale=ch, value_antiquant_scale=ch,
                                                       key_antiquant_offset=ch, **kw),
        "offset without scale (combined)": lambda: IFA(q1, k8, k8, antiquant_offset=torch.ones(2), **kw),
        "modes differ (1, 0)": lambda: FIA(q1, k8, k8, key_antiquant_scale=torch.ones(B, S),
                                           value_antiquant_scale=ch, key_antiquant_mode=1, value_antiquant_mode=0,
                                           **kw),
        "modes differ (2, 3)": lambda: FIA(q1, k8, k8, key_antiquant_scale=torch.ones(N),
                                           value_antiquant_scale=torch.ones(B, N, S), key_antiquant_mode=2,
                                           value_antiquant_mode=3, **kw),
        "mode 6": lambda: FIA(q1, k8, k8, key_antiquant_scale=ch, value_antiquant_scale=ch, key_antiquant_mode=6,
                              value_antiquant_mode=6, **kw),
        "mode 4 without block_table": lambda: FIA(q1, k8, k8, key_antiquant_scale=torch.ones(3, 4),
                                                  value_antiquant_scale=torch.ones(3, 4), key_antiquant_mode=4,
                                                  value_antiquant_mode=4, **kw),
        "per-channel shape wrong": lambda: FIA(q1, k8, k8, key_antiquant_scale=torch.ones(N, D + 1),
                                               value_antiquant_scale=torch.ones(N, D + 1), **kw),
        "per-token too short": lambda: FIA(q1, k8, k8, key_antiquant_scale=torch.ones(B, S - 1),
                                           value_antiquant_scale=torch.ones(B, S - 1), key_antiquant_mode=1,
                                           value_antiquant_mode=1, **kw),
        "offset form differs from scale": lambda: FIA(q1, k8, k8, key_antiquant_scale=ch, value_antiquant_scale=ch,
                                                      key_antiquant_offset=torch.ones(1),
                                                      value_antiquant_offset=torch.ones(1), **kw),
        "combined first axis not 2": lambda: IFA(q1, k8, k8, antiquant_scale=torch.ones(3, N, D), **kw),
        "combined antiquant_mode 2": lambda: FIA(q1, k8, k8, antiquant_scale=torch.ones(2, N, D), antiquant_mode=2,
                                                 **kw),
        "antiquant with shared prefix": lambda: FIA(q, k8, k8, key_antiquant_scale=ch, value_antiquant_scale=ch,
                                                    key_shared_prefix=k8, value_shared_prefix=k8, **kw),
        "key int8, value float": lambda: FIA(q1, k8, k, key_antiquant_scale=ch, value_antiquant_scale=ch, **kw),
        "trans_quant_param round_mode": lambda: TQP(one, round_mode=3),
    }


@pytest.mark.parametrize("name", list(_err_cases()))
def test_combination_rules(name):
    with pytest.raises(ValueError):
        _err_cases()[name]()


# ------------------------------------------------------------------------------------------------
# The comparisons can fail
# ------------------------------------------------------------------------------------------------
def test_checks_detect_wrong_answers():
    """Each comparison used above tells a wrong formula from the right one on the same data."""
    # antiquant: a by-hand dequantisation with (k - offset) or k·scale + offset differs
    B, Nq, Nkv, S, D = 1, 2, 1, 6, 4
    q = rnd(B, Nq, 1, D, seed=1)
    k8, v8 = rint8(B, Nkv, S, D, seed=2), rint8(B, Nkv, S, D, seed=3)
    sc, off = runif(0.01, 0.1, 2, Nkv, D, seed=4), runif(-3, 3, 2, Nkv, D, seed=5)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout="BSND")
    got = IFA(to_layout(q, "BSND"), to_layout(k8, "BSND"), to_layout(v8, "BSND"), antiquant_scale=sc,
              antiquant_offset=off, **kw)
    sck, offk = sc[0].view(1, Nkv, 1, D), off[0].view(1, Nkv, 1, D)
    scv, offv = sc[1].view(1, Nkv, 1, D), off[1].view(1, Nkv, 1, D)
    for kf, vf in [((k8 - offk) * sck, (v8 + offv) * scv), (k8 * sck + offk, (v8 + offv) * scv),
                   ((k8 + offk) * sck, (v8 + offk) * sck)]:
        wrong = IFA(to_layout(q, "BSND"), to_layout(kf.to(F64), "BSND"), to_layout(vf.to(F64), "BSND"), **kw)
        with pytest.raises(AssertionError):
            same(got, wrong)
    right = IFA(to_layout(q, "BSND"), to_layout((k8 + offk) * sck, "BSND"), to_layout((v8 + offv) * scv, "BSND"),
                **kw)
    same(got, right)

    # paged mode 4: scales placed by a wrong block mapping differ from mode 1
    lens, bs, blocknum = [6], 2, 5
    k3, _, table = paged(k8, lens, bs, blocknum, 1, rint8(blocknum, Nkv, bs, D, seed=6))
    v3, _, _ = paged(v8, lens, bs, blocknum, 1, rint8(blocknum, Nkv, bs, D, seed=7))
    tok = runif(0.01, 0.1, 1, 6, seed=8)
    phys_right = torch.full((blocknum, bs), NAN, dtype=F64)
    phys_wrong = torch.full((blocknum, bs), NAN, dtype=F64)
    for s in range(6):
        phys_right[table[0, s // bs], s % bs] = tok[0, s]
        phys_wrong[table[0, s // bs], (s + 1) % bs] = tok[0, s]  # offsets swapped within each block
    pkw = dict(block_table=table, block_size=bs, actual_seq_lengths_kv=lens, input_layout="BSH", num_heads=Nq,
               num_key_value_heads=Nkv)
    qb = to_layout(q, "BSH")

    def mode(m, t):
        return FIA(qb, k3, v3, key_antiquant_scale=t, value_antiquant_scale=t, key_antiquant_mode=m,
                   value_antiquant_mode=m, **pkw)[0]

    same(mode(1, tok), mode(4, phys_right))
    with pytest.raises(AssertionError):
        same(mode(1, tok), mode(4, phys_wrong))

    # int8 pipeline: the hand formula with quantised probabilities (round(p·quant_scale1), the NPU's P_i8) differs
    q8, kk8, vv8 = rint8(1, 1, 3, 8, seed=9), rint8(1, 1, 4, 8, seed=10), rint8(1, 1, 4, 8, seed=11)
    one = dict(dequant_scale1=torch.tensor([0.002]), quant_scale1=torch.tensor([127.0]),
               dequant_scale2=torch.tensor([0.01]))
    got8, _ = FIA(q8, kk8, vv8, input_layout="BNSD", **one)
    s = (q8[0, 0].to(F64) @ kk8[0, 0].to(F64).T) * 0.002
    p = torch.softmax(s, dim=-1)
    p_i8 = torch.round(torch.exp(s - s.max(-1, keepdim=True).values) * 127)
    wrong8 = (p_i8 @ vv8[0, 0].to(F64)) * 0.01 / torch.exp(s - s.max(-1, keepdim=True).values).sum(-1, keepdim=True)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got8[0, 0].to(F64), wrong8, rtol=2 ** -11, atol=2 ** -24)
    torch.testing.assert_close(got8[0, 0].to(F64), (p @ vv8[0, 0].to(F64)) * 127 * 0.01, rtol=2 ** -11, atol=2 ** -24)

    # output quant: round half away from zero, or no fp16 step, gives other integers on the hand examples
    o = torch.tensor([0.5, 2.5, -2.5, 2.5 + 2 ** -12])
    qq, kk, vv = one_key_problem(o.view(1, 1, -1), 1)
    out = IFA(qq, kk, vv, input_layout="BNSD", quant_scale2=torch.tensor([1.0]))
    assert out.reshape(-1).tolist() == [0, 2, -2, 2]
    assert [int(math.copysign(math.floor(abs(x) + 0.5), x)) for x in o.tolist()] != out.reshape(-1).tolist()
    assert torch.round(o.to(F32).to(F64)).to(I8).tolist() != out.reshape(-1).tolist()  # (no fp16 step: 3 at the end)
