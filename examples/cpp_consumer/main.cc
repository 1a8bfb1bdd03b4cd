// Runs npu_fusion_attention (BNSD, fp32, right-down causal: sparse_mode 3 with the 2048x2048
// compressed mask) through the installed npufa library and checks one output row against a naive
// computation. Exits non-zero on a mismatch.
#include <cmath>
#include <cstdio>
#include <vector>

#include <npufa/npufa.h>

int main() {
  const int64_t B = 1, N = 2, Sq = 6, Skv = 9, D = 4;
  std::vector<float> q(B * N * Sq * D), k(B * N * Skv * D), v(B * N * Skv * D);
  for (size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.7f * static_cast<float>(i));
  for (size_t i = 0; i < k.size(); ++i) k[i] = std::cos(0.3f * static_cast<float>(i));
  for (size_t i = 0; i < v.size(); ++i) v[i] = 0.1f * static_cast<float>(i % 11) - 0.4f;

  // torch.triu(ones(2048, 2048, bool), diagonal=1): the compressed mask of sparse_mode 3.
  std::vector<uint8_t> mask(2048 * 2048);
  for (int r = 0; r < 2048; ++r)
    for (int c = 0; c < 2048; ++c) mask[r * 2048 + c] = c > r;

  std::vector<float> out(B * N * Sq * D), smax(B * N * Sq * 8), ssum(B * N * Sq * 8);
  npufa::FusionAttentionParams p;
  p.query = npufa::TensorView(q.data(), npufa::DType::F32, {B, N, Sq, D});
  p.key = npufa::TensorView(k.data(), npufa::DType::F32, {B, N, Skv, D});
  p.value = npufa::TensorView(v.data(), npufa::DType::F32, {B, N, Skv, D});
  p.head_num = N;
  p.input_layout = "BNSD";
  p.scale = 1.0 / std::sqrt(static_cast<double>(D));
  p.sparse_mode = 3;
  p.atten_mask = npufa::TensorView(mask.data(), npufa::DType::Bool, {2048, 2048});
  p.attention_out = npufa::TensorView(out.data(), npufa::DType::F32, {B, N, Sq, D});
  p.softmax_max = npufa::TensorView(smax.data(), npufa::DType::F32, {B, N, Sq, 8});
  p.softmax_sum = npufa::TensorView(ssum.data(), npufa::DType::F32, {B, N, Sq, 8});
  try {
    npufa::fusion_attention_fwd(p);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "npufa error: %s\n", e.what());
    return 2;
  }

  // Naive row (n = 1, i = 2): keys j <= i + (Skv - Sq) take part (right-down causal).
  const int64_t n = 1, i = 2, last = i + (Skv - Sq);
  std::vector<double> s(Skv);
  double m = -INFINITY;
  for (int64_t j = 0; j <= last; ++j) {
    double x = 0;
    for (int64_t d = 0; d < D; ++d) x += q[((n * Sq) + i) * D + d] * k[((n * Skv) + j) * D + d];
    s[j] = x * p.scale;
    m = std::max(m, s[j]);
  }
  double l = 0;
  for (int64_t j = 0; j <= last; ++j) l += std::exp(s[j] - m);
  int bad = 0;
  for (int64_t d = 0; d < D; ++d) {
    double o = 0;
    for (int64_t j = 0; j <= last; ++j) o += std::exp(s[j] - m) / l * v[((n * Skv) + j) * D + d];
    const double got = out[((n * Sq) + i) * D + d];
    std::printf("out[0, %lld, %lld, %lld] = %.7f (naive %.7f)\n", static_cast<long long>(n), static_cast<long long>(i),
                static_cast<long long>(d), got, o);
    if (!(std::fabs(got - o) <= 1e-5)) ++bad;
  }
  const double gmax = smax[((n * Sq) + i) * 8], gsum = ssum[((n * Sq) + i) * 8];
  if (!(std::fabs(gmax - m) <= 1e-5) || !(std::fabs(gsum - l) <= 1e-5 * l)) {
    std::printf("softmax_max %.7f (naive %.7f), softmax_sum %.7f (naive %.7f)\n", gmax, m, gsum, l);
    ++bad;
  }
  if (bad) {
    std::fprintf(stderr, "npufa_consumer: %d mismatches\n", bad);
    return 1;
  }
  std::printf("npufa_consumer: OK\n");
  return 0;
}
