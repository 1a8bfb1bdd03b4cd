// Sparse modes 0–8: the canonical MaskSpec against a brute-force predicate written from the
// spec table (torch_npu_attention.md §1.6), plus the tile classifier and row ranges.
#include <gtest/gtest.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <random>
#include <sstream>

#include "npufa/error.h"
#include "npufa/ops/fusion_attention.h"
#include "problem/fusion_attention.h"
#include "test_util.h"

namespace npufa {
namespace {

using test::Tensor;

enum class MaskKind { None, Explicit, Compressed };

struct MaskCase {
  bool tnd = false;
  int64_t B = 2, N = 2, Sq = 0, Skv = 0;  // dense
  std::vector<int64_t> qlens, kvlens;     // TND, per batch
  bool raw_trailing_zeros = false;        // TND: write trailing empty batches as zeros in the cumulative list
  int64_t extra_tq = 0, extra_tkv = 0;    // TND: tokens beyond the batches
  int64_t mode = 0;
  MaskKind kind = MaskKind::None;
  std::vector<int64_t> mshape;            // explicit mask shape; compressed: the shape variant
  int64_t pre = 2147483647, next = 2147483647;
  std::optional<std::vector<int64_t>> prefix;

  std::string str() const {
    std::ostringstream os;
    os << (tnd ? "TND" : "BNSD") << " mode " << mode << " mask "
       << (kind == MaskKind::None ? "none" : kind == MaskKind::Explicit ? "explicit" : "compressed") << " "
       << shape_str(mshape) << " pre " << pre << " next " << next;
    if (tnd) os << " qlens " << shape_str(qlens) << " kvlens " << shape_str(kvlens) << (raw_trailing_zeros ? " raw0" : "");
    else os << " B " << B << " N " << N << " Sq " << Sq << " Skv " << Skv;
    if (prefix) os << " prefix " << shape_str(*prefix);
    return os.str();
  }
  int64_t nb() const { return tnd ? static_cast<int64_t>(qlens.size()) : B; }
  int64_t sq(int64_t b) const { return tnd ? qlens[static_cast<size_t>(b)] : Sq; }
  int64_t skv(int64_t b) const { return tnd ? kvlens[static_cast<size_t>(b)] : Skv; }
  int64_t qoff(int64_t b) const {
    int64_t o = 0;
    for (int64_t x = 0; x < b; ++x) o += sq(x);
    return o;
  }
  int64_t kvoff(int64_t b) const {
    int64_t o = 0;
    for (int64_t x = 0; x < b; ++x) o += skv(x);
    return o;
  }
  int64_t max_sq() const { int64_t m = 0; for (int64_t b = 0; b < nb(); ++b) m = std::max(m, sq(b)); return m; }
  int64_t max_skv() const { int64_t m = 0; for (int64_t b = 0; b < nb(); ++b) m = std::max(m, skv(b)); return m; }
  int64_t first() const { for (int64_t b = 0; b < nb(); ++b) if (sq(b) > 0) return b; return -1; }
  int64_t last() const { for (int64_t b = nb(); b-- > 0;) if (sq(b) > 0) return b; return -1; }
};

// Everything a FusionAttentionParams points to.
struct Built {
  Tensor q, k, v, mask;
  FusionAttentionParams p;
};

std::unique_ptr<Built> build(const MaskCase& c, std::mt19937_64& rng) {
  auto bt = std::make_unique<Built>();
  const int64_t D = 2;
  FusionAttentionParams& p = bt->p;
  if (c.tnd) {
    int64_t tq = c.qoff(c.nb()) + c.extra_tq, tkv = c.kvoff(c.nb()) + c.extra_tkv;
    bt->q = Tensor(DType::F32, {tq, c.N, D});
    bt->k = Tensor(DType::F32, {tkv, 1, D});
    bt->v = Tensor(DType::F32, {tkv, 1, D});
    p.input_layout = "TND";
    auto cq = test::cumulative(c.qlens), ck = test::cumulative(c.kvlens);
    if (c.raw_trailing_zeros) {
      for (size_t b = c.qlens.size(); b-- > 0 && c.qlens[b] == 0 && c.kvlens[b] == 0;) cq[b] = ck[b] = 0;
    }
    p.actual_seq_qlen = cq;
    p.actual_seq_kvlen = ck;
  } else {
    bt->q = Tensor(DType::F32, {c.B, c.N, c.Sq, D});
    bt->k = Tensor(DType::F32, {c.B, 1, c.Skv, D});
    bt->v = Tensor(DType::F32, {c.B, 1, c.Skv, D});
    p.input_layout = "BNSD";
  }
  p.query = bt->q.view();
  p.key = bt->k.view();
  p.value = bt->v.view();
  p.head_num = c.N;
  p.sparse_mode = c.mode;
  p.pre_tockens = c.pre;
  p.next_tockens = c.next;
  p.prefix = c.prefix;
  if (c.kind == MaskKind::Explicit) {
    bt->mask = Tensor(DType::Bool, c.mshape);
    std::bernoulli_distribution bit(0.3);
    for (int64_t e = 0; e < bt->mask.numel(); ++e) bt->mask.bytes()[e] = bit(rng);
    if (c.mode == 5) {  // the prefix mask itself (must equal the predicate, §1.6)
      const auto& s = c.mshape;
      for (int64_t b = 0; b < s[0]; ++b)
        for (int64_t n = 0; n < s[1]; ++n)
          for (int64_t i = 0; i < s[2]; ++i)
            for (int64_t j = 0; j < s[3]; ++j)
              bt->mask.bytes()[((b * s[1] + n) * s[2] + i) * s[3] + j] =
                  j > i + c.Skv - c.Sq && j >= (*c.prefix)[static_cast<size_t>(b)];
    }
    p.atten_mask = bt->mask.view();
  } else if (c.kind == MaskKind::Compressed) {
    Tensor& m = c.mode == 6 ? test::prefix_mask3072() : test::triu2048();
    p.atten_mask = TensorView(m.data(), DType::Bool, c.mshape);
  }
  return bt;
}

// ---- brute force, from the spec ----------------------------------------------------------------

bool explicit_m(const MaskCase& c, const Tensor& m, int64_t b, int64_t n, int64_t i, int64_t j) {
  const auto& s = c.mshape;
  if (c.tnd) {
    if (s[0] == c.max_sq() && s[1] == c.max_skv()) return m.bytes()[i * s[1] + j];  // local [maxSq, maxSkv]
    return m.bytes()[(c.qoff(b) + i) * s[1] + (c.kvoff(b) + j)];                      // global [Tq, Tkv]
  }
  if (s.size() == 2) return m.bytes()[i * s[1] + j];
  const int64_t bb = s[0] == 1 ? 0 : b, nn = s[1] == 1 ? 0 : n;
  return m.bytes()[((bb * s[1] + nn) * s[2] + i) * s[3] + j];
}

bool brute_masked(const MaskCase& c, const Tensor& m, int64_t b, int64_t n, int64_t i, int64_t j) {
  if (c.kind == MaskKind::None) return false;  // note 1: no mask -> full matrix, whatever the mode
  const int64_t sq = c.sq(b), skv = c.skv(b), pre = c.pre, next = c.next;
  switch (c.mode) {
    case 0: return explicit_m(c, m, b, n, i, j) || !((j - i <= next) && (i - j <= pre));
    case 1: return explicit_m(c, m, b, n, i, j);
    case 2: return j > i;
    case 3: return j > i + (skv - sq);
    case 4:
      if (c.tnd) {  // note 2, varlen form
        const int64_t P = sq - std::max<int64_t>(skv - pre, 0), X = skv - std::max<int64_t>(sq - next, 0);
        return !((j - i <= X) && (i - j <= P));
      }
      return (j - i) - (skv - sq) > next || (i - j) + (skv - sq) > pre;
    case 5: return explicit_m(c, m, b, n, i, j) || ((j > i + skv - sq) && (j >= (*c.prefix)[static_cast<size_t>(b)]));
    case 6: return (j > i + skv - sq) && (j >= (*c.prefix)[static_cast<size_t>(b)]);
    case 7: return b == c.last() ? j > i + skv - sq + next : j > i + skv - sq;
    case 8: return b == c.first() ? j - i > skv - std::max<int64_t>(sq - next, 0) : j > i;
  }
  ADD_FAILURE() << "no predicate for mode " << c.mode;
  return false;
}

// Whether the spec's rules accept the case (§1.6 notes 5, 7, 9; §1.6 table; §2.5 prefix range).
bool spec_valid(const MaskCase& c) {
  const bool mode_ok = c.tnd ? (c.mode >= 0 && c.mode <= 8 && c.mode != 5) : (c.mode >= 0 && c.mode <= 6);
  if (!mode_ok) return false;
  if (c.kind == MaskKind::None) return true;
  const int64_t pre = c.pre, next = c.next;
  if (c.mode == 0 || c.mode == 4) {
    const int64_t S1 = c.max_sq(), S2 = c.max_skv();
    if (pre < 0 && next < 0) return false;
    if (next < 0 && (pre < -next || -next >= S2)) return false;
    if (pre < 0 && (next < -pre || -pre >= S1)) return false;
  }
  if (c.mode == 5 || c.mode == 6) {
    if (!c.prefix || static_cast<int64_t>(c.prefix->size()) < c.nb()) return false;
    for (int64_t b = 0; b < c.nb(); ++b) {
      const int64_t pf = (*c.prefix)[static_cast<size_t>(b)], sq = c.sq(b), skv = c.skv(b);
      if (sq > skv ? (pf < 0 || pf > skv) : (pf < skv - sq || pf > skv)) return false;
    }
  }
  for (int64_t b = 0; b < c.nb(); ++b) {
    const int64_t sq = c.sq(b), skv = c.skv(b);
    if (sq == 0) continue;
    if (c.tnd && c.mode == 0 && (next < 0 || skv + pre < sq)) return false;
    if (c.tnd && c.mode == 3 && sq > skv) return false;
    if (c.tnd && c.mode == 4 && (pre < 0 || sq - next > skv)) return false;
    if (c.mode == 7 && sq > skv) return false;
  }
  if (c.tnd && c.mode == 4 && next < 0 && pre + next < 0) return false;
  if (c.mode == 7 && c.last() >= 0 && (pre < c.skv(c.last()) || next > 0)) return false;
  if (c.mode == 8 && c.first() >= 0 && (pre < c.skv(c.first()) || c.sq(c.first()) - next > c.skv(c.first())))
    return false;
  return true;
}

struct Stats {
  int64_t cases = 0, invalid = 0, cells = 0, masked = 0, tiles_empty = 0, tiles_full = 0;
};

void check_case(const MaskCase& c, std::mt19937_64& rng, Stats& st) {
  SCOPED_TRACE(c.str());
  auto bt = build(c, rng);
  ++st.cases;
  if (!spec_valid(c)) {
    ++st.invalid;
    EXPECT_THROW(canonicalize_fusion_attention(bt->p, false), ValueError);
    return;
  }
  FusionAttentionCanon canon;
  try {
    canon = canonicalize_fusion_attention(bt->p, false);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "unexpected error: " << e.what();
    return;
  }
  const AttnProblem& pr = canon.problem;
  ASSERT_EQ(pr.B, c.nb());
  const MaskSpec& ms = pr.mask;
  for (int64_t b = 0; b < c.nb(); ++b) {
    const int64_t sq = c.sq(b), skv = c.skv(b);
    ASSERT_EQ(pr.seqs[static_cast<size_t>(b)].q_len, sq) << "batch " << b;
    ASSERT_EQ(pr.seqs[static_cast<size_t>(b)].kv_len, skv) << "batch " << b;
    for (int64_t n = 0; n < c.N; ++n) {
      int bad = 0;
      for (int64_t i = 0; i < sq; ++i)
        for (int64_t j = 0; j < skv; ++j) {
          const bool want = brute_masked(c, bt->mask, b, n, i, j), got = ms.masked(b, n, i, j);
          ++st.cells;
          st.masked += want;
          if (want != got && bad++ < 5)
            ADD_FAILURE() << "masked(b=" << b << ", n=" << n << ", i=" << i << ", j=" << j << ") = " << got
                          << ", spec says " << want;
        }
    }
    if (sq == 0 || skv == 0) continue;
    // Row ranges hold every kept column (and are tight without an explicit mask).
    for (int64_t n = 0; n < c.N; ++n)
      for (int64_t i = 0; i < sq; ++i) {
        int64_t lo = -1, hi = -1, first = -1, last = -1;
        ms.row_range(b, i, skv, &lo, &hi);
        ASSERT_LE(lo, hi) << "row_range(" << b << ", " << i << ")";
        for (int64_t j = 0; j < skv; ++j)
          if (!ms.masked(b, n, i, j)) {
            if (first < 0) first = j;
            last = j;
          }
        if (first < 0) continue;  // an empty range may lie anywhere
        ASSERT_TRUE(0 <= lo && hi <= skv) << "row_range(" << b << ", " << i << ") = [" << lo << ", " << hi << ")";
        EXPECT_LE(lo, first) << "row " << i << " batch " << b;
        EXPECT_GT(hi, last) << "row " << i << " batch " << b;
        if (!ms.has_explicit()) {
          EXPECT_EQ(lo, first) << "row_range not tight, row " << i << " batch " << b;
          EXPECT_EQ(hi, last + 1) << "row_range not tight, row " << i << " batch " << b;
        }
      }
    // Random tiles: Empty => nothing kept, Full => everything kept and no explicit mask.
    std::uniform_int_distribution<int64_t> ri(0, sq), rj(0, skv);
    for (int t = 0; t < 60; ++t) {
      int64_t i0 = ri(rng), i1 = ri(rng), j0 = rj(rng), j1 = rj(rng);
      if (i0 > i1) std::swap(i0, i1);
      if (j0 > j1) std::swap(j0, j1);
      if (i0 == i1) i1 = std::min(sq, i1 + 1), i0 = i1 - 1;
      if (j0 == j1) j1 = std::min(skv, j1 + 1), j0 = j1 - 1;
      const TileClass cls = ms.classify(b, i0, i1, j0, j1);
      bool any_kept = false, all_kept = true;
      for (int64_t n = 0; n < c.N; ++n)
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t j = j0; j < j1; ++j) {
            const bool m = ms.masked(b, n, i, j);
            any_kept |= !m;
            all_kept &= !m;
          }
      if (cls == TileClass::Empty) {
        ++st.tiles_empty;
        EXPECT_FALSE(any_kept) << "Empty tile with kept elements: b " << b << " [" << i0 << ", " << i1 << ") x [" << j0
                               << ", " << j1 << ")";
      }
      if (cls == TileClass::Full) {
        ++st.tiles_full;
        EXPECT_TRUE(all_kept && !ms.has_explicit()) << "Full tile with masked elements: b " << b << " [" << i0 << ", "
                                                    << i1 << ") x [" << j0 << ", " << j1 << ")";
      }
    }
  }
}

const std::vector<std::pair<int64_t, int64_t>> kDims = {{5, 5}, {4, 9}, {9, 4}, {1, 7}, {7, 1}, {70, 66}};
const std::vector<std::pair<int64_t, int64_t>> kPreNext = {
    {2147483647, 2147483647}, {2, 1}, {0, 0}, {3, -1}, {-1, 2}, {100, 0}, {1, -3}, {-2, -1}, {0, 5}, {6, -6}};

TEST(Mask, DenseNoMaskIgnoresEverything) {
  std::mt19937_64 rng(1);
  Stats st;
  for (int64_t mode = 0; mode <= 6; ++mode)
    for (auto [sq, skv] : kDims) {
      MaskCase c;
      c.Sq = sq, c.Skv = skv, c.mode = mode, c.pre = 1, c.next = 0;
      check_case(c, rng, st);
    }
  EXPECT_EQ(st.masked, 0);
  EXPECT_EQ(st.invalid, 0);
}

TEST(Mask, DenseMode0And1ExplicitMasks) {
  std::mt19937_64 rng(2);
  Stats st;
  for (int64_t mode : {0, 1})
    for (auto [sq, skv] : kDims)
      for (auto [pre, next] : kPreNext)
        for (int shape = 0; shape < 4; ++shape) {
          MaskCase c;
          c.Sq = sq, c.Skv = skv, c.mode = mode, c.pre = pre, c.next = next, c.kind = MaskKind::Explicit;
          c.mshape = shape == 0 ? std::vector<int64_t>{c.B, c.N, sq, skv}
                     : shape == 1 ? std::vector<int64_t>{c.B, 1, sq, skv}
                     : shape == 2 ? std::vector<int64_t>{1, 1, sq, skv}
                                  : std::vector<int64_t>{sq, skv};
          check_case(c, rng, st);
        }
  EXPECT_GT(st.invalid, 0);  // the negative pre/next rules were exercised
  EXPECT_GT(st.masked, 0);
  EXPECT_LT(st.masked, st.cells);
}

TEST(Mask, DenseCompressedModes234) {
  std::mt19937_64 rng(3);
  Stats st;
  for (int64_t mode : {2, 3, 4})
    for (auto [sq, skv] : kDims)
      for (auto [pre, next] : kPreNext)
        for (int shape = 0; shape < 3; ++shape) {
          if (mode != 4 && shape != 0 && pre != 2) continue;  // pre/next do not matter for 2/3
          MaskCase c;
          c.Sq = sq, c.Skv = skv, c.mode = mode, c.pre = pre, c.next = next, c.kind = MaskKind::Compressed;
          c.mshape = shape == 0 ? std::vector<int64_t>{2048, 2048}
                     : shape == 1 ? std::vector<int64_t>{1, 2048, 2048}
                                  : std::vector<int64_t>{1, 1, 2048, 2048};
          check_case(c, rng, st);
        }
  EXPECT_GT(st.tiles_empty, 0);
  EXPECT_GT(st.tiles_full, 0);
  EXPECT_GT(st.invalid, 0);
}

TEST(Mask, DensePrefixModes56) {
  std::mt19937_64 rng(4);
  Stats st;
  for (int64_t mode : {5, 6})
    for (auto [sq, skv] : kDims) {
      const int64_t lo = sq > skv ? 0 : skv - sq;
      for (int64_t pf : {lo - 1, lo, (lo + skv) / 2, skv, skv + 1}) {
        for (int shape = 0; shape < 2; ++shape) {
          MaskCase c;
          c.Sq = sq, c.Skv = skv, c.mode = mode;
          c.prefix = std::vector<int64_t>{pf, std::clamp<int64_t>(pf, lo, skv)};
          if (mode == 5) {
            if (pf < lo || pf > skv) continue;  // the explicit mask must be a valid prefix mask
            c.kind = MaskKind::Explicit;
            c.mshape = shape == 0 ? std::vector<int64_t>{c.B, c.N, sq, skv} : std::vector<int64_t>{c.B, 1, sq, skv};
          } else {
            c.kind = MaskKind::Compressed;
            c.mshape = shape == 0 ? std::vector<int64_t>{3072, 2048} : std::vector<int64_t>{1, 1, 3072, 2048};
          }
          check_case(c, rng, st);
        }
      }
    }
  EXPECT_GT(st.invalid, 0);
  EXPECT_GT(st.masked, 0);
}

TEST(Mask, DenseRejectsVarlenModes) {
  std::mt19937_64 rng(5);
  Stats st;
  for (int64_t mode : {-1, 7, 8, 9, 10}) {
    MaskCase c;
    c.Sq = 4, c.Skv = 4, c.mode = mode, c.kind = MaskKind::Compressed, c.mshape = {2048, 2048};
    check_case(c, rng, st);
  }
  EXPECT_EQ(st.invalid, 5);
}

struct Lens {
  std::vector<int64_t> q, kv;
  bool raw0 = false;
  int64_t extra = 0;
};
const std::vector<Lens> kLens = {
    {{3, 0, 5, 2}, {4, 3, 5, 6}},        // empty query batch in the middle
    {{2, 4, 0, 0}, {3, 4, 0, 0}, true},  // trailing zeros in the raw cumulative list
    {{2, 4, 0, 0}, {3, 4, 0, 0}},        // same, written as a flat cumulative tail
    {{0, 3, 4}, {0, 5, 4}},              // leading empty batch
    {{1, 66, 7}, {1, 70, 7}, false, 3},  // around the 64 tile, extra padding tokens
    {{5, 2}, {3, 6}},                    // Sq_b > Skv_b in the first batch
    {{4, 6, 3}, {4, 2, 9}},              // Sq_b > Skv_b in the middle batch
};

MaskCase tnd_case(const Lens& l, int64_t mode) {
  MaskCase c;
  c.tnd = true;
  c.N = 2;
  c.qlens = l.q;
  c.kvlens = l.kv;
  c.raw_trailing_zeros = l.raw0;
  c.extra_tq = l.extra;
  c.extra_tkv = l.extra;
  c.mode = mode;
  return c;
}

TEST(Mask, TndNoMaskIgnoresEverything) {
  std::mt19937_64 rng(6);
  Stats st;
  for (const Lens& l : kLens)
    for (int64_t mode : {0, 1, 2, 3, 4, 6, 7, 8}) {
      MaskCase c = tnd_case(l, mode);
      c.pre = 0;
      c.next = 0;
      check_case(c, rng, st);
    }
  EXPECT_EQ(st.masked, 0);
  EXPECT_EQ(st.invalid, 0);
}

TEST(Mask, TndExplicitModes01) {
  std::mt19937_64 rng(7);
  Stats st;
  for (const Lens& l : kLens)
    for (int64_t mode : {0, 1})
      for (auto [pre, next] : kPreNext)
        for (int shape = 0; shape < 3; ++shape) {
          MaskCase c = tnd_case(l, mode);
          c.pre = pre, c.next = next, c.kind = MaskKind::Explicit;
          const int64_t sumq = c.qoff(c.nb()), sumkv = c.kvoff(c.nb());
          if (shape == 0) c.mshape = {c.max_sq(), c.max_skv()};
          else if (shape == 1) c.mshape = {sumq, sumkv};
          else c.mshape = {sumq + c.extra_tq, sumkv + c.extra_tkv};
          if (shape == 2 && c.extra_tq == 0) continue;
          if (shape == 1 && c.mshape == std::vector<int64_t>{c.max_sq(), c.max_skv()}) continue;
          check_case(c, rng, st);
        }
  EXPECT_GT(st.invalid, 0);
  EXPECT_GT(st.masked, 0);
}

TEST(Mask, TndCompressedModes) {
  std::mt19937_64 rng(8);
  Stats st;
  const std::vector<std::pair<int64_t, int64_t>> pn = {
      {2147483647, 2147483647}, {2147483647, 0}, {0, 0}, {2, 1}, {3, -1}, {100, -2}, {1, 3}, {-1, 2}, {9, 9}, {70, 0}, {4, 2}};
  for (const Lens& l : kLens)
    for (int64_t mode : {2, 3, 4, 7, 8})
      for (auto [pre, next] : pn) {
        MaskCase c = tnd_case(l, mode);
        c.pre = pre, c.next = next, c.kind = MaskKind::Compressed, c.mshape = {2048, 2048};
        check_case(c, rng, st);
      }
  EXPECT_GT(st.invalid, 0);
  EXPECT_GT(st.masked, 0);
  EXPECT_GT(st.tiles_empty, 0);
  EXPECT_GT(st.tiles_full, 0);
}

TEST(Mask, TndPrefixMode6AndNoMode5) {
  std::mt19937_64 rng(9);
  Stats st;
  for (const Lens& l : kLens) {
    MaskCase c = tnd_case(l, 6);
    c.kind = MaskKind::Compressed, c.mshape = {3072, 2048};
    std::vector<int64_t> pf;
    for (int64_t b = 0; b < c.nb(); ++b) {
      const int64_t sq = c.sq(b), skv = c.skv(b), lo = sq > skv ? 0 : skv - sq;
      pf.push_back((lo + skv + 1) / 2);
    }
    c.prefix = pf;
    check_case(c, rng, st);
    pf[0] = c.skv(0) + 1;  // out of range
    c.prefix = pf;
    check_case(c, rng, st);
    MaskCase c5 = tnd_case(l, 5);
    c5.kind = MaskKind::Compressed, c5.mshape = {3072, 2048};
    check_case(c5, rng, st);  // mode 5 is not a TND mode
  }
  EXPECT_EQ(st.invalid, 2 * static_cast<int64_t>(kLens.size()));
  EXPECT_GT(st.masked, 0);
}

// The classifier must also be useful: causal tiles below the diagonal are Full, above Empty.
TEST(Mask, ClassifierSkipsAndTrustsCausalTiles) {
  MaskCase c;
  c.Sq = 256, c.Skv = 256, c.B = 1, c.N = 1, c.mode = 3, c.kind = MaskKind::Compressed, c.mshape = {2048, 2048};
  std::mt19937_64 rng(10);
  auto bt = build(c, rng);
  const auto canon = canonicalize_fusion_attention(bt->p, false);
  const MaskSpec& ms = canon.problem.mask;
  EXPECT_EQ(ms.classify(0, 0, 64, 64, 128), TileClass::Empty);
  EXPECT_EQ(ms.classify(0, 128, 192, 0, 64), TileClass::Full);
  EXPECT_EQ(ms.classify(0, 64, 128, 64, 128), TileClass::Partial);
  EXPECT_EQ(ms.classify(0, 5, 5, 0, 64), TileClass::Empty);  // no rows
}

// Explicit masks are read through their strides: a transposed view and a batch-broadcast view.
TEST(Mask, StridedExplicitMaskViews) {
  const int64_t B = 2, N = 2, Sq = 7, Skv = 5;
  MaskCase c;
  c.B = B, c.N = N, c.Sq = Sq, c.Skv = Skv, c.mode = 0, c.kind = MaskKind::None;
  std::mt19937_64 rng(12);
  auto bt = build(c, rng);
  std::vector<uint8_t> mem(static_cast<size_t>(Sq * Skv));
  std::bernoulli_distribution bit(0.4);
  for (auto& x : mem) x = bit(rng);
  // [Sq, Skv] view of [Skv][Sq] memory.
  bt->p.atten_mask = TensorView(mem.data(), DType::U8, {Sq, Skv}, {1, Sq});
  auto canon = canonicalize_fusion_attention(bt->p, false);
  int bad = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < Sq; ++i)
        for (int64_t j = 0; j < Skv; ++j) bad += canon.problem.mask.masked(b, n, i, j) != (mem[j * Sq + i] != 0);
  EXPECT_EQ(bad, 0) << "transposed view";
  // [B, N, Sq, Skv] view with stride 0 on B and N (an expanded [Sq, Skv] mask).
  bt->p.atten_mask = TensorView(mem.data(), DType::Bool, {B, N, Sq, Skv}, {0, 0, Skv, 1});
  canon = canonicalize_fusion_attention(bt->p, false);
  bad = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < Sq; ++i)
        for (int64_t j = 0; j < Skv; ++j) bad += canon.problem.mask.masked(b, n, i, j) != (mem[i * Skv + j] != 0);
  EXPECT_EQ(bad, 0) << "expanded view";
}

