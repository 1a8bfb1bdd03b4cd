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
// Q·K runs on 256-bit vectors: this level's reference host executes 512-bit operations in two halves,
// so the dot products cost the same, and the 16 accumulators of a block of 4 rows x 4 keys reduce
// with half the shuffles (transposed sums, not one horizontal sum per score; measured 2 % faster for
// int8). The softmax is one pass per row that writes P as words (softmax_words), with a cheaper exp
// (exp_fast). P·V takes keys in pairs: the rows of two keys are interleaved word by word, which permutes
// the lanes within each 128-bit block; the permutation is undone once per tile when the sums are
// added to O.
// The builtins are GCC's (declared below, expanded only inside the kIsaV4Dot entry). Other compilers
// keep the kIsaV4 code.
#pragma once
#include <cstring>

#include "kernels/tile_common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vnni")
#pragma GCC pop_options
#define NPUFA_DOT_BUILTINS 1
#else
#define NPUFA_DOT_BUILTINS 0
#endif

namespace npufa::tile::dot {

typedef short v32s __attribute__((vector_size(64)));  // 32 int16 or bf16 words
typedef int32_t v16i __attribute__((vector_size(64)));
typedef char v32c __attribute__((vector_size(32)));
typedef short v16s __attribute__((vector_size(32)));  // 16 words (Q·K, see qk)
typedef int32_t v8i __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
typedef char v16c __attribute__((vector_size(16)));
using vec::vf;

// Widest row the zero row (standing in for keys past the tile end) covers, in elements.
constexpr int64_t kMaxWidth = 1024;
alignas(64) inline constexpr uint16_t kZeroRow[kMaxWidth] = {};

// The level can run this problem: whole 32-word chunks; int8 K/V (antiquant) without a rope part
// (which is float); not the full-int8 pipeline, whose probabilities stay fp32 (an int16 P would not
// be exact enough there); no dropout (inference has none).
inline bool usable(const AttnProblem& p, bool i8) {
  const auto ok = [](int64_t n) { return n % 32 == 0 && n <= kMaxWidth; };
  return ok(p.D) && ok(p.Dv) && ok(p.Dr) && p.dropout.kind == DropoutSpec::Kind::None &&
         (i8 ? p.Dr == 0 && !p.q.dq.on : p.dtype == DType::BF16);
}

#if NPUFA_DOT_BUILTINS
NPUFA_INLINE vf dot(vf acc, v32s a, v32s b) { return __builtin_ia32_dpbf16ps_v16sf(acc, a, b); }
NPUFA_INLINE v16i dot(v16i acc, v32s a, v32s b) {
  return __builtin_ia32_vpdpwssd_v16si(acc, reinterpret_cast<v16i>(a), reinterpret_cast<v16i>(b));
}

NPUFA_INLINE v8f dot(v8f acc, v16s a, v16s b) { return __builtin_ia32_dpbf16ps_v8sf(acc, a, b); }
NPUFA_INLINE v8i dot(v8i acc, v16s a, v16s b) {
  return __builtin_ia32_vpdpwssd_v8si(acc, reinterpret_cast<v8i>(a), reinterpret_cast<v8i>(b));
}

// N (16 or 32) elements of a row as words: bf16 as they are, int8 sign-extended.
template <DType X, int N = 32>
NPUFA_INLINE auto words(const St<X>* x) {
  using W = std::conditional_t<N == 16, v16s, v32s>;
  if constexpr (X == DType::I8) {
    std::conditional_t<N == 16, v16c, v32c> c;
    std::memcpy(&c, x, sizeof c);
    if constexpr (N == 16)
      return __builtin_ia32_pmovsxbw256_mask(c, W{}, 0xffffu);
    else
      return __builtin_ia32_pmovsxbw512_mask(c, W{}, 0xffffffffu);
  } else {
    W w;
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

// Sums of a[rr][j] (4 rows x 4 keys, 8 lanes each): lane 4·rr + j. Transposed sums within the
// 128-bit blocks (unpacks), then the two blocks of each row added across.
template <class V>
NPUFA_INLINE auto reduce4x4(const V (&a)[4][4]) {
  V u[4];
  for (int rr = 0; rr < 4; ++rr) {
    const V* x = a[rr];
    const V t01 = __builtin_shufflevector(x[0], x[1], 0, 8, 1, 9, 4, 12, 5, 13) +
                  __builtin_shufflevector(x[0], x[1], 2, 10, 3, 11, 6, 14, 7, 15);
    const V t23 = __builtin_shufflevector(x[2], x[3], 0, 8, 1, 9, 4, 12, 5, 13) +
                  __builtin_shufflevector(x[2], x[3], 2, 10, 3, 11, 6, 14, 7, 15);
    // per 128-bit block: the block's share of keys 0..3
    u[rr] = __builtin_shufflevector(t01, t23, 0, 1, 8, 9, 4, 5, 12, 13) +
            __builtin_shufflevector(t01, t23, 2, 3, 10, 11, 6, 7, 14, 15);
  }
  const V A = __builtin_shufflevector(u[0], u[1], 0, 1, 2, 3, 8, 9, 10, 11) +
              __builtin_shufflevector(u[0], u[1], 4, 5, 6, 7, 12, 13, 14, 15);
  const V B = __builtin_shufflevector(u[2], u[3], 0, 1, 2, 3, 8, 9, 10, 11) +
              __builtin_shufflevector(u[2], u[3], 4, 5, 6, 7, 12, 13, 14, 15);
  return __builtin_shufflevector(A, B, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

// Per-row constants of the int8 scores, lane 4·rr + j: score = int sum · scale + bias.
struct RowAffine {
  alignas(64) float scale[4][16], bias[4][16];  // per block of 4 rows
};

// S[r][c .. c + 4) for keys in blocks of 4 (k[c] rows; zero rows past the tile end), rows [0, R):
// the dot products of Q16 rows (stride dq words; the rope part at column D) with the K rows (and the
// rope rows kr), times the score scale. int8: int32 sums, then the row's scale and bias (which hold
// the score scale). K rows of the next tile (pf_k, n_pf of them) are prefetched a block at a time; V
// rows follow in P·V, so the requests are spread over the whole tile.
// DC > 0: D = dq = DC and no rope part, known when compiling (the d loop unrolls, Q's offsets are
// constants and nothing spills: int8 decode 3-5 % faster at D = 128).
template <DType KT, DType RT, int DC = 0>
NPUFA_INLINE void qk(const short* q16, int64_t dq_, int64_t D_, int64_t Dr_, const St<KT>* const* k,
                     const St<RT>* const* kr, int64_t R, int64_t cols, float scale, float* S, const RowAffine* aff,
                     const St<KT>* const* pf_k, int64_t n_pf) {
  const int64_t D = DC ? DC : D_, dq = DC ? DC : dq_, Dr = DC ? 0 : Dr_;
  for (int64_t c = 0; c < cols; c += 4) {
    for (int64_t j = c; j < c + 4 && j < n_pf; ++j) prefetch_row<KT>(pf_k[j], D);
    for (int64_t r0 = 0; r0 < R; r0 += kRb) {
      std::conditional_t<KT == DType::I8, v8i, v8f> acc[4][4] = {};
      const short* q = q16 + r0 * dq;
      for (int64_t d = 0; d < D; d += 16) {
        v16s kv[4];
        for (int j = 0; j < 4; ++j) kv[j] = words<KT, 16>(k[c + j] + d);
        for (int rr = 0; rr < 4; ++rr) {
          v16s qv;
          std::memcpy(&qv, q + rr * dq + d, sizeof qv);
          for (int j = 0; j < 4; ++j) acc[rr][j] = dot(acc[rr][j], qv, kv[j]);
        }
      }
      for (int64_t d = 0; d < Dr; d += 16) {
        v16s kv[4];
        for (int j = 0; j < 4; ++j) kv[j] = words<RT, 16>(kr[c + j] + d);
        for (int rr = 0; rr < 4; ++rr) {
          v16s qv;
          std::memcpy(&qv, q + rr * dq + D + d, sizeof qv);
          for (int j = 0; j < 4; ++j) acc[rr][j] = dot(acc[rr][j], qv, kv[j]);
        }
      }
      vf s;
      if constexpr (KT == DType::I8)
        s = __builtin_convertvector(reduce4x4(acc), vf) * vec::load(aff->scale[r0 / kRb]) +
            vec::load(aff->bias[r0 / kRb]);
      else
        s = reduce4x4(acc) * scale;
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

// (a, b) times mul, rounded to the nearest integer (|x · mul| < 2^15), as 32 int16 words.
NPUFA_INLINE v32s int16x32(vf a, vf b, float mul) {
  const vf magic = vec::splat(12582912.f);  // 1.5 · 2^23: adding it rounds to an integer (half to even)
  const v16i ia = __builtin_convertvector((a * mul + magic) - magic, v16i);
  const v16i ib = __builtin_convertvector((b * mul + magic) - magic, v16i);
  return __builtin_shufflevector(reinterpret_cast<v32s>(ia), reinterpret_cast<v32s>(ib), 0, 2, 4, 6, 8, 10, 12, 14, 16,
                                 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60,
                                 62);
}

// bf16 words b (32 probabilities) times mul, rounded to the nearest integer (< 2^15), as int16 words
// in the same order; their sum is added to sum. Unpacking each 128-bit block's low and high words under
// zeros gives their fp32 values (bits << 16), and vpackssdw puts the two halves back in place.
NPUFA_INLINE v32s words_scaled(v32s b, float mul, vf& sum) {
  const v32s z = {};
  const vf lo = reinterpret_cast<vf>(__builtin_shufflevector(z, b, 0, 32, 1, 33, 2, 34, 3, 35, 8, 40, 9, 41, 10, 42, 11,
                                                             43, 16, 48, 17, 49, 18, 50, 19, 51, 24, 56, 25, 57, 26,
                                                             58, 27, 59));
  const vf hi = reinterpret_cast<vf>(__builtin_shufflevector(z, b, 4, 36, 5, 37, 6, 38, 7, 39, 12, 44, 13, 45, 14, 46,
                                                             15, 47, 20, 52, 21, 53, 22, 54, 23, 55, 28, 60, 29, 61,
                                                             30, 62, 31, 63));
  sum += lo + hi;
  const unsigned short all = 0xffff;
  const v16i a = __builtin_ia32_cvtps2dq512_mask(lo * mul, v16i{}, all, 4);  // MXCSR: half to even
  const v16i c = __builtin_ia32_cvtps2dq512_mask(hi * mul, v16i{}, all, 4);
  return reinterpret_cast<v32s>(__builtin_ia32_packssdw512_mask(a, c, v32s{}, 0xffffffffu));
}

// x rounded to fp16 and back (RNE; x in [0, 1], so no overflow), on F16C's conversions.
NPUFA_INLINE vf round_f16_hw(vf x) {
  const v16s h = __builtin_ia32_vcvtps2ph512_mask(x, 0, v16s{}, 0xffff);
  return __builtin_ia32_vcvtph2ps512_mask(h, vf{}, 0xffff, 4);
}

// n floats (a multiple of 32) times mul as int16 words (int16x32).
NPUFA_INLINE void int16_words(const float* x, int64_t n, float mul, short* w) {
  for (int64_t i = 0; i < n; i += 32) {
    const v32s h = int16x32(vec::load(x + i), vec::load(x + i + 16), mul);
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

// exp(x) for x <= 0 or -inf: vec::exp's reduction and polynomial (same accuracy), with vscalefps
// applying 2^n, which needs neither the clamp of the input nor the exponent arithmetic (16 operations
// instead of 22). Exactly 0 below -87.33654, like vec::exp (so P has no subnormals).
NPUFA_INLINE vf exp_fast(vf x) {
  const vf t = x * 1.44269504088896341f;
  const vf n = __builtin_ia32_rndscaleps_mask(t, 0, t, static_cast<unsigned short>(0xffff), 4);  // nearest
  const vf q = vec::exp_reduced(x, n);
  const vf y = __builtin_ia32_scalefps512_mask(q, n, q, static_cast<unsigned short>(0xffff), 4);
  return x < -87.33654f ? vf{} : y;
}

// The probabilities of one key tile as words for P·V, in one pass per row: the softmax step of
// softmax_step (scores already scaled by qk; no dropout at this level) with the rounding of P to T,
// then bf16 words, or int8 KV: int16 of p · 2^14 / σ with σ the power of two at or above the row's
// largest p (exp of the tile's max score, known before the pass), pw[r] = σ / 2^14, and Σ p (of the
// rounded p) added to O's column dvp for the V offset. Rows past R stay zero.
// Rows go in blocks of kRb, interleaved (independent chains for the out-of-order core), and one
// exp_fast serves the block's rescale factors and largest p's (12 % faster than row by row).
// The rounding to T is the conversion instructions' (RNE, like vec::round_bf16 / round_f16 on these
// values), and int8 KV with bf16 goes from the bf16 words straight to int16 (words_scaled): the
// softmax takes 12 % less time than with the integer rounding, the int8 decode about 1 % less.
template <DType T, bool I8, class RowAt>
NPUFA_INLINE void softmax_words(const AttnProblem& p, const SeqSpan& sp, int64_t b, int64_t j0, int64_t cols,
                                TileClass cls, int64_t R, RowAt row_at, float* S, short* p16, float* pw, float* O,
                                int64_t ost, int64_t dvp, float* M, float* L) {
  constexpr int kV = kBk / vec::kW;
  for (int64_t r0 = 0; r0 < R; r0 += kRb) {
    const int64_t nr = std::min(kRb, R - r0);
    for (int64_t rr = 0; rr < nr; ++rr) {
      const auto [n, i] = row_at(r0 + rr);
      finish_score_row<T, true>(p, sp, b, n, i, j0, cols, cls, S + (r0 + rr) * kBk);
    }
    vf x[kRb][kV];
    float mn[kRb];
    bool live[kRb];
    vf arg = {};  // lanes rr: exp of the old max against the new (alpha); 4 + rr: of the tile's max (pmax)
    for (int rr = 0; rr < kRb; ++rr) {
      for (int v = 0; v < kV; ++v) x[rr][v] = vec::load(S + (r0 + rr) * kBk + v * vec::kW);
      vf mv = x[rr][0];
      for (int v = 1; v < kV; ++v) mv = vec::vmax(mv, x[rr][v]);
      const float mx = vec::hmax(mv), mo = rr < nr ? M[r0 + rr] : 0.f;
      live[rr] = rr < nr && mx != -INFINITY;
      mn[rr] = live[rr] ? std::max(mo, mx) : 0.f;
      arg[rr] = live[rr] && mo != mn[rr] ? mo - mn[rr] : 0.f;
      arg[4 + rr] = live[rr] ? mx - mn[rr] : 0.f;
    }
    const vf ex = exp_fast(arg);
    float mul[kRb] = {};
    for (int rr = 0; rr < kRb; ++rr) {
      if constexpr (I8) {
        const float pmax = ex[4 + rr];  // the row's largest p, bit for bit (same lane-wise exp)
        // e: 2^(e-1) < pmax <= 2^e (p below 2^-100 is lost against the row's sum, which is >= 1)
        uint32_t u;
        std::memcpy(&u, &pmax, sizeof u);
        const int e = std::max(-100, static_cast<int>(u >> 23) - 127 + ((u & 0x7fffffu) != 0));
        mul[rr] = live[rr] && pmax > 0.f ? pow2(14 - e) : 0.f;
        if (rr < nr) pw[r0 + rr] = mul[rr] > 0.f ? pow2(e - 14) : 0.f;
      }
    }
    vf sv[kRb] = {}, ps[kRb] = {};
    for (int v = 0; v < kV; v += 2)
      for (int rr = 0; rr < kRb; ++rr) {
        short* w = p16 + (r0 + rr) * kBk + v * vec::kW;
        const vf ea = exp_fast(x[rr][v] - mn[rr]), eb = exp_fast(x[rr][v + 1] - mn[rr]);
        sv[rr] += ea + eb;
        v32s h;
        if constexpr (!I8) {  // bf16 (usable())
          h = __builtin_ia32_cvtne2ps2bf16_v32hi(eb, ea);  // RNE, = vec::round_bf16 (no subnormals here)
        } else if constexpr (T == DType::BF16) {
          h = words_scaled(__builtin_ia32_cvtne2ps2bf16_v32hi(eb, ea), mul[rr], ps[rr]);
        } else {
          const vf ra = round_f16_hw(ea), rb = round_f16_hw(eb);
          ps[rr] += ra + rb;
          h = int16x32(ra, rb, mul[rr]);
        }
        if (!live[rr]) h = v32s{};
        if (rr < nr) std::memcpy(w, &h, sizeof h);
      }
    for (int64_t rr = 0; rr < nr; ++rr) {
      if (!live[rr]) continue;  // nothing kept in this row of the tile
      const int64_t r = r0 + rr;
      const float alpha = ex[rr];  // 0 on the first kept tile
      M[r] = mn[rr];
      L[r] = L[r] * alpha + vec::hsum(sv[rr]);
      float* o = O + r * ost;
      if (alpha != 1.f)
        for (int64_t d = 0; d < ost; ++d) o[d] *= alpha;
      if constexpr (I8) o[dvp] += vec::hsum(ps[rr]);
    }
  }
}
#endif

}  // namespace npufa::tile::dot
