// Pieces shared by the flash kernels: tile sizes, register-blocked micro-kernels, dropout bits,
// and the one ISA dispatch point.
#pragma once
#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/convert.h"
#include "kernels/out_quant.h"
#include "kernels/pse.h"
#include "kernels/vec.h"
#include "npufa/dropout.h"
#include "problem/attn_problem.h"

// Everything a work item runs is force-inlined into one entry per ISA level (see pick_isa).
#define NPUFA_INLINE inline __attribute__((always_inline))

namespace npufa::tile {

constexpr int64_t kBq = 64;  // query rows per work item
constexpr int64_t kBk = 64;  // keys per tile (fixed so the inner loops vectorise fully)

constexpr int64_t kRb = 4;  // query rows per register block of the micro-kernels

// Rows of V, O and gradients are padded to whole vectors.
inline int64_t padded(int64_t n) { return (n + vec::kW - 1) / vec::kW * vec::kW; }

template <DType T>
using St = typename Storage<T>::type;

// S[r][0..kBk) = Q[r] · Kt for rows [0, rows); Q rows have stride qs and Q holds whole kRb blocks
// (padding rows zero); Kt is [D][kBk].
NPUFA_INLINE void qk_tile(const float* Q, int64_t qs, const float* Kt, float* S, int64_t rows, int64_t D) {
  using vec::vf;
  constexpr int kV = kBk / vec::kW;
  for (int64_t r0 = 0; r0 < rows; r0 += kRb) {
    vf acc[kRb][kV] = {};
    for (int64_t d = 0; d < D; ++d) {
      vf kv[kV];
      for (int x = 0; x < kV; ++x) kv[x] = vec::load(Kt + d * kBk + x * vec::kW);
      for (int64_t rr = 0; rr < kRb; ++rr) {
        const float qv = Q[(r0 + rr) * qs + d];
        for (int x = 0; x < kV; ++x) acc[rr][x] += qv * kv[x];
      }
    }
    for (int64_t rr = 0; rr < kRb && r0 + rr < rows; ++rr)
      for (int x = 0; x < kV; ++x) vec::store(S + (r0 + rr) * kBk + x * vec::kW, acc[rr][x]);
  }
}

// S[r][c] = Q[r] · K[c] for rows [0, rows), keys [0, cols), with K in rows (stride dp): the
// decode form, where a few query rows make a transposed K tile not worth its transposition. Q
// (stride dp) holds whole kRb blocks; both are zero-padded to dp, a multiple of the vector width.
NPUFA_INLINE void qk_dot(const float* Q, const float* K, float* S, int64_t rows, int64_t cols, int64_t dp) {
  using vec::vf;
  for (int64_t c = 0; c < cols; ++c) {
    const float* k = K + c * dp;
    for (int64_t r0 = 0; r0 < rows; r0 += kRb) {
      vf acc[kRb] = {};
      for (int64_t d = 0; d < dp; d += vec::kW) {
        const vf kv = vec::load(k + d);
        for (int64_t rr = 0; rr < kRb; ++rr) acc[rr] += vec::load(Q + (r0 + rr) * dp + d) * kv;
      }
      for (int64_t rr = 0; rr < kRb && r0 + rr < rows; ++rr) S[(r0 + rr) * kBk + c] = vec::hsum(acc[rr]);
    }
  }
}

// O[r] += Σ_c P[r][c] · V[c] for rows [0, rows), c < cols; O and V rows have stride dvp.
NPUFA_INLINE void pv_tile(const float* P, const float* V, float* O, int64_t rows, int64_t cols, int64_t dvp) {
  using vec::vf;
  constexpr int kV = 4;
  for (int64_t r0 = 0; r0 < rows; r0 += kRb) {
    const int64_t nr = rows - r0 < kRb ? rows - r0 : kRb;
    for (int64_t d0 = 0; d0 < dvp; d0 += kV * vec::kW) {
      const int nv = static_cast<int>((dvp - d0) / vec::kW < kV ? (dvp - d0) / vec::kW : kV);
      vf acc[kRb][kV] = {};
      for (int64_t rr = 0; rr < nr; ++rr)
        for (int x = 0; x < nv; ++x) acc[rr][x] = vec::load(O + (r0 + rr) * dvp + d0 + x * vec::kW);
      for (int64_t c = 0; c < cols; ++c) {
        vf vv[kV];
        for (int x = 0; x < nv; ++x) vv[x] = vec::load(V + c * dvp + d0 + x * vec::kW);
        for (int64_t rr = 0; rr < kRb; ++rr) {
          const float pc = P[(r0 + rr) * kBk + c];
          for (int x = 0; x < nv; ++x) acc[rr][x] += pc * vv[x];
        }
      }
      for (int64_t rr = 0; rr < nr; ++rr)
        for (int x = 0; x < nv; ++x) vec::store(O + (r0 + rr) * dvp + d0 + x * vec::kW, acc[rr][x]);
    }
  }
}

// Keep bits of keys [j0, j0 + cols) of row i, as 0/1 floats.
inline void dropout_row(const AttnProblem& p, int64_t b, int64_t n, int64_t i, int64_t j0, int64_t cols, float* keep) {
  const DropoutSpec& dr = p.dropout;
  const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
  const uint64_t e0 = static_cast<uint64_t>(dr.batch_base[static_cast<size_t>(b)] + (n * sp.q_len + i) * sp.kv_len + j0);
  if (dr.kind == DropoutSpec::Kind::External) {
    for (int64_t c = 0; c < cols; ++c) {
      const uint64_t e = e0 + static_cast<uint64_t>(c);
      keep[c] = static_cast<float>((dr.mask[static_cast<int64_t>(e >> 3) * dr.mask_stride] >> (e & 7)) & 1);
    }
    return;
  }
  const uint64_t thr = dropout_threshold(dr.keep_prob);
  uint64_t blk = ~uint64_t{0};
  std::array<uint32_t, 4> w{};
  for (int64_t c = 0; c < cols; ++c) {
    const uint64_t e = e0 + static_cast<uint64_t>(c);
    if ((e >> 2) != blk) {
      blk = e >> 2;
      w = philox4x32_10({static_cast<uint32_t>(blk), static_cast<uint32_t>(blk >> 32),
                         static_cast<uint32_t>(dr.offset), static_cast<uint32_t>(dr.offset >> 32)},
                        {static_cast<uint32_t>(dr.seed), static_cast<uint32_t>(dr.seed >> 32)});
    }
    keep[c] = w[e & 3] < thr ? 1.f : 0.f;
  }
}

// Where row s of head n (batch b) lives: element offset from base (or from pbase for shared-prefix
// rows), its d-stride, and for paged sources the block and offset.
struct RowLoc {
  int64_t elem, sd;
  bool prefix;
  int64_t blk, off;
};
NPUFA_INLINE RowLoc row_loc(const Acc4& a, int64_t b, int64_t n, int64_t s) {
  if (s < 0 && a.pbase) return {(a.plen + s) * a.pss + n * a.psn, a.psd, true, 0, 0};
  if (a.table) {
    const int64_t q = a.bs_shift >= 0 ? s >> a.bs_shift : s / a.bs, off = s - q * a.bs;
    const int64_t blk = a.table[b * a.tsb + q * a.tsw];
    return {blk * a.sblk + off * a.ss + n * a.sn, a.sd, false, blk, off};
  }
  return {b * a.sb + s * a.ss + n * a.sn, a.sd, false, 0, 0};
}

// Element pointer of row s of head n (batch b) and its d-stride: dense, paged or shared prefix.
template <DType T>
struct RowRef {
  const St<T>* p;
  int64_t sd;
};
template <DType T>
NPUFA_INLINE RowRef<T> kv_row(const Acc4& a, int64_t b, int64_t n, int64_t s) {
  const RowLoc l = row_loc(a, b, n, s);
  return {static_cast<const St<T>*>(l.prefix ? a.pbase : a.base) + l.elem, l.sd};
}

// Pointers of rows [s0, s0 + n) of head n (batch b) into out[0, n): one row_loc per run of rows at a
// constant stride (a paged block, the shared prefix, a dense sequence), not one per row.
template <DType T>
NPUFA_INLINE void kv_rows(const Acc4& a, int64_t b, int64_t n, int64_t s0, int64_t count, const St<T>** out) {
  for (int64_t c = 0; c < count;) {
    const int64_t s = s0 + c;
    const RowLoc l = row_loc(a, b, n, s);
    int64_t run = count - c;
    if (l.prefix)
      run = std::min(run, -s);
    else if (a.table)
      run = std::min(run, a.bs - l.off);
    const St<T>* p0 = static_cast<const St<T>*>(l.prefix ? a.pbase : a.base) + l.elem;
    const int64_t step = l.prefix ? a.pss : a.ss;
    for (int64_t i = 0; i < run; ++i) out[c + i] = p0 + i * step;
    c += run;
  }
}

// kv_rows of two sources over the same rows (the K and V of one cache) into out and out2: when both
// are read through the same block table with the same block size, one row_loc serves both.
template <DType T>
NPUFA_INLINE void kv_rows2(const Acc4& a, const Acc4& a2, int64_t b, int64_t n, int64_t s0, int64_t count,
                           const St<T>** out, const St<T>** out2) {
  if (!a.table || a.pbase || a2.pbase || a.table != a2.table || a.tsb != a2.tsb || a.tsw != a2.tsw || a.bs != a2.bs) {
    kv_rows<T>(a, b, n, s0, count, out);
    kv_rows<T>(a2, b, n, s0, count, out2);
    return;
  }
  for (int64_t c = 0; c < count;) {
    const RowLoc l = row_loc(a, b, n, s0 + c);
    const int64_t run = std::min(count - c, a.bs - l.off);
    const St<T>* p0 = static_cast<const St<T>*>(a.base) + l.elem;
    const St<T>* p1 = static_cast<const St<T>*>(a2.base) + l.blk * a2.sblk + l.off * a2.ss + n * a2.sn;
    for (int64_t i = 0; i < run; ++i) {
      out[c + i] = p0 + i * a.ss;
      out2[c + i] = p1 + i * a2.ss;
    }
    c += run;
  }
}

// The cache lines of a row of w elements, into L2, for a tile still to come: the hardware
// prefetcher does not run far enough ahead over short block-sized streams, and a whole tile's worth
// at once overflows the miss queues, so callers spread these over the current tile's work.
template <DType T>
NPUFA_INLINE void prefetch_row(const St<T>* x, int64_t w) {
  constexpr int64_t kLine = 64 / sizeof(St<T>);
  for (int64_t e = 0; e < w; e += kLine) __builtin_prefetch(x + e, 0, 2);
}

inline float load_f32(const void* data, DType t, int64_t i) {
  switch (t) {
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(data)[i]);
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(data)[i]);
    default: return static_cast<const float*>(data)[i];
  }
}

