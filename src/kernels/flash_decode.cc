// Flash-decoding. Decode has few query rows and long KV: parallelism comes from splitting the keys
// into chunks, and bandwidth from reading each K/V tile once for all query rows of a GQA group.
// Each (batch, KV head, chunk) item leaves a partial (max, sum, unnormalised out) per row; a merge
// pass rescales and sums them. Extra memory: the partials, O(chunks x output).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/decode_dot.h"
#include "kernels/flash_fwd.h"
#include "kernels/tile_common.h"
#include "npufa/parallel.h"

// Declares the F16C / AVX-512 builtins used by the levels that have them (GCC declares target
// builtins once a target naming them has been seen).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,f16c")
#pragma GCC pop_options
#endif

namespace npufa {
namespace {

using namespace tile;

constexpr int64_t kDotRows = 16;
constexpr int64_t kTargetItems = 64;

using Scratch = FwdScratch;

// 16 consecutive elements of a K/V row as fp32. fp16 uses F16C's vcvtph2ps where the level has it
// (a builtin, not the intrinsic: it is expanded only once inlined into the level's entry).
template <DType T, int Isa>
NPUFA_INLINE vec::vf load16(const St<T>* x) {
  if constexpr (T == DType::I8) {
    // Written element by element: GCC 12 turns this into vpmovsxbd + vcvtdq2ps, while a vector
    // int8 -> int32 __builtin_convertvector is scalarised.
    const vec::vi w = {x[0], x[1], x[2],  x[3],  x[4],  x[5],  x[6],  x[7],
                       x[8], x[9], x[10], x[11], x[12], x[13], x[14], x[15]};
    return __builtin_convertvector(w, vec::vf);
  } else if constexpr (T == DType::F32) {
    return vec::load(x);
  } else if constexpr (T == DType::BF16) {
    return vec::bf16x16(x);
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  } else if constexpr (Isa >= kIsaV4) {
    typedef short v16hi __attribute__((vector_size(32)));
    v16hi h;
    std::memcpy(&h, x, sizeof h);
    return __builtin_ia32_vcvtph2ps512_mask(h, vec::vf{}, static_cast<unsigned short>(0xffff), 4);
  } else if constexpr (Isa >= kIsaV3) {
    typedef short v8hi __attribute__((vector_size(16)));
    typedef float v8sf __attribute__((vector_size(32)));
    v8hi lo, hi;
    std::memcpy(&lo, x, sizeof lo);
    std::memcpy(&hi, x + 8, sizeof hi);
    const v8sf a = __builtin_ia32_vcvtph2ps256(lo), b = __builtin_ia32_vcvtph2ps256(hi);
    vec::vf r;
    std::memcpy(&r, &a, 32);
    std::memcpy(reinterpret_cast<char*>(&r) + 32, &b, 32);
    return r;
#endif
  } else {
    return vec::f16x16(x);
  }
}

// Direct path, used when every K/V row is contiguous and its widths are whole vectors: rows are
// widened in registers straight from the cache (no fp32 copy of the tile). Q is [R][qld] with the
// rope part at column pad(D).
// Rows of the next tile (next_off, next_cols) are prefetched one per key (tile::prefetch_row).

// Scores of kKeys keys [c, c + kKeys) for rows [r0, r0 + kRb): kKeys x kRb independent FMA chains
// (one chain per key would wait on the FMA latency), each Q vector loaded once per kKeys keys.
constexpr int64_t kKeys = 4;
template <DType T, DType KT, int Isa, int NK>
NPUFA_INLINE void qk_direct_block(const AttnProblem& p, const St<KT>* const* k, const St<T>* const* kr, const float* Q,
                                  int64_t qld, int64_t r0, int64_t R, float* S, int64_t c) {
  using vec::vf;
  vf acc[kRb][NK] = {};
  for (int64_t d = 0; d < p.D; d += vec::kW) {
    vf kv[NK];
    for (int j = 0; j < NK; ++j) kv[j] = load16<KT, Isa>(k[j] + d);
    for (int64_t rr = 0; rr < kRb; ++rr) {
      const vf q = vec::load(Q + (r0 + rr) * qld + d);
      for (int j = 0; j < NK; ++j) acc[rr][j] += q * kv[j];
    }
  }
  for (int64_t d = 0; d < p.Dr; d += vec::kW) {
    vf kv[NK];
    for (int j = 0; j < NK; ++j) kv[j] = load16<T, Isa>(kr[j] + d);
    for (int64_t rr = 0; rr < kRb; ++rr) {
      const vf q = vec::load(Q + (r0 + rr) * qld + p.D + d);
      for (int j = 0; j < NK; ++j) acc[rr][j] += q * kv[j];
    }
  }
  for (int64_t rr = 0; rr < kRb && r0 + rr < R; ++rr)
    for (int j = 0; j < NK; ++j) S[(r0 + rr) * kBk + c + j] = vec::hsum(acc[rr][j]);
}

template <DType T, DType KT, int Isa>
NPUFA_INLINE void qk_direct(const AttnProblem& p, int64_t b, int64_t nk, int64_t off, int64_t cols, const float* Q,
                            int64_t qld, int64_t R, float* S, int64_t next_off, int64_t next_cols) {
  for (int64_t c = 0; c < cols; c += kKeys) {
    const int64_t nkeys = std::min(kKeys, cols - c);
    const St<KT>* k[kKeys];
    const St<T>* kr[kKeys] = {};
    for (int64_t j = 0; j < nkeys; ++j) {
      if (c + j < next_cols) {
        prefetch_row<KT>(kv_row<KT>(p.k, b, nk, next_off + c + j).p, p.D);
        prefetch_row<KT>(kv_row<KT>(p.v, b, nk, next_off + c + j).p, p.Dv);
      }
      k[j] = kv_row<KT>(p.k, b, nk, off + c + j).p;
      if (p.Dr) kr[j] = kv_row<T>(p.kr, b, nk, off + c + j).p;
    }
    for (int64_t r0 = 0; r0 < R; r0 += kRb) {
      if (nkeys == kKeys)
        qk_direct_block<T, KT, Isa, kKeys>(p, k, kr, Q, qld, r0, R, S, c);
      else
        for (int64_t j = 0; j < nkeys; ++j) qk_direct_block<T, KT, Isa, 1>(p, k + j, kr + j, Q, qld, r0, R, S, c + j);
    }
  }
}

// O[r][d0 .. d0 + 16·NV) += Σ_c P[r][c] · V[c] for rows [r0, r0 + kRb), V rows read in place.
template <DType T, int Isa, int NV>
NPUFA_INLINE void pv_direct_block(const AttnProblem& p, int64_t b, int64_t nk, int64_t off, int64_t cols,
                                  const float* P, float* O, int64_t dvp, int64_t r0, int64_t d0) {  // dvp: O's row stride
  using vec::vf;
  vf acc[kRb][NV];
  for (int64_t rr = 0; rr < kRb; ++rr)
    for (int x = 0; x < NV; ++x) acc[rr][x] = vec::load(O + (r0 + rr) * dvp + d0 + x * vec::kW);
  for (int64_t c = 0; c < cols; ++c) {
    const St<T>* v = kv_row<T>(p.v, b, nk, off + c).p + d0;
    vf vv[NV];
    for (int x = 0; x < NV; ++x) vv[x] = load16<T, Isa>(v + x * vec::kW);
    for (int64_t rr = 0; rr < kRb; ++rr) {
      const float pc = P[(r0 + rr) * kBk + c];
      for (int x = 0; x < NV; ++x) acc[rr][x] += pc * vv[x];
    }
  }
  for (int64_t rr = 0; rr < kRb; ++rr)
    for (int x = 0; x < NV; ++x) vec::store(O + (r0 + rr) * dvp + d0 + x * vec::kW, acc[rr][x]);
}

template <DType T, int Isa>
NPUFA_INLINE void pv_direct(const AttnProblem& p, int64_t b, int64_t nk, int64_t off, int64_t cols, const float* P,
                            float* O, int64_t dvp, int64_t ost, int64_t R) {
  for (int64_t r0 = 0; r0 < R; r0 += kRb)
    for (int64_t d0 = 0; d0 < dvp; d0 += 4 * vec::kW) {
      switch ((dvp - d0) / vec::kW) {
        case 1: pv_direct_block<T, Isa, 1>(p, b, nk, off, cols, P, O, ost, r0, d0); break;
        case 2: pv_direct_block<T, Isa, 2>(p, b, nk, off, cols, P, O, ost, r0, d0); break;
        case 3: pv_direct_block<T, Isa, 3>(p, b, nk, off, cols, P, O, ost, r0, d0); break;
        default: pv_direct_block<T, Isa, 4>(p, b, nk, off, cols, P, O, ost, r0, d0); break;
      }
    }
}

// int8 K/V with per-channel (or per-tensor) scale s and offset o, folded so the tiles stay int8:
// q·((x + o)·s) = (q·s)·x + (q·s)·o, and Σ p·(x + o)·s = s·(Σ p·x + (Σ p)·o).
struct Folded {
  const float *ks = nullptr, *ko = nullptr, *vs = nullptr, *vo = nullptr;  // per channel of KV head nk
  float kc_s = 1.f, kc_o = 0.f, vc_s = 1.f, vc_o = 0.f;                   // Const factors
  // Channels [d, d + 16) of a factor (D and Dv are whole vectors on the direct path).
  static vec::vf at(const float* ch, float c, int64_t d) { return ch ? vec::load(ch + d) : vec::splat(c); }
};
Folded folded_of(const AttnProblem& p, int64_t nk) {
  const auto ch = [](const Factor& f, int64_t off) { return f.kind == Factor::Kind::Channel ? f.ch.data() + off : nullptr; };
  Folded f;
  f.ks = ch(p.k.dq.scale, nk * p.k.dq.width), f.ko = ch(p.k.dq.offset, nk * p.k.dq.width);
  f.vs = ch(p.v.dq.scale, nk * p.v.dq.width), f.vo = ch(p.v.dq.offset, nk * p.v.dq.width);
  f.kc_s = p.k.dq.scale.value, f.kc_o = p.k.dq.offset.value, f.vc_s = p.v.dq.scale.value, f.vc_o = p.v.dq.offset.value;
  return f;
}

bool direct_ok(const AttnProblem& p) {
  const auto whole = [](int64_t n) { return n % vec::kW == 0; };
  const auto unit = [](const Acc4& a) { return a.sd == 1 && (!a.pbase || a.psd == 1); };
  const auto foldable = [](const Dequant& q) {  // per-row factors are read the buffered way
    return q.scale.kind != Factor::Kind::Row && q.offset.kind != Factor::Kind::Row;
  };
  return whole(p.D) && whole(p.Dv) && whole(p.Dr) && unit(p.k) && unit(p.v) && (p.Dr == 0 || unit(p.kr)) &&
         p.k.dq.on == p.v.dq.on && (!p.k.dq.on || (foldable(p.k.dq) && foldable(p.v.dq)));
}

// The decomposition: per batch, chunks of `chunk` key tiles over the keys its rows can see.
struct Plan {
  int64_t chunk = 1;                           // key tiles per item
  std::vector<int64_t> jlo, jhi, nchunks;      // per batch
  std::vector<int64_t> item_start;             // per batch: first item index (items: nk-major, then chunk)
  std::vector<int64_t> part_start;             // per batch: first float of its partials
  int64_t items = 0, part_floats = 0;
  bool direct = false;  // K/V rows widened in registers (direct_ok)

