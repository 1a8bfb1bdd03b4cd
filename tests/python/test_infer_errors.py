"""Bad input to the inference ops raises ValueError / TypeError (never a crash, never an out-of-bounds read) whose
message names the op and the offending argument.

Conventions: /work/main/docs/inference.md. Spec: /work/shared/spec/torch_npu_attention.md §1, §5-§8, §11, §12;
project decisions 6, 7, 15 (/work/shared/spec/README.md). Messages are matched on the op name and the argument
name only (case-insensitive), not on their wording.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

import npufa
from infer_helpers import F16, F32, TRIU2048, rnd

PFA_N, IFA_N, FIA_N, FIA2_N, CACHE_N = ("npu_prompt_flash_attention", "npu_incre_flash_attention",
                                        "npu_fused_infer_attention_score", "npu_fused_infer_attention_score_v2",
                                        "_npu_reshape_and_cache")
pfa = npufa.npu_prompt_flash_attention
ifa = npufa.npu_incre_flash_attention
fia = npufa.npu_fused_infer_attention_score
fia2 = npufa.npu_fused_infer_attention_score_v2
cache = npufa._npu_reshape_and_cache


def t(*shape, dtype=F32, seed=None):
    return rnd(shape, dtype, sum(shape) + len(shape) if seed is None else seed)


B, NQ, NKV, SQ, SKV, D = 2, 4, 2, 8, 10, 16
# prefill / decode problems in BNSD and BSH
Q, K, V = t(B, NQ, SQ, D), t(B, NKV, SKV, D), t(B, NKV, SKV, D)
Q1 = t(B, NQ, 1, D)
QH, KH, VH = t(B, SQ, NQ * D), t(B, SKV, NKV * D), t(B, SKV, NKV * D)
Q1H = t(B, 1, NQ * D)
# TND
TQ, TK, TV = t(8, NQ, D), t(10, NKV, D), t(10, NKV, D)
TKW = dict(actual_seq_lengths=[3, 8], actual_seq_lengths_kv=[4, 10])
# paged pool: 4 blocks of 4 tokens
BS = 4
KP, VP = t(4, BS, NKV * D), t(4, BS, NKV * D)
KP4, VP4 = t(4, NKV, BS, D), t(4, NKV, BS, D)
TABLE = torch.tensor([[0, 1, 2], [3, 0, 1]], dtype=torch.int32)
PKW = dict(block_table=TABLE, block_size=BS, actual_seq_lengths=[9, 5])
PKWF = dict(block_table=TABLE, block_size=BS, actual_seq_lengths_kv=[9, 5])

I_KW = dict(num_heads=NQ, num_key_value_heads=NKV, input_layout="BNSD")
F_KW = dict(num_heads=NQ, num_key_value_heads=NKV, input_layout="BNSD")
F2_KW = dict(num_query_heads=NQ, num_key_value_heads=NKV, input_layout="BNSD")


def bad_table(val, pos=(0, 1)):
    tb = TABLE.clone()
    tb[pos] = val
    return tb


# (id, thunk, exception type(s), op name, needles: argument names; each needle may be "a|b" = either)
CASES = [
    # ---- paged KV: block ids, table width, block_size ----
    ("ifa_block_id_ge_blocknum", lambda: ifa(Q1, KP, VP, **I_KW, **dict(PKW, block_table=bad_table(4))), ValueError,
     IFA_N, ["block_table"]),
    ("ifa_block_id_huge", lambda: ifa(Q1, KP, VP, **I_KW, **dict(PKW, block_table=bad_table(1 << 30))), ValueError,
     IFA_N, ["block_table"]),
    ("ifa_block_id_negative", lambda: ifa(Q1, KP, VP, **I_KW, **dict(PKW, block_table=bad_table(-1))), ValueError,
     IFA_N, ["block_table"]),
    ("ifa_block_id_negative_b1", lambda: ifa(Q1, KP, VP, **I_KW, **dict(PKW, block_table=bad_table(-7, (1, 1)))),
     ValueError, IFA_N, ["block_table"]),
    ("fia_decode_block_id_ge_blocknum", lambda: fia(Q1, KP4, VP4, **F_KW, **dict(PKWF, block_table=bad_table(9))),
     ValueError, FIA_N, ["block_table"]),
    ("fia_prefill_block_id_negative", lambda: fia(Q, KP4, VP4, **F_KW, **dict(PKWF, block_table=bad_table(-2))),
     ValueError, FIA_N, ["block_table"]),
    ("fia2_block_id_ge_blocknum", lambda: fia2(Q, KP, VP, **F2_KW, block_table=bad_table(4), block_size=BS,
                                               actual_seq_kvlen=[9, 5]), ValueError, FIA2_N, ["block_table"]),
    ("fia_tnd_block_id_negative", lambda: fia(TQ, KP, VP, num_heads=NQ, num_key_value_heads=NKV, input_layout="TND",
                                              actual_seq_lengths=[3, 8], actual_seq_lengths_kv=[9, 5],
                                              block_table=bad_table(-1), block_size=BS), ValueError, FIA_N,
     ["block_table"]),
    ("ifa_table_too_narrow", lambda: ifa(Q1, KP, VP, **I_KW, block_table=TABLE[:, :2], block_size=BS,
                                         actual_seq_lengths=[9, 5]), ValueError, IFA_N,
     ["block_table|actual_seq_lengths"]),
    ("fia_table_too_narrow", lambda: fia(Q, KP, VP, **F_KW, block_table=TABLE[:, :1], block_size=BS,
                                         actual_seq_lengths_kv=[9, 5]), ValueError, FIA_N,
     ["block_table|actual_seq_lengths_kv"]),
    ("fia2_table_too_narrow", lambda: fia2(Q1, KP, VP, **F2_KW, block_table=TABLE[:, :2], block_size=BS,
                                           actual_seq_kvlen=[12, 5]), ValueError, FIA2_N,
     ["block_table|actual_seq_kvlen"]),
    ("ifa_block_size_0", lambda: ifa(Q1, KP, VP, **I_KW, **dict(PKW, block_size=0)), ValueError, IFA_N,
     ["block_size"]),
    ("ifa_block_size_neg", lambda: ifa(Q1, KP, VP, **I_KW, **dict(PKW, block_size=-4)), ValueError, IFA_N,
     ["block_size"]),
    ("fia_block_size_0", lambda: fia(Q1, KP, VP, **F_KW, **dict(PKWF, block_size=0)), ValueError, FIA_N,
     ["block_size"]),
    ("fia2_block_size_0", lambda: fia2(Q, KP, VP, **F2_KW, block_table=TABLE, actual_seq_kvlen=[9, 5]), ValueError,
     FIA2_N, ["block_size"]),
    ("ifa_block_size_ne_pool", lambda: ifa(Q1, KP, VP, **I_KW, **dict(PKW, block_size=8)), ValueError, IFA_N,
     ["block_size"]),
    ("ifa_paged_no_lengths", lambda: ifa(Q1, KP, VP, **I_KW, block_table=TABLE, block_size=BS), ValueError, IFA_N,
     ["actual_seq_lengths"]),
    ("fia_paged_no_lengths", lambda: fia(Q, KP, VP, **F_KW, block_table=TABLE, block_size=BS), ValueError, FIA_N,
     ["actual_seq_lengths_kv"]),
    ("ifa_block_table_float", lambda: ifa(Q1, KP, VP, **I_KW, **dict(PKW, block_table=TABLE.float())),
     (TypeError, ValueError), IFA_N, ["block_table"]),
    ("ifa_block_table_1d", lambda: ifa(Q1, KP, VP, **I_KW, **dict(PKW, block_table=TABLE[0])), ValueError, IFA_N,
     ["block_table"]),
    ("ifa_pools_differ", lambda: ifa(Q1, KP, VP[:3], **I_KW, **PKW), ValueError, IFA_N, ["value|key"]),
    # ---- lengths ----
    ("pfa_q_len_gt_S", lambda: pfa(Q, K, V, num_heads=NQ, num_key_value_heads=NKV, input_layout="BNSD",
                                   actual_seq_lengths=[SQ + 1, 2]), ValueError, PFA_N, ["actual_seq_lengths"]),
    ("pfa_kv_len_gt_S", lambda: pfa(Q, K, V, num_heads=NQ, num_key_value_heads=NKV, input_layout="BNSD",
                                    actual_seq_lengths_kv=[3, SKV + 1]), ValueError, PFA_N, ["actual_seq_lengths_kv"]),
    ("pfa_len_negative", lambda: pfa(Q, K, V, num_heads=NQ, num_key_value_heads=NKV, input_layout="BNSD",
                                     actual_seq_lengths=[-1, 2]), ValueError, PFA_N, ["actual_seq_lengths"]),
    ("pfa_len_list_short", lambda: pfa(t(3, NQ, SQ, D), t(3, NKV, SKV, D), t(3, NKV, SKV, D), num_heads=NQ,
                                       num_key_value_heads=NKV, input_layout="BNSD", actual_seq_lengths=[3, 2]),
     ValueError, PFA_N, ["actual_seq_lengths"]),
    ("ifa_len_gt_S", lambda: ifa(Q1, K, V, **I_KW, actual_seq_lengths=[SKV + 1, 1]), ValueError, IFA_N,
     ["actual_seq_lengths"]),
    ("fia_kv_len_gt_S", lambda: fia(Q, K, V, **F_KW, actual_seq_lengths_kv=[SKV + 5]), ValueError, FIA_N,
     ["actual_seq_lengths_kv"]),
    ("fia_q_len_gt_S", lambda: fia(Q, K, V, **F_KW, actual_seq_lengths=[1, SQ + 1]), ValueError, FIA_N,
     ["actual_seq_lengths"]),
    ("fia2_kv_len_gt_S", lambda: fia2(Q, K, V, **F2_KW, actual_seq_kvlen=[SKV + 1, 1]), ValueError, FIA2_N,
     ["actual_seq_kvlen"]),
    ("fia2_q_len_gt_S", lambda: fia2(Q, K, V, **F2_KW, actual_seq_qlen=[SQ + 1, 1]), ValueError, FIA2_N,
     ["actual_seq_qlen"]),
    ("fia_len_float_tensor", lambda: fia(Q, K, V, **F_KW, actual_seq_lengths_kv=torch.tensor([3.0, 4.0])),
     (TypeError, ValueError), FIA_N, ["actual_seq_lengths_kv"]),
    # ---- heads ----
    ("pfa_num_heads_mismatch", lambda: pfa(Q, K, V, num_heads=3, num_key_value_heads=1, input_layout="BNSD"),
     ValueError, PFA_N, ["num_heads"]),
    ("ifa_num_heads_mismatch_bnsd", lambda: ifa(Q1, K, V, num_heads=8, num_key_value_heads=2, input_layout="BNSD"),
     ValueError, IFA_N, ["num_heads"]),
    ("ifa_bsh_H_not_multiple", lambda: ifa(Q1H, KH, VH, num_heads=3, input_layout="BSH"), ValueError, IFA_N,
     ["num_heads"]),
    ("fia_num_heads_0", lambda: fia(Q, K, V, num_heads=0, input_layout="BNSD"), ValueError, FIA_N, ["num_heads"]),
    ("fia_num_heads_neg", lambda: fia(QH, KH, VH, num_heads=-4, input_layout="BSH"), ValueError, FIA_N,
     ["num_heads"]),
    ("fia2_num_query_heads_mismatch", lambda: fia2(Q, K, V, num_query_heads=2, num_key_value_heads=2,
                                                   input_layout="BNSD"), ValueError, FIA2_N, ["num_query_heads"]),
    ("fia_kv_heads_mismatch_bnsd", lambda: fia(Q, K, V, num_heads=NQ, num_key_value_heads=4, input_layout="BNSD"),
     ValueError, FIA_N, ["num_key_value_heads"]),
    ("fia_kv_heads_default_mismatch", lambda: fia(Q, K, V, num_heads=NQ, input_layout="BNSD"), ValueError, FIA_N,
     ["num_key_value_heads"]),
    ("pfa_nq_mod_nkv", lambda: pfa(t(B, 6, SQ, D), t(B, 4, SKV, D), t(B, 4, SKV, D), num_heads=6,
                                   num_key_value_heads=4, input_layout="BNSD"), ValueError, PFA_N,
     ["num_key_value_heads|num_heads"]),
    ("ifa_nq_mod_nkv_bsh", lambda: ifa(t(B, 1, 6 * D), t(B, SKV, 4 * D), t(B, SKV, 4 * D), num_heads=6,
                                       num_key_value_heads=4, input_layout="BSH"), ValueError, IFA_N,
     ["num_key_value_heads|num_heads"]),
    ("fia2_nq_mod_nkv", lambda: fia2(t(B, 6, SQ, D), t(B, 4, SKV, D), t(B, 4, SKV, D), num_query_heads=6,
                                     num_key_value_heads=4, input_layout="BNSD"), ValueError, FIA2_N,
     ["num_key_value_heads|num_query_heads"]),
    ("fia_paged_4d_heads_mismatch", lambda: fia(Q1, t(4, 3, BS, D), t(4, 3, BS, D), **F_KW, **PKWF), ValueError,
     FIA_N, ["key|num_key_value_heads"]),
    # ---- sparse modes ----
    *[(f"pfa_mode{m}", (lambda m=m: pfa(Q, K, V, num_heads=NQ, num_key_value_heads=NKV, input_layout="BNSD",
                                         atten_mask=TRIU2048, sparse_mode=m)), ValueError, PFA_N, ["sparse_mode"])
      for m in (5, 6, 7, 8, 9, 15, -1)],
    *[(f"fia_mode{m}", (lambda m=m: fia(Q, K, V, **F_KW, atten_mask=TRIU2048, sparse_mode=m)), ValueError, FIA_N,
       ["sparse_mode"]) for m in (5, 6, 7, 8, 9, 10)],
    ("fia2_mode9", lambda: fia2(Q, K, V, **F2_KW, atten_mask=torch.zeros(B, SQ, SQ, dtype=torch.bool), sparse_mode=9),
     ValueError, FIA2_N, ["sparse_mode"]),
    ("fia2_mode9_tnd", lambda: fia2(TQ, TK, TV, num_query_heads=NQ, num_key_value_heads=NKV, input_layout="TND",
                                    actual_seq_qlen=[3, 8], actual_seq_kvlen=[4, 10], sparse_mode=9,
                                    atten_mask=torch.zeros(34, dtype=torch.bool)), ValueError, FIA2_N,
     ["sparse_mode"]),
    *[(f"pfa_mode{m}_no_mask", (lambda m=m: pfa(Q, K, V, num_heads=NQ, num_key_value_heads=NKV, input_layout="BNSD",
                                                 sparse_mode=m)), ValueError, PFA_N, ["atten_mask"])
      for m in (1, 2, 3, 4, 11, 13)],
    *[(f"fia_mode{m}_no_mask", (lambda m=m: fia(Q, K, V, **F_KW, sparse_mode=m)), ValueError, FIA_N,
       ["atten_mask"]) for m in (1, 2, 3, 4)],
    ("fia2_mode3_no_mask_tnd", lambda: fia2(TQ, TK, TV, num_query_heads=NQ, num_key_value_heads=NKV,
                                            input_layout="TND", actual_seq_qlen=[3, 8], actual_seq_kvlen=[4, 10],
                                            sparse_mode=3), ValueError, FIA2_N, ["atten_mask"]),
    ("fia_both_negative_mode0", lambda: fia(Q, K, V, **F_KW, atten_mask=torch.zeros(SQ, SKV, dtype=torch.bool),
                                            pre_tokens=-1, next_tokens=-2), ValueError, FIA_N,
     ["pre_tokens", "next_tokens"]),
    ("pfa_both_negative_mode4", lambda: pfa(Q, K, V, num_heads=NQ, num_key_value_heads=NKV, input_layout="BNSD",
                                            atten_mask=TRIU2048, sparse_mode=4, pre_tokens=-3, next_tokens=-1),
     ValueError, PFA_N, ["pre_tokens", "next_tokens"]),
    # ---- masks ----
    ("pfa_mask_wrong_shape", lambda: pfa(Q, K, V, num_heads=NQ, num_key_value_heads=NKV, input_layout="BNSD",
                                         atten_mask=torch.zeros(SQ - 1, SKV, dtype=torch.bool)), ValueError, PFA_N,
     ["atten_mask"]),
    ("fia_mask_too_narrow", lambda: fia(Q, K, V, **F_KW, atten_mask=torch.zeros(SQ, SKV - 1, dtype=torch.bool)),
     ValueError, FIA_N, ["atten_mask"]),
    ("fia_mask_wrong_batch", lambda: fia(Q, K, V, **F_KW, atten_mask=torch.zeros(3, 1, SQ, SKV, dtype=torch.bool)),
     ValueError, FIA_N, ["atten_mask"]),
    ("fia_mask_per_head", lambda: fia(Q, K, V, **F_KW, atten_mask=torch.zeros(B, NQ, SQ, SKV, dtype=torch.bool)),
     ValueError, FIA_N, ["atten_mask"]),
    ("fia_mask_5d", lambda: fia(Q, K, V, **F_KW, atten_mask=torch.zeros(1, 1, 1, SQ, SKV, dtype=torch.bool)),
     ValueError, FIA_N, ["atten_mask"]),
    ("fia_mask_float", lambda: fia(Q, K, V, **F_KW, atten_mask=torch.zeros(SQ, SKV)), (TypeError, ValueError),
     FIA_N, ["atten_mask"]),
    ("fia_mask_compressed_small", lambda: fia(Q, K, V, **F_KW, atten_mask=torch.ones(SQ, SKV, dtype=torch.bool),
                                              sparse_mode=3), ValueError, FIA_N, ["atten_mask"]),
    ("ifa_mask_too_narrow", lambda: ifa(Q1, K, V, **I_KW, atten_mask=torch.zeros(B, SKV - 2, dtype=torch.bool)),
     ValueError, IFA_N, ["atten_mask"]),
    ("ifa_mask_wrong_batch", lambda: ifa(Q1, K, V, **I_KW, atten_mask=torch.zeros(3, SKV, dtype=torch.bool)),
     ValueError, IFA_N, ["atten_mask"]),
    ("ifa_paged_mask_narrow", lambda: ifa(Q1, KP, VP, **I_KW, **PKW, atten_mask=torch.zeros(B, 6, dtype=torch.bool)),
     ValueError, IFA_N, ["atten_mask"]),
    ("fia_tnd_mask_too_small", lambda: fia(TQ, TK, TV, num_heads=NQ, num_key_value_heads=NKV, input_layout="TND",
                                           atten_mask=torch.zeros(4, 5, dtype=torch.bool), sparse_mode=1, **TKW),
     ValueError, FIA_N, ["atten_mask"]),
    # ---- pse ----
    ("fia_pse_wrong_heads", lambda: fia(Q, K, V, **F_KW, pse_shift=t(1, NQ + 1, SQ, SKV)), ValueError, FIA_N,
     ["pse_shift"]),
    ("fia_pse_too_narrow", lambda: fia(Q, K, V, **F_KW, pse_shift=t(1, NQ, SQ, SKV - 1)), ValueError, FIA_N,
     ["pse_shift"]),
    ("ifa_pse_wrong_batch", lambda: ifa(Q1, K, V, **I_KW, pse_shift=t(3, NQ, 1, SKV)), ValueError, IFA_N,
     ["pse_shift"]),
    ("pfa_pse_3d", lambda: pfa(Q, K, V, num_heads=NQ, num_key_value_heads=NKV, input_layout="BNSD",
                               pse_shift=t(NQ, SQ, SKV)), ValueError, PFA_N, ["pse_shift"]),
    ("fia_pse_int", lambda: fia(Q, K, V, **F_KW, pse_shift=torch.zeros(1, NQ, SQ, SKV, dtype=torch.int32)),
     (TypeError, ValueError), FIA_N, ["pse_shift"]),
    # ---- lse with NBSD ----
    *[(f"fia_lse_{lay}", (lambda lay=lay, q=q, k=k, v=v: fia(q, k, v, num_heads=NQ, num_key_value_heads=NKV,
                                                               input_layout=lay, softmax_lse_flag=True)), ValueError,
       FIA_N, ["softmax_lse_flag|softmax_lse"])
      for lay, q, k, v in (("BSH_NBSD", QH, KH, VH), ("BNSD_NBSD", Q, K, V),
                           ("BSND_NBSD", Q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2)))],
    ("fia2_lse_nbsd", lambda: fia2(Q, K, V, **dict(F2_KW, input_layout="BNSD_NBSD"), return_softmax_lse=True),
     ValueError, FIA2_N, ["return_softmax_lse|softmax_lse"]),
    # ---- IFA query S != 1, layouts ----
    ("ifa_query_s2", lambda: ifa(Q, K, V, **I_KW), ValueError, IFA_N, ["query"]),
    ("ifa_query_s2_bsh", lambda: ifa(QH, KH, VH, num_heads=NQ, num_key_value_heads=NKV, input_layout="BSH"),
     ValueError, IFA_N, ["query"]),
    ("ifa_layout_tnd", lambda: ifa(TQ, TK, TV, num_heads=NQ, num_key_value_heads=NKV, input_layout="TND"),
     ValueError, IFA_N, ["input_layout"]),
    ("ifa_layout_bnsd_bsnd", lambda: ifa(Q1, K, V, num_heads=NQ, num_key_value_heads=NKV, input_layout="BNSD_BSND"),
     ValueError, IFA_N, ["input_layout"]),
    ("pfa_layout_ntd", lambda: pfa(TQ.transpose(0, 1), TK.transpose(0, 1), TV.transpose(0, 1), num_heads=NQ,
                                   num_key_value_heads=NKV, input_layout="NTD", **TKW), ValueError, PFA_N,
     ["input_layout"]),
    ("pfa_layout_sbh", lambda: pfa(QH, KH, VH, num_heads=NQ, num_key_value_heads=NKV, input_layout="SBH"),
     ValueError, PFA_N, ["input_layout"]),
    ("fia_layout_bogus", lambda: fia(Q, K, V, **dict(F_KW, input_layout="BSNH")), ValueError, FIA_N,
     ["input_layout"]),
    ("fia_layout_not_str", lambda: fia(Q, K, V, **dict(F_KW, input_layout=3)), (TypeError, ValueError), FIA_N,
     ["input_layout"]),
    ("fia_rank_mismatch", lambda: fia(QH, K, V, **dict(F_KW, input_layout="BSH")), ValueError, FIA_N,
     ["key"]),
    ("ifa_inner_precise_2", lambda: ifa(Q1, K, V, **I_KW, inner_precise=2), ValueError, IFA_N, ["inner_precise"]),
    ("fia_decode_inner_precise_2", lambda: fia(Q1, K, V, **F_KW, inner_precise=2), ValueError, FIA_N,
     ["inner_precise"]),
    ("fia_inner_precise_4", lambda: fia(Q, K, V, **F_KW, inner_precise=4), ValueError, FIA_N, ["inner_precise"]),
    # ---- quantisation arguments that do not fit the call (the quantised paths: test_infer_quant.py) ----
    ("pfa_deq_scale1_float_query", lambda: pfa(Q, K, V, num_heads=NQ, num_key_value_heads=NKV, input_layout="BNSD",
                                               deq_scale1=torch.ones(1)), ValueError, PFA_N, ["deq_scale1", "int8"]),
    ("ifa_antiquant_scale_float_kv", lambda: ifa(Q1, K, V, **I_KW, antiquant_scale=torch.ones(2)), ValueError, IFA_N,
     ["antiquant", "int8"]),
    ("ifa_quant_offset2_alone", lambda: ifa(Q1, K, V, **I_KW, quant_offset2=torch.zeros(1)), ValueError, IFA_N,
     ["quant_offset2", "quant_scale2"]),
    ("fia_key_antiquant_scale_float_kv", lambda: fia(Q1, K, V, **F_KW, key_antiquant_scale=torch.ones(1, NKV, 1, D),
                                                     value_antiquant_scale=torch.ones(1, NKV, 1, D)), ValueError, FIA_N,
     ["antiquant", "int8"]),
    ("fia_dequant_scale1_float_query", lambda: fia(Q, K, V, **F_KW, dequant_scale1=torch.ones(1)), ValueError, FIA_N,
     ["dequant_scale1", "int8"]),
    ("fia_int8_kv", lambda: fia(Q1, K.to(torch.int8), V.to(torch.int8), **F_KW), (ValueError, TypeError), FIA_N,
     ["key"]),
    ("fia2_dequant_scale_query", lambda: fia2(Q, K, V, **F2_KW, dequant_scale_query=torch.ones(B, NQ, SQ)),
     ValueError, FIA2_N, ["dequant_scale_query", "supported"]),  # decision 7: "not supported for now"
    ("fia2_dequant_scale_key_float_kv", lambda: fia2(Q1, K, V, **F2_KW, dequant_scale_key=torch.ones(1),
                                                     dequant_scale_value=torch.ones(1)), ValueError, FIA2_N,
     ["int8"]),
    ("fia2_quant_offset_out_alone", lambda: fia2(Q, K, V, **F2_KW, quant_offset_out=torch.ones(1)), ValueError,
     FIA2_N, ["quant_offset_out", "quant_scale_out"]),
    # ---- dtypes ----
    ("pfa_dtype_qk", lambda: pfa(Q, K.half(), V, num_heads=NQ, num_key_value_heads=NKV, input_layout="BNSD"),
     TypeError, PFA_N, ["key"]),
    ("ifa_dtype_qv", lambda: ifa(Q1.bfloat16(), K.bfloat16(), V, **I_KW), TypeError, IFA_N, ["value"]),
    ("fia_dtype_f64", lambda: fia(Q.double(), K.double(), V.double(), **F_KW), TypeError, FIA_N, ["query"]),
    ("fia_dtype_int_query", lambda: fia(Q.int(), K.int(), V.int(), **F_KW), (TypeError, ValueError), FIA_N,
     ["query"]),
    ("fia2_dtype_rope", lambda: fia2(Q, K, V, **F2_KW, query_rope=t(B, NQ, SQ, 64).half(), key_rope=t(B, NKV, SKV, 64)),
     TypeError, FIA2_N, ["query_rope"]),
    ("fia_prefix_dtype", lambda: fia(Q, K, V, **F_KW, key_shared_prefix=t(1, NKV, 3, D).half(),
                                     value_shared_prefix=t(1, NKV, 3, D).half()), TypeError, FIA_N,
     ["key_shared_prefix"]),
    ("cache_dtype", lambda: cache(t(3, NKV, D), t(3, NKV, D), torch.zeros(4, BS, NKV, D, dtype=F16),
                                  torch.zeros(4, BS, NKV, D, dtype=F16), torch.tensor([0, 1, 2])), TypeError,
     CACHE_N, ["key_cache|key"]),
    ("cache_slot_float", lambda: cache(t(3, NKV, D), t(3, NKV, D), torch.zeros(4, BS, NKV, D),
                                       torch.zeros(4, BS, NKV, D), torch.tensor([0.0, 1.0, 2.0])),
     (TypeError, ValueError), CACHE_N, ["slot"]),
    # ---- key / value shapes ----
    ("pfa_kv_seq_mismatch", lambda: pfa(Q, K, V[:, :, :SKV - 1], num_heads=NQ, num_key_value_heads=NKV,
                                        input_layout="BNSD"), ValueError, PFA_N, ["value|key"]),
    ("ifa_kv_heads_mismatch", lambda: ifa(Q1, K, V[:, :1], **I_KW), ValueError, IFA_N, ["value|key"]),
    ("fia_kv_batch_mismatch", lambda: fia(Q, K, V[:1], **F_KW), ValueError, FIA_N, ["value|key"]),
    ("fia_qk_dim_mismatch", lambda: fia(Q, K[..., :8], V, **F_KW), ValueError, FIA_N, ["key|query"]),
    ("fia_query_batch_mismatch", lambda: fia(Q[:1], K, V, **F_KW), ValueError, FIA_N, ["query|key"]),
    ("fia_bsh_value_H", lambda: fia(QH, KH, VH[..., :-3], num_heads=NQ, num_key_value_heads=NKV, input_layout="BSH"),
     ValueError, FIA_N, ["value"]),
    ("fia_tnd_kv_T_mismatch", lambda: fia(TQ, TK, TV[:9], num_heads=NQ, num_key_value_heads=NKV, input_layout="TND",
                                          **TKW), ValueError, FIA_N, ["value|key"]),
    # ---- TND lengths ----
    ("pfa_tnd_no_lengths", lambda: pfa(TQ, TK, TV, num_heads=NQ, num_key_value_heads=NKV, input_layout="TND"),
     ValueError, PFA_N, ["actual_seq_lengths"]),
    ("fia_tnd_no_kv_lengths", lambda: fia(TQ, TK, TV, num_heads=NQ, num_key_value_heads=NKV, input_layout="TND",
                                          actual_seq_lengths=[3, 8]), ValueError, FIA_N, ["actual_seq_lengths_kv"]),
    ("fia2_tnd_no_lengths", lambda: fia2(TQ, TK, TV, num_query_heads=NQ, num_key_value_heads=NKV, input_layout="TND"),
     ValueError, FIA2_N, ["actual_seq_qlen"]),
    ("fia_tnd_unequal_lists", lambda: fia(TQ, TK, TV, num_heads=NQ, num_key_value_heads=NKV, input_layout="TND",
                                          actual_seq_lengths=[3, 8], actual_seq_lengths_kv=[4, 6, 10]), ValueError,
     FIA_N, ["actual_seq_lengths"]),
    ("pfa_tnd_decreasing", lambda: pfa(TQ, TK, TV, num_heads=NQ, num_key_value_heads=NKV, input_layout="TND",
                                       actual_seq_lengths=[5, 3], actual_seq_lengths_kv=[4, 10]), ValueError, PFA_N,
     ["actual_seq_lengths"]),
    ("fia_tnd_decreasing_kv", lambda: fia(TQ, TK, TV, num_heads=NQ, num_key_value_heads=NKV, input_layout="TND",
                                          actual_seq_lengths=[3, 8], actual_seq_lengths_kv=[6, 4]), ValueError,
     FIA_N, ["actual_seq_lengths_kv"]),
    ("fia2_ntd_decreasing", lambda: fia2(TQ.transpose(0, 1), TK.transpose(0, 1), TV.transpose(0, 1),
                                         num_query_heads=NQ, num_key_value_heads=NKV, input_layout="NTD",
                                         actual_seq_qlen=[3, 2], actual_seq_kvlen=[4, 10]), ValueError, FIA2_N,
     ["actual_seq_qlen"]),
    ("fia_tnd_beyond_T", lambda: fia(TQ, TK, TV, num_heads=NQ, num_key_value_heads=NKV, input_layout="TND",
                                     actual_seq_lengths=[3, 9], actual_seq_lengths_kv=[4, 10]), ValueError, FIA_N,
     ["actual_seq_lengths"]),
    ("fia_tnd_negative", lambda: fia(TQ, TK, TV, num_heads=NQ, num_key_value_heads=NKV, input_layout="TND",
                                     actual_seq_lengths=[-1, 8], actual_seq_lengths_kv=[4, 10]), ValueError, FIA_N,
     ["actual_seq_lengths"]),
    # ---- left padding / shared prefix ----
    ("fia_leftpad_with_block_table", lambda: fia(Q1, KP, VP, **F_KW, **PKWF, kv_padding_size=torch.tensor([1])),
     ValueError, FIA_N, ["kv_padding_size", "block_table"]),
    ("ifa_leftpad_with_block_table", lambda: ifa(Q1, KP, VP, **I_KW, **PKW, kv_padding_size=torch.tensor([1])),
     ValueError, IFA_N, ["kv_padding_size", "block_table"]),
    ("fia_qpad_with_block_table", lambda: fia(Q, KP, VP, **F_KW, **PKWF, actual_seq_lengths=[2, 3],
                                              query_padding_size=torch.tensor([1])), ValueError, FIA_N,
     ["query_padding_size", "block_table"]),
    ("fia_prefix_with_block_table", lambda: fia(Q1, KP4, VP4, **F_KW, **PKWF, key_shared_prefix=t(1, NKV, 3, D),
                                                value_shared_prefix=t(1, NKV, 3, D)), ValueError, FIA_N,
     ["shared_prefix", "block_table"]),
    ("fia_qpad_window_outside", lambda: fia(Q, K, V, **F_KW, actual_seq_lengths=[SQ, 2],
                                            query_padding_size=torch.tensor([2])), ValueError, FIA_N,
     ["query_padding_size|actual_seq_lengths"]),
    ("fia_prefill_kvpad_window_outside", lambda: fia(Q, K, V, **F_KW, actual_seq_lengths_kv=[SKV, 2],
                                                     kv_padding_size=torch.tensor([3])), ValueError, FIA_N,
     ["kv_padding_size|actual_seq_lengths_kv"]),
    ("fia_prefix_batch_2", lambda: fia(Q, K, V, **F_KW, key_shared_prefix=t(2, NKV, 3, D),
                                       value_shared_prefix=t(2, NKV, 3, D)), ValueError, FIA_N,
     ["key_shared_prefix"]),
    ("fia_prefix_only_key", lambda: fia(Q, K, V, **F_KW, key_shared_prefix=t(1, NKV, 3, D)), ValueError, FIA_N,
     ["value_shared_prefix|key_shared_prefix"]),
    ("fia_prefix_len_too_big", lambda: fia(Q, K, V, **F_KW, key_shared_prefix=t(1, NKV, 3, D),
                                           value_shared_prefix=t(1, NKV, 3, D), actual_shared_prefix_len=[4]),
     ValueError, FIA_N, ["actual_shared_prefix_len"]),
    ("fia_prefix_heads", lambda: fia(Q, K, V, **F_KW, key_shared_prefix=t(1, NKV + 1, 3, D),
                                     value_shared_prefix=t(1, NKV + 1, 3, D)), ValueError, FIA_N,
     ["shared_prefix"]),
    # ---- rope, sink ----
    ("fia_rope_only_query", lambda: fia(Q, K, V, **F_KW, query_rope=t(B, NQ, SQ, 64)), ValueError, FIA_N,
     ["key_rope|query_rope"]),
    ("fia_rope_shape", lambda: fia(Q, K, V, **F_KW, query_rope=t(B, NQ, SQ - 1, 64), key_rope=t(B, NKV, SKV, 64)),
     ValueError, FIA_N, ["query_rope"]),
    ("fia_rope_dims_differ", lambda: fia(Q, K, V, **F_KW, query_rope=t(B, NQ, SQ, 64), key_rope=t(B, NKV, SKV, 32)),
     ValueError, FIA_N, ["rope"]),
    ("fia2_sink_shape", lambda: fia2(Q, K, V, **F2_KW, learnable_sink=t(NQ + 1)), ValueError, FIA2_N,
     ["learnable_sink"]),
    ("fia2_sink_2d", lambda: fia2(Q, K, V, **F2_KW, learnable_sink=t(1, NQ)), ValueError, FIA2_N,
     ["learnable_sink"]),
    # ---- _npu_reshape_and_cache ----
    ("cache_slot_eq_capacity", lambda: cache(t(3, NKV, D), t(3, NKV, D), torch.zeros(4, BS, NKV, D),
                                             torch.zeros(4, BS, NKV, D), torch.tensor([0, 16, 2])), ValueError,
     CACHE_N, ["slot"]),
    ("cache_slot_huge", lambda: cache(t(3, NKV, D), t(3, NKV, D), torch.zeros(4, BS, NKV, D),
                                      torch.zeros(4, BS, NKV, D), torch.tensor([0, 1, 1 << 40])), ValueError,
     CACHE_N, ["slot"]),
    ("cache_slot_count", lambda: cache(t(3, NKV, D), t(3, NKV, D), torch.zeros(4, BS, NKV, D),
                                       torch.zeros(4, BS, NKV, D), torch.tensor([0, 1])), ValueError, CACHE_N,
     ["slot"]),
    ("cache_head_mismatch", lambda: cache(t(3, NKV + 1, D), t(3, NKV + 1, D), torch.zeros(4, BS, NKV, D),
                                          torch.zeros(4, BS, NKV, D), torch.tensor([0, 1, 2])), ValueError, CACHE_N,
     ["key"]),
    ("cache_value_dim_mismatch", lambda: cache(t(3, NKV, D), t(3, NKV, D), torch.zeros(4, BS, NKV, D),
                                               torch.zeros(4, BS, NKV, D - 1), torch.tensor([0, 1, 2])), ValueError,
     CACHE_N, ["value"]),
    ("cache_blocks_differ", lambda: cache(t(3, NKV, D), t(3, NKV, D), torch.zeros(4, BS, NKV, D),
                                          torch.zeros(3, BS, NKV, D), torch.tensor([0, 1, 2])), ValueError, CACHE_N,
     ["value_cache|key_cache"]),
]

_IDS = [c[0] for c in CASES]
assert len(set(_IDS)) == len(_IDS), "duplicate case ids"

BUGS = {}  # case id -> reason, for suspected implementation bugs (strict xfail)


def _params():
    out = []
    for c in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=BUGS[c[0]])] if c[0] in BUGS else []
        out.append(pytest.param(*c, id=c[0], marks=marks))
    return out


def _check_message(msg, opname, needles):
    low = msg.lower()
    # the op named as a word (so that npu_fused_infer_attention_score does not match inside ..._v2)
    assert re.search(re.escape(opname) + r"(?![A-Za-z0-9_])", msg), f"message does not name {opname}: {msg!r}"
    missing = [n for n in needles if not any(alt.lower() in low for alt in n.split("|"))]
    assert not missing, f"message {msg!r} lacks {missing}"


@pytest.mark.parametrize("name,thunk,exc,opname,needles", _params())
def test_bad_input(name, thunk, exc, opname, needles):
    with pytest.raises(exc) as info:
        thunk()
    assert not isinstance(info.value, (RuntimeError, NotImplementedError)), type(info.value)
    _check_message(str(info.value), opname, needles)


def test_error_types_are_builtin():
    """ValueError / TypeError themselves (not RuntimeError wrappers), so callers can catch them."""
    with pytest.raises(ValueError) as a:
        ifa(Q, K, V, **I_KW)
    assert type(a.value) is ValueError or issubclass(type(a.value), ValueError)
    assert not isinstance(a.value, RuntimeError)
    with pytest.raises(TypeError) as b:
        fia(Q, K.half(), V, **F_KW)
    assert not isinstance(b.value, RuntimeError)


def test_bad_reads_do_not_touch_memory_in_a_subprocess():
    """Every bad case in a fresh interpreter: each must raise (not crash) - a segfault or abort there would
    otherwise take the whole test session down. The child prints the id before each call."""
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import test_infer_errors as m\n"
        "for name, thunk, exc, opname, needles in m.CASES:\n"
        "    print(name, flush=True)\n"
        "    try:\n"
        "        thunk()\n"
        "    except (ValueError, TypeError):\n"
        "        pass\n"
        "    except Exception as e:\n"
        "        print('OTHER', name, type(e).__name__, flush=True)\n"
        "print('DONE', flush=True)\n" % os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0 and lines and lines[-1] == "DONE", (
        f"child died (rc {res.returncode}) after {lines[-1:]}: {res.stderr[-2000:]}")


# ------------------------------------------------------------------------------------------------
# odd-looking but legal inputs must NOT raise
# ------------------------------------------------------------------------------------------------
LEGAL = [
    ("no_mask_both_negative_ignored", lambda: fia(Q, K, V, **F_KW, pre_tokens=-1, next_tokens=-1)),
    ("pfa_no_mask_both_negative_ignored", lambda: pfa(Q, K, V, num_heads=NQ, num_key_value_heads=NKV,
                                                      input_layout="BNSD", pre_tokens=-3, next_tokens=-1)),
    ("decode_ignores_sparse_args", lambda: fia(Q1, K, V, **F_KW, atten_mask=torch.zeros(B, SKV, dtype=torch.bool),
                                               pre_tokens=-1, next_tokens=-1)),
    ("unused_table_entries_negative", lambda: ifa(Q1, KP, VP, **I_KW, **dict(PKW, block_table=torch.tensor(
        [[0, 1, 2, -1], [3, 0, -1, -1]], dtype=torch.int32)))),
    ("unused_table_entries_huge", lambda: fia(Q1, KP, VP, **F_KW, **dict(PKWF, block_table=torch.tensor(
        [[0, 1, 2, 1 << 30], [3, 0, 1 << 30, 7]], dtype=torch.int32)))),
    ("zero_lengths_paged", lambda: ifa(Q1, KP, VP, **I_KW, **dict(PKW, actual_seq_lengths=[0, 0]))),
    ("lengths_tensor", lambda: fia(Q, K, V, **F_KW, actual_seq_lengths_kv=torch.tensor([3, 10], dtype=torch.int32))),
    ("longer_length_list", lambda: fia(Q, K, V, **F_KW, actual_seq_lengths_kv=[3, 10, 4])),
    ("kv_padding_negative", lambda: ifa(Q1, K, V, **I_KW, actual_seq_lengths=[3, 4],
                                        kv_padding_size=torch.tensor([-4]))),
    ("decode_kvpad_window_outside_is_zero", lambda: ifa(Q1, K, V, **I_KW, actual_seq_lengths=[SKV, 2],
                                                        kv_padding_size=torch.tensor([3]))),
    ("padding_without_lengths_inactive", lambda: fia(Q, K, V, **F_KW, kv_padding_size=torch.tensor([3]))),
    ("slot_negative_skipped", lambda: cache(t(3, NKV, D), t(3, NKV, D), torch.zeros(4, BS, NKV, D),
                                            torch.zeros(4, BS, NKV, D), torch.tensor([-1, 15, -100]))),
    ("huge_block_size", lambda: ifa(Q1, t(1, 4096, NKV * D), t(1, 4096, NKV * D), **I_KW,
                                    block_table=torch.zeros(B, 1, dtype=torch.int32), block_size=4096,
                                    actual_seq_lengths=[4096, 1])),
    ("mask_uint8_int8", lambda: fia(Q, K, V, **F_KW, atten_mask=torch.zeros(SQ, SKV, dtype=torch.int8))),
    ("pfa_alias_12", lambda: pfa(Q, K, V, num_heads=NQ, num_key_value_heads=NKV, input_layout="BNSD",
                                 atten_mask=TRIU2048, sparse_mode=12)),
    ("mode3_sq_gt_skv", lambda: fia(t(B, NQ, 12, D), K, V, **F_KW, atten_mask=TRIU2048, sparse_mode=3)),
]


@pytest.mark.parametrize("name,thunk", LEGAL, ids=[c[0] for c in LEGAL])
def test_legal_input_accepted(name, thunk):
    res = thunk()
    out = res[0] if isinstance(res, tuple) else res
    if out is not None:
        assert torch.isfinite(out).all()
