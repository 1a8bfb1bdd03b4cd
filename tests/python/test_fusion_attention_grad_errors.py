"""Bad inputs to npufa.npu_fusion_attention_grad raise ValueError / TypeError (never a crash or a bare
binding error) whose message names the grad op, the argument and the offending value.

Spec: /work/shared/spec/torch_npu_attention.md §2.2-§2.4 (forward rules, which the grad shares), §4
(grad signature and what it needs from the forward); project decision 15.
"""
import pytest
import torch

import npufa

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
INT_MAX = 2147483647
TRIU2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
OPNAME = "npu_fusion_attention_grad"


def t(*shape, dtype=F32, seed=None):
    g = torch.Generator().manual_seed(sum(shape) + len(shape) if seed is None else seed)
    return torch.randn(*shape, generator=g).to(dtype)


# dense case: B=2, Nq=4, Nkv=2, Sq=8, Skv=10, D=16, Dv=8, BNSD
Q, K, V = t(2, 4, 8, 16, seed=1), t(2, 2, 10, 16, seed=2), t(2, 2, 10, 8, seed=3)
FWD = npufa.npu_fusion_attention(Q, K, V, 4, "BNSD", scale=0.3)
DY = t(2, 4, 8, 8, seed=4)
NUMELS = 2 * 4 * 8 * 10
DENSE = dict(softmax_max=FWD[1], softmax_sum=FWD[2], attention_in=FWD[0], scale_value=0.3)

# TND case: lengths [3, 5] / [4, 6], Nq=4, Nkv=2, D=16
TQ, TK, TV = t(8, 4, 16, seed=5), t(10, 2, 16, seed=6), t(10, 2, 16, seed=7)
TKW = dict(actual_seq_qlen=[3, 8], actual_seq_kvlen=[4, 10])
TFWD = npufa.npu_fusion_attention(TQ, TK, TV, 4, "TND", scale=0.3, keep_prob=0.5, seed=3, **TKW)
TDY = t(8, 4, 16, seed=8)
TND = dict(softmax_max=TFWD[1], softmax_sum=TFWD[2], attention_in=TFWD[0], scale_value=0.3, keep_prob=0.5, seed=3,
           numels=TFWD[6], **TKW)


def g(q=Q, k=K, v=V, dy=DY, head_num=4, layout="BNSD", **kw):
    a = dict(DENSE)
    a.update(kw)
    return npufa.npu_fusion_attention_grad(q, k, v, dy, head_num, layout, **a)


def gt(dy=TDY, head_num=4, layout="TND", **kw):
    a = dict(TND)
    a.update(kw)
    return npufa.npu_fusion_attention_grad(TQ, TK, TV, dy, head_num, layout, **a)


