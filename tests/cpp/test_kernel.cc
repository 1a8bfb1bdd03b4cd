// fusion_attention_fwd (public API) against the float64 scalar reference over a grid of layouts,
// dtypes, head dims, GQA ratios, lengths around the 64 tile, sparse modes, pse, sink, dropout,
// TND varlen and the v2 additions (pse_type, generated alibi, rope); metamorphic checks; and
// representative error cases.
//
// The reference never sees the layout under test: it runs on BNSD (or TND) copies the test writes
// itself, with broadcast/compressed/generated biases expanded by the test into full tensors, and
// the outputs are read back with the test's own layout indexing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cfloat>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <cmath>
#include <memory>
#include <random>
#include <sstream>

#include "npufa/dropout.h"
#include "npufa/error.h"
#include "npufa/ops/fusion_attention.h"
#include "npufa/parallel.h"
#include "problem/fusion_attention.h"
#include "test_util.h"

namespace npufa {
namespace {

using test::Tensor;

enum class MaskKind { None, Explicit, Compressed };
enum class PseKind { None, BNSS, BN1S, OneNSS, Alibi, FlatBNSS, FlatBN1S, AlibiTnd, SlopesBN, SlopesN };

struct KCase {
  std::string name;
  std::string layout = "BNSD";
  DType dtype = DType::F32;
  int64_t B = 1, Nq = 2, Nkv = 1, Sq = 8, Skv = 8, D = 16, Dv = 16;
  std::vector<int64_t> qlens, kvlens;  // TND, per batch
  bool raw0 = false;                   // TND: trailing empty batches written as zeros in the cumulative lists
  int64_t extra_t = 0;                 // TND: tokens after the last batch
  std::string softmax_layout;
  int64_t mode = 0;
  MaskKind mask = MaskKind::None;
  int mshape = 0;  // explicit: 0 BNSS, 1 B1SS, 2 11SS, 3 SS (TND: 0 local [maxSq, maxSkv], 1 global [Tq, Tkv])
  int64_t pre = 2147483647, next = 2147483647;
  std::vector<int64_t> prefix;
  PseKind pse = PseKind::None;
  bool pse_batch1 = false;   // pse with batch dim 1
  int64_t alibi_cols = 0;    // AlibiTnd: S of the [1, N, 1024, S] block (0: max Sq_b)
  bool sink = false;
  double keep_prob = 1.0;
  bool external_dropout = false;
  int64_t seed = 0, offset = 0;
  double scale = 0;  // 0: 1/sqrt(D)
  bool strided = false;      // BNSD query/out views over BSND memory
  bool strided_aux = false;  // sink, dropout_mask and flat pse as 1-D views with stride 2
  double mask_density = 0.3;
  // npu_fusion_attention_v2 additions.
  int64_t pse_type = 1;
  std::vector<int64_t> q_start, kv_start;  // pse_type 2/3
  int64_t Dr = 0;                          // query_rope / key_rope head dim

  bool tnd() const { return layout == "TND" || layout == "tnd"; }
  int64_t nb() const { return tnd() ? static_cast<int64_t>(qlens.size()) : B; }
  int64_t sq(int64_t b) const { return tnd() ? qlens[static_cast<size_t>(b)] : Sq; }
  int64_t skv(int64_t b) const { return tnd() ? kvlens[static_cast<size_t>(b)] : Skv; }
  int64_t qoff(int64_t b) const { int64_t o = 0; for (int64_t x = 0; x < b; ++x) o += sq(x); return o; }
  int64_t kvoff(int64_t b) const { int64_t o = 0; for (int64_t x = 0; x < b; ++x) o += skv(x); return o; }
  int64_t Tq() const { return tnd() ? qoff(nb()) + extra_t : Sq; }
  int64_t Tkv() const { return tnd() ? kvoff(nb()) + extra_t : Skv; }
  int64_t max_sq() const { int64_t m = 0; for (int64_t b = 0; b < nb(); ++b) m = std::max(m, sq(b)); return m; }
  int64_t max_skv() const { int64_t m = 0; for (int64_t b = 0; b < nb(); ++b) m = std::max(m, skv(b)); return m; }
  std::vector<int64_t> cum(bool q) const {
    auto c = test::cumulative(q ? qlens : kvlens);
    if (raw0)
      for (size_t b = c.size(); b-- > 0 && qlens[b] == 0 && kvlens[b] == 0;) c[b] = 0;
    return c;
  }
};

// gtest prints a failing parameter with this instead of its bytes.
void PrintTo(const KCase& c, std::ostream* os) { *os << c.name; }

std::string upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

// Index of logical (b, n, s, d) in a contiguous tensor of `layout` (TND: s is the token, b unused).
int64_t lidx(const std::string& layout_in, int64_t B, int64_t N, int64_t S, int64_t Dh, int64_t b, int64_t n, int64_t s,
             int64_t d) {
  const std::string layout = upper(layout_in);
  if (layout == "BSH" || layout == "BSND") return ((b * S + s) * N + n) * Dh + d;
  if (layout == "SBH") return ((s * B + b) * N + n) * Dh + d;
  if (layout == "BNSD") return ((b * N + n) * S + s) * Dh + d;
  return (s * N + n) * Dh + d;  // TND
}

std::vector<int64_t> lshape(const std::string& layout_in, int64_t B, int64_t N, int64_t S, int64_t Dh) {
  const std::string layout = upper(layout_in);
  if (layout == "BSH") return {B, S, N * Dh};
  if (layout == "SBH") return {S, B, N * Dh};
  if (layout == "BSND") return {B, S, N, Dh};
  if (layout == "BNSD") return {B, N, S, Dh};
  return {S, N, Dh};
}

struct Bufs {
  Tensor q, k, v, q_rope, k_rope, mask, pse, sink, drop, out, smax, ssum;
  Tensor q_ref, k_ref, v_ref;  // BNSD (TND stays TND) copies for the reference; rope appended to D
  Tensor pse_full;  // the bias expanded by the test to [B, Nq, Sq, Skv] for the reference
  Tensor sink_s, drop_s, pse_s;  // strided_aux copies
  FusionAttentionParams p;     // the call under test
  FusionAttentionParams pref;  // the same problem over BNSD copies (non-TND), for the reference
};

// Logical value arrays for q/k/v: [b][n][s][d] (TND: b = 0, s = token).
struct Logical {
  std::vector<double> q, k, v;
};

std::unique_ptr<Bufs> build(const KCase& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  auto r = std::make_unique<Bufs>();
  const bool tnd = c.tnd();
  const int64_t B = tnd ? 1 : c.B, Sq = c.Tq(), Skv = c.Tkv();
  // t: the tensor in the case's layout; tref: the reference copy (BNSD, or TND) with head dim
  // ref_dh, written at head-dim offset doff (rope goes after D: q.k + q_rope.k_rope = [q, q_rope].[k, k_rope]).
  const std::string rl = tnd ? "TND" : "BNSD";
  auto fill = [&](Tensor& t, Tensor& tref, int64_t N, int64_t S, int64_t Dh, double sd, bool strided, int64_t ref_dh,
                  int64_t doff) {
    t = Tensor(c.dtype, strided ? lshape("BSND", B, N, S, Dh) : lshape(c.layout, B, N, S, Dh));
    if (doff == 0) tref = Tensor(c.dtype, lshape(rl, B, N, S, ref_dh));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t s = 0; s < S; ++s)
          for (int64_t d = 0; d < Dh; ++d) {
            const double x = nd(rng) * sd;
            t.set(lidx(strided ? "BSND" : c.layout, B, N, S, Dh, b, n, s, d), x);
            tref.set(lidx(rl, B, N, S, ref_dh, b, n, s, doff + d), x);
          }
  };
  fill(r->q, r->q_ref, c.Nq, Sq, c.D, 1.5, c.strided, c.D + c.Dr, 0);
  fill(r->k, r->k_ref, c.Nkv, Skv, c.D, 1.0, false, c.D + c.Dr, 0);
  fill(r->v, r->v_ref, c.Nkv, Skv, c.Dv, 1.0, false, c.Dv, 0);
  if (c.Dr) {
    fill(r->q_rope, r->q_ref, c.Nq, Sq, c.Dr, 1.5, false, c.D + c.Dr, c.D);
    fill(r->k_rope, r->k_ref, c.Nkv, Skv, c.Dr, 1.0, false, c.D + c.Dr, c.D);
  }