// A Row factor's value for row s of head n, batch b (paged ones by the row's block and offset).
inline float row_factor(const Factor& f, int64_t b, int64_t n, int64_t s, const RowLoc& l) {
  const int64_t i = f.paged ? l.blk * f.sblk + n * f.sn + l.off * f.soff : b * f.sb + n * f.sn + s * f.ss;
  return load_f32(f.data, f.dtype, i);
}

// Elements [x0, x0 + w) of row s of an int8 source dequantised, (x + offset) · scale, into d[0, w).
constexpr int64_t kMaxDequantRow = 256;
NPUFA_INLINE void dequant_row(const Acc4& a, int64_t b, int64_t n, int64_t s, int64_t x0, int64_t w, float* d) {
  const RowLoc l = row_loc(a, b, n, s);
  const int8_t* x = static_cast<const int8_t*>(a.base) + l.elem + x0 * l.sd;
  const Dequant& q = a.dq;
  const float so = q.offset.kind == Factor::Kind::Row ? row_factor(q.offset, b, n, s, l) : q.offset.value;
  const float ss = q.scale.kind == Factor::Kind::Row ? row_factor(q.scale, b, n, s, l) : q.scale.value;
  const float* co = q.offset.kind == Factor::Kind::Channel ? q.offset.ch.data() + n * q.width + x0 : nullptr;
  const float* cs = q.scale.kind == Factor::Kind::Channel ? q.scale.ch.data() + n * q.width + x0 : nullptr;
  for (int64_t e = 0; e < w; ++e) {
    const float v = static_cast<float>(x[e * l.sd]) + (co ? co[e] : so);
    d[e] = v * (cs ? cs[e] : ss);
  }
}

