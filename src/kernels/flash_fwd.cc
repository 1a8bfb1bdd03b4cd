// Flash-attention forward. One work item = (batch, query head, tile of kBq query rows); it streams
// tiles of kBk keys, skipping tiles the mask classifies as empty. Memory: O(tile) per thread.
#include "kernels/flash_fwd.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "core/convert.h"
#include "kernels/pse.h"
#include "kernels/vec.h"
#include "npufa/dropout.h"
#include "npufa/parallel.h"

// Everything a work item runs is force-inlined into one entry per ISA level (see item_fn below).
#define NPUFA_INLINE inline __attribute__((always_inline))

namespace npufa {
namespace {

constexpr int64_t kBq = 64;  // query rows per work item
constexpr int64_t kBk = 64;  // keys per tile (fixed so the inner loops vectorise fully)

constexpr int64_t kRb = 4;  // query rows per register block of the micro-kernels

// V and O rows are padded to whole vectors.
inline int64_t padded(int64_t n) { return (n + vec::kW - 1) / vec::kW * vec::kW; }

struct Scratch {
  std::vector<float> q, kt, v, s, o, m, l;
  void reserve(int64_t D, int64_t Dv) {
    q.resize(kBq * D);
    kt.resize(D * kBk);
    v.resize(kBk * padded(Dv));
    s.resize(kBq * kBk);
    o.resize(kBq * padded(Dv));
    m.resize(kBq);
    l.resize(kBq);
  }
};

// S[r][0..kBk) = Q[r] · Kt for rows [0, rows); Q holds whole kRb blocks (padding rows zero).
NPUFA_INLINE void qk_tile(const float* Q, const float* Kt, float* S, int64_t rows, int64_t D) {
  using vec::vf;
  constexpr int kV = kBk / vec::kW;
  for (int64_t r0 = 0; r0 < rows; r0 += kRb) {
    vf acc[kRb][kV] = {};
    for (int64_t d = 0; d < D; ++d) {
      vf kv[kV];
      for (int x = 0; x < kV; ++x) kv[x] = vec::load(Kt + d * kBk + x * vec::kW);
      for (int64_t rr = 0; rr < kRb; ++rr) {
        const float qv = Q[(r0 + rr) * D + d];
        for (int x = 0; x < kV; ++x) acc[rr][x] += qv * kv[x];
      }
    }
    for (int64_t rr = 0; rr < kRb && r0 + rr < rows; ++rr)
      for (int x = 0; x < kV; ++x) vec::store(S + (r0 + rr) * kBk + x * vec::kW, acc[rr][x]);
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

template <DType T>
using St = typename Storage<T>::type;

void write_stats(const AttnProblem& p, int64_t b, int64_t n, int64_t row, float mx, float sm) {
  float* pm = static_cast<float*>(p.smax.base) + p.smax.at(b, n, row, 0);
  float* ps = static_cast<float*>(p.ssum.base) + p.ssum.at(b, n, row, 0);
  for (int c = 0; c < 8; ++c) {
    pm[c * p.smax.sd] = mx;
    ps[c * p.ssum.sd] = sm;
  }
}

// Keep bits of keys [j0, j0 + cols) of row i, as 0/1 floats.
void dropout_row(const AttnProblem& p, int64_t b, int64_t n, int64_t i, int64_t j0, int64_t cols, float* keep) {
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

template <DType T>
NPUFA_INLINE void tile_item(const AttnProblem& p, int64_t b, int64_t n, int64_t i0, Scratch& sc) {
  const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
  const int64_t D = p.D, Dv = p.Dv, nk = n / p.G;
  const int64_t rows = std::min(kBq, sp.q_len - i0);
  const auto* qb = static_cast<const St<T>*>(p.q.base);
  const auto* kb = static_cast<const St<T>*>(p.k.base);
  const auto* vb = static_cast<const St<T>*>(p.v.base);
  auto* ob = static_cast<St<T>*>(p.out.base);

  if (sp.kv_len == 0) {  // empty KV: out 0, max = sum = 0 (spec §1.8)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t row = sp.q_off + i0 + r;
      for (int64_t d = 0; d < Dv; ++d) ob[p.out.at(b, n, row, d)] = from_f32<T>(0.f);
      write_stats(p, b, n, row, 0.f, 0.f);
    }
    return;
  }

  float* Q = sc.q.data();
  float* Kt = sc.kt.data();
  float* V = sc.v.data();
  float* S = sc.s.data();
  float* O = sc.o.data();
  float* M = sc.m.data();
  float* L = sc.l.data();
  const int64_t dvp = padded(Dv);
  const int64_t rows_p = (rows + kRb - 1) / kRb * kRb;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = p.q.at(b, n, sp.q_off + i0 + r, 0);
    for (int64_t d = 0; d < D; ++d) Q[r * D + d] = to_f32<T>(qb[base + d * p.q.sd]);
  }
  std::fill(Q + rows * D, Q + rows_p * D, 0.f);
  std::fill(O, O + rows * dvp, 0.f);
  std::fill(M, M + rows, -INFINITY);
  std::fill(L, L + rows, 0.f);

  // Keys any row of the tile can see.
  int64_t jlo = sp.kv_len, jhi = 0;
  for (int64_t r : {int64_t{0}, rows - 1}) {
    int64_t lo, hi;
    p.mask.row_range(b, i0 + r, sp.kv_len, &lo, &hi);
    jlo = std::min(jlo, lo);
    jhi = std::max(jhi, hi);
  }
  const bool dropout = p.dropout.kind != DropoutSpec::Kind::None;
  const bool has_pse = p.pse.kind != PseSpec::Kind::None;
  alignas(64) float keep[kBk];
  constexpr int kV = kBk / vec::kW;

  for (int64_t j0 = jlo / kBk * kBk; j0 < jhi; j0 += kBk) {
    const int64_t cols = std::min(kBk, sp.kv_len - j0);
    const TileClass cls = p.mask.classify(b, i0, i0 + rows, j0, j0 + cols);
    if (cls == TileClass::Empty) continue;

    // K tile transposed to [D][kBk] (zero-padded), V tile to [cols][dvp], both fp32.
    for (int64_t c = 0; c < kBk; ++c) {
      if (c < cols) {
        const int64_t base = p.k.at(b, nk, sp.kv_off + j0 + c, 0);
        for (int64_t d = 0; d < D; ++d) Kt[d * kBk + c] = to_f32<T>(kb[base + d * p.k.sd]);
      } else {
        for (int64_t d = 0; d < D; ++d) Kt[d * kBk + c] = 0.f;
      }
    }
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t base = p.v.at(b, nk, sp.kv_off + j0 + c, 0);
      float* vr = V + c * dvp;
      for (int64_t d = 0; d < Dv; ++d) vr[d] = to_f32<T>(vb[base + d * p.v.sd]);
      std::fill(vr + Dv, vr + dvp, 0.f);
    }

    qk_tile(Q, Kt, S, rows, D);

    // Scores -> unnormalised probabilities in place, online max/sum per row.
    for (int64_t r = 0; r < rows; ++r) {
      float* s = S + r * kBk;
      const int64_t i = i0 + r;
      for (int x = 0; x < kV; ++x) vec::store(s + x * vec::kW, vec::load(s + x * vec::kW) * p.scale);
      // Mask before pse: compressed alibi is only defined (and only readable) on kept positions.
      if (cls == TileClass::Partial)
        for (int64_t c = 0; c < cols; ++c)
          if (p.mask.masked(b, n, i, j0 + c)) s[c] = -INFINITY;
      if (has_pse)
        for (int64_t c = 0; c < cols; ++c)
          if (s[c] != -INFINITY) s[c] += p.pse.mul * pse_at<T>(p.pse, sp, b, n, i, j0 + c);
      for (int64_t c = cols; c < kBk; ++c) s[c] = -INFINITY;
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
      if constexpr (T != DType::F32)  // P in the input dtype before P·V, as the NPU does
        for (int64_t c = 0; c < cols; ++c) s[c] = round_to<T>(s[c]);
    }
    pv_tile(S, V, O, rows, cols, dvp);
  }

  const float inv_keep = dropout ? static_cast<float>(1.0 / p.dropout.keep_prob) : 1.f;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = sp.q_off + i0 + r;
    const int64_t obase = p.out.at(b, n, row, 0);
    if (M[r] == -INFINITY) {  // fully masked row: corrected always (decision 4)
      for (int64_t d = 0; d < Dv; ++d) ob[obase + d * p.out.sd] = from_f32<T>(0.f);
      write_stats(p, b, n, row, -FLT_MAX, FLT_MAX);
      continue;
    }
    float l = L[r];
    if (!p.sink.empty()) l += std::exp(p.sink[static_cast<size_t>(n)] - M[r]);  // the sink only widens the denominator (§1.10)
    const float f = inv_keep / l;
    const float* o = O + r * dvp;
    for (int64_t d = 0; d < Dv; ++d) ob[obase + d * p.out.sd] = from_f32<T>(o[d] * f);
    write_stats(p, b, n, row, M[r], l);
  }
}

using ItemFn = void (*)(const AttnProblem&, int64_t, int64_t, int64_t, Scratch&);

template <DType T>
void item_generic(const AttnProblem& p, int64_t b, int64_t n, int64_t i0, Scratch& sc) {
  tile_item<T>(p, b, n, i0, sc);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The one ISA dispatch point: the work item compiled for x86-64-v4 (AVX-512) and v3 (AVX2+FMA),
// chosen at run time. (GCC 12's target_clones resolver picks the baseline on this CPU, hence by hand.)
template <DType T>
__attribute__((target("arch=x86-64-v4"))) void item_v4(const AttnProblem& p, int64_t b, int64_t n, int64_t i0,
                                                         Scratch& sc) {
  tile_item<T>(p, b, n, i0, sc);
}
template <DType T>
__attribute__((target("arch=x86-64-v3"))) void item_v3(const AttnProblem& p, int64_t b, int64_t n, int64_t i0,
                                                         Scratch& sc) {
  tile_item<T>(p, b, n, i0, sc);
}
template <DType T>
ItemFn pick_item() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return item_v4<T>;
  if (__builtin_cpu_supports("x86-64-v3")) return item_v3<T>;
  return item_generic<T>;
}
#else
template <DType T>
ItemFn pick_item() {
  return item_generic<T>;
}
#endif

ItemFn item_for(DType t) {
  static const ItemFn f32 = pick_item<DType::F32>(), f16 = pick_item<DType::F16>(), bf16 = pick_item<DType::BF16>();
  return t == DType::F32 ? f32 : t == DType::F16 ? f16 : bf16;
}

}  // namespace