  FusionAttentionParams& p = r->p;
  p.query = r->q.view();
  if (c.strided) {  // BNSD view of BSND memory
    p.query = TensorView(r->q.data(), c.dtype, {B, c.Nq, Sq, c.D}, {Sq * c.Nq * c.D, c.D, c.Nq * c.D, 1});
  }
  p.key = r->k.view();
  p.value = r->v.view();
  p.head_num = c.Nq;
  p.input_layout = c.layout;
  p.scale = c.scale != 0 ? c.scale : 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(c.D, 1)));
  p.keep_prob = c.keep_prob;
  p.pre_tockens = c.pre;
  p.next_tockens = c.next;
  p.sparse_mode = c.mode;
  p.softmax_layout = c.softmax_layout;
  p.seed = c.seed;
  p.offset = c.offset;
  if (!c.prefix.empty()) p.prefix = c.prefix;
  p.pse_type = c.pse_type;
  if (!c.q_start.empty()) p.q_start_idx = c.q_start;
  if (!c.kv_start.empty()) p.kv_start_idx = c.kv_start;
  if (c.Dr) {
    p.query_rope = r->q_rope.view();
    p.key_rope = r->k_rope.view();
  }
  if (tnd) {
    p.actual_seq_qlen = c.cum(true);
    p.actual_seq_kvlen = c.cum(false);
  }

  // Mask.
  if (c.mask == MaskKind::Compressed) {
    Tensor& m = c.mode == 6 ? test::prefix_mask3072() : test::triu2048();
    p.atten_mask = m.view();
  } else if (c.mask == MaskKind::Explicit) {
    std::vector<int64_t> shape;
    if (tnd) shape = c.mshape == 0 ? std::vector<int64_t>{c.max_sq(), c.max_skv()} : std::vector<int64_t>{Sq, Skv};
    else if (c.mshape == 0) shape = {c.B, c.Nq, c.Sq, c.Skv};
    else if (c.mshape == 1) shape = {c.B, 1, c.Sq, c.Skv};
    else if (c.mshape == 2) shape = {1, 1, c.Sq, c.Skv};
    else shape = {c.Sq, c.Skv};
    r->mask = Tensor(DType::Bool, shape);
    std::bernoulli_distribution bit(c.mask_density);
    for (int64_t e = 0; e < r->mask.numel(); ++e) r->mask.bytes()[e] = bit(rng);
    if (c.mode == 5) {  // prefix mask: must equal the predicate (§1.6 table)
      for (int64_t b = 0; b < shape[0]; ++b)
        for (int64_t n = 0; n < shape[1]; ++n)
          for (int64_t i = 0; i < c.Sq; ++i)
            for (int64_t j = 0; j < c.Skv; ++j)
              r->mask.bytes()[((b * shape[1] + n) * c.Sq + i) * c.Skv + j] =
                  j > i + c.Skv - c.Sq && j >= c.prefix[static_cast<size_t>(b)];
    }
    p.atten_mask = r->mask.view();
  }

  // Position bias.
  const int64_t pb = c.pse_batch1 ? 1 : c.nb();
  std::vector<std::vector<double>> alibi_f;  // per (b or 0, n): f(d) at index d + S
  int64_t alibi_S = 0;
  switch (c.pse) {
    case PseKind::None: break;
    case PseKind::BNSS: case PseKind::BN1S: case PseKind::OneNSS: {
      const int64_t S1 = tnd ? c.max_sq() : c.Sq, S2 = tnd ? c.max_skv() : c.Skv;
      r->pse = Tensor(c.dtype, {c.pse == PseKind::OneNSS ? 1 : pb, c.Nq, c.pse == PseKind::BN1S ? 1 : S1, S2});
      for (int64_t e = 0; e < r->pse.numel(); ++e) r->pse.set(e, nd(rng));
      break;
    }
    case PseKind::Alibi: case PseKind::AlibiTnd: {
      // Toeplitz blocks C[r][c] = f_n(R + r - c), R = S - 1024, f_n random.
      const int64_t S = c.pse == PseKind::Alibi ? c.Skv : (c.alibi_cols ? c.alibi_cols : c.max_sq());
      const int64_t R = S - 1024;
      r->pse = Tensor(c.dtype, {pb, c.Nq, 1024, S});
      alibi_f.assign(static_cast<size_t>(pb * c.Nq), std::vector<double>(static_cast<size_t>(2 * S + 1)));
      for (int64_t b = 0; b < pb; ++b)
        for (int64_t n = 0; n < c.Nq; ++n) {
          auto& f = alibi_f[static_cast<size_t>(b * c.Nq + n)];
          for (double& x : f) x = test::round_to(c.dtype, nd(rng));
          for (int64_t rr = 0; rr < 1024; ++rr)
            for (int64_t cc = 0; cc < S; ++cc)
              r->pse.set(((b * c.Nq + n) * 1024 + rr) * S + cc, f[static_cast<size_t>(R + rr - cc + S)]);
        }
      alibi_S = S;
      break;
    }
    case PseKind::SlopesBN: case PseKind::SlopesN: {
      r->pse = c.pse == PseKind::SlopesBN ? Tensor(DType::F32, {c.nb(), c.Nq}) : Tensor(DType::F32, {c.Nq});
      std::uniform_real_distribution<double> u(0.02, 0.5);
      for (int64_t e = 0; e < r->pse.numel(); ++e) r->pse.set(e, u(rng));
      break;
    }
    case PseKind::FlatBNSS: case PseKind::FlatBN1S: {
      int64_t total = 0;
      for (int64_t b = 0; b < c.nb(); ++b) total += c.Nq * (c.pse == PseKind::FlatBNSS ? c.sq(b) : 1) * c.skv(b);
      r->pse = Tensor(c.dtype, {total});
      for (int64_t e = 0; e < total; ++e) r->pse.set(e, nd(rng));
      break;
    }
  }
  if (c.pse != PseKind::None) p.pse = r->pse.view();

  if (c.sink) {
    r->sink = Tensor(DType::F32, {c.Nq});
    std::uniform_real_distribution<double> u(-2.0, 4.0);
    for (int64_t n = 0; n < c.Nq; ++n) r->sink.set(n, u(rng));
    p.sink = r->sink.view();
  }
  if (c.external_dropout) {
    int64_t total = 0;
    for (int64_t b = 0; b < c.nb(); ++b) total += c.Nq * c.sq(b) * c.skv(b);
    r->drop = Tensor(DType::U8, {dropout_mask_bytes(total)});
    std::bernoulli_distribution keep(c.keep_prob);
    for (int64_t e = 0; e < r->drop.numel(); ++e) {
      uint8_t byte = 0;
      for (int k = 0; k < 8; ++k) byte |= static_cast<uint8_t>(keep(rng)) << k;
      r->drop.bytes()[e] = byte;
    }
    p.dropout_mask = r->drop.view();
  }

  // Outputs, pre-filled with garbage so unwritten elements show.
  const auto oshape = lshape(c.layout, B, c.Nq, Sq, c.Dv);
  const std::vector<int64_t> sshape = tnd ? std::vector<int64_t>{Sq, c.Nq, 8} : std::vector<int64_t>{c.B, c.Nq, Sq, 8};
  r->out = Tensor(c.dtype, c.strided ? lshape("BSND", B, c.Nq, Sq, c.Dv) : oshape);
  r->smax = Tensor(DType::F32, sshape);
  r->ssum = Tensor(DType::F32, sshape);
  for (Tensor* t : {&r->out, &r->smax, &r->ssum})
    for (int64_t e = 0; e < t->numel(); ++e) t->set(e, 12345.0);
  p.attention_out = c.strided ? TensorView(r->out.data(), c.dtype, oshape, {Sq * c.Nq * c.Dv, c.Dv, c.Nq * c.Dv, 1})
                              : r->out.view();
  p.softmax_max = r->smax.view();
  p.softmax_sum = r->ssum.view();

  r->pref = p;
  r->pref.query = r->q_ref.view();
  r->pref.key = r->k_ref.view();
  r->pref.value = r->v_ref.view();
  r->pref.input_layout = rl;
  r->pref.query_rope.reset();
  r->pref.key_rope.reset();
  // The reference sees every non-flat bias expanded by the test itself to a full
  // [B, Nq, Sq, Skv] (TND: [B, Nq, maxSq, maxSkv]) tensor, so the broadcast and alibi rules of the
  // canonicalisation are checked too.
  const bool slopes = c.pse == PseKind::SlopesBN || c.pse == PseKind::SlopesN;
  if (c.pse != PseKind::None && c.pse != PseKind::FlatBNSS && c.pse != PseKind::FlatBN1S &&
      (!slopes || c.dtype == DType::F32)) {
    const int64_t S1 = tnd ? c.max_sq() : c.Sq, S2 = tnd ? c.max_skv() : c.Skv;
    r->pse_full = Tensor(c.dtype, {c.nb(), c.Nq, S1, S2});
    const auto& ps = r->pse.shape;
    for (int64_t b = 0; b < c.nb(); ++b)
      for (int64_t n = 0; n < c.Nq; ++n)
        for (int64_t i = 0; i < S1; ++i)
          for (int64_t j = 0; j < S2; ++j) {
            const int64_t bb = ps[0] == 1 ? 0 : b;
            double x;
            if (c.pse == PseKind::Alibi || c.pse == PseKind::AlibiTnd) {
              x = alibi_f[static_cast<size_t>(bb * c.Nq + n)][static_cast<size_t>(i - j + alibi_S)];  // f(i - j)
            } else if (slopes) {  // §3.2: -slope[b, n] * (sqrt)(|j + kv_start - i - q_start|)
              const double slope = r->pse.get(c.pse == PseKind::SlopesBN ? b * c.Nq + n : n);
              const double dist = std::fabs(static_cast<double>(j + (c.kv_start.empty() ? 0 : c.kv_start[0]) - i -
                                                                (c.q_start.empty() ? 0 : c.q_start[0])));
              x = -slope * (c.pse_type == 3 ? std::sqrt(dist) : dist);
            } else
              x = r->pse.get(((bb * c.Nq + n) * ps[2] + (ps[2] == 1 ? 0 : i)) * ps[3] + j);
            r->pse_full.set(((b * c.Nq + n) * S1 + i) * S2 + j, x);
          }
    r->pref.pse = r->pse_full.view();
    if (slopes) r->pref.pse_type = 0;  // the expanded bias is added after scaling
  }
  if (c.strided_aux) {  // the op under test reads stride-2 views; the reference keeps the contiguous ones
    auto spread = [](const Tensor& t, Tensor& out) {
      out = Tensor(t.dtype, {2 * t.numel()});
      const int es = test::esize(t.dtype);
      std::memset(out.bytes(), 0x5A, static_cast<size_t>(2 * t.numel() * es));
      for (int64_t e = 0; e < t.numel(); ++e) std::memcpy(out.bytes() + 2 * e * es, t.bytes() + e * es, static_cast<size_t>(es));
      return TensorView(out.data(), t.dtype, {t.numel()}, {2});
    };
    if (c.sink) p.sink = spread(r->sink, r->sink_s);
    if (c.external_dropout) p.dropout_mask = spread(r->drop, r->drop_s);
    if (c.pse == PseKind::FlatBNSS || c.pse == PseKind::FlatBN1S) p.pse = spread(r->pse, r->pse_s);
  }
  return r;
}

