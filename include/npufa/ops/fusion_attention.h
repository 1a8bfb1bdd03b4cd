// npu_fusion_attention (training forward), torch_npu semantics. Spec: torch_npu_attention.md §1–§2.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "npufa/tensor_view.h"

namespace npufa {

// Mirrors torch_npu.npu_fusion_attention's arguments one to one, plus the caller-allocated outputs.
struct FusionAttentionParams {
  const char* op = "npu_fusion_attention";  // the name errors carry (v2/v3 entry points set theirs)
  TensorView query, key, value;
  int64_t head_num = 0;
  std::string input_layout;
  std::optional<TensorView> pse, padding_mask, atten_mask;
  double scale = 1.0;
  double keep_prob = 1.0;
  int64_t pre_tockens = 2147483647;
  int64_t next_tockens = 2147483647;
  int64_t inner_precise = 0;
  std::optional<std::vector<int64_t>> prefix, actual_seq_qlen, actual_seq_kvlen;
  int64_t sparse_mode = 0;
  std::string softmax_layout;
  std::optional<TensorView> sink;          // fp32 [head_num]
  std::optional<TensorView> dropout_mask;  // uint8, bit-packed, used as is
  int64_t seed = 0, offset = 0;            // Philox key when keep_prob < 1 and no dropout_mask

  // npu_fusion_attention_v2's additions; the defaults are v1's behaviour (spec §3).
  int64_t pse_type = 1;  // 0: qk·scale + pse, 1: (qk + pse)·scale, 2/3: alibi generated from slopes (pse)
  std::optional<std::vector<int64_t>> q_start_idx, kv_start_idx;  // one int each, for pse_type 2/3
  std::optional<TensorView> query_rope, key_rope;                 // MLA: q·k += q_rope·k_rope

  // Outputs, allocated by the caller with the shapes of fusion_attention_output_shapes().
  TensorView attention_out;              // query dtype
  TensorView softmax_max, softmax_sum;   // fp32 [B, Nq, Sq, 8] or [Tq, Nq, 8]
};

struct FusionAttentionShapes {
  std::vector<int64_t> attention_out, softmax_max, softmax_sum;
};

struct FusionAttentionResult {
  int64_t seed = 0, offset = 0, numels = 0;
};

// Validates the inputs (every torch_npu rule; throws ValueError/TypeError) and returns the shapes
// the outputs must have. Output views in `p` are not looked at.
FusionAttentionShapes fusion_attention_output_shapes(const FusionAttentionParams& p);

// Computes the op into p's output views. Extra memory is O(tile), never O(Sq*Skv).
FusionAttentionResult fusion_attention_fwd(const FusionAttentionParams& p);

}  // namespace npufa
