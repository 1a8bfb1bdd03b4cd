// Decode tiles on dot-product instructions (level kIsaV4Dot: AVX512_BF16 vdpbf16ps, AVX512_VNNI
// vpdpwssd). Each instruction multiplies pairs of 16-bit words and adds both products to an fp32 or
// int32 lane, so one instruction does the work of two FMAs and nothing is widened to fp32:
// - bf16 K/V: Q and P are bf16 exactly (Q is the input; P is rounded to bf16 before P·V, as the NPU
//   does), so every product is exact in fp32.
// - int8 K/V: rows are sign-extended to int16 and multiplied in integers. Q' = q·s_k is held as
//   int16 with a power-of-two scale per row (≥ 14 significant bits of its largest element) and P as
//   int16 with a power-of-two scale per row and tile (2^14 for its largest value, so a row that sees
//   one key gets exactly that key's V row). Both errors are far below the bf16/fp16 rounding of P
//   that the NPU itself applies.
// Scores are blocks of 4 rows x 4 keys reduced together (transposed sums, not one horizontal sum per
// score). P·V takes keys in pairs: the rows of two keys are interleaved word by word, which permutes
// the lanes within each 128-bit block; the permutation is undone once per tile when the sums are
// added to O.
// The builtins are GCC's (declared below, expanded only inside the kIsaV4Dot entry). Other compilers
// keep the kIsaV4 code.
#pragma once
#include <cstring>

#include "kernels/tile_common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512bf16,avx512vnni")
#pragma GCC pop_options
#define NPUFA_DOT_BUILTINS 1
#else
#define NPUFA_DOT_BUILTINS 0
#endif

