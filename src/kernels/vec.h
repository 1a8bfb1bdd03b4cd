// Portable SIMD for the kernels: GCC/Clang vector extensions, 16 floats per vector. Each
// multiversioned kernel clone lowers them to its own ISA (one zmm, two ymm, or four xmm).
#pragma once
#include <cstdint>
#include <cstring>

namespace npufa::vec {

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int kW = 16;

__attribute__((always_inline)) inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// Horizontal reductions as a log2 tree of half-swaps (a left-to-right scalar loop would be 15
// dependent adds: strict fp order forbids the compiler to reassociate it).
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
__attribute__((always_inline)) inline float hsum(vf v) {
  const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
__attribute__((always_inline)) inline float hmax(vf v) {
  const v8 x = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
           y = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const v8 a = x > y ? x : y;
  const v4 p = __builtin_shufflevector(a, a, 0, 1, 2, 3), q = __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const v4 b = p > q ? p : q;
  const float m0 = b[0] > b[2] ? b[0] : b[2], m1 = b[1] > b[3] ? b[1] : b[3];
  return m0 > m1 ? m0 : m1;
}

// e^(x - n·ln2) for n = round(x / ln2): the reduction (ln2 split in two, so it is exact) and a degree-6
// polynomial on [-ln2/2, ln2/2] (Cephes expf coefficients).
__attribute__((always_inline)) inline vf exp_reduced(vf x, vf n) {
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.f;
}

// exp(x) to ~2 ulp over the fp32 range; exactly 0 for x < -87.3 (masked scores are -inf).
__attribute__((always_inline)) inline vf exp(vf x) {
  const vf lo = splat(-87.33654f), hi = splat(88.72283f);
  const vf xc = x < lo ? lo : (x > hi ? hi : x);
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (xc * 1.44269504088896341f + magic) - magic;
  const vf p = exp_reduced(xc, n);
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof scale);
  const vf y = p * scale;
  return x < lo ? vf{} : y;
}

// 16 fp16 / bf16 values (raw bits) widened to fp32, exactly; branch-free, so every ISA vectorises it.
typedef uint16_t vh __attribute__((vector_size(32)));
__attribute__((always_inline)) inline vf bf16x16(const uint16_t* p) {
  // Element by element: GCC 12 makes this one vpmovzxwd (a vector convert is split in halves).
  const vi w = vi{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15]}
               << 16;
  vf f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}
__attribute__((always_inline)) inline vf f16x16(const uint16_t* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  const vi x = __builtin_convertvector(h, vi);
  constexpr int32_t kShiftedExp = 0x7c00 << 13;
  vi o = (x & 0x7fff) << 13;
  const vi e = o & kShiftedExp;
  o += (127 - 15) << 23;
  o = e == kShiftedExp ? o + ((128 - 16) << 23) : o;  // Inf/NaN
  vf f;
  vi sub = o + (1 << 23);                              // zero/subnormal: renormalise
  std::memcpy(&f, &sub, sizeof f);
  f -= 6.103515625e-05f;                               // 2^-14 = bits 113 << 23
  vi fb;
  std::memcpy(&fb, &f, sizeof fb);
  o = e == 0 ? fb : o;
  o |= (x & 0x8000) << 16;
  std::memcpy(&f, &o, sizeof f);
  return f;
}

// Non-negative finite x rounded to bf16 / fp16 precision (round half to even) and back: what the
// NPU does to the probabilities before P·V, vectorised.
__attribute__((always_inline)) inline vf round_bf16(vf x) {
  vi u;
  std::memcpy(&u, &x, sizeof u);
  u = (u + 0x7fff + ((u >> 16) & 1)) & static_cast<int32_t>(0xffff0000u);
  std::memcpy(&x, &u, sizeof x);
  return x;
}
__attribute__((always_inline)) inline vf round_f16(vf x) {
  vi u;
  std::memcpy(&u, &x, sizeof u);
  u = (u + 0xfff + ((u >> 13) & 1)) & ~0x1fff;  // normal halves: 10 mantissa bits
  vf n;
  std::memcpy(&n, &u, sizeof n);
  const vf magic = splat(12582912.f);  // subnormal halves: multiples of 2^-24
  const vf sub = ((x * 16777216.f + magic) - magic) * 5.9604644775390625e-08f;
  n = n > 65504.f ? splat(__builtin_inff()) : n;
  return x < 6.103515625e-05f ? sub : n;
}

}  // namespace npufa::vec