// Unit roundoff of the input dtype. For fp16/bf16 the kernel rounds P (rel. error <= u) before
// P.V and rounds the output once (<= u), so |out - ref| <= u * (max|v| / keep_prob + |ref|) plus
// fp32 noise; fp32 inputs get an fp32-accumulation budget instead.
double dtype_eps(DType t) {
  switch (t) {
    case DType::F16: return std::ldexp(1.0, -11);
    case DType::BF16: return std::ldexp(1.0, -8);
    default: return 2e-6;
  }
}

struct Worst {
  double out = 0, mx = 0, sm = 0;  // worst error / tolerance ratios
};

// Runs the case and compares every output element with the reference. Returns the worst ratios.
Worst run_and_check(const KCase& c, uint64_t seed = 7) {
  SCOPED_TRACE(c.name);
  auto r = build(c, seed);
  const bool tnd = c.tnd();
  const int64_t Tq = c.Tq();

  // Shapes, computed independently.
  const FusionAttentionShapes shapes = fusion_attention_output_shapes(r->p);
  EXPECT_EQ(shapes.attention_out, lshape(c.layout, tnd ? 1 : c.B, c.Nq, Tq, c.Dv));
  EXPECT_EQ(shapes.softmax_max, r->smax.shape);
  EXPECT_EQ(shapes.softmax_sum, r->ssum.shape);

  const FusionAttentionResult res = fusion_attention_fwd(r->p);
  int64_t numels = c.B * c.Nq * c.Sq * c.Skv;
  if (tnd) {
    const auto cq = c.cum(true), ck = c.cum(false);
    int64_t acc = cq[0] * ck[0];
    for (size_t i = 1; i < cq.size(); ++i) acc += (cq[i] - cq[i - 1]) * (ck[i] - ck[i - 1]);
    numels = c.Nq * acc;
  }
  EXPECT_EQ(res.numels, numels);
  EXPECT_EQ(res.seed, c.seed);
  EXPECT_EQ(res.offset, c.offset);

  const FusionAttentionCanon canon = canonicalize_fusion_attention(r->pref, false);
  const ref::RefResult want = ref::reference_attention(canon.problem);
  // What the reference takes from a canonical problem, checked against the arguments of the call.
  const FusionAttentionCanon canon_p = canonicalize_fusion_attention(r->p, false);
  const AttnProblem& pr = canon_p.problem;
  EXPECT_EQ(pr.scale, static_cast<float>(r->p.scale));
  EXPECT_EQ(canon.problem.scale, pr.scale);
  EXPECT_EQ(pr.Dr, c.Dr);
  if (c.pse != PseKind::None) {
    if (c.pse_type == 1) EXPECT_EQ(pr.pse.mul, pr.scale) << "pse_type 1: (qk + pse) * scale";
    else EXPECT_EQ(pr.pse.mul, 1.f) << "pse_type " << c.pse_type << ": qk * scale + pse";
  }
  if (c.keep_prob < 1) {
    EXPECT_EQ(pr.dropout.keep_prob, c.keep_prob);
    EXPECT_EQ(pr.dropout.kind, c.external_dropout ? DropoutSpec::Kind::External : DropoutSpec::Kind::Philox);
    if (!c.external_dropout) {
      EXPECT_EQ(pr.dropout.seed, static_cast<uint64_t>(c.seed));
      EXPECT_EQ(pr.dropout.offset, static_cast<uint64_t>(c.offset));
    }
  } else {
    EXPECT_EQ(pr.dropout.kind, DropoutSpec::Kind::None);
  }
  if (c.pse == PseKind::Alibi || c.pse == PseKind::AlibiTnd) {
    // The reference's own reading of the compressed block agrees with the expansion.
    const FusionAttentionCanon cc = canonicalize_fusion_attention(r->p, false);
    EXPECT_EQ(cc.problem.pse.kind, c.pse == PseKind::Alibi ? PseSpec::Kind::AlibiDense : PseSpec::Kind::AlibiTnd);
    const ref::RefResult alt = ref::reference_attention(cc.problem);
    double worst = 0;
    for (size_t e = 0; e < want.out.size(); ++e) worst = std::max(worst, std::fabs(alt.out[e] - want.out[e]));
    EXPECT_LE(worst, 1e-12) << "reference over the compressed alibi block";
  }

  double vmax = 0;
  for (int64_t e = 0; e < r->v.numel(); ++e) vmax = std::max(vmax, std::fabs(r->v.get(e)));
  const double keep = c.keep_prob;
  const double eps = dtype_eps(c.dtype);
  const std::string olayout = c.strided ? "BSND" : c.layout;
  const int64_t OB = tnd ? 1 : c.B;

  Worst w;
  int bad = 0;
  auto stat_idx = [&](int64_t b, int64_t n, int64_t t, int k) {
    if (!tnd) return ((b * c.Nq + n) * Tq + t) * 8 + k;
    if (upper(c.softmax_layout) == "TND") return (t * c.Nq + n) * 8 + k;
    return (n * Tq + t) * 8 + k;  // N-major data (§2.3)
  };
  for (int64_t b = 0; b < c.nb(); ++b)
    for (int64_t n = 0; n < c.Nq; ++n)
      for (int64_t i = 0; i < c.sq(b); ++i) {
        const int64_t t = tnd ? c.qoff(b) + i : i, ob = tnd ? 0 : b;
        for (int64_t d = 0; d < c.Dv; ++d) {
          const double got = r->out.get(lidx(olayout, OB, c.Nq, Tq, c.Dv, ob, n, t, d));
          const double ref = want.out_at(b, n, i, d);
          const double rm0 = want.max_at(b, n, i);
          const bool exact = rm0 == 0.0 || std::fabs(rm0) >= FLT_MAX;  // empty KV / fully masked: exactly 0
          const double tol = exact ? 0.0 : 1.25 * eps * (vmax / keep + std::fabs(ref)) + 1e-6;
          const double err = std::fabs(got - ref);
          w.out = std::max(w.out, err / tol);
          if (!(err <= tol) && bad++ < 8)
            ADD_FAILURE() << "out[b=" << b << ", n=" << n << ", i=" << i << ", d=" << d << "] = " << got
                          << ", reference " << ref << " (tol " << tol << ")";
        }
        const double rm = want.max_at(b, n, i), rs = want.sum_at(b, n, i);
        for (int k = 0; k < 8; ++k) {
          const double gm = r->smax.get(stat_idx(ob, n, t, k)), gs = r->ssum.get(stat_idx(ob, n, t, k));
          const bool special = rm == 0.0 || std::fabs(rm) >= FLT_MAX;
          const double tm = special ? 0.0 : 2e-6 * (1.0 + std::fabs(rm)), ts = special ? 0.0 : 1e-5 * std::fabs(rs);
          if (!special) {
            w.mx = std::max(w.mx, std::fabs(gm - rm) / tm);
            w.sm = std::max(w.sm, std::fabs(gs - rs) / ts);
          }
          if (!(std::fabs(gm - rm) <= tm) && bad++ < 8)
            ADD_FAILURE() << "softmax_max[b=" << b << ", n=" << n << ", i=" << i << ", k=" << k << "] = " << gm
                          << ", reference " << rm;
          if (!(std::fabs(gs - rs) <= ts) && bad++ < 8)
            ADD_FAILURE() << "softmax_sum[b=" << b << ", n=" << n << ", i=" << i << ", k=" << k << "] = " << gs
                          << ", reference " << rs;
        }
      }
  if (tnd) {  // rows that belong to no batch are zeros (project decision 12)
    int64_t covered = 0;
    for (int64_t x : c.cum(true)) covered = std::max(covered, x);
    for (int64_t t = covered; t < Tq; ++t)
      for (int64_t n = 0; n < c.Nq; ++n) {
        for (int64_t d = 0; d < c.Dv; ++d)
          EXPECT_EQ(r->out.get(lidx("TND", 1, c.Nq, Tq, c.Dv, 0, n, t, d)), 0.0) << "uncovered row " << t;
        for (int k = 0; k < 8; ++k) {
          EXPECT_EQ(r->smax.get(stat_idx(0, n, t, k)), 0.0) << "uncovered row " << t;
          EXPECT_EQ(r->ssum.get(stat_idx(0, n, t, k)), 0.0) << "uncovered row " << t;
        }
      }
  }
  return w;
}