// Rows [off, off + rows) of head n into dst [.][ld]: columns [0, w) from a, then [w, w + wr) from
// ar (the rope part of q/k, when wr > 0); zero-padded to whole kRb row blocks and to ld columns.
template <DType T>
NPUFA_INLINE void load_rows(const Acc4& a, int64_t w, const Acc4& ar, int64_t wr, int64_t b, int64_t n, int64_t off,
                            int64_t rows, int64_t ld, float* dst) {
  const int64_t rows_p = (rows + kRb - 1) / kRb * kRb;
  for (int64_t r = 0; r < rows_p; ++r) {
    float* d = dst + r * ld;
    if (r >= rows) {
      std::fill(d, d + ld, 0.f);
      continue;
    }
    if (a.dq.on) {
      dequant_row(a, b, n, off + r, 0, w, d);
    } else if (const RowRef<T> x0 = kv_row<T>(a, b, n, off + r); x0.sd == 1)
      for (int64_t x = 0; x < w; ++x) d[x] = to_f32<T>(x0.p[x]);
    else
      for (int64_t x = 0; x < w; ++x) d[x] = to_f32<T>(x0.p[x * x0.sd]);
    if (wr > 0) {
      const RowRef<T> xr = kv_row<T>(ar, b, n, off + r);
      for (int64_t x = 0; x < wr; ++x) d[w + x] = to_f32<T>(xr.p[x * xr.sd]);
    }
    std::fill(d + w + wr, d + ld, 0.f);
  }
}

