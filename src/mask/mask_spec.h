// MaskSpec: the resolved masking rule of one problem. Sparse-mode numbers end in the op's
// canonicalisation; here only bands (left-up coordinates), prefixes and an explicit mask remain.
#pragma once
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

namespace npufa {

inline constexpr int64_t kUnbounded = std::numeric_limits<int64_t>::max() / 4;

enum class TileClass { Empty, Full, Partial };

// kept(i, j) of batch b (local indices) =
//   (inBand(i, j) || j < prefix_b)  &&  !explicit(b, n, i, j)
// with inBand(i, j) = (j - i <= next) && (i - j <= pre).
struct MaskSpec {
  struct Band {
    int64_t pre = kUnbounded, next = kUnbounded;  // left-up anchored
    int64_t prefix = 0;                           // columns [0, prefix) are kept regardless of the band
  };
  std::vector<Band> band;  // per batch; empty means no band and no prefix anywhere

  // Explicit mask: byte != 0 means masked. Element (b, n, i, j) lives at
  // data[b*sb + n*sn + (row_off[b] + i)*si + (col_off[b] + j)*sj].
  const uint8_t* data = nullptr;
  int64_t sb = 0, sn = 0, si = 0, sj = 0;
  std::vector<int64_t> row_off, col_off;  // per batch (TND masks indexed globally), else zeros

  bool has_explicit() const { return data != nullptr; }

  bool in_band(int64_t b, int64_t i, int64_t j) const {
    if (band.empty()) return true;
    const Band& bd = band[static_cast<size_t>(b)];
    return (j - i <= bd.next && i - j <= bd.pre) || j < bd.prefix;
  }

  bool masked(int64_t b, int64_t n, int64_t i, int64_t j) const {
    if (!in_band(b, i, j)) return true;
    return data && explicit_at(b, n, i, j);
  }

  bool explicit_at(int64_t b, int64_t n, int64_t i, int64_t j) const {
    const size_t bb = static_cast<size_t>(b);
    return data[b * sb + n * sn + (row_off[bb] + i) * si + (col_off[bb] + j) * sj] != 0;
  }

  // Rows [i0, i1) x columns [j0, j1) of batch b: Empty (nothing kept), Full (everything kept,
  // no per-element test needed) or Partial.
  TileClass classify(int64_t b, int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    if (i0 >= i1 || j0 >= j1) return TileClass::Empty;
    if (band.empty()) return data ? TileClass::Partial : TileClass::Full;
    const Band& bd = band[static_cast<size_t>(b)];
    // j - i takes every value in [j0 - (i1 - 1), (j1 - 1) - i0] on the tile.
    const int64_t dmin = j0 - (i1 - 1), dmax = (j1 - 1) - i0;
    const bool band_none = dmin > bd.next || dmax < -bd.pre;
    const bool band_all = dmax <= bd.next && -dmin <= bd.pre;
    const bool prefix_all = j1 <= bd.prefix, prefix_none = j0 >= bd.prefix;
    if (band_none && prefix_none) return TileClass::Empty;
    if ((band_all || prefix_all) && !data) return TileClass::Full;
    return TileClass::Partial;
  }

  // Rows that keep some column of [j0, j1) lie in [lo, hi) (a superset with an explicit mask).
  void col_rows(int64_t b, int64_t j0, int64_t j1, int64_t sq, int64_t* lo, int64_t* hi) const {
    *lo = 0;
    *hi = sq;
    if (band.empty() || j0 >= j1) return;
    const Band& bd = band[static_cast<size_t>(b)];
    if (j0 < bd.prefix) return;  // prefix columns are kept on every row
    // kept iff i >= j - next and i <= j + pre
    int64_t l = bd.next >= kUnbounded ? 0 : j0 - bd.next;
    int64_t h = bd.pre >= kUnbounded ? sq : (j1 - 1) + bd.pre + 1;
    l = l < 0 ? 0 : (l > sq ? sq : l);
    h = h > sq ? sq : h;
    *lo = l;
    *hi = h < l ? l : h;
  }

  // Kept columns of row i lie in [lo, hi) (a superset when an explicit mask is present).
  void row_range(int64_t b, int64_t i, int64_t skv, int64_t* lo, int64_t* hi) const {
    *lo = 0;
    *hi = skv;
    if (band.empty()) return;
    const Band& bd = band[static_cast<size_t>(b)];
    int64_t l = bd.pre >= kUnbounded ? 0 : i - bd.pre;
    int64_t h = bd.next >= kUnbounded ? skv : i + bd.next + 1;
    l = l < 0 ? 0 : (l > skv ? skv : l);
    h = h > skv ? skv : h;
    if (bd.prefix > 0) {
      l = 0;
      if (h < bd.prefix) h = bd.prefix < skv ? bd.prefix : skv;
    }
    *lo = l;
    *hi = h < l ? l : h;
  }
};

}  // namespace npufa