// ---- the grid ----------------------------------------------------------------------------------

std::string dt(DType t) { return t == DType::F32 ? "f32" : t == DType::F16 ? "f16" : "bf16"; }

std::vector<KCase> grid() {
  std::vector<KCase> g;
  auto add = [&](KCase c, const std::string& name) {
    c.name = name;
    g.push_back(c);
  };
  const std::vector<DType> dtypes = {DType::F32, DType::F16, DType::BF16};
  // Layouts x dtypes, with GQA, D != Dv and a causal mask over a ragged tile.
  for (const char* layout : {"BSH", "SBH", "BSND", "BNSD", "bsnd"})
    for (DType t : dtypes) {
      KCase c;
      c.layout = layout, c.dtype = t, c.B = 2, c.Nq = 4, c.Nkv = 2, c.Sq = 65, c.Skv = 63, c.D = 16, c.Dv = 12;
      c.mode = 3, c.mask = MaskKind::Compressed;
      add(c, std::string("layout_") + layout + "_" + dt(t));
    }
  {
    KCase c;
    c.strided = true, c.B = 2, c.Nq = 3, c.Nkv = 1, c.Sq = 70, c.Skv = 40, c.D = 9, c.Dv = 9;
    add(c, "strided_bnsd_view_f32");
    c.dtype = DType::BF16, c.mode = 2, c.mask = MaskKind::Compressed;
    add(c, "strided_bnsd_view_bf16_causal");
  }
  // Lengths around the 64 tile, no mask and right-down causal (Sq > Skv gives fully masked rows).
  for (int64_t sq : {1, 63, 64, 65, 129})
    for (int64_t skv : {1, 63, 64, 65, 129})
      for (int causal = 0; causal < 2; ++causal) {
        KCase c;
        c.Sq = sq, c.Skv = skv, c.D = 8, c.Dv = 8, c.B = 1, c.Nq = 2, c.Nkv = 1;
        if (causal) c.mode = 3, c.mask = MaskKind::Compressed;
        add(c, "len_" + std::to_string(sq) + "x" + std::to_string(skv) + (causal ? "_causal" : "_full"));
      }
  // Head dims, odd ones too.
  for (auto [d, dv] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 3}, {7, 5}, {33, 17}, {64, 64}, {128, 96}, {96, 1}, {256, 256}})
    for (DType t : {DType::F32, DType::BF16}) {
      KCase c;
      c.layout = "BSND", c.dtype = t, c.Sq = 70, c.Skv = 70, c.D = d, c.Dv = dv, c.Nq = 2, c.Nkv = 1;
      add(c, "headdim_" + std::to_string(d) + "_" + std::to_string(dv) + "_" + dt(t));
    }
  // GQA ratios.
  for (auto [nq, nkv] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {3, 1}, {4, 2}, {8, 8}, {8, 1}, {6, 3}}) {
    KCase c;
    c.layout = "BSH", c.B = 2, c.Nq = nq, c.Nkv = nkv, c.Sq = 33, c.Skv = 47, c.D = 8, c.Dv = 8;
    c.mode = 4, c.mask = MaskKind::Compressed, c.pre = 9, c.next = 3;
    add(c, "gqa_" + std::to_string(nq) + "_" + std::to_string(nkv));
  }
  // Sparse modes.
  for (auto [sq, skv] : std::vector<std::pair<int64_t, int64_t>>{{65, 65}, {70, 130}, {130, 70}})
    for (DType t : {DType::F32, DType::F16}) {
      const std::string sfx = "_" + std::to_string(sq) + "x" + std::to_string(skv) + "_" + dt(t);
      KCase c;
      c.dtype = t, c.B = 2, c.Nq = 2, c.Nkv = 1, c.Sq = sq, c.Skv = skv, c.D = 8, c.Dv = 8;
      for (int ms = 0; ms < 4; ++ms) {
        KCase e = c;
        e.mode = 0, e.mask = MaskKind::Explicit, e.mshape = ms;
        add(e, "mode0_mask" + std::to_string(ms) + sfx);
      }
      {
        KCase e = c;
        e.mode = 0, e.mask = MaskKind::Explicit, e.mshape = 1, e.pre = 20, e.next = 5, e.mask_density = 0.1;
        add(e, "mode0_band_pre20_next5" + sfx);
        e.pre = 40, e.next = -10;
        add(e, "mode0_band_pre40_nextm10" + sfx);
        e.mode = 0, e.mask_density = 0.9;  // mostly masked: many fully masked rows
        add(e, "mode0_dense_mask" + sfx);
      }
      {
        KCase e = c;
        e.mode = 1, e.mask = MaskKind::Explicit, e.mshape = 0, e.pre = 1, e.next = 1;
        add(e, "mode1" + sfx);
      }
      for (int64_t mode : {2, 3}) {
        KCase e = c;
        e.mode = mode, e.mask = MaskKind::Compressed;
        add(e, "mode" + std::to_string(mode) + sfx);
      }
      for (auto [pre, next] : std::vector<std::pair<int64_t, int64_t>>{{10, 0}, {0, 10}, {200, 200}, {30, -5}, {-5, 30}}) {
        KCase e = c;
        e.mode = 4, e.mask = MaskKind::Compressed, e.pre = pre, e.next = next;
        add(e, "mode4_pre" + std::to_string(pre) + "_next" + std::to_string(next) + sfx);
      }
      const int64_t lo = sq > skv ? 0 : skv - sq;
      {
        KCase e = c;
        e.mode = 5, e.mask = MaskKind::Explicit, e.mshape = 1, e.prefix = {lo, (lo + skv) / 2};
        add(e, "mode5" + sfx);
        e.mode = 6, e.mask = MaskKind::Compressed, e.prefix = {skv, lo + 1};
        add(e, "mode6" + sfx);
      }
      {
        KCase e = c;  // no mask: every mode computes the full matrix
        e.mode = 4, e.pre = 0, e.next = 0;
        add(e, "mode4_without_mask" + sfx);
      }
    }
  // Position bias.
  for (DType t : {DType::F32, DType::BF16})
    for (PseKind k : {PseKind::BNSS, PseKind::BN1S, PseKind::OneNSS})
      for (int causal = 0; causal < 2; ++causal) {
        KCase c;
        c.dtype = t, c.B = 2, c.Nq = 4, c.Nkv = 2, c.Sq = 66, c.Skv = 70, c.D = 16, c.Dv = 16, c.pse = k;
        c.layout = "BSND";
        if (causal) c.mode = 3, c.mask = MaskKind::Compressed;
        c.scale = 0.3;
        add(c, std::string("pse_") + (k == PseKind::BNSS ? "bnss" : k == PseKind::BN1S ? "bn1s" : "1nss") +
                   (causal ? "_causal_" : "_") + dt(t));
      }
  {
    KCase c;
    c.B = 2, c.Nq = 2, c.Nkv = 1, c.Sq = 20, c.Skv = 30, c.pse = PseKind::BN1S, c.pse_batch1 = true;
    add(c, "pse_1n1s_f32");
  }
  for (DType t : {DType::F32, DType::F16}) {
    KCase c;
    c.dtype = t, c.B = 1, c.Nq = 2, c.Nkv = 1, c.Sq = 1100, c.Skv = 1100, c.D = 4, c.Dv = 4, c.pse = PseKind::Alibi;
    c.mode = t == DType::F32 ? 3 : 2, c.mask = MaskKind::Compressed, c.scale = 0.5;
    add(c, "pse_alibi_1100_" + dt(t));
  }
  // Sink.
  for (DType t : {DType::F32, DType::F16}) {
    KCase c;
    c.dtype = t, c.B = 2, c.Nq = 3, c.Nkv = 1, c.Sq = 65, c.Skv = 65, c.D = 8, c.Dv = 8, c.sink = true;
    add(c, "sink_" + dt(t));
    c.mode = 4, c.mask = MaskKind::Compressed, c.pre = 3, c.next = 0;
    add(c, "sink_band_" + dt(t));
    c.pse = PseKind::BNSS;
    add(c, "sink_band_pse_" + dt(t));
  }
  // Dropout.
  for (DType t : {DType::F32, DType::BF16})
    for (int ext = 0; ext < 2; ++ext) {
      KCase c;
      c.dtype = t, c.B = 2, c.Nq = 2, c.Nkv = 1, c.Sq = 70, c.Skv = 66, c.D = 8, c.Dv = 8, c.keep_prob = 0.8;
      c.external_dropout = ext, c.seed = 1234, c.offset = 77;
      add(c, std::string("dropout_") + (ext ? "external_" : "philox_") + dt(t));
      c.mode = 3, c.mask = MaskKind::Compressed, c.sink = true, c.keep_prob = 0.5, c.layout = "SBH";
      add(c, std::string("dropout_causal_sink_") + (ext ? "external_" : "philox_") + dt(t));
    }
  // TND varlen.
  struct L {
    std::vector<int64_t> q, kv;
    bool raw0;
    int64_t extra;
    const char* name;
  };
  const std::vector<L> lens = {
      {{1, 63, 64, 65}, {1, 64, 65, 129}, false, 0, "tiles"},
      {{3, 0, 70, 2}, {4, 5, 70, 6}, false, 5, "midzero"},
      {{66, 5, 0, 0}, {70, 5, 0, 0}, true, 0, "tailzero_raw"},
      {{66, 5, 0, 0}, {70, 5, 0, 0}, false, 4, "tailzero_flat"},
      {{0, 9, 129}, {0, 9, 129}, false, 0, "leadzero"},
  };
  for (const L& l : lens)
    for (DType t : {DType::F32, DType::BF16}) {
      KCase c;
      c.layout = "TND", c.dtype = t, c.Nq = 4, c.Nkv = 2, c.D = 8, c.Dv = 6;
      c.qlens = l.q, c.kvlens = l.kv, c.raw0 = l.raw0, c.extra_t = l.extra;
      const std::string sfx = std::string("_") + l.name + "_" + dt(t);
      add(c, "tnd_full" + sfx);
      {
        KCase e = c;
        e.softmax_layout = t == DType::F32 ? "TND" : "tnd";  // case-insensitive
        add(e, "tnd_softmax_tnd" + sfx);
      }
      for (int ms = 0; ms < 2; ++ms) {
        KCase e = c;
        e.mode = 0, e.mask = MaskKind::Explicit, e.mshape = ms, e.mask_density = 0.2;
        add(e, "tnd_mode0_mask" + std::to_string(ms) + sfx);
      }
      for (int64_t mode : {2, 3}) {
        KCase e = c;
        e.mode = mode, e.mask = MaskKind::Compressed;
        add(e, "tnd_mode" + std::to_string(mode) + sfx);
      }
      {
        KCase e = c;
        e.mode = 4, e.mask = MaskKind::Compressed, e.pre = 10, e.next = 2;
        add(e, "tnd_mode4" + sfx);
        e.mode = 7, e.pre = 1000, e.next = -1;
        add(e, "tnd_mode7" + sfx);
        e.mode = 8, e.pre = 1000, e.next = 3;
        add(e, "tnd_mode8" + sfx);
        e.mode = 6;
        e.pre = e.next = 2147483647;
        e.prefix.clear();
        for (size_t b = 0; b < l.q.size(); ++b) e.prefix.push_back(l.kv[b] - (l.q[b] > l.kv[b] ? l.kv[b] : l.q[b]) / 2);
        add(e, "tnd_mode6" + sfx);
      }
      {
        KCase e = c;
        e.keep_prob = 0.7, e.seed = 5, e.offset = 9, e.sink = true;
        add(e, "tnd_dropout_sink" + sfx);
        e.external_dropout = true;
        add(e, "tnd_external_dropout_sink" + sfx);
      }
    }
  // TND pse (no zero-length batches).
  for (PseKind k : {PseKind::BNSS, PseKind::BN1S, PseKind::FlatBNSS, PseKind::FlatBN1S}) {
    KCase c;
    c.layout = "TND", c.Nq = 2, c.Nkv = 1, c.D = 8, c.Dv = 8, c.qlens = {5, 66, 30}, c.kvlens = {7, 66, 20};
    c.pse = k, c.mode = 2, c.mask = MaskKind::Compressed;
    add(c, std::string("tnd_pse_") + (k == PseKind::BNSS ? "bnss" : k == PseKind::BN1S ? "bn1s" : k == PseKind::FlatBNSS ? "flat_bnss" : "flat_bn1s"));
  }
  for (int64_t cols : {0, 1040}) {
    KCase c;
    c.layout = "TND", c.Nq = 2, c.Nkv = 1, c.D = 4, c.Dv = 4, c.qlens = {1030, 40}, c.kvlens = {1030, 40};
    c.pse = PseKind::AlibiTnd, c.pse_batch1 = true, c.alibi_cols = cols, c.mode = 3, c.mask = MaskKind::Compressed;
    add(c, "tnd_pse_alibi_cols" + std::to_string(cols));
  }
  // npu_fusion_attention_v2: pse_type 0 (qk*scale + pse), generated alibi (2/3) and rope.
  for (DType t : {DType::F32, DType::BF16}) {
    KCase c;
    c.dtype = t, c.B = 2, c.Nq = 2, c.Nkv = 1, c.Sq = 66, c.Skv = 70, c.pse = PseKind::BNSS, c.pse_type = 0, c.scale = 0.3;
    add(c, "v2_pse_type0_bnss_" + dt(t));
  }
  {
    KCase c;
    c.layout = "TND", c.Nq = 2, c.Nkv = 1, c.qlens = {5, 66, 30}, c.kvlens = {7, 66, 31}, c.pse = PseKind::BN1S;
    c.pse_type = 0, c.mode = 3, c.mask = MaskKind::Compressed;
    add(c, "v2_pse_type0_tnd_bn1s");
  }
  for (DType t : {DType::F32, DType::F16})
    for (int64_t type : {2, 3})
      for (PseKind k : {PseKind::SlopesBN, PseKind::SlopesN}) {
        KCase c;
        c.dtype = t, c.B = 2, c.Nq = 4, c.Nkv = 2, c.Sq = 70, c.Skv = 70, c.pse = k, c.pse_type = type;
        if (k == PseKind::SlopesN) c.q_start = {3}, c.kv_start = {1}, c.mode = 3, c.mask = MaskKind::Compressed;
        add(c, "v2_slopes_type" + std::to_string(type) + (k == PseKind::SlopesBN ? "_bn_" : "_n_start_causal_") + dt(t));
      }
  {
    KCase c;
    c.layout = "TND", c.Nq = 2, c.Nkv = 1, c.qlens = {5, 66, 30}, c.kvlens = {7, 66, 31}, c.pse = PseKind::SlopesBN;
    c.pse_type = 2, c.q_start = {2}, c.kv_start = {0}, c.mode = 3, c.mask = MaskKind::Compressed;
    add(c, "v2_slopes_tnd");
  }
  for (const char* layout : {"BSND", "BSH", "SBH", "BNSD"})
    for (DType t : {DType::F32, DType::BF16}) {
      KCase c;
      c.layout = layout, c.dtype = t, c.B = 2, c.Nq = 4, c.Nkv = 2, c.Sq = 65, c.Skv = 70, c.D = 12, c.Dr = 5, c.Dv = 8;
      c.mode = 3, c.mask = MaskKind::Compressed, c.scale = 1.0 / std::sqrt(17.0);
      add(c, std::string("v2_rope_") + layout + "_" + dt(t));
    }
  {
    KCase c;
    c.layout = "TND", c.Nq = 2, c.Nkv = 1, c.D = 8, c.Dr = 3, c.Dv = 8, c.qlens = {3, 0, 70}, c.kvlens = {4, 5, 70};
    c.sink = true, c.keep_prob = 0.9, c.seed = 2;
    add(c, "v2_rope_tnd_sink_dropout");
  }
  // Strided 1-D sink, dropout_mask and flat pse.
  {
    KCase c;
    c.layout = "TND", c.Nq = 2, c.Nkv = 1, c.D = 8, c.Dv = 8, c.qlens = {5, 66, 30}, c.kvlens = {7, 66, 20};
    c.pse = PseKind::FlatBNSS, c.sink = true, c.keep_prob = 0.75, c.external_dropout = true, c.strided_aux = true;
    add(c, "strided_aux_tnd_flat_bnss");
    c.pse = PseKind::FlatBN1S, c.external_dropout = false, c.seed = 31;
    add(c, "strided_aux_tnd_flat_bn1s");
    KCase d;
    d.B = 2, d.Nq = 3, d.Nkv = 1, d.Sq = 65, d.Skv = 40, d.sink = true, d.keep_prob = 0.6, d.external_dropout = true;
    d.strided_aux = true;
    add(d, "strided_aux_sink_dropout");
  }
  // Empty key/value and D = 0.
  {
    KCase c;
    c.B = 2, c.Nq = 2, c.Nkv = 1, c.Sq = 5, c.Skv = 0;
    add(c, "empty_kv");
    c.Skv = 6, c.D = 0, c.Dv = 0;
    add(c, "zero_head_dim");
    KCase t;
    t.layout = "TND", t.Nq = 2, t.Nkv = 2, t.qlens = {3, 4}, t.kvlens = {5, 0};
    add(t, "tnd_batch_without_kv");
    KCase q;
    q.B = 2, q.Nq = 2, q.Nkv = 1, q.Sq = 0, q.Skv = 7;
    add(q, "empty_query");
    q.B = 0, q.Sq = 3;
    add(q, "empty_batch");
  }
  return g;
}

