"""The inference ops as torch custom ops: torch.library.opcheck (the mutating cache write too), torch.compile
(fullgraph) of IFA and FIA, fake-tensor shapes == real shapes (attention_out and softmax_lse, including the [0]
lse), and empty inputs (no query token, KV length 0).

Conventions: /work/main/docs/inference.md (softmax_lse shapes, decision 10: [0] when not requested).
"""
import inspect
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import npufa
from infer_helpers import (BF16, F16, F32, FLT_MAX, INT_MAX, TRIU2048, agree, cum, from_bnsd, make_paged, pack,
                           ref_call, rnd)
from infer_helpers import check_lse, check_out

NAMES = ("npu_prompt_flash_attention", "npu_incre_flash_attention", "npu_fused_infer_attention_score",
         "npu_fused_infer_attention_score_v2")


def op_of(name):
    return getattr(torch.ops.npufa, name).default


def op_args(name, **kw):
    """The full positional argument tuple of torch.ops.npufa.<name> from keyword arguments, the missing ones
    taking the public wrapper's defaults (lists stay lists: the schema's int[]?)."""
    sig = inspect.signature(getattr(npufa, name))
    args = []
    for a in op_of(name)._schema.arguments:
        if a.name in kw:
            v = kw.pop(a.name)
        else:
            v = sig.parameters[a.name].default
        if isinstance(v, torch.Tensor) and a.name.startswith("actual_seq") and v.dtype != torch.bool:
            v = v.tolist()
        args.append(v)
    assert not kw, f"unknown arguments {list(kw)}"
    return tuple(args)


