"""Gradients of npufa.npu_fusion_attention (autograd) and of npufa.npu_fusion_attention_grad (explicit)
against float64 torch autograd of npufa.reference.npu_fusion_attention.

Spec: /work/shared/spec/torch_npu_attention.md §1, §2, §4 (backward); project decisions 1-4
(/work/shared/spec/README.md).

Every case runs through ``run_grads``:
  1. npufa forward with requires_grad leaves (query, key, value, pse, sink), ``out.backward(dy)``;
  2. the float64 reference forward on the same values, ``out.backward(dy)`` (the reference is given the
     dropout mask the op drew: ``dropout_gen_mask(numels, keep_prob, seed, offset)`` from the forward's
     returned ints);
  3. every gradient compared (tolerances below);
  4. the explicit ``npufa.npu_fusion_attention_grad`` called with the forward's (attention_out,
     softmax_max, softmax_sum, seed, offset, numels) must return exactly autograd's gradients.

Tolerances
----------
* float32 inputs: each gradient within rtol 1e-4 / atol 1e-5 * max(1, max|ref grad|) of the reference.
* float16 / bfloat16 inputs (FlashAttention's rule): max|grad - ref| <= 3 x the error of the reference
  computed from dtype-rounded inputs/outputs (the inputs are already in the dtype; the outputs are the
  reference gradients rounded to the dtype) + a small slack.  dsink is float32 even for low-precision
  inputs; its "rounded-output" error is the effect on dsink of rounding attention_out to the dtype:
  sum_rows p_sink * |sum_d dY (O - round(O))| (spec §4.4: dsink = -sum p_sink * Delta, Delta = dY . O).
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
DTYPES = [F32, F16, BF16]
DT_IDS = ["fp32", "fp16", "bf16"]


PREFIX3072 = prefix_compressed_mask()


# ------------------------------------------------------------------------------------------------
# input helpers (same conventions as test_fusion_attention.py)
# ------------------------------------------------------------------------------------------------


def tnd_case(lq, lkv, Nq=4, Nkv=2, D=16, Dv=16, dtype=F32, seed=0, extra_q=0, extra_kv=0):
    q, k, v = tnd_qkv(sum(lq) + extra_q, sum(lkv) + extra_kv, Nq, Nkv, D, Dv, dtype, seed)
    return q, k, v, dict(actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv))


def prefix_mask(B, Sq, Skv, prefix):
    """The explicit [B,1,Sq,Skv] mask of sparse_mode 5 for `prefix`."""
    i = torch.arange(Sq).view(Sq, 1)
    j = torch.arange(Skv).view(1, Skv)
    return torch.stack([((j > i + Skv - Sq) & (j >= p)) for p in prefix]).unsqueeze(1)


def to_rows(x, layout, nq):
    """attention_out-like tensor -> [B, Nq, S, Dv] (TND: [1, Nq, T, Dv])."""
    lay = layout.upper()
    if lay == "BSH":
        b, s, h = x.shape
        return x.reshape(b, s, nq, h // nq).permute(0, 2, 1, 3)
    if lay == "SBH":
        s, b, h = x.shape
        return x.reshape(s, b, nq, h // nq).permute(1, 2, 0, 3)
    if lay == "BSND":
        return x.permute(0, 2, 1, 3)
    if lay == "BNSD":
        return x
    return x.permute(1, 0, 2).unsqueeze(0)


def stat_rows(x, layout, softmax_layout=""):
    """softmax_max/sum -> [B, Nq, S] (TND: [1, Nq, T]; N-major data unless softmax_layout == "TND")."""
    if layout.upper() != "TND":
        return x[..., 0]
    t, n, _ = x.shape
    if softmax_layout == "TND":
        return x.permute(1, 0, 2)[..., 0].unsqueeze(0)
    return x.reshape(n, t, 8)[..., 0].unsqueeze(0)


# ------------------------------------------------------------------------------------------------
# comparison
# ------------------------------------------------------------------------------------------------
SLACK = {F16: 1e-4, BF16: 1e-3}
NAMES = ("dq", "dk", "dv", "dpse", "dsink")


def check_grad(name, g, r, dtype, naive=None):
    """g: npufa gradient, r: float64 reference gradient, dtype: expected dtype of g."""
    assert g.dtype == dtype, (name, g.dtype, dtype)
    assert tuple(g.shape) == tuple(r.shape), (name, tuple(g.shape), tuple(r.shape))
    assert torch.isfinite(g).all(), f"{name}: non-finite gradient"
    if r.numel() == 0:
        return
    gd = g.to(F64)
    rmax = r.abs().max().item()
    if naive is None:  # an output in float32: plain float32 tolerance
        if dtype == F32:
            torch.testing.assert_close(gd, r, rtol=1e-4, atol=1e-5 * max(1.0, rmax), msg=lambda m: f"{name}: {m}")
            return
        naive = (r.to(dtype).to(F64) - r).abs().max().item()
    err = (gd - r).abs().max().item()
    slack = SLACK.get(dtype, SLACK[F16]) * max(1.0, rmax)
    assert err <= 3 * naive + slack, f"{name}: error {err:.3e} > 3 x naive {naive:.3e} + {slack:.1e}"


def dsink_naive(rres, dy, layout, nq, sink, dtype, softmax_layout=""):
    """Error bound on dsink from rounding attention_out to `dtype` (see module docstring)."""
    o = to_rows(rres[0], layout, nq)
    o_r = to_rows(rres[0].to(dtype).to(F64), layout, nq)
    g = to_rows(dy.to(F64), layout, nq)
    dd = (g * (o_r - o)).sum(-1).abs()
    m = stat_rows(rres[1], layout, softmax_layout)
    l = stat_rows(rres[2], layout, softmax_layout)
    valid = (l > 0) & (l < FLT_MAX)
    ps = torch.where(valid, torch.exp(sink.to(F64).view(1, -1, 1) - torch.where(valid, m, 0.0))
                     / torch.where(valid, l, 1.0), torch.zeros((), dtype=F64))
    return (ps * dd).sum((0, 2)).max().item()


def _ref_grads(out, leaves, dy, retain=False):
    if not out.requires_grad:
        return [torch.zeros_like(x) for x in leaves]
    gs = torch.autograd.grad(out, leaves, dy, retain_graph=retain, allow_unused=True)
    return [g if g is not None else torch.zeros_like(x) for g, x in zip(gs, leaves)]


def _rounded_output_grads(rres, leaves, dy, layout, nq, dtype, softmax_layout):
    """Float64 reference gradients when the backward is fed the forward output rounded to `dtype`
    (attention_in, as the op gets it).  Delta_i = dY_i . O_i enters dS = P (dP - Delta) only, and
    d lse_i / d s_ij = P_ij (sink included), so using O' instead of O is the gradient of
    sum(dY * O) - sum_i eps_i * lse_i with eps_i = dY_i . (O'_i - O_i) held constant."""
    out = rres[0]
    if not out.requires_grad:
        return [torch.zeros_like(x) for x in leaves]
    o_r = out.detach().to(dtype).to(F64)
    eps = (to_rows(dy.to(F64), layout, nq) * to_rows(o_r - out.detach(), layout, nq)).sum(-1)
    m = stat_rows(rres[1], layout, softmax_layout)
    l = stat_rows(rres[2], layout, softmax_layout)
    valid = ((l > 0) & (l < FLT_MAX)).detach()
    lse = torch.where(valid, m + torch.log(torch.where(valid, l, torch.ones((), dtype=F64))),
                      torch.zeros((), dtype=F64))
    loss = (out * dy.to(F64)).sum() - (eps * lse).sum()
    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [g if g is not None else torch.zeros_like(x) for g, x in zip(gs, leaves)]


_GRAD_KW = ("atten_mask", "keep_prob", "pre_tockens", "next_tockens", "inner_precise", "prefix", "actual_seq_qlen",
            "actual_seq_kvlen", "sparse_mode", "softmax_layout", "dropout_mask", "gen_mask_parallel", "sync")


def explicit_grad(q, k, v, dy, head_num, layout, res, pse=None, sink=None, **kw):
    """npufa.npu_fusion_attention_grad with the forward's outputs, as torch_npu's autograd calls it (§4.2)."""
    gkw = {a: kw[a] for a in _GRAD_KW if a in kw}
    if "scale" in kw:
        gkw["scale_value"] = kw["scale"]
    return npufa.npu_fusion_attention_grad(
        q.detach(), k.detach(), v.detach(), dy, head_num, layout, pse=None if pse is None else pse.detach(),
        sink=None if sink is None else sink.detach(), softmax_max=res[1].detach(), softmax_sum=res[2].detach(),
        softmax_in=res[3].detach(), attention_in=res[0].detach(), seed=res[4], offset=res[5], numels=res[6], **gkw)


class GradRun:
    pass


def run_grads(q, k, v, head_num, layout, *, pse=None, sink=None, dy_seed=4321, explicit=True, check=True, **kw):
    """Autograd of npufa vs float64 autograd of the reference; returns a GradRun with got/want dicts."""
    dtype = q.dtype
    inputs = {"dq": q, "dk": k, "dv": v, "dpse": pse, "dsink": sink}
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in inputs.items() if t is not None}
    res = npufa.npu_fusion_attention(leaves["dq"], leaves["dk"], leaves["dv"], head_num, layout,
                                     pse=leaves.get("dpse"), sink=leaves.get("dsink"), **kw)
    dy = rnd(tuple(res[0].shape), dtype, seed=dy_seed)
    res[0].backward(dy)
    got = {n: (leaves[n].grad if leaves[n].grad is not None else torch.zeros_like(leaves[n])) for n in leaves}

    rkw = dict(kw)
    if kw.get("keep_prob", 1.0) < 1.0 and kw.get("dropout_mask") is None:
        # the bits the op drew for its returned (seed, offset, numels) (decision 1)
        rkw["dropout_mask"] = npufa.dropout_gen_mask(res[6], kw["keep_prob"], res[4], res[5])
    rl = {n: t.detach().to(F64).requires_grad_(True) for n, t in inputs.items() if t is not None}
    rres = ref.npu_fusion_attention(rl["dq"], rl["dk"], rl["dv"], head_num, layout, pse=rl.get("dpse"),
                                    sink=rl.get("dsink"), **rkw)
    names = list(rl)
    want = dict(zip(names, _ref_grads(rres[0], [rl[n] for n in names], dy.to(F64), retain=dtype != F32)))
    naive_grads = None
    if dtype != F32:
        naive_grads = dict(zip(names, _rounded_output_grads(rres, [rl[n] for n in names], dy, layout, head_num,
                                                            dtype, kw.get("softmax_layout", ""))))

    if check:
        for n in got:
            exp_dtype = F32 if n == "dsink" else (pse.dtype if n == "dpse" else inputs[n].dtype)
            naive = None
            if naive_grads is not None:
                # error of the reference computed from the rounded forward output, rounded to the grad's dtype
                naive = (naive_grads[n].to(exp_dtype).to(F64) - want[n]).abs().max().item() if want[n].numel() else 0
                if n == "dsink":
                    naive = max(naive, dsink_naive(rres, dy, layout, head_num, sink, dtype,
                                                   kw.get("softmax_layout", "")))
            check_grad(n, got[n], want[n], exp_dtype, naive)

    if explicit:
        eg = explicit_grad(q, k, v, dy, head_num, layout, res, pse=pse, sink=sink, **kw)
        assert len(eg) == 5
        for n, x in zip(NAMES[:3], eg[:3]):
            assert torch.equal(x, got[n]), f"explicit grad {n} != autograd {n}"
        if pse is None:
            assert eg[3] is None
        else:
            # dpse of a broadcast pse is a cross-thread reduction whose order is not fixed
            # (see test_dpse_run_to_run_deterministic): equal up to summation-order noise
            tol = max(torch.finfo(pse.dtype).eps, 1e-5)
            torch.testing.assert_close(eg[3], got["dpse"], rtol=tol, atol=tol * max(1.0, got["dpse"].abs().max()),
                                       msg=lambda m: f"explicit dpse != autograd dpse: {m}")
        if sink is None:
            assert eg[4].dtype == F32 and tuple(eg[4].shape) == (0,)
        else:
            assert torch.equal(eg[4], got["dsink"]), "explicit dsink != autograd dsink"

    r = GradRun()
    r.res, r.rres, r.got, r.want, r.dy = res, rres, got, want, dy
    return r


