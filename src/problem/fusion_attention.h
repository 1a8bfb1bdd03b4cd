// Validation and canonicalisation of npu_fusion_attention's arguments (spec §1, §2).
#pragma once
#include <cstdint>
#include <vector>

#include "npufa/layout.h"
#include "npufa/ops/fusion_attention.h"
#include "kernels/flash_bwd.h"
#include "npufa/ops/fusion_attention_grad.h"
#include "problem/attn_problem.h"

namespace npufa {

struct FusionAttentionCanon {
  AttnProblem problem;             // output accessors are left empty unless with_outputs
  FusionAttentionShapes shapes;
  Layout layout = Layout::BSND;
  int64_t numels = 0;              // torch_npu's returned numels (TND: raw-list formula, §2.4)
  int64_t rows_covered = 0;        // TND: query rows [rows_covered, Tq) belong to no batch
  int64_t kv_rows_covered = 0;     // TND: key rows [kv_rows_covered, Tkv) belong to no batch
  bool stats_t_major = false;      // softmax_layout "TND"
};

// Checks every rule of the op and builds the canonical problem. With with_outputs the output
// views in p are checked against the expected shapes and wired into the problem.
FusionAttentionCanon canonicalize_fusion_attention(const FusionAttentionParams& p, bool with_outputs);

// The grad: the forward's problem (softmax statistics wired as inputs) plus the backward's views.
struct FusionAttentionGradCanon {
  FusionAttentionCanon fwd;
  BwdIO io;
};
FusionAttentionGradCanon canonicalize_fusion_attention_grad(const FusionAttentionGradParams& p);

}  // namespace npufa