def _cases():
    c = {}
    B, Nq, Nkv, Sq, Skv, D = 2, 4, 2, 9, 20, 16
    q, k, v = rnd((B, Nq, Sq, D), seed=1), rnd((B, Nkv, Skv, D), seed=2), rnd((B, Nkv, Skv, D), seed=3)
    q1 = rnd((B, Nq, 1, D), seed=4)
    c["pfa_bnsd_mask"] = ("npu_prompt_flash_attention", dict(
        query=q, key=k, value=v, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", scale_value=0.3,
        atten_mask=torch.rand(Sq, Skv, generator=torch.Generator().manual_seed(5)) < 0.3, pre_tokens=INT_MAX,
        next_tokens=0, actual_seq_lengths_kv=[20, 11]))
    qh, kh, vh = from_bnsd(q, "BSH").half(), from_bnsd(k, "BSH").half(), from_bnsd(v, "BSH").half()
    c["pfa_bsh_fp16_mode3_pse"] = ("npu_prompt_flash_attention", dict(
        query=qh, key=kh, value=vh, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BSH", atten_mask=TRIU2048,
        sparse_mode=3, pse_shift=rnd((1, Nq, Sq, Skv), F16, 6)))
    lq, lkv = [3, 0, 9], [5, 20, 0]
    qt = pack(rnd((3, Nq, 9, D), seed=7), lq)
    kt, vt = pack(rnd((3, Nkv, 20, D), seed=8), lkv), pack(rnd((3, Nkv, 20, 8), seed=9), lkv)
    c["pfa_tnd_alias"] = ("npu_prompt_flash_attention", dict(
        query=qt, key=kt, value=vt, num_heads=Nq, num_key_value_heads=Nkv, input_layout="TND",
        actual_seq_lengths=cum(lq), actual_seq_lengths_kv=cum(lkv), atten_mask=TRIU2048, sparse_mode=12))
    c["ifa_bsnd_mask_pse"] = ("npu_incre_flash_attention", dict(
        query=from_bnsd(q1, "BSND"), key=from_bnsd(k, "BSND"), value=from_bnsd(v, "BSND"), num_heads=Nq,
        num_key_value_heads=Nkv, input_layout="BSND", actual_seq_lengths=[20, 3],
        atten_mask=torch.zeros(B, 1, 1, Skv, dtype=torch.uint8), pse_shift=rnd((B, Nq, 1, Skv), seed=10)))
    (kp, vp), table = make_paged([k, v], [20, 7], 16, "BnBsH", seed=11)
    c["ifa_paged_bf16"] = ("npu_incre_flash_attention", dict(
        query=from_bnsd(q1, "BSH").bfloat16(), key=kp.bfloat16(), value=vp.bfloat16(), num_heads=Nq,
        num_key_value_heads=Nkv, input_layout="BSH", block_table=table, block_size=16, actual_seq_lengths=[20, 7]))
    c["ifa_kvpad"] = ("npu_incre_flash_attention", dict(
        query=q1, key=k, value=v, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
        actual_seq_lengths=[15, 20], kv_padding_size=torch.tensor([3])))
    c["fia_prefill_lse_rope"] = ("npu_fused_infer_attention_score", dict(
        query=q, key=k, value=v, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD_BSND", scale=0.2,
        query_rope=rnd((B, Nq, Sq, 64), seed=12), key_rope=rnd((B, Nkv, Skv, 64), seed=13), softmax_lse_flag=True,
        atten_mask=TRIU2048, sparse_mode=4, pre_tokens=5, next_tokens=1))
    c["fia_decode_paged_4d"] = ("npu_fused_infer_attention_score", dict(
        query=q1, key=kp.view(kp.shape[0], 16, Nkv, D).transpose(1, 2).contiguous(),
        value=vp.view(vp.shape[0], 16, Nkv, D).transpose(1, 2).contiguous(), num_heads=Nq, num_key_value_heads=Nkv,
        input_layout="BNSD", block_table=table, block_size=16, actual_seq_lengths_kv=[20, 7], softmax_lse_flag=True))
    c["fia_leftpad_prefix_nbsd"] = ("npu_fused_infer_attention_score", dict(
        query=q, key=k, value=v, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD_NBSD",
        actual_seq_lengths=[9, 4], actual_seq_lengths_kv=[10, 20], query_padding_size=torch.tensor([0]),
        kv_padding_size=torch.tensor([0])))
    c["fia_prefix"] = ("npu_fused_infer_attention_score", dict(
        query=qh, key=kh, value=vh, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BSH",
        key_shared_prefix=from_bnsd(rnd((1, Nkv, 6, D), seed=14), "BSH").half(),
        value_shared_prefix=from_bnsd(rnd((1, Nkv, 6, D), seed=15), "BSH").half(), actual_shared_prefix_len=[4],
        actual_seq_lengths_kv=[3, 20], softmax_lse_flag=True))
    c["fia_ntd_tnd_lse"] = ("npu_fused_infer_attention_score", dict(
        query=qt.transpose(0, 1).contiguous(), key=kt.transpose(0, 1).contiguous(),
        value=vt.transpose(0, 1).contiguous(), num_heads=Nq, num_key_value_heads=Nkv, input_layout="NTD_TND",
        actual_seq_lengths=cum(lq), actual_seq_lengths_kv=cum(lkv), softmax_lse_flag=True))
    c["fia2_tnd_sink_lse"] = ("npu_fused_infer_attention_score_v2", dict(
        query=qt, key=kt, value=vt, num_query_heads=Nq, num_key_value_heads=Nkv, input_layout="TND_NTD",
        actual_seq_qlen=cum(lq), actual_seq_kvlen=cum(lkv), learnable_sink=rnd((Nq,), seed=16),
        return_softmax_lse=True, atten_mask=TRIU2048, sparse_mode=3))
    c["fia2_paged_bsnd"] = ("npu_fused_infer_attention_score_v2", dict(
        query=from_bnsd(q, "BSND"), key=kp, value=vp, num_query_heads=Nq, num_key_value_heads=Nkv,
        input_layout="BSND", block_table=table, block_size=16, actual_seq_kvlen=[20, 7], softmax_scale=0.3))
    c["fia_empty_kv"] = ("npu_fused_infer_attention_score", dict(
        query=q, key=k[:, :, :0], value=v[:, :, :0], num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD",
        softmax_lse_flag=True))
    return c


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_opcheck(case):
    name, kw = CASES[case]
    res = torch.library.opcheck(op_of(name), op_args(name, **kw))
    assert all(v == "SUCCESS" for v in res.values()), res


