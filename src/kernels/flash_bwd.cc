// Flash-attention backward (FlashAttention-2 recomputation). Spec §4.4:
//   P = exp(S - m) / l,  P' = P·keep/keep_prob,  Δ_i = dY_i·O_i,
//   dV = P'^T dY,  dP = dY V^T · keep/keep_prob,  dS = P ⊙ (dP - Δ),
//   dQ = scale · dS K,  dK = scale · dS^T Q,  dpse = mul · dS,  dsink_n = -Σ_i exp(sink_n - m_i)/l_i · Δ_i.
#include "kernels/flash_bwd.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "kernels/pse.h"
#include "kernels/tile_common.h"
#include "npufa/parallel.h"

namespace npufa {
namespace {

using namespace tile;

struct BwdScratch {
  // Q and dY tiles (row-major, padded), K/V tiles (transposed [d][kBk] and row-major K),
  // score-sized tiles, accumulators.
  std::vector<float> q, dy, kt, kr, vt, s, p, dp, t, acc_a, acc_b, m, l, delta, keep;
  void reserve(int64_t D, int64_t Dv) {
    const int64_t dp_ = padded(D), dvp = padded(Dv);
    q.resize(kBq * dp_);
    dy.resize(kBq * dvp);
    kt.resize(D * kBk);
    kr.resize(kBk * dp_);
    vt.resize(Dv * kBk);
    s.resize(kBq * kBk);
    p.resize(kBq * kBk);
    dp.resize(kBq * kBk);
    t.resize(kBk * kBk);
    acc_a.resize(kBk * std::max(dp_, dvp));
    acc_b.resize(kBk * std::max(dp_, dvp));
    m.resize(kBq);
    l.resize(kBq);
    delta.resize(kBq);
    keep.resize(kBk);
  }
};

struct Shared {
  const AttnProblem* p;
  const BwdIO* io;
  std::vector<int64_t> delta_base;  // Δ of (b, n, i) at delta[delta_base[b] + n*Sq_b + i]
  std::vector<float> delta;
  mutable std::vector<std::vector<float>> dpse_parts;  // per thread (or one shared when rows own their elements)
  bool dpse_shared = false;
};

// For one (query tile, key tile) pair: S -> P (normalised with the saved stats), P' (dropout
// applied) and dS, all [rows][kBk], zero outside the kept set. Needs sc.q, sc.kt, sc.dy, sc.vt,
// sc.m, sc.l, sc.delta loaded.
template <DType T>
NPUFA_INLINE void recompute(const AttnProblem& p, int64_t b, int64_t n, int64_t i0, int64_t rows, int64_t j0,
                            int64_t cols, TileClass cls, BwdScratch& sc, float* P, float* Pd, float* dS) {
  const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
  const int64_t dpq = padded(p.D + p.Dr), dvp = padded(p.Dv);
  const bool dropout = p.dropout.kind != DropoutSpec::Kind::None;
  const float inv_keep = dropout ? static_cast<float>(1.0 / p.dropout.keep_prob) : 1.f;
  constexpr int kV = kBk / vec::kW;
  float* S = sc.s.data();
  float* dP = sc.dp.data();
  qk_tile(sc.q.data(), dpq, sc.kt.data(), S, rows, p.D + p.Dr);
  qk_tile(sc.dy.data(), dvp, sc.vt.data(), dP, rows, p.Dv);
  for (int64_t r = 0; r < rows; ++r) {
    float* s = S + r * kBk;
    const int64_t i = i0 + r;
    finish_score_row<T>(p, sp, b, n, i, j0, cols, cls, s);
    float* pr = P + r * kBk;
    float* pd = Pd + r * kBk;
    float* ds = dS + r * kBk;
    const float* dpr = dP + r * kBk;
    const float m = sc.m[static_cast<size_t>(r)], inv_l = 1.f / sc.l[static_cast<size_t>(r)];
    const float delta = sc.delta[static_cast<size_t>(r)];
    if (m <= -FLT_MAX) {  // fully masked row (or padding): no gradient flows
      std::fill(pr, pr + kBk, 0.f);
      std::fill(pd, pd + kBk, 0.f);
      std::fill(ds, ds + kBk, 0.f);
      continue;
    }
    for (int x = 0; x < kV; ++x)
      vec::store(pr + x * vec::kW, vec::exp(vec::load(s + x * vec::kW) - m) * inv_l);
    if (dropout) {
      float* keep = sc.keep.data();
      dropout_row(p, b, n, i, j0, cols, keep);
      for (int64_t c = cols; c < kBk; ++c) keep[c] = 0.f;
      for (int x = 0; x < kV; ++x) {
        const vec::vf kv = vec::load(keep + x * vec::kW) * inv_keep;
        const vec::vf pv = vec::load(pr + x * vec::kW);
        vec::store(pd + x * vec::kW, pv * kv);
        vec::store(ds + x * vec::kW, pv * (vec::load(dpr + x * vec::kW) * kv - delta));
      }
    } else {
      for (int x = 0; x < kV; ++x) {
        const vec::vf pv = vec::load(pr + x * vec::kW);
        vec::store(pd + x * vec::kW, pv);
        vec::store(ds + x * vec::kW, pv * (vec::load(dpr + x * vec::kW) - delta));
      }
    }
  }
}

// Loads the saved statistics and Δ of rows [i0, i0+rows) of (b, n).
inline void load_row_stats(const Shared& sh, int64_t b, int64_t n, int64_t i0, int64_t rows, BwdScratch& sc) {
  const AttnProblem& p = *sh.p;
  const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
  const float* mx = static_cast<const float*>(p.smax.base);
  const float* sm = static_cast<const float*>(p.ssum.base);
  for (int64_t r = 0; r < kBq; ++r) {
    if (r < rows) {
      sc.m[static_cast<size_t>(r)] = mx[p.smax.at(b, n, sp.q_off + i0 + r, 0)];
      sc.l[static_cast<size_t>(r)] = sm[p.ssum.at(b, n, sp.q_off + i0 + r, 0)];
      sc.delta[static_cast<size_t>(r)] =
          sh.delta[static_cast<size_t>(sh.delta_base[static_cast<size_t>(b)] + n * sp.q_len + i0 + r)];
    } else {
      sc.m[static_cast<size_t>(r)] = -FLT_MAX;
      sc.l[static_cast<size_t>(r)] = 1.f;
      sc.delta[static_cast<size_t>(r)] = 0.f;
    }
  }
}

// Pass 1: (batch b, KV head nk, keys [j0, j0 + kBk)) -> dK, dV over the GQA group and all queries.
struct KvItem {
  template <DType T, int Isa>
  NPUFA_INLINE static void run(const Shared* shp, int64_t b, int64_t nk, int64_t j0, BwdScratch* scp) {
    const Shared& sh = *shp;
    const AttnProblem& p = *sh.p;
    const BwdIO& io = *sh.io;
    BwdScratch& sc = *scp;
    const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
    const int64_t cols = std::min(kBk, sp.kv_len - j0);
    const int64_t dpq = padded(p.D + p.Dr), dvp = padded(p.Dv);
    float* dK = sc.acc_a.data();
    float* dV = sc.acc_b.data();
    std::fill(dK, dK + kBk * dpq, 0.f);
    std::fill(dV, dV + kBk * dvp, 0.f);
    load_cols_t<T>(p.k, p.D, p.kr, p.Dr, b, nk, sp.kv_off + j0, cols, sc.kt.data());
    load_cols_t<T>(p.v, p.Dv, Acc4{}, 0, b, nk, sp.kv_off + j0, cols, sc.vt.data());
    int64_t ilo, ihi;
    p.mask.col_rows(b, j0, j0 + cols, sp.q_len, &ilo, &ihi);
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t n = nk * p.G + g;
      for (int64_t i0 = ilo / kBq * kBq; i0 < ihi; i0 += kBq) {
        const int64_t rows = std::min(kBq, sp.q_len - i0);
        const TileClass cls = p.mask.classify(b, i0, i0 + rows, j0, j0 + cols);
        if (cls == TileClass::Empty) continue;
        load_rows<T>(p.q, p.D, p.qr, p.Dr, b, n, sp.q_off + i0, rows, dpq, sc.q.data());
        load_rows<T>(io.dy, p.Dv, Acc4{}, 0, b, n, sp.q_off + i0, rows, dvp, sc.dy.data());
        load_row_stats(sh, b, n, i0, rows, sc);
        recompute<T>(p, b, n, i0, rows, j0, cols, cls, sc, sc.p.data(), sc.s.data(), sc.dp.data());
        // dV += P'^T dY, dK += dS^T Q (scale applied on store).
        transpose_tile(sc.s.data(), sc.t.data(), rows, cols);
        pv_tile(sc.t.data(), sc.dy.data(), dV, cols, rows, dvp);
        transpose_tile(sc.dp.data(), sc.t.data(), rows, cols);
        pv_tile(sc.t.data(), sc.q.data(), dK, cols, rows, dpq);
      }
    }
    store_rows<T>(io.dk, b, nk, sp.kv_off + j0, cols, p.D, dK, dpq, 0, p.scale);
    if (p.Dr > 0) store_rows<T>(io.dk_rope, b, nk, sp.kv_off + j0, cols, p.Dr, dK, dpq, p.D, p.scale);
    store_rows<T>(io.dv, b, nk, sp.kv_off + j0, cols, p.Dv, dV, dvp, 0, 1.f);
  }
};

// Pass 2: (batch b, query head n, rows [i0, i0 + kBq)) -> dQ, dpse, dsink.
struct QItem {
  template <DType T, int Isa>
  NPUFA_INLINE static void run(const Shared* shp, int64_t b, int64_t n, int64_t i0, BwdScratch* scp, int part,
                              double* dsink) {
    const Shared& sh = *shp;
    const AttnProblem& p = *sh.p;
    const BwdIO& io = *sh.io;
    BwdScratch& sc = *scp;
    const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
    const int64_t rows = std::min(kBq, sp.q_len - i0);
    const int64_t nk = n / p.G, dpq = padded(p.D + p.Dr), dvp = padded(p.Dv);
    float* dQ = sc.acc_a.data();
    std::fill(dQ, dQ + kBq * dpq, 0.f);
    load_rows<T>(p.q, p.D, p.qr, p.Dr, b, n, sp.q_off + i0, rows, dpq, sc.q.data());
    load_rows<T>(io.dy, p.Dv, Acc4{}, 0, b, n, sp.q_off + i0, rows, dvp, sc.dy.data());
    load_row_stats(sh, b, n, i0, rows, sc);
    float* dpse = io.dpse ? sh.dpse_parts[static_cast<size_t>(part)].data() : nullptr;
    int64_t jlo, jhi;
    tile_key_range(p, b, i0, rows, &jlo, &jhi);
    for (int64_t j0 = jlo / kBk * kBk; j0 < jhi && sp.kv_len > 0; j0 += kBk) {
      const int64_t cols = std::min(kBk, sp.kv_len - j0);
      const TileClass cls = p.mask.classify(b, i0, i0 + rows, j0, j0 + cols);
      if (cls == TileClass::Empty) continue;
      load_cols_t<T>(p.k, p.D, p.kr, p.Dr, b, nk, sp.kv_off + j0, cols, sc.kt.data());
      load_cols_t<T>(p.v, p.Dv, Acc4{}, 0, b, nk, sp.kv_off + j0, cols, sc.vt.data());
      load_rows<T>(p.k, p.D, p.kr, p.Dr, b, nk, sp.kv_off + j0, cols, dpq, sc.kr.data());
      recompute<T>(p, b, n, i0, rows, j0, cols, cls, sc, sc.p.data(), sc.s.data(), sc.dp.data());
      pv_tile(sc.dp.data(), sc.kr.data(), dQ, rows, cols, dpq);
      if (dpse) {
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) {
            const float g = sc.dp[static_cast<size_t>(r * kBk + c)];
            if (g != 0.f) dpse[pse_index(p.pse, sp, b, n, i0 + r, j0 + c)] += p.pse.mul * g;
          }
      }
    }
    if (!p.sink.empty() && sp.kv_len > 0) {
      const float sk = p.sink[static_cast<size_t>(n)];
      for (int64_t r = 0; r < rows; ++r) {
        const float m = sc.m[static_cast<size_t>(r)];
        if (m <= -FLT_MAX) continue;
        *dsink -= static_cast<double>(std::exp(sk - m) / sc.l[static_cast<size_t>(r)]) * sc.delta[static_cast<size_t>(r)];
      }
    }
    store_rows<T>(io.dq, b, n, sp.q_off + i0, rows, p.D, dQ, dpq, 0, p.scale);
    if (p.Dr > 0) store_rows<T>(io.dq_rope, b, n, sp.q_off + i0, rows, p.Dr, dQ, dpq, p.D, p.scale);
  }
};

