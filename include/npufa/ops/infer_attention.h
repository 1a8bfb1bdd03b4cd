// Inference attention: npu_prompt_flash_attention (PFA), npu_incre_flash_attention (IFA),
// npu_fused_infer_attention_score (FIA v1) and _v2, torch_npu semantics. Spec: §1, §5–§8, §11, §12;
// npufa's conventions: docs/inference.md.
//
// torch_npu routes all four to one kernel family; npufa does the same with one Params struct that
// mirrors FIA v1 (the superset). `kind` selects the op's own rules: PFA's defaults and sparse-mode
// aliases, IFA's single query row, which layouts and features each op has. IFA's
// actual_seq_lengths (KV lengths) go in actual_seq_lengths_kv; FIA v2's names map per spec §8.2.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "npufa/tensor_view.h"

namespace npufa {

enum class InferOp { Prompt, Incre, Fused, FusedV2 };

struct InferAttentionParams {
  InferOp kind = InferOp::Fused;
  const char* op = "npu_fused_infer_attention_score";  // the name errors carry
  TensorView query, key, value;
  std::optional<TensorView> pse_shift, atten_mask;
  std::optional<std::vector<int64_t>> actual_seq_lengths, actual_seq_lengths_kv;
  std::optional<TensorView> block_table;                        // int32 [B, W]
  std::optional<TensorView> query_padding_size, kv_padding_size;  // int64, element 0 used
  std::optional<TensorView> key_shared_prefix, value_shared_prefix;
  std::optional<std::vector<int64_t>> actual_shared_prefix_len;
  std::optional<TensorView> query_rope, key_rope;
  std::optional<TensorView> learnable_sink;  // FIA v2: [Nq]
  int64_t num_heads = 1;
  double scale = 1.0;
  int64_t pre_tokens = 2147483647, next_tokens = 2147483647;
  std::string input_layout = "BSH";
  int64_t num_key_value_heads = 0;
  int64_t sparse_mode = 0;
  int64_t inner_precise = 0;
  int64_t block_size = 0;
  bool softmax_lse_flag = false;

  // Quantisation arguments (spec §10), by their v1 names (v2's dequant_* map onto the
  // key_/value_antiquant_* ones, quant_*_out onto quant_scale2/offset2). key_rope_antiquant_scale
  // is reserved (unused); dequant_scale_query is refused (decision 7).
  std::optional<TensorView> dequant_scale1, quant_scale1, dequant_scale2, quant_scale2, quant_offset2;
  std::optional<TensorView> antiquant_scale, antiquant_offset, key_antiquant_scale, key_antiquant_offset,
      value_antiquant_scale, value_antiquant_offset, key_rope_antiquant_scale, dequant_scale_query;
  int64_t antiquant_mode = 0, key_antiquant_mode = 0, value_antiquant_mode = 0;

  // Outputs, allocated by the caller with the shapes of infer_attention_output_shapes().
  TensorView attention_out;  // dtype: InferAttentionShapes::attention_out_dtype
  TensorView softmax_lse;    // fp32; ignored unless softmax_lse_flag
};

struct InferAttentionShapes {
  std::vector<int64_t> attention_out, softmax_lse;  // softmax_lse is [0] when not requested
  DType attention_out_dtype = DType::F32;           // query dtype; int8 when quantised; fp16 for an int8 query
};

// Validates every rule of the op (throws ValueError/TypeError) and returns the output shapes.
InferAttentionShapes infer_attention_output_shapes(const InferAttentionParams& p);

// Computes the op into p's outputs. Extra memory: O(tile) per thread, plus the flash-decoding
// partials (a few copies of the output) for short queries.
void infer_attention(const InferAttentionParams& p);

// torch_npu._npu_reshape_and_cache: key [T, Nkv, D] and value [T, Nkv, Dv] rows written into the
// paged caches (blocknum, block_size, Nkv, D|Dv) or (blocknum, block_size, Nkv·D|Dv) at
// slot_indices (int32/int64 [T]; slot = block·block_size + offset; negative slots are skipped).
struct ReshapeAndCacheParams {
  const char* op = "_npu_reshape_and_cache";
  TensorView key, value, key_cache, value_cache, slot_indices;
};
void reshape_and_cache(const ReshapeAndCacheParams& p);

// torch_npu.npu_trans_quant_param: each fp32 scale's bits & 0xFFFFE000 (round_mode 1: rounded to
// those 19 bits first) with bit 46 set, and an optional offset clamp(round(offset), -256, 255) in
// bits 37-45; into `out` (int64, the shape of scale). offset: one value or one per scale.
void trans_quant_param(const TensorView& scale, const std::optional<TensorView>& offset, int round_mode,
                       const TensorView& out);

}  // namespace npufa
