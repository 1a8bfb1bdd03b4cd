"""The seeds' mini-vLLM ``NPUAttention`` example (seed 000 §6.1), on CPU tensors through npufa.

The class keeps the seed's calls; only what the specification corrects is changed:
- ``import npufa as torch_npu`` and no ``.npu()``: that is the whole port;
- the tensors are [B, S, N, D], so input_layout is "BSND" (the seed wrote "BNSD" for them, which
  torch_npu rejects: the head axis would be 64, not num_heads = 8);
- npu_fused_infer_attention_score's argument is ``scale`` (the seed wrote ``scale_value``, PFA/IFA's name);
- a paged decode step is added: the prefill's keys/values go into a block cache with
  ``_npu_reshape_and_cache`` and the decode reads them through ``block_table``, as vLLM does.

Every result is compared with npufa.reference (float64); the script fails if one is off.

    python3 examples/mini_vllm.py
"""
from __future__ import annotations

import math
import sys
from typing import Optional, Tuple

import torch

import npufa as torch_npu
from npufa import reference


class NPUAttention:
    """NPU Flash Attention's mini-vLLM integration class."""

    def __init__(self, num_heads: int, head_dim: int, block_size: int = 16):
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.scale = 1.0 / math.sqrt(head_dim)

    def prefill_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Prefill: causal attention over the prompt."""
        return torch_npu.npu_prompt_flash_attention(
            query, key, value,
            num_heads=self.num_heads,
            scale_value=self.scale,
            input_layout="BSND",
            sparse_mode=3,  # causal (bottom-right aligned) with the compressed mask
            atten_mask=torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1),
            pre_tokens=65535,
            next_tokens=0,
        )

    def decode_attention(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                         seq_lengths: torch.Tensor, block_table: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decode: one new token per sequence against the KV cache (paged when block_table is given)."""
        kwargs = {"num_heads": self.num_heads, "scale_value": self.scale, "input_layout": "BSND"}
        if block_table is not None:
            kwargs.update({"block_table": block_table, "block_size": self.block_size,
                           "actual_seq_lengths": seq_lengths})
        return torch_npu.npu_incre_flash_attention(query, key_cache, value_cache, **kwargs)

    def unified_inference(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          seq_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """One entry for prefill and decode, with the softmax lse."""
        return torch_npu.npu_fused_infer_attention_score(
            query, key_cache, value_cache,
            num_heads=self.num_heads,
            scale=self.scale,
            input_layout="BSND",
            actual_seq_lengths=[seq_length],
            actual_seq_lengths_kv=[seq_length],
            sparse_mode=3,
            atten_mask=torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1),
            pre_tokens=65535,
            next_tokens=0,
            softmax_lse_flag=True,
        )


def check(name: str, got, want, atol: float) -> bool:
    err = (got.double() - want.double()).abs().max().item()
    ok = err <= atol
    print(f"  {name:44s} shape {str(tuple(got.shape)):20s} max error vs reference {err:.2e}  {'ok' if ok else 'FAIL'}")
    return ok


def main() -> int:
    torch.manual_seed(0)
    attention = NPUAttention(num_heads=8, head_dim=128, block_size=16)
    batch_size, seq_len, max_kv_len = 1, 64, 1024
    dt = torch.float16
    query = torch.randn(batch_size, seq_len, 8, 128, dtype=dt)
    key_cache = torch.randn(batch_size, max_kv_len, 8, 128, dtype=dt)
    value_cache = torch.randn(batch_size, max_kv_len, 8, 128, dtype=dt)
    ok = True

    # Prefill
    prefill_out = attention.prefill_attention(query, key_cache[:, :seq_len], value_cache[:, :seq_len])
    mask = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)
    ref = reference.npu_prompt_flash_attention(query.double(), key_cache[:, :seq_len].double(),
                                               value_cache[:, :seq_len].double(), num_heads=8,
                                               scale_value=attention.scale, input_layout="BSND", sparse_mode=3,
                                               atten_mask=mask, pre_tokens=65535, next_tokens=0)
    print(f"Prefill output: {tuple(prefill_out.shape)}")
    ok &= check("prefill (PFA, causal)", prefill_out, ref, 4e-3)

    # Decode against the contiguous cache (all max_kv_len positions, as in the seed)
    decode_query = torch.randn(batch_size, 1, 8, 128, dtype=dt)
    seq_lengths = torch.tensor([seq_len], dtype=torch.int32)
    decode_out = attention.decode_attention(decode_query, key_cache, value_cache, seq_lengths)
    ref = reference.npu_incre_flash_attention(decode_query.double(), key_cache.double(), value_cache.double(),
                                              num_heads=8, scale_value=attention.scale, input_layout="BSND")
    print(f"Decode output: {tuple(decode_out.shape)}")
    ok &= check("decode (IFA, contiguous cache)", decode_out, ref, 4e-3)

    # Paged decode: write the prompt's keys/values into a shuffled block cache, then decode.
    bs, num_blocks = attention.block_size, 32
    k_pool = torch.zeros(num_blocks, bs, 8, 128, dtype=dt)
    v_pool = torch.zeros(num_blocks, bs, 8, 128, dtype=dt)
    blocks = torch.randperm(num_blocks)[: seq_len // bs]
    slots = (blocks.repeat_interleave(bs) * bs + torch.arange(bs).repeat(len(blocks)))[:seq_len]
    torch_npu._npu_reshape_and_cache(key_cache[0, :seq_len], value_cache[0, :seq_len], k_pool, v_pool, slots)
    block_table = torch.zeros(batch_size, 8, dtype=torch.int32)
    block_table[0, : len(blocks)] = blocks.to(torch.int32)
    paged_out = attention.decode_attention(decode_query, k_pool.view(num_blocks, bs, -1), v_pool.view(num_blocks, bs, -1),
                                           seq_lengths, block_table)
    ref = reference.npu_incre_flash_attention(decode_query.double(), key_cache[:, :seq_len].double(),
                                              value_cache[:, :seq_len].double(), num_heads=8,
                                              scale_value=attention.scale, input_layout="BSND")
    ok &= check("decode (IFA, paged cache via block_table)", paged_out, ref, 4e-3)

    # Unified entry: prefill through FIA, with the lse
    out, lse = attention.unified_inference(query, key_cache[:, :seq_len], value_cache[:, :seq_len], seq_len)
    ref, ref_lse = reference.npu_fused_infer_attention_score(
        query.double(), key_cache[:, :seq_len].double(), value_cache[:, :seq_len].double(), num_heads=8,
        scale=attention.scale, input_layout="BSND", actual_seq_lengths=[seq_len], actual_seq_lengths_kv=[seq_len],
        sparse_mode=3, atten_mask=mask, pre_tokens=65535, next_tokens=0, softmax_lse_flag=True)
    ok &= check("unified (FIA prefill) attention_out", out, ref, 4e-3)
    ok &= check("unified (FIA prefill) softmax_lse", lse, ref_lse, 1e-4)

    print("all results match the reference" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