@pytest.mark.parametrize("case", list(CASES))
def test_public_wrapper_equals_raw_op(case):
    name, kw = CASES[case]
    a = getattr(npufa, name)(**kw)
    b = op_of(name)(*op_args(name, **kw))
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("case", list(CASES))
def test_fake_matches_real(case):
    """The fake implementation reports the real shapes and dtypes (attention_out, softmax_lse incl. [0])."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    name, kw = CASES[case]
    args = op_args(name, **kw)
    real = op_of(name)(*args)
    with FakeTensorMode() as mode:
        fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = op_of(name)(*fargs)
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    assert len(real) == len(fake)
    for r, f in zip(real, fake):
        assert tuple(r.shape) == tuple(f.shape) and r.dtype == f.dtype, (tuple(r.shape), tuple(f.shape), r.dtype,
                                                                         f.dtype)


LSE_SHAPES = {
    "fia_prefill_lse_rope": (2, 4, 9, 1), "fia_decode_paged_4d": (2, 4, 1, 1), "fia_leftpad_prefix_nbsd": (0,),
    "fia_prefix": (2, 4, 9, 1), "fia_ntd_tnd_lse": (12, 4, 1), "fia2_tnd_sink_lse": (12, 4, 1),
    "fia2_paged_bsnd": (0,), "fia_empty_kv": (2, 4, 9, 1),
}


@pytest.mark.parametrize("case", list(LSE_SHAPES))
def test_lse_shapes(case):
    name, kw = CASES[case]
    out, lse = getattr(npufa, name)(**kw)
    assert tuple(lse.shape) == LSE_SHAPES[case] and lse.dtype == F32


def test_op_names_and_schemas():
    for name in NAMES + ("_npu_reshape_and_cache",):
        assert getattr(npufa, name).__name__ == name
        assert hasattr(torch.ops.npufa, name)
    s = str(op_of("npu_fused_infer_attention_score")._schema)
    for a in ("query_padding_size", "key_shared_prefix", "query_rope", "softmax_lse_flag", "block_table"):
        assert a in s, (a, s)
    s2 = str(op_of("npu_fused_infer_attention_score_v2")._schema)
    for a in ("learnable_sink", "num_query_heads", "actual_seq_qlen", "return_softmax_lse"):
        assert a in s2, (a, s2)
    sc = str(op_of("_npu_reshape_and_cache")._schema)
    assert re.search(r"Tensor\(a\d*!\) key_cache", sc) and re.search(r"Tensor\(a\d*!\) value_cache", sc), sc


# ------------------------------------------------------------------------------------------------
# the eager fast path: the public functions call the CPU implementation directly when the dispatcher
# would do nothing else, and the op otherwise
# ------------------------------------------------------------------------------------------------
class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _forbid_op(monkeypatch, name):
    """Replaces the custom op object the public function `name` falls back to by one that fails."""
    attr = {"npu_prompt_flash_attention": "_pfa_op", "npu_incre_flash_attention": "_ifa_op",
            "npu_fused_infer_attention_score": "_fia_op", "npu_fused_infer_attention_score_v2": "_fia2_op",
            "_npu_reshape_and_cache": "_reshape_and_cache_op"}[name]

    def fail(*a):
        raise AssertionError(f"{name} went through the dispatcher")
    monkeypatch.setattr(npufa._infer_attention, attr, fail)


@pytest.mark.parametrize("case", ["pfa_bnsd_mask", "ifa_paged_bf16", "fia_decode_paged_4d", "fia2_tnd_sink_lse"])
def test_plain_eager_call_skips_the_dispatcher(case, monkeypatch):
    name, kw = CASES[case]
    want = getattr(npufa, name)(**kw)
    _forbid_op(monkeypatch, name)
    got = getattr(npufa, name)(**kw)
    with torch.inference_mode():
        got2 = getattr(npufa, name)(**kw)
    for a, b, c in zip(*(x if isinstance(x, tuple) else (x,) for x in (want, got, got2))):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("case", ["pfa_bnsd_mask", "ifa_paged_bf16", "fia_decode_paged_4d", "fia2_tnd_sink_lse"])
def test_modes_profiler_and_grad_see_the_op(case):
    """Whatever would observe the call (a dispatch mode, the profiler, autograd) gets the custom op."""
    name, kw = CASES[case]
    fn = getattr(npufa, name)
    want = fn(**kw)
    want = want if isinstance(want, tuple) else (want,)
    with _Recorder() as rec:
        got = fn(**kw)
    assert f"npufa.{name}.default" in rec.ops, rec.ops
    got = got if isinstance(got, tuple) else (got,)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    with torch.profiler.profile() as prof:
        fn(**kw)
    assert any(e.name == f"npufa::{name}" for e in prof.events()), sorted({e.name for e in prof.events()})
    q = kw["query"].clone().requires_grad_(True)
    out = fn(**{**kw, "query": q})
    out = out[0] if isinstance(out, tuple) else out
    raw = op_of(name)(*op_args(name, **{**kw, "query": q}))
    raw = raw[0] if isinstance(raw, tuple) else raw
    assert out.requires_grad == raw.requires_grad and type(out.grad_fn) is type(raw.grad_fn)


def test_negative_views_are_resolved():
    """A negative view (torch._neg_view) reads its storage negated: the dispatcher materialises it before
    the kernel, so such a tensor must not take the direct path."""
    name, kw = CASES["fia_decode_paged_4d"]
    q = kw["query"]
    want = npufa.npu_fused_infer_attention_score(**{**kw, "query": -q})
    got = npufa.npu_fused_infer_attention_score(**{**kw, "query": torch._neg_view(q)})
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_zero_tensor_views_are_resolved():
    """A zero tensor (torch._efficientzerotensor) has no storage: it must read as zeros."""
    name, kw = CASES["fia_decode_paged_4d"]
    q = kw["query"]
    want = npufa.npu_fused_infer_attention_score(**{**kw, "query": torch.zeros_like(q)})
    got = npufa.npu_fused_infer_attention_score(**{**kw, "query": torch._efficientzerotensor(q.shape)})
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("arg", ["key", "value"])
@pytest.mark.parametrize("form", ["sparse", "quantised"])
def test_tensors_without_dense_storage_are_refused(arg, form):
    name, kw = CASES["ifa_kvpad"]
    t = kw[arg]
    bad = t.to_sparse() if form == "sparse" else torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)
    with pytest.raises((TypeError, NotImplementedError), match=rf"{name}|{arg}"):
        npufa.npu_incre_flash_attention(**{**kw, arg: bad})


def test_core_entry_reads_every_argument_by_name():
    """_C.infer_attention reads its dict in one pass: a missing query/key/value is an error naming the op,
    and each argument lands in its own field (a wrong one would change the result)."""
    from npufa import _C
    q, k, v = rnd((1, 4, 1, 8), seed=29), rnd((1, 1, 16, 8), seed=30), rnd((1, 1, 16, 8), seed=31)
    base = dict(query=q, key=k, value=v, num_heads=4, num_key_value_heads=1, input_layout="BNSD", op="npu_x")
    with pytest.raises(ValueError, match="npu_x: query, key and value are required"):
        _C.infer_attention(1, {a: b for a, b in base.items() if a != "key"}, torch.empty(1, 4, 1, 8), None)
    out = torch.empty(1, 4, 1, 8)
    _C.infer_attention(1, {**base, "scale": 0.5, "actual_seq_lengths_kv": [9], "unknown": 1}, out, None)
    want = npufa.npu_incre_flash_attention(q, k, v, num_heads=4, num_key_value_heads=1, input_layout="BNSD",
                                           scale_value=0.5, actual_seq_lengths=[9])
    assert torch.equal(out, want)


def _compact_tensor_type():
    """A tensor type whose DLPack C exchange table gives no strides, as DLPack allows for compact row-major
    tensors (torch always gives them): the table is built with ctypes, the DLTensor filled in Python."""
    import ctypes as c

    class DLTensor(c.Structure):
        _fields_ = [("data", c.c_void_p), ("device_type", c.c_int32), ("device_id", c.c_int32), ("ndim", c.c_int32),
                    ("code", c.c_uint8), ("bits", c.c_uint8), ("lanes", c.c_uint16), ("shape", c.POINTER(c.c_int64)),
                    ("strides", c.POINTER(c.c_int64)), ("byte_offset", c.c_uint64)]

    fill_t = c.CFUNCTYPE(c.c_int, c.py_object, c.POINTER(DLTensor))

    class Api(c.Structure):
        _fields_ = [("major", c.c_uint32), ("minor", c.c_uint32), ("prev_api", c.c_void_p),
                    ("allocator", c.c_void_p), ("from_py", c.c_void_p), ("to_py", c.c_void_p),
                    ("dltensor_from_py_object_no_sync", fill_t), ("stream", c.c_void_p)]

    codes = {torch.float32: (2, 32), torch.bfloat16: (4, 16), torch.int8: (0, 8)}

    class Compact:
        calls = 0

        def __init__(self, t):
            self.t = t.contiguous()
            self.shape = (c.c_int64 * t.dim())(*t.shape)

    def fill(obj, out):
        Compact.calls += 1
        t, d = obj.t, out.contents
        d.data, d.device_type, d.device_id, d.ndim = t.data_ptr(), 1, 0, t.dim()
        d.code, d.bits = codes[t.dtype]
        d.lanes, d.shape, d.strides, d.byte_offset = 1, obj.shape, None, 0
        return 0

    Compact.keep = (fill_fn := fill_t(fill), api := Api(1, 3, None, None, None, None, fill_fn, None))
    new_capsule = c.pythonapi.PyCapsule_New
    new_capsule.restype, new_capsule.argtypes = c.py_object, [c.c_void_p, c.c_char_p, c.c_void_p]
    Compact.__dlpack_c_exchange_api__ = new_capsule(c.addressof(api), b"dlpack_exchange_api", None)
    return Compact


def test_exchange_table_without_strides_reads_compact_row_major():
    """DLPack lets a producer leave out the strides of a compact tensor: the core then computes them
    (row-major, in 64 bits). The int8 cache and its scales go through that path; the result must equal
    the one from torch's own tensors."""
    from npufa import _C
    Compact = _compact_tensor_type()
    q = rnd((2, 8, 1, 32), seed=40).bfloat16()
    k8, v8 = (torch.randint(-128, 128, (2, 2, 24, 32), dtype=torch.int8, generator=torch.Generator().manual_seed(s))
              for s in (41, 42))
    sc, off = (rnd((2, 1, 32), seed=43) * 0.05).bfloat16(), rnd((2, 1, 32), seed=44).bfloat16()
    kw = dict(num_heads=8, num_key_value_heads=2, input_layout="BNSD", scale=0.2, op="fia",
              actual_seq_lengths_kv=[24, 13], key_antiquant_offset=off, value_antiquant_offset=off)
    want, got = torch.empty(2, 8, 1, 32).bfloat16(), torch.empty(2, 8, 1, 32).bfloat16()
    _C.infer_attention(2, dict(kw, query=q, key=k8, value=v8, key_antiquant_scale=sc, value_antiquant_scale=sc * 2),
                       want, None)
    _C.infer_attention(2, dict(kw, query=q, key=Compact(k8), value=Compact(v8), key_antiquant_scale=Compact(sc),
                               value_antiquant_scale=Compact(sc * 2)), got, None)
    assert Compact.calls == 4 and torch.equal(got, want) and want.abs().sum() > 0