# (id, thunk, exception type(s), substrings that must all be in the message (case-insensitive))
CASES = [
    # ---- the forward's outputs the grad needs (§4.2) ----
    ("softmax_max_missing", lambda: g(softmax_max=None), ValueError, ["softmax_max", "None"]),
    ("softmax_sum_missing", lambda: g(softmax_sum=None), ValueError, ["softmax_sum", "None"]),
    ("attention_in_missing", lambda: g(attention_in=None), ValueError, ["attention_in", "None"]),
    ("softmax_max_last_dim_1", lambda: g(softmax_max=FWD[1][..., :1].contiguous()), ValueError,
     ["softmax_max", "[2, 4, 8, 1]", "[2, 4, 8, 8]"]),
    ("softmax_sum_last_dim_1", lambda: g(softmax_sum=FWD[2][..., :1].contiguous()), ValueError,
     ["softmax_sum", "[2, 4, 8, 1]"]),
    ("softmax_max_wrong_S", lambda: g(softmax_max=torch.zeros(2, 4, 7, 8)), ValueError,
     ["softmax_max", "[2, 4, 7, 8]", "[2, 4, 8, 8]"]),
    ("softmax_sum_wrong_S", lambda: g(softmax_sum=torch.zeros(2, 4, 9, 8)), ValueError,
     ["softmax_sum", "[2, 4, 9, 8]"]),
    ("softmax_max_wrong_N", lambda: g(softmax_max=torch.zeros(2, 2, 8, 8)), ValueError,
     ["softmax_max", "[2, 2, 8, 8]"]),
    ("softmax_max_3d", lambda: g(softmax_max=FWD[1][0]), ValueError, ["softmax_max", "[4, 8, 8]"]),
    ("softmax_max_bsnd_order", lambda: g(softmax_max=FWD[1].transpose(1, 2).contiguous()), ValueError,
     ["softmax_max", "[2, 8, 4, 8]"]),
    ("softmax_max_fp16", lambda: g(softmax_max=FWD[1].half()), TypeError, ["softmax_max", "float32", "float16"]),
    ("softmax_sum_bf16", lambda: g(softmax_sum=FWD[2].bfloat16()), TypeError, ["softmax_sum", "bfloat16"]),
    ("tnd_softmax_max_dense_shape", lambda: gt(softmax_max=torch.zeros(1, 4, 8, 8)), ValueError,
     ["softmax_max", "[1, 4, 8, 8]", "[8, 4, 8]"]),
    ("tnd_softmax_sum_wrong_T", lambda: gt(softmax_sum=torch.zeros(7, 4, 8)), ValueError,
     ["softmax_sum", "[7, 4, 8]"]),
    ("attention_in_wrong_shape", lambda: g(attention_in=FWD[0][:, :, :7].contiguous()), ValueError,
     ["attention_in", "[2, 4, 7, 8]", "[2, 4, 8, 8]"]),
    ("attention_in_D_not_Dv", lambda: g(attention_in=torch.zeros(2, 4, 8, 16)), ValueError,
     ["attention_in", "[2, 4, 8, 16]"]),
    ("attention_in_dtype", lambda: g(attention_in=FWD[0].bfloat16()), TypeError,
     ["attention_in", "float32", "bfloat16"]),
    ("tnd_attention_in_wrong_T", lambda: gt(attention_in=TFWD[0][:7]), ValueError, ["attention_in", "[7, 4, 16]"]),
    # ---- dy ----
    ("dy_D_not_Dv", lambda: g(dy=torch.zeros(2, 4, 8, 16)), ValueError, ["dy", "[2, 4, 8, 16]", "[2, 4, 8, 8]"]),
    ("dy_wrong_S", lambda: g(dy=torch.zeros(2, 4, 9, 8)), ValueError, ["dy", "[2, 4, 9, 8]"]),
    ("dy_wrong_rank", lambda: g(dy=torch.zeros(2, 8, 32)), ValueError, ["dy", "[2, 8, 32]"]),
    ("dy_fp16", lambda: g(dy=DY.half()), TypeError, ["dy", "float32", "float16"]),
    ("dy_int", lambda: g(dy=DY.int()), TypeError, ["dy", "int32"]),
    ("dy_fp32_with_bf16_inputs", lambda: g(q=Q.bfloat16(), k=K.bfloat16(), v=V.bfloat16(),
                                           attention_in=FWD[0].bfloat16()), TypeError, ["dy", "bfloat16", "float32"]),
    ("tnd_dy_wrong_T", lambda: gt(dy=TDY[:7]), ValueError, ["dy", "[7, 4, 16]", "[8, 4, 16]"]),
    ("dy_none", lambda: g(dy=None), (TypeError, ValueError), ["dy", "None"]),
    # ---- numels when keep_prob < 1 (the mask is regenerated from seed/offset/numels, §4.2) ----
    ("numels_small", lambda: g(keep_prob=0.5, seed=1, numels=5), ValueError, ["numels", "5", str(NUMELS)]),
    ("numels_default_0", lambda: g(keep_prob=0.5, seed=1), ValueError, ["numels", "0", str(NUMELS)]),
    ("numels_big", lambda: g(keep_prob=0.9, seed=1, numels=NUMELS + 1), ValueError, ["numels", str(NUMELS + 1)]),
    ("numels_negative", lambda: g(keep_prob=0.9, seed=1, numels=-NUMELS), ValueError, ["numels", str(-NUMELS)]),
    ("numels_other_layout_count", lambda: g(keep_prob=0.5, seed=1, numels=2 * 4 * 8 * 8), ValueError,
     ["numels", "512"]),
    ("tnd_numels_wrong", lambda: gt(numels=TFWD[6] + 4), ValueError, ["numels", str(TFWD[6] + 4), str(TFWD[6])]),
    # ---- the forward's rules, reaching the grad ----
    ("layout_BSNH", lambda: g(layout="BSNH"), ValueError, ["input_layout", "BSNH"]),
    ("layout_empty", lambda: g(layout=""), ValueError, ["input_layout"]),
    ("layout_not_str", lambda: g(layout=3), TypeError, ["input_layout", "int"]),
    ("keep_prob_0", lambda: g(keep_prob=0.0, numels=NUMELS), ValueError, ["keep_prob", "(0, 1]", "0"]),
    ("keep_prob_1.5", lambda: g(keep_prob=1.5), ValueError, ["keep_prob", "1.5"]),
    ("keep_prob_nan", lambda: g(keep_prob=float("nan")), ValueError, ["keep_prob", "nan"]),
    ("head_num_0", lambda: g(head_num=0), ValueError, ["head_num", "0"]),
    ("head_num_ne_query_n", lambda: g(head_num=2), ValueError, ["head_num", "2"]),
    ("padding_mask", lambda: g(padding_mask=torch.zeros(2, 4, 8, 10, dtype=torch.bool)), ValueError,
     ["padding_mask"]),
    ("inner_precise_7", lambda: g(inner_precise=7), ValueError, ["inner_precise", "7"]),
    ("rank_3d_query_bnsd", lambda: g(q=Q[0]), ValueError, ["query", "[4, 8, 16]"]),
    ("dtype_key_fp16", lambda: g(k=K.half()), TypeError, ["key", "float16"]),
    ("dtype_f64", lambda: g(q=Q.double(), k=K.double(), v=V.double(), dy=DY.double(),
                            attention_in=FWD[0].double()), TypeError, ["float64"]),
    ("nq_mod_nkv", lambda: g(k=t(2, 3, 10, 16), v=t(2, 3, 10, 8)), ValueError, ["Nq % Nkv", "Nkv = 3"]),
    ("dv_gt_d", lambda: g(v=t(2, 2, 10, 32), dy=torch.zeros(2, 4, 8, 32), attention_in=torch.zeros(2, 4, 8, 32)),
     ValueError, ["Dv", "Dv = 32"]),
    ("mask_wrong_shape", lambda: g(atten_mask=torch.zeros(8, 9, dtype=torch.bool)), ValueError,
     ["atten_mask", "[8, 9]"]),
    ("mask_float", lambda: g(atten_mask=torch.zeros(8, 10)), TypeError, ["atten_mask", "float32"]),
    ("compressed_mode2_small", lambda: g(atten_mask=torch.ones(8, 10, dtype=torch.bool), sparse_mode=2), ValueError,
     ["atten_mask", "sparse_mode 2", "[8, 10]"]),
    ("mode9", lambda: g(atten_mask=TRIU2048, sparse_mode=9), ValueError, ["sparse_mode", "9"]),
    ("mode7_dense", lambda: g(atten_mask=TRIU2048, sparse_mode=7), ValueError, ["sparse_mode", "7", "TND"]),
    ("mode-1", lambda: g(sparse_mode=-1), ValueError, ["sparse_mode", "-1"]),
    ("both_negative", lambda: g(atten_mask=torch.zeros(8, 10, dtype=torch.bool), pre_tockens=-1, next_tockens=-1),
     ValueError, ["pre_tockens", "next_tockens", "-1"]),
    ("prefix_missing_mode5", lambda: g(atten_mask=torch.zeros(2, 1, 8, 10, dtype=torch.bool), sparse_mode=5),
     ValueError, ["prefix", "None"]),
    ("softmax_layout_dense", lambda: g(softmax_layout="TND"), ValueError, ["softmax_layout", "TND", "BNSD"]),
    ("softmax_layout_xyz_tnd", lambda: gt(softmax_layout="XYZ"), ValueError, ["softmax_layout", "XYZ"]),
    ("pse_shape", lambda: g(pse=torch.zeros(2, 4, 7, 10)), ValueError, ["pse", "[2, 4, 7, 10]"]),
    ("pse_dtype", lambda: g(pse=torch.zeros(2, 4, 8, 10, dtype=F16)), TypeError, ["pse", "float16"]),
    ("sink_shape", lambda: g(sink=torch.zeros(3)), ValueError, ["sink", "[3]", "[4]"]),
    ("sink_dtype", lambda: g(sink=torch.zeros(4, dtype=BF16)), TypeError, ["sink", "bfloat16"]),
    ("dropout_mask_small", lambda: g(keep_prob=0.5, dropout_mask=torch.zeros(3, dtype=torch.uint8), numels=NUMELS),
     ValueError, ["dropout_mask", "3", "80"]),
    ("dropout_mask_dtype", lambda: g(keep_prob=0.5, dropout_mask=torch.zeros(80, dtype=torch.bool), numels=NUMELS),
     TypeError, ["dropout_mask", "uint8", "bool"]),
    ("tnd_no_lengths", lambda: gt(actual_seq_qlen=None, actual_seq_kvlen=None), ValueError,
     ["actual_seq_qlen", "actual_seq_kvlen", "None"]),
    ("tnd_q_beyond_T", lambda: gt(actual_seq_qlen=[3, 9]), ValueError, ["actual_seq_qlen", "9"]),
    ("tnd_decreasing", lambda: gt(actual_seq_qlen=[5, 3]), ValueError, ["actual_seq_qlen", "[5, 3]"]),
    ("tnd_mode5", lambda: gt(sparse_mode=5, atten_mask=torch.zeros(5, 6, dtype=torch.bool), prefix=[1, 1]),
     ValueError, ["sparse_mode", "5", "TND"]),
    ("tnd_mode3_sq_gt_skv", lambda: npufa.npu_fusion_attention_grad(
        t(8, 4, 16), t(7, 2, 16), t(7, 2, 16), TDY, 4, "TND", softmax_max=TFWD[1], softmax_sum=TFWD[2],
        attention_in=TFWD[0], atten_mask=TRIU2048, sparse_mode=3, actual_seq_qlen=[6, 8], actual_seq_kvlen=[3, 7]),
     ValueError, ["sparse_mode 3", "Sq_b = 6", "Skv_b = 3"]),
]

