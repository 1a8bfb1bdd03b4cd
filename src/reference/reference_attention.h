// Scalar float64 golden forward of the canonical AttnProblem, written from the spec
// (torch_npu_attention.md §1.4, §1.6–§1.10, §2.4, §2.5, §2.8), not from the kernels.
// For the C++ tests only: it is not part of the npufa library.
//
// Per (b, n, i) it materialises the whole score row in double precision, applies the mask
// (MaskSpec::masked), the position bias (PseSpec, formulas re-derived from §2.5), the sink
// (§1.10) and the dropout bits (npufa::dropout_keep or the external bit-packed mask, §2.4).
#pragma once
#include <cstdint>
#include <vector>

#include "problem/attn_problem.h"

namespace npufa::ref {

// Exact decoders of the storage formats (independent of src/core/convert.h).
double half_to_double(uint16_t h);
double bf16_to_double(uint16_t h);
// Element `idx` of a buffer of dtype t (F32, F16, BF16 or F64) as a double.
double load_as_double(const void* base, DType t, int64_t idx);

struct RefResult {
  int64_t B = 0, Nq = 0, Dv = 0;
  std::vector<int64_t> q_len;     // per batch
  std::vector<int64_t> row_base;  // per batch: first row of (b, n = 0, i = 0)
  std::vector<double> out;        // [row][Dv], row = row_base[b] + n * q_len[b] + i
  std::vector<double> max, sum;   // [row]

  int64_t row(int64_t b, int64_t n, int64_t i) const {
    return row_base[static_cast<size_t>(b)] + n * q_len[static_cast<size_t>(b)] + i;
  }
  double out_at(int64_t b, int64_t n, int64_t i, int64_t d) const {
    return out[static_cast<size_t>(row(b, n, i) * Dv + d)];
  }
  double max_at(int64_t b, int64_t n, int64_t i) const { return max[static_cast<size_t>(row(b, n, i))]; }
  double sum_at(int64_t b, int64_t n, int64_t i) const { return sum[static_cast<size_t>(row(b, n, i))]; }
};

// The bias of score (b, n, i, j), multiplied by PseSpec::mul, per spec §2.5 (and §3.2 for slopes).
// Alibi kinds are read on j <= i only (the problem is causal by validation).
double reference_pse(const AttnProblem& p, int64_t b, int64_t n, int64_t i, int64_t j);

// 1 = keep, 0 = drop for element (b, n, i, j) (always 1 without dropout).
int reference_keep(const AttnProblem& p, int64_t b, int64_t n, int64_t i, int64_t j);

// The golden forward. Semantics:
//   s_ij = (q_i . k_j + q_rope_i . k_rope_j) * scale + pse_ij * pse.mul, masked entries removed;
//   m = max_j s_ij, l = sum_j exp(s_ij - m) (+ exp(sink[n] - m));
//   out_i = sum_j exp(s_ij - m) / l * keep_ij / keep_prob * v_j;
//   fully masked row: out 0, max -FLT_MAX, sum +FLT_MAX; empty KV: out 0, max 0, sum 0.
RefResult reference_attention(const AttnProblem& p);

}  // namespace npufa::ref