// Δ_i = dY_i · O_i in fp32 for every row of (b, n).
struct DeltaItem {
  template <DType T, int Isa>
  NPUFA_INLINE static void run(Shared* shp, int64_t b, int64_t n) {
    Shared& sh = *shp;
    const AttnProblem& p = *sh.p;
    const BwdIO& io = *sh.io;
    const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
    const auto* dy = static_cast<const St<T>*>(io.dy.base);
    const auto* o = static_cast<const St<T>*>(io.o.base);
    float* out = sh.delta.data() + sh.delta_base[static_cast<size_t>(b)] + n * sp.q_len;
    for (int64_t i = 0; i < sp.q_len; ++i) {
      const int64_t a = io.dy.at(b, n, sp.q_off + i, 0), c = io.o.at(b, n, sp.q_off + i, 0);
      float acc = 0.f;
      for (int64_t d = 0; d < p.Dv; ++d) acc += to_f32<T>(dy[a + d * io.dy.sd]) * to_f32<T>(o[c + d * io.o.sd]);
      out[i] = acc;
    }
  }
};

}  // namespace

void flash_backward(const AttnProblem& p, const BwdIO& io) {
  Shared sh;
  sh.p = &p;
  sh.io = &io;
  int64_t total = 0;
  for (const SeqSpan& s : p.seqs) {
    sh.delta_base.push_back(total);
    total += p.Nq * s.q_len;
  }
  sh.delta.assign(static_cast<size_t>(total), 0.f);
  const int nthreads = get_num_threads();  // read once: scratch, dpse parts and pool agree

  const auto delta_fn = isa_entry<DeltaItem, Shared*, int64_t, int64_t>(p.dtype);
  parallel_for(p.B * p.Nq, nthreads, [&](int64_t it, int) { delta_fn(&sh, it / p.Nq, it % p.Nq); });

  std::vector<BwdScratch> scratch(static_cast<size_t>(nthreads));
  auto scratch_for = [&](int tid) -> BwdScratch& {
    BwdScratch& sc = scratch[static_cast<size_t>(tid)];
    if (sc.q.empty()) sc.reserve(p.D + p.Dr, p.Dv);
    return sc;
  };

  // Pass 1 items: (b, nk, key tile).
  const ItemGrid kv_grid(p, true, p.Nkv, kBk);
  const auto kv_fn = isa_entry<KvItem, const Shared*, int64_t, int64_t, int64_t, BwdScratch*>(p.dtype);
  parallel_for(kv_grid.size(), nthreads, [&](int64_t it, int tid) {
    const ItemGrid::Item item = kv_grid.at(it);
    kv_fn(&sh, item.b, item.head, item.row0, &scratch_for(tid));
  });

  // Pass 2 items: (b, n, query tile). Results must not depend on scheduling or thread count:
  // a dense pse with its own batch and row axes gets each element from exactly one item (one
  // shared accumulator); broadcast/compressed forms sum into kDpseSlots buffers, slot s taking
  // items s, s + kDpseSlots, ... in order; dsink is summed per item, then in item order.
  constexpr int64_t kDpseSlots = 4;
  int64_t slots = 0;
  if (io.dpse) {
    const PseSpec& ps = p.pse;
    sh.dpse_shared = (ps.kind == PseSpec::Kind::Dense && (ps.sb != 0 || p.B == 1) && ps.si != 0) ||
                     (ps.kind == PseSpec::Kind::Flat && ps.si != 0);
    slots = sh.dpse_shared ? 0 : kDpseSlots;
    sh.dpse_parts.assign(sh.dpse_shared ? 1 : static_cast<size_t>(kDpseSlots),
                         std::vector<float>(static_cast<size_t>(io.dpse_numel), 0.f));
  }
  const ItemGrid q_grid(p, false, p.Nq, kBq);
  const int64_t items = q_grid.size();
  std::vector<double> dsink_items(static_cast<size_t>(items), 0.0);
  const auto q_fn = isa_entry<QItem, const Shared*, int64_t, int64_t, int64_t, BwdScratch*, int, double*>(p.dtype);
  auto run_item = [&](int64_t it, int tid, int part) {
    const ItemGrid::Item item = q_grid.at(it);
    q_fn(&sh, item.b, item.head, item.row0, &scratch_for(tid), part, &dsink_items[static_cast<size_t>(it)]);
  };
  if (slots > 0)
    parallel_for(slots, nthreads, [&](int64_t slot, int tid) {
      for (int64_t it = slot; it < items; it += slots) run_item(it, tid, static_cast<int>(slot));
    });
  else
    parallel_for(items, nthreads, [&](int64_t it, int tid) { run_item(it, tid, 0); });

  if (io.dpse) {
    std::fill(io.dpse, io.dpse + io.dpse_numel, 0.f);
    for (const auto& part : sh.dpse_parts)
      for (int64_t e = 0; e < io.dpse_numel; ++e) io.dpse[e] += part[static_cast<size_t>(e)];
  }
  if (io.dsink) {
    std::vector<double> acc(static_cast<size_t>(p.Nq), 0.0);
    for (int64_t it = 0; it < items; ++it)  // item order: the same sum at any thread count
      acc[static_cast<size_t>(q_grid.at(it).head)] += dsink_items[static_cast<size_t>(it)];
    for (int64_t n = 0; n < p.Nq; ++n) io.dsink[n] = static_cast<float>(acc[static_cast<size_t>(n)]);
  }
}

}  // namespace npufa