XFAIL = {}


def _param(c):
    marks = [pytest.mark.xfail(reason=XFAIL[c[0]], strict=True)] if c[0] in XFAIL else []
    return pytest.param(*c, id=c[0], marks=marks)


@pytest.mark.parametrize("name,thunk,exc,needles", [_param(c) for c in CASES])
def test_bad_input(name, thunk, exc, needles):
    with pytest.raises(exc) as info:
        thunk()
    msg = str(info.value)
    assert not isinstance(info.value, RuntimeError), f"{type(info.value).__name__}: {msg!r}"
    assert OPNAME in msg, f"message does not name {OPNAME}: {msg!r}"
    low = msg.lower()
    missing = [n for n in needles if n.lower() not in low]
    assert not missing, f"message {msg!r} lacks {missing}"


def test_raw_op_errors_are_builtin():
    """The raw custom op (what autograd calls) raises the same ValueError, not a RuntimeError wrapper."""
    with pytest.raises(ValueError) as info:
        torch.ops.npufa.npu_fusion_attention_grad(
            Q, K, V, torch.zeros(2, 4, 8, 7), 4, "BNSD", None, None, None, FWD[1], FWD[2], None, FWD[0], 0.3, 1.0,
            INT_MAX, INT_MAX, 0, 0, 0, 0, None, None, None, 0, True, False, "", None, None)
    assert not isinstance(info.value, RuntimeError)
    assert "npu_fusion_attention_grad" in str(info.value) and "[2, 4, 8, 7]" in str(info.value)


