// Quantisation arguments of the inference ops (spec §10; conventions in docs/inference.md): which
// pipeline a call is, the combination rules, and the dequantisation / output-quantisation parts of
// the canonical problem.
#pragma once
#include <cstdint>

#include "npufa/ops/infer_attention.h"
#include "problem/attn_problem.h"

namespace npufa {

struct QuantPlan {
  bool int8_q = false;   // full-int8 pipeline (int8 query, key, value)
  bool int8_kv = false;  // int8 key/value (antiquant or full int8)
  DType compute = DType::F32, out = DType::F32;
};

// Validates the dtypes and which quantisation arguments go together; called before the shapes.
QuantPlan plan_quant(const InferAttentionParams& p);

// What build_quant needs to know about the canonical problem.
struct QuantShape {
  int64_t B = 0, Nq = 0, Nkv = 0, D = 0, Dv = 0;
  bool packed = false;                   // TND-family layout
  bool paged = false;                    // block_table given
  int64_t blocknum = 0, block_size = 0;  // paged pools
  int64_t max_pos = 0;                   // largest KV position read + 1 (per-token scales must cover it)
};

// Wires the dequantisation of q/k/v (pr.q.dq, pr.k.dq, pr.v.dq), folds the full-int8 score scale
// into pr.scale and fills pr.out_quant.
void build_quant(const InferAttentionParams& p, const QuantPlan& qp, const QuantShape& s, AttnProblem& pr);

}  // namespace npufa
