"""npu_fusion_attention_v2 / grad_v2 (spec §3) and the v3 wrappers (§3.4), forward and backward,
against npufa.reference.npu_fusion_attention_v2 (float64; it reduces v2 to the independent v1 reference)."""
import pytest
import torch

import npufa
from attn_helpers import to_layout
from npufa import reference as ref

CAUSAL = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1)


def rnd(shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def make_case(layout, B, N, Nkv, S, D, Dv, Dr, seed):
    if layout == "TND":
        lens = [S, 0, S // 2 + 1] if B > 1 else [S]
        lens = [x for x in lens if x > 0]  # pse forms need non-empty batches
        T = sum(lens)
        t = lambda n, d, s: rnd((T, n, d), s)
        q, k, v = t(N, D, seed), t(Nkv, D, seed + 1), t(Nkv, Dv, seed + 2)
        qr = t(N, Dr, seed + 3) if Dr else None
        kr = t(Nkv, Dr, seed + 4) if Dr else None
        cum = torch.tensor(lens).cumsum(0).tolist()
        return q, k, v, qr, kr, dict(actual_seq_qlen=cum, actual_seq_kvlen=cum), len(lens)
    t = lambda n, d, s: to_layout(rnd((B, n, S, d), s), layout)
    q, k, v = t(N, D, seed), t(Nkv, D, seed + 1), t(Nkv, Dv, seed + 2)
    qr = t(N, Dr, seed + 3) if Dr else None
    kr = t(Nkv, Dr, seed + 4) if Dr else None
    return q, k, v, qr, kr, {}, B


def grads_of(fn, tensors, seed):
    tensors = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*tensors)[0]
    dy = rnd(out.shape, seed).to(out.dtype)
    out.backward(dy)
    return out.detach(), [t.grad if t is not None else None for t in tensors]


@pytest.mark.parametrize("layout", ["BNSD", "BSH", "SBH", "BSND", "TND"])
@pytest.mark.parametrize("pse_type", [0, 1, 2, 3])
@pytest.mark.parametrize("rope", [0, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_v2_forward_backward_vs_reference(layout, pse_type, rope, causal):
    B, N, Nkv, S, D, Dv = 2, 4, 2, 67, 16, 12
    q, k, v, qr, kr, kw, nb = make_case(layout, B, N, Nkv, S, D, Dv, rope, seed=10 + pse_type)
    if pse_type in (2, 3):
        pse = rnd((nb, N), 20).abs() * 0.1 if layout != "TND" else rnd((N,), 20).abs() * 0.1
        kw.update(q_start_idx=[3], kv_start_idx=[1])
    elif layout == "TND":
        lens = [kw["actual_seq_qlen"][0]] + [b - a for a, b in zip(kw["actual_seq_qlen"], kw["actual_seq_qlen"][1:])]
        pse = rnd((N * sum(x * x for x in lens),), 21)
    else:
        pse = rnd((B, N, S, S), 21)
    if causal:
        kw.update(atten_mask=CAUSAL, sparse_mode=3)
    kw.update(scale=0.3, pse_type=pse_type)

    def ours(q, k, v, qr, kr, p):
        return npufa.npu_fusion_attention_v2(q, k, v, N, layout, pse=p, query_rope=qr, key_rope=kr, **kw)

    def gold(q, k, v, qr, kr, p):
        return ref.npu_fusion_attention_v2(q, k, v, N, layout, pse=p, query_rope=qr, key_rope=kr, **kw)

    out, g = grads_of(ours, [q, k, v, qr, kr, pse], seed=5)
    rout, rg = grads_of(gold, [x.double() if x is not None else None for x in (q, k, v, qr, kr, pse)], seed=5)
    torch.testing.assert_close(out.double(), rout, rtol=1e-4, atol=2e-5)
    for name, a, b in zip(("dq", "dk", "dv", "dq_rope", "dk_rope", "dpse"), g, rg):
        if name == "dpse" and pse_type in (2, 3):
            assert a is None  # no gradient for the slopes
            continue
        if a is None and b is None:
            continue
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=5e-5, msg=name)


def test_v2_defaults_equal_v1():
    q, k, v = rnd((1, 4, 33, 16), 1), rnd((1, 2, 40, 16), 2), rnd((1, 2, 40, 8), 3)
    kw = dict(atten_mask=CAUSAL, sparse_mode=3, scale=0.25)
    a = npufa.npu_fusion_attention(q, k, v, 4, "BNSD", pre_tockens=100, next_tockens=0, **kw)
    b = npufa.npu_fusion_attention_v2(q, k, v, 4, "BNSD", pre_tokens=100, next_tokens=0, **kw)
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)
    assert a[4:] == b[4:]


def test_v2_explicit_grad_matches_autograd():
    q, k, v = rnd((2, 3, 20, 8), 1), rnd((2, 3, 20, 8), 2), rnd((2, 3, 20, 8), 3)
    qr, kr = rnd((2, 3, 20, 4), 4), rnd((2, 3, 20, 4), 5)
    slopes = rnd((3,), 6).abs()
    kw = dict(pse=slopes, pse_type=3, query_rope=qr, key_rope=kr, scale=0.5, atten_mask=CAUSAL, sparse_mode=2)
    ts = [t.clone().requires_grad_() for t in (q, k, v, qr, kr)]
    out = npufa.npu_fusion_attention_v2(ts[0], ts[1], ts[2], 3, "BNSD", **{**kw, "query_rope": ts[3], "key_rope": ts[4]})
    dy = rnd(out[0].shape, 7)
    out[0].backward(dy)
    dq, dk, dv, dpse, dqr, dkr, dsink = npufa.npu_fusion_attention_grad_v2(
        q, k, v, dy, 3, "BNSD", pse=slopes, pse_type=3, query_rope=qr, key_rope=kr, scale_value=0.5,
        atten_mask=CAUSAL, sparse_mode=2, softmax_max=out[1], softmax_sum=out[2], attention_in=out[0].detach())
    for a, t in zip((dq, dk, dv, dqr, dkr), ts):
        torch.testing.assert_close(a, t.grad)
    assert dpse is None and dsink.numel() == 0


def test_v3_wrappers():
    q, k, v = rnd((2, 4, 30, 16), 1), rnd((2, 2, 30, 16), 2), rnd((2, 2, 30, 16), 3)
    lens = torch.tensor([30, 60], dtype=torch.int64)
    tq = q.transpose(1, 2).reshape(60, 4, 16)
    tk, tv = k.transpose(1, 2).reshape(60, 2, 16), v.transpose(1, 2).reshape(60, 2, 16)
    a = npufa.npu_fusion_attention(tq, tk, tv, 4, "TND", actual_seq_qlen=[30, 60], actual_seq_kvlen=[30, 60],
                                   keep_prob=0.8, seed=9, scale=0.3)
    b = npufa.npu_fusion_attention_v3(tq, tk, tv, 4, "TND", actual_seq_qlen=lens, actual_seq_kvlen=lens,
                                      keep_prob=0.8, scale=0.3)
    assert len(b) == 6 and b[4].dtype == torch.int64 and b[4].shape == (1,) and b[5].shape == (1,)
    # v3 draws its own seed; re-run v1 with v3's seed/offset: identical
    a = npufa.npu_fusion_attention(tq, tk, tv, 4, "TND", actual_seq_qlen=[30, 60], actual_seq_kvlen=[30, 60],
                                   keep_prob=0.8, seed=int(b[4]), offset=int(b[5]), scale=0.3)
    assert torch.equal(a[0], b[0])
    dy = rnd(a[0].shape, 4)
    g1 = npufa.npu_fusion_attention_grad(tq, tk, tv, dy, 4, "TND", softmax_max=a[1], softmax_sum=a[2],
                                         attention_in=a[0], keep_prob=0.8, seed=a[4], offset=a[5], numels=a[6],
                                         actual_seq_qlen=[30, 60], actual_seq_kvlen=[30, 60], scale_value=0.3)
    g3 = npufa.npu_fusion_attention_grad_v3(tq, tk, tv, dy, 4, "TND", softmax_max=b[1], softmax_sum=b[2],
                                            attention_in=b[0], keep_prob=0.8, seed=b[4], offset=b[5],
                                            actual_seq_qlen=lens, actual_seq_kvlen=lens, scale_value=0.3)
    for x, y in zip(g1[:3], g3[:3]):
        assert torch.equal(x, y)


def test_v2_opcheck():
    q, k, v = rnd((1, 2, 9, 8), 1), rnd((1, 2, 9, 8), 2), rnd((1, 2, 9, 8), 3)
    qr, kr = rnd((1, 2, 9, 4), 4), rnd((1, 2, 9, 4), 5)
    for t in (q, k, v, qr, kr):
        t.requires_grad_()
    args = (q, k, v, 2, "BNSD", rnd((2,), 6).abs(), None, CAUSAL, qr, kr, 0.5, 1.0, 2147483647, 2147483647, 0,
            None, None, None, 2, True, False, 2, [2], [0], "", None, None, 0, 0)
    torch.library.opcheck(torch.ops.npufa.npu_fusion_attention_v2.default, args)


def _bad(match, **kw):
    q, k, v = rnd((1, 2, 9, 8), 1), rnd((1, 2, 9, 8), 2), rnd((1, 2, 9, 8), 3)
    base = dict(scale=0.5)
    base.update(kw)
    with pytest.raises((ValueError, TypeError), match=match):
        npufa.npu_fusion_attention_v2(q, k, v, 2, "BNSD", **base)


def test_v2_errors():
    _bad(r"npu_fusion_attention_v2: pse_type must be 0, 1, 2 or 3, got 4", pse_type=4, pse=rnd((2,), 1))
    _bad(r"npu_fusion_attention_v2: pse_type 2 needs pse", pse_type=2)
    _bad(r"npu_fusion_attention_v2: pse_type 0 needs pse", pse_type=0)
    _bad(r"pse \(alibi slopes for pse_type 3\) must be float32, got float16", pse_type=3,
         pse=rnd((2,), 1, torch.float16))
    _bad(r"pse \(alibi slopes for pse_type 2\) must have shape \[B, N\] = \[1, 2\] or \[N\] = \[2\], got \[3\]",
         pse_type=2, pse=rnd((3,), 1))
    _bad(r"q_start_idx must hold one int, got \[1, 2\]", pse_type=2, pse=rnd((2,), 1), q_start_idx=[1, 2])
    _bad(r"query_rope and key_rope must be given together", query_rope=rnd((1, 2, 9, 4), 1))
    _bad(r"query_rope must match query's shape except the last dim", query_rope=rnd((1, 2, 8, 4), 1),
         key_rope=rnd((1, 2, 9, 4), 2))
    _bad(r"query_rope must have the query's dtype float32, got bfloat16",
         query_rope=rnd((1, 2, 9, 4), 1, torch.bfloat16), key_rope=rnd((1, 2, 9, 4), 2))
    q, k, v = rnd((1, 2, 9, 8), 1), rnd((1, 2, 12, 8), 2), rnd((1, 2, 12, 8), 3)
    with pytest.raises(ValueError, match=r"pse_type 2 needs Sq == Skv, got Sq = 9, Skv = 12"):
        npufa.npu_fusion_attention_v2(q, k, v, 2, "BNSD", pse=rnd((2,), 1), pse_type=2)


def test_v2_slopes_tnd_mode8_start_idx_only_batch0():
    """TND sparse_mode 8 with pse_type 2: q/kv_start_idx shift batch 0 only (§3.2), others use 0/0."""
    # lengths q [5, 7, 6], kv [7, 7, 6]: Sq_0 - Skv_0 + q_start - kv_start == 0 with q_start=2, kv_start=0
    N = 2
    q, k, v = rnd((18, N, 8), 1), rnd((20, N, 8), 2), rnd((20, N, 8), 3)
    cq, ck = [5, 12, 18], [7, 14, 20]
    kw = dict(actual_seq_qlen=cq, actual_seq_kvlen=ck, atten_mask=CAUSAL, sparse_mode=8, pre_tokens=7,
              next_tokens=2, pse=rnd((N,), 4).abs(), pse_type=2, q_start_idx=[2], kv_start_idx=[0], scale=0.4)
    out = npufa.npu_fusion_attention_v2(q, k, v, N, "TND", **kw)
    gold = ref.npu_fusion_attention_v2(q.double(), k.double(), v.double(), N, "TND", **kw)
    torch.testing.assert_close(out[0].double(), gold[0], rtol=1e-4, atol=2e-5)
    # batch 1 alone (as batch 0 of its own call with start indices 0) gives the same rows
    one = npufa.npu_fusion_attention_v2(q[5:12], k[7:14], v[7:14], N, "TND", actual_seq_qlen=[7],
                                        actual_seq_kvlen=[7], atten_mask=CAUSAL, sparse_mode=2,
                                        pse=kw["pse"], pse_type=2, scale=0.4)
    torch.testing.assert_close(out[0][5:12], one[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"sparse_mode 8 needs Sq_0 - Skv_0 \+ q_start_idx - kv_start_idx == 0"):
        npufa.npu_fusion_attention_v2(q, k, v, N, "TND", **{**kw, "q_start_idx": [1]})
