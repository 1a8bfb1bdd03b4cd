"""torch_npu's training attention: npu_fusion_attention (v1, v2, v3) and its grads, as torch custom ops.

Custom ops (namespace npufa): npu_fusion_attention, npu_fusion_attention_grad (v1 schemas) and
npu_fusion_attention_v2, npu_fusion_attention_grad_v2 (v2 schemas); autograd is registered on both
forwards. v3 is a thin wrapper over v1 (lengths as tensors, seed/offset returned as tensors).
"""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C
from ._runtime import arr, sync_threads

_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
_INT_MAX = 2147483647


def _int_list(x, name: str = "lengths") -> Optional[List[int]]:
    """torch_npu accepts lists, tuples or 1-D integer tensors for length/prefix arguments; floats
    are refused rather than truncated."""
    if x is None:
        return None
    if isinstance(x, Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got a tensor of dtype {x.dtype}")
        return [int(v) for v in x.reshape(-1).tolist()]
    try:
        return [operator.index(v) for v in x]
    except TypeError:
        raise TypeError(f"{name} must be a list of ints or an integer tensor, got {x!r}") from None


def fusion_attention_shapes(query: Tensor, key: Tensor, value: Tensor, head_num: int,
                            input_layout: str) -> Tuple[List[int], List[int]]:
    """(attention_out shape, softmax_max/sum shape) from the input shapes (spec §1.2, §2.3).

    Shape rules only, for the fake implementation; the C++ core validates real calls.
    """
    layout = input_layout.upper()
    q, k, v = query.shape, key.shape, value.shape
    if layout in ("BSH", "SBH"):
        d = q[2] // head_num
        nkv = k[2] // d if d else 0
        dv = v[2] // nkv if nkv else 0
        b, s = (q[0], q[1]) if layout == "BSH" else (q[1], q[0])
        return [q[0], q[1], head_num * dv], [b, head_num, s, 8]
    if layout == "BSND":
        return [q[0], q[1], q[2], v[3]], [q[0], q[2], q[1], 8]
    if layout == "BNSD":
        return [q[0], q[1], q[2], v[3]], [q[0], q[1], q[2], 8]
    if layout == "TND":
        return [q[0], q[1], v[2]], [q[0], q[1], 8]
    raise ValueError(f"npu_fusion_attention: input_layout must be one of {', '.join(_LAYOUTS)}, got {input_layout!r}")


def _numels(key, head_num, input_layout, stat_shape, qlen, kvlen) -> int:
    """torch_npu's returned numels (§2.4; TND on the raw cumulative lists)."""
    layout = input_layout.upper()
    if layout == "TND":
        if not qlen or not kvlen:
            return 0
        acc = qlen[0] * kvlen[0]
        for i in range(1, min(len(qlen), len(kvlen))):
            acc += (qlen[i] - qlen[i - 1]) * (kvlen[i] - kvlen[i - 1])
        return head_num * acc
    skv = key.shape[0] if layout == "SBH" else key.shape[2] if layout == "BNSD" else key.shape[1]
    return stat_shape[0] * head_num * stat_shape[2] * skv


def _core_args(op, query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob,
               pre_tokens, next_tokens, inner_precise, prefix, qlen, kvlen, sparse_mode, softmax_layout, sink,
               dropout_mask, seed, offset, pse_type=1, q_start_idx=None, kv_start_idx=None, query_rope=None,
               key_rope=None):
    """The argument tuple of _C.fusion_attention_fwd/_grad (see fwd_params in src/bindings/module.cc)."""
    return (arr(query), arr(key), arr(value), head_num, input_layout, arr(pse), arr(padding_mask),
            arr(atten_mask), scale, keep_prob, pre_tokens, next_tokens, inner_precise, prefix, qlen, kvlen,
            sparse_mode, softmax_layout, arr(sink), arr(dropout_mask), seed, offset, pse_type, q_start_idx,
            kv_start_idx, arr(query_rope), arr(key_rope), op)


def _fwd_run(query: Tensor, args) -> Tuple[Tensor, Tensor, Tensor, Tensor, int, int, int]:
    out_shape, stat_shape, _ = _C.fusion_attention_fwd(args)  # validates
    out = query.new_empty(out_shape)
    smax = query.new_empty(stat_shape, dtype=torch.float32)
    ssum = query.new_empty(stat_shape, dtype=torch.float32)
    sync_threads()
    seed, offset, numels = _C.fusion_attention_fwd(args, out, smax, ssum)
    return out, smax, ssum, query.new_empty(0), seed, offset, numels


def _fwd_fake(query, key, value, head_num, input_layout, qlen, kvlen, seed, offset):
    out_shape, stat_shape = fusion_attention_shapes(query, key, value, head_num, input_layout)
    return (query.new_empty(out_shape), query.new_empty(stat_shape, dtype=torch.float32),
            query.new_empty(stat_shape, dtype=torch.float32), query.new_empty(0), seed, offset,
            _numels(key, head_num, input_layout, stat_shape, qlen, kvlen))


def _grad_run(args, query, key, value, dy, softmax_max, softmax_sum, attention_in, numels, pse, pse_type, sink,
              query_rope, key_rope):
    """(dq, dk, dv, dpse, dq_rope, dk_rope, dsink); absent ones are empty tensors."""
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    has_dpse = pse is not None and pse_type in (0, 1)
    dpse = torch.empty_like(pse) if has_dpse else query.new_empty(0)
    dsink = torch.empty_like(sink, dtype=torch.float32) if sink is not None else query.new_empty(0, dtype=torch.float32)
    dqr = torch.empty_like(query_rope) if query_rope is not None else query.new_empty(0)
    dkr = torch.empty_like(key_rope) if key_rope is not None else query.new_empty(0)
    sync_threads()
    _C.fusion_attention_grad(args, arr(dy), arr(softmax_max), arr(softmax_sum), arr(attention_in), numels,
                             dq, dk, dv, dpse if has_dpse else None, dsink if sink is not None else None,
                             dqr if query_rope is not None else None, dkr if key_rope is not None else None)
    return dq, dk, dv, dpse, dqr, dkr, dsink


def _grad_fake(query, key, value, pse, pse_type, sink, query_rope, key_rope):
    has_dpse = pse is not None and pse_type in (0, 1)
    return (torch.empty_like(query), torch.empty_like(key), torch.empty_like(value),
            torch.empty_like(pse) if has_dpse else query.new_empty(0),
            torch.empty_like(query_rope) if query_rope is not None else query.new_empty(0),
            torch.empty_like(key_rope) if key_rope is not None else query.new_empty(0),
            torch.empty_like(sink, dtype=torch.float32) if sink is not None else query.new_empty(0, dtype=torch.float32))


def _draw_seed(keep_prob: float, dropout_mask, seed: int) -> int:
    """seed 0 with dropout and no mask: a Philox seed from torch's default generator (decision 1)."""
    if 0.0 < keep_prob < 1.0 and dropout_mask is None and seed == 0:
        return int(torch.randint(1, 2 ** 62, (1,)).item())
    return seed


def _check_layout(op: str, input_layout, **tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if not isinstance(input_layout, str):
        raise TypeError(f"{op}: input_layout must be a str, got {type(input_layout).__name__}")


# ---------------------------------------------------------------------------------------------------
# v1 forward and grad (§2, §4)
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("npufa::npu_fusion_attention", mutates_args=(), device_types="cpu")
def _npu_fusion_attention_op(
        query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str,
        pse: Optional[Tensor], padding_mask: Optional[Tensor], atten_mask: Optional[Tensor],
        scale: float, keep_prob: float, pre_tockens: int, next_tockens: int, inner_precise: int,
        prefix: Optional[List[int]], actual_seq_qlen: Optional[List[int]], actual_seq_kvlen: Optional[List[int]],
        sparse_mode: int, gen_mask_parallel: bool, sync: bool, softmax_layout: str,
        sink: Optional[Tensor], dropout_mask: Optional[Tensor], seed: int, offset: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, int, int, int]:
    return _fwd_run(query, _core_args(
        "npu_fusion_attention", query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale,
        keep_prob, pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen,
        sparse_mode, softmax_layout, sink, dropout_mask, seed, offset))


@_npu_fusion_attention_op.register_fake
def _(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob,
      pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
      gen_mask_parallel, sync, softmax_layout, sink, dropout_mask, seed, offset):
    return _fwd_fake(query, key, value, head_num, input_layout, actual_seq_qlen, actual_seq_kvlen, seed, offset)


def npu_fusion_attention(query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str,
                         pse: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None,
                         atten_mask: Optional[Tensor] = None, scale: float = 1., keep_prob: float = 1.,
                         pre_tockens: int = _INT_MAX, next_tockens: int = _INT_MAX, inner_precise: int = 0,
                         prefix: Optional[Sequence[int]] = None, actual_seq_qlen: Optional[Sequence[int]] = None,
                         actual_seq_kvlen: Optional[Sequence[int]] = None, sparse_mode: int = 0,
                         gen_mask_parallel: bool = True, sync: bool = False, softmax_layout: str = "",
                         sink: Optional[Tensor] = None, dropout_mask: Optional[Tensor] = None, seed: int = 0,
                         offset: int = 0):
    """torch_npu.npu_fusion_attention on the CPU.

    Returns (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels). With
    keep_prob < 1 and no dropout_mask, seed 0 means "draw one from torch's default generator"; the
    seed used is returned so the backward regenerates the same mask.
    """
    _check_layout("npu_fusion_attention", input_layout, query=query, key=key, value=value)
    return torch.ops.npufa.npu_fusion_attention(
        query, key, value, int(head_num), input_layout, pse, padding_mask, atten_mask, float(scale),
        float(keep_prob), int(pre_tockens), int(next_tockens), int(inner_precise), _int_list(prefix),
        _int_list(actual_seq_qlen), _int_list(actual_seq_kvlen), int(sparse_mode), bool(gen_mask_parallel),
        bool(sync), softmax_layout, sink, dropout_mask, _draw_seed(keep_prob, dropout_mask, int(seed)), int(offset))


@torch.library.custom_op("npufa::npu_fusion_attention_grad", mutates_args=(), device_types="cpu")
def _npu_fusion_attention_grad_op(
        query: Tensor, key: Tensor, value: Tensor, dy: Tensor, head_num: int, input_layout: str,
        pse: Optional[Tensor], padding_mask: Optional[Tensor], atten_mask: Optional[Tensor],
        softmax_max: Optional[Tensor], softmax_sum: Optional[Tensor], softmax_in: Optional[Tensor],
        attention_in: Optional[Tensor], scale_value: float, keep_prob: float, pre_tockens: int, next_tockens: int,
        inner_precise: int, seed: int, offset: int, numels: int, prefix: Optional[List[int]],
        actual_seq_qlen: Optional[List[int]], actual_seq_kvlen: Optional[List[int]], sparse_mode: int,
        gen_mask_parallel: bool, sync: bool, softmax_layout: str, sink: Optional[Tensor],
        dropout_mask: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv, dpse, dsink); dpse is [0] without pse, dsink is fp32 [0] without sink.

    dropout_mask is an npufa extension: the forward's external mask, so autograd can reuse it.
    """
    if pse is not None:
        pse = pse.contiguous()
    args = _core_args("npu_fusion_attention_grad", query, key, value, head_num, input_layout, pse, padding_mask,
                      atten_mask, scale_value, keep_prob, pre_tockens, next_tockens, inner_precise, prefix,
                      actual_seq_qlen, actual_seq_kvlen, sparse_mode, softmax_layout, sink, dropout_mask, seed,
                      offset)
    dq, dk, dv, dpse, _, _, dsink = _grad_run(args, query, key, value, dy, softmax_max, softmax_sum, attention_in,
                                              numels, pse, 1, sink, None, None)
    return dq, dk, dv, dpse, dsink


@_npu_fusion_attention_grad_op.register_fake
def _(query, key, value, dy, head_num, input_layout, pse, padding_mask, atten_mask, softmax_max, softmax_sum,
      softmax_in, attention_in, scale_value, keep_prob, pre_tockens, next_tockens, inner_precise, seed, offset,
      numels, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode, gen_mask_parallel, sync, softmax_layout,
      sink, dropout_mask):
    dq, dk, dv, dpse, _, _, dsink = _grad_fake(query, key, value, pse, 1, sink, None, None)
    return dq, dk, dv, dpse, dsink


def npu_fusion_attention_grad(query: Tensor, key: Tensor, value: Tensor, dy: Tensor, head_num: int,
                              input_layout: str, *, pse: Optional[Tensor] = None,
                              padding_mask: Optional[Tensor] = None, atten_mask: Optional[Tensor] = None,
                              softmax_max: Optional[Tensor] = None, softmax_sum: Optional[Tensor] = None,
                              softmax_in: Optional[Tensor] = None, attention_in: Optional[Tensor] = None,
                              scale_value: float = 1., keep_prob: float = 1., pre_tockens: int = _INT_MAX,
                              next_tockens: int = _INT_MAX, inner_precise: int = 0, seed: int = 0,
                              offset: int = 0, numels: int = 0, prefix: Optional[Sequence[int]] = None,
                              actual_seq_qlen: Optional[Sequence[int]] = None,
                              actual_seq_kvlen: Optional[Sequence[int]] = None, sparse_mode: int = 0,
                              gen_mask_parallel: bool = True, sync: bool = False, softmax_layout: str = "",
                              sink: Optional[Tensor] = None, dropout_mask: Optional[Tensor] = None):
    """torch_npu.npu_fusion_attention_grad on the CPU: returns (dq, dk, dv, dpse, dsink).

    dpse is None without pse; dsink is an empty fp32 tensor without sink. The dropout mask is
    regenerated from (seed, offset) exactly as the forward drew it; dropout_mask (npufa extension)
    passes the forward's external mask instead.
    """
    _check_layout("npu_fusion_attention_grad", input_layout, query=query, key=key, value=value, dy=dy)
    dq, dk, dv, dpse, dsink = torch.ops.npufa.npu_fusion_attention_grad(
        query, key, value, dy, int(head_num), input_layout, pse, padding_mask, atten_mask, softmax_max,
        softmax_sum, softmax_in, attention_in, float(scale_value), float(keep_prob), int(pre_tockens),
        int(next_tockens), int(inner_precise), int(seed), int(offset), int(numels), _int_list(prefix),
        _int_list(actual_seq_qlen), _int_list(actual_seq_kvlen), int(sparse_mode), bool(gen_mask_parallel),
        bool(sync), softmax_layout, sink, dropout_mask)
    return dq, dk, dv, (dpse if pse is not None else None), dsink


# ---------------------------------------------------------------------------------------------------
# v2 forward and grad (§3): pse_type, q/kv_start_idx, query_rope/key_rope; pre_tokens/next_tokens
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("npufa::npu_fusion_attention_v2", mutates_args=(), device_types="cpu")
def _npu_fusion_attention_v2_op(
        query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str,
        pse: Optional[Tensor], padding_mask: Optional[Tensor], atten_mask: Optional[Tensor],
        query_rope: Optional[Tensor], key_rope: Optional[Tensor], scale: float, keep_prob: float, pre_tokens: int,
        next_tokens: int, inner_precise: int, prefix: Optional[List[int]], actual_seq_qlen: Optional[List[int]],
        actual_seq_kvlen: Optional[List[int]], sparse_mode: int, gen_mask_parallel: bool, sync: bool,
        pse_type: int, q_start_idx: Optional[List[int]], kv_start_idx: Optional[List[int]], softmax_layout: str,
        sink: Optional[Tensor], dropout_mask: Optional[Tensor], seed: int, offset: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, int, int, int]:
    return _fwd_run(query, _core_args(
        "npu_fusion_attention_v2", query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale,
        keep_prob, pre_tokens, next_tokens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
        softmax_layout, sink, dropout_mask, seed, offset, pse_type, q_start_idx, kv_start_idx, query_rope,
        key_rope))


@_npu_fusion_attention_v2_op.register_fake
def _(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, query_rope, key_rope, scale,
      keep_prob, pre_tokens, next_tokens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
      gen_mask_parallel, sync, pse_type, q_start_idx, kv_start_idx, softmax_layout, sink, dropout_mask, seed,
      offset):
    return _fwd_fake(query, key, value, head_num, input_layout, actual_seq_qlen, actual_seq_kvlen, seed, offset)


def npu_fusion_attention_v2(query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str, *,
                            pse: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None,
                            atten_mask: Optional[Tensor] = None, query_rope: Optional[Tensor] = None,
                            key_rope: Optional[Tensor] = None, scale: float = 1., keep_prob: float = 1.,
                            pre_tokens: int = _INT_MAX, next_tokens: int = _INT_MAX, inner_precise: int = 0,
                            prefix: Optional[Sequence[int]] = None, actual_seq_qlen: Optional[Sequence[int]] = None,
                            actual_seq_kvlen: Optional[Sequence[int]] = None, sparse_mode: int = 0,
                            gen_mask_parallel: bool = True, sync: bool = False, pse_type: int = 1,
                            q_start_idx: Optional[Sequence[int]] = None, kv_start_idx: Optional[Sequence[int]] = None,
                            softmax_layout: str = "", sink: Optional[Tensor] = None,
                            dropout_mask: Optional[Tensor] = None, seed: int = 0, offset: int = 0):
    """torch_npu.npu_fusion_attention_v2 on the CPU (§3): v1 plus pse_type 0–3 (2/3: alibi generated
    from the slopes passed as pse, shifted by q_start_idx/kv_start_idx) and query_rope/key_rope.
    Returns the same 7-tuple as v1."""
    _check_layout("npu_fusion_attention_v2", input_layout, query=query, key=key, value=value)
    return torch.ops.npufa.npu_fusion_attention_v2(
        query, key, value, int(head_num), input_layout, pse, padding_mask, atten_mask, query_rope, key_rope,
        float(scale), float(keep_prob), int(pre_tokens), int(next_tokens), int(inner_precise), _int_list(prefix),
        _int_list(actual_seq_qlen), _int_list(actual_seq_kvlen), int(sparse_mode), bool(gen_mask_parallel),
        bool(sync), int(pse_type), _int_list(q_start_idx), _int_list(kv_start_idx), softmax_layout, sink,
        dropout_mask, _draw_seed(keep_prob, dropout_mask, int(seed)), int(offset))


@torch.library.custom_op("npufa::npu_fusion_attention_grad_v2", mutates_args=(), device_types="cpu")
def _npu_fusion_attention_grad_v2_op(
        query: Tensor, key: Tensor, value: Tensor, dy: Tensor, head_num: int, input_layout: str,
        pse: Optional[Tensor], padding_mask: Optional[Tensor], atten_mask: Optional[Tensor],
        softmax_max: Optional[Tensor], softmax_sum: Optional[Tensor], softmax_in: Optional[Tensor],
        attention_in: Optional[Tensor], query_rope: Optional[Tensor], key_rope: Optional[Tensor],
        scale_value: float, keep_prob: float, pre_tokens: int, next_tokens: int, inner_precise: int, seed: int,
        offset: int, numels: int, prefix: Optional[List[int]], actual_seq_qlen: Optional[List[int]],
        actual_seq_kvlen: Optional[List[int]], sparse_mode: int, gen_mask_parallel: bool, sync: bool,
        pse_type: int, q_start_idx: Optional[List[int]], kv_start_idx: Optional[List[int]], softmax_layout: str,
        sink: Optional[Tensor], dropout_mask: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dpse, dq_rope, dk_rope, dsink); absent ones are empty tensors."""
    if pse is not None and pse_type in (0, 1):
        pse = pse.contiguous()
    args = _core_args("npu_fusion_attention_grad_v2", query, key, value, head_num, input_layout, pse, padding_mask,
                      atten_mask, scale_value, keep_prob, pre_tokens, next_tokens, inner_precise, prefix,
                      actual_seq_qlen, actual_seq_kvlen, sparse_mode, softmax_layout, sink, dropout_mask, seed,
                      offset, pse_type, q_start_idx, kv_start_idx, query_rope, key_rope)
    return _grad_run(args, query, key, value, dy, softmax_max, softmax_sum, attention_in, numels, pse, pse_type,
                     sink, query_rope, key_rope)


@_npu_fusion_attention_grad_v2_op.register_fake
def _(query, key, value, dy, head_num, input_layout, pse, padding_mask, atten_mask, softmax_max, softmax_sum,
      softmax_in, attention_in, query_rope, key_rope, scale_value, keep_prob, pre_tokens, next_tokens, inner_precise,
      seed, offset, numels, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode, gen_mask_parallel, sync, pse_type,
      q_start_idx, kv_start_idx, softmax_layout, sink, dropout_mask):
    return _grad_fake(query, key, value, pse, pse_type, sink, query_rope, key_rope)


def npu_fusion_attention_grad_v2(query: Tensor, key: Tensor, value: Tensor, dy: Tensor, head_num: int,
                                 input_layout: str, *, pse: Optional[Tensor] = None,
                                 padding_mask: Optional[Tensor] = None, atten_mask: Optional[Tensor] = None,
                                 softmax_max: Optional[Tensor] = None, softmax_sum: Optional[Tensor] = None,
                                 softmax_in: Optional[Tensor] = None, attention_in: Optional[Tensor] = None,
                                 query_rope: Optional[Tensor] = None, key_rope: Optional[Tensor] = None,
                                 scale_value: float = 1., keep_prob: float = 1., pre_tokens: int = _INT_MAX,
                                 next_tokens: int = _INT_MAX, inner_precise: int = 0, seed: int = 0, offset: int = 0,
                                 numels: int = 0, prefix: Optional[Sequence[int]] = None,
                                 actual_seq_qlen: Optional[Sequence[int]] = None,
                                 actual_seq_kvlen: Optional[Sequence[int]] = None, sparse_mode: int = 0,
                                 gen_mask_parallel: bool = True, sync: bool = False, pse_type: int = 1,
                                 q_start_idx: Optional[Sequence[int]] = None,
                                 kv_start_idx: Optional[Sequence[int]] = None, softmax_layout: str = "",
                                 sink: Optional[Tensor] = None, dropout_mask: Optional[Tensor] = None):
    """torch_npu.npu_fusion_attention_grad_v2 on the CPU: (dq, dk, dv, dpse, dq_rope, dk_rope, dsink).

    dpse is None without pse and for pse_type 2/3 (no gradient for the slopes); dq_rope/dk_rope are
    empty [0] tensors without rope; dsink is an empty fp32 tensor without sink.
    """
    _check_layout("npu_fusion_attention_grad_v2", input_layout, query=query, key=key, value=value, dy=dy)
    dq, dk, dv, dpse, dqr, dkr, dsink = torch.ops.npufa.npu_fusion_attention_grad_v2(
        query, key, value, dy, int(head_num), input_layout, pse, padding_mask, atten_mask, softmax_max, softmax_sum,
        softmax_in, attention_in, query_rope, key_rope, float(scale_value), float(keep_prob), int(pre_tokens),
        int(next_tokens), int(inner_precise), int(seed), int(offset), int(numels), _int_list(prefix),
        _int_list(actual_seq_qlen), _int_list(actual_seq_kvlen), int(sparse_mode), bool(gen_mask_parallel),
        bool(sync), int(pse_type), _int_list(q_start_idx), _int_list(kv_start_idx), softmax_layout, sink,
        dropout_mask)
    return dq, dk, dv, (dpse if pse is not None and pse_type in (0, 1) else None), dqr, dkr, dsink


# ---------------------------------------------------------------------------------------------------
# v3 (§3.4): v1's math; lengths may be CPU int64 tensors; seed/offset come back as int64 tensors [1]
# ---------------------------------------------------------------------------------------------------
def npu_fusion_attention_v3(query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str,
                            pse: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None,
                            atten_mask: Optional[Tensor] = None, scale: float = 1., keep_prob: float = 1.,
                            pre_tockens: int = _INT_MAX, next_tockens: int = _INT_MAX, inner_precise: int = 0,
                            prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode: int = 0,
                            gen_mask_parallel: bool = True, sync: bool = False, softmax_layout: str = "",
                            sink: Optional[Tensor] = None):
    """torch_npu.npu_fusion_attention_v3 on the CPU: (attention_out, softmax_max, softmax_sum,
    softmax_out, seed, offset) with seed/offset as int64 tensors of shape [1]; differentiable."""
    out = npu_fusion_attention(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale,
                               keep_prob, pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen,
                               actual_seq_kvlen, sparse_mode, gen_mask_parallel, sync, softmax_layout, sink)
    return (*out[:4], torch.tensor([out[4]], dtype=torch.int64), torch.tensor([out[5]], dtype=torch.int64))


def npu_fusion_attention_grad_v3(query: Tensor, key: Tensor, value: Tensor, dy: Tensor, head_num: int,
                                 input_layout: str, *, pse: Optional[Tensor] = None,
                                 padding_mask: Optional[Tensor] = None, atten_mask: Optional[Tensor] = None,
                                 softmax_max: Optional[Tensor] = None, softmax_sum: Optional[Tensor] = None,
                                 softmax_in: Optional[Tensor] = None, attention_in: Optional[Tensor] = None,
                                 scale_value: float = 1., keep_prob: float = 1., pre_tockens: int = _INT_MAX,
                                 next_tockens: int = _INT_MAX, inner_precise: int = 0, seed=None, offset=None,
                                 prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode: int = 0,
                                 gen_mask_parallel: bool = True, sync: bool = False, softmax_layout: str = "",
                                 sink: Optional[Tensor] = None):
    """torch_npu.npu_fusion_attention_grad_v3 on the CPU: v1's grad with seed/offset as tensors and
    numels recomputed from the shapes. Returns (dq, dk, dv, dpse, dsink)."""
    seed_i = int(seed.reshape(-1)[0]) if isinstance(seed, Tensor) else int(seed or 0)
    offset_i = int(offset.reshape(-1)[0]) if isinstance(offset, Tensor) else int(offset or 0)
    _, stat_shape = fusion_attention_shapes(query, key, value, head_num, input_layout)
    numels = _numels(key, head_num, input_layout, stat_shape, _int_list(actual_seq_qlen), _int_list(actual_seq_kvlen))
    return npu_fusion_attention_grad(
        query, key, value, dy, head_num, input_layout, pse=pse, padding_mask=padding_mask, atten_mask=atten_mask,
        softmax_max=softmax_max, softmax_sum=softmax_sum, softmax_in=softmax_in, attention_in=attention_in,
        scale_value=scale_value, keep_prob=keep_prob, pre_tockens=pre_tockens, next_tockens=next_tockens,
        inner_precise=inner_precise, seed=seed_i, offset=offset_i, numels=numels, prefix=prefix,
        actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen, sparse_mode=sparse_mode,
        gen_mask_parallel=gen_mask_parallel, sync=sync, softmax_layout=softmax_layout, sink=sink)


# ---------------------------------------------------------------------------------------------------
# Autograd: differentiable inputs are query, key, value, pse (pse_type 0/1), query_rope, key_rope, sink.
# ---------------------------------------------------------------------------------------------------
_V1_ARGS = ("query", "key", "value", "head_num", "input_layout", "pse", "padding_mask", "atten_mask", "scale",
            "keep_prob", "pre_tockens", "next_tockens", "inner_precise", "prefix", "actual_seq_qlen",
            "actual_seq_kvlen", "sparse_mode", "gen_mask_parallel", "sync", "softmax_layout", "sink",
            "dropout_mask", "seed", "offset")
_V2_ARGS = ("query", "key", "value", "head_num", "input_layout", "pse", "padding_mask", "atten_mask", "query_rope",
            "key_rope", "scale", "keep_prob", "pre_tokens", "next_tokens", "inner_precise", "prefix",
            "actual_seq_qlen", "actual_seq_kvlen", "sparse_mode", "gen_mask_parallel", "sync", "pse_type",
            "q_start_idx", "kv_start_idx", "softmax_layout", "sink", "dropout_mask", "seed", "offset")
_SAVED = ("query", "key", "value", "pse", "atten_mask", "sink", "dropout_mask", "query_rope", "key_rope")


def _make_setup_context(names):
    def setup_context(ctx, inputs, output):
        a = dict(zip(names, inputs))
        ctx.mark_non_differentiable(output[1], output[2], output[3])
        ctx.save_for_backward(*(a.get(k) for k in _SAVED), output[0], output[1], output[2])
        ctx.args = {k: v for k, v in a.items() if k not in _SAVED}
        ctx.seed, ctx.offset, ctx.numels = output[4], output[5], output[6]
    return setup_context


def _backward_v1(ctx, grad_out, *unused):
    q, k, v, pse, mask, sink, dmask, _, _, out, smax, ssum = ctx.saved_tensors
    a = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dpse, dsink = torch.ops.npufa.npu_fusion_attention_grad(
        q, k, v, grad_out, a["head_num"], a["input_layout"], pse, None, mask, smax, ssum, None, out, a["scale"],
        a["keep_prob"], a["pre_tockens"], a["next_tockens"], a["inner_precise"], ctx.seed, ctx.offset, ctx.numels,
        a["prefix"], a["actual_seq_qlen"], a["actual_seq_kvlen"], a["sparse_mode"], a["gen_mask_parallel"],
        a["sync"], a["softmax_layout"], sink, dmask)
    grads = {"query": dq, "key": dk, "value": dv, "pse": dpse if pse is not None else None,
             "sink": dsink if sink is not None else None}
    return tuple(grads.get(name) for name in _V1_ARGS)


def _backward_v2(ctx, grad_out, *unused):
    q, k, v, pse, mask, sink, dmask, qr, kr, out, smax, ssum = ctx.saved_tensors
    a = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dpse, dqr, dkr, dsink = torch.ops.npufa.npu_fusion_attention_grad_v2(
        q, k, v, grad_out, a["head_num"], a["input_layout"], pse, None, mask, smax, ssum, None, out, qr, kr,
        a["scale"], a["keep_prob"], a["pre_tokens"], a["next_tokens"], a["inner_precise"], ctx.seed, ctx.offset,
        ctx.numels, a["prefix"], a["actual_seq_qlen"], a["actual_seq_kvlen"], a["sparse_mode"],
        a["gen_mask_parallel"], a["sync"], a["pse_type"], a["q_start_idx"], a["kv_start_idx"], a["softmax_layout"],
        sink, dmask)
    grads = {"query": dq, "key": dk, "value": dv,
             "pse": dpse if pse is not None and a["pse_type"] in (0, 1) else None,
             "query_rope": dqr if qr is not None else None, "key_rope": dkr if kr is not None else None,
             "sink": dsink if sink is not None else None}
    return tuple(grads.get(name) for name in _V2_ARGS)


_npu_fusion_attention_op.register_autograd(_backward_v1, setup_context=_make_setup_context(_V1_ARGS))
_npu_fusion_attention_v2_op.register_autograd(_backward_v2, setup_context=_make_setup_context(_V2_ARGS))