TEST(Mask, CompressedMaskShapeErrors) {
  std::mt19937_64 rng(11);
  for (auto [mode, shape] : std::vector<std::pair<int64_t, std::vector<int64_t>>>{
           {3, {2048, 1024}}, {2, {2, 2048, 2048}}, {6, {2048, 2048}}, {4, {3072, 2048}}, {3, {5, 5}}}) {
    MaskCase c;
    c.Sq = 5, c.Skv = 5, c.mode = mode, c.kind = MaskKind::Compressed, c.mshape = shape;
    c.prefix = std::vector<int64_t>{3, 3};
    auto bt = build(c, rng);
    EXPECT_THROW(canonicalize_fusion_attention(bt->p, false), ValueError) << c.str();
  }
  // Explicit masks of a wrong shape, and a non-bool mask.
  for (auto shape : std::vector<std::vector<int64_t>>{{5, 6}, {3, 1, 5, 5}, {2, 3, 5, 5}, {2, 5, 5}}) {
    MaskCase c;
    c.Sq = 5, c.Skv = 5, c.mode = 0, c.kind = MaskKind::Explicit, c.mshape = shape;
    auto bt = build(c, rng);
    EXPECT_THROW(canonicalize_fusion_attention(bt->p, false), ValueError) << c.str();
  }
  MaskCase c;
  c.Sq = 5, c.Skv = 5, c.mode = 0, c.kind = MaskKind::Explicit, c.mshape = {5, 5};
  auto bt = build(c, rng);
  bt->p.atten_mask->dtype = DType::F32;
  EXPECT_THROW(canonicalize_fusion_attention(bt->p, false), TypeError);
}

}  // namespace
}  // namespace npufa
