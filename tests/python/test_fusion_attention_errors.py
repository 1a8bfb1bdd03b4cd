"""Bad inputs to npufa.npu_fusion_attention raise ValueError / TypeError (never a crash) whose message
names the op, the argument and the offending value.

Spec: /work/shared/spec/torch_npu_attention.md §1.2, §1.5-§1.6, §2.2, §2.5-§2.7; project decisions 6, 15.
"""
import pytest
import torch

import npufa

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
INT_MAX = 2147483647
TRIU2048 = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
OPNAME = "npu_fusion_attention"


def prefix_mask():
    m = torch.zeros(3072, 2048, dtype=torch.bool)
    m[:2048] = TRIU2048
    m[2048:, 1024:] = True
    return m


PREFIX3072 = prefix_mask()


def t(*shape, dtype=F32):
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    return torch.randn(*shape, generator=g).to(dtype)


def bnsd(B=2, Nq=4, Nkv=2, Sq=8, Skv=10, D=16, Dv=16, dtype=F32):
    return t(B, Nq, Sq, D, dtype=dtype), t(B, Nkv, Skv, D, dtype=dtype), t(B, Nkv, Skv, Dv, dtype=dtype)


def tnd(lq, lkv, Nq=4, Nkv=2, D=16, Dv=16, dtype=F32, Tq=None, Tkv=None):
    Tq = sum(lq) if Tq is None else Tq
    Tkv = sum(lkv) if Tkv is None else Tkv
    return t(Tq, Nq, D, dtype=dtype), t(Tkv, Nkv, D, dtype=dtype), t(Tkv, Nkv, Dv, dtype=dtype)


Q, K, V = bnsd()  # B=2, Nq=4, Nkv=2, Sq=8, Skv=10, D=Dv=16
TQ, TK, TV = tnd([3, 5], [4, 6])
TKW = dict(actual_seq_qlen=[3, 8], actual_seq_kvlen=[4, 10])


def fa(*args, **kw):
    return npufa.npu_fusion_attention(*args, **kw)


