"""Self-tests of the float64 inference reference (python/npufa/reference_infer.py) on its own.

The reference is loaded by file path, so these tests do not need the compiled npufa package (and test the
file in the source tree, not an installed copy).  Every test compares the reference against an independent
formulation: a direct torch.softmax formula, an explicit mask, repeated KV heads, a contiguous cache, a
per-batch call, a concatenated prefix, right padding, another layout or another operator.
"""

import importlib.util
import math
import pathlib

import pytest
import torch
from attn_helpers import to_layout

_PATH = pathlib.Path(__file__).resolve().parents[2] / "python" / "npufa" / "reference_infer.py"
_spec = importlib.util.spec_from_file_location("npufa_reference_infer_under_test", _PATH)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)

F64 = torch.float64
FLT_MAX = 3.4028234663852886e38
NAN = float("nan")
TRIU2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)

PFA = ref.npu_prompt_flash_attention
IFA = ref.npu_incre_flash_attention
FIA = ref.npu_fused_infer_attention_score
FIA2 = ref.npu_fused_infer_attention_score_v2


def rnd(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def rbool(*shape, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g) < p


def direct(q, k, v, scale, masked=None, pse=None, sink=None):
    """Loop-free formula over BNSD tensors whose KV already has one head per query head.
    masked: True = masked (broadcastable). Every row must see at least one key."""
    s = q @ k.transpose(-1, -2) * scale
    if pse is not None:
        s = s + pse
    if masked is not None:
        s = s.masked_fill(masked, float("-inf"))
    if sink is not None:
        s = torch.cat([s, sink.to(F64).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    if sink is not None:
        p = p[..., :-1]
    return p @ v, lse


def close(a, b, tol=1e-10):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a.to(F64), b.to(F64), rtol=tol, atol=tol, equal_nan=False)


def lse_close(a, b):
    """softmax_lse is float32."""
    assert a.dtype == torch.float32
    torch.testing.assert_close(a.to(F64), b.to(F64), rtol=1e-6, atol=1e-6)


def band_mask(sq, skv, pre, nxt):
    """True = masked outside the left-up band (j - i <= next, i - j <= pre)."""
    i = torch.arange(sq).unsqueeze(1)
    j = torch.arange(skv).unsqueeze(0)
    return ((j - i) > nxt) | ((i - j) > pre)


# ------------------------------------------------------------------------------------------------
# Direct formula
# ------------------------------------------------------------------------------------------------
def test_hand_computed_1x3():
    q = torch.tensor([[[[1.0]]]], dtype=F64)  # [1,1,1,1]
    k = torch.tensor([[[[0.0], [1.0], [2.0]]]], dtype=F64)
    v = torch.tensor([[[[1.0], [2.0], [3.0]]]], dtype=F64)
    e = math.e
    out, lse = FIA(q, k, v, input_layout="BNSD", softmax_lse_flag=True)
    assert out.item() == pytest.approx((1 + 2 * e + 3 * e * e) / (1 + e + e * e), abs=1e-14)
    assert lse.item() == pytest.approx(math.log(1 + e + e * e), rel=1e-7)
    assert lse.shape == (1, 1, 1, 1) and lse.dtype == torch.float32


@pytest.mark.parametrize("sq", [1, 5])
def test_bnsd_no_mask_matches_softmax_formula(sq):
    B, N, Skv, D, Dv, scale = 2, 3, 7, 8, 6, 0.37
    q, k, v = rnd(B, N, sq, D, seed=1), rnd(B, N, Skv, D, seed=2), rnd(B, N, Skv, Dv, seed=3)
    want, want_lse = direct(q, k, v, scale)
    kw = dict(num_heads=N, input_layout="BNSD")
    out, lse = FIA(q, k, v, scale=scale, softmax_lse_flag=True, **kw)
    close(out, want)
    lse_close(lse, want_lse.unsqueeze(-1))
    out2, lse2 = FIA2(q, k, v, num_query_heads=N, softmax_scale=scale, input_layout="BNSD", return_softmax_lse=True)
    close(out2, want)
    lse_close(lse2, want_lse.unsqueeze(-1))
    close(PFA(q, k, v, scale_value=scale, next_tokens=2147483647, **kw), want)
    if sq == 1:
        close(IFA(q, k, v, scale_value=scale, **kw), want)


def test_pse_added_after_scale_and_lse_is_logsumexp():
    B, N, Sq, Skv, D, scale = 2, 2, 4, 6, 5, 0.5
    q, k, v = rnd(B, N, Sq, D, seed=1), rnd(B, N, Skv, D, seed=2), rnd(B, N, Skv, D, seed=3)
    pse = rnd(B, N, Sq, Skv, seed=4)
    m = rbool(B, 1, Sq, Skv, p=0.4, seed=5)
    m[..., 0] = False  # every row sees a key
    out, lse = FIA(q, k, v, pse_shift=pse, atten_mask=m, sparse_mode=1, num_heads=N, scale=scale,
                   input_layout="BNSD", softmax_lse_flag=True)
    s = (q @ k.transpose(-1, -2)) * scale + pse
    want_lse = torch.logsumexp(s.masked_fill(m, float("-inf")), dim=-1)
    lse_close(lse, want_lse.unsqueeze(-1))
    p = torch.exp(s - want_lse.unsqueeze(-1)).masked_fill(m, 0.0)
    close(out, p @ v)


def test_fully_masked_row_is_zero_with_min_lse():
    B, N, Sq, Skv, D = 1, 2, 3, 4, 4
    q, k, v = rnd(B, N, Sq, D, seed=1), rnd(B, N, Skv, D, seed=2), rnd(B, N, Skv, D, seed=3)
    m = torch.zeros(Sq, Skv, dtype=torch.bool)
    m[1] = True
    sink = torch.tensor([0.5, -1.0])
    for kw in (dict(), dict(learnable_sink=sink)):
        out, lse = FIA2(q, k, v, atten_mask=m, sparse_mode=1, num_query_heads=N, input_layout="BNSD",
                        return_softmax_lse=True, **kw)
        assert torch.all(out[:, :, 1] == 0)
        assert torch.all(lse[:, :, 1] == -FLT_MAX)
        assert torch.isfinite(out).all() and torch.all(out[:, :, 0] != 0)


def test_learnable_sink():
    B, N, Sq, Skv, D, scale = 2, 3, 4, 5, 6, 0.4
    q, k, v = rnd(B, N, Sq, D, seed=1), rnd(B, N, Skv, D, seed=2), rnd(B, N, Skv, D, seed=3)
    sink = rnd(N, seed=4).to(torch.bfloat16)
    want, want_lse = direct(q, k, v, scale, sink=sink)
    out, lse = FIA2(q, k, v, learnable_sink=sink, num_query_heads=N, softmax_scale=scale, input_layout="BNSD",
                    return_softmax_lse=True)
    close(out, want)
    lse_close(lse, want_lse.unsqueeze(-1))
    # the sink is unscaled: a different scale changes the result differently than without a sink
    plain, _ = direct(q, k, v, scale)
    assert (out - plain).abs().max() > 1e-3


def test_rope_is_concatenation_along_d():
    B, Nq, Nkv, Sq, Skv, D, Dr = 2, 4, 2, 3, 5, 6, 4
    q, k, v = rnd(B, Nq, Sq, D, seed=1), rnd(B, Nkv, Skv, D, seed=2), rnd(B, Nkv, Skv, D, seed=3)
    qr, kr = rnd(B, Nq, Sq, Dr, seed=4), rnd(B, Nkv, Skv, Dr, seed=5)
    for layout in ("BSH", "BNSD"):
        L = lambda x: to_layout(x, layout)  # noqa: E731
        kw = dict(num_heads=Nq, num_key_value_heads=Nkv, scale=0.3, input_layout=layout, softmax_lse_flag=True)
        out, lse = FIA(L(q), L(k), L(v), query_rope=L(qr), key_rope=L(kr), **kw)
        want, want_lse = FIA(L(torch.cat([q, qr], -1)), L(torch.cat([k, kr], -1)), L(v), **kw)
        close(out, want)
        close(lse, want_lse)


# ------------------------------------------------------------------------------------------------
# Sparse modes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sq,skv", [(5, 5), (3, 7), (7, 4)])
def test_sparse_modes_vs_explicit_masks(sq, skv):
    B, N, D = 2, 2, 4
    q, k, v = rnd(B, N, sq, D, seed=1), rnd(B, N, skv, D, seed=2), rnd(B, N, skv, D, seed=3)
    kw = dict(num_heads=N, input_layout="BNSD", softmax_lse_flag=True)

    def explicit(masked):
        return FIA(q, k, v, atten_mask=masked, sparse_mode=1, **kw)

    # mode 2: j > i
    close(FIA(q, k, v, atten_mask=TRIU2048, sparse_mode=2, **kw)[0],
          explicit(torch.triu(torch.ones(sq, skv, dtype=torch.bool), diagonal=1))[0])
    # mode 3: j > i + skv - sq (rows with no key when sq > skv: 0)
    m3 = torch.triu(torch.ones(sq, skv, dtype=torch.bool), diagonal=skv - sq + 1)
    o3, l3 = FIA(q, k, v, atten_mask=TRIU2048.view(1, 2048, 2048), sparse_mode=3, **kw)
    oe, le = explicit(m3)
    close(o3, oe)
    close(l3, le)
    if sq > skv:
        assert torch.all(o3[:, :, : sq - skv] == 0) and torch.all(l3[:, :, : sq - skv] == -FLT_MAX)
    # mode 4: band anchored bottom-right
    for pre, nxt in [(1, 0), (2, 1), (0, 2), (-1, 2), (3, -1)]:
        i = torch.arange(sq).unsqueeze(1)
        j = torch.arange(skv).unsqueeze(0)
        d = skv - sq
        m4 = ((j - i - d) > nxt) | ((i - j + d) > pre)
        o4, l4 = FIA(q, k, v, atten_mask=TRIU2048.view(1, 1, 2048, 2048), sparse_mode=4, pre_tokens=pre,
                     next_tokens=nxt, **kw)
        oe, le = explicit(m4)
        close(o4, oe)
        close(l4, le)
    # mode 0: M or outside the left-up band
    m = rbool(sq, skv, p=0.3, seed=9)
    for pre, nxt in [(1, 0), (2, 3), (2147483647, 2147483647)]:
        o0 = FIA(q, k, v, atten_mask=m, sparse_mode=0, pre_tokens=pre, next_tokens=nxt, **kw)[0]
        close(o0, explicit(m | band_mask(sq, skv, pre, nxt))[0])
    # mode 0 without a mask: nothing masked, pre/next ignored
    close(FIA(q, k, v, pre_tokens=0, next_tokens=0, **kw)[0], direct(q, k, v, 1.0)[0])


def test_pfa_defaults_and_aliases():
    B, N, S, D = 1, 2, 5, 4
    q, k, v = rnd(B, N, S, D, seed=1), rnd(B, N, S, D, seed=2), rnd(B, N, S, D, seed=3)
    zero = torch.zeros(S, S, dtype=torch.bool)
    kw = dict(num_heads=N, input_layout="BNSD")
    causal = PFA(q, k, v, atten_mask=TRIU2048, sparse_mode=2, **kw)
    # PFA's default next_tokens = 0 clips a mode-0 mask to left-up causal; FIA's default does not
    close(PFA(q, k, v, atten_mask=zero, **kw), causal)
    close(FIA(q, k, v, atten_mask=zero, **kw)[0], direct(q, k, v, 1.0)[0])
    assert (causal - direct(q, k, v, 1.0)[0]).abs().max() > 1e-3
    # aliases 10-14 = 0-4
    for mode in (2, 3, 4):
        close(PFA(q, k, v, atten_mask=TRIU2048, sparse_mode=mode + 10, pre_tokens=2, next_tokens=1, **kw),
              PFA(q, k, v, atten_mask=TRIU2048, sparse_mode=mode, pre_tokens=2, next_tokens=1, **kw))
    close(PFA(q, k, v, atten_mask=zero, sparse_mode=10, **kw), causal)


def test_decode_ignores_sparse_mode_and_tokens():
    B, N, Skv, D = 2, 2, 6, 4
    q, k, v = rnd(B, N, 1, D, seed=1), rnd(B, N, Skv, D, seed=2), rnd(B, N, Skv, D, seed=3)
    m = rbool(B, Skv, p=0.4, seed=4)
    m[:, 2] = False
    kw = dict(num_heads=N, input_layout="BNSD")
    base = FIA(q, k, v, atten_mask=m, **kw)[0]
    for sm, pre, nxt in [(0, 0, 0), (3, 2147483647, 2147483647), (1, -3, 5), (4, 0, 0)]:
        close(FIA(q, k, v, atten_mask=m, sparse_mode=sm, pre_tokens=pre, next_tokens=nxt, **kw)[0], base)
    # PFA is always a prefill: with S = 1 it reads the (B, 1, 1, Skv) mask and applies its band.
    close(PFA(q, k, v, atten_mask=m.view(B, 1, 1, Skv), next_tokens=2147483647, **kw), base)
    causal_row0 = PFA(q, k, v, atten_mask=torch.zeros(B, 1, 1, Skv, dtype=torch.bool), **kw)  # next_tokens = 0
    close(causal_row0, v[:, :, :1].repeat_interleave(N // v.shape[1], 1))
    masked = m.view(B, 1, 1, Skv)
    close(base, direct(q, k, v, 1.0, masked=masked)[0])


# ------------------------------------------------------------------------------------------------
# GQA, paged KV, TND
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD"])
@pytest.mark.parametrize("sq", [1, 4])
def test_gqa_equals_repeated_kv_heads(layout, sq):
    B, Nq, Nkv, Skv, D, Dv = 2, 6, 2, 5, 4, 3
    q, k, v = rnd(B, Nq, sq, D, seed=1), rnd(B, Nkv, Skv, D, seed=2), rnd(B, Nkv, Skv, Dv, seed=3)
    kr, vr = k.repeat_interleave(Nq // Nkv, dim=1), v.repeat_interleave(Nq // Nkv, dim=1)
    L = lambda x: to_layout(x, layout)  # noqa: E731
    kw = dict(num_heads=Nq, input_layout=layout, scale=0.7, softmax_lse_flag=True)
    out, lse = FIA(L(q), L(k), L(v), num_key_value_heads=Nkv, **kw)
    want, want_lse = FIA(L(q), L(kr), L(vr), **kw)
    close(out, want)
    close(lse, want_lse)
    close(want, L(direct(q, kr, vr, 0.7)[0]))


def _paged(kc, lens, block_size, blocknum, seed):
    """kc [B, Nkv, Skv, D] right-padded -> (pool3 (blocknum, bs, Nkv*D), pool4 (blocknum, Nkv, bs, D), table):
    blocks of a random permutation, unused pool slots NaN, unused table entries out of range."""
    B, Nkv, _, D = kc.shape
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(blocknum, generator=g).tolist()
    W = max(1, max(-(-n // block_size) for n in lens))
    table = torch.full((B, W), 10 ** 6, dtype=torch.int32)
    pool = torch.full((blocknum, Nkv, block_size, D), NAN, dtype=F64)
    for b, n in enumerate(lens):
        for s in range(n):
            if s % block_size == 0:
                table[b, s // block_size] = perm.pop()
            pool[table[b, s // block_size], :, s % block_size] = kc[b, :, s]
    pool3 = pool.permute(0, 2, 1, 3).reshape(blocknum, block_size, Nkv * D).contiguous()
    return pool3, pool, table


def test_paged_equals_contiguous():
    B, Nq, Nkv, Skv, D, Dv, bs = 3, 4, 2, 12, 8, 4, 4
    lens = [5, 0, 11]
    k, v = rnd(B, Nkv, Skv, D, seed=2), rnd(B, Nkv, Skv, Dv, seed=3)
    for b, n in enumerate(lens):  # positions beyond the lengths must never be read
        k[b, :, n:] = NAN
        v[b, :, n:] = NAN
    k3, k4, table = _paged(k, lens, bs, 10, seed=7)
    v3, v4, _ = _paged(v, lens, bs, 10, seed=7)
    pse = rnd(B, Nq, 1, Skv, seed=5)
    m = rbool(B, 1, Skv, p=0.3, seed=6)
    m[:, :, 0] = False
    common = dict(num_heads=Nq, num_key_value_heads=Nkv)

    # IFA decode, BSH query with a BnBsH pool / BNSD query with a BnNBsD pool
    q1 = rnd(B, Nq, 1, D, seed=1)
    for layout, kp, vp in (("BSH", k3, v3), ("BNSD", k4, v4)):
        kw = dict(common, input_layout=layout, pse_shift=pse, atten_mask=m, scale_value=0.5)
        got = IFA(to_layout(q1, layout), kp, vp, block_table=table, block_size=bs, actual_seq_lengths=lens, **kw)
        want = IFA(to_layout(q1, layout), to_layout(k, layout), to_layout(v, layout), actual_seq_lengths=lens, **kw)
        close(got, want)
        assert torch.isfinite(got).all()
    assert torch.all(got[1] == 0)  # empty KV

    # FIA prefill with a causal mask
    q3 = rnd(B, Nq, 3, D, seed=8)
    kw = dict(common, input_layout="BNSD", atten_mask=TRIU2048, sparse_mode=3, softmax_lse_flag=True, scale=0.5)
    got = FIA(q3, k4, v4, block_table=table, block_size=bs, actual_seq_lengths_kv=lens, **kw)
    want = FIA(q3, k, v, actual_seq_lengths_kv=lens, **kw)
    close(got[0], want[0])
    close(got[1], want[1])
    assert torch.all(got[1][1] == -FLT_MAX)

    # FIA v2 TND with block_table: cumulative query lengths, per-batch KV lengths
    qlen = [2, 3, 1]
    cq = [2, 5, 6]
    qt = rnd(6, Nq, D, seed=9)
    kt = torch.cat([k[b, :, :n].permute(1, 0, 2) for b, n in enumerate(lens)])  # packed [Tkv, Nkv, D]
    vt = torch.cat([v[b, :, :n].permute(1, 0, 2) for b, n in enumerate(lens)])
    ck = [5, 5, 16]
    kw = dict(num_query_heads=Nq, num_key_value_heads=Nkv, softmax_scale=0.5, input_layout="TND",
              atten_mask=TRIU2048, sparse_mode=3, return_softmax_lse=True)
    got = FIA2(qt, k3, v3, block_table=table, block_size=bs, actual_seq_qlen=cq, actual_seq_kvlen=lens, **kw)
    want = FIA2(qt, kt, vt, actual_seq_qlen=cq, actual_seq_kvlen=ck, **kw)
    assert qlen == [c - p for c, p in zip(cq, [0] + cq[:-1])]
    close(got[0], want[0])
    close(got[1], want[1])


@pytest.mark.parametrize("mode", [0, 3])
def test_tnd_equals_per_batch_bnsd(mode):
    Nq, Nkv, D, Dv = 4, 2, 6, 5
    qlen, kvlen = [3, 0, 5, 2], [4, 2, 5, 6]
    cq, ck = [3, 3, 8, 10], [4, 6, 11, 17]
    T = 12  # two trailing query rows belong to no batch
    q, k, v = rnd(T, Nq, D, seed=1), rnd(17, Nkv, D, seed=2), rnd(17, Nkv, Dv, seed=3)
    mask = rbool(5, 6, p=0.3, seed=4) if mode == 0 else TRIU2048
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, scale=0.6, sparse_mode=mode, atten_mask=mask,
              pre_tokens=2, next_tokens=1, softmax_lse_flag=True)
    out, lse = FIA(q, k, v, input_layout="TND", actual_seq_lengths=cq, actual_seq_lengths_kv=ck, **kw)
    assert out.shape == (T, Nq, Dv) and lse.shape == (T, Nq, 1)
    for b in range(4):
        q0, k0 = cq[b] - qlen[b], ck[b] - kvlen[b]
        if qlen[b] == 0:
            continue
        qb = q[q0:cq[b]].permute(1, 0, 2).unsqueeze(0)
        kb = k[k0:ck[b]].permute(1, 0, 2).unsqueeze(0)
        vb = v[k0:ck[b]].permute(1, 0, 2).unsqueeze(0)
        mb = mask[: qlen[b], : kvlen[b]] if mode == 0 else mask
        ob, lb = FIA(qb, kb, vb, input_layout="BNSD", **dict(kw, atten_mask=mb))
        close(out[q0:cq[b]], ob[0].permute(1, 0, 2))
        close(lse[q0:cq[b]], lb[0].permute(1, 0, 2))
    assert torch.all(out[10:] == 0) and torch.all(lse[10:] == -FLT_MAX)
    # PFA TND is the same computation
    close(PFA(q, k, v, input_layout="TND", actual_seq_lengths=cq, actual_seq_lengths_kv=ck,
              **{a: b for a, b in kw.items() if a not in ("scale", "softmax_lse_flag")}, scale_value=0.6), out)


# ------------------------------------------------------------------------------------------------
# Shared prefix, left padding
# ------------------------------------------------------------------------------------------------
def test_shared_prefix_equals_concatenation():
    B, Nq, Nkv, Sq, Skv, Sp, Lp, D = 2, 4, 2, 4, 7, 6, 4, 5
    act_q, act_kv = [4, 2], [5, 3]
    q, k, v = rnd(B, Nq, Sq, D, seed=1), rnd(B, Nkv, Skv, D, seed=2), rnd(B, Nkv, Skv, D, seed=3)
    kp, vp = rnd(1, Nkv, Sp, D, seed=4), rnd(1, Nkv, Sp, D, seed=5)
    kp[:, :, Lp:] = NAN  # beyond actual_shared_prefix_len: never read
    vp[:, :, Lp:] = NAN
    # the concatenated equivalent: [prefix[:Lp], own keys[:act]] right padded
    kc = torch.full((B, Nkv, Lp + Skv, D), NAN, dtype=F64)
    vc = kc.clone()
    for b in range(B):
        kc[b, :, : Lp + act_kv[b]] = torch.cat([kp[0, :, :Lp], k[b, :, : act_kv[b]]], dim=1)
        vc[b, :, : Lp + act_kv[b]] = torch.cat([vp[0, :, :Lp], v[b, :, : act_kv[b]]], dim=1)
    pse = rnd(B, Nq, Sq, Lp + Skv, seed=6)
    m = rbool(B, 1, Sq, Lp + Skv, p=0.3, seed=7)
    m[..., 0] = False
    for layout in ("BSH", "BNSD"):
        L = lambda x: to_layout(x, layout)  # noqa: E731
        for extra in (dict(atten_mask=m, sparse_mode=1), dict(atten_mask=TRIU2048, sparse_mode=3),
                      dict(atten_mask=m, sparse_mode=0, pre_tokens=3, next_tokens=1),
                      dict(atten_mask=TRIU2048, sparse_mode=4, pre_tokens=3, next_tokens=0)):
            kw = dict(num_heads=Nq, num_key_value_heads=Nkv, scale=0.4, input_layout=layout, pse_shift=pse,
                      actual_seq_lengths=act_q, softmax_lse_flag=True, **extra)
            got = FIA(L(q), L(k), L(v), key_shared_prefix=L(kp), value_shared_prefix=L(vp),
                      actual_shared_prefix_len=[Lp], actual_seq_lengths_kv=act_kv, **kw)
            want = FIA(L(q), L(kc), L(vc), actual_seq_lengths_kv=[Lp + n for n in act_kv], **kw)
            close(got[0], want[0])
            close(got[1], want[1])
            assert torch.isfinite(got[0]).all()
    # default Lp = the prefix's S
    got = FIA(q, k, v, key_shared_prefix=kp[:, :, :Lp], value_shared_prefix=vp[:, :, :Lp], num_heads=Nq,
              num_key_value_heads=Nkv, input_layout="BNSD", actual_seq_lengths_kv=act_kv)[0]
    want = FIA(q, kc, vc, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
               actual_seq_lengths_kv=[Lp + n for n in act_kv])[0]
    close(got, want)


def test_left_padding_equals_right_padding():
    B, Nq, Nkv, Sq, Skv, D = 2, 2, 1, 6, 8, 4
    qpad, kvpad = 1, 2
    act_q, act_kv = [3, 5], [4, 6]
    ql, kl, vl = rnd(B, Nq, Sq, D, seed=1), rnd(B, Nkv, Skv, D, seed=2), rnd(B, Nkv, Skv, D, seed=3)
    qr, kr, vr = (torch.full_like(x, NAN) for x in (ql, kl, vl))
    qwin = [(Sq - qpad - n, Sq - qpad) for n in act_q]
    kwin = [(Skv - kvpad - n, Skv - kvpad) for n in act_kv]
    for b in range(B):
        qr[b, :, : act_q[b]] = ql[b, :, slice(*qwin[b])]
        kr[b, :, : act_kv[b]] = kl[b, :, slice(*kwin[b])]
        vr[b, :, : act_kv[b]] = vl[b, :, slice(*kwin[b])]
        ql[b, :, : qwin[b][0]] = NAN  # padding must never be read
        ql[b, :, qwin[b][1]:] = NAN
        kl[b, :, : kwin[b][0]] = NAN
        kl[b, :, kwin[b][1]:] = NAN
        vl[b, :, : kwin[b][0]] = NAN
        vl[b, :, kwin[b][1]:] = NAN
    pse = rnd(B, Nq, Sq, Skv, seed=4)  # indexed relative to the valid windows in both calls
    m = rbool(B, 1, Sq, Skv, p=0.3, seed=5)
    m[..., 0] = False
    common = dict(num_heads=Nq, num_key_value_heads=Nkv, scale=0.5, input_layout="BNSD", pse_shift=pse,
                  actual_seq_lengths=act_q, actual_seq_lengths_kv=act_kv, softmax_lse_flag=True)
    cases = [(dict(atten_mask=m, sparse_mode=1), {}),
             (dict(atten_mask=TRIU2048, sparse_mode=3), {}),
             (dict(atten_mask=TRIU2048, sparse_mode=4, pre_tokens=2, next_tokens=1), {}),
             # with left padding, mode 0 ignores pre/next: == right padding without a band
             (dict(atten_mask=m, sparse_mode=0, pre_tokens=1, next_tokens=0),
              dict(pre_tokens=2147483647, next_tokens=2147483647))]
    for extra, right_override in cases:
        out_l, lse_l = FIA(ql, kl, vl, query_padding_size=torch.tensor([qpad]), kv_padding_size=torch.tensor([kvpad]),
                           **common, **extra)
        out_r, lse_r = FIA(qr, kr, vr, **common, **dict(extra, **right_override))
        for b in range(B):
            close(out_l[b, :, slice(*qwin[b])], out_r[b, :, : act_q[b]])
            close(lse_l[b, :, slice(*qwin[b])], lse_r[b, :, : act_q[b]])
            outside = torch.ones(Sq, dtype=torch.bool)
            outside[slice(*qwin[b])] = False
            assert torch.all(out_l[b, :, outside] == 0) and torch.all(lse_l[b, :, outside] == -FLT_MAX)
    # a negative padding counts as 0
    a = FIA(ql[..., :Sq - qpad, :], kl[..., :Skv - kvpad, :], vl[..., :Skv - kvpad, :], query_padding_size=[-3],
            kv_padding_size=[-1], **dict(common, pse_shift=None))
    b_ = FIA(ql, kl, vl, query_padding_size=[qpad], kv_padding_size=[kvpad], **dict(common, pse_shift=None))
    close(a[0], b_[0][:, :, :Sq - qpad])


def test_decode_kv_left_padding():
    B, Nq, Skv, D, kvpad = 3, 2, 8, 4, 2
    act = [3, 7, 6]  # batch 1: start 8 - 2 - 7 < 0 -> 0 / -FLT_MAX; batch 2 starts at 0
    q, k, v = rnd(B, Nq, 1, D, seed=1), rnd(B, Nq, Skv, D, seed=2), rnd(B, Nq, Skv, D, seed=3)
    kr, vr = torch.full_like(k, NAN), torch.full_like(v, NAN)
    for b, n in enumerate(act):
        if Skv - kvpad - n >= 0:
            kr[b, :, :n] = k[b, :, Skv - kvpad - n: Skv - kvpad]
            vr[b, :, :n] = v[b, :, Skv - kvpad - n: Skv - kvpad]
    kw = dict(num_heads=Nq, input_layout="BNSD", actual_seq_lengths=act)
    got = IFA(q, k, v, kv_padding_size=torch.tensor([kvpad]), **kw)
    assert torch.all(got[1] == 0)
    want = IFA(q, torch.nan_to_num(kr), torch.nan_to_num(vr), **kw)
    close(got[[0, 2]], want[[0, 2]])
    out, lse = FIA(q, k, v, kv_padding_size=torch.tensor([kvpad]), num_heads=Nq, input_layout="BNSD",
                   actual_seq_lengths_kv=act, softmax_lse_flag=True)
    close(out, got)
    assert torch.all(lse[1] == -FLT_MAX) and torch.all(lse[[0, 2]] > -1e30)


def test_query_lengths_right_padding_rows_are_zero():
    B, N, Sq, Skv, D = 2, 2, 5, 6, 4
    q, k, v = rnd(B, N, Sq, D, seed=1), rnd(B, N, Skv, D, seed=2), rnd(B, N, Skv, D, seed=3)
    out, lse = FIA(q, k, v, num_heads=N, input_layout="BNSD", actual_seq_lengths=[2, 5], softmax_lse_flag=True)
    assert torch.all(out[0, :, 2:] == 0) and torch.all(lse[0, :, 2:] == -FLT_MAX)
    close(out[:, :, :2], direct(q[:, :, :2], k, v, 1.0)[0])
    close(out[1], direct(q, k, v, 1.0)[0][1])
    # a length list of one entry broadcasts, a longer one gives its first B entries
    close(FIA(q, k, v, num_heads=N, input_layout="BNSD", actual_seq_lengths_kv=[4])[0],
          FIA(q, k, v, num_heads=N, input_layout="BNSD", actual_seq_lengths_kv=torch.tensor([4, 4, 1]))[0])


# ------------------------------------------------------------------------------------------------
# Output layouts
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sq", [1, 3])
def test_dense_output_layouts_are_permutations_of_bnsd(sq):
    B, Nq, Nkv, Skv, D, Dv = 2, 4, 2, 5, 6, 3
    q, k, v = rnd(B, Nq, sq, D, seed=1), rnd(B, Nkv, Skv, D, seed=2), rnd(B, Nkv, Skv, Dv, seed=3)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, scale=0.5)
    o, lse = FIA(q, k, v, input_layout="BNSD", softmax_lse_flag=True, **kw)  # [B, Nq, Sq, Dv]
    expected = {"BSH": o.permute(0, 2, 1, 3).reshape(B, sq, Nq * Dv), "BSND": o.permute(0, 2, 1, 3),
                "BNSD": o, "NBSD": o.permute(1, 0, 2, 3)}
    for layout, (inp, outk) in {"BSH": ("BSH", "BSH"), "BSND": ("BSND", "BSND"), "BNSD": ("BNSD", "BNSD"),
                                "BNSD_BSND": ("BNSD", "BSND"), "BSH_BNSD": ("BSH", "BNSD"),
                                "BSND_BNSD": ("BSND", "BNSD"), "BSH_NBSD": ("BSH", "NBSD"),
                                "BSND_NBSD": ("BSND", "NBSD"), "BNSD_NBSD": ("BNSD", "NBSD")}.items():
        L = lambda x: to_layout(x, inp)  # noqa: E731
        flag = outk != "NBSD"
        got, got_lse = FIA(L(q), L(k), L(v), input_layout=layout, softmax_lse_flag=flag, **kw)
        close(got, expected[outk])
        if flag:
            close(got_lse, lse)  # [B, Nq, Sq, 1] whatever the layout
        else:
            with pytest.raises(ValueError):
                FIA(L(q), L(k), L(v), input_layout=layout, softmax_lse_flag=True, **kw)
        got2, _ = FIA2(L(q), L(k), L(v), input_layout=layout, num_query_heads=Nq, num_key_value_heads=Nkv,
                       softmax_scale=0.5)
        close(got2, expected[outk])
    for layout in ("BSH", "BSND", "BNSD", "BNSD_BSND"):
        inp, outk = {"BNSD_BSND": ("BNSD", "BSND")}.get(layout, (layout, layout))
        L = lambda x: to_layout(x, inp)  # noqa: E731
        close(PFA(L(q), L(k), L(v), input_layout=layout, num_heads=Nq, num_key_value_heads=Nkv, scale_value=0.5,
                  next_tokens=2147483647), expected[outk])


def test_tnd_output_layouts_are_permutations():
    Nq, Nkv, D, Dv = 4, 2, 6, 5
    cq, ck = [2, 5], [3, 7]
    q, k, v = rnd(6, Nq, D, seed=1), rnd(7, Nkv, D, seed=2), rnd(7, Nkv, Dv, seed=3)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, actual_seq_lengths=cq, actual_seq_lengths_kv=ck,
              atten_mask=TRIU2048, sparse_mode=3, softmax_lse_flag=True)
    o, lse = FIA(q, k, v, input_layout="TND", **kw)  # [T, Nq, Dv]
    ntd = lambda x: x.permute(1, 0, 2).contiguous()  # noqa: E731
    for layout, args, want in (("TND_NTD", (q, k, v), ntd(o)), ("NTD_TND", (ntd(q), ntd(k), ntd(v)), o),
                               ("NTD", (ntd(q), ntd(k), ntd(v)), ntd(o))):
        got, got_lse = FIA(*args, input_layout=layout, **kw)
        close(got, want)
        close(got_lse, lse)  # [T, Nq, 1] for every TND-family layout
    assert lse.shape == (6, Nq, 1)


# ------------------------------------------------------------------------------------------------
# Operators against each other
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD"])
def test_decode_fia_equals_ifa(layout):
    B, Nq, Nkv, Skv, D, bs = 3, 4, 2, 9, 8, 4
    q, k, v = rnd(B, Nq, 1, D, seed=1), rnd(B, Nkv, Skv, D, seed=2), rnd(B, Nkv, Skv, D, seed=3)
    act = [9, 4, 1]
    pse = rnd(1, Nq, 1, Skv, seed=4)
    m = rbool(B, 1, 1, Skv, p=0.3, seed=5)
    m[..., 0] = False
    L = lambda x: to_layout(x, layout)  # noqa: E731
    common = dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout=layout, pse_shift=pse, atten_mask=m)
    ifa = IFA(L(q), L(k), L(v), actual_seq_lengths=act, scale_value=0.3, **common)
    fia = FIA(L(q), L(k), L(v), actual_seq_lengths_kv=act, scale=0.3, **common)[0]
    fia2 = FIA2(L(q), L(k), L(v), actual_seq_kvlen=act, softmax_scale=0.3, num_query_heads=Nq,
                **{a: b for a, b in common.items() if a != "num_heads"})[0]
    close(fia, ifa)
    close(fia2, ifa)
    # paged
    k3, _, table = _paged(k, act, bs, 8, seed=3)
    v3, _, _ = _paged(v, act, bs, 8, seed=3)
    ifa_p = IFA(L(q), k3, v3, block_table=table, block_size=bs, actual_seq_lengths=act, scale_value=0.3, **common)
    fia_p = FIA(L(q), k3, v3, block_table=table, block_size=bs, actual_seq_lengths_kv=act, scale=0.3, **common)[0]
    close(ifa_p, ifa)
    close(fia_p, ifa)
    # kv left padding
    ifa_l = IFA(L(q), L(k), L(v), actual_seq_lengths=act, kv_padding_size=torch.tensor([0]), scale_value=0.3,
                **common)
    fia_l = FIA(L(q), L(k), L(v), actual_seq_lengths_kv=act, kv_padding_size=torch.tensor([0]), scale=0.3,
                **common)[0]
    close(fia_l, ifa_l)
    assert (ifa_l - ifa).abs().max() > 1e-3  # left padding reads other keys


@pytest.mark.parametrize("layout", ["BSH", "BSND", "BNSD", "BNSD_BSND"])
def test_prefill_fia_equals_pfa(layout):
    B, Nq, Nkv, Sq, Skv, D = 2, 4, 1, 5, 7, 4
    inp = "BNSD" if layout == "BNSD_BSND" else layout
    q, k, v = rnd(B, Nq, Sq, D, seed=1), rnd(B, Nkv, Skv, D, seed=2), rnd(B, Nkv, Skv, D, seed=3)
    L = lambda x: to_layout(x, inp)  # noqa: E731
    pse = rnd(B, Nq, Sq, Skv, seed=4)
    m = rbool(1, Sq, Skv, p=0.3, seed=5)
    for extra in (dict(), dict(atten_mask=m, sparse_mode=0, pre_tokens=2, next_tokens=1),
                  dict(atten_mask=m, sparse_mode=1), dict(atten_mask=TRIU2048, sparse_mode=2),
                  dict(atten_mask=TRIU2048, sparse_mode=3), dict(atten_mask=TRIU2048, sparse_mode=4, pre_tokens=1,
                                                                 next_tokens=2)):
        extra = dict(extra)
        extra.setdefault("next_tokens", 2147483647)  # PFA's default is 0, FIA's INT_MAX
        common = dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout=layout, pse_shift=pse,
                      actual_seq_lengths=[5, 3], actual_seq_lengths_kv=[6, 7], **extra)
        pfa = PFA(L(q), L(k), L(v), scale_value=0.4, **common)
        fia = FIA(L(q), L(k), L(v), scale=0.4, **common)[0]
        close(fia, pfa)
        fia2 = FIA2(L(q), L(k), L(v), softmax_scale=0.4, num_query_heads=Nq, num_key_value_heads=Nkv,
                    input_layout=layout, pse_shift=pse, actual_seq_qlen=[5, 3], actual_seq_kvlen=[6, 7],
                    **extra)[0]
        close(fia2, pfa)


# ------------------------------------------------------------------------------------------------
# dtypes, empty lse, errors
# ------------------------------------------------------------------------------------------------
def test_dtypes_and_empty_lse():
    q = rnd(1, 2, 3, 4, seed=1).to(torch.float16)
    k = rnd(1, 2, 5, 4, seed=2).to(torch.float16)
    out, lse = FIA(q, k, k, num_heads=2, input_layout="BNSD")
    assert out.dtype == torch.float16 and lse.dtype == torch.float32 and lse.shape == (0,)
    out, lse = FIA2(q.bfloat16(), k.bfloat16(), k.bfloat16(), num_query_heads=2, input_layout="BNSD",
                    return_softmax_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == (1, 2, 3, 1)


def test_errors():
    q, k = rnd(1, 2, 3, 4), rnd(1, 2, 5, 4)
    kw = dict(num_heads=2, input_layout="BNSD")
    with pytest.raises(ValueError):
        FIA(q, k, k, sparse_mode=3, **kw)  # modes 1-4 need a mask
    with pytest.raises(ValueError):
        FIA(q, k, k, sparse_mode=3, atten_mask=torch.ones(3, 5, dtype=torch.bool), **kw)  # not the 2048 marker
    with pytest.raises(ValueError):
        PFA(q, k, k, sparse_mode=5, atten_mask=TRIU2048, **kw)
    with pytest.raises(ValueError):
        FIA2(q, k, k, sparse_mode=9, atten_mask=TRIU2048, num_query_heads=2, input_layout="BNSD")
    with pytest.raises(ValueError):
        FIA(q, k, k, atten_mask=TRIU2048, sparse_mode=4, pre_tokens=-1, next_tokens=-1, **kw)
    with pytest.raises(ValueError):
        FIA(q, rnd(1, 3, 5, 4), rnd(1, 3, 5, 4), num_key_value_heads=3, **kw)  # 2 % 3
    with pytest.raises(ValueError):
        IFA(q, k, k, **kw)  # query S must be 1
    with pytest.raises(ValueError):
        FIA(q, k, k, actual_seq_lengths_kv=[6], **kw)  # longer than the tensor
    with pytest.raises(ValueError):
        FIA(q, k, k, inner_precise=4, **kw)
    with pytest.raises(ValueError):
        FIA(q[:, :, :1], k, k, inner_precise=2, **kw)  # decode: 0/1
    with pytest.raises(ValueError):
        PFA(q, k, k, input_layout="TND", num_heads=2)
    k3, _, table = _paged(k, [5], 4, 3, seed=0)
    table[0, 1] = 7  # block id outside the pool
    with pytest.raises(ValueError):
        IFA(q[:, :, :1], k3, k3, block_table=table, block_size=4, actual_seq_lengths=[5], **kw)
    with pytest.raises(ValueError):  # antiquant scales need int8 key/value
        IFA(q[:, :, :1], k, k, antiquant_scale=torch.ones(2), **kw)


# ------------------------------------------------------------------------------------------------
# _npu_reshape_and_cache
# ------------------------------------------------------------------------------------------------
def test_reshape_and_cache():
    T, Nkv, D, Dv, blocknum, bs = 6, 2, 4, 3, 4, 4
    key, value = rnd(T, Nkv, D, seed=1), rnd(T, Nkv, Dv, seed=2)
    slots = torch.tensor([5, -1, 14, 0, 5, 9], dtype=torch.int32)  # -1 skipped; slot 5 written twice
    kc4 = torch.zeros(blocknum, bs, Nkv, D, dtype=F64)
    vc3 = torch.zeros(blocknum, bs, Nkv * Dv, dtype=F64)
    ref._npu_reshape_and_cache(key, value, kc4, vc3, slots)
    want_k, want_v = torch.zeros_like(kc4), torch.zeros_like(vc3)
    for t, s in [(2, 14), (3, 0), (4, 5), (5, 9)]:
        want_k[s // bs, s % bs] = key[t]
        want_v[s // bs, s % bs] = value[t].reshape(-1)
    assert torch.equal(kc4, want_k) and torch.equal(vc3, want_v)
    # a transposed view of a (blocknum, Nkv, block_size, D) cache is written through
    base = torch.zeros(blocknum, Nkv, bs, D, dtype=F64)
    vbase = torch.zeros(blocknum, Nkv, bs, Dv, dtype=F64)
    ref._npu_reshape_and_cache(key, value, base.transpose(1, 2), vbase.transpose(1, 2), slots)
    assert torch.equal(base.transpose(1, 2), want_k)
    with pytest.raises(ValueError):
        ref._npu_reshape_and_cache(key, value, kc4, vc3, torch.tensor([0, 1, 2, 3, 4, 16]))
    assert torch.equal(kc4, want_k)  # nothing written on error


def test_reshape_and_cache_then_paged_attention():
    """Write each batch's keys with _npu_reshape_and_cache, then IFA over the cache == IFA on contiguous keys."""
    B, Nq, Nkv, D, bs, blocknum = 2, 4, 2, 8, 4, 6
    lens = [7, 5]
    k, v = rnd(B, Nkv, 8, D, seed=1), rnd(B, Nkv, 8, D, seed=2)
    table = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32)
    kc = torch.full((blocknum, bs, Nkv, D), NAN, dtype=F64)
    vc = kc.clone()
    for b, n in enumerate(lens):
        slots = torch.tensor([int(table[b, s // bs]) * bs + s % bs for s in range(n)])
        ref._npu_reshape_and_cache(k[b, :, :n].permute(1, 0, 2), v[b, :, :n].permute(1, 0, 2), kc, vc, slots)
    q = rnd(B, Nq, 1, D, seed=3)
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout="BSH", actual_seq_lengths=lens)
    got = IFA(to_layout(q, "BSH"), kc.reshape(blocknum, bs, -1), vc.reshape(blocknum, bs, -1), block_table=table,
              block_size=bs, **kw)
    want = IFA(to_layout(q, "BSH"), to_layout(k, "BSH"), to_layout(v, "BSH"), **kw)
    close(got, want)
