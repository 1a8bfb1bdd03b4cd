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

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kW; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
}
inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// exp(x) to ~2 ulp over the fp32 range; exactly 0 for x < -87.3 (masked scores are -inf).
__attribute__((always_inline)) inline vf exp(vf x) {
  const vf lo = splat(-87.33654f), hi = splat(88.72283f);
  const vf xc = x < lo ? lo : (x > hi ? hi : x);
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (xc * 1.44269504088896341f + magic) - magic;
  vf r = xc - n * 0.693359375f;  // ln2 split in two for an exact reduction
  r = r - n * -2.12194440e-4f;
  // e^r on [-ln2/2, ln2/2], degree-6 polynomial (Cephes expf coefficients).
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof scale);
  const vf y = p * scale;
  return x < lo ? vf{} : y;
}

}  // namespace npufa::vec
