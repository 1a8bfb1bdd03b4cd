"""npufa: torch_npu's NPU Flash Attention operator family on any CPU.

Functions keep torch_npu's names, arguments, defaults and return values; each is a torch custom op
in the ``npufa`` namespace (``torch.ops.npufa.*``).
"""
import torch  # noqa: F401  (custom ops register against torch)

from . import reference
from ._fusion_attention import (npu_fusion_attention, npu_fusion_attention_grad, npu_fusion_attention_grad_v2,
                                npu_fusion_attention_grad_v3, npu_fusion_attention_v2, npu_fusion_attention_v3)
from ._infer_attention import (_npu_reshape_and_cache, npu_fused_infer_attention_score,
                               npu_fused_infer_attention_score_v2, npu_incre_flash_attention,
                               npu_prompt_flash_attention, npu_trans_quant_param)
from ._runtime import get_num_threads, set_num_threads
from .dropout import _npu_dropout_gen_mask, dropout_gen_mask, dropout_mask_bytes

__all__ = [
    "npu_fusion_attention",
    "npu_fusion_attention_grad",
    "npu_fusion_attention_v2",
    "npu_fusion_attention_grad_v2",
    "npu_fusion_attention_v3",
    "npu_fusion_attention_grad_v3",
    "npu_prompt_flash_attention",
    "npu_incre_flash_attention",
    "npu_fused_infer_attention_score",
    "npu_fused_infer_attention_score_v2",
    "_npu_reshape_and_cache",
    "npu_trans_quant_param",
    "_npu_dropout_gen_mask",
    "dropout_gen_mask",
    "dropout_mask_bytes",
    "set_num_threads",
    "get_num_threads",
    "reference",
]
__version__ = "0.1.0"
