// Flash-decoding. Decode has few query rows and long KV: parallelism comes from splitting the keys
// into chunks, and bandwidth from reading each K/V tile once for all query rows of a GQA group.
// Each (batch, KV head, chunk) item leaves a partial (max, sum, unnormalised out) per row; a merge
// pass rescales and sums them. Extra memory: the partials, O(chunks x output).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "kernels/flash_fwd.h"
#include "kernels/tile_common.h"
#include "npufa/parallel.h"

namespace npufa {
namespace {

using namespace tile;

struct Scratch {
  std::vector<float> q, kt, v, s, o, m, l;
  void reserve(int64_t R, int64_t Dqk, int64_t Dv) {
    const int64_t rp = (R + kRb - 1) / kRb * kRb;
    q.resize((rp + kRb) * Dqk);  // each head's load pads to whole kRb rows
    kt.resize(Dqk * kBk);
    v.resize(kBk * padded(Dv));
    s.resize(rp * kBk);
    o.resize(rp * padded(Dv));
    m.resize(rp);
    l.resize(rp);
  }
};

// The decomposition: per batch, chunks of `chunk` key tiles over the keys its rows can see.
struct Plan {
  int64_t chunk = 1;                           // key tiles per item
  std::vector<int64_t> jlo, jhi, nchunks;      // per batch
  std::vector<int64_t> item_start;             // per batch: first item index (items: nk-major, then chunk)
  std::vector<int64_t> part_start;             // per batch: first float of its partials
  int64_t items = 0, part_floats = 0;
};

Plan make_plan(const AttnProblem& p, int threads) {
  Plan pl;
  const size_t B = static_cast<size_t>(p.B);
  pl.jlo.resize(B);
  pl.jhi.resize(B);
  pl.nchunks.resize(B);
  int64_t tiles = 0;
  for (size_t b = 0; b < B; ++b) {
    const SeqSpan& sp = p.seqs[b];
    int64_t lo = 0, hi = 0;
    if (sp.q_len > 0 && sp.kv_len > 0) tile_key_range(p, static_cast<int64_t>(b), 0, sp.q_len, &lo, &hi);
    lo = lo / kBk * kBk;
    pl.jlo[b] = lo;
    pl.jhi[b] = std::max(lo, hi);
    tiles += p.Nkv * ((pl.jhi[b] - lo + kBk - 1) / kBk);
  }
  // About four items per thread, each at least two tiles, so partials stay few and merging cheap.
  pl.chunk = std::max<int64_t>(2, (tiles + 4 * threads - 1) / (4 * threads));
  const int64_t dvp = padded(p.Dv);
  for (size_t b = 0; b < B; ++b) {
    const int64_t t = (pl.jhi[b] - pl.jlo[b] + kBk - 1) / kBk;
    pl.nchunks[b] = std::max<int64_t>(1, (t + pl.chunk - 1) / pl.chunk);
    pl.item_start.push_back(pl.items);
    pl.part_start.push_back(pl.part_floats);
    const int64_t rows = p.G * p.seqs[b].q_len;
    pl.items += p.Nkv * pl.nchunks[b];
    pl.part_floats += p.Nkv * pl.nchunks[b] * rows * (dvp + 2);
  }
  return pl;
}

// One item: batch b, KV head nk, chunk c. Rows r = g * q_len + i (head nk * G + g, query row i).
struct DecodeItem {
  template <DType T>
  NPUFA_INLINE static void run(const AttnProblem* pp, const Plan* plp, int64_t b, int64_t nk, int64_t c, Scratch* scp,
                               float* part) {
    const AttnProblem& p = *pp;
    const Plan& pl = *plp;
    Scratch& sc = *scp;
    const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
    const int64_t Dqk = p.D + p.Dr, Dv = p.Dv, dvp = padded(Dv), ql = sp.q_len, R = p.G * ql;
    float* Q = sc.q.data();
    float* Kt = sc.kt.data();
    float* V = sc.v.data();
    float* S = sc.s.data();
    float* O = sc.o.data();
    float* M = sc.m.data();
    float* L = sc.l.data();
    for (int64_t g = 0; g < p.G; ++g)
      load_rows<T>(p.q, p.D, p.qr, p.Dr, b, nk * p.G + g, sp.q_off, ql, Dqk, Q + g * ql * Dqk);
    const int64_t rp = (R + kRb - 1) / kRb * kRb;
    std::fill(Q + R * Dqk, Q + rp * Dqk, 0.f);  // load_rows pads per head; the row blocks need whole kRb
    std::fill(O, O + R * dvp, 0.f);
    std::fill(M, M + R, -INFINITY);
    std::fill(L, L + R, 0.f);

    const int64_t ja = pl.jlo[static_cast<size_t>(b)] + c * pl.chunk * kBk;
    const int64_t jb = std::min(pl.jhi[static_cast<size_t>(b)], ja + pl.chunk * kBk);
    const auto row_at = [&](int64_t r) { return std::pair<int64_t, int64_t>{nk * p.G + r / ql, r % ql}; };
    for (int64_t j0 = ja; j0 < jb; j0 += kBk) {
      const int64_t cols = std::min(kBk, sp.kv_len - j0);
      const TileClass cls = p.mask.classify(b, 0, ql, j0, j0 + cols);
      if (cls == TileClass::Empty) continue;
      load_cols_t<T>(p.k, p.D, p.kr, p.Dr, b, nk, sp.kv_off + j0, cols, Kt);
      load_rows<T>(p.v, Dv, Acc4{}, 0, b, nk, sp.kv_off + j0, cols, dvp, V);
      qk_tile(Q, Dqk, Kt, S, R, Dqk);
      softmax_step<T>(p, sp, b, j0, cols, cls, R, row_at, S, O, dvp, M, L);
      pv_tile(S, V, O, R, cols, dvp);
    }
    for (int64_t r = 0; r < R; ++r) {
      float* dst = part + r * (dvp + 2);
      dst[0] = M[r];
      dst[1] = L[r];
      std::copy(O + r * dvp, O + r * dvp + dvp, dst + 2);
    }
  }
};

// Merges the chunks of (batch b, KV head nk) and writes the output rows.
struct MergeItem {
  template <DType T>
  NPUFA_INLINE static void run(const AttnProblem* pp, const Plan* plp, int64_t b, int64_t nk, const float* part,
                               float* o) {
    const AttnProblem& p = *pp;
    const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
    const int64_t dvp = padded(p.Dv), ql = sp.q_len, R = p.G * ql, nc = plp->nchunks[static_cast<size_t>(b)];
    const int64_t stride_c = R * (dvp + 2);
    if (sp.kv_len == 0) {  // empty KV (spec §1.8)
      for (int64_t r = 0; r < R; ++r) empty_kv_row<T>(p, b, nk * p.G + r / ql, sp.q_off + r % ql);
      return;
    }
    for (int64_t r = 0; r < R; ++r) {
      float m = -INFINITY;
      for (int64_t c = 0; c < nc; ++c) m = std::max(m, part[c * stride_c + r * (dvp + 2)]);
      float l = 0.f;
      std::fill(o, o + dvp, 0.f);
      if (m != -INFINITY)
        for (int64_t c = 0; c < nc; ++c) {
          const float* src = part + c * stride_c + r * (dvp + 2);
          if (src[0] == -INFINITY) continue;
          const float w = std::exp(src[0] - m);
          l += src[1] * w;
          for (int64_t d = 0; d < dvp; ++d) o[d] += src[2 + d] * w;
        }
      finish_row<T>(p, b, nk * p.G + r / ql, sp.q_off + r % ql, m, l, o, 1.f);
    }
  }
};

}  // namespace

void flash_decode(const AttnProblem& p) {
  const int nthreads = get_num_threads();
  const Plan pl = make_plan(p, nthreads);
  if (pl.items == 0) return;
  std::vector<float> parts(static_cast<size_t>(pl.part_floats));
  std::vector<Scratch> scratch(static_cast<size_t>(nthreads));
  int64_t maxR = 0;
  for (const SeqSpan& s : p.seqs) maxR = std::max(maxR, p.G * s.q_len);
  const int64_t dvp = padded(p.Dv);

  // Item -> (b, nk, chunk) through the per-batch starts.
  auto locate = [&](int64_t it, int64_t* b, int64_t* nk, int64_t* c) {
    const size_t bi = static_cast<size_t>(std::upper_bound(pl.item_start.begin(), pl.item_start.end(), it) -
                                          pl.item_start.begin() - 1);
    const int64_t local = it - pl.item_start[bi];
    *b = static_cast<int64_t>(bi);
    *nk = local / pl.nchunks[bi];
    *c = local % pl.nchunks[bi];
  };
  const auto item_fn =
      isa_entry<DecodeItem, const AttnProblem*, const Plan*, int64_t, int64_t, int64_t, Scratch*, float*>(p.dtype);
  parallel_for(pl.items, nthreads, [&](int64_t it, int tid) {
    int64_t b, nk, c;
    locate(it, &b, &nk, &c);
    const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
    if (sp.q_len == 0) return;
    Scratch& sc = scratch[static_cast<size_t>(tid)];
    if (sc.q.empty()) sc.reserve(maxR, p.D + p.Dr, p.Dv);
    const int64_t R = p.G * sp.q_len;
    float* part = parts.data() + pl.part_start[static_cast<size_t>(b)] + (nk * pl.nchunks[static_cast<size_t>(b)] + c) * R * (dvp + 2);
    if (sp.kv_len == 0) {  // nothing to read: an empty partial
      for (int64_t r = 0; r < R; ++r) part[r * (dvp + 2)] = -INFINITY;
      return;
    }
    item_fn(&p, &pl, b, nk, c, &sc, part);
  });

  const auto merge_fn = isa_entry<MergeItem, const AttnProblem*, const Plan*, int64_t, int64_t, const float*, float*>(p.dtype);
  std::vector<std::vector<float>> obuf(static_cast<size_t>(nthreads), std::vector<float>(static_cast<size_t>(dvp)));
  parallel_for(p.B * p.Nkv, nthreads, [&](int64_t it, int tid) {
    const int64_t b = it / p.Nkv, nk = it % p.Nkv;
    const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
    if (sp.q_len == 0) return;
    const float* part = parts.data() + pl.part_start[static_cast<size_t>(b)] + nk * pl.nchunks[static_cast<size_t>(b)] * p.G * sp.q_len * (dvp + 2);
    merge_fn(&p, &pl, b, nk, part, obuf[static_cast<size_t>(tid)].data());
  });
}

}  // namespace npufa