namespace npufa::tile::dot {

typedef short v32s __attribute__((vector_size(64)));  // 32 int16 or bf16 words
typedef int32_t v16i __attribute__((vector_size(64)));
typedef char v32c __attribute__((vector_size(32)));
using vec::vf;

// Widest row the zero row (standing in for keys past the tile end) covers, in elements.
constexpr int64_t kMaxWidth = 1024;
alignas(64) inline constexpr uint16_t kZeroRow[kMaxWidth] = {};

// The level can run this problem: whole 32-word chunks; int8 K/V (antiquant) without a rope part
// (which is float); not the full-int8 pipeline, whose probabilities stay fp32 (an int16 P would not
// be exact enough there).
inline bool usable(const AttnProblem& p, bool i8) {
  const auto ok = [](int64_t n) { return n % 32 == 0 && n <= kMaxWidth; };
  return ok(p.D) && ok(p.Dv) && ok(p.Dr) && (i8 ? p.Dr == 0 && !p.q.dq.on : p.dtype == DType::BF16);
}

#if NPUFA_DOT_BUILTINS
NPUFA_INLINE vf dot(vf acc, v32s a, v32s b) { return __builtin_ia32_dpbf16ps_v16sf(acc, a, b); }
NPUFA_INLINE v16i dot(v16i acc, v32s a, v32s b) {
  return __builtin_ia32_vpdpwssd_v16si(acc, reinterpret_cast<v16i>(a), reinterpret_cast<v16i>(b));
}

// 32 elements of a row as words: bf16 as they are, int8 sign-extended.
template <DType X>
NPUFA_INLINE v32s words(const St<X>* x) {
  if constexpr (X == DType::I8) {
    v32c c;
    std::memcpy(&c, x, sizeof c);
    return __builtin_ia32_pmovsxbw512_mask(c, v32s{}, 0xffffffffu);
  } else {
    v32s w;
    std::memcpy(&w, x, sizeof w);
    return w;
  }
}

// Word pairs (a[d], b[d]) of d in the low / high half of each 128-bit block.
NPUFA_INLINE v32s pairs_lo(v32s a, v32s b) {
  return __builtin_shufflevector(a, b, 0, 32, 1, 33, 2, 34, 3, 35, 8, 40, 9, 41, 10, 42, 11, 43, 16, 48, 17, 49, 18,
                                 50, 19, 51, 24, 56, 25, 57, 26, 58, 27, 59);
}
NPUFA_INLINE v32s pairs_hi(v32s a, v32s b) {
  return __builtin_shufflevector(a, b, 4, 36, 5, 37, 6, 38, 7, 39, 12, 44, 13, 45, 14, 46, 15, 47, 20, 52, 21, 53, 22,
                                 54, 23, 55, 28, 60, 29, 61, 30, 62, 31, 63);
}

// Sums of a[rr][j] (4 rows x 4 keys): lane 4·rr + j.
template <class V>
NPUFA_INLINE V reduce4x4(const V (&a)[4][4]) {
  V u[4];
  for (int rr = 0; rr < 4; ++rr) {
    const V* x = a[rr];
    const V t01 = __builtin_shufflevector(x[0], x[1], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29) +
                  __builtin_shufflevector(x[0], x[1], 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
    const V t23 = __builtin_shufflevector(x[2], x[3], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29) +
                  __builtin_shufflevector(x[2], x[3], 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31);
    // per 128-bit block: the block's share of keys 0..3
    u[rr] = __builtin_shufflevector(t01, t23, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
            __builtin_shufflevector(t01, t23, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  }
  const V A = __builtin_shufflevector(u[0], u[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
              __builtin_shufflevector(u[0], u[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  const V B = __builtin_shufflevector(u[2], u[3], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
              __builtin_shufflevector(u[2], u[3], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  return __builtin_shufflevector(A, B, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(A, B, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}

// Per-row constants of the int8 scores, lane 4·rr + j: score = int sum · scale + bias.
struct RowAffine {
  alignas(64) float scale[4][16], bias[4][16];  // per block of 4 rows
};

// S[r][c .. c + 4) for keys in blocks of 4 (k[c] rows; zero rows past the tile end), rows [0, R):
// the dot products of Q16 rows (stride dq words; the rope part at column D) with the K rows (and the
// rope rows kr). int8: int32 sums, then the row's scale and bias. K rows of the next tile (pf_k,
// n_pf of them) are prefetched a block at a time; V rows follow in P·V, so the requests are spread
// over the whole tile.
template <DType KT, DType RT, class Acc>
NPUFA_INLINE void qk(const short* q16, int64_t dq, int64_t D, int64_t Dr, const St<KT>* const* k,
                     const St<RT>* const* kr, int64_t R, int64_t cols, float* S, const RowAffine* aff,
                     const St<KT>* const* pf_k, int64_t n_pf) {
  for (int64_t c = 0; c < cols; c += 4) {
    for (int64_t j = c; j < c + 4 && j < n_pf; ++j) prefetch_row<KT>(pf_k[j], D);
    for (int64_t r0 = 0; r0 < R; r0 += kRb) {
      Acc acc[4][4] = {};
      const short* q = q16 + r0 * dq;
      for (int64_t d = 0; d < D; d += 32) {
        v32s kv[4];
        for (int j = 0; j < 4; ++j) kv[j] = words<KT>(k[c + j] + d);
        for (int rr = 0; rr < 4; ++rr) {
          v32s qv;
          std::memcpy(&qv, q + rr * dq + d, sizeof qv);
          for (int j = 0; j < 4; ++j) acc[rr][j] = dot(acc[rr][j], qv, kv[j]);
        }
      }
      for (int64_t d = 0; d < Dr; d += 32) {
        v32s kv[4];
        for (int j = 0; j < 4; ++j) kv[j] = words<RT>(kr[c + j] + d);
        for (int rr = 0; rr < 4; ++rr) {
          v32s qv;
          std::memcpy(&qv, q + rr * dq + D + d, sizeof qv);
          for (int j = 0; j < 4; ++j) acc[rr][j] = dot(acc[rr][j], qv, kv[j]);
        }
      }
      vf s;
      if constexpr (KT == DType::I8)
        s = __builtin_convertvector(reduce4x4(acc), vf) * vec::load(aff->scale[r0 / kRb]) +
            vec::load(aff->bias[r0 / kRb]);
      else
        s = reduce4x4(acc);
      for (int rr = 0; rr < 4 && r0 + rr < R; ++rr) std::memcpy(S + (r0 + rr) * kBk + c, &s[4 * rr], 4 * sizeof(float));
    }
  }
}

// O[r][d0 .. d0 + 32·NV) += Σ_c P[r][c] · V[c] for rows [r0, r0 + 4) ∩ [0, R), keys in pairs
// (cols2 even; v[c] a zero row past the tile end). P16 rows have stride kBk; int8: row r's sums are
// worth pw[r] each.
template <DType VT, class Acc, int NV>
NPUFA_INLINE void pv_block(const short* p16, const St<VT>* const* v, int64_t cols2, int64_t r0, int64_t R, int64_t d0,
                           float* O, int64_t ost, const float* pw, const St<VT>* const* pf_v, int64_t n_pf,
                           int64_t Dv) {
  Acc acc[4][2 * NV] = {};
  for (int64_t c = 0; c < cols2; c += 2) {
    for (int64_t j = c; j < c + 2 && j < n_pf; ++j) prefetch_row<VT>(pf_v[j], Dv);
    v32s pr[2 * NV];
    for (int x = 0; x < NV; ++x) {
      const v32s a = words<VT>(v[c] + d0 + 32 * x), b = words<VT>(v[c + 1] + d0 + 32 * x);
      pr[2 * x] = pairs_lo(a, b);
      pr[2 * x + 1] = pairs_hi(a, b);
    }
    for (int rr = 0; rr < 4; ++rr) {
      int32_t pp;
      std::memcpy(&pp, p16 + (r0 + rr) * kBk + c, sizeof pp);
      const v32s bc = reinterpret_cast<v32s>(v16i{} + pp);
      for (int x = 0; x < 2 * NV; ++x) acc[rr][x] = dot(acc[rr][x], bc, pr[x]);
    }
  }
  for (int rr = 0; rr < 4 && r0 + rr < R; ++rr) {
    float* o = O + (r0 + rr) * ost + d0;
    for (int x = 0; x < NV; ++x) {
      vf lo, hi;
      if constexpr (VT == DType::I8) {
        lo = __builtin_convertvector(acc[rr][2 * x], vf) * pw[r0 + rr];
        hi = __builtin_convertvector(acc[rr][2 * x + 1], vf) * pw[r0 + rr];
      } else {
        lo = acc[rr][2 * x], hi = acc[rr][2 * x + 1];
      }
      const vf n0 = __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
      const vf n1 = __builtin_shufflevector(lo, hi, 8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
      vec::store(o + 32 * x, vec::load(o + 32 * x) + n0);
      vec::store(o + 32 * x + 16, vec::load(o + 32 * x + 16) + n1);
    }
  }
}

// All rows and columns; V rows of the next tile (pf_v, n_pf of them) are prefetched in the first pass.
template <DType VT, class Acc>
NPUFA_INLINE void pv(const short* p16, const St<VT>* const* v, int64_t cols2, int64_t R, int64_t Dv, float* O,
                     int64_t ost, const float* pw, const St<VT>* const* pf_v, int64_t n_pf) {
  for (int64_t r0 = 0; r0 < R; r0 += kRb)
    for (int64_t d0 = 0; d0 < Dv; d0 += 64) {
      const int64_t npf = r0 == 0 && d0 == 0 ? n_pf : 0;
      if (Dv - d0 >= 64)
        pv_block<VT, Acc, 2>(p16, v, cols2, r0, R, d0, O, ost, pw, pf_v, npf, Dv);
      else
        pv_block<VT, Acc, 1>(p16, v, cols2, r0, R, d0, O, ost, pw, pf_v, npf, Dv);
    }
}

// n floats (a multiple of 32) that are bf16 values, as bf16 words.
NPUFA_INLINE void bf16_words(const float* x, int64_t n, short* w) {
  for (int64_t i = 0; i < n; i += 32) {
    const v32s a = reinterpret_cast<v32s>(vec::load(x + i)), b = reinterpret_cast<v32s>(vec::load(x + i + 16));
    const v32s h = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33, 35, 37,
                                           39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63);
    std::memcpy(w + i, &h, sizeof h);
  }
}

// n floats (a multiple of 32) times mul, rounded to the nearest integer (|x · mul| < 2^15), as int16.
NPUFA_INLINE void int16_words(const float* x, int64_t n, float mul, short* w) {
  const vf magic = vec::splat(12582912.f);  // 1.5 · 2^23: adding it rounds to an integer (half to even)
  for (int64_t i = 0; i < n; i += 32) {
    const v16i a = __builtin_convertvector((vec::load(x + i) * mul + magic) - magic, v16i);
    const v16i b = __builtin_convertvector((vec::load(x + i + 16) * mul + magic) - magic, v16i);
    const v32s h = __builtin_shufflevector(reinterpret_cast<v32s>(a), reinterpret_cast<v32s>(b), 0, 2, 4, 6, 8, 10, 12,
                                           14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42, 44, 46, 48, 50,
                                           52, 54, 56, 58, 60, 62);
    std::memcpy(w + i, &h, sizeof h);
  }
}

// 2^e (e an integer in [-126, 127]) as a float.
NPUFA_INLINE float pow2(int e) {
  const uint32_t u = static_cast<uint32_t>(e + 127) << 23;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Probabilities of rows [0, R) (S, stride kBk, zero past the tile end) as words for P·V: bf16 bits
// (P is already rounded to bf16), or int8 KV: int16 of p · 2^14 / σ with σ the power of two at or above
// the row's largest p, pw[r] = σ / 2^14.
template <bool I8>
NPUFA_INLINE void p_words(const float* S, int64_t R, short* p16, float* pw) {
  constexpr int kV = kBk / vec::kW;
  for (int64_t r = 0; r < R; ++r) {
    const float* s = S + r * kBk;
    vf x[kV];
    for (int i = 0; i < kV; ++i) x[i] = vec::load(s + i * vec::kW);
    if constexpr (I8) {
      vf m = x[0];
      for (int i = 1; i < kV; ++i) m = vec::vmax(m, x[i]);
      const float mx = vec::hmax(m);
      // e: 2^(e-1) < mx <= 2^e (probabilities are normal or 0; below 2^-100 they are lost against
      // the row's sum, which is >= 1, so e is clamped there)
      uint32_t u;
      std::memcpy(&u, &mx, sizeof u);
      const int e = std::max(-100, static_cast<int>(u >> 23) - 127 + ((u & 0x7fffffu) != 0));
      const float mul = mx > 0.f ? pow2(14 - e) : 0.f;
      pw[r] = pow2(e - 14);
      int16_words(s, kBk, mul, p16 + r * kBk);
    } else {
      bf16_words(s, kBk, p16 + r * kBk);
    }
  }
}
#endif

}  // namespace npufa::tile::dot
