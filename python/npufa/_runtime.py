"""Glue shared by every op: threads, tensor hand-off to the C++ core."""
from __future__ import annotations

from typing import Optional

import torch

from . import _C

_threads_override: Optional[int] = None


def set_num_threads(n: Optional[int]) -> None:
    """Threads npufa's kernels use; None or n <= 0 goes back to following torch.get_num_threads()."""
    global _threads_override
    _threads_override = n if n is not None and n > 0 else None


def get_num_threads() -> int:
    return _threads_override if _threads_override is not None else torch.get_num_threads()


def sync_threads() -> None:
    """Size the core's pool before a call: torch's setting unless npufa's was overridden."""
    _C.set_num_threads(get_num_threads())


def _plain_eager(args) -> bool:
    """True when torch's dispatcher would do no more than run the op's CPU implementation on args:
    plain CPU tensors that need no autograd, no argument with __torch_function__, and no mode,
    transform, tracer, compiler or profiler that would see the call."""
    if (torch.compiler.is_compiling()  # first: Dynamo cannot trace the checks below
            or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._get_tracing_state() is not None
            or torch._C._functorch.peek_interpreter_stack() is not None or torch.autograd._profiler_enabled()):
        return False
    if torch._C._has_torch_function(args):  # torch.fx proxies, tensor subclasses with __torch_function__
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        # Negative and zero-tensor views are dense CPU tensors too, but the dispatcher materialises them
        # first (a negative view reads its storage negated; a zero tensor has no storage).
        if isinstance(a, torch.Tensor) and (type(a) is not torch.Tensor or not a.is_cpu or (grad and a.requires_grad)
                                            or a.is_neg() or a._is_zerotensor()):
            return False
    return True


def call(op, impl, *args):
    """op(*args), the custom op; in plain eager use, impl(*args), its CPU implementation, directly.
    The dispatcher's Python layers cost about 30 us a call, and several times that right after a
    decode step has swept the caches: a tenth of a decode step at the benchmark's shapes."""
    return impl(*args) if _plain_eager(args) else op(*args)


def arr(t: Optional[torch.Tensor]):
    """A tensor as the core sees it (DLPack needs no autograd history)."""
    if t is None:
        return None
    return t.detach()
