// Flash-attention forward. One work item = (batch, query head, tile of kBq query rows); it streams
// tiles of kBk keys, skipping tiles the mask classifies as empty. Memory: O(tile) per thread.
#include "kernels/flash_fwd.h"

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

using Scratch = FwdScratch;

// One work item: (batch b, query head n, query rows [i0, i0 + kBq)).
struct FwdItem {
  template <DType T, int Isa>
  NPUFA_INLINE static void run(const AttnProblem* pp, int64_t b, int64_t n, int64_t i0, Scratch* scp) {
    const AttnProblem& p = *pp;
    Scratch& sc = *scp;
    const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
    const int64_t Dqk = p.D + p.Dr, Dv = p.Dv, nk = n / p.G;
    const int64_t rows = std::min(kBq, sp.q_len - i0);

    if (sp.kv_len == 0) {  // empty KV (spec §1.8)
      for (int64_t r = 0; r < rows; ++r) empty_kv_row<T>(p, b, n, sp.q_off + i0 + r);
      return;
    }

    const auto [Q, Kt, V, S, O, M, L] = sc.ptrs();
    const int64_t dvp = padded(Dv);
    load_rows<T>(p.q, p.D, p.qr, p.Dr, b, n, sp.q_off + i0, rows, Dqk, Q);
    std::fill(O, O + rows * dvp, 0.f);
    std::fill(M, M + rows, -INFINITY);
    std::fill(L, L + rows, 0.f);

    int64_t jlo, jhi;
    tile_key_range(p, b, i0, rows, &jlo, &jhi);
    const auto row_at = [n, i0](int64_t r) { return std::pair<int64_t, int64_t>{n, i0 + r}; };
    for (int64_t j0 = jlo / kBk * kBk; j0 < jhi; j0 += kBk) {
      const int64_t cols = std::min(kBk, sp.kv_len - j0);
      const TileClass cls = p.mask.classify(b, i0, i0 + rows, j0, j0 + cols);
      if (cls == TileClass::Empty) continue;
      // K tile transposed to [Dqk][kBk] (zero-padded), V tile to [cols][dvp], both fp32.
      load_cols_t<T>(p.k, p.D, p.kr, p.Dr, b, nk, sp.kv_off + j0, cols, Kt);
      load_rows<T>(p.v, Dv, Acc4{}, 0, b, nk, sp.kv_off + j0, cols, dvp, V);
      qk_tile(Q, Dqk, Kt, S, rows, Dqk);
      softmax_step<T>(p, sp, b, j0, cols, cls, rows, row_at, S, O, dvp, M, L);
      pv_tile(S, V, O, rows, cols, dvp);
    }

    const bool dropout = p.dropout.kind != DropoutSpec::Kind::None;
    const float inv_keep = dropout ? static_cast<float>(1.0 / p.dropout.keep_prob) : 1.f;
    for (int64_t r = 0; r < rows; ++r) finish_row<T>(p, b, n, sp.q_off + i0 + r, M[r], L[r], O + r * dvp, inv_keep);
  }
};

}  // namespace

void flash_forward(const AttnProblem& p) {
  const ItemGrid grid(p, false, p.Nq, kBq);
  if (grid.size() == 0) return;
  const int nthreads = get_num_threads();  // read once: scratch and pool agree
  std::vector<Scratch> scratch(static_cast<size_t>(nthreads));
  const auto item_fn = isa_entry<FwdItem, const AttnProblem*, int64_t, int64_t, int64_t, Scratch*>(p.dtype);
  parallel_for(grid.size(), nthreads, [&](int64_t it, int tid) {
    const ItemGrid::Item item = grid.at(it);
    Scratch& sc = scratch[static_cast<size_t>(tid)];
    if (sc.q.empty()) sc.reserve(kBq, 0, p.D + p.Dr, p.Dv, 0);
    item_fn(&p, item.b, item.head, item.row0, &sc);
  });
}

}  // namespace npufa