// Key rows [off, off + cols) of head n transposed into dst [w + wr][kBk] (zero-padded columns).
template <DType T>
NPUFA_INLINE void load_cols_t(const Acc4& a, int64_t w, const Acc4& ar, int64_t wr, int64_t b, int64_t n,
                              int64_t off, int64_t cols, float* dst) {
  for (int64_t c = 0; c < kBk; ++c) {
    if (c >= cols) {
      for (int64_t x = 0; x < w + wr; ++x) dst[x * kBk + c] = 0.f;
      continue;
    }
    if (a.dq.on) {
      alignas(64) float row[kMaxDequantRow];
      for (int64_t x0 = 0; x0 < w; x0 += kMaxDequantRow) {
        const int64_t n0 = std::min(kMaxDequantRow, w - x0);
        dequant_row(a, b, n, off + c, x0, n0, row);
        for (int64_t x = 0; x < n0; ++x) dst[(x0 + x) * kBk + c] = row[x];
      }
    } else {
      const RowRef<T> x0 = kv_row<T>(a, b, n, off + c);
      for (int64_t x = 0; x < w; ++x) dst[x * kBk + c] = to_f32<T>(x0.p[x * x0.sd]);
    }
    if (wr > 0) {
      const RowRef<T> xr = kv_row<T>(ar, b, n, off + c);
      for (int64_t x = 0; x < wr; ++x) dst[(w + x) * kBk + c] = to_f32<T>(xr.p[x * xr.sd]);
    }
  }
}

// Rows [off, off + rows) of head n from src [.][ld] columns [c0, c0 + w), times mul, into a.
template <DType T>
NPUFA_INLINE void store_rows(const Acc4& a, int64_t b, int64_t n, int64_t off, int64_t rows, int64_t w,
                             const float* src, int64_t ld, int64_t c0, float mul) {
  auto* base = static_cast<St<T>*>(a.base);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = a.at(b, n, off + r, 0);
    for (int64_t x = 0; x < w; ++x) base[o + x * a.sd] = from_f32<T>(src[r * ld + c0 + x] * mul);
  }
}

// One row of scores, in place: s = qk·scale (kScaled: the caller has scaled already), masked -> -inf,
// + pse·mul on kept positions (mask first: compressed alibi is only defined, and only readable,
// there), padding columns -> -inf.
template <DType T, bool kScaled = false>
NPUFA_INLINE void finish_score_row(const AttnProblem& p, const SeqSpan& sp, int64_t b, int64_t n, int64_t i,
                                   int64_t j0, int64_t cols, TileClass cls, float* s) {
  constexpr int kV = kBk / vec::kW;
  if constexpr (!kScaled)
    for (int x = 0; x < kV; ++x) vec::store(s + x * vec::kW, vec::load(s + x * vec::kW) * p.scale);
  if (cls == TileClass::Partial)
    for (int64_t c = 0; c < cols; ++c)
      if (p.mask.masked(b, n, i, j0 + c)) s[c] = -INFINITY;
  if (p.pse.kind != PseSpec::Kind::None)
    for (int64_t c = 0; c < cols; ++c)
      if (s[c] != -INFINITY) s[c] += p.pse.mul * pse_at<T>(p.pse, sp, b, n, i, j0 + c);
  for (int64_t c = cols; c < kBk; ++c) s[c] = -INFINITY;
}

