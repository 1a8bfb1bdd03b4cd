"""torch_npu's inference attention as torch custom ops: npu_prompt_flash_attention,
npu_incre_flash_attention, npu_fused_infer_attention_score (v1, v2) and the paged-cache write
_npu_reshape_and_cache.

All four attention ops reach one C++ entry (``_C.infer_attention``) with the arguments under their
FIA v1 names, as torch_npu's plugin does (spec §8.2); the op kind selects each op's own rules.
Conventions: docs/inference.md.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _C
from ._fusion_attention import _int_list
from ._runtime import arr, call, sync_threads

_INT_MAX = 2147483647
_PROMPT, _INCRE, _FUSED, _FUSED_V2 = 0, 1, 2, 3

# input_layout -> (query/key axis order, output axis order)
_LAYOUTS = {
    "BSH": ("BSH", "BSH"), "BSND": ("BSND", "BSND"), "BNSD": ("BNSD", "BNSD"), "BNSD_BSND": ("BNSD", "BSND"),
    "BSH_BNSD": ("BSH", "BNSD"), "BSND_BNSD": ("BSND", "BNSD"), "BSH_NBSD": ("BSH", "NBSD"),
    "BSND_NBSD": ("BSND", "NBSD"), "BNSD_NBSD": ("BNSD", "NBSD"), "TND": ("TND", "TND"),
    "TND_NTD": ("TND", "NTD"), "NTD_TND": ("NTD", "TND"), "NTD": ("NTD", "NTD"),
}


def infer_output_shapes(query: Tensor, value: Tensor, num_heads: int, num_key_value_heads: int,
                        input_layout: str, paged: bool, lse: bool) -> Tuple[List[int], List[int]]:
    """Shapes of (attention_out, softmax_lse): the rule shared by the real op and its fake."""
    ax_in, ax_out = _LAYOUTS.get(str(input_layout).upper(), ("BSH", "BSH"))
    nq = max(int(num_heads), 1)
    nkv = int(num_key_value_heads) or nq
    qs = list(query.shape)
    B, S = 1, 0
    if ax_in == "BSH" and len(qs) == 3:
        B, S = qs[0], qs[1]
    elif ax_in == "BSND" and len(qs) == 4:
        B, S = qs[0], qs[1]
    elif ax_in == "BNSD" and len(qs) == 4:
        B, S = qs[0], qs[2]
    elif ax_in == "TND" and len(qs) == 3:
        S = qs[0]
    elif ax_in == "NTD" and len(qs) == 3:
        S = qs[1]
    vs = list(value.shape)
    if paged or ax_in in ("BSH",):
        dv = vs[-1] // nkv if len(vs) == 3 else vs[-1]
    else:
        dv = vs[-1]
    out = {"BSH": [B, S, nq * dv], "BSND": [B, S, nq, dv], "BNSD": [B, nq, S, dv], "NBSD": [nq, B, S, dv],
           "TND": [S, nq, dv], "NTD": [nq, S, dv]}[ax_out]
    if not lse:
        return out, [0]
    return out, ([S, nq, 1] if ax_in in ("TND", "NTD") else [B, nq, S, 1])


def _str(op: str, name: str, x) -> str:
    if not isinstance(x, str):
        raise TypeError(f"{op}: {name} must be a str, got {type(x).__name__} {x!r}")
    return x


def _run(kind: int, op: str, args: dict, lse_flag: bool) -> Tuple[Tensor, Tensor]:
    query = args["query"]
    for k, v in args.items():  # args is the op's own dict: detach in place (DLPack refuses autograd history)
        if isinstance(v, Tensor) and v.requires_grad:
            args[k] = v.detach()
    args["op"] = op
    args["softmax_lse_flag"] = lse_flag
    # The outputs are allocated by the fake's shape rule and the core checks them while it validates
    # every rule, in the one call that also runs the kernel.
    out_shape, lse_shape = infer_output_shapes(query, args["value"], args["num_heads"], args["num_key_value_heads"],
                                               args["input_layout"], args.get("block_table") is not None, lse_flag)
    out = query.new_empty(out_shape, dtype=infer_output_dtype(query, args.get("quant_scale2")))
    lse = query.new_empty(lse_shape, dtype=torch.float32)
    if query.numel() == 0 or out.numel() == 0:
        _C.infer_attention(kind, args)  # validation only
        return out.zero_(), lse.fill_(-3.4028234663852886e38)
    sync_threads()
    _C.infer_attention(kind, args, out, lse)
    return out, lse


def infer_output_dtype(query: Tensor, quant_scale2: Optional[Tensor]) -> torch.dtype:
    """attention_out's dtype (spec §7.4): int8 when quantised, fp16 for an int8 query, else the query's."""
    if quant_scale2 is not None:
        return torch.int8
    return torch.float16 if query.dtype == torch.int8 else query.dtype


def _fake(query, value, num_heads, num_key_value_heads, input_layout, block_table, lse_flag, quant_scale2=None):
    out_shape, lse_shape = infer_output_shapes(query, value, num_heads, num_key_value_heads, input_layout,
                                               block_table is not None, lse_flag)
    return (query.new_empty(out_shape, dtype=infer_output_dtype(query, quant_scale2)),
            query.new_empty(lse_shape, dtype=torch.float32))


# ---- npu_prompt_flash_attention ---------------------------------------------------------------------------

def _pfa(query: Tensor, key: Tensor, value: Tensor, padding_mask: Optional[Tensor], atten_mask: Optional[Tensor],
         pse_shift: Optional[Tensor], actual_seq_lengths: Optional[List[int]], deq_scale1: Optional[Tensor],
         quant_scale1: Optional[Tensor], deq_scale2: Optional[Tensor], quant_scale2: Optional[Tensor],
         quant_offset2: Optional[Tensor], num_heads: int, scale_value: float, pre_tokens: int, next_tokens: int,
         input_layout: str, num_key_value_heads: int, actual_seq_lengths_kv: Optional[List[int]],
         sparse_mode: int) -> Tensor:
    args = dict(query=query, key=key, value=value, atten_mask=atten_mask, pse_shift=pse_shift,
                actual_seq_lengths=actual_seq_lengths, actual_seq_lengths_kv=actual_seq_lengths_kv,
                dequant_scale1=deq_scale1, quant_scale1=quant_scale1, dequant_scale2=deq_scale2,
                quant_scale2=quant_scale2, quant_offset2=quant_offset2, num_heads=num_heads, scale=scale_value,
                pre_tokens=pre_tokens, next_tokens=next_tokens, input_layout=input_layout,
                num_key_value_heads=num_key_value_heads, sparse_mode=sparse_mode)
    return _run(_PROMPT, "npu_prompt_flash_attention", args, False)[0]


_pfa_op = torch.library.custom_op("npufa::npu_prompt_flash_attention", mutates_args=(), device_types="cpu")(_pfa)


@_pfa_op.register_fake
def _(query, key, value, padding_mask, atten_mask, pse_shift, actual_seq_lengths, deq_scale1, quant_scale1, deq_scale2,
      quant_scale2, quant_offset2, num_heads, scale_value, pre_tokens, next_tokens, input_layout, num_key_value_heads,
      actual_seq_lengths_kv, sparse_mode):
    return _fake(query, value, num_heads, num_key_value_heads, input_layout, None, False, quant_scale2)[0]


def npu_prompt_flash_attention(query: Tensor, key: Tensor, value: Tensor, *, padding_mask: Optional[Tensor] = None,
                               atten_mask: Optional[Tensor] = None, pse_shift: Optional[Tensor] = None,
                               actual_seq_lengths=None, deq_scale1: Optional[Tensor] = None,
                               quant_scale1: Optional[Tensor] = None, deq_scale2: Optional[Tensor] = None,
                               quant_scale2: Optional[Tensor] = None, quant_offset2: Optional[Tensor] = None,
                               num_heads: int = 1, scale_value: float = 1.0, pre_tokens: int = _INT_MAX,
                               next_tokens: int = 0, input_layout: str = "BSH", num_key_value_heads: int = 0,
                               actual_seq_lengths_kv=None, sparse_mode: int = 0) -> Tensor:
    """torch_npu.npu_prompt_flash_attention (spec §5): prefill attention. Note next_tokens defaults to 0."""
    op = "npu_prompt_flash_attention"
    return call(_pfa_op, _pfa, query, key, value, padding_mask, atten_mask, pse_shift,
                   _int_list(actual_seq_lengths, f"{op}: actual_seq_lengths"), deq_scale1, quant_scale1, deq_scale2,
                   quant_scale2, quant_offset2, int(num_heads), float(scale_value), int(pre_tokens), int(next_tokens),
                   _str(op, "input_layout", input_layout), int(num_key_value_heads),
                   _int_list(actual_seq_lengths_kv, f"{op}: actual_seq_lengths_kv"), int(sparse_mode))


# ---- npu_incre_flash_attention ----------------------------------------------------------------------------

def _ifa(query: Tensor, key: Tensor, value: Tensor, padding_mask: Optional[Tensor], atten_mask: Optional[Tensor],
         pse_shift: Optional[Tensor], actual_seq_lengths: Optional[List[int]], antiquant_scale: Optional[Tensor],
         antiquant_offset: Optional[Tensor], block_table: Optional[Tensor], dequant_scale1: Optional[Tensor],
         quant_scale1: Optional[Tensor], dequant_scale2: Optional[Tensor], quant_scale2: Optional[Tensor],
         quant_offset2: Optional[Tensor], kv_padding_size: Optional[Tensor], num_heads: int, scale_value: float,
         input_layout: str, num_key_value_heads: int, block_size: int, inner_precise: int) -> Tensor:
    args = dict(query=query, key=key, value=value, atten_mask=atten_mask, pse_shift=pse_shift,
                actual_seq_lengths_kv=actual_seq_lengths, antiquant_scale=antiquant_scale,
                antiquant_offset=antiquant_offset, block_table=block_table, dequant_scale1=dequant_scale1,
                quant_scale1=quant_scale1, dequant_scale2=dequant_scale2, quant_scale2=quant_scale2,
                quant_offset2=quant_offset2, kv_padding_size=kv_padding_size, num_heads=num_heads,
                scale=scale_value, input_layout=input_layout, num_key_value_heads=num_key_value_heads,
                block_size=block_size, inner_precise=inner_precise)
    return _run(_INCRE, "npu_incre_flash_attention", args, False)[0]


_ifa_op = torch.library.custom_op("npufa::npu_incre_flash_attention", mutates_args=(), device_types="cpu")(_ifa)


@_ifa_op.register_fake
def _(query, key, value, padding_mask, atten_mask, pse_shift, actual_seq_lengths, antiquant_scale, antiquant_offset,
      block_table, dequant_scale1, quant_scale1, dequant_scale2, quant_scale2, quant_offset2, kv_padding_size,
      num_heads, scale_value, input_layout, num_key_value_heads, block_size, inner_precise):
    return _fake(query, value, num_heads, num_key_value_heads, input_layout, block_table, False, quant_scale2)[0]


def npu_incre_flash_attention(query: Tensor, key: Tensor, value: Tensor, *, padding_mask: Optional[Tensor] = None,
                              atten_mask: Optional[Tensor] = None, pse_shift: Optional[Tensor] = None,
                              actual_seq_lengths=None, antiquant_scale: Optional[Tensor] = None,
                              antiquant_offset: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                              dequant_scale1: Optional[Tensor] = None, quant_scale1: Optional[Tensor] = None,
                              dequant_scale2: Optional[Tensor] = None, quant_scale2: Optional[Tensor] = None,
                              quant_offset2: Optional[Tensor] = None, kv_padding_size: Optional[Tensor] = None,
                              num_heads: int = 1, scale_value: float = 1.0, input_layout: str = "BSH",
                              num_key_value_heads: int = 0, block_size: int = 0, inner_precise: int = 1) -> Tensor:
    """torch_npu.npu_incre_flash_attention (spec §6): decode attention (query S = 1), paged KV, left padding."""
    op = "npu_incre_flash_attention"
    return call(_ifa_op, _ifa, query, key, value, padding_mask, atten_mask, pse_shift,
                   _int_list(actual_seq_lengths, f"{op}: actual_seq_lengths"), antiquant_scale, antiquant_offset,
                   block_table, dequant_scale1, quant_scale1, dequant_scale2, quant_scale2, quant_offset2,
                   kv_padding_size, int(num_heads), float(scale_value), _str(op, "input_layout", input_layout),
                   int(num_key_value_heads), int(block_size), int(inner_precise))


# ---- npu_fused_infer_attention_score (v1) -----------------------------------------------------------------

def _fia(query: Tensor, key: Tensor, value: Tensor, pse_shift: Optional[Tensor], atten_mask: Optional[Tensor],
         actual_seq_lengths: Optional[List[int]], actual_seq_lengths_kv: Optional[List[int]],
         dequant_scale1: Optional[Tensor], quant_scale1: Optional[Tensor], dequant_scale2: Optional[Tensor],
         quant_scale2: Optional[Tensor], quant_offset2: Optional[Tensor], antiquant_scale: Optional[Tensor],
         antiquant_offset: Optional[Tensor], key_antiquant_scale: Optional[Tensor],
         key_antiquant_offset: Optional[Tensor], value_antiquant_scale: Optional[Tensor],
         value_antiquant_offset: Optional[Tensor], block_table: Optional[Tensor],
         query_padding_size: Optional[Tensor], kv_padding_size: Optional[Tensor],
         key_shared_prefix: Optional[Tensor], value_shared_prefix: Optional[Tensor],
         actual_shared_prefix_len: Optional[List[int]], query_rope: Optional[Tensor], key_rope: Optional[Tensor],
         key_rope_antiquant_scale: Optional[Tensor], num_heads: int, scale: float, pre_tokens: int,
         next_tokens: int, input_layout: str, num_key_value_heads: int, sparse_mode: int, inner_precise: int,
         block_size: int, antiquant_mode: int, key_antiquant_mode: int, value_antiquant_mode: int,
         softmax_lse_flag: bool) -> Tuple[Tensor, Tensor]:
    args = dict(query=query, key=key, value=value, pse_shift=pse_shift, atten_mask=atten_mask,
                actual_seq_lengths=actual_seq_lengths, actual_seq_lengths_kv=actual_seq_lengths_kv,
                dequant_scale1=dequant_scale1, quant_scale1=quant_scale1, dequant_scale2=dequant_scale2,
                quant_scale2=quant_scale2, quant_offset2=quant_offset2, antiquant_scale=antiquant_scale,
                antiquant_offset=antiquant_offset, key_antiquant_scale=key_antiquant_scale,
                key_antiquant_offset=key_antiquant_offset, value_antiquant_scale=value_antiquant_scale,
                value_antiquant_offset=value_antiquant_offset, block_table=block_table,
                query_padding_size=query_padding_size, kv_padding_size=kv_padding_size,
                key_shared_prefix=key_shared_prefix, value_shared_prefix=value_shared_prefix,
                actual_shared_prefix_len=actual_shared_prefix_len, query_rope=query_rope, key_rope=key_rope,
                key_rope_antiquant_scale=key_rope_antiquant_scale, num_heads=num_heads, scale=scale,
                pre_tokens=pre_tokens, next_tokens=next_tokens, input_layout=input_layout,
                num_key_value_heads=num_key_value_heads, sparse_mode=sparse_mode, inner_precise=inner_precise,
                block_size=block_size, antiquant_mode=antiquant_mode, key_antiquant_mode=key_antiquant_mode,
                value_antiquant_mode=value_antiquant_mode)
    return _run(_FUSED, "npu_fused_infer_attention_score", args, softmax_lse_flag)


_fia_op = torch.library.custom_op("npufa::npu_fused_infer_attention_score", mutates_args=(), device_types="cpu")(_fia)


@_fia_op.register_fake
def _(query, key, value, pse_shift, atten_mask, actual_seq_lengths, actual_seq_lengths_kv, dequant_scale1,
      quant_scale1, dequant_scale2, quant_scale2, quant_offset2, antiquant_scale, antiquant_offset,
      key_antiquant_scale, key_antiquant_offset, value_antiquant_scale, value_antiquant_offset, block_table,
      query_padding_size, kv_padding_size, key_shared_prefix, value_shared_prefix, actual_shared_prefix_len,
      query_rope, key_rope, key_rope_antiquant_scale, num_heads, scale, pre_tokens, next_tokens, input_layout,
      num_key_value_heads, sparse_mode, inner_precise, block_size, antiquant_mode, key_antiquant_mode,
      value_antiquant_mode, softmax_lse_flag):
    return _fake(query, value, num_heads, num_key_value_heads, input_layout, block_table, softmax_lse_flag,
                 quant_scale2)


def npu_fused_infer_attention_score(
        query: Tensor, key: Tensor, value: Tensor, *, pse_shift: Optional[Tensor] = None,
        atten_mask: Optional[Tensor] = None, actual_seq_lengths=None, actual_seq_lengths_kv=None,
        dequant_scale1: Optional[Tensor] = None, quant_scale1: Optional[Tensor] = None,
        dequant_scale2: Optional[Tensor] = None, quant_scale2: Optional[Tensor] = None,
        quant_offset2: Optional[Tensor] = None, antiquant_scale: Optional[Tensor] = None,
        antiquant_offset: Optional[Tensor] = None, key_antiquant_scale: Optional[Tensor] = None,
        key_antiquant_offset: Optional[Tensor] = None, value_antiquant_scale: Optional[Tensor] = None,
        value_antiquant_offset: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
        query_padding_size: Optional[Tensor] = None, kv_padding_size: Optional[Tensor] = None,
        key_shared_prefix: Optional[Tensor] = None, value_shared_prefix: Optional[Tensor] = None,
        actual_shared_prefix_len=None, query_rope: Optional[Tensor] = None, key_rope: Optional[Tensor] = None,
        key_rope_antiquant_scale: Optional[Tensor] = None, num_heads: int = 1, scale: float = 1.0,
        pre_tokens: int = _INT_MAX, next_tokens: int = _INT_MAX, input_layout: str = "BSH",
        num_key_value_heads: int = 0, sparse_mode: int = 0, inner_precise: int = 0, block_size: int = 0,
        antiquant_mode: int = 0, key_antiquant_mode: int = 0, value_antiquant_mode: int = 0,
        softmax_lse_flag: bool = False) -> Tuple[Tensor, Tensor]:
    """torch_npu.npu_fused_infer_attention_score (spec §7): prefill (query S > 1) or decode (S = 1);
    returns (attention_out, softmax_lse)."""
    op = "npu_fused_infer_attention_score"
    return call(_fia_op, _fia, query, key, value, pse_shift, atten_mask, _int_list(actual_seq_lengths, f"{op}: actual_seq_lengths"),
                   _int_list(actual_seq_lengths_kv, f"{op}: actual_seq_lengths_kv"), dequant_scale1, quant_scale1, dequant_scale2, quant_scale2,
                   quant_offset2, antiquant_scale, antiquant_offset, key_antiquant_scale, key_antiquant_offset,
                   value_antiquant_scale, value_antiquant_offset, block_table, query_padding_size, kv_padding_size,
                   key_shared_prefix, value_shared_prefix,
                   _int_list(actual_shared_prefix_len, f"{op}: actual_shared_prefix_len"), query_rope,
                   key_rope, key_rope_antiquant_scale, int(num_heads), float(scale), int(pre_tokens),
                   int(next_tokens), _str(op, "input_layout", input_layout), int(num_key_value_heads), int(sparse_mode), int(inner_precise),
                   int(block_size), int(antiquant_mode), int(key_antiquant_mode), int(value_antiquant_mode),
                   bool(softmax_lse_flag))


# ---- npu_fused_infer_attention_score_v2 -------------------------------------------------------------------

def _fia2(query: Tensor, key: Tensor, value: Tensor, query_rope: Optional[Tensor], key_rope: Optional[Tensor],
          pse_shift: Optional[Tensor], atten_mask: Optional[Tensor], actual_seq_qlen: Optional[List[int]],
          actual_seq_kvlen: Optional[List[int]], block_table: Optional[Tensor],
          dequant_scale_query: Optional[Tensor], dequant_scale_key: Optional[Tensor],
          dequant_offset_key: Optional[Tensor], dequant_scale_value: Optional[Tensor],
          dequant_offset_value: Optional[Tensor], dequant_scale_key_rope: Optional[Tensor],
          quant_scale_out: Optional[Tensor], quant_offset_out: Optional[Tensor],
          learnable_sink: Optional[Tensor], num_query_heads: int, num_key_value_heads: int, softmax_scale: float,
          pre_tokens: int, next_tokens: int, input_layout: str, sparse_mode: int, block_size: int,
          key_quant_mode: int, value_quant_mode: int, inner_precise: int,
          return_softmax_lse: bool) -> Tuple[Tensor, Tensor]:
    args = dict(query=query, key=key, value=value, query_rope=query_rope, key_rope=key_rope, pse_shift=pse_shift,
                atten_mask=atten_mask, actual_seq_lengths=actual_seq_qlen, actual_seq_lengths_kv=actual_seq_kvlen,
                block_table=block_table, dequant_scale_query=dequant_scale_query,
                key_antiquant_scale=dequant_scale_key, key_antiquant_offset=dequant_offset_key,
                value_antiquant_scale=dequant_scale_value, value_antiquant_offset=dequant_offset_value,
                key_rope_antiquant_scale=dequant_scale_key_rope, quant_scale2=quant_scale_out,
                quant_offset2=quant_offset_out, learnable_sink=learnable_sink, num_heads=num_query_heads,
                num_key_value_heads=num_key_value_heads, scale=softmax_scale, pre_tokens=pre_tokens,
                next_tokens=next_tokens, input_layout=input_layout, sparse_mode=sparse_mode, block_size=block_size,
                key_antiquant_mode=key_quant_mode, value_antiquant_mode=value_quant_mode,
                inner_precise=inner_precise)
    return _run(_FUSED_V2, "npu_fused_infer_attention_score_v2", args, return_softmax_lse)


_fia2_op = torch.library.custom_op("npufa::npu_fused_infer_attention_score_v2", mutates_args=(), device_types="cpu")(_fia2)


@_fia2_op.register_fake
def _(query, key, value, query_rope, key_rope, pse_shift, atten_mask, actual_seq_qlen, actual_seq_kvlen,
      block_table, dequant_scale_query, dequant_scale_key, dequant_offset_key, dequant_scale_value,
      dequant_offset_value, dequant_scale_key_rope, quant_scale_out, quant_offset_out, learnable_sink,
      num_query_heads, num_key_value_heads, softmax_scale, pre_tokens, next_tokens, input_layout, sparse_mode,
      block_size, key_quant_mode, value_quant_mode, inner_precise, return_softmax_lse):
    return _fake(query, value, num_query_heads, num_key_value_heads, input_layout, block_table, return_softmax_lse,
                 quant_scale_out)


def npu_fused_infer_attention_score_v2(
        query: Tensor, key: Tensor, value: Tensor, *, query_rope: Optional[Tensor] = None,
        key_rope: Optional[Tensor] = None, pse_shift: Optional[Tensor] = None, atten_mask: Optional[Tensor] = None,
        actual_seq_qlen=None, actual_seq_kvlen=None, block_table: Optional[Tensor] = None,
        dequant_scale_query: Optional[Tensor] = None, dequant_scale_key: Optional[Tensor] = None,
        dequant_offset_key: Optional[Tensor] = None, dequant_scale_value: Optional[Tensor] = None,
        dequant_offset_value: Optional[Tensor] = None, dequant_scale_key_rope: Optional[Tensor] = None,
        quant_scale_out: Optional[Tensor] = None, quant_offset_out: Optional[Tensor] = None,
        quant_scale_p: Optional[Tensor] = None, learnable_sink: Optional[Tensor] = None, num_query_heads: int = 1,
        num_key_value_heads: int = 0, softmax_scale: float = 1.0, pre_tokens: int = _INT_MAX,
        next_tokens: int = _INT_MAX, input_layout: str = "BSH", sparse_mode: int = 0, block_size: int = 0,
        query_quant_mode: int = 0, key_quant_mode: int = 0, value_quant_mode: int = 0, inner_precise: int = 0,
        return_softmax_lse: bool = False, query_dtype=None, key_dtype=None, value_dtype=None,
        query_rope_dtype=None, key_rope_dtype=None, key_shared_prefix_dtype=None, value_shared_prefix_dtype=None,
        dequant_scale_query_dtype=None, dequant_scale_key_dtype=None, dequant_scale_value_dtype=None,
        dequant_scale_key_rope_dtype=None, out_dtype=None) -> Tuple[Tensor, Tensor]:
    """torch_npu.npu_fused_infer_attention_score_v2 (spec §8): FIA with v2 names, learnable_sink;
    returns (attention_out, softmax_lse). quant_scale_p and the *_dtype arguments are reserved
    (accepted, unused); out_dtype only applies to quantised outputs."""
    op = "npu_fused_infer_attention_score_v2"
    if quant_scale_out is not None and out_dtype is not None and out_dtype not in (torch.int8, 1):
        raise ValueError(f"{op}: out_dtype with quant_scale_out must be int8 (other quantised outputs are not "
                         f"supported by npufa), got {out_dtype!r}")
    return call(_fia2_op, _fia2, query, key, value, query_rope, key_rope, pse_shift, atten_mask,
                    _int_list(actual_seq_qlen, f"{op}: actual_seq_qlen"),
                    _int_list(actual_seq_kvlen, f"{op}: actual_seq_kvlen"), block_table, dequant_scale_query, dequant_scale_key,
                    dequant_offset_key, dequant_scale_value, dequant_offset_value, dequant_scale_key_rope,
                    quant_scale_out, quant_offset_out, learnable_sink, int(num_query_heads),
                    int(num_key_value_heads), float(softmax_scale), int(pre_tokens), int(next_tokens),
                    _str(op, "input_layout", input_layout),
                    int(sparse_mode), int(block_size), int(key_quant_mode), int(value_quant_mode),
                    int(inner_precise), bool(return_softmax_lse))


# ---- _npu_reshape_and_cache -------------------------------------------------------------------------------

def _reshape_and_cache(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                       slot_indices: Tensor) -> None:
    _C.reshape_and_cache(arr(key), arr(value), key_cache, value_cache, arr(slot_indices))


_reshape_and_cache_op = torch.library.custom_op("npufa::_npu_reshape_and_cache", mutates_args=("key_cache", "value_cache"),
                                                device_types="cpu")(_reshape_and_cache)


@_reshape_and_cache_op.register_fake
def _(key, value, key_cache, value_cache, slot_indices):
    return None


def _npu_reshape_and_cache(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                           slot_indices: Tensor) -> None:
    """torch_npu._npu_reshape_and_cache: write rows key [T, N, D] / value [T, N, Dv] into the paged caches
    (blocknum, block_size, N, D) at slot_indices (block * block_size + offset; negative slots skipped)."""
    call(_reshape_and_cache_op, _reshape_and_cache, key, value, key_cache, value_cache, slot_indices)


# ---- npu_trans_quant_param --------------------------------------------------------------------------------

@torch.library.custom_op("npufa::npu_trans_quant_param", mutates_args=(), device_types="cpu")
def _trans_quant_param_op(scale: Tensor, offset: Optional[Tensor], round_mode: int) -> Tensor:
    out = torch.empty(scale.shape, dtype=torch.int64)
    _C.trans_quant_param(arr(scale), arr(offset), round_mode, out)
    return out


@_trans_quant_param_op.register_fake
def _(scale, offset, round_mode):
    return scale.new_empty(scale.shape, dtype=torch.int64)


def npu_trans_quant_param(scale: Tensor, offset: Optional[Tensor] = None, round_mode: int = 0) -> Tensor:
    """torch_npu.npu_trans_quant_param: fp32 scales (and offsets) packed into the int64 (uint64 bits)
    form that deq_scale1/deq_scale2 accept: scale bits & 0xFFFFE000, bit 46, offset in bits 37-45."""
    return _trans_quant_param_op(scale, offset, int(round_mode))
