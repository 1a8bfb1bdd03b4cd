// npu_fusion_attention_grad (training backward), torch_npu semantics. Spec: torch_npu_attention.md §4.
#pragma once
#include <cstdint>
#include <optional>

#include "npufa/ops/fusion_attention.h"
#include "npufa/tensor_view.h"

namespace npufa {

// torch_npu.npu_fusion_attention_grad's arguments: the forward's (in `fwd`, with torch_npu's
// scale_value as fwd.scale; fwd's output views are not used) plus the grad's own, plus the
// caller-allocated gradients.
struct FusionAttentionGradParams {
  FusionAttentionParams fwd;
  TensorView dy;                                   // like attention_out
  std::optional<TensorView> softmax_max, softmax_sum;  // the forward's statistics (required)
  std::optional<TensorView> softmax_in;            // reserved by torch_npu, ignored
  std::optional<TensorView> attention_in;          // the forward's attention_out (required)
  int64_t numels = 0;                              // the forward's numels (checked when dropout is on)

  TensorView dq, dk, dv;                           // like query, key, value
  std::optional<TensorView> dpse;                  // like pse (contiguous), when pse is given
  std::optional<TensorView> dsink;                 // fp32 [head_num], when sink is given
  std::optional<TensorView> dq_rope, dk_rope;      // like query_rope, key_rope (v2), when given
};

// Regenerates the forward's dropout bits from (seed, offset) (or reads fwd.dropout_mask, an npufa
// extension so autograd works with an external forward mask). Extra memory O(tile + Sq).
void fusion_attention_grad(const FusionAttentionGradParams& p);

}  // namespace npufa