  // Item -> (batch, KV head, chunk) through the per-batch starts.
  void locate(int64_t it, int64_t* b, int64_t* nk, int64_t* c) const {
    const size_t bi = static_cast<size_t>(std::upper_bound(item_start.begin(), item_start.end(), it) -
                                          item_start.begin() - 1);
    const int64_t local = it - item_start[bi];
    *b = static_cast<int64_t>(bi);
    *nk = local / nchunks[bi];
    *c = local % nchunks[bi];
  }
  // Keys [*ja, *jb) of chunk c of batch b.
  void keys(int64_t b, int64_t c, int64_t* ja, int64_t* jb) const {
    *ja = jlo[static_cast<size_t>(b)] + c * chunk * kBk;
    *jb = std::min(jhi[static_cast<size_t>(b)], *ja + chunk * kBk);
  }
};

Plan make_plan(const AttnProblem& p) {
  Plan pl;
  pl.direct = direct_ok(p);
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
  // About kTargetItems items of at least two tiles: enough for any pool we run on, few partials to
  // merge, and independent of the thread count, so results are too.
  pl.chunk = std::max<int64_t>(2, (tiles + kTargetItems - 1) / kTargetItems);
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

#if NPUFA_DOT_BUILTINS
// The first key tile of an item (cols == 0: none), for the prefetch that runs ahead of it.
struct NextTile {
  int64_t b = 0, nk = 0, off = 0, cols = 0;  // off: the tile's first key row in the cache's sequence
};
NextTile next_tile(const AttnProblem& p, const Plan& pl, int64_t item) {
  NextTile t;
  if (item < 0) return t;
  int64_t c, ja, jb;
  pl.locate(item, &t.b, &t.nk, &c);
  pl.keys(t.b, c, &ja, &jb);
  t.off = p.seqs[static_cast<size_t>(t.b)].kv_off + ja;
  t.cols = std::min(kBk, jb - ja);  // make_plan keeps [ja, jb) inside the keys (empty without queries)
  return t;
}

// Row pointers of one key tile, padded with the zero row to whole blocks of 4 keys.
template <DType KT, DType RT>
struct TileRows {
  const St<KT>* k[kBk];
  const St<KT>* v[kBk];
  const St<RT>* kr[kBk];
  int64_t j0 = -1;  // the tile held (key index), -1: none
  void fill(const AttnProblem& p, int64_t b, int64_t nk, int64_t off, int64_t tile, int64_t n) {
    const auto* zk = reinterpret_cast<const St<KT>*>(dot::kZeroRow);
    const auto* zr = reinterpret_cast<const St<RT>*>(dot::kZeroRow);
    j0 = tile;
    kv_rows2<KT>(p.k, p.v, b, nk, off, n, k, v);
    for (int64_t c = n; c < kBk; ++c) k[c] = v[c] = zk;
    if (p.Dr) {  // kr is only read with a rope part
      kv_rows<RT>(p.kr, b, nk, off, n, kr);
      for (int64_t c = n; c < kBk; ++c) kr[c] = zr;
    }
  }
};

// The key tiles [ja, jb) of one decode item on the dot-product level (decode_dot.h). Q16 holds the
// item's rows as words (whole blocks of kRb rows); int8: scaled by aff, and O's column dvp collects
// Σ p for the offset of V.
template <DType T, DType KT, class RowAt>
NPUFA_INLINE void dot_tiles(const AttnProblem& p, const SeqSpan& sp, int64_t b, int64_t nk, int64_t ja, int64_t jb,
                            const NextTile& nt, int64_t R, RowAt row_at, const short* q16, const dot::RowAffine* aff,
                            float* S, short* p16, float* O, int64_t ost, float* M, float* L) {
  constexpr bool i8 = KT == DType::I8;
  using Acc = std::conditional_t<i8, dot::v16i, vec::vf>;
  const int64_t dq = p.D + p.Dr, dvp = padded(p.Dv);
  alignas(64) float pw[kDotRows];
  TileRows<KT, T> rows[2];
  int cur = 0;
  for (int64_t j0 = ja; j0 < jb; j0 += kBk) {
    const int64_t cols = std::min(kBk, sp.kv_len - j0);
    const TileClass cls = p.mask.classify(b, 0, sp.q_len, j0, j0 + cols);
    if (cls == TileClass::Empty) continue;
    TileRows<KT, T>& t = rows[cur];
    if (t.j0 != j0) t.fill(p, b, nk, sp.kv_off + j0, j0, cols);
    TileRows<KT, T>& nx = rows[cur ^ 1];  // the next tile, prefetched during this one
    int64_t next_cols = j0 + kBk < jb ? std::min(kBk, jb - j0 - kBk) : 0;
    if (next_cols > 0) {
      nx.fill(p, b, nk, sp.kv_off + j0 + kBk, j0 + kBk, next_cols);
    } else if (nt.cols > 0) {  // the last tile: prefetch the first tile of this thread's next item
      nx.fill(p, nt.b, nt.nk, nt.off, -1, nt.cols);
      next_cols = nt.cols;
    }
    const auto qk = [&]<int DC>() {
      dot::qk<KT, T, DC>(q16, dq, p.D, p.Dr, t.k, t.kr, R, cols, p.scale, S, aff, nx.k, next_cols);
    };
    switch (p.Dr ? 0 : p.D) {  // the common head sizes (no rope part) with D known when compiling
      case 64: qk.template operator()<64>(); break;
      case 128: qk.template operator()<128>(); break;
      case 256: qk.template operator()<256>(); break;
      default: qk.template operator()<0>(); break;
    }
    dot::softmax_words<T, i8>(p, sp, b, j0, cols, cls, R, row_at, S, p16, pw, O, ost, dvp, M, L);
    dot::pv<KT, Acc>(p16, t.v, (cols + 1) / 2 * 2, R, p.Dv, O, ost, pw, nx.v, next_cols);
    cur ^= 1;
  }
}
#endif

// One item: batch b, KV head nk, chunk c. Rows r = g * q_len + i (head nk * G + g, query row i).
struct DecodeItem {
  static constexpr bool kDotIsa = true;  // compiled for the dot-product level too
  template <DType T, int Isa>
  NPUFA_INLINE static void run(const AttnProblem* pp, const Plan* plp, int64_t b, int64_t nk, int64_t c,
                               [[maybe_unused]] int64_t next, Scratch* scp, float* part) {
    const AttnProblem& p = *pp;
    const Plan& pl = *plp;
    Scratch& sc = *scp;
    const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
    const int64_t Dqk = p.D + p.Dr, dqp = padded(Dqk), Dv = p.Dv, dvp = padded(Dv), ql = sp.q_len, R = p.G * ql;
    // Few rows: K stays in rows and scores are dot products; many rows (big GQA groups or MTP):
    // the transposed tile and the register-blocked product of the prefill kernel.
    const bool dot = R <= kDotRows, direct = dot && pl.direct, i8 = p.k.dq.on;
    const int64_t qld = dot ? dqp : Dqk;
    const int64_t ost = direct && i8 ? dvp + vec::kW : dvp;  // O row stride; column dvp holds Σ p when folded
    alignas(64) float kbias[kDotRows];
    const auto [Q, Kt, V, S, O, M, L] = sc.ptrs();
    for (int64_t g = 0; g < p.G; ++g)
      load_rows<T>(p.q, p.D, p.qr, p.Dr, b, nk * p.G + g, sp.q_off, ql, qld, Q + g * ql * qld);
    const int64_t rp = (R + kRb - 1) / kRb * kRb;
    std::fill(Q + R * qld, Q + rp * qld, 0.f);  // load_rows pads per head; the row blocks need whole kRb
    std::fill(O, O + rp * ost, 0.f);
    const Folded fo = direct && i8 ? folded_of(p, nk) : Folded{};
    if (direct && i8)  // q' = q·s_k, bias = q'·o_k (D is whole vectors here)
      for (int64_t r = 0; r < R; ++r) {
        float* qr = Q + r * qld;
        vec::vf bias = {};
        for (int64_t d = 0; d < p.D; d += vec::kW) {
          const vec::vf q = vec::load(qr + d) * Folded::at(fo.ks, fo.kc_s, d);
          vec::store(qr + d, q);
          bias += q * Folded::at(fo.ko, fo.kc_o, d);
        }
        kbias[r] = vec::hsum(bias);
      }
    std::fill(S + R * kBk, S + rp * kBk, 0.f);  // padding rows of the kRb blocks stay 0
    std::fill(M, M + R, -INFINITY);
    std::fill(L, L + R, 0.f);

    int64_t ja, jb;
    pl.keys(b, c, &ja, &jb);
    const auto row_at = [&](int64_t r) { return std::pair<int64_t, int64_t>{nk * p.G + r / ql, r % ql}; };
#if NPUFA_DOT_BUILTINS
    if constexpr (Isa >= kIsaV4Dot) {
      if (direct && dot::usable(p, i8)) {
        // Q as words (the K and V tile buffers are free here): bf16 bits, or int16 of q' / 2^e per row.
        short* q16 = reinterpret_cast<short*>(Kt);
        short* p16 = reinterpret_cast<short*>(V);
        dot::RowAffine aff;
        const int64_t dq = p.D + p.Dr;
        // int8: |Σ q·k| <= D · qmax · 128 must fit int32
        const float qmax = static_cast<float>(std::min<int64_t>(32767, INT32_MAX / (128 * p.D)));
        for (int64_t r = 0; r < rp; ++r) {
          const float* qr = Q + r * qld;
          short* w = q16 + r * dq;
          if (!i8) {
            dot::bf16_words(qr, dq, w);  // exact: Q is bf16
            continue;
          }
          vec::vf m = {};
          for (int64_t d = 0; d < p.D; d += vec::kW) m = vec::vmax(m, vec::vmax(vec::load(qr + d), -vec::load(qr + d)));
          const float mx = vec::hmax(m);
          int e = 0;
          if (mx > 0.f && std::frexp(mx / qmax, &e) == 0.5f) --e;  // smallest 2^e with mx / 2^e <= qmax
          dot::int16_words(qr, p.D, std::ldexp(1.f, -e), w);
          const float qs = std::ldexp(p.scale, e), qb = r < R ? kbias[r] * p.scale : 0.f;
          for (int j = 0; j < 4; ++j) {
            aff.scale[r / kRb][(r % kRb) * 4 + j] = qs;
            aff.bias[r / kRb][(r % kRb) * 4 + j] = qb;
          }
        }
        std::fill(p16, p16 + rp * kBk, short{0});
        const NextTile nt = next_tile(p, pl, next);
        if (i8)
          dot_tiles<T, DType::I8>(p, sp, b, nk, ja, jb, nt, R, row_at, q16, &aff, S, p16, O, ost, M, L);
        else
          dot_tiles<T, T>(p, sp, b, nk, ja, jb, nt, R, row_at, q16, &aff, S, p16, O, ost, M, L);
        write_partial(p, R, O, ost, M, L, i8, fo, part);
        return;
      }
    }
#endif
    for (int64_t j0 = ja; j0 < jb; j0 += kBk) {
      const int64_t cols = std::min(kBk, sp.kv_len - j0);
      const TileClass cls = p.mask.classify(b, 0, ql, j0, j0 + cols);
      if (cls == TileClass::Empty) continue;
      const int64_t off = sp.kv_off + j0;
      if (direct) {
        const int64_t next_cols = j0 + kBk < jb ? std::min(kBk, jb - j0 - kBk) : 0;
        if (i8) {
          qk_direct<T, DType::I8, Isa>(p, b, nk, off, cols, Q, qld, R, S, off + kBk, next_cols);
          for (int64_t r = 0; r < R; ++r)
            for (int64_t cc = 0; cc < cols; ++cc) S[r * kBk + cc] += kbias[r];
          softmax_step<T>(p, sp, b, j0, cols, cls, R, row_at, S, O, ost, M, L);  // rescales Σ p too
          pv_direct<DType::I8, Isa>(p, b, nk, off, cols, S, O, dvp, ost, R);
          for (int64_t r = 0; r < R; ++r) O[r * ost + dvp] += row_sum(S + r * kBk);
        } else {
          qk_direct<T, T, Isa>(p, b, nk, off, cols, Q, qld, R, S, off + kBk, next_cols);
          softmax_step<T>(p, sp, b, j0, cols, cls, R, row_at, S, O, dvp, M, L);
          pv_direct<T, Isa>(p, b, nk, off, cols, S, O, dvp, dvp, R);
        }
        continue;
      }
      if (dot) {
        load_rows<T>(p.k, p.D, p.kr, p.Dr, b, nk, off, cols, dqp, Kt);
        qk_dot(Q, Kt, S, R, cols, dqp);
      } else {
        load_cols_t<T>(p.k, p.D, p.kr, p.Dr, b, nk, off, cols, Kt);
        qk_tile(Q, Dqk, Kt, S, R, Dqk);
      }
      load_rows<T>(p.v, Dv, Acc4{}, 0, b, nk, off, cols, dvp, V);
      softmax_step<T>(p, sp, b, j0, cols, cls, R, row_at, S, O, dvp, M, L);
      pv_tile(S, V, O, R, cols, dvp);
    }
    write_partial(p, R, O, ost, M, L, direct && i8, fo, part);
  }

  // The item's partial rows: max, sum, unnormalised out (folded int8: back from int8 space,
  // s_v·(Σ p·x + (Σ p)·o_v)).
  NPUFA_INLINE static void write_partial(const AttnProblem& p, int64_t R, const float* O, int64_t ost, const float* M,
                                         const float* L, bool folded, const Folded& fo, float* part) {
    const int64_t Dv = p.Dv, dvp = padded(Dv);
    for (int64_t r = 0; r < R; ++r) {
      float* dst = part + r * (dvp + 2);
      dst[0] = M[r];
      dst[1] = L[r];
      const float* o = O + r * ost;
      if (folded) {  // direct_ok: Dv is whole vectors
        const vec::vf sum = vec::splat(o[dvp]);
        for (int64_t d = 0; d < Dv; d += vec::kW) {
          vec::store(dst + 2 + d, Folded::at(fo.vs, fo.vc_s, d) * (vec::load(o + d) + sum * Folded::at(fo.vo, fo.vc_o, d)));
        }
      } else
        std::copy(o, o + dvp, dst + 2);
    }
  }
};

// Merges the chunks of (batch b, KV head nk) and writes the output rows.
struct MergeItem {
  template <DType T, int Isa>
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
  const Plan pl = make_plan(p);
  if (pl.items == 0) return;
  // The partials, and below each thread's scratch, live as long as the thread: decode runs once per
  // generated token, and fresh buffers cost a zero fill and page faults on every call.
  static thread_local std::vector<float> part_buf;
  if (part_buf.size() < static_cast<size_t>(pl.part_floats)) part_buf.resize(static_cast<size_t>(pl.part_floats));
  float* const parts = part_buf.data();  // the caller's buffer (inside the lambdas the name would be the worker's)
  int64_t maxR = 0;
  for (const SeqSpan& s : p.seqs) maxR = std::max(maxR, p.G * s.q_len);
  const int64_t dvp = padded(p.Dv);

  const auto item_fn = isa_entry<DecodeItem, const AttnProblem*, const Plan*, int64_t, int64_t, int64_t, int64_t,
                                 Scratch*, float*>(p.dtype);
  parallel_for_ahead(pl.items, nthreads, [&](int64_t it, int64_t next, int) {
    int64_t b, nk, c;
    pl.locate(it, &b, &nk, &c);
    const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
    if (sp.q_len == 0) return;
    static thread_local Scratch sc;
    sc.reserve(maxR, kRb, p.D + p.Dr, p.Dv, vec::kW);  // each head's Q load pads to whole kRb rows; + Σ p column
    const int64_t R = p.G * sp.q_len;
    float* part = parts + pl.part_start[static_cast<size_t>(b)] + (nk * pl.nchunks[static_cast<size_t>(b)] + c) * R * (dvp + 2);
    if (sp.kv_len == 0) {  // nothing to read: an empty partial
      for (int64_t r = 0; r < R; ++r) part[r * (dvp + 2)] = -INFINITY;
      return;
    }
    item_fn(&p, &pl, b, nk, c, next, &sc, part);
  });

  const auto merge_fn = isa_entry<MergeItem, const AttnProblem*, const Plan*, int64_t, int64_t, const float*, float*>(p.dtype);
  parallel_for(p.B * p.Nkv, nthreads, [&](int64_t it, int) {
    const int64_t b = it / p.Nkv, nk = it % p.Nkv;
    const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
    if (sp.q_len == 0) return;
    const float* part = parts + pl.part_start[static_cast<size_t>(b)] + nk * pl.nchunks[static_cast<size_t>(b)] * p.G * sp.q_len * (dvp + 2);
    static thread_local std::vector<float> obuf;
    if (obuf.size() < static_cast<size_t>(dvp)) obuf.resize(static_cast<size_t>(dvp));
    merge_fn(&p, &pl, b, nk, part, obuf.data());
  });
}

}  // namespace npufa