# ------------------------------------------------------------------------------------------------
# layouts x dtypes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "BNSD", "TND", "bsnd", "tnd"])
def test_layouts_dtypes(layout, dtype):
    Nq, Nkv, D, Dv = 4, 2, 24, 16
    if layout.upper() == "TND":
        q, k, v, kw = tnd_case([17, 65, 3], [20, 70, 3], Nq=Nq, Nkv=Nkv, D=D, Dv=Dv, dtype=dtype, seed=3)
        run_grads(q, k, v, Nq, layout, scale=D ** -0.5, **kw)
        return
    q, k, v = dense_qkv(layout, 2, Nq, Nkv, 65, 70, D, Dv, dtype, seed=5)
    r = run_grads(q, k, v, Nq, layout, scale=D ** -0.5)
    assert all(r.got[n].abs().max() > 1e-2 for n in ("dq", "dk", "dv"))


def test_default_scale_and_scale_enters_dq():
    """scale defaults to 1.0; dq/dk carry the factor scale (§4.4)."""
    q, k, v = dense_qkv("BNSD", 1, 2, 2, 9, 11, 8, 8, seed=7)
    a = run_grads(q, k, v, 2, "BNSD")
    b = run_grads(q, k, v, 2, "BNSD", scale=1.0)
    for n in ("dq", "dk", "dv"):
        assert torch.equal(a.got[n], b.got[n])
    c = run_grads(q, k, v, 2, "BNSD", scale=0.0)  # uniform attention: dq = dk = 0, dv = mean of dy
    assert torch.all(c.got["dq"] == 0) and torch.all(c.got["dk"] == 0)
    torch.testing.assert_close(c.got["dv"], c.dy.sum(2, keepdim=True).expand(1, 2, 11, 8) / 11, rtol=1e-5,
                               atol=1e-6)


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
        q, k, v, kw = tnd_case([5, 40, 66], [9, 40, 70], Nq=Nq, Nkv=Nkv, D=D, Dv=Dv, seed=11)
        run_grads(q, k, v, Nq, layout, scale=0.25, atten_mask=TRIU2048, sparse_mode=3, **kw)
    else:
        q, k, v = dense_qkv(layout, 2, Nq, Nkv, 33, 70, D, Dv, seed=13)
        run_grads(q, k, v, Nq, layout, scale=0.25)