// One key tile [j0, j0 + cols) for `rows` rows whose scores qk are in S (row stride kBk): scores
// become unnormalised probabilities in place (rounded to the input dtype, as the NPU does before
// P·V), the running max M and sum L are updated and O (row stride dvp) is rescaled. Row r is query
// row i of head n with {n, i} = row_at(r).
template <DType T, class RowAt>
NPUFA_INLINE void softmax_step(const AttnProblem& p, const SeqSpan& sp, int64_t b, int64_t j0, int64_t cols,
                               TileClass cls, int64_t rows, RowAt row_at, float* S, float* O, int64_t dvp, float* M,
                               float* L) {
  constexpr int kV = kBk / vec::kW;
  const bool dropout = p.dropout.kind != DropoutSpec::Kind::None;
  alignas(64) float keep[kBk];
  for (int64_t r = 0; r < rows; ++r) {
    float* s = S + r * kBk;
    const auto [n, i] = row_at(r);
    finish_score_row<T>(p, sp, b, n, i, j0, cols, cls, s);
    vec::vf mv = vec::load(s);
    for (int x = 1; x < kV; ++x) mv = vec::vmax(mv, vec::load(s + x * vec::kW));
    const float mx = vec::hmax(mv);
    if (mx == -INFINITY) {  // nothing kept in this row of the tile
      std::fill(s, s + kBk, 0.f);
      continue;
    }
    const float m_new = std::max(M[r], mx);
    const float alpha = std::exp(M[r] - m_new);  // 0 on the first kept tile
    M[r] = m_new;
    vec::vf sv = {};
    for (int x = 0; x < kV; ++x) {
      const vec::vf e = vec::exp(vec::load(s + x * vec::kW) - m_new);
      sv += e;
      vec::store(s + x * vec::kW, e);
    }
    L[r] = L[r] * alpha + vec::hsum(sv);
    if (alpha != 1.f) {
      float* o = O + r * dvp;
      for (int64_t d = 0; d < dvp; ++d) o[d] *= alpha;
    }
    if (dropout) {
      dropout_row(p, b, n, i, j0, cols, keep);
      for (int64_t c = 0; c < cols; ++c) s[c] *= keep[c];
    }
    if constexpr (T != DType::F32)
      for (int x = 0; x < kV; ++x) {
        const vec::vf e = vec::load(s + x * vec::kW);
        vec::store(s + x * vec::kW, T == DType::BF16 ? vec::round_bf16(e) : vec::round_f16(e));
      }
  }
}

// Σ of a row of kBk probabilities (zero past the tile end).
NPUFA_INLINE float row_sum(const float* s) {
  vec::vf a = vec::load(s);
  for (int x = 1; x < kBk / vec::kW; ++x) a += vec::load(s + x * vec::kW);
  return vec::hsum(a);
}

// Training statistics (8 copies) and the inference lse of one row, for whichever the problem has.
inline void write_row_stats(const AttnProblem& p, int64_t b, int64_t n, int64_t row, float mx, float sm, float lse) {
  if (p.smax.base) {
    float* pm = static_cast<float*>(p.smax.base) + p.smax.at(b, n, row, 0);
    float* ps = static_cast<float*>(p.ssum.base) + p.ssum.at(b, n, row, 0);
    for (int c = 0; c < 8; ++c) {
      pm[c * p.smax.sd] = mx;
      ps[c * p.ssum.sd] = sm;
    }
  }
  if (p.lse.base) static_cast<float*>(p.lse.base)[p.lse.at(b, n, row, 0)] = lse;
}

