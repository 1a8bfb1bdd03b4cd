"""npufa.npu_fusion_attention as a torch custom op: opcheck, torch.compile, and torch_npu's own example.

The op's positional arguments (torch.ops.npufa.npu_fusion_attention.default):
    query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob,
    pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
    gen_mask_parallel, sync, softmax_layout, sink, dropout_mask, seed, offset
"""
import math

import numpy as np
import pytest
import torch

import npufa
from npufa import reference as ref

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
INT_MAX = 2147483647
TRIU2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
OP = torch.ops.npufa.npu_fusion_attention.default


def rnd(shape, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def op_args(q, k, v, head_num, layout, pse=None, atten_mask=None, scale=1.0, keep_prob=1.0, pre=INT_MAX,
            nxt=INT_MAX, inner_precise=0, prefix=None, cq=None, ckv=None, sparse_mode=0, softmax_layout="",
            sink=None, dropout_mask=None, seed=0, offset=0):
    return (q, k, v, head_num, layout, pse, None, atten_mask, scale, keep_prob, pre, nxt, inner_precise, prefix,
            cq, ckv, sparse_mode, True, False, softmax_layout, sink, dropout_mask, seed, offset)


def _cases():
    cases = {}
    q, k, v = rnd((2, 4, 16, 8), seed=1), rnd((2, 2, 20, 8), seed=2), rnd((2, 2, 20, 6), seed=3)
    cases["bnsd_plain"] = op_args(q, k, v, 4, "BNSD", scale=0.3)
    q, k, v = rnd((2, 16, 32), F16, 4), rnd((2, 20, 16), F16, 5), rnd((2, 20, 16), F16, 6)
    cases["bsh_fp16_mode3_pse"] = op_args(q, k, v, 4, "BSH", pse=rnd((2, 4, 1, 20), F16, 7), atten_mask=TRIU2048,
                                          sparse_mode=3, scale=0.5)
    q, k, v = rnd((16, 2, 32), BF16, 8), rnd((20, 2, 32), BF16, 9), rnd((20, 2, 32), BF16, 10)
    cases["sbh_bf16_mask_band"] = op_args(q, k, v, 4, "SBH", atten_mask=torch.rand(16, 20) < 0.2, pre=5, nxt=2)
    q, k, v = rnd((1, 9, 2, 8), seed=11), rnd((1, 12, 2, 8), seed=12), rnd((1, 12, 2, 8), seed=13)
    cases["bsnd_dropout_seed"] = op_args(q, k, v, 2, "BSND", keep_prob=0.7, seed=42, offset=16)
    mask = npufa.dropout_gen_mask(2 * 9 * 12, 0.5, 1, 0)
    cases["bsnd_dropout_mask"] = op_args(q, k, v, 2, "BSND", keep_prob=0.5, dropout_mask=mask, seed=3, offset=4)
    q, k, v = rnd((30, 4, 8), seed=14), rnd((40, 2, 8), seed=15), rnd((40, 2, 8), seed=16)
    cases["tnd_mode3_sink_dropout"] = op_args(q, k, v, 4, "TND", atten_mask=TRIU2048, scale=0.3, keep_prob=0.8,
                                              cq=[10, 30], ckv=[15, 40], sparse_mode=3, softmax_layout="TND",
                                              sink=rnd((4,), seed=17), seed=5)
    q, k, v = rnd((9, 2, 8), seed=18), rnd((10, 1, 8), seed=19), rnd((10, 1, 8), seed=20)
    cases["tnd_trailing_zeros"] = op_args(q, k, v, 2, "TND", cq=[2, 5, 9, 0, 0], ckv=[3, 6, 10, 0, 0])
    q, k, v = rnd((2, 3, 5, 8), seed=21), rnd((2, 3, 0, 8), seed=22), rnd((2, 3, 0, 8), seed=23)
    cases["empty_kv"] = op_args(q, k, v, 3, "BNSD")
    return cases


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_opcheck(name):
    """Full default opcheck (schema, autograd registration, fake tensor, AOT dispatch) on inputs without
    requires_grad: there is no autograd formula yet, but nothing needs one here."""
    res = torch.library.opcheck(OP, CASES[name])
    assert all(v == "SUCCESS" for v in res.values()), res


@pytest.mark.parametrize("name", ["bnsd_plain", "tnd_mode3_sink_dropout"])
def test_opcheck_requires_grad(name):
    """With requires_grad inputs, test_aot_dispatch_* would backward through the op, and no autograd
    formula is registered yet (the backward op comes later): run the checks that do not need it."""
    args = list(CASES[name])
    args[0] = args[0].clone().requires_grad_(True)
    res = torch.library.opcheck(OP, tuple(args),
                                test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert all(v == "SUCCESS" for v in res.values()), res


@pytest.mark.parametrize("name", list(CASES))
def test_fake_matches_real(name):
    """The fake implementation reports the same shapes, dtypes and ints as the real one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = CASES[name]
    real = OP(*args)
    with FakeTensorMode() as mode:
        fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = OP(*fargs)
    for r, f in zip(real[:4], fake[:4]):
        assert tuple(r.shape) == tuple(f.shape) and r.dtype == f.dtype
    assert tuple(real[4:]) == tuple(fake[4:])


def test_op_namespace_and_schema():
    assert npufa.npu_fusion_attention.__name__ == "npu_fusion_attention"
    schema = str(OP._schema)
    for arg in ("query", "head_num", "input_layout", "pre_tockens", "next_tockens", "actual_seq_qlen",
                "softmax_layout", "sink", "dropout_mask", "seed", "offset"):
        assert arg in schema, (arg, schema)
    # the public wrapper and the raw op give the same result
    q, k, v = rnd((1, 2, 9, 8), seed=30), rnd((1, 2, 11, 8), seed=31), rnd((1, 2, 11, 8), seed=32)
    a = npufa.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.3)
    b = OP(*op_args(q, k, v, 2, "BNSD", scale=0.3))
    assert torch.equal(a[0], b[0]) and tuple(a[4:]) == tuple(b[4:])


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph_dense():
    def f(q, k, v, mask, pse):
        out = npufa.npu_fusion_attention(q, k, v, 4, "BSH", pse=pse, atten_mask=mask, scale=0.25, sparse_mode=4,
                                         pre_tockens=20, next_tockens=3)
        return out[0] * 2 + 1, out[1], out[2]

    q, k, v = rnd((2, 33, 64), seed=40), rnd((2, 70, 32), seed=41), rnd((2, 70, 32), seed=42)
    pse = rnd((2, 4, 33, 70), seed=43)
    cf = torch.compile(f, fullgraph=True)
    got = cf(q, k, v, TRIU2048, pse)
    want = f(q, k, v, TRIU2048, pse)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    # and against the float64 reference
    r = ref.npu_fusion_attention(q, k, v, 4, "BSH", pse=pse, atten_mask=TRIU2048, scale=0.25, sparse_mode=4,
                                 pre_tockens=20, next_tockens=3)
    torch.testing.assert_close(got[0].double(), r[0] * 2 + 1, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_tnd():
    def f(q, k, v):
        out = npufa.npu_fusion_attention(q, k, v, 4, "TND", atten_mask=TRIU2048, sparse_mode=3, scale=0.3,
                                         actual_seq_qlen=[10, 30], actual_seq_kvlen=[15, 40])
        return out[0]

    q, k, v = rnd((30, 4, 8), seed=44), rnd((40, 2, 8), seed=45), rnd((40, 2, 8), seed=46)
    got = torch.compile(f, fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, f(q, k, v), rtol=1e-6, atol=1e-6)
    r = ref.npu_fusion_attention(q, k, v, 4, "TND", atten_mask=TRIU2048, sparse_mode=3, scale=0.3,
                                 actual_seq_qlen=[10, 30], actual_seq_kvlen=[15, 40])
    torch.testing.assert_close(got.double(), r[0], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# torch_npu's documented example (/work/shared/seeds/002_74bd67561437a3ea.txt), run on CPU tensors
# ------------------------------------------------------------------------------------------------
def _assert_rtol_equal(expected, actual, prec):
    """torch_npu.testing.TestCase.assertRtolEqual for float16: fail only when more than size*prec
    elements break both the absolute and the relative bound `prec` (minimum16 = 6.1e-5)."""
    x = expected.numpy().astype(np.float64)
    y = actual.numpy().astype(np.float64)
    assert x.shape == y.shape
    assert not np.isnan(y).any()
    diff = np.abs(y - x)
    deno = np.maximum(np.abs(x), np.abs(y))
    atol_ok = diff <= prec
    rtol_ok = diff / (deno + 6.1e-5) <= prec
    n = x.size
    bad_r, bad_a = np.sum(~rtol_ok), np.sum(~atol_ok)
    assert not (bad_r > n * prec and bad_a > n * prec), f"result error: {bad_r} rtol / {bad_a} atol failures of {n}"


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # the example's torch.tensor(tensor)
class TestNPUFlashAttentionExample:
    """The TestNPUFlashAttention example of the torch_npu docs, with `.npu()` dropped."""

    scale = 0.08838

    def supported_op_exec(self, query, key, value, atten_mask):
        qk = torch.matmul(query, key.transpose(2, 3)).mul(self.scale)
        qk = qk + atten_mask * (-10000.0)
        softmax_res = torch.nn.functional.softmax(qk, dim=-1)
        return torch.matmul(softmax_res, value)

    def custom_op_exec(self, query, key, value, sparse_params):
        atten_mask = None
        if sparse_params[0] == 0:
            shape = [1, 8, 256, 256]
            atten_mask_u = np.triu(np.ones(shape), k=sparse_params[1] + 1)
            atten_mask_l = np.tril(np.ones(shape), k=-sparse_params[2] - 1)
            atten_masks = atten_mask_u + atten_mask_l
            atten_mask = torch.tensor(atten_masks).to(torch.float16).bool()
        if sparse_params[0] in (2, 3, 4):
            atten_masks = torch.from_numpy(np.triu(np.ones([2048, 2048]), k=1))
            atten_mask = torch.tensor(atten_masks).to(torch.float16).bool()
        return npufa.npu_fusion_attention(
            query, key, value, head_num=8, input_layout="BNSD", scale=self.scale, sparse_mode=sparse_params[0],
            atten_mask=atten_mask, pre_tockens=sparse_params[1], next_tockens=sparse_params[2])

    def get_atten_mask(self, sparse_mode=0, pre_tokens=65536, next_tokens=65536):
        shape = [1, 8, 256, 256]
        if sparse_mode == 0:
            atten_masks = np.triu(np.ones(shape), k=next_tokens + 1) + np.tril(np.ones(shape), k=-pre_tokens - 1)
        elif sparse_mode == 1:
            atten_masks = np.zeros(shape)
        elif sparse_mode in (2, 3):
            atten_masks = np.triu(np.ones(shape), k=1)
        elif sparse_mode == 4:
            atten_masks = np.triu(np.ones(shape), k=next_tokens + 1) + np.tril(np.ones(shape), k=-pre_tokens - 1)
        return torch.tensor(atten_masks).to(torch.float16)

    def check_result(self, query, key, value, sparse_params):
        atten_mask = self.get_atten_mask(*sparse_params)
        output = self.supported_op_exec(query.float(), key.float(), value.float(), atten_mask)
        fa_result = self.custom_op_exec(query, key, value, sparse_params)
        assert fa_result[0].dtype == torch.float16 and tuple(fa_result[0].shape) == (1, 8, 256, 256)
        _assert_rtol_equal(output.half(), fa_result[0], prec=0.01)
        # stricter than the example: max error within the FlashAttention rule of the float32 golden
        err = (fa_result[0].double() - output.double()).abs().max().item()
        naive = (output.half().double() - output.double()).abs().max().item()
        assert err <= 3 * naive + 1e-4, (err, naive)
        return fa_result

    @pytest.mark.parametrize("sparse_params", [[0, 128, 128], [1, 65536, 65536], [2, 65536, 0], [3, 65536, 0],
                                               [4, 128, 128]])
    def test_npu_flash_attention(self, sparse_params):
        torch.manual_seed(2)
        query = torch.randn(1, 8, 256, 256, dtype=torch.float16)
        key = torch.randn(1, 8, 256, 256, dtype=torch.float16)
        value = torch.randn(1, 8, 256, 256, dtype=torch.float16)
        res = self.check_result(query, key, value, sparse_params)
        # the masks really differ between the modes (the check is not vacuous)
        full = npufa.npu_fusion_attention(query, key, value, head_num=8, input_layout="BNSD", scale=self.scale)
        if sparse_params[0] != 1:
            assert (res[0].float() - full[0].float()).abs().max() > 1e-2
        else:
            assert torch.equal(res[0], full[0])