class KernelGrid : public ::testing::TestWithParam<KCase> {};

TEST_P(KernelGrid, MatchesReference) {
  const Worst w = run_and_check(GetParam());
  RecordProperty("worst_out_ratio", std::to_string(w.out));
  if (std::getenv("NPUFA_TEST_VERBOSE"))
    std::printf("%s worst err/tol: out %.3g max %.3g sum %.3g\n", GetParam().name.c_str(), w.out, w.mx, w.sm);
}

INSTANTIATE_TEST_SUITE_P(Grid, KernelGrid, ::testing::ValuesIn(grid()),
                         [](const ::testing::TestParamInfo<KCase>& info) {
                           std::string s = info.param.name;
                           for (char& ch : s)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = ch == '-' ? 'm' : '_';
                           return s;
                         });

// ---- metamorphic checks ------------------------------------------------------------------------

std::vector<uint8_t> out_bytes(const Bufs& r) {
  std::vector<uint8_t> b(r.out.bytes(), r.out.bytes() + r.out.numel() * test::esize(r.out.dtype));
  b.insert(b.end(), r.smax.bytes(), r.smax.bytes() + r.smax.numel() * 4);
  b.insert(b.end(), r.ssum.bytes(), r.ssum.bytes() + r.ssum.numel() * 4);
  return b;
}