def test_fx_symbolic_trace_records_the_op():
    """torch.fx proxies are not tensors but carry __torch_function__: they must reach the op."""
    import torch.fx
    name, kw = CASES["ifa_paged_bf16"]
    tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in kw.items() if k not in tensors}

    def f(query, key, value, block_table):
        return npufa.npu_incre_flash_attention(query, key, value, block_table=block_table, **rest)
    gm = torch.fx.symbolic_trace(f)
    assert any(n.target == op_of(name) for n in gm.graph.nodes), gm.graph
    assert torch.equal(gm(**tensors), f(**tensors))


def test_reshape_and_cache_plain_eager_skips_the_dispatcher(monkeypatch):
    T, N, D, bs, nb = 5, 2, 8, 4, 3
    k, v = rnd((T, N, D), seed=24), rnd((T, N, D), seed=25)
    slots = torch.tensor([0, 5, -1, 11, 2], dtype=torch.int32)
    kc, vc = torch.zeros(nb, bs, N, D), torch.zeros(nb, bs, N, D)
    torch.ops.npufa._npu_reshape_and_cache.default(k, v, kc, vc, slots)
    _forbid_op(monkeypatch, "_npu_reshape_and_cache")
    kc2, vc2 = torch.zeros(nb, bs, N, D), torch.zeros(nb, bs, N, D)
    npufa._npu_reshape_and_cache(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2) and kc.abs().sum() > 0