# ------------------------------------------------------------------------------------------------
# inputs that look odd but are legal must NOT raise
# ------------------------------------------------------------------------------------------------
TQ0, TK0, TV0 = t(9, 2, 8, seed=9), t(10, 1, 8, seed=10), t(10, 1, 8, seed=11)
TZ = dict(actual_seq_qlen=[2, 5, 9, 0, 0], actual_seq_kvlen=[3, 6, 10, 0, 0])
TZFWD = npufa.npu_fusion_attention(TQ0, TK0, TV0, 2, "TND", keep_prob=0.5, seed=3, **TZ)

LEGAL = [
    ("lowercase_layout", lambda: g(layout="bnsd")),
    ("numels_ignored_without_dropout", lambda: g(numels=12345)),
    ("numels_ignored_with_external_mask", lambda: g(keep_prob=0.5, numels=7,
                                                    dropout_mask=npufa.dropout_gen_mask(NUMELS, 0.5, 1, 0))),
    ("numels_forward_value", lambda: g(keep_prob=0.5, seed=1, numels=NUMELS)),
    ("tnd_trailing_zeros_quirk_numels", lambda: npufa.npu_fusion_attention_grad(
        TQ0, TK0, TV0, torch.ones_like(TZFWD[0]), 2, "TND", softmax_max=TZFWD[1], softmax_sum=TZFWD[2],
        attention_in=TZFWD[0], keep_prob=0.5, seed=3, numels=TZFWD[6], **TZ)),
    ("softmax_in_ignored", lambda: g(softmax_in=torch.zeros(3))),
    ("noncontiguous_dy_and_stats", lambda: g(dy=DY.transpose(0, 1).contiguous().transpose(0, 1),
                                             softmax_max=FWD[1].transpose(0, 1).contiguous().transpose(0, 1))),
    ("expanded_dy", lambda: g(dy=torch.ones(1, 1, 1, 1).expand(2, 4, 8, 8))),
    ("lengths_as_tensor", lambda: gt(actual_seq_qlen=torch.tensor([3, 8]), actual_seq_kvlen=torch.tensor([4, 10]))),
    ("both_negative_without_mask_ignored", lambda: g(pre_tockens=-1, next_tockens=-1)),
    ("inner_precise_2", lambda: g(inner_precise=2)),
    ("gen_mask_parallel_sync", lambda: g(gen_mask_parallel=False, sync=True)),
]


@pytest.mark.parametrize("name,thunk", LEGAL, ids=[c[0] for c in LEGAL])
def test_legal_input_accepted(name, thunk):
    dq, dk, dv, dpse, dsink = thunk()
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert dpse is None and dsink.dtype == F32 and tuple(dsink.shape) == (0,)


def test_noncontiguous_stats_give_same_grads():
    a = g()
    b = g(dy=DY.transpose(0, 1).contiguous().transpose(0, 1),
          softmax_max=FWD[1].transpose(0, 1).contiguous().transpose(0, 1),
          softmax_sum=FWD[2].transpose(0, 1).contiguous().transpose(0, 1),
          attention_in=FWD[0].transpose(0, 1).contiguous().transpose(0, 1))
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)
