#include "reference/reference_attention.h"

#include <cfloat>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "npufa/dropout.h"

namespace npufa::ref {

double half_to_double(uint16_t h) {
  const int sign = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  double v;
  if (e == 0) v = std::ldexp(static_cast<double>(m), -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = std::ldexp(static_cast<double>(m + 1024), e - 25);
  return sign ? -v : v;
}

double bf16_to_double(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

double load_as_double(const void* base, DType t, int64_t idx) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(base)[idx];
    case DType::F64: return static_cast<const double*>(base)[idx];
    case DType::F16: return half_to_double(static_cast<const uint16_t*>(base)[idx]);
    case DType::BF16: return bf16_to_double(static_cast<const uint16_t*>(base)[idx]);
    default: throw std::logic_error("reference: unsupported dtype");
  }
}

double reference_pse(const AttnProblem& p, int64_t b, int64_t n, int64_t i, int64_t j) {
  const PseSpec& ps = p.pse;
  auto at = [&](int64_t idx) { return load_as_double(ps.data, ps.dtype, idx); };
  switch (ps.kind) {
    case PseSpec::Kind::None:
      return 0.0;
    case PseSpec::Kind::Dense:  // [B or 1, N, Sq or 1, Skv]; broadcast axes have stride 0
      return at(b * ps.sb + n * ps.sn + i * ps.si + j * ps.sj);
    case PseSpec::Kind::AlibiDense:
    case PseSpec::Kind::AlibiTnd: {
      // The stored [1024, S] block C is Toeplitz: any C[r][c] with (R + r) - c = i - j holds the
      // value (§2.5), R = S - 1024. Read it in the last stored row: c = S - 1 - (i - j).
      const int64_t d = i - j;
      if (d < 0 || d > ps.cols - 1)
        throw std::logic_error("reference: alibi pse read outside the causal triangle, i - j = " + std::to_string(d));
      return at(b * ps.sb + n * ps.sn + (ps.rows - 1) * ps.si + (ps.cols - 1 - d) * ps.sj);
    }
    case PseSpec::Kind::Flat: {
      // Per batch, packed one after the other: [Nq, Sq_b, Skv_b] (BNSS-like, si != 0) or
      // [Nq, Skv_b] (BN1S-like, si == 0).
      const bool per_row = ps.si != 0;
      int64_t base = 0;
      for (int64_t bb = 0; bb < b; ++bb) {
        const SeqSpan& s = p.seqs[static_cast<size_t>(bb)];
        base += p.Nq * (per_row ? s.q_len : 1) * s.kv_len;
      }
      const SeqSpan& s = p.seqs[static_cast<size_t>(b)];
      return at((base + (per_row ? (n * s.q_len + i) * s.kv_len : n * s.kv_len) + j) * ps.sj);  // sj: element stride
    }
    case PseSpec::Kind::Slopes: {
      // pse_type 2/3 (§3.2): -slope[b, n] * |j - i + kv_start - q_start| (sqrt of it for type 3);
      // diag[b] = kv_start - q_start as resolved per batch.
      const double slope = load_as_double(ps.data, DType::F32, b * ps.sb + n * ps.sn);
      const double dist = std::fabs(static_cast<double>(j - i + ps.diag[static_cast<size_t>(b)]));
      return -slope * (ps.sqrt_dist ? std::sqrt(dist) : dist);
    }
  }
  throw std::logic_error("reference: unknown pse kind");
}

int reference_keep(const AttnProblem& p, int64_t b, int64_t n, int64_t i, int64_t j) {
  const DropoutSpec& dr = p.dropout;
  if (dr.kind == DropoutSpec::Kind::None) return 1;
  // Element order (§2.4): [B, Nq, Sq, Skv]; TND: per-batch [Nq, Sq_b, Skv_b] blocks.
  uint64_t e = 0;
  for (int64_t bb = 0; bb < b; ++bb) {
    const SeqSpan& s = p.seqs[static_cast<size_t>(bb)];
    e += static_cast<uint64_t>(p.Nq * s.q_len * s.kv_len);
  }
  const SeqSpan& s = p.seqs[static_cast<size_t>(b)];
  e += static_cast<uint64_t>((n * s.q_len + i) * s.kv_len + j);
  if (dr.kind == DropoutSpec::Kind::External) return (dr.mask[static_cast<int64_t>(e / 8) * dr.mask_stride] >> (e % 8)) & 1;
  return dropout_keep(dr.seed, dr.offset, dr.keep_prob, e) ? 1 : 0;
}

RefResult reference_attention(const AttnProblem& p) {
  RefResult r;
  r.B = p.B;
  r.Nq = p.Nq;
  r.Dv = p.Dv;
  int64_t rows = 0;
  for (const SeqSpan& s : p.seqs) {
    r.q_len.push_back(s.q_len);
    r.row_base.push_back(rows);
    rows += p.Nq * s.q_len;
  }
  r.out.assign(static_cast<size_t>(rows * p.Dv), 0.0);
  r.max.assign(static_cast<size_t>(rows), 0.0);
  r.sum.assign(static_cast<size_t>(rows), 0.0);

  const double scale = p.scale;
  const double keep_prob = p.dropout.kind == DropoutSpec::Kind::None ? 1.0 : p.dropout.keep_prob;
  std::vector<double> s, q;
  std::vector<char> kept;
  for (int64_t b = 0; b < p.B; ++b) {
    const SeqSpan& sp = p.seqs[static_cast<size_t>(b)];
    for (int64_t n = 0; n < p.Nq; ++n) {
      const int64_t nk = n / p.G;  // GQA: contiguous groups (§1.3)
      for (int64_t i = 0; i < sp.q_len; ++i) {
        const int64_t row = r.row(b, n, i);
        double* o = r.out.data() + row * p.Dv;  // (Dv may be 0)
        if (sp.kv_len == 0) continue;  // empty KV: zeros (§1.8)
        q.resize(static_cast<size_t>(p.D));
        for (int64_t d = 0; d < p.D; ++d) q[static_cast<size_t>(d)] = load_as_double(p.q.base, p.dtype, p.q.at(b, n, sp.q_off + i, d));
        s.assign(static_cast<size_t>(sp.kv_len), 0.0);
        kept.assign(static_cast<size_t>(sp.kv_len), 0);
        bool any = false;
        double m = -INFINITY;
        for (int64_t j = 0; j < sp.kv_len; ++j) {
          if (p.mask.masked(b, n, i, j)) continue;
          double x = 0.0;
          for (int64_t d = 0; d < p.D; ++d)
            x += q[static_cast<size_t>(d)] * load_as_double(p.k.base, p.dtype, p.k.at(b, nk, sp.kv_off + j, d));
          for (int64_t d = 0; d < p.Dr; ++d)  // MLA rope: q.k += q_rope.k_rope (§1.4)
            x += load_as_double(p.qr.base, p.dtype, p.qr.at(b, n, sp.q_off + i, d)) *
                 load_as_double(p.kr.base, p.dtype, p.kr.at(b, nk, sp.kv_off + j, d));
          double sc = x * scale;
          if (p.pse.kind != PseSpec::Kind::None) sc += reference_pse(p, b, n, i, j) * static_cast<double>(p.pse.mul);
          s[static_cast<size_t>(j)] = sc;
          kept[static_cast<size_t>(j)] = 1;
          any = true;
          m = std::max(m, sc);
        }
        if (!any) {  // fully masked row: corrected (project decision 4)
          r.max[static_cast<size_t>(row)] = -static_cast<double>(FLT_MAX);
          r.sum[static_cast<size_t>(row)] = static_cast<double>(FLT_MAX);
          continue;
        }
        double l = 0.0;
        for (int64_t j = 0; j < sp.kv_len; ++j)
          if (kept[static_cast<size_t>(j)]) l += std::exp(s[static_cast<size_t>(j)] - m);
        if (!p.sink.empty()) l += std::exp(static_cast<double>(p.sink[static_cast<size_t>(n)]) - m);
        for (int64_t j = 0; j < sp.kv_len; ++j) {
          if (!kept[static_cast<size_t>(j)]) continue;
          const double pj = std::exp(s[static_cast<size_t>(j)] - m) / l * reference_keep(p, b, n, i, j) / keep_prob;
          if (pj == 0.0) continue;
          for (int64_t d = 0; d < p.Dv; ++d)
            o[d] += pj * load_as_double(p.v.base, p.dtype, p.v.at(b, nk, sp.kv_off + j, d));
        }
        r.max[static_cast<size_t>(row)] = m;
        r.sum[static_cast<size_t>(row)] = l;
      }
    }
  }
  return r;
}

}  // namespace npufa::ref