TEST(Kernel, SameResultAtAnyThreadCount) {
  KCase c;
  c.dtype = DType::BF16, c.B = 2, c.Nq = 4, c.Nkv = 2, c.Sq = 130, c.Skv = 129, c.D = 16, c.Dv = 16;
  c.mode = 3, c.mask = MaskKind::Compressed, c.keep_prob = 0.9, c.seed = 3, c.sink = true;
  const int saved = get_num_threads();
  std::vector<uint8_t> first;
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    auto r = build(c, 11);
    fusion_attention_fwd(r->p);
    if (first.empty()) first = out_bytes(*r);
    else EXPECT_TRUE(first == out_bytes(*r)) << "threads " << threads;
  }
  set_num_threads(saved);
}

// In-kernel Philox bits == the external mask dropout_gen_mask makes from the same seed/offset.
TEST(Kernel, PhiloxDropoutEqualsGeneratedExternalMask) {
  KCase c;
  c.B = 2, c.Nq = 2, c.Nkv = 2, c.Sq = 40, c.Skv = 70, c.keep_prob = 0.6, c.seed = 987654321, c.offset = 12;
  auto a = build(c, 5);
  fusion_attention_fwd(a->p);
  auto b = build(c, 5);
  const int64_t numels = c.B * c.Nq * c.Sq * c.Skv;
  std::vector<uint8_t> m(static_cast<size_t>(dropout_mask_bytes(numels)));
  dropout_gen_mask(m.data(), numels, c.keep_prob, c.seed, c.offset);
  b->p.dropout_mask = TensorView(m.data(), DType::U8, {static_cast<int64_t>(m.size())});
  fusion_attention_fwd(b->p);
  EXPECT_TRUE(out_bytes(*a) == out_bytes(*b));
  // And a different seed changes the output.
  auto d = build(c, 5);
  d->p.seed = 987654322;
  fusion_attention_fwd(d->p);
  EXPECT_FALSE(out_bytes(*a) == out_bytes(*d));
}