# (id, thunk, exception type(s), substrings that must all be in the message (case-insensitive))
CASES = [
    # ---- layout, head_num, keep_prob, padding_mask ----
    ("layout_BSNH", lambda: fa(Q, K, V, 4, "BSNH"), ValueError, ["input_layout", "BSNH", "BSH", "SBH", "BNSD", "TND",
                                                                 "did you mean BSND"]),
    ("layout_empty", lambda: fa(Q, K, V, 4, ""), ValueError, ["input_layout"]),
    ("layout_not_str", lambda: fa(Q, K, V, 4, 3), TypeError, ["input_layout", "int"]),
    ("keep_prob_0", lambda: fa(Q, K, V, 4, "BNSD", keep_prob=0.0), ValueError, ["keep_prob", "(0, 1]", "0"]),
    ("keep_prob_1.5", lambda: fa(Q, K, V, 4, "BNSD", keep_prob=1.5), ValueError, ["keep_prob", "1.5"]),
    ("keep_prob_-0.1", lambda: fa(Q, K, V, 4, "BNSD", keep_prob=-0.1), ValueError, ["keep_prob", "-0.1"]),
    ("keep_prob_nan", lambda: fa(Q, K, V, 4, "BNSD", keep_prob=float("nan")), ValueError, ["keep_prob", "nan"]),
    ("keep_prob_0_with_seed", lambda: fa(Q, K, V, 4, "BNSD", keep_prob=0.0, seed=3), ValueError, ["keep_prob"]),
    ("head_num_0", lambda: fa(Q, K, V, 0, "BNSD"), ValueError, ["head_num", "0"]),
    ("head_num_neg", lambda: fa(*tnd([3], [3]), -2, "TND", actual_seq_qlen=[3], actual_seq_kvlen=[3]), ValueError,
     ["head_num", "-2"]),
    ("padding_mask", lambda: fa(Q, K, V, 4, "BNSD", padding_mask=torch.zeros(2, 4, 8, 10, dtype=torch.bool)),
     ValueError, ["padding_mask"]),
    ("inner_precise_7", lambda: fa(Q, K, V, 4, "BNSD", inner_precise=7), ValueError, ["inner_precise", "7"]),
    # ---- shapes / dtypes of q, k, v ----
    ("rank_3d_query_bnsd", lambda: fa(Q[0], K, V, 4, "BNSD"), ValueError, ["query", "4-D", "BNSD", "[4, 8, 16]"]),
    ("rank_4d_bsh", lambda: fa(Q, K, V, 4, "BSH"), ValueError, ["query", "3-D", "BSH", "[2, 4, 8, 16]"]),
    ("rank_4d_tnd", lambda: fa(Q, K, V, 4, "TND", **TKW), ValueError, ["query", "3-D", "TND"]),
    ("head_num_ne_query_n_bnsd", lambda: fa(Q, K, V, 2, "BNSD"), ValueError, ["head_num", "2", "[2, 4, 8, 16]"]),
    ("head_num_ne_query_n_bsnd", lambda: fa(*(x.transpose(1, 2).contiguous() for x in bnsd()), 8, "BSND"),
     ValueError, ["head_num", "8", "BSND", "[2, 8, 4, 16]"]),
    ("head_num_ne_query_n_tnd", lambda: fa(TQ, TK, TV, 2, "TND", **TKW), ValueError, ["head_num", "2", "[8, 4, 16]"]),
    ("bsh_H_not_multiple", lambda: fa(t(2, 8, 30), t(2, 10, 30), t(2, 10, 30), 4, "BSH"), ValueError,
     ["head_num", "30", "4"]),
    ("nq_mod_nkv", lambda: fa(*bnsd(Nq=4, Nkv=3), 4, "BNSD"), ValueError, ["Nq % Nkv", "Nq = 4", "Nkv = 3"]),
    ("nq_mod_nkv_bsh", lambda: fa(t(2, 8, 64), t(2, 10, 48), t(2, 10, 48), 4, "BSH"), ValueError,
     ["Nq % Nkv", "Nkv = 3"]),
    ("dv_gt_d", lambda: fa(*bnsd(Dv=32), 4, "BNSD"), ValueError, ["Dv", "D = 16", "Dv = 32"]),
    ("dq_ne_dk", lambda: fa(t(2, 4, 8, 16), t(2, 2, 10, 8), t(2, 2, 10, 8), 4, "BNSD"), ValueError,
     ["Dq == Dk", "[2, 4, 8, 16]", "[2, 2, 10, 8]"]),
    ("batch_mismatch", lambda: fa(t(2, 4, 8, 16), t(3, 2, 10, 16), t(3, 2, 10, 16), 4, "BNSD"), ValueError,
     ["batch", "[3, 2, 10, 16]"]),
    ("kv_seq_mismatch", lambda: fa(t(2, 4, 8, 16), t(2, 2, 10, 16), t(2, 2, 11, 16), 4, "BNSD"), ValueError,
     ["sequence", "[2, 2, 11, 16]"]),
    ("kv_heads_mismatch", lambda: fa(t(2, 4, 8, 16), t(2, 2, 10, 16), t(2, 1, 10, 16), 4, "BNSD"), ValueError,
     ["head", "[2, 1, 10, 16]"]),
    ("dtype_qk", lambda: fa(Q, K.half(), V, 4, "BNSD"), TypeError, ["query", "key", "float32", "float16"]),
    ("dtype_qv", lambda: fa(Q.bfloat16(), K.bfloat16(), V, 4, "BNSD"), TypeError, ["value", "bfloat16", "float32"]),
    ("dtype_int_query", lambda: fa(Q.int(), K.int(), V.int(), 4, "BNSD"), TypeError, ["query", "int32"]),
    ("dtype_f64_query", lambda: fa(Q.double(), K.double(), V.double(), 4, "BNSD"), TypeError, ["query", "float64"]),
    # ---- TND lengths ----
    ("tnd_no_lengths", lambda: fa(TQ, TK, TV, 4, "TND"), ValueError, ["actual_seq_qlen", "actual_seq_kvlen", "None"]),
    ("tnd_only_q_lengths", lambda: fa(TQ, TK, TV, 4, "TND", actual_seq_qlen=[3, 8]), ValueError,
     ["actual_seq_kvlen", "None"]),
    ("tnd_empty_lists", lambda: fa(TQ, TK, TV, 4, "TND", actual_seq_qlen=[], actual_seq_kvlen=[]), ValueError,
     ["actual_seq_qlen"]),
    ("tnd_q_beyond_T", lambda: fa(TQ, TK, TV, 4, "TND", actual_seq_qlen=[3, 9], actual_seq_kvlen=[4, 10]),
     ValueError, ["actual_seq_qlen", "9", "T = 8"]),
    ("tnd_kv_beyond_T", lambda: fa(TQ, TK, TV, 4, "TND", actual_seq_qlen=[3, 8], actual_seq_kvlen=[4, 11]),
     ValueError, ["actual_seq_kvlen", "11", "T = 10"]),
    ("tnd_decreasing", lambda: fa(TQ, TK, TV, 4, "TND", actual_seq_qlen=[5, 3], actual_seq_kvlen=[4, 10]),
     ValueError, ["actual_seq_qlen", "cumulative", "[5, 3]"]),
    ("tnd_decreasing_kv", lambda: fa(TQ, TK, TV, 4, "TND", actual_seq_qlen=[3, 8, 8], actual_seq_kvlen=[4, 10, 6]),
     ValueError, ["actual_seq_kvlen", "[4, 10, 6]"]),
    ("tnd_zero_then_nonzero", lambda: fa(TQ, TK, TV, 4, "TND", actual_seq_qlen=[3, 0, 8], actual_seq_kvlen=[4, 4, 10]),
     ValueError, ["actual_seq_qlen", "[3, 0, 8]"]),
    ("tnd_negative", lambda: fa(TQ, TK, TV, 4, "TND", actual_seq_qlen=[3, -1], actual_seq_kvlen=[4, 10]),
     ValueError, ["actual_seq_qlen", "-1"]),
    ("tnd_len_mismatch", lambda: fa(TQ, TK, TV, 4, "TND", actual_seq_qlen=[3, 8], actual_seq_kvlen=[4, 7, 10]),
     ValueError, ["actual_seq_qlen", "actual_seq_kvlen", "[3, 8]", "[4, 7, 10]"]),
    # ---- masks ----
    ("mask_wrong_shape", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(8, 9, dtype=torch.bool)), ValueError,
     ["atten_mask", "[8, 9]"]),
    ("mask_wrong_batch", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(3, 1, 8, 10, dtype=torch.bool)),
     ValueError, ["atten_mask", "[3, 1, 8, 10]"]),
    ("mask_wrong_heads", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(2, 2, 8, 10, dtype=torch.bool)),
     ValueError, ["atten_mask", "[2, 2, 8, 10]"]),
    ("mask_5d", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(1, 2, 4, 8, 10, dtype=torch.bool)),
     ValueError, ["atten_mask", "[1, 2, 4, 8, 10]"]),
    ("mask_1d", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(10, dtype=torch.bool)), ValueError,
     ["atten_mask", "[10]"]),
    ("mask_3d", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(2, 8, 10, dtype=torch.bool)), ValueError,
     ["atten_mask", "[2, 8, 10]"]),
    ("mask_transposed", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(10, 8, dtype=torch.bool)), ValueError,
     ["atten_mask", "[10, 8]"]),
    ("mask_float", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(8, 10)), TypeError,
     ["atten_mask", "float32"]),
    ("mask_fp16", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(8, 10, dtype=F16), sparse_mode=1),
     TypeError, ["atten_mask", "float16"]),
    ("mask_int64", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(8, 10, dtype=torch.int64)), TypeError,
     ["atten_mask", "int64"]),
    ("tnd_mask_wrong_shape", lambda: fa(TQ, TK, TV, 4, "TND", atten_mask=torch.zeros(5, 5, dtype=torch.bool), **TKW),
     ValueError, ["atten_mask", "[5, 5]"]),
    ("tnd_mask_4d_batch", lambda: fa(TQ, TK, TV, 4, "TND", atten_mask=torch.zeros(2, 1, 5, 6, dtype=torch.bool),
                                     **TKW), ValueError, ["atten_mask", "[2, 1, 5, 6]"]),
    ("compressed_mode2_small", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.ones(8, 10, dtype=torch.bool),
                                          sparse_mode=2), ValueError, ["atten_mask", "sparse_mode 2", "2048", "[8, 10]"]),
    ("compressed_mode3_1024", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=TRIU2048[:1024, :1024], sparse_mode=3),
     ValueError, ["atten_mask", "sparse_mode 3", "[1024, 1024]"]),
    ("compressed_mode4_batch", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=TRIU2048.expand(2, 1, 2048, 2048),
                                          sparse_mode=4), ValueError, ["atten_mask", "sparse_mode 4", "[2, 1, 2048, 2048]"]),
    ("compressed_mode6_2048", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=TRIU2048, sparse_mode=6, prefix=[2, 2]),
     ValueError, ["atten_mask", "sparse_mode 6", "3072", "[2048, 2048]"]),
    ("compressed_mode2_3072", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=PREFIX3072, sparse_mode=2), ValueError,
     ["atten_mask", "sparse_mode 2", "[3072, 2048]"]),
    ("compressed_tnd_mode3", lambda: fa(TQ, TK, TV, 4, "TND", atten_mask=torch.zeros(5, 6, dtype=torch.bool),
                                        sparse_mode=3, **TKW), ValueError, ["atten_mask", "sparse_mode 3", "[5, 6]"]),
    ("compressed_mode2_float", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=TRIU2048.float(), sparse_mode=2), TypeError,
     ["atten_mask", "float32"]),
    # ---- sparse_mode values ----
    ("mode5_tnd", lambda: fa(TQ, TK, TV, 4, "TND", atten_mask=torch.zeros(5, 6, dtype=torch.bool), sparse_mode=5,
                             prefix=[1, 1], **TKW), ValueError, ["sparse_mode", "5", "TND"]),
    ("mode5_tnd_nomask", lambda: fa(TQ, TK, TV, 4, "TND", sparse_mode=5, **TKW), ValueError, ["sparse_mode", "5"]),
    ("mode7_dense", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=TRIU2048, sparse_mode=7), ValueError,
     ["sparse_mode", "7", "TND"]),
    ("mode8_dense", lambda: fa(Q, K, V, 4, "BNSD", sparse_mode=8), ValueError, ["sparse_mode", "8", "TND"]),
    ("mode9", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=TRIU2048, sparse_mode=9), ValueError, ["sparse_mode", "9"]),
    ("mode9_tnd", lambda: fa(TQ, TK, TV, 4, "TND", sparse_mode=9, **TKW), ValueError, ["sparse_mode", "9"]),
    ("mode10", lambda: fa(Q, K, V, 4, "BNSD", sparse_mode=10), ValueError, ["sparse_mode", "10"]),
    ("mode-1", lambda: fa(Q, K, V, 4, "BNSD", sparse_mode=-1), ValueError, ["sparse_mode", "-1"]),
    ("mode-1_tnd", lambda: fa(TQ, TK, TV, 4, "TND", sparse_mode=-1, **TKW), ValueError, ["sparse_mode", "-1"]),
    # ---- pre/next (§1.6 note 5), modes 0 and 4 with a mask ----
    ("both_negative", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(8, 10, dtype=torch.bool),
                                 pre_tockens=-1, next_tockens=-1), ValueError,
     ["pre_tockens", "next_tockens", "-1"]),
    ("both_negative_mode4", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=TRIU2048, sparse_mode=4, pre_tockens=-2,
                                       next_tockens=-3), ValueError, ["pre_tockens = -2", "next_tockens = -3"]),
    ("next_neg_pre_small", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(8, 10, dtype=torch.bool),
                                      pre_tockens=2, next_tockens=-3), ValueError,
     ["next_tockens", "pre_tockens = 2", "next_tockens = -3"]),
    ("next_neg_beyond_skv", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(8, 10, dtype=torch.bool),
                                       pre_tockens=50, next_tockens=-10), ValueError,
     ["next_tockens", "Skv = 10", "next_tockens = -10"]),
    ("pre_neg_next_small", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=TRIU2048, sparse_mode=4, pre_tockens=-3,
                                      next_tockens=2), ValueError, ["pre_tockens", "pre_tockens = -3",
                                                                    "next_tockens = 2"]),
    ("pre_neg_beyond_sq", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(8, 10, dtype=torch.bool),
                                     pre_tockens=-8, next_tockens=50), ValueError, ["pre_tockens", "Sq = 8",
                                                                                    "pre_tockens = -8"]),
    # ---- TND constraints (§1.6 notes 7 and 9) ----
    ("tnd_mode0_next_neg", lambda: fa(TQ, TK, TV, 4, "TND", atten_mask=torch.zeros(5, 6, dtype=torch.bool),
                                      pre_tockens=10, next_tockens=-1, **TKW), ValueError,
     ["sparse_mode 0", "TND", "next_tockens = -1"]),
    ("tnd_mode0_invalid_rows", lambda: fa(*tnd([6, 2], [3, 4]), 4, "TND", atten_mask=torch.zeros(6, 4, dtype=torch.bool),
                                          pre_tockens=1, next_tockens=0, actual_seq_qlen=[6, 8],
                                          actual_seq_kvlen=[3, 7]), ValueError,
     ["sparse_mode 0", "Sq_b = 6", "Skv_b = 3", "pre_tockens = 1"]),
    ("tnd_mode3_sq_gt_skv", lambda: fa(*tnd([6, 2], [3, 4]), 4, "TND", atten_mask=TRIU2048, sparse_mode=3,
                                       actual_seq_qlen=[6, 8], actual_seq_kvlen=[3, 7]), ValueError,
     ["sparse_mode 3", "Sq_b = 6", "Skv_b = 3"]),
    ("tnd_mode4_pre_neg", lambda: fa(TQ, TK, TV, 4, "TND", atten_mask=TRIU2048, sparse_mode=4, pre_tockens=-1,
                                     next_tockens=5, **TKW), ValueError, ["sparse_mode 4", "pre_tockens = -1"]),
    ("tnd_mode4_sq_minus_next", lambda: fa(TQ, TK, TV, 4, "TND", atten_mask=TRIU2048, sparse_mode=4, pre_tockens=5,
                                           next_tockens=-2, **TKW), ValueError,
     ["sparse_mode 4", "Sq_b - next_tockens <= Skv_b", "next_tockens = -2"]),
    ("tnd_mode7_pre_small", lambda: fa(TQ, TK, TV, 4, "TND", atten_mask=TRIU2048, sparse_mode=7, pre_tockens=5,
                                       next_tockens=0, **TKW), ValueError,
     ["sparse_mode 7", "pre_tockens", "(6)", "pre_tockens = 5"]),
    ("tnd_mode7_next_pos", lambda: fa(TQ, TK, TV, 4, "TND", atten_mask=TRIU2048, sparse_mode=7, pre_tockens=INT_MAX,
                                      next_tockens=1, **TKW), ValueError, ["sparse_mode 7", "next_tockens = 1"]),
    ("tnd_mode7_sq_gt_skv", lambda: fa(*tnd([6, 2], [3, 4]), 4, "TND", atten_mask=TRIU2048, sparse_mode=7,
                                       pre_tockens=INT_MAX, next_tockens=0, actual_seq_qlen=[6, 8],
                                       actual_seq_kvlen=[3, 7]), ValueError, ["sparse_mode 7", "Sq_b = 6", "Skv_b = 3"]),
    ("tnd_mode8_pre_small", lambda: fa(TQ, TK, TV, 4, "TND", atten_mask=TRIU2048, sparse_mode=8, pre_tockens=3,
                                       next_tockens=0, **TKW), ValueError,
     ["sparse_mode 8", "pre_tockens", "(4)", "pre_tockens = 3"]),
    ("tnd_mode8_next", lambda: fa(*tnd([6, 2], [3, 4]), 4, "TND", atten_mask=TRIU2048, sparse_mode=8,
                                  pre_tockens=INT_MAX, next_tockens=2, actual_seq_qlen=[6, 8],
                                  actual_seq_kvlen=[3, 7]), ValueError,
     ["sparse_mode 8", "next_tockens = 2", "Sq_first = 6"]),
    # ---- prefix (modes 5/6) ----
    ("prefix_missing_mode5", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(2, 1, 8, 10, dtype=torch.bool),
                                        sparse_mode=5), ValueError, ["sparse_mode 5", "prefix", "None"]),
    ("prefix_missing_mode6", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=PREFIX3072, sparse_mode=6), ValueError,
     ["sparse_mode 6", "prefix", "None"]),
    ("prefix_short", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=PREFIX3072, sparse_mode=6, prefix=[3]), ValueError,
     ["prefix", "[3]"]),
    ("prefix_too_big", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=PREFIX3072, sparse_mode=6, prefix=[3, 11]),
     ValueError, ["prefix[1]", "11", "[2, 10]"]),
    ("prefix_too_small", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=PREFIX3072, sparse_mode=6, prefix=[1, 5]),
     ValueError, ["prefix[0]", "1", "[2, 10]"]),
    ("prefix_neg_sq_gt_skv", lambda: fa(*bnsd(Sq=10, Skv=8), 4, "BNSD", atten_mask=PREFIX3072, sparse_mode=6,
                                        prefix=[-1, 3]), ValueError, ["prefix[0]", "-1", "[0, 8]"]),
    ("prefix_tnd_mode6", lambda: fa(TQ, TK, TV, 4, "TND", atten_mask=PREFIX3072, sparse_mode=6, prefix=[0, 2],
                                    **TKW), ValueError, ["prefix[0]", "[1, 4]"]),
    # ---- softmax_layout ----
    ("softmax_layout_dense", lambda: fa(Q, K, V, 4, "BNSD", softmax_layout="TND"), ValueError,
     ["softmax_layout", "TND", "BNSD"]),
    ("softmax_layout_xyz", lambda: fa(TQ, TK, TV, 4, "TND", softmax_layout="XYZ", **TKW), ValueError,
     ["softmax_layout", "XYZ"]),
    ("softmax_layout_xyz_dense", lambda: fa(Q, K, V, 4, "BSND", softmax_layout="XYZ"), ValueError,
     ["softmax_layout", "XYZ"]),
    # ---- pse ----
    ("pse_dtype", lambda: fa(Q, K, V, 4, "BNSD", pse=t(2, 4, 8, 10, dtype=F16)), TypeError,
     ["pse", "float32", "float16"]),
    ("pse_dtype_bf16", lambda: fa(*bnsd(dtype=BF16), 4, "BNSD", pse=t(2, 4, 8, 10)), TypeError,
     ["pse", "bfloat16", "float32"]),
    ("pse_shape_rows", lambda: fa(Q, K, V, 4, "BNSD", pse=t(2, 4, 7, 10)), ValueError, ["pse", "[2, 4, 7, 10]"]),
    ("pse_shape_heads", lambda: fa(Q, K, V, 4, "BNSD", pse=t(2, 2, 8, 10)), ValueError, ["pse", "[2, 2, 8, 10]"]),
    ("pse_shape_batch", lambda: fa(Q, K, V, 4, "BNSD", pse=t(3, 4, 8, 10)), ValueError, ["pse", "[3, 4, 8, 10]"]),
    ("pse_shape_cols", lambda: fa(Q, K, V, 4, "BNSD", pse=t(2, 4, 8, 9)), ValueError, ["pse", "[2, 4, 8, 9]"]),
    ("pse_1d_dense", lambda: fa(Q, K, V, 4, "BNSD", pse=t(2 * 4 * 8 * 10)), ValueError, ["pse", "[640]"]),
    ("pse_3d", lambda: fa(Q, K, V, 4, "BNSD", pse=t(4, 8, 10)), ValueError, ["pse", "[4, 8, 10]"]),
    ("pse_mode7", lambda: fa(TQ, TK, TV, 4, "TND", pse=t(2, 4, 5, 6), atten_mask=TRIU2048, sparse_mode=7,
                             pre_tockens=INT_MAX, next_tockens=0, **TKW), ValueError, ["pse", "sparse_mode 7"]),
    ("pse_mode8", lambda: fa(TQ, TK, TV, 4, "TND", pse=t(2, 4, 5, 6), atten_mask=TRIU2048, sparse_mode=8,
                             pre_tockens=INT_MAX, next_tockens=0, **TKW), ValueError, ["pse", "sparse_mode 8"]),
    ("pse_tnd_zero_len", lambda: fa(*tnd([3, 0, 5], [4, 0, 6]), 4, "TND", pse=t(3, 4, 5, 6),
                                    actual_seq_qlen=[3, 3, 8], actual_seq_kvlen=[4, 4, 10]), ValueError,
     ["pse", "zero-length", "[3, 3, 8]"]),
    ("pse_tnd_trailing_zero", lambda: fa(TQ, TK, TV, 4, "TND", pse=t(3, 4, 5, 6), actual_seq_qlen=[3, 8, 0],
                                         actual_seq_kvlen=[4, 10, 0]), ValueError, ["pse", "zero-length"]),
    ("pse_tnd_flat_wrong", lambda: fa(TQ, TK, TV, 4, "TND", pse=t(17), **TKW), ValueError, ["pse", "[17]"]),
    ("alibi_no_mask", lambda: fa(*bnsd(B=1, Nq=1, Nkv=1, Sq=1100, Skv=1100, D=4, Dv=4), 1, "BNSD",
                                 pse=t(1, 1, 1024, 1100)), ValueError, ["alibi", "pse", "[1, 1, 1024, 1100]", "None"]),
    ("alibi_mode1", lambda: fa(*bnsd(B=1, Nq=1, Nkv=1, Sq=1100, Skv=1100, D=4, Dv=4), 1, "BNSD",
                               pse=t(1, 1, 1024, 1100), atten_mask=torch.zeros(1100, 1100, dtype=torch.bool),
                               sparse_mode=1), ValueError, ["alibi", "pse", "sparse_mode = 1"]),
    ("alibi_band_next_pos", lambda: fa(*bnsd(B=1, Nq=1, Nkv=1, Sq=1100, Skv=1100, D=4, Dv=4), 1, "BNSD",
                                       pse=t(1, 1, 1024, 1100), atten_mask=TRIU2048, sparse_mode=4, pre_tockens=50,
                                       next_tockens=3), ValueError, ["alibi", "pse", "sparse_mode = 4"]),
    ("alibi_not_square", lambda: fa(*bnsd(B=1, Nq=1, Nkv=1, Sq=1100, Skv=1200, D=4, Dv=4), 1, "BNSD",
                                    pse=t(1, 1, 1024, 1200), atten_mask=TRIU2048, sparse_mode=3), ValueError,
     ["alibi", "Sq == Skv", "Skv = 1200"]),
    # ---- sink ----
    ("sink_dtype_f16", lambda: fa(Q, K, V, 4, "BNSD", sink=torch.zeros(4, dtype=F16)), TypeError,
     ["sink", "float32", "float16"]),
    ("sink_dtype_bf16", lambda: fa(*bnsd(dtype=BF16), 4, "BNSD", sink=torch.zeros(4, dtype=BF16)), TypeError,
     ["sink", "bfloat16"]),
    ("sink_shape", lambda: fa(Q, K, V, 4, "BNSD", sink=torch.zeros(2)), ValueError, ["sink", "[4]", "[2]"]),
    ("sink_0d", lambda: fa(Q, K, V, 4, "BNSD", sink=torch.tensor(1.0)), ValueError, ["sink", "[4]", "[]"]),
    ("sink_shape_2d", lambda: fa(Q, K, V, 4, "BNSD", sink=torch.zeros(1, 4)), ValueError, ["sink", "[1, 4]"]),
    # ---- dropout_mask ----
    ("dropout_mask_small", lambda: fa(Q, K, V, 4, "BNSD", keep_prob=0.5, dropout_mask=torch.zeros(10, dtype=torch.uint8)),
     ValueError, ["dropout_mask", "10", "80"]),
    ("dropout_mask_dtype", lambda: fa(Q, K, V, 4, "BNSD", keep_prob=0.5, dropout_mask=torch.zeros(80, dtype=torch.bool)),
     TypeError, ["dropout_mask", "uint8", "bool"]),
    ("dropout_mask_dtype_f32", lambda: fa(Q, K, V, 4, "BNSD", keep_prob=0.5, dropout_mask=torch.zeros(80)),
     TypeError, ["dropout_mask", "uint8", "float32"]),
    ("dropout_mask_small_tnd", lambda: fa(TQ, TK, TV, 4, "TND", keep_prob=0.5,
                                          dropout_mask=torch.zeros(20, dtype=torch.uint8), **TKW), ValueError,
     ["dropout_mask", "20", "21"]),
]