def test_views_with_offsets_and_strides_are_read_in_place():
    """Tensors reach the core through DLPack's C exchange table: storage offsets and strides must be
    honoured, as they are through __dlpack__."""
    B, Nq, Nkv, S, D = 2, 4, 2, 24, 16
    big = rnd((B, Nq + 1, 3, D + 5), seed=26)
    q = big[:, 1:, 1:2, 3:3 + D]  # offset and strided in every dimension
    kb, vb = rnd((B, S + 2, Nkv, D), seed=27), rnd((B, S + 2, Nkv, D), seed=28)
    k, v = kb[:, 2:].transpose(1, 2), vb[:, 2:].transpose(1, 2)  # BNSD views of BSND storage
    assert not q.is_contiguous() and not k.is_contiguous() and q.storage_offset() > 0
    kw = dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", softmax_lse_flag=True)
    got = npufa.npu_fused_infer_attention_score(q, k, v, **kw)
    want = npufa.npu_fused_infer_attention_score(q.contiguous(), k.contiguous(), v.contiguous(), **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0].abs().sum() > 0

# ------------------------------------------------------------------------------------------------
# the mutating cache write
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["4d", "3d", "view"])
def test_opcheck_reshape_and_cache(form):
    T, N, D, bs, nb = 5, 2, 8, 4, 3
    k, v = rnd((T, N, D), seed=20), rnd((T, N, D), seed=21)
    if form == "4d":
        kc, vc = torch.zeros(nb, bs, N, D), torch.zeros(nb, bs, N, D)
    elif form == "3d":
        kc, vc = torch.zeros(nb, bs, N * D), torch.zeros(nb, bs, N * D)
    else:
        kc, vc = torch.zeros(nb, N, bs, D).transpose(1, 2), torch.zeros(nb, N, bs, D).transpose(1, 2)
    slots = torch.tensor([0, 5, -1, 11, 2], dtype=torch.int32)
    res = torch.library.opcheck(torch.ops.npufa._npu_reshape_and_cache.default, (k, v, kc, vc, slots))
    assert all(x == "SUCCESS" for x in res.values()), res


