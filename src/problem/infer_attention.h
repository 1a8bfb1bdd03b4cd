// Validation and canonicalisation of the inference ops' arguments (spec §1, §5–§8, §11, §12).
#pragma once
#include <cstdint>

#include "npufa/ops/infer_attention.h"
#include "problem/attn_problem.h"

namespace npufa {

struct InferCanon {
  AttnProblem problem;  // output accessors are left empty unless with_outputs
  InferAttentionShapes shapes;
  bool lse = false;           // softmax_lse requested
  bool partial_rows = false;  // some output rows lie outside every valid query window
  int64_t fill_B = 0, fill_S = 0;  // the (b, s) extent of the output rows, for filling those
};

// Checks every rule of the op and builds the canonical problem. With with_outputs the output views
// in p are checked against the expected shapes and wired into the problem.
InferCanon canonicalize_infer_attention(const InferAttentionParams& p, bool with_outputs);

}  // namespace npufa