// Output row `row` (absolute) of head n: o[d] · mul in the output's dtype, quantised when the
// problem has output quantisation; o == nullptr writes zeros (never quantised).
inline void store_out_row(const AttnProblem& p, int64_t b, int64_t n, int64_t row, const float* o, float mul) {
  const int64_t base = p.out.at(b, n, row, 0), sd = p.out.sd;
  switch (p.out_dtype) {
    case DType::I8: {
      int8_t* ob = static_cast<int8_t*>(p.out.base) + base;
      if (!o)
        for (int64_t d = 0; d < p.Dv; ++d) ob[d * sd] = 0;
      else
        quantise_row(p.out_quant, n, p.Dv, o, mul, ob, sd);
      return;
    }
    case DType::F32: {
      float* ob = static_cast<float*>(p.out.base) + base;
      for (int64_t d = 0; d < p.Dv; ++d) ob[d * sd] = o ? o[d] * mul : 0.f;
      return;
    }
    case DType::F16: {
      uint16_t* ob = static_cast<uint16_t*>(p.out.base) + base;
      for (int64_t d = 0; d < p.Dv; ++d) ob[d * sd] = o ? f32_to_f16(o[d] * mul) : 0;
      return;
    }
    default: {
      uint16_t* ob = static_cast<uint16_t*>(p.out.base) + base;
      for (int64_t d = 0; d < p.Dv; ++d) ob[d * sd] = o ? f32_to_bf16(o[d] * mul) : 0;
      return;
    }
  }
}

// Output row `row` (absolute) of head n from the running max m, sum l and unnormalised o:
// out = o·mul / (l + sink term). A row that kept nothing is 0 with max -FLT_MAX, sum +FLT_MAX and
// lse -FLT_MAX, always (decision 4).
template <DType T>
NPUFA_INLINE void finish_row(const AttnProblem& p, int64_t b, int64_t n, int64_t row, float m, float l, const float* o,
                             float mul) {
  if (m == -INFINITY) {
    store_out_row(p, b, n, row, nullptr, 0.f);
    write_row_stats(p, b, n, row, -FLT_MAX, FLT_MAX, -FLT_MAX);
    return;
  }
  if (!p.sink.empty()) l += std::exp(p.sink[static_cast<size_t>(n)] - m);  // the sink only widens the denominator (§1.10)
  store_out_row(p, b, n, row, o, mul / l);
  write_row_stats(p, b, n, row, m, l, m + std::log(l));
}

// Output rows of a batch with no key at all: 0; training stats 0 (spec §1.8), lse -FLT_MAX.
template <DType T>
NPUFA_INLINE void empty_kv_row(const AttnProblem& p, int64_t b, int64_t n, int64_t row) {
  store_out_row(p, b, n, row, nullptr, 0.f);
  write_row_stats(p, b, n, row, 0.f, 0.f, -FLT_MAX);
}

// Per-thread buffers of the forward kernels for up to `rows` query rows: Q rows (with `extra` spare
// rows), a K tile (transposed [Dqk][kBk] or in rows [kBk][pad(Dqk)]), a V tile, scores, the output
// accumulator (rows of pad(Dv) + `ocols` floats) and the running max and sum.
struct FwdScratch {
  std::vector<float> q, kt, v, s, o, m, l;
  void reserve(int64_t rows, int64_t extra, int64_t Dqk, int64_t Dv, int64_t ocols) {
    const int64_t rp = (rows + kRb - 1) / kRb * kRb;
    q.resize((rp + extra) * padded(Dqk));
    kt.resize(padded(Dqk) * kBk);
    v.resize(kBk * padded(Dv));
    s.resize(rp * kBk);
    o.resize(rp * (padded(Dv) + ocols));
    m.resize(rp);
    l.resize(rp);
  }
  // {Q, K tile, V tile, scores, accumulator, max, sum}
  std::array<float*, 7> ptrs() { return {q.data(), kt.data(), v.data(), s.data(), o.data(), m.data(), l.data()}; }
};

// Keys any of rows [i0, i0 + rows) can see lie in [*lo, *hi) (bands are monotone in the row).
inline void tile_key_range(const AttnProblem& p, int64_t b, int64_t i0, int64_t rows, int64_t* lo, int64_t* hi) {
  const int64_t skv = p.seqs[static_cast<size_t>(b)].kv_len;
  int64_t l0, h0, l1, h1;
  p.mask.row_range(b, i0, skv, &l0, &h0);
  p.mask.row_range(b, i0 + rows - 1, skv, &l1, &h1);
  *lo = std::min(l0, l1);
  *hi = std::max(h0, h1);
}

