// Reading the position bias of (b, n, i, j) for every PseSpec kind (spec §2.5).
#pragma once
#include <cmath>

#include "core/convert.h"
#include "problem/attn_problem.h"

namespace npufa {

// The bias is usually stored in the kernel's dtype T; inference also takes other float dtypes.
template <DType T>
inline float pse_load(const PseSpec& ps, int64_t idx) {
  if (ps.dtype == T) return to_f32<T>(static_cast<const typename Storage<T>::type*>(ps.data)[idx]);
  if (ps.dtype == DType::F32) return static_cast<const float*>(ps.data)[idx];
  const uint16_t h = static_cast<const uint16_t*>(ps.data)[idx];
  return ps.dtype == DType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

// Element offset of the bias of (b, n, i, j), local indices i < Sq_b, j < Skv_b. Alibi kinds are only
// read on j <= i (validated: causal).
inline int64_t pse_index(const PseSpec& ps, const SeqSpan& sp, int64_t b, int64_t n, int64_t i, int64_t j) {
  switch (ps.kind) {
    case PseSpec::Kind::None:
      return 0;
    case PseSpec::Kind::Dense:
      return b * ps.sb + n * ps.sn + i * ps.si + j * ps.sj;
    case PseSpec::Kind::AlibiDense: {
      // The last `rows` rows of a Toeplitz bias; earlier rows read a row with the same i - j.
      const int64_t R = ps.sq - ps.rows;
      if (i >= R) return b * ps.sb + n * ps.sn + (i - R) * ps.si + j * ps.sj;
      const int64_t m = i % ps.rows;
      return b * ps.sb + n * ps.sn + m * ps.si + (j + R + m - i) * ps.sj;
    }
    case PseSpec::Kind::AlibiTnd: {
      const int64_t R = ps.cols - ps.rows, d = i - j;
      const int64_t base = b * ps.sb + n * ps.sn;
      return d >= R ? base + (d - R) * ps.si : base + (R - d) * ps.sj;
    }
    case PseSpec::Kind::Slopes:
      return b * ps.sb + n * ps.sn;
    case PseSpec::Kind::Flat: {
      // Per-batch blocks [Nq, Sq_b, Skv_b] (si != 0) or [Nq, Skv_b] (si == 0), packed.
      const int64_t rows = ps.si ? sp.q_len : 1;
      return (ps.batch_base[static_cast<size_t>(b)] + (n * rows + (ps.si ? i : 0)) * sp.kv_len + j) * ps.sj;
    }
  }
  return 0;
}

template <DType T>
inline float pse_at(const PseSpec& ps, const SeqSpan& sp, int64_t b, int64_t n, int64_t i, int64_t j) {
  if (ps.kind == PseSpec::Kind::None) return 0.f;
  if (ps.kind == PseSpec::Kind::Slopes) {  // generated alibi (pse_type 2/3, spec §3.2)
    const float slope = static_cast<const float*>(ps.data)[pse_index(ps, sp, b, n, i, j)];
    const int64_t dd = j - i + ps.diag[static_cast<size_t>(b)];
    const float dist = static_cast<float>(dd < 0 ? -dd : dd);
    return -slope * (ps.sqrt_dist ? std::sqrt(dist) : dist);
  }
  return pse_load<T>(ps, pse_index(ps, sp, b, n, i, j));
}

}  // namespace npufa