// A TND problem equals its batches computed one by one in BNSD.
TEST(Kernel, TndEqualsPerBatchBnsd) {
  KCase c;
  c.layout = "TND", c.Nq = 2, c.Nkv = 1, c.D = 8, c.Dv = 8, c.qlens = {7, 65, 3}, c.kvlens = {9, 66, 3};
  c.mode = 3, c.mask = MaskKind::Compressed;
  auto r = build(c, 21);
  fusion_attention_fwd(r->p);
  for (int64_t b = 0; b < c.nb(); ++b) {
    const int64_t sq = c.sq(b), skv = c.skv(b);
    Tensor q(DType::F32, {1, c.Nq, sq, c.D}), k(DType::F32, {1, c.Nkv, skv, c.D}), v(DType::F32, {1, c.Nkv, skv, c.Dv});
    for (int64_t n = 0; n < c.Nq; ++n)
      for (int64_t i = 0; i < sq; ++i)
        for (int64_t d = 0; d < c.D; ++d) q.set((n * sq + i) * c.D + d, r->q.get(((c.qoff(b) + i) * c.Nq + n) * c.D + d));
    for (int64_t n = 0; n < c.Nkv; ++n)
      for (int64_t j = 0; j < skv; ++j) {
        for (int64_t d = 0; d < c.D; ++d) k.set((n * skv + j) * c.D + d, r->k.get(((c.kvoff(b) + j) * c.Nkv + n) * c.D + d));
        for (int64_t d = 0; d < c.Dv; ++d) v.set((n * skv + j) * c.Dv + d, r->v.get(((c.kvoff(b) + j) * c.Nkv + n) * c.Dv + d));
      }
    Tensor o(DType::F32, {1, c.Nq, sq, c.Dv}), mx(DType::F32, {1, c.Nq, sq, 8}), sm(DType::F32, {1, c.Nq, sq, 8});
    FusionAttentionParams p;
    p.query = q.view(), p.key = k.view(), p.value = v.view(), p.head_num = c.Nq, p.input_layout = "BNSD";
    p.scale = r->p.scale, p.sparse_mode = 3, p.atten_mask = test::triu2048().view();
    p.attention_out = o.view(), p.softmax_max = mx.view(), p.softmax_sum = sm.view();
    fusion_attention_fwd(p);
    double worst = 0;
    for (int64_t n = 0; n < c.Nq; ++n)
      for (int64_t i = 0; i < sq; ++i)
        for (int64_t d = 0; d < c.Dv; ++d)
          worst = std::max(worst, std::fabs(o.get((n * sq + i) * c.Dv + d) -
                                            r->out.get(((c.qoff(b) + i) * c.Nq + n) * c.Dv + d)));
    EXPECT_LE(worst, 1e-6) << "batch " << b;
  }
}