void flash_forward(const AttnProblem& p) {
  // Items in order (b, n, tile); tile_start[b] = first item of batch b.
  std::vector<int64_t> tile_start(static_cast<size_t>(p.B) + 1, 0);
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t tiles = (p.seqs[static_cast<size_t>(b)].q_len + kBq - 1) / kBq;
    tile_start[static_cast<size_t>(b) + 1] = tile_start[static_cast<size_t>(b)] + tiles * p.Nq;
  }
  const int64_t items = tile_start.back();
  if (items == 0) return;
  std::vector<Scratch> scratch(static_cast<size_t>(get_num_threads()));
  const ItemFn item_fn = item_for(p.dtype);
  parallel_for(items, [&](int64_t it, int tid) {
    const int64_t b = std::upper_bound(tile_start.begin(), tile_start.end(), it) - tile_start.begin() - 1;
    const int64_t tiles = (p.seqs[static_cast<size_t>(b)].q_len + kBq - 1) / kBq;
    const int64_t local = it - tile_start[static_cast<size_t>(b)];
    Scratch& sc = scratch[static_cast<size_t>(tid)];
    if (sc.q.empty()) sc.reserve(p.D, p.Dv);
    item_fn(p, b, local / tiles, (local % tiles) * kBq, sc);
  });
}

}  // namespace npufa
