"""npu_fusion_attention: torch_npu's training forward, as the torch custom op npufa::npu_fusion_attention."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _C
from ._runtime import arr, sync_threads

_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")


def _int_list(x) -> Optional[List[int]]:
    """torch_npu accepts lists, tuples or 1-D tensors for length/prefix arguments."""
    if x is None:
        return None
    if isinstance(x, Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    return [int(v) for v in x]


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
        out = [q[0], q[1], head_num * dv]
        return out, [b, head_num, s, 8]
    if layout == "BSND":
        return [q[0], q[1], q[2], v[3]], [q[0], q[2], q[1], 8]
    if layout == "BNSD":
        return [q[0], q[1], q[2], v[3]], [q[0], q[1], q[2], 8]
    if layout == "TND":
        return [q[0], q[1], v[2]], [q[0], q[1], 8]
    raise ValueError(f"npu_fusion_attention: input_layout must be one of {', '.join(_LAYOUTS)}, got {input_layout!r}")


@torch.library.custom_op("npufa::npu_fusion_attention", mutates_args=(), device_types="cpu")
def _npu_fusion_attention_op(
        query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str,
        pse: Optional[Tensor], padding_mask: Optional[Tensor], atten_mask: Optional[Tensor],
        scale: float, keep_prob: float, pre_tockens: int, next_tockens: int, inner_precise: int,
        prefix: Optional[List[int]], actual_seq_qlen: Optional[List[int]], actual_seq_kvlen: Optional[List[int]],
        sparse_mode: int, gen_mask_parallel: bool, sync: bool, softmax_layout: str,
        sink: Optional[Tensor], dropout_mask: Optional[Tensor], seed: int, offset: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, int, int, int]:
    args = (arr(query), arr(key), arr(value), head_num, input_layout, arr(pse), arr(padding_mask),
            arr(atten_mask), scale, keep_prob, pre_tockens, next_tockens, inner_precise, prefix,
            actual_seq_qlen, actual_seq_kvlen, sparse_mode, softmax_layout, arr(sink), arr(dropout_mask),
            seed, offset)
    out_shape, stat_shape, _ = _C.fusion_attention_fwd(args)  # validates
    out = query.new_empty(out_shape)
    smax = query.new_empty(stat_shape, dtype=torch.float32)
    ssum = query.new_empty(stat_shape, dtype=torch.float32)
    sync_threads()
    seed, offset, numels = _C.fusion_attention_fwd(args, out, smax, ssum)
    return out, smax, ssum, query.new_empty(0), seed, offset, numels


@_npu_fusion_attention_op.register_fake
def _(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob,
      pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
      gen_mask_parallel, sync, softmax_layout, sink, dropout_mask, seed, offset):
    out_shape, stat_shape = fusion_attention_shapes(query, key, value, head_num, input_layout)
    if input_layout.upper() == "TND":
        acc = actual_seq_qlen[0] * actual_seq_kvlen[0]
        for i in range(1, len(actual_seq_qlen)):
            acc += (actual_seq_qlen[i] - actual_seq_qlen[i - 1]) * (actual_seq_kvlen[i] - actual_seq_kvlen[i - 1])
        numels = head_num * acc
    else:
        b = stat_shape[0]
        numels = b * head_num * stat_shape[2] * (key.shape[0] if input_layout.upper() == "SBH" else
                                                  key.shape[2] if input_layout.upper() == "BNSD" else key.shape[1])
    return (query.new_empty(out_shape), query.new_empty(stat_shape, dtype=torch.float32),
            query.new_empty(stat_shape, dtype=torch.float32), query.new_empty(0), seed, offset, numels)


def _draw_seed() -> int:
    """A Philox seed from torch's default generator (decision 1: reproducible under torch.manual_seed)."""
    return int(torch.randint(1, 2 ** 62, (1,)).item())