// Work items (batch, head, tile) in batch order, tiles of `tile` rows over per-batch lengths
// (query or key lengths): the shared indexing of every kernel's parallel loop.
class ItemGrid {
 public:
  struct Item {
    int64_t b, head, row0;
  };
  ItemGrid(const AttnProblem& p, bool over_keys, int64_t heads, int64_t tile) : tile_(tile) {
    start_.assign(static_cast<size_t>(p.B) + 1, 0);
    for (int64_t b = 0; b < p.B; ++b) {
      const SeqSpan& s = p.seqs[static_cast<size_t>(b)];
      tiles_.push_back(((over_keys ? s.kv_len : s.q_len) + tile - 1) / tile);
      start_[static_cast<size_t>(b) + 1] = start_[static_cast<size_t>(b)] + tiles_.back() * heads;
    }
  }
  int64_t size() const { return start_.back(); }
  Item at(int64_t it) const {
    const size_t b = static_cast<size_t>(std::upper_bound(start_.begin(), start_.end(), it) - start_.begin() - 1);
    const int64_t local = it - start_[b];
    return {static_cast<int64_t>(b), local / tiles_[b], (local % tiles_[b]) * tile_};
  }

 private:
  int64_t tile_;
  std::vector<int64_t> start_, tiles_;
};

// Transposes a [kBk][kBk] tile (rows, cols valid) into dst.
NPUFA_INLINE void transpose_tile(const float* src, float* dst, int64_t rows, int64_t cols) {
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r) dst[c * kBk + r] = src[r * kBk + c];
}

using DTypeTag = DType;

// K::run<T, Isa>(args...) compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) or the baseline and
// chosen once at run time. (GCC 12's target_clones resolver picked the baseline on this Zen 5 CPU,
// hence by hand.)
// K::run<T, Isa> receives the level for the few places that use instructions the portable vector
// code does not reach (fp16 widening; bf16 and int16 dot products). kIsaV4Dot (x86-64-v4 with
// AVX512_BF16 and AVX512_VNNI) is compiled only for kernels that ask for it (K::kDotIsa).
constexpr int kIsaBase = 0, kIsaV3 = 3, kIsaV4 = 4, kIsaV4Dot = 5;
template <class K, DType T, class... A>
void isa_base(A... a) {
  K::template run<T, kIsaBase>(a...);
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <class K, DType T, class... A>
__attribute__((target("arch=x86-64-v4,avx512bf16,avx512vnni"))) void isa_v4dot(A... a) {
  K::template run<T, kIsaV4Dot>(a...);
}
template <class K, DType T, class... A>
__attribute__((target("arch=x86-64-v4"))) void isa_v4(A... a) {
  K::template run<T, kIsaV4>(a...);
}
template <class K, DType T, class... A>
__attribute__((target("arch=x86-64-v3"))) void isa_v3(A... a) {
  K::template run<T, kIsaV3>(a...);
}
#endif

// Highest ISA level to use: the CPU's, capped by the environment variable NPUFA_ISA
// ("avx512", "avx2" or "baseline") so tests can cover every path on one machine.
int isa_level();

template <class K, DType T, class... A>
auto pick_isa() -> void (*)(A...) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const int level = isa_level();
  if constexpr (requires { K::kDotIsa; })
    if (level >= kIsaV4Dot) return isa_v4dot<K, T, A...>;
  if (level >= kIsaV4) return isa_v4<K, T, A...>;
  if (level >= kIsaV3) return isa_v3<K, T, A...>;
#endif
  return isa_base<K, T, A...>;
}

// The entry of K for dtype t (F32, F16 or BF16), resolved once per K.
template <class K, class... A>
auto isa_entry(DType t) -> void (*)(A...) {
  static const auto f32 = pick_isa<K, DType::F32, A...>(), f16 = pick_isa<K, DType::F16, A...>(),
                    bf16 = pick_isa<K, DType::BF16, A...>();
  return t == DType::F32 ? f32 : t == DType::F16 ? f16 : bf16;
}

}  // namespace npufa::tile