def test_reshape_and_cache_compiles_and_mutates():
    T, N, D, bs, nb = 6, 2, 8, 4, 3
    k, v = rnd((T, N, D), seed=22), rnd((T, N, D), seed=23)
    slots = torch.tensor([1, 2, 3, 4, 9, -1])

    def f(k, v, kc, vc, s):
        npufa._npu_reshape_and_cache(k, v, kc, vc, s)
        return kc.sum() + vc.sum()

    kc, vc = torch.zeros(nb, bs, N, D), torch.zeros(nb, bs, N, D)
    kc2, vc2 = kc.clone(), vc.clone()
    torch.compile(f, fullgraph=True)(k, v, kc, vc, slots)
    f(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2) and kc.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
def test_torch_compile_ifa_paged():
    B, Nq, Nkv, D, bs = 3, 8, 2, 32, 16
    lens = [40, 1, 17]
    q = rnd((B, 1, Nq * D), seed=30)
    k, v = rnd((B, Nkv, 40, D), seed=31), rnd((B, Nkv, 40, D), seed=32)
    (kp, vp), table = make_paged([k, v], lens, bs, "BnBsH", seed=33)

    def f(q, kp, vp, table):
        o = npufa.npu_incre_flash_attention(q, kp, vp, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BSH",
                                            block_table=table, block_size=bs, actual_seq_lengths=lens,
                                            scale_value=D ** -0.5)
        return o * 2 + 1

    got = torch.compile(f, fullgraph=True)(q, kp, vp, table)
    want = f(q, kp, vp, table)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    r = ref_call("npu_incre_flash_attention", (q, kp, vp),
                 dict(num_heads=Nq, num_key_value_heads=Nkv, input_layout="BSH", block_table=table, block_size=bs,
                      actual_seq_lengths=lens, scale_value=D ** -0.5))
    torch.testing.assert_close(got.double(), r * 2 + 1, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("v2", [False, True])
def test_torch_compile_fia(v2):
    B, Nq, Nkv, Sq, Skv, D = 2, 4, 2, 7, 30, 16
    q, k, v = rnd((B, Nq, Sq, D), BF16, 40), rnd((B, Nkv, Skv, D), BF16, 41), rnd((B, Nkv, Skv, D), BF16, 42)
    pse = rnd((1, Nq, Sq, Skv), BF16, 43)

    def f(q, k, v, pse, mask):
        if v2:
            o, lse = npufa.npu_fused_infer_attention_score_v2(
                q, k, v, num_query_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", pse_shift=pse,
                atten_mask=mask, sparse_mode=3, actual_seq_kvlen=[30, 12], return_softmax_lse=True,
                softmax_scale=0.25)
        else:
            o, lse = npufa.npu_fused_infer_attention_score(
                q, k, v, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD", pse_shift=pse, atten_mask=mask,
                sparse_mode=3, actual_seq_lengths_kv=[30, 12], softmax_lse_flag=True, scale=0.25)
        return o.float().sum(-1), lse

    got = torch.compile(f, fullgraph=True)(q, k, v, pse, TRIU2048)
    want = f(q, k, v, pse, TRIU2048)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_torch_compile_fia_decode_loop():
    """A small decode loop under compile: write the new token with _npu_reshape_and_cache, then paged FIA."""
    B, Nq, Nkv, D, bs, nb = 2, 4, 2, 16, 4, 8
    kc = torch.zeros(nb, bs, Nkv, D)
    vc = torch.zeros(nb, bs, Nkv, D)
    table = torch.tensor([[0, 2, 4, 6], [1, 3, 5, 7]], dtype=torch.int32)
    ks = rnd((5, B, Nkv, D), seed=50)
    vs = rnd((5, B, Nkv, D), seed=51)
    qs = rnd((5, B, Nq, 1, D), seed=52)

    def step(q, kn, vn, kc, vc, slots, lens):
        npufa._npu_reshape_and_cache(kn, vn, kc, vc, slots)
        return npufa.npu_fused_infer_attention_score(
            q, kc.view(nb, bs, Nkv * D), vc.view(nb, bs, Nkv * D), num_heads=Nq, num_key_value_heads=Nkv,
            input_layout="BNSD", block_table=table, block_size=bs, actual_seq_lengths_kv=lens, scale=0.25)[0]

    cstep = torch.compile(step, fullgraph=True, dynamic=False)
    for t in range(5):
        slots = torch.tensor([int(table[b, t // bs]) * bs + t % bs for b in range(B)])
        got = cstep(qs[t], ks[t], vs[t], kc, vc, slots, [t + 1, t + 1])
        kk = ks[: t + 1].permute(1, 2, 0, 3).contiguous()
        vv = vs[: t + 1].permute(1, 2, 0, 3).contiguous()
        want = npufa.npu_fused_infer_attention_score(qs[t], kk, vv, num_heads=Nq, num_key_value_heads=Nkv,
                                                     input_layout="BNSD", scale=0.25)[0]
        agree(got, want)


# ------------------------------------------------------------------------------------------------
# empty inputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("op", ["pfa", "ifa", "fia_prefill", "fia_decode", "fia2", "fia_tnd", "fia_paged"])
def test_kv_length_zero_gives_zeros(op, dtype):
    B, Nq, Nkv, D = 2, 4, 2, 16
    Sq = 1 if op in ("ifa", "fia_decode", "fia_paged") else 5
    q = rnd((B, Nq, Sq, D), dtype, 60)
    k0, v0 = rnd((B, Nkv, 0, D), dtype, 61), rnd((B, Nkv, 0, D), dtype, 62)
    lse = None
    if op == "pfa":
        out = npufa.npu_prompt_flash_attention(q, k0, v0, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD")
    elif op == "ifa":
        out = npufa.npu_incre_flash_attention(q, k0, v0, num_heads=Nq, num_key_value_heads=Nkv, input_layout="BNSD")
    elif op in ("fia_prefill", "fia_decode"):
        out, lse = npufa.npu_fused_infer_attention_score(q, k0, v0, num_heads=Nq, num_key_value_heads=Nkv,
                                                         input_layout="BNSD", softmax_lse_flag=True)
    elif op == "fia2":
        out, lse = npufa.npu_fused_infer_attention_score_v2(q, k0, v0, num_query_heads=Nq, num_key_value_heads=Nkv,
                                                            input_layout="BNSD", return_softmax_lse=True,
                                                            learnable_sink=rnd((Nq,), seed=63))
    elif op == "fia_tnd":  # KV lengths all 0 with a non-empty query
        qt = pack(q, [5, 3])
        out, lse = npufa.npu_fused_infer_attention_score(
            qt, rnd((4, Nkv, D), dtype, 64), rnd((4, Nkv, D), dtype, 65), num_heads=Nq, num_key_value_heads=Nkv,
            input_layout="TND", actual_seq_lengths=[5, 8], actual_seq_lengths_kv=[0, 0], softmax_lse_flag=True)
    else:  # paged with lengths 0
        (kp, vp), table = make_paged([rnd((B, Nkv, 8, D), dtype, 66)] * 2, [0, 0], 4, "BnBsH", seed=67)
        out, lse = npufa.npu_fused_infer_attention_score(q, kp, vp, num_heads=Nq, num_key_value_heads=Nkv,
                                                         input_layout="BNSD", block_table=table, block_size=4,
                                                         actual_seq_lengths_kv=[0, 0], softmax_lse_flag=True)
    assert out.dtype == dtype and out.numel() > 0
    assert (out == 0).all()
    if lse is not None:
        assert lse.dtype == F32 and (lse == -FLT_MAX).all()


@pytest.mark.parametrize("op", ["pfa_bsh", "fia_bnsd", "fia_tnd", "fia2_ntd", "fia_batch0", "ifa_batch0",
                                "cache_T0"])
def test_query_with_no_tokens(op):
    """An empty query (S = 0, T = 0 or B = 0) returns an empty result of the right shape (and lse)."""
    Nq, Nkv, D = 4, 2, 16
    k, v = rnd((2, Nkv, 7, D), seed=70), rnd((2, Nkv, 7, D), seed=71)
    if op == "pfa_bsh":
        out = npufa.npu_prompt_flash_attention(torch.zeros(2, 0, Nq * D), from_bnsd(k, "BSH"), from_bnsd(v, "BSH"),
                                               num_heads=Nq, num_key_value_heads=Nkv, input_layout="BSH")
        assert tuple(out.shape) == (2, 0, Nq * D)
    elif op == "fia_bnsd":
        out, lse = npufa.npu_fused_infer_attention_score(torch.zeros(2, Nq, 0, D), k, v, num_heads=Nq,
                                                         num_key_value_heads=Nkv, input_layout="BNSD_BSND",
                                                         softmax_lse_flag=True)
        assert tuple(out.shape) == (2, 0, Nq, D) and tuple(lse.shape) == (2, Nq, 0, 1)
    elif op == "fia_tnd":
        out, lse = npufa.npu_fused_infer_attention_score(torch.zeros(0, Nq, D), pack(k, [7, 3]), pack(v, [7, 3]),
                                                         num_heads=Nq, num_key_value_heads=Nkv, input_layout="TND",
                                                         actual_seq_lengths=[0, 0], actual_seq_lengths_kv=[7, 10],
                                                         softmax_lse_flag=True)
        assert tuple(out.shape) == (0, Nq, D) and tuple(lse.shape) == (0, Nq, 1)
    elif op == "fia2_ntd":
        out, lse = npufa.npu_fused_infer_attention_score_v2(
            torch.zeros(Nq, 0, D), pack(k, [7, 3]).transpose(0, 1).contiguous(),
            pack(v, [7, 3]).transpose(0, 1).contiguous(), num_query_heads=Nq, num_key_value_heads=Nkv,
            input_layout="NTD", actual_seq_qlen=[0, 0], actual_seq_kvlen=[7, 10], return_softmax_lse=True)
        assert tuple(out.shape) == (Nq, 0, D) and tuple(lse.shape) == (0, Nq, 1)
    elif op == "fia_batch0":
        out, lse = npufa.npu_fused_infer_attention_score(torch.zeros(0, 3, Nq * D), torch.zeros(0, 7, Nkv * D),
                                                         torch.zeros(0, 7, Nkv * D), num_heads=Nq,
                                                         num_key_value_heads=Nkv, input_layout="BSH",
                                                         softmax_lse_flag=True)
        assert tuple(out.shape) == (0, 3, Nq * D) and tuple(lse.shape) == (0, Nq, 3, 1)
    elif op == "ifa_batch0":
        out = npufa.npu_incre_flash_attention(torch.zeros(0, 1, Nq * D), torch.zeros(0, 7, Nkv * D),
                                              torch.zeros(0, 7, Nkv * D), num_heads=Nq, num_key_value_heads=Nkv,
                                              input_layout="BSH")
        assert tuple(out.shape) == (0, 1, Nq * D)
    else:
        kc = torch.ones(2, 4, Nkv, D)
        npufa._npu_reshape_and_cache(torch.zeros(0, Nkv, D), torch.zeros(0, Nkv, D), kc, kc.clone(),
                                     torch.zeros(0, dtype=torch.int32))
        assert (kc == 1).all()


def test_empty_kv_matches_reference():
    q = rnd((2, 3, 4, 8), seed=80)
    kw = dict(num_heads=3, input_layout="BNSD", softmax_lse_flag=True)
    args = (q, rnd((2, 3, 0, 8), seed=81), rnd((2, 3, 0, 8), seed=82))
    out, lse = npufa.npu_fused_infer_attention_score(*args, **kw)
    r_out, r_lse = ref_call("npu_fused_infer_attention_score", args, kw)
    check_out(out, r_out, F32)
    check_lse(lse, r_lse)