def npu_fusion_attention(query: Tensor, key: Tensor, value: Tensor, head_num: int, input_layout: str,
                         pse: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None,
                         atten_mask: Optional[Tensor] = None, scale: float = 1., keep_prob: float = 1.,
                         pre_tockens: int = 2147483647, next_tockens: int = 2147483647, inner_precise: int = 0,
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
    if not isinstance(input_layout, str):
        raise TypeError(f"npu_fusion_attention: input_layout must be a str, got {type(input_layout).__name__}")
    if keep_prob < 1.0 and dropout_mask is None and seed == 0 and keep_prob > 0.0:
        seed = _draw_seed()
    return torch.ops.npufa.npu_fusion_attention(
        query, key, value, int(head_num), input_layout, pse, padding_mask, atten_mask, float(scale),
        float(keep_prob), int(pre_tockens), int(next_tockens), int(inner_precise), _int_list(prefix),
        _int_list(actual_seq_qlen), _int_list(actual_seq_kvlen), int(sparse_mode), bool(gen_mask_parallel),
        bool(sync), softmax_layout, sink, dropout_mask, int(seed), int(offset))


# ---------------------------------------------------------------------------------------------------
# Backward: npu_fusion_attention_grad (§4) and autograd.
# ---------------------------------------------------------------------------------------------------
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
    args = (arr(query), arr(key), arr(value), head_num, input_layout, arr(pse), arr(padding_mask),
            arr(atten_mask), scale_value, keep_prob, pre_tockens, next_tockens, inner_precise, prefix,
            actual_seq_qlen, actual_seq_kvlen, sparse_mode, softmax_layout, arr(sink), arr(dropout_mask),
            seed, offset)
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    dpse = torch.empty_like(pse) if pse is not None else query.new_empty(0)
    dsink = torch.empty_like(sink, dtype=torch.float32) if sink is not None else query.new_empty(0, dtype=torch.float32)
    sync_threads()
    _C.fusion_attention_grad(args, arr(dy), arr(softmax_max), arr(softmax_sum), arr(attention_in), numels,
                             dq, dk, dv, dpse if pse is not None else None, dsink if sink is not None else None)
    return dq, dk, dv, dpse, dsink


@_npu_fusion_attention_grad_op.register_fake
def _(query, key, value, dy, head_num, input_layout, pse, padding_mask, atten_mask, softmax_max, softmax_sum,
      softmax_in, attention_in, scale_value, keep_prob, pre_tockens, next_tockens, inner_precise, seed, offset,
      numels, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode, gen_mask_parallel, sync, softmax_layout,
      sink, dropout_mask):
    dpse = torch.empty_like(pse) if pse is not None else query.new_empty(0)
    dsink = torch.empty_like(sink, dtype=torch.float32) if sink is not None else query.new_empty(0, dtype=torch.float32)
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), dpse, dsink


def npu_fusion_attention_grad(query: Tensor, key: Tensor, value: Tensor, dy: Tensor, head_num: int,
                              input_layout: str, *, pse: Optional[Tensor] = None,
                              padding_mask: Optional[Tensor] = None, atten_mask: Optional[Tensor] = None,
                              softmax_max: Optional[Tensor] = None, softmax_sum: Optional[Tensor] = None,
                              softmax_in: Optional[Tensor] = None, attention_in: Optional[Tensor] = None,
                              scale_value: float = 1., keep_prob: float = 1., pre_tockens: int = 2147483647,
                              next_tockens: int = 2147483647, inner_precise: int = 0, seed: int = 0,
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
    if not isinstance(input_layout, str):
        raise TypeError(f"npu_fusion_attention_grad: input_layout must be a str, got {type(input_layout).__name__}")
    dq, dk, dv, dpse, dsink = torch.ops.npufa.npu_fusion_attention_grad(
        query, key, value, dy, int(head_num), input_layout, pse, padding_mask, atten_mask, softmax_max,
        softmax_sum, softmax_in, attention_in, float(scale_value), float(keep_prob), int(pre_tockens),
        int(next_tockens), int(inner_precise), int(seed), int(offset), int(numels), _int_list(prefix),
        _int_list(actual_seq_qlen), _int_list(actual_seq_kvlen), int(sparse_mode), bool(gen_mask_parallel),
        bool(sync), softmax_layout, sink, dropout_mask)
    return dq, dk, dv, (dpse if pse is not None else None), dsink


# Forward argument positions (the custom op's schema order).
_FWD_ARGS = ("query", "key", "value", "head_num", "input_layout", "pse", "padding_mask", "atten_mask", "scale",
             "keep_prob", "pre_tockens", "next_tockens", "inner_precise", "prefix", "actual_seq_qlen",
             "actual_seq_kvlen", "sparse_mode", "gen_mask_parallel", "sync", "softmax_layout", "sink",
             "dropout_mask", "seed", "offset")


def _setup_context(ctx, inputs, output):
    a = dict(zip(_FWD_ARGS, inputs))
    out, smax, ssum = output[0], output[1], output[2]
    ctx.mark_non_differentiable(smax, ssum, output[3])
    ctx.save_for_backward(a["query"], a["key"], a["value"], a["pse"], a["atten_mask"], a["sink"],
                          a["dropout_mask"], out, smax, ssum)
    ctx.args = {k: a[k] for k in _FWD_ARGS if k not in (
        "query", "key", "value", "pse", "atten_mask", "sink", "dropout_mask", "padding_mask", "seed", "offset")}
    ctx.seed, ctx.offset, ctx.numels = output[4], output[5], output[6]


def _backward(ctx, grad_out, *unused):
    q, k, v, pse, mask, sink, dmask, out, smax, ssum = ctx.saved_tensors
    a = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dpse, dsink = torch.ops.npufa.npu_fusion_attention_grad(
        q, k, v, grad_out, a["head_num"], a["input_layout"], pse, None, mask, smax, ssum, None, out, a["scale"],
        a["keep_prob"], a["pre_tockens"], a["next_tockens"], a["inner_precise"], ctx.seed, ctx.offset, ctx.numels,
        a["prefix"], a["actual_seq_qlen"], a["actual_seq_kvlen"], a["sparse_mode"], a["gen_mask_parallel"],
        a["sync"], a["softmax_layout"], sink, dmask)
    grads = {"query": dq, "key": dk, "value": dv,
             "pse": dpse if pse is not None else None,
             "sink": dsink if sink is not None else None}
    return tuple(grads.get(name) for name in _FWD_ARGS)


_npu_fusion_attention_op.register_autograd(_backward, setup_context=_setup_context)