// ---- errors ------------------------------------------------------------------------------------

KCase small() {
  KCase c;
  c.B = 1, c.Nq = 2, c.Nkv = 1, c.Sq = 4, c.Skv = 5, c.D = 8, c.Dv = 8;
  return c;
}

template <class E>
void expect_error(const KCase& c, const std::function<void(Bufs&)>& edit, const char* what, const char* needle = nullptr) {
  auto r = build(c, 1);
  edit(*r);
  try {
    fusion_attention_fwd(r->p);
    ADD_FAILURE() << what << ": no exception";
  } catch (const E& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("npu_fusion_attention"), std::string::npos) << what << ": " << msg;
    if (needle) {
      EXPECT_NE(msg.find(needle), std::string::npos) << what << ": " << msg;
    }
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": wrong exception type: " << e.what();
  }
}

TEST(KernelErrors, TypeErrors) {
  expect_error<TypeError>(small(), [](Bufs& r) { r.p.query.dtype = DType::I32; }, "int query");
  expect_error<TypeError>(small(), [](Bufs& r) { r.p.key.dtype = DType::F16; }, "mixed dtypes");
  expect_error<TypeError>(small(), [](Bufs& r) { r.p.attention_out.dtype = DType::F16; }, "out dtype", "attention_out");
  expect_error<TypeError>(small(), [](Bufs& r) { r.p.softmax_max.dtype = DType::F16; }, "stat dtype", "softmax_max");
  {
    KCase c = small();
    c.sink = true;
    expect_error<TypeError>(c, [](Bufs& r) { r.p.sink->dtype = DType::I32; }, "sink dtype", "sink");
    c.sink = false;
    c.pse = PseKind::BNSS;
    expect_error<TypeError>(c, [](Bufs& r) { r.p.pse->dtype = DType::F16; }, "pse dtype", "pse");
    c.pse = PseKind::None;
    c.mask = MaskKind::Explicit, c.mshape = 3;
    expect_error<TypeError>(c, [](Bufs& r) { r.p.atten_mask->dtype = DType::I32; }, "mask dtype", "atten_mask");
    c.mask = MaskKind::None, c.keep_prob = 0.5, c.external_dropout = true;
    expect_error<TypeError>(c, [](Bufs& r) { r.p.dropout_mask->dtype = DType::Bool; }, "dropout_mask dtype", "dropout_mask");
  }
}

TEST(KernelErrors, ValueErrors) {
  expect_error<ValueError>(small(), [](Bufs& r) { r.p.keep_prob = 0.0; }, "keep_prob 0", "keep_prob");
  expect_error<ValueError>(small(), [](Bufs& r) { r.p.keep_prob = 1.5; }, "keep_prob 1.5", "keep_prob");
  expect_error<ValueError>(small(), [](Bufs& r) { r.p.head_num = 0; }, "head_num 0", "head_num");
  expect_error<ValueError>(small(), [](Bufs& r) { r.p.head_num = 3; }, "head_num mismatch", "head_num");
  expect_error<ValueError>(small(), [](Bufs& r) { r.p.input_layout = "BSNH"; }, "bad layout", "BSND");
  expect_error<ValueError>(small(), [](Bufs& r) { r.p.input_layout = "BSND"; }, "BSND reading of BNSD tensors");
  expect_error<ValueError>(small(), [](Bufs& r) { r.p.input_layout = "BSH"; }, "4-D for BSH", "3-D");
  expect_error<ValueError>(small(), [](Bufs& r) { r.p.attention_out.shape = {1, 2, 4, 7}; }, "out shape", "attention_out");
  expect_error<ValueError>(small(), [](Bufs& r) { r.p.softmax_layout = "TND"; }, "softmax_layout TND without TND", "softmax_layout");
  expect_error<ValueError>(small(), [](Bufs& r) { r.p.softmax_layout = "BSH"; }, "softmax_layout BSH", "softmax_layout");
  expect_error<ValueError>(small(), [](Bufs& r) { r.p.sparse_mode = 9; }, "sparse_mode 9", "sparse_mode");
  expect_error<ValueError>(small(), [](Bufs& r) { r.p.sparse_mode = 7; }, "sparse_mode 7 dense", "sparse_mode");
  expect_error<ValueError>(small(), [](Bufs& r) { r.p.padding_mask = r.p.query; }, "padding_mask", "padding_mask");
  {
    KCase c = small();
    c.Dv = 9, c.D = 8;
    expect_error<ValueError>(c, [](Bufs&) {}, "Dv > D");
    c = small();
    c.Nq = 3, c.Nkv = 2;
    expect_error<ValueError>(c, [](Bufs&) {}, "Nq % Nkv");
    c = small();
    c.layout = "BSH", c.Nq = 4, c.Nkv = 2, c.D = 6, c.Dv = 6;
    expect_error<ValueError>(c, [](Bufs& r) { r.p.head_num = 5; }, "BSH H % head_num");
    c = small();
    c.sink = true;
    expect_error<ValueError>(c, [](Bufs& r) { r.p.sink->shape = {3}; }, "sink shape", "sink");
    c = small();
    c.pse = PseKind::BNSS;
    expect_error<ValueError>(c, [](Bufs& r) { r.p.pse->shape = {1, 2, 4, 4}; }, "pse shape", "pse");
    c = small();
    c.keep_prob = 0.5, c.external_dropout = true;
    expect_error<ValueError>(c, [](Bufs& r) { r.p.dropout_mask->shape = {2}; }, "dropout_mask too small", "dropout_mask");
    c = small();
    c.mode = 3, c.mask = MaskKind::Compressed;
    expect_error<ValueError>(c, [](Bufs& r) { r.p.atten_mask->shape = {1024, 2048}; }, "compressed mask shape", "atten_mask");
  }
  {
    KCase t;
    t.layout = "TND", t.Nq = 2, t.Nkv = 1, t.qlens = {3, 4}, t.kvlens = {5, 4};
    expect_error<ValueError>(t, [](Bufs& r) { r.p.actual_seq_qlen.reset(); }, "TND without actual_seq_qlen", "actual_seq_qlen");
    expect_error<ValueError>(t, [](Bufs& r) { r.p.actual_seq_kvlen = std::vector<int64_t>{5}; }, "TND list lengths differ");
    expect_error<ValueError>(t, [](Bufs& r) { r.p.actual_seq_qlen = std::vector<int64_t>{4, 3}; }, "not cumulative", "cumulative");
    expect_error<ValueError>(t, [](Bufs& r) { r.p.actual_seq_qlen = std::vector<int64_t>{3, 8}; }, "beyond T", "actual_seq_qlen");
    expect_error<ValueError>(t, [](Bufs& r) { r.p.actual_seq_kvlen = std::vector<int64_t>{-1, 9}; }, "negative length");
    expect_error<ValueError>(t, [](Bufs& r) { r.p.sparse_mode = 5; }, "TND mode 5", "sparse_mode");
    t.pse = PseKind::BNSS, t.mode = 7, t.mask = MaskKind::Compressed, t.pre = 100, t.next = 0;
    expect_error<ValueError>(t, [](Bufs&) {}, "pse with mode 7", "pse");
    t.pse = PseKind::None, t.mode = 3, t.qlens = {6, 4}, t.kvlens = {5, 4};
    expect_error<ValueError>(t, [](Bufs&) {}, "TND mode 3 with Sq_b > Skv_b", "invalid row");
  }
}

}  // namespace
}  // namespace npufa