@pytest.mark.parametrize("ratio", [2, 3, 4])
def test_gqa_dkdv_is_group_sum(ratio):
    """dK/dV of a KV head = the sum over its G query heads (§1.3): same as MHA on repeated K/V, summed."""
    Nkv, Nq = 2, 2 * ratio
    q, k, v = dense_qkv("BNSD", 2, Nq, Nkv, 40, 66, 16, 8, seed=15)
    kw = dict(scale=0.25, atten_mask=TRIU2048, sparse_mode=3)
    g = run_grads(q, k, v, Nq, "BNSD", **kw)
    krep, vrep = k.repeat_interleave(ratio, dim=1), v.repeat_interleave(ratio, dim=1)
    m = run_grads(q, krep, vrep, Nq, "BNSD", dy_seed=4321, **kw)
    torch.testing.assert_close(g.got["dq"], m.got["dq"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.got["dk"], m.got["dk"].reshape(2, Nkv, ratio, 66, 16).sum(2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.got["dv"], m.got["dv"].reshape(2, Nkv, ratio, 66, 8).sum(2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D,Dv", [(1, 1), (17, 17), (17, 1), (17, 9), (80, 48), (64, 63), (96, 64), (128, 128),
                                  (256, 200)])
def test_head_dims(D, Dv, dtype):
    q, k, v = dense_qkv("BSND", 1, 3, 3, 40, 67, D, Dv, dtype, seed=D * 100 + Dv)
    run_grads(q, k, v, 3, "BSND", scale=1 / math.sqrt(D))


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
        kw = dict(atten_mask=rbool((Sq, Skv), 0.2, Sq + Skv), sparse_mode=0, pre_tockens=20, next_tockens=3)
    run_grads(q, k, v, 2, "BNSD", scale=0.25, **kw)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("Sq,Skv", [(1, 130), (63, 65), (130, 64), (65, 1)])
def test_tile_edges_lowp(Sq, Skv, dtype):
    q, k, v = dense_qkv("BSH", 2, 2, 2, Sq, Skv, 32, 32, dtype, seed=Sq + Skv)
    run_grads(q, k, v, 2, "BSH", scale=32 ** -0.5, atten_mask=TRIU2048, sparse_mode=2)


# ------------------------------------------------------------------------------------------------
# explicit masks and dense sparse modes 0-6
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mdtype", [torch.bool, torch.uint8], ids=["bool", "uint8"])
@pytest.mark.parametrize("mshape", ["BNSS", "B1SS", "11SS", "SS"])
@pytest.mark.parametrize("mode,pre,nxt", [(0, INT_MAX, INT_MAX), (0, 12, 4), (1, INT_MAX, INT_MAX), (1, 0, 0)])
def test_mask_shapes(mshape, mdtype, mode, pre, nxt):
    B, N, Sq, Skv = 2, 4, 45, 70
    q, k, v = dense_qkv("BNSD", B, N, 2, Sq, Skv, 16, 16, seed=21)
    full = {"BNSS": (B, N, Sq, Skv), "B1SS": (B, 1, Sq, Skv), "11SS": (1, 1, Sq, Skv), "SS": (Sq, Skv)}[mshape]
    m = rbool(full, 0.35, 99).to(mdtype)
    r = run_grads(q, k, v, N, "BNSD", scale=0.25, atten_mask=m, sparse_mode=mode, pre_tockens=pre, next_tockens=nxt)
    plain = run_grads(q, k, v, N, "BNSD", scale=0.25, explicit=False, check=False)
    assert (r.got["dq"] - plain.got["dq"]).abs().max() > 1e-3  # the mask has an effect on the gradient


MODE_CASES = [(0, INT_MAX, INT_MAX), (0, 30, 0), (0, 9, -3), (0, -3, 7), (1, INT_MAX, INT_MAX), (2, INT_MAX, INT_MAX),
              (3, INT_MAX, INT_MAX), (4, 10, 10), (4, 9, -3), (4, -3, 7), (4, INT_MAX, 0), (5, 3, 1), (6, 3, 1)]


@pytest.mark.parametrize("Sq,Skv", [(70, 70), (40, 100), (100, 40)])
@pytest.mark.parametrize("mode,pre,nxt", MODE_CASES)
def test_dense_sparse_modes(mode, pre, nxt, Sq, Skv):
    layout = ["BSH", "SBH", "BSND", "BNSD"][mode % 4]
    B, Nq = 2, 4
    q, k, v = dense_qkv(layout, B, Nq, 2, Sq, Skv, 16, 16, seed=Sq + Skv + mode)
    kw = dict(sparse_mode=mode, pre_tockens=pre, next_tockens=nxt, scale=0.25)
    if mode in (0, 1):
        kw["atten_mask"] = rbool((1, 1, Sq, Skv), 0.15, 3)
    elif mode in (2, 3, 4):
        kw["atten_mask"] = TRIU2048
    else:
        prefix = [Skv - Sq + 5, Skv] if Sq <= Skv else [0, Skv // 2]
        kw["prefix"] = prefix
        kw["atten_mask"] = PREFIX3072 if mode == 6 else prefix_mask(B, Sq, Skv, prefix)
    run_grads(q, k, v, Nq, layout, **kw)


@pytest.mark.parametrize("Sq,Skv,prefix", [(70, 70, [0, 33]), (40, 100, [60, 100]), (100, 40, [0, 17]),
                                           (64, 130, [66, 129]), (130, 65, [40, 65])])
@pytest.mark.parametrize("mode,mform", [(5, "B1SS"), (5, "BNSS"), (6, "3072")])
def test_prefix_modes(Sq, Skv, prefix, mode, mform):
    q, k, v = dense_qkv("BNSD", 2, 2, 2, Sq, Skv, 16, 16, seed=Sq + 2 * Skv)
    if mode == 6:
        m = PREFIX3072
    else:
        m = prefix_mask(2, Sq, Skv, prefix)
        if mform == "BNSS":
            m = m.expand(2, 2, Sq, Skv).contiguous()
    run_grads(q, k, v, 2, "BNSD", scale=0.25, atten_mask=m, sparse_mode=mode, prefix=prefix, pre_tockens=3,
              next_tockens=1)


@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4, 5, 6])
def test_no_mask_is_full_dense(mode):
    """No atten_mask: every sparse mode / pre / next is ignored in the backward too (§1.6 note 1)."""
    q, k, v = dense_qkv("BSND", 2, 4, 2, 50, 70, 16, 16, seed=31)
    r = run_grads(q, k, v, 4, "BSND", scale=0.25, sparse_mode=mode, pre_tockens=0, next_tockens=0,
                  prefix=[1, 2] if mode in (5, 6) else None)
    full = run_grads(q, k, v, 4, "BSND", scale=0.25, explicit=False, check=False)
    for n in ("dq", "dk", "dv"):
        assert torch.equal(r.got[n], full.got[n])


# ------------------------------------------------------------------------------------------------
# TND: sparse modes 0,1,2,3,4,6,7,8, zero-length batches, softmax_layout
# ------------------------------------------------------------------------------------------------
LQ, LKV = [30, 0, 65, 20], [40, 0, 70, 64]  # Sq_b <= Skv_b, a zero-length batch in the middle


@pytest.mark.parametrize("pre,nxt", [(INT_MAX, INT_MAX), (5, 3), (40, 0), (-3, 10)])
@pytest.mark.parametrize("mform", ["max", "sum"])
@pytest.mark.parametrize("mode", [0, 1])
def test_tnd_modes_0_1(mode, mform, pre, nxt):
    q, k, v, kw = tnd_case(LQ, LKV, seed=41)
    shape = (max(LQ), max(LKV)) if mform == "max" else (sum(LQ), sum(LKV))
    run_grads(q, k, v, 4, "TND", scale=0.25, atten_mask=rbool(shape, 0.2, 8), sparse_mode=mode, pre_tockens=pre,
              next_tockens=nxt, **kw)


@pytest.mark.parametrize("lq,lkv", [(LQ, LKV), ([63, 1, 65, 0], [64, 130, 66, 0])])
@pytest.mark.parametrize("mode,pre,nxt", [(2, 0, 0), (3, 0, 0), (4, INT_MAX, INT_MAX), (4, 10, 0), (4, 0, 5),
                                          (4, 8, -1)])
def test_tnd_modes_2_3_4(lq, lkv, mode, pre, nxt):
    q, k, v, kw = tnd_case(lq, lkv, seed=43)
    run_grads(q, k, v, 4, "TND", scale=0.25, atten_mask=TRIU2048, sparse_mode=mode, pre_tockens=pre,
              next_tockens=nxt, **kw)


def test_tnd_mode2_sq_gt_skv():
    q, k, v, kw = tnd_case([40, 10], [20, 30], seed=45)
    run_grads(q, k, v, 4, "TND", scale=0.25, atten_mask=TRIU2048, sparse_mode=2, **kw)


@pytest.mark.parametrize("lq,lkv,prefix", [([30, 0, 65, 20], [40, 0, 70, 64], [10, 0, 5, 64]),
                                           ([20, 50], [10, 50], [3, 0])])
def test_tnd_mode6(lq, lkv, prefix):
    q, k, v, kw = tnd_case(lq, lkv, seed=47)
    run_grads(q, k, v, 4, "TND", scale=0.25, atten_mask=PREFIX3072, sparse_mode=6, prefix=prefix, **kw)


@pytest.mark.parametrize("lq,lkv", [([30, 0, 65, 20, 0], [40, 0, 70, 64, 0]), ([3, 2], [3, 6])])
@pytest.mark.parametrize("nxt", [0, -2])
def test_tnd_mode7(lq, lkv, nxt):
    last = [b for b in range(len(lq)) if lq[b] > 0][-1]
    q, k, v, kw = tnd_case(lq, lkv, seed=49)
    run_grads(q, k, v, 4, "TND", scale=0.25, atten_mask=TRIU2048, sparse_mode=7, pre_tockens=lkv[last],
              next_tockens=nxt, **kw)


@pytest.mark.parametrize("lq,lkv,nxt", [([0, 3, 5], [0, 4, 4], 1), ([40, 20, 70], [50, 20, 65], 5),
                                        ([40, 20, 70], [50, 20, 65], -10), ([66], [65], 1)])
def test_tnd_mode8(lq, lkv, nxt):
    first = [b for b in range(len(lq)) if lq[b] > 0][0]
    q, k, v, kw = tnd_case(lq, lkv, seed=51)
    run_grads(q, k, v, 4, "TND", scale=0.25, atten_mask=TRIU2048, sparse_mode=8, pre_tockens=lkv[first],
              next_tockens=nxt, **kw)


@pytest.mark.parametrize("softmax_layout", ["", "TND"])
@pytest.mark.parametrize("cq,ckv,Tq,Tkv", [([2, 2, 7, 10], [3, 3, 9, 12], 10, 12),
                                           ([2, 5, 9, 0, 0], [3, 6, 10, 0, 0], 12, 10),
                                           ([2, 5, 9, 0, 0], [3, 6, 10, 0, 0], 9, 14),
                                           ([0, 4, 4, 70], [0, 6, 6, 90], 75, 95)])
def test_tnd_zero_length_batches(cq, ckv, Tq, Tkv, softmax_layout):
    """Zero-length batches, trailing zeros, T larger than the covered rows: uncovered rows get 0 grads."""
    Nq, Nkv = 4, 2
    q, k, v = tnd_qkv(Tq, Tkv, Nq, Nkv, 16, 8, seed=61)
    r = run_grads(q, k, v, Nq, "TND", actual_seq_qlen=cq, actual_seq_kvlen=ckv, softmax_layout=softmax_layout,
                  scale=0.25)
    assert torch.all(r.got["dq"][max(cq):] == 0)
    assert torch.all(r.got["dk"][max(ckv):] == 0) and torch.all(r.got["dv"][max(ckv):] == 0)


def test_tnd_softmax_layout_stats_are_used():
    """The grad reads softmax_max/sum in the layout softmax_layout names: TND stats given as N-major
    (or the reverse) give a different (wrong) gradient, the right ones the reference gradient."""
    q, k, v, kw = tnd_case([5, 7, 3], [6, 7, 9], Nq=3, Nkv=3, seed=63)
    r = run_grads(q, k, v, 3, "TND", softmax_layout="TND", scale=0.5, **kw)
    res = r.res
    T = 15
    swapped = [x.detach().permute(1, 0, 2).reshape(T, 3, 8) for x in res[1:3]]  # t-major -> N-major data
    g_ok = npufa.npu_fusion_attention_grad(q, k, v, r.dy, 3, "TND", softmax_max=swapped[0], softmax_sum=swapped[1],
                                           attention_in=res[0].detach(), scale_value=0.5, **kw)
    torch.testing.assert_close(g_ok[0].double(), r.want["dq"], rtol=1e-4, atol=1e-5)
    g_bad = npufa.npu_fusion_attention_grad(q, k, v, r.dy, 3, "TND", softmax_max=swapped[0], softmax_sum=swapped[1],
                                            attention_in=res[0].detach(), scale_value=0.5, softmax_layout="TND", **kw)
    assert (g_bad[0].double() - r.want["dq"]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# pse (decision 3: dpse = sum over the broadcast dimensions, in the pse's own shape)
# ------------------------------------------------------------------------------------------------
PSE_SHAPES = {"BNSS": lambda B, N, Sq, Skv: (B, N, Sq, Skv), "BN1S": lambda B, N, Sq, Skv: (B, N, 1, Skv),
              "1NSS": lambda B, N, Sq, Skv: (1, N, Sq, Skv), "1N1S": lambda B, N, Sq, Skv: (1, N, 1, Skv)}


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("pshape", list(PSE_SHAPES))
@pytest.mark.parametrize("layout,masking", [("BNSD", None), ("BSH", 3), ("SBH", 0)])
def test_pse_dense(pshape, dtype, layout, masking):
    B, Nq, Nkv, Sq, Skv = 2, 4, 2, 67, 45
    q, k, v = dense_qkv(layout, B, Nq, Nkv, Sq, Skv, 16, 16, dtype, seed=81)
    pse = rnd(PSE_SHAPES[pshape](B, Nq, Sq, Skv), dtype, seed=82, scale=2.0)
    kw = {}
    if masking == 3:
        kw = dict(atten_mask=TRIU2048, sparse_mode=3)
    elif masking == 0:
        kw = dict(atten_mask=rbool((Sq, Skv), 0.2, 83), pre_tockens=30, next_tockens=5)
    r = run_grads(q, k, v, Nq, layout, pse=pse, scale=0.3, **kw)
    assert tuple(r.got["dpse"].shape) == tuple(pse.shape) and r.got["dpse"].dtype == dtype
    assert r.got["dpse"].abs().max() > 1e-3


@pytest.mark.parametrize("pshape", ["BN1S", "1NSS", "1N1S"])
def test_dpse_broadcast_is_sum_of_full(pshape):
    """Decision 3, against npufa itself: dpse of a broadcast pse == the full BNSS dpse summed over the
    broadcast dimensions."""
    B, Nq, Sq, Skv = 2, 4, 40, 70
    q, k, v = dense_qkv("BSND", B, Nq, 2, Sq, Skv, 16, 16, seed=84)
    pse = rnd(PSE_SHAPES[pshape](B, Nq, Sq, Skv), seed=85)
    kw = dict(scale=0.3, atten_mask=TRIU2048, sparse_mode=4, pre_tockens=30, next_tockens=10)
    small = run_grads(q, k, v, Nq, "BSND", pse=pse, **kw)
    full = run_grads(q, k, v, Nq, "BSND", pse=pse.expand(B, Nq, Sq, Skv).contiguous(), **kw)
    d = full.got["dpse"]
    dims = [i for i in range(4) if pse.shape[i] == 1]
    torch.testing.assert_close(small.got["dpse"], d.sum(dims, keepdim=True), rtol=1e-5, atol=1e-5)
    for n in ("dq", "dk", "dv"):
        torch.testing.assert_close(small.got[n], full.got[n], rtol=1e-5, atol=1e-6)


def test_dpse_run_to_run_deterministic():
    """The same backward call gives bitwise the same dpse every time and at 1 or 2 threads, as it does for
    dq, dk, dv (a 1N1S pse: each element sums every row of every batch)."""
    q, k, v = dense_qkv("BNSD", 2, 4, 4, 512, 256, 32, 32, seed=1)
    pse = rnd((1, 4, 1, 256), seed=2)
    r = run_grads(q, k, v, 4, "BNSD", pse=pse, scale=0.2, explicit=False, check=False)
    outs = []
    try:
        for nt in (1, 2, 2, 2, 2):
            npufa.set_num_threads(nt)
            outs.append(explicit_grad(q, k, v, r.dy, 4, "BNSD", r.res, pse=pse, scale=0.2))
    finally:
        npufa.set_num_threads(None)
    for o in outs[1:]:
        for i in range(3):
            assert torch.equal(o[i], outs[0][i])
    for o in outs[1:]:
        assert torch.equal(o[3], outs[0][3]), "dpse differs between identical calls"


@pytest.mark.parametrize("fill,sc", [(float("-inf"), 0.3), (torch.finfo(F32).min, 0.3), (torch.finfo(F32).min, 3.0)])
def test_pse_with_infinite_entries(fill, sc):
    """pse = -inf / float32 lowest on some keys of every row (a soft mask): those positions get dpse 0,
    everything is finite and matches the reference."""
    q, k, v = dense_qkv("BNSD", 1, 2, 2, 70, 130, 16, 16, seed=86)
    pse = rnd((1, 2, 70, 130), seed=87)
    pse[..., :100] = fill
    r = run_grads(q, k, v, 2, "BNSD", pse=pse, scale=sc)
    assert torch.all(r.got["dpse"][..., :100] == 0)


def test_pse_strided_views():
    """A transposed pse and an expanded (stride-0) pse view: autograd reduces to the base tensor's grad."""
    q, k, v = dense_qkv("BNSD", 2, 4, 2, 40, 70, 16, 16, seed=140)
    r = run_grads(q, k, v, 4, "BNSD", pse=rnd((2, 4, 70, 40), seed=141).transpose(2, 3), scale=0.3)
    assert tuple(r.got["dpse"].shape) == (2, 4, 40, 70)
    base = rnd((1, 4, 1, 70), seed=142).requires_grad_(True)
    out = npufa.npu_fusion_attention(q, k, v, 4, "BNSD", pse=base.expand(2, 4, 40, 70), scale=0.3)[0]
    dy = rnd(tuple(out.shape), seed=143)
    out.backward(dy)
    b64 = base.detach().double().requires_grad_(True)
    ro = ref.npu_fusion_attention(q.double(), k.double(), v.double(), 4, "BNSD", pse=b64.expand(2, 4, 40, 70),
                                  scale=0.3)[0]
    ro.backward(dy.double())
    torch.testing.assert_close(base.grad.double(), b64.grad, rtol=1e-4, atol=1e-5)


def alibi_gather_index(S):
    """Positions (i, j), j <= i, of an [S, S] alibi bias and the (row, col) of the [1024, S] table they read
    (§2.5): i >= R: C[i-R][j]; i < R: C[i mod 1024][j + R + (i mod 1024) - i], R = S - 1024."""
    R = S - 1024
    i = torch.arange(S).view(S, 1)
    j = torch.arange(S).view(1, S)
    m = i % 1024
    row = torch.where(i >= R, i - R, m).expand(S, S)
    col = torch.where(i >= R, j, j + R + m - i)
    valid = j <= i
    assert torch.all((col[valid] >= 0) & (col[valid] < S))
    return row, col, valid


def alibi_expand(C):
    """Compressed [P, N, 1024, S] -> full [P, N, S, S] (zeros above the diagonal)."""
    S = C.shape[-1]
    row, col, valid = alibi_gather_index(S)
    full = C[:, :, row.clamp(0, 1023), col.clamp(0, S - 1)]
    return torch.where(valid, full, torch.zeros((), dtype=C.dtype))


def alibi_reduce(dfull):
    """Full-pse gradient [P, N, S, S] -> the compressed table's gradient: for every table element, the sum
    of the full gradient over the positions that read it."""
    P, N, S, _ = dfull.shape
    row, col, valid = alibi_gather_index(S)
    idx = (row * S + col)[valid]
    out = torch.zeros(P * N, 1024 * S, dtype=dfull.dtype)
    out.index_add_(1, idx, dfull.reshape(P * N, S, S)[:, valid])
    return out.reshape(P, N, 1024, S)


@pytest.mark.parametrize("pb,mode", [(1, 3), pytest.param(2, 2, marks=pytest.mark.slow),
                                     pytest.param(1, 0, marks=pytest.mark.slow)])
def test_pse_alibi_compressed_dense(pb, mode):
    """pse [B or 1, N, 1024, S] with Sq = Skv = 1100, causal: dpse in the compressed shape = the sum of the
    full-pse gradient over the positions that read each element (decision 3)."""
    B, N, S = (2 if pb == 2 else 1), 2, 1100
    q, k, v = dense_qkv("BNSD", B, N, N, S, S, 8, 8, seed=85)
    C = rnd((pb, N, 1024, S), seed=86)
    if mode == 0:
        kw = dict(atten_mask=torch.triu(torch.ones(S, S, dtype=torch.bool), 1), sparse_mode=0, pre_tockens=INT_MAX,
                  next_tockens=0)
    else:
        kw = dict(atten_mask=TRIU2048, sparse_mode=mode)
    r = run_grads(q, k, v, N, "BNSD", pse=C, scale=0.3, **kw)
    assert tuple(r.got["dpse"].shape) == (pb, N, 1024, S)
    # the reference's own gather is checked against an explicit scatter-sum of the full-pse gradient
    full = alibi_expand(C)
    fr = run_grads(q, k, v, N, "BNSD", pse=full, scale=0.3, explicit=False, **kw)
    torch.testing.assert_close(r.want["dpse"], alibi_reduce(fr.want["dpse"]), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(r.got["dpse"], alibi_reduce(fr.got["dpse"].double()).float(), rtol=1e-4, atol=1e-5)
    # table entries nobody reads (row r < 1024 - ... : col > row + R) get 0
    R = S - 1024
    rr = torch.arange(1024).view(1024, 1)
    cc = torch.arange(S).view(1, S)
    unread = cc > rr + R
    assert torch.all(r.got["dpse"][..., unread] == 0)


@pytest.mark.parametrize("pform", ["BNSS", "1NSS", "BN1S", "flatBNSS", "flatBN1S"])
def test_pse_tnd(pform):
    """TND pse: 4-D local forms ([B or 1, N, maxSq or 1, maxSkv], indexed locally) and flat 1-D forms."""
    lq, lkv = [5, 40, 70], [9, 40, 66]
    Nq = 4
    q, k, v, kw = tnd_case(lq, lkv, Nq=Nq, Nkv=2, seed=87)
    mq, mkv = max(lq), max(lkv)
    shape = {"BNSS": (3, Nq, mq, mkv), "1NSS": (1, Nq, mq, mkv), "BN1S": (3, Nq, 1, mkv),
             "flatBNSS": (Nq * sum(a * b for a, b in zip(lq, lkv)),), "flatBN1S": (Nq * sum(lkv),)}[pform]
    pse = rnd(shape, seed=88)
    r = run_grads(q, k, v, Nq, "TND", pse=pse, scale=0.3, **kw)
    d = r.got["dpse"]
    assert tuple(d.shape) == shape
    if pform == "BNSS":  # elements outside each batch's [Sq_b, Skv_b] window are not read: 0
        for b, (sq, skv) in enumerate(zip(lq, lkv)):
            assert torch.all(d[b, :, sq:] == 0) and torch.all(d[b, :, :, skv:] == 0)
            assert d[b, :, :sq, :skv].abs().max() > 0


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_pse_tnd_masked_mode3(dtype):
    q, k, v, kw = tnd_case([30, 65, 20], [40, 70, 64], dtype=dtype, seed=89)
    pse = rnd((3, 4, 65, 70), dtype, seed=90)
    run_grads(q, k, v, 4, "TND", pse=pse, scale=0.3, atten_mask=TRIU2048, sparse_mode=3, softmax_layout="TND", **kw)


@pytest.mark.slow
def test_pse_tnd_alibi_compressed():
    lq = [1100, 40]
    q, k, v, kw = tnd_case(lq, lq, Nq=2, Nkv=1, D=8, Dv=8, seed=89)
    pse = rnd((2, 2, 1024, 1100), seed=90)
    r = run_grads(q, k, v, 2, "TND", pse=pse, scale=0.3, atten_mask=TRIU2048, sparse_mode=3, **kw)
    assert tuple(r.got["dpse"].shape) == (2, 2, 1024, 1100)


# ------------------------------------------------------------------------------------------------
# sink (dsink, decision 2)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("layout", ["BNSD", "BSH", "TND"])
def test_sink(layout, dtype):
    Nq, Nkv = 4, 2
    sink = torch.tensor([-1.0, 0.5, 3.0, 8.0])
    if layout == "TND":
        q, k, v, kw = tnd_case([30, 20], [40, 10], Nq=Nq, Nkv=Nkv, dtype=dtype, seed=91)
        kw.update(atten_mask=TRIU2048, sparse_mode=2)
    else:
        q, k, v = dense_qkv(layout, 2, Nq, Nkv, 40, 30, 16, 16, dtype, seed=92)
        kw = dict(atten_mask=TRIU2048, sparse_mode=3)  # Sq > Skv: some rows fully masked
    r = run_grads(q, k, v, Nq, layout, sink=sink, scale=0.3, **kw)
    ds = r.got["dsink"]
    assert ds.dtype == F32 and tuple(ds.shape) == (Nq,)
    assert ds.abs().min() > 1e-6


def test_dsink_hand():
    """Single key, q.k scale = s: out = v * w, w = e^s / (e^s + e^sink); d out / d sink = -v * w * (1 - w)."""
    q = torch.ones(1, 1, 1, 2)
    k = torch.ones(1, 1, 1, 2)
    v = torch.full((1, 1, 1, 2), 3.0)
    sink = torch.tensor([2.0], requires_grad=True)
    out = npufa.npu_fusion_attention(q, k, v, 1, "BNSD", scale=0.5, sink=sink)[0]
    out.sum().backward()
    w = math.e / (math.e + math.e ** 2)
    assert sink.grad.item() == pytest.approx(-2 * 3 * w * (1 - w), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# dropout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["BSH", "SBH", "BSND", "BNSD"])
@pytest.mark.parametrize("keep_prob,seed,offset", [(0.9, 1, 0), (0.5, 12345, 16), (0.75, 2 ** 40 + 7, 2 ** 33 + 5)])
def test_dropout_generated_dense(layout, dtype, keep_prob, seed, offset):
    """seed/offset regenerated in the backward: grads == reference grads with
    dropout_mask = dropout_gen_mask(numels, keep_prob, seed, offset) (forward's returned ints)."""
    B, Nq, Nkv, Sq, Skv = 2, 4, 2, 67, 70
    q, k, v = dense_qkv(layout, B, Nq, Nkv, Sq, Skv, 16, 16, dtype, seed=101)
    r = run_grads(q, k, v, Nq, layout, scale=0.25, keep_prob=keep_prob, seed=seed, offset=offset)
    assert r.res[4:] == (seed, offset, B * Nq * Sq * Skv)
    nodrop = run_grads(q, k, v, Nq, layout, scale=0.25, explicit=False, check=False)
    assert (r.got["dv"].double() - nodrop.got["dv"].double()).abs().max() > 1e-2


@pytest.mark.parametrize("cq,ckv", [([30, 30, 95, 115], [40, 40, 110, 174]), ([2, 5, 9, 0, 0], [3, 6, 10, 0, 0])])
@pytest.mark.parametrize("keep_prob", [0.6, 0.95])
def test_dropout_generated_tnd(cq, ckv, keep_prob):
    """TND: numels from the raw cumulative lists (trailing-zero quirk included) regenerates the same bits."""
    q, k, v = tnd_qkv(max(cq), max(ckv), 4, 2, 16, 16, seed=103)
    sink = rnd((4,), seed=104)
    run_grads(q, k, v, 4, "TND", scale=0.25, keep_prob=keep_prob, seed=77, offset=64, sink=sink, actual_seq_qlen=cq,
              actual_seq_kvlen=ckv)


def test_dropout_seed_zero_drawn():
    """seed 0: the forward draws a seed from torch's generator and returns it; the backward uses it."""
    q, k, v = dense_qkv("BNSD", 2, 2, 2, 40, 50, 16, 16, seed=115)
    torch.manual_seed(1234)
    r = run_grads(q, k, v, 2, "BNSD", keep_prob=0.7, offset=32, scale=0.3)
    assert r.res[4] != 0 and r.res[5] == 32


@pytest.mark.parametrize("layout", ["BSH", "BNSD", "TND"])
def test_dropout_external_mask(layout):
    """An external dropout_mask reaches the backward (npufa extension of the grad op)."""
    Nq, Nkv, keep_prob = 4, 2, 0.7
    g = torch.Generator().manual_seed(5)
    if layout == "TND":
        lq, lkv = [10, 0, 70], [20, 0, 65]
        q, k, v, kw = tnd_case(lq, lkv, Nq=Nq, Nkv=Nkv, seed=105)
        elements = Nq * sum(a * b for a, b in zip(lq, lkv))
    else:
        q, k, v = dense_qkv(layout, 2, Nq, Nkv, 33, 65, 16, 16, seed=105)
        kw = {}
        elements = 2 * Nq * 33 * 65
    mask = torch.randint(0, 256, (math.ceil(elements / 128) * 16,), generator=g, dtype=torch.uint8)
    r = run_grads(q, k, v, Nq, layout, scale=0.25, keep_prob=keep_prob, dropout_mask=mask, seed=3, offset=9, **kw)
    # the same mask drawn from a different generator state gives other gradients
    other = run_grads(q, k, v, Nq, layout, scale=0.25, keep_prob=keep_prob, seed=3, offset=9, check=False,
                      explicit=False, **kw)
    assert (r.got["dv"] - other.got["dv"]).abs().max() > 1e-2


def test_dropout_gen_mask_forward_then_regenerated_backward():
    """torch_npu's wiring (§4.2): a forward mask made by dropout_gen_mask(seed, offset) is reproduced by
    the grad op from (seed, offset, numels) alone, without passing the mask."""
    B, Nq, Sq, Skv = 2, 2, 30, 70
    q, k, v = dense_qkv("BSND", B, Nq, Nq, Sq, Skv, 16, 16, seed=106)
    numels = B * Nq * Sq * Skv
    mask = npufa.dropout_gen_mask(numels, 0.6, 99, 12)
    r = run_grads(q, k, v, Nq, "BSND", scale=0.3, keep_prob=0.6, dropout_mask=mask, seed=99, offset=12)
    gkw = dict(scale_value=0.3, keep_prob=0.6, seed=99, offset=12, numels=numels)
    eg = npufa.npu_fusion_attention_grad(q, k, v, r.dy, Nq, "BSND", softmax_max=r.res[1], softmax_sum=r.res[2],
                                         attention_in=r.res[0].detach(), **gkw)
    for n, x in zip(NAMES[:3], eg[:3]):
        torch.testing.assert_close(x, r.got[n], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# fully masked rows and empty KV
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", [0, 1])
def test_fully_masked_rows(mode, dtype):
    B, N, Sq, Skv = 2, 2, 70, 66
    q, k, v = dense_qkv("BNSD", B, N, N, Sq, Skv, 16, 16, dtype, seed=71)
    m = rbool((B, N, Sq, Skv), 0.3, 72)
    dead = [(0, 0, 3), (0, 1, 64), (1, 0, 0), (1, 1, 69)] + [(1, n, r) for n in range(2) for r in range(10, 20)]
    for b, n, i in dead:
        m[b, n, i] = True
    sink = rnd((N,), seed=73)
    r = run_grads(q, k, v, N, "BNSD", scale=0.25, atten_mask=m, sparse_mode=mode, sink=sink)
    for b, n, i in dead:
        assert torch.all(r.got["dq"][b, n, i] == 0), (b, n, i)
    assert r.got["dq"][0, 0, 4].abs().max() > 0  # neighbours are normal
    # dk/dv do not see the dead rows: changing their dy changes nothing
    dy2 = r.dy.clone()
    for b, n, i in dead:
        dy2[b, n, i] = 100.0
    eg = explicit_grad(q, k, v, dy2, N, "BNSD", r.res, sink=sink, scale=0.25, atten_mask=m, sparse_mode=mode)
    for n, x in zip(NAMES, eg):
        if n in ("dpse",):
            continue
        assert torch.equal(x, r.got[n]), n


@pytest.mark.parametrize("layout", ["BSH", "TND"])
def test_fully_masked_rows_by_band(layout):
    """Mode 0 band with negative next (dense) / mode 3 with Sq_b > Skv_b (dense rows cut) give dead rows."""
    if layout == "TND":
        q, k, v, kw = tnd_case([20, 30], [20, 35], seed=74)
        kw.update(atten_mask=torch.zeros(30, 35, dtype=torch.bool), sparse_mode=0, pre_tockens=10, next_tockens=0)
        run_grads(q, k, v, 4, "TND", scale=0.3, **kw)
        return
    q, k, v = dense_qkv("BSH", 1, 2, 2, 40, 40, 8, 8, seed=73)
    for ip in (0, 1, 2):
        r = run_grads(q, k, v, 2, "BSH", atten_mask=torch.zeros(40, 40, dtype=torch.bool), sparse_mode=0,
                      pre_tockens=10, next_tockens=-3, inner_precise=ip)
        assert torch.all(r.got["dq"][:, :3] == 0)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", DENSE + ("TND",))
def test_empty_kv(layout, dtype):
    """Skv = 0: output 0 does not depend on q: dq = 0, dk/dv empty, dsink = 0 (§1.8)."""
    B, Nq, Nkv, Sq, D, Dv = 2, 4, 2, 9, 16, 8
    if layout == "TND":
        q, k, v = tnd_qkv(Sq, 0, Nq, Nkv, D, Dv, dtype, seed=75)
        kw = dict(actual_seq_qlen=[4, 9], actual_seq_kvlen=[0, 0])
    else:
        q, k, v = dense_qkv(layout, B, Nq, Nkv, Sq, 0, D, Dv, dtype, seed=75)
        kw = {}
    sink = rnd((Nq,), seed=76)
    r = run_grads(q, k, v, Nq, layout, scale=0.3, sink=sink, **kw)
    assert torch.all(r.got["dq"] == 0) and r.got["dq"].numel() > 0
    assert r.got["dk"].numel() == 0 and r.got["dv"].numel() == 0
    assert torch.all(r.got["dsink"] == 0)


def test_empty_kv_tnd_one_batch():
    """A TND batch with Sq_b > 0 and Skv_b = 0 next to normal batches: npufa computes it like empty KV
    (forward rows 0, stats 0), so its dq rows are 0 and the other batches are unaffected."""
    q, k, v = tnd_qkv(12, 10, 2, 2, 8, 8, seed=77)
    r = run_grads(q, k, v, 2, "TND", actual_seq_qlen=[4, 8, 12], actual_seq_kvlen=[5, 5, 10], scale=0.3,
                  sink=rnd((2,), seed=78))
    assert torch.all(r.got["dq"][4:8] == 0)
    assert r.got["dq"][:4].abs().max() > 0 and r.got["dq"][8:].abs().max() > 0


@pytest.mark.parametrize("case", ["Sq0", "B0", "D0", "Dv0", "tnd_all_empty", "Sq0_pse_sink"])
def test_empty_shapes(case):
    """Empty query / batch / head dims: grads of the right shapes, every element written (0 where defined)."""
    pse = sink = None
    kw = {}
    if case in ("Sq0", "Sq0_pse_sink"):
        q, k, v = dense_qkv("BNSD", 2, 2, 2, 0, 7, 8, 8, seed=1)
        layout = "BNSD"
        if case == "Sq0_pse_sink":
            pse, sink = rnd((2, 2, 1, 7), seed=2), rnd((2,), seed=3)
    elif case == "B0":
        q, k, v = dense_qkv("BSH", 0, 2, 2, 5, 7, 8, 8, seed=1)
        layout = "BSH"
    elif case == "D0":
        q, k, v = torch.zeros(1, 2, 3, 0), torch.zeros(1, 2, 5, 0), torch.zeros(1, 2, 5, 0)
        layout = "BNSD"
    elif case == "Dv0":
        q, k, v = dense_qkv("BNSD", 1, 2, 2, 3, 5, 4, 0, seed=1)
        layout = "BNSD"
    else:
        q, k, v = tnd_qkv(4, 4, 2, 2, 8, 8, seed=1)
        layout = "TND"
        kw = dict(actual_seq_qlen=[0, 0], actual_seq_kvlen=[0, 0])
    r = run_grads(q, k, v, 2, layout, pse=pse, sink=sink, **kw)
    for n, x in r.got.items():
        assert torch.all(x == 0), n


# ------------------------------------------------------------------------------------------------
# gradient plumbing: stride-0 / non-contiguous dy, non-contiguous inputs, partial requires_grad,
# thread independence
# ------------------------------------------------------------------------------------------------
def test_sum_loss_stride0_dy_and_transposed_use():
    """out.sum() hands the backward an expanded (stride-0) dy; a transposed use a non-contiguous one."""
    q, k, v = dense_qkv("BSH", 2, 4, 2, 33, 40, 16, 16, seed=130)
    for loss in (lambda o: o.sum(), lambda o: (o.transpose(0, 1) * torch.arange(33.0).view(33, 1, 1)).sum()):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = npufa.npu_fusion_attention(*leaves, 4, "BSH", scale=0.25)[0]
        loss(out).backward()
        rl = [x.double().requires_grad_() for x in (q, k, v)]
        loss(ref.npu_fusion_attention(*rl, 4, "BSH", scale=0.25)[0]).backward()
        for a, b in zip(leaves, rl):
            torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)


def test_noncontiguous_inputs():
    """Strided q/k/v views (a BSND slice of a wider tensor, an SBH transpose)."""
    big = rnd((2, 40, 4, 24), seed=131)
    q = big[..., :16]  # non-contiguous
    kb = rnd((2, 2, 50, 16), seed=132)
    k = kb.transpose(1, 2)  # BSND view of BNSD storage
    v = rnd((2, 50, 2, 16), seed=133)
    assert not q.is_contiguous() and not k.is_contiguous()
    run_grads(q, k, v, 4, "BSND", scale=0.25, atten_mask=TRIU2048, sparse_mode=2)


def test_partial_requires_grad():
    """Only value (or only query) requiring grad works and gives the same grads as the full run."""
    q, k, v = dense_qkv("BNSD", 1, 2, 2, 20, 30, 8, 8, seed=134)
    pse = rnd((1, 2, 20, 30), seed=135)
    full = run_grads(q, k, v, 2, "BNSD", pse=pse, scale=0.3, explicit=False)
    for which in ("v", "q", "pse"):
        qq, kk, vv, pp = q.clone(), k.clone(), v.clone(), pse.clone()
        t = {"q": qq, "v": vv, "pse": pp}[which].requires_grad_()
        out = npufa.npu_fusion_attention(qq, kk, vv, 2, "BNSD", pse=pp, scale=0.3)[0]
        out.backward(full.dy)
        torch.testing.assert_close(t.grad, full.got["d" + which], rtol=0, atol=0)


def test_grads_thread_independent():
    q, k, v = dense_qkv("BNSD", 2, 4, 2, 130, 129, 16, 16, seed=136)
    pse = rnd((1, 4, 1, 129), seed=137)
    sink = rnd((4,), seed=138)
    runs = []
    try:
        for nt in (1, 2, 1):
            npufa.set_num_threads(nt)
            runs.append(run_grads(q, k, v, 4, "BNSD", pse=pse, sink=sink, scale=0.3, keep_prob=0.8, seed=5,
                                  atten_mask=TRIU2048, sparse_mode=3, check=nt == 2, explicit=False))
    finally:
        npufa.set_num_threads(None)
    for r in runs[1:]:
        for n in ("dq", "dk", "dv"):
            assert torch.equal(r.got[n], runs[0].got[n]), n
        for n in ("dpse", "dsink"):  # reductions across threads: equal up to summation order
            torch.testing.assert_close(r.got[n], runs[0].got[n], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# combinations
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_everything_together_dense(dtype):
    B, Nq, Nkv, Sq, Skv, D, Dv = 2, 6, 2, 90, 130, 40, 24
    q, k, v = dense_qkv("BSH", B, Nq, Nkv, Sq, Skv, D, Dv, dtype, seed=121)
    pse = rnd((1, Nq, Sq, Skv), dtype, seed=122)
    sink = rnd((Nq,), F32, seed=123)
    run_grads(q, k, v, Nq, "BSH", pse=pse, sink=sink, atten_mask=TRIU2048, sparse_mode=4, pre_tockens=50,
              next_tockens=-5, scale=D ** -0.5, keep_prob=0.8, seed=5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_everything_together_tnd(dtype):
    lq, lkv = [70, 1, 64, 33], [70, 5, 130, 40]
    Nq, Nkv = 6, 3
    q, k, v, kw = tnd_case(lq, lkv, Nq=Nq, Nkv=Nkv, D=24, Dv=20, dtype=dtype, seed=125)
    pse = rnd((4, Nq, max(lq), max(lkv)), dtype, seed=126)
    sink = rnd((Nq,), F32, seed=127)
    run_grads(q, k, v, Nq, "TND", pse=pse, sink=sink, atten_mask=TRIU2048, sparse_mode=3, scale=0.2, keep_prob=0.9,
              seed=11, offset=4, softmax_layout="TND", **kw)


# ------------------------------------------------------------------------------------------------
# big grids (NPUFA_SLOW=1)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("layout", DENSE)
@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("Sq,Skv", [(129, 257), (257, 129), (200, 200), (1, 300)])
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
        kw.update(prefix=pf, atten_mask=PREFIX3072 if mode == 6 else prefix_mask(B, Sq, Skv, pf))
    run_grads(q, k, v, Nq, layout, pse=rnd((B, Nq, 1, Skv), dtype, seed=3), sink=rnd((Nq,), seed=4),
              keep_prob=0.9, seed=17, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4, 6, 7, 8])
@pytest.mark.parametrize("lq,lkv", [([129, 0, 300, 64, 1], [200, 0, 300, 65, 64]),
                                    ([300, 1, 0, 0], [400, 33, 0, 0])])
def test_large_tnd_grid_slow(lq, lkv, mode, dtype):
    Nq, Nkv, D, Dv = 8, 2, 64, 48
    q, k, v, kw = tnd_case(lq, lkv, Nq=Nq, Nkv=Nkv, D=D, Dv=Dv, dtype=dtype, seed=len(lq) + mode)
    kw.update(sparse_mode=mode, scale=D ** -0.5, sink=rnd((Nq,), seed=5), softmax_layout="TND" if mode % 2 else "")
    if mode in (0, 1):
        kw.update(atten_mask=rbool((max(lq), max(lkv)), 0.2, mode), pre_tockens=300, next_tockens=40)
    elif mode == 6:
        kw.update(atten_mask=PREFIX3072, prefix=[b - a + 2 if b - a + 2 <= b else b for a, b in zip(lq, lkv)])
    else:
        kw.update(atten_mask=TRIU2048, pre_tockens=INT_MAX if mode != 4 else 100, next_tockens=0 if mode != 8 else 7)
    if mode not in (7, 8) and 0 not in lq:
        kw.update(pse=rnd((len(lq), Nq, 1, max(lkv)), dtype, seed=6))
    run_grads(q, k, v, Nq, "TND", keep_prob=0.9, seed=21, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("ratio", [1, 3])
@pytest.mark.parametrize("Sq,Skv", [(s, t) for s in S_EDGE for t in S_EDGE])
def test_tile_edges_gqa_pse_sink_slow(Sq, Skv, ratio, dtype):
    q, k, v = dense_qkv("SBH", 2, 2 * ratio, 2, Sq, Skv, 24, 16, dtype, seed=Sq + 3 * Skv)
    run_grads(q, k, v, 2 * ratio, "SBH", pse=rnd((2, 2 * ratio, Sq, Skv), dtype, seed=7), sink=rnd((2 * ratio,)),
              atten_mask=rbool((Sq, Skv), 0.2, 9), pre_tockens=40, next_tockens=5, scale=0.2)