@pytest.mark.parametrize("name,thunk,exc,needles", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, thunk, exc, needles):
    with pytest.raises(exc) as info:
        thunk()
    msg = str(info.value)
    low = msg.lower()
    assert OPNAME in msg, f"message does not name the op: {msg!r}"
    missing = [n for n in needles if n.lower() not in low]
    assert not missing, f"message {msg!r} lacks {missing}"


def test_error_types_are_builtin():
    """ValueError / TypeError themselves (not RuntimeError wrappers), so callers can catch them."""
    with pytest.raises(ValueError) as a:
        fa(Q, K, V, 4, "BSNH")
    assert type(a.value) is ValueError or issubclass(type(a.value), ValueError)
    assert not isinstance(a.value, RuntimeError)
    with pytest.raises(TypeError) as b:
        fa(Q, K.half(), V, 4, "BNSD")
    assert not isinstance(b.value, RuntimeError)


# ------------------------------------------------------------------------------------------------
# inputs that look odd but are legal must NOT raise (the validation is not over-eager)
# ------------------------------------------------------------------------------------------------
LEGAL = [
    ("lowercase_layout", lambda: fa(Q, K, V, 4, "bnsd")),
    ("trailing_zeros", lambda: fa(TQ, TK, TV, 4, "TND", actual_seq_qlen=[3, 8, 0, 0], actual_seq_kvlen=[4, 10, 0, 0])),
    ("zero_len_middle", lambda: fa(TQ, TK, TV, 4, "TND", actual_seq_qlen=[3, 3, 8], actual_seq_kvlen=[4, 4, 10])),
    ("lengths_as_tensor", lambda: fa(TQ, TK, TV, 4, "TND", actual_seq_qlen=torch.tensor([3, 8]),
                                     actual_seq_kvlen=torch.tensor([4, 10]))),
    ("T_larger_than_sum", lambda: fa(TQ, TK, TV, 4, "TND", actual_seq_qlen=[3, 6], actual_seq_kvlen=[4, 9])),
    ("next_neg_ok", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(8, 10, dtype=torch.bool), pre_tockens=3,
                               next_tockens=-3)),
    ("pre_neg_ok", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=torch.zeros(8, 10, dtype=torch.bool), pre_tockens=-7,
                              next_tockens=7)),
    ("both_negative_without_mask_ignored", lambda: fa(Q, K, V, 4, "BNSD", pre_tockens=-1, next_tockens=-1)),
    ("mode7_without_mask_tnd", lambda: fa(TQ, TK, TV, 4, "TND", sparse_mode=7, pre_tockens=0, next_tockens=5,
                                          **TKW)),
    ("mode6_without_mask_no_prefix", lambda: fa(Q, K, V, 4, "BNSD", sparse_mode=6)),
    ("inner_precise_2", lambda: fa(Q, K, V, 4, "BNSD", inner_precise=2)),
    ("keep_prob_1_bad_mask_ignored", lambda: fa(Q, K, V, 4, "BNSD", keep_prob=1.0,
                                                dropout_mask=torch.zeros(1, dtype=torch.uint8))),
    ("softmax_layout_tnd_lower", lambda: fa(TQ, TK, TV, 4, "tnd", softmax_layout="TND", **TKW)),
    ("huge_head_dim", lambda: fa(*bnsd(B=1, Nq=1, Nkv=1, Sq=2, Skv=3, D=1000, Dv=1000), 1, "BNSD")),
    ("prefix_edges", lambda: fa(Q, K, V, 4, "BNSD", atten_mask=PREFIX3072, sparse_mode=6, prefix=[2, 10])),
    ("mode8_next_large", lambda: fa(TQ, TK, TV, 4, "TND", atten_mask=TRIU2048, sparse_mode=8, pre_tockens=4,
                                    next_tockens=100, **TKW)),
]


@pytest.mark.parametrize("name,thunk", LEGAL, ids=[c[0] for c in LEGAL])
def test_legal_input_accepted(name, thunk):
    res = thunk()
    assert len(res) == 7
    assert torch.isfinite(res[0]).all()
