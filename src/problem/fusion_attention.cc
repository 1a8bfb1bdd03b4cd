// npu_fusion_attention: every rule of spec §1.2, §1.6, §2.2, §2.5–§2.7, then the canonical problem.
// This is the only place that knows layouts, sparse-mode numbers and cumulative lengths.
#include "problem/fusion_attention.h"

#include <algorithm>
#include <cctype>
#include <tuple>
#include <string>

#include "npufa/dropout.h"
#include "npufa/error.h"
#include "problem/checks.h"

namespace npufa {
namespace {

int64_t sat(int64_t x) { return std::clamp(x, -kUnbounded, kUnbounded); }

std::string list_str(const std::vector<int64_t>& v) { return shape_str(v); }

bool is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

// Element strides as an Acc4 over (b, n, s, d) for a tensor in `layout` whose head dim is d_size.
Acc4 acc_for(const TensorView& t, Layout layout, int64_t d_size) {
  Acc4 a;
  a.base = t.data;
  switch (layout) {
    case Layout::BSH: a.sb = t.stride(0); a.ss = t.stride(1); a.sn = d_size * t.stride(2); a.sd = t.stride(2); break;
    case Layout::SBH: a.ss = t.stride(0); a.sb = t.stride(1); a.sn = d_size * t.stride(2); a.sd = t.stride(2); break;
    case Layout::BSND: a.sb = t.stride(0); a.ss = t.stride(1); a.sn = t.stride(2); a.sd = t.stride(3); break;
    case Layout::BNSD: a.sb = t.stride(0); a.sn = t.stride(1); a.ss = t.stride(2); a.sd = t.stride(3); break;
    case Layout::TND: a.sb = 0; a.ss = t.stride(0); a.sn = t.stride(1); a.sd = t.stride(2); break;
  }
  return a;
}

bool is_contiguous(const TensorView& t) { return t.strides == TensorView::contiguous_strides(t.shape); }

struct Dims {
  int64_t B = 0, Nq = 0, Nkv = 0, D = 0, Dv = 0, Sq = 0, Skv = 0;  // Sq/Skv: tensor S (TND: T)
};

Dims derive_dims(const FusionAttentionParams& p, Layout layout) {
  const char* kOp = p.op;
  const TensorView &q = p.query, &k = p.key, &v = p.value;
  const int64_t rank = (layout == Layout::BSND || layout == Layout::BNSD) ? 4 : 3;
  for (const auto* t : {&q, &k, &v}) {
    const char* name = t == &q ? "query" : t == &k ? "key" : "value";
    if (t->dim() != rank)
      fail(kOp, ": ", name, " must be ", rank, "-D for input_layout ", layout_name(layout), ", got shape ",
           shape_str(t->shape));
  }
  Dims d;
  auto same = [&](const char* what, int64_t a, int64_t b) {
    if (a != b)
      fail(kOp, ": ", what, " must match between query/key/value for input_layout ", layout_name(layout),
           ", got shapes query ", shape_str(q.shape), ", key ", shape_str(k.shape), ", value ", shape_str(v.shape));
  };
  if (layout == Layout::BSH || layout == Layout::SBH) {
    const int bi = layout == Layout::BSH ? 0 : 1, si = 1 - bi;
    d.B = q.size(bi);
    same("batch", d.B, k.size(bi));
    same("batch", d.B, v.size(bi));
    d.Sq = q.size(si);
    d.Skv = k.size(si);
    same("key/value sequence length", d.Skv, v.size(si));
    const int64_t hq = q.size(2), hk = k.size(2), hv = v.size(2);
    if (hq <= 0 || hq % p.head_num != 0)
      fail(kOp, ": query's hidden size H must be a positive multiple of head_num for input_layout ",
           layout_name(layout), ", got H = ", hq, ", head_num = ", p.head_num);
    d.Nq = p.head_num;
    d.D = hq / p.head_num;
    if (hk <= 0 || hk % d.D != 0)
      fail(kOp, ": key's hidden size must be a positive multiple of the head dim D = H/head_num = ", d.D,
           ", got key H = ", hk);
    d.Nkv = hk / d.D;
    if (hv % d.Nkv != 0)
      fail(kOp, ": value's hidden size must be a multiple of the number of key/value heads ", d.Nkv, ", got value H = ",
           hv);
    d.Dv = hv / d.Nkv;
  } else {
    const bool tnd = layout == Layout::TND;
    const int ni = layout == Layout::BNSD ? 1 : tnd ? 1 : 2, si = layout == Layout::BNSD ? 2 : tnd ? 0 : 1;
    d.B = tnd ? 0 : q.size(0);
    if (!tnd) {
      same("batch", d.B, k.size(0));
      same("batch", d.B, v.size(0));
    }
    d.Sq = q.size(si);
    d.Skv = k.size(si);
    same("key/value sequence length", d.Skv, v.size(si));
    d.Nq = q.size(ni);
    d.Nkv = k.size(ni);
    same("key/value head count", d.Nkv, v.size(ni));
    d.D = q.size(-1);
    d.Dv = v.size(-1);
    if (q.size(-1) != k.size(-1))
      fail(kOp, ": query and key head dims must be equal (Dq == Dk), got query ", shape_str(q.shape), ", key ",
           shape_str(k.shape));
    if (d.Nq != p.head_num)
      fail(kOp, ": head_num must equal query's N axis for input_layout ", layout_name(layout), ", got head_num = ",
           p.head_num, ", query shape ", shape_str(q.shape));
  }
  if (d.Dv > d.D)
    fail(kOp, ": value head dim must not exceed the query/key head dim (Dk >= Dv), got D = ", d.D, ", Dv = ", d.Dv);
  if (d.Nkv <= 0 || d.Nq % d.Nkv != 0)
    fail(kOp, ": query heads must be a multiple of key/value heads (Nq % Nkv == 0), got Nq = ", d.Nq, ", Nkv = ",
         d.Nkv);
  return d;
}

FusionAttentionShapes output_shapes(Layout layout, const Dims& d) {
  FusionAttentionShapes s;
  switch (layout) {
    case Layout::BSH: s.attention_out = {d.B, d.Sq, d.Nq * d.Dv}; break;
    case Layout::SBH: s.attention_out = {d.Sq, d.B, d.Nq * d.Dv}; break;
    case Layout::BSND: s.attention_out = {d.B, d.Sq, d.Nq, d.Dv}; break;
    case Layout::BNSD: s.attention_out = {d.B, d.Nq, d.Sq, d.Dv}; break;
    case Layout::TND: s.attention_out = {d.Sq, d.Nq, d.Dv}; break;
  }
  s.softmax_max = layout == Layout::TND ? std::vector<int64_t>{d.Sq, d.Nq, 8} : std::vector<int64_t>{d.B, d.Nq, d.Sq, 8};
  s.softmax_sum = s.softmax_max;
  return s;
}

// Canonical per-batch bands for sparse modes 0–8 (spec §1.6 table and notes).
void build_mask(const FusionAttentionParams& p, Layout layout, const Dims& d, AttnProblem& pr) {
  const char* kOp = p.op;
  const bool tnd = layout == Layout::TND;
  const int64_t mode = p.sparse_mode;
  const bool valid_mode = tnd ? (mode >= 0 && mode <= 8 && mode != 5) : (mode >= 0 && mode <= 6);
  if (mode == 9) fail(kOp, ": sparse_mode 9 (tree mask) is not supported by npufa, got sparse_mode = 9");
  if (!valid_mode)
    fail(kOp, ": sparse_mode must be one of ", tnd ? "0, 1, 2, 3, 4, 6, 7, 8 for input_layout TND"
                                                    : "0, 1, 2, 3, 4, 5, 6 for input_layout " +
                                                          std::string(layout_name(layout)),
         (mode == 7 || mode == 8) ? " (modes 7 and 8 need input_layout TND)" : "",
         (mode == 5 && tnd) ? " (mode 5 is not supported with TND; use mode 6)" : "", ", got sparse_mode = ", mode);
  if (!p.atten_mask) return;  // no mask: sparse_mode, pre/next and prefix are ignored (§1.6 note 1)

  const TensorView& m = *p.atten_mask;
  if (m.dtype != DType::Bool && m.dtype != DType::U8)
    fail<TypeError>(kOp, ": atten_mask must be bool or uint8, got ", dtype_name(m.dtype));
  const int64_t B = pr.B;
  int64_t maxq = 0, maxkv = 0, sumq = 0, sumkv = 0;
  for (const SeqSpan& s : pr.seqs) {
    maxq = std::max(maxq, s.q_len);
    maxkv = std::max(maxkv, s.kv_len);
    sumq += s.q_len;
    sumkv += s.kv_len;
  }
  const bool compressed = mode == 2 || mode == 3 || mode == 4 || mode == 6 || mode == 7 || mode == 8;
  if (compressed) {
    const int64_t rows = mode == 6 ? 3072 : 2048;
    const std::vector<int64_t> last2 = {rows, 2048};
    bool ok = m.dim() >= 2 && m.dim() <= 4 && m.size(-2) == rows && m.size(-1) == 2048;
    for (int64_t i = 0; ok && i + 2 < m.dim(); ++i) ok = m.size(i) == 1;
    if (!ok)
      fail(kOp, ": atten_mask for sparse_mode ", mode, " must be the compressed ", rows, "x2048 mask (shape [", rows,
           ", 2048], [1, ", rows, ", 2048] or [1, 1, ", rows, ", 2048]), got shape ", shape_str(m.shape));
  } else {
    // Explicit mask read element by element.
    MaskSpec& ms = pr.mask;
    ms.data = static_cast<const uint8_t*>(m.data);
    ms.row_off.assign(static_cast<size_t>(B), 0);
    ms.col_off.assign(static_cast<size_t>(B), 0);
    const std::string allowed = tnd ? "[maxSq, maxSkv] = [" + std::to_string(maxq) + ", " + std::to_string(maxkv) +
                                          "] or [sum Sq, sum Skv] = [" + std::to_string(sumq) + ", " +
                                          std::to_string(sumkv) + "]"
                                    : "[B, N, Sq, Skv], [B, 1, Sq, Skv], [1, 1, Sq, Skv] or [Sq, Skv] with B = " +
                                          std::to_string(d.B) + ", N = " + std::to_string(d.Nq) + ", Sq = " +
                                          std::to_string(d.Sq) + ", Skv = " + std::to_string(d.Skv);
    auto bad = [&] { fail(kOp, ": atten_mask must have shape ", allowed, ", got ", shape_str(m.shape)); };
    if (m.dim() != 2 && m.dim() != 4) bad();
    if (m.dim() == 4 && (tnd ? (m.size(0) != 1 || m.size(1) != 1)
                             : ((m.size(0) != d.B && m.size(0) != 1) || (m.size(1) != d.Nq && m.size(1) != 1))))
      bad();
    ms.si = m.stride(-2);
    ms.sj = m.stride(-1);
    if (m.dim() == 4) {
      ms.sb = m.size(0) == 1 ? 0 : m.stride(0);
      ms.sn = m.size(1) == 1 ? 0 : m.stride(1);
    }
    const int64_t r = m.size(-2), c = m.size(-1);
    if (!tnd) {
      if (r != d.Sq || c != d.Skv) bad();
    } else if (r == maxq && c == maxkv) {
      // local indices
    } else if ((r == sumq && c == sumkv) || (r == d.Sq && c == d.Skv)) {
      for (int64_t b = 0; b < B; ++b) {
        ms.row_off[static_cast<size_t>(b)] = pr.seqs[static_cast<size_t>(b)].q_off;
        ms.col_off[static_cast<size_t>(b)] = pr.seqs[static_cast<size_t>(b)].kv_off;
      }
    } else {
      bad();
    }
  }
  if (mode == 1) return;

  const int64_t pre = sat(p.pre_tockens), next = sat(p.next_tockens);
  if (mode == 0 || mode == 4) {  // negative pre/next (§1.6 note 5)
    const int64_t S1 = tnd ? maxq : d.Sq, S2 = tnd ? maxkv : d.Skv;
    if (pre < 0 && next < 0)
      fail(kOp, ": pre_tockens and next_tockens must not both be negative (no valid data block), got pre_tockens = ",
           p.pre_tockens, ", next_tockens = ", p.next_tockens);
    if (next < 0 && (pre < -next || -next >= S2))
      fail(kOp, ": a negative next_tockens needs pre_tockens >= |next_tockens| and |next_tockens| < Skv = ", S2,
           ", got pre_tockens = ", p.pre_tockens, ", next_tockens = ", p.next_tockens);
    if (pre < 0 && (next < -pre || -pre >= S1))
      fail(kOp, ": a negative pre_tockens needs next_tockens >= |pre_tockens| and |pre_tockens| < Sq = ", S1,
           ", got pre_tockens = ", p.pre_tockens, ", next_tockens = ", p.next_tockens);
  }
  // First/last batch with queries (modes 7/8).
  int64_t first = -1, last = -1;
  for (int64_t b = 0; b < B; ++b)
    if (pr.seqs[static_cast<size_t>(b)].q_len > 0) {
      if (first < 0) first = b;
      last = b;
    }
  if (mode == 5 || mode == 6) {
    if (!p.prefix || static_cast<int64_t>(p.prefix->size()) < B)
      fail(kOp, ": sparse_mode ", mode, " needs prefix with one entry per batch (", B, "), got ",
           p.prefix ? list_str(*p.prefix) : std::string("None"));
  }
  auto& bands = pr.mask.band;
  bands.assign(static_cast<size_t>(B), MaskSpec::Band{});
  for (int64_t b = 0; b < B; ++b) {
    const SeqSpan& s = pr.seqs[static_cast<size_t>(b)];
    const int64_t sq = s.q_len, skv = s.kv_len;
    MaskSpec::Band& bd = bands[static_cast<size_t>(b)];
    const bool nonempty = sq > 0;
    switch (mode) {
      case 0:
        if (tnd && nonempty && (next < 0 || skv + pre < sq))
          fail(kOp, ": sparse_mode 0 with TND needs next_tockens >= 0 and Skv_b + pre_tockens >= Sq_b for every batch"
                    " (no invalid rows), got batch ", b, " with Sq_b = ", sq, ", Skv_b = ", skv, ", pre_tockens = ",
               p.pre_tockens, ", next_tockens = ", p.next_tockens);
        bd.pre = pre;
        bd.next = next;
        break;
      case 2:
        bd.next = 0;
        break;
      case 3:
        if (tnd && nonempty && sq > skv)
          fail(kOp, ": sparse_mode 3 with TND needs Sq_b <= Skv_b for every batch (exist invalid row), got batch ", b,
               " with Sq_b = ", sq, ", Skv_b = ", skv);
        bd.next = skv - sq;
        break;
      case 4:
        if (tnd && nonempty && (pre < 0 || sq - next > skv))
          fail(kOp, ": sparse_mode 4 with TND needs pre_tockens >= 0 and Sq_b - next_tockens <= Skv_b for every batch,"
                    " got batch ", b, " with Sq_b = ", sq, ", Skv_b = ", skv, ", pre_tockens = ", p.pre_tockens,
               ", next_tockens = ", p.next_tockens);
        bd.pre = sat(pre + sq - skv);  // right-down anchored band in left-up coordinates
        bd.next = sat(next + skv - sq);
        break;
      case 5:
      case 6: {
        const int64_t pf = (*p.prefix)[static_cast<size_t>(b)];
        const int64_t lo = sq > skv ? 0 : skv - sq;
        if (pf < lo || pf > skv)
          fail(kOp, ": prefix[", b, "] must be in [", lo, ", ", skv, "] (", sq > skv ? "[0, Skv] when Sq > Skv" :
               "[Skv - Sq, Skv] when Sq <= Skv", "), got ", pf);
        bd.next = skv - sq;
        bd.prefix = pf;
        break;
      }
      case 7:
        if (nonempty && sq > skv)
          fail(kOp, ": sparse_mode 7 needs Sq_b <= Skv_b for every batch, got batch ", b, " with Sq_b = ", sq,
               ", Skv_b = ", skv);
        bd.next = b == last ? sat(skv - sq + next) : skv - sq;
        break;
      case 8:
        bd.next = b == first ? skv - std::max<int64_t>(sq - next, 0) : 0;
        break;
    }
  }
  if (mode == 7 && last >= 0) {
    const int64_t skv = pr.seqs[static_cast<size_t>(last)].kv_len;
    if (pre < skv || next > 0)
      fail(kOp, ": sparse_mode 7 needs pre_tockens >= Skv of the last batch (", skv,
           ") and next_tockens <= 0, got pre_tockens = ", p.pre_tockens, ", next_tockens = ", p.next_tockens);
  }
  if (mode == 8 && first >= 0) {
    const SeqSpan& s = pr.seqs[static_cast<size_t>(first)];
    if (pre < s.kv_len || s.q_len - next > s.kv_len)
      fail(kOp, ": sparse_mode 8 needs pre_tockens >= Skv of the first batch (", s.kv_len,
           ") and Sq_first - next_tockens <= Skv_first, got pre_tockens = ", p.pre_tockens, ", next_tockens = ",
           p.next_tockens, ", Sq_first = ", s.q_len);
  }
  if (mode == 4 && tnd && next < 0 && pre + next < 0)
    fail(kOp, ": sparse_mode 4 with TND needs pre_tockens + next_tockens >= 0, got pre_tockens = ", p.pre_tockens,
         ", next_tockens = ", p.next_tockens);
}

// True when the canonical mask removes every j > i (what compressed alibi needs).
bool masks_upper_triangle(const AttnProblem& pr) {
  if (pr.mask.band.empty()) return false;
  for (const auto& bd : pr.mask.band)
    if (bd.next > 0 || bd.prefix > 0) return false;
  return true;
}

// pse_type 2/3 (spec §3.2): pse holds alibi slopes; the bias is generated per (i, j).
void build_slopes(const FusionAttentionParams& p, Layout layout, const Dims& d, AttnProblem& pr) {
  const char* kOp = p.op;
  const TensorView& t = *p.pse;
  const bool tnd = layout == Layout::TND;
  if (t.dtype != DType::F32)
    fail<TypeError>(kOp, ": pse (alibi slopes for pse_type ", p.pse_type, ") must be float32, got ", dtype_name(t.dtype));
  if (!((t.dim() == 2 && t.size(0) == pr.B && t.size(1) == d.Nq) || (t.dim() == 1 && t.size(0) == d.Nq)))
    fail(kOp, ": pse (alibi slopes for pse_type ", p.pse_type, ") must have shape [B, N] = [", pr.B, ", ", d.Nq,
         "] or [N] = [", d.Nq, "], got ", shape_str(t.shape));
  if (p.sparse_mode == 7) fail(kOp, ": pse_type ", p.pse_type, " is not supported with sparse_mode 7");
  if (!tnd && d.Sq != d.Skv)
    fail(kOp, ": pse_type ", p.pse_type, " needs Sq == Skv, got Sq = ", d.Sq, ", Skv = ", d.Skv);
  auto first = [&](const std::optional<std::vector<int64_t>>& v, const char* name) -> int64_t {
    if (!v || v->empty()) return 0;
    if (v->size() != 1) fail(kOp, ": ", name, " must hold one int, got ", list_str(*v));
    return (*v)[0];
  };
  const int64_t qs = first(p.q_start_idx, "q_start_idx"), ks = first(p.kv_start_idx, "kv_start_idx");
  PseSpec& ps = pr.pse;
  ps.kind = PseSpec::Kind::Slopes;
  ps.data = t.data;
  ps.dtype = t.dtype;
  ps.sb = t.dim() == 2 ? t.stride(0) : 0;
  ps.sn = t.stride(-1);
  ps.sqrt_dist = p.pse_type == 3;
  ps.mul = 1.f;
  const bool mode8 = tnd && p.atten_mask && p.sparse_mode == 8;
  for (int64_t b = 0; b < pr.B; ++b) {
    const SeqSpan& s = pr.seqs[static_cast<size_t>(b)];
    if (mode8 && b == 0 && s.q_len - s.kv_len + qs - ks != 0)
      fail(kOp, ": pse_type ", p.pse_type, " with sparse_mode 8 needs Sq_0 - Skv_0 + q_start_idx - kv_start_idx == 0, got ",
           s.q_len, " - ", s.kv_len, " + ", qs, " - ", ks);
    if (mode8 && b > 0 && s.q_len != s.kv_len)
      fail(kOp, ": pse_type ", p.pse_type, " with sparse_mode 8 needs Sq_b == Skv_b for batches after the first, got batch ",
           b, " with ", s.q_len, " and ", s.kv_len);
    // With sparse_mode 8 the start indices apply to batch 0 only.
    ps.diag.push_back(mode8 && b > 0 ? 0 : ks - qs);
  }
}

void build_pse(const FusionAttentionParams& p, Layout layout, const Dims& d, AttnProblem& pr) {
  const char* kOp = p.op;
  if (p.pse_type < 0 || p.pse_type > 3) fail(kOp, ": pse_type must be 0, 1, 2 or 3, got ", p.pse_type);
  if (!p.pse) {
    if (p.pse_type != 1)
      fail(kOp, ": pse_type ", p.pse_type, " needs pse (",
           p.pse_type >= 2 ? "the alibi slopes, float32 [B, N] or [N]" : "the bias tensor", "), got None");
    return;
  }
  if (p.pse_type >= 2) return build_slopes(p, layout, d, pr);
  const TensorView& t = *p.pse;
  const bool tnd = layout == Layout::TND;
  if (t.dtype != p.query.dtype)
    fail<TypeError>(kOp, ": pse must have the query's dtype ", dtype_name(p.query.dtype), ", got ",
                    dtype_name(t.dtype));
  if (p.sparse_mode == 7 || p.sparse_mode == 8)
    fail(kOp, ": pse is not supported with sparse_mode ", p.sparse_mode);
  PseSpec& ps = pr.pse;
  ps.data = t.data;
  ps.dtype = t.dtype;
  ps.mul = p.pse_type == 1 ? pr.scale : 1.f;  // pse_type 1: s = (qk + pse)·scale; 0: qk·scale + pse
  int64_t maxq = 0, maxkv = 0, sum_ss = 0, sum_kv = 0;
  bool zero_len = false, square = true;
  for (const SeqSpan& s : pr.seqs) {
    maxq = std::max(maxq, s.q_len);
    maxkv = std::max(maxkv, s.kv_len);
    sum_ss += s.q_len * s.kv_len;
    sum_kv += s.kv_len;
    zero_len |= s.q_len == 0 || s.kv_len == 0;
    square &= s.q_len == s.kv_len;
  }
  if (tnd && zero_len)
    fail(kOp, ": pse is not supported when actual_seq_qlen/actual_seq_kvlen contain zero-length batches, got ",
         list_str(*p.actual_seq_qlen), " / ", list_str(*p.actual_seq_kvlen));
  const int64_t S1 = tnd ? maxq : d.Sq, S2 = tnd ? maxkv : d.Skv;
  const std::string allowed =
      std::string(tnd ? "[B or 1, N, maxSq or 1, maxSkv], [B or 1, N, 1024, S] (alibi-compressed) or 1-D [N*sum(Sq_b*Skv_b)]"
                        " / [N*sum(Skv_b)]"
                      : "[B or 1, N, Sq or 1, Skv] or [B or 1, N, 1024, Skv] (alibi-compressed, Sq > 1024)") +
      " with B = " + std::to_string(pr.B) + ", N = " + std::to_string(d.Nq) + ", Sq = " + std::to_string(S1) +
      ", Skv = " + std::to_string(S2);
  auto bad = [&] { fail(kOp, ": pse must have shape ", allowed, ", got ", shape_str(t.shape)); };
  if (tnd && t.dim() == 1) {
    ps.kind = PseSpec::Kind::Flat;
    ps.si = t.numel() == d.Nq * sum_ss ? 1 : 0;
    if (!ps.si && t.numel() != d.Nq * sum_kv) bad();
    ps.sj = t.stride(0);
    int64_t base = 0;
    for (const SeqSpan& s : pr.seqs) {
      ps.batch_base.push_back(base);
      base += d.Nq * (ps.si ? s.q_len : 1) * s.kv_len;
    }
    return;
  }
  if (t.dim() != 4 || (t.size(0) != pr.B && t.size(0) != 1) || t.size(1) != d.Nq) bad();
  ps.sb = t.size(0) == 1 ? 0 : t.stride(0);
  ps.sn = t.stride(1);
  ps.si = t.stride(2);
  ps.sj = t.stride(3);
  const bool alibi = t.size(2) == 1024 && S1 > 1024;
  if (alibi) {
    if (!square || !masks_upper_triangle(pr))
      fail(kOp, ": an alibi-compressed pse (", shape_str(t.shape), ") needs Sq == Skv", tnd ? " for every batch" : "",
           " and a lower-triangular mask (atten_mask with sparse_mode 2/3, or band with next_tockens <= 0), got Sq = ",
           S1, ", Skv = ", S2, ", sparse_mode = ", p.sparse_mode, p.atten_mask ? "" : ", atten_mask None");
    ps.rows = 1024;
    ps.cols = t.size(3);
    if (tnd) {
      if (ps.cols < maxq) bad();
      ps.kind = PseSpec::Kind::AlibiTnd;
    } else {
      if (ps.cols != d.Skv) bad();
      ps.kind = PseSpec::Kind::AlibiDense;
      ps.sq = d.Sq;
    }
    return;
  }
  if ((t.size(2) != S1 && t.size(2) != 1) || t.size(3) != S2) bad();
  if (t.size(2) == 1) ps.si = 0;
  ps.kind = PseSpec::Kind::Dense;
}

// Softmax statistics [B, Nq, Sq, 8] or [Tq, Nq, 8] (N-major data unless softmax_layout "TND", §2.3).
Acc4 stat_acc(const char* op, const TensorView& t, const char* name, const FusionAttentionCanon& c) {
  Acc4 a;
  a.base = t.data;
  if (c.layout != Layout::TND) {
    a.sb = t.stride(0); a.sn = t.stride(1); a.ss = t.stride(2); a.sd = t.stride(3);
  } else if (c.stats_t_major) {
    a.ss = t.stride(0); a.sn = t.stride(1); a.sd = t.stride(2);
  } else {
    // N-major data in a [Tq, Nq, 8] buffer: only meaningful for the plain contiguous buffer.
    if (!is_contiguous(t))
      fail(op, ": ", name, " must be contiguous for input_layout TND with softmax_layout \"\", got strides ",
           shape_str(t.strides));
    a.ss = 8; a.sn = t.size(0) * 8; a.sd = 1;
  }
  return a;
}

}  // namespace

FusionAttentionCanon canonicalize_fusion_attention(const FusionAttentionParams& p, bool with_outputs) {
  const char* kOp = p.op;
  FusionAttentionCanon c;
  const Layout layout = parse_training_layout(p.input_layout, kOp);
  c.layout = layout;
  const bool tnd = layout == Layout::TND;
  if (p.head_num <= 0) fail(kOp, ": head_num must be > 0, got ", p.head_num);
  if (!is_float(p.query.dtype))
    fail<TypeError>(kOp, ": query must be float16, bfloat16 or float32, got ", dtype_name(p.query.dtype));
  if (p.key.dtype != p.query.dtype || p.value.dtype != p.query.dtype)
    fail<TypeError>(kOp, ": query, key and value must have the same dtype, got ", dtype_name(p.query.dtype), ", ",
                    dtype_name(p.key.dtype), ", ", dtype_name(p.value.dtype));
  if (!(p.keep_prob > 0.0 && p.keep_prob <= 1.0))
    fail(kOp, ": keep_prob must be in (0, 1], got ", p.keep_prob);
  if (p.padding_mask) fail(kOp, ": padding_mask is not supported (torch_npu: pass None)");
  if (p.inner_precise < 0 || p.inner_precise > 3)
    fail(kOp, ": inner_precise must be 0, 1, 2 or 3 (invalid-row correction is always on in npufa), got ",
         p.inner_precise);
  std::string sl = p.softmax_layout;
  for (char& ch : sl) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  if (sl != "" && sl != "TND")
    fail(kOp, ": softmax_layout must be \"\" or \"TND\", got \"", p.softmax_layout, "\"");
  if (sl == "TND" && !tnd)
    fail(kOp, ": softmax_layout \"TND\" needs input_layout TND, got input_layout ", layout_name(layout));

  const Dims d = derive_dims(p, layout);
  if (p.query_rope.has_value() != p.key_rope.has_value())
    fail(kOp, ": query_rope and key_rope must be given together, got ", p.query_rope ? "query_rope only" : "key_rope only");
  c.shapes = output_shapes(layout, d);
  AttnProblem& pr = c.problem;
  pr.dtype = pr.out_dtype = p.query.dtype;
  pr.Nq = d.Nq;
  pr.Nkv = d.Nkv;
  pr.G = d.Nq / d.Nkv;
  pr.D = d.D;
  pr.Dv = d.Dv;
  pr.scale = static_cast<float>(p.scale);

  // Sequences.
  if (tnd) {
    if (!p.actual_seq_qlen || !p.actual_seq_kvlen || p.actual_seq_qlen->empty() || p.actual_seq_kvlen->empty())
      fail(kOp, ": input_layout TND needs actual_seq_qlen and actual_seq_kvlen (cumulative lengths), got ",
           p.actual_seq_qlen ? list_str(*p.actual_seq_qlen) : std::string("None"), " and ",
           p.actual_seq_kvlen ? list_str(*p.actual_seq_kvlen) : std::string("None"));
    const auto &cq = *p.actual_seq_qlen, &ck = *p.actual_seq_kvlen;
    if (cq.size() != ck.size())
      fail(kOp, ": actual_seq_qlen and actual_seq_kvlen must have the same length (one entry per batch), got ",
           list_str(cq), " and ", list_str(ck));
    check_cumulative(p.op, cq, "actual_seq_qlen", d.Sq, "query's");
    check_cumulative(p.op, ck, "actual_seq_kvlen", d.Skv, "key's");
    pr.B = static_cast<int64_t>(cq.size());
    int64_t pq = 0, pk = 0;
    for (size_t b = 0; b < cq.size(); ++b) {
      SeqSpan s;
      s.q_len = std::max<int64_t>(cq[b] - pq, 0);
      s.kv_len = std::max<int64_t>(ck[b] - pk, 0);
      s.q_off = s.q_len ? pq : 0;
      s.kv_off = s.kv_len ? pk : 0;
      pr.seqs.push_back(s);
      c.rows_covered = std::max(c.rows_covered, cq[b]);
      c.kv_rows_covered = std::max(c.kv_rows_covered, ck[b]);
      pq = cq[b];
      pk = ck[b];
    }
    // numels on the raw lists, as torch_npu computes it (§2.4).
    int64_t acc = cq[0] * ck[0];
    for (size_t i = 1; i < cq.size(); ++i) acc += (cq[i] - cq[i - 1]) * (ck[i] - ck[i - 1]);
    c.numels = d.Nq * acc;
  } else {
    pr.B = d.B;
    pr.seqs.assign(static_cast<size_t>(d.B), SeqSpan{0, d.Sq, 0, d.Skv});
    c.numels = d.B * d.Nq * d.Sq * d.Skv;
  }
  if (d.D == 0)  // nothing to multiply: same result as empty KV (§1.8)
    for (SeqSpan& s : pr.seqs) s.kv_len = 0;

  pr.q = acc_for(p.query, layout, d.D);
  if (p.query_rope) {  // MLA rope (§3.3): same layout as query/key, own head dim
    const TensorView &qr = *p.query_rope, &kr = *p.key_rope;
    for (auto [t, ref, name] : {std::tuple{&qr, &p.query, "query_rope"}, std::tuple{&kr, &p.key, "key_rope"}}) {
      if (t->dtype != p.query.dtype)
        fail<TypeError>(kOp, ": ", name, " must have the query's dtype ", dtype_name(p.query.dtype), ", got ",
                        dtype_name(t->dtype));
      bool ok = t->dim() == ref->dim();
      for (int64_t i = 0; ok && i + 1 < t->dim(); ++i) ok = t->size(i) == ref->size(i);
      if (!ok)
        fail(kOp, ": ", name, " must match ", name == std::string("query_rope") ? "query" : "key",
             "'s shape except the last dim, got ", shape_str(t->shape), " vs ", shape_str(ref->shape));
    }
    const bool hidden = layout == Layout::BSH || layout == Layout::SBH;
    pr.Dr = hidden ? qr.size(-1) / d.Nq : qr.size(-1);
    if ((hidden && qr.size(-1) % d.Nq != 0) || kr.size(-1) != (hidden ? d.Nkv * pr.Dr : pr.Dr))
      fail(kOp, ": query_rope and key_rope must have one rope head dim for all heads, got ", shape_str(qr.shape),
           " and ", shape_str(kr.shape));
    pr.qr = acc_for(qr, layout, pr.Dr);
    pr.kr = acc_for(kr, layout, pr.Dr);
  }
  pr.k = acc_for(p.key, layout, d.D);
  pr.v = acc_for(p.value, layout, d.Dv);

  build_mask(p, layout, d, pr);
  build_pse(p, layout, d, pr);

  if (p.sink) {
    const TensorView& s = *p.sink;
    if (s.dtype != DType::F32) fail<TypeError>(kOp, ": sink must be float32, got ", dtype_name(s.dtype));
    if (s.dim() != 1 || s.size(0) != d.Nq)
      fail(kOp, ": sink must have shape [head_num] = [", d.Nq, "], got ", shape_str(s.shape));
    for (int64_t n = 0; n < d.Nq; ++n) pr.sink.push_back(static_cast<const float*>(s.data)[n * s.stride(0)]);
  }

  // Dropout (§2.4): element order [B, Nq, Sq, Skv], TND per-batch [Nq, Sq_b, Skv_b] blocks.
  DropoutSpec& dr = pr.dropout;
  int64_t total = 0;
  for (const SeqSpan& s : pr.seqs) {
    dr.batch_base.push_back(total);
    total += d.Nq * s.q_len * s.kv_len;
  }
  if (p.keep_prob < 1.0) {
    dr.keep_prob = p.keep_prob;
    if (p.dropout_mask) {
      const TensorView& m = *p.dropout_mask;
      if (m.dtype != DType::U8) fail<TypeError>(kOp, ": dropout_mask must be uint8 (bit-packed), got ", dtype_name(m.dtype));
      if (m.dim() != 1 && !is_contiguous(m))
        fail(kOp, ": dropout_mask must be 1-D or contiguous, got shape ", shape_str(m.shape), " strides ",
             shape_str(m.strides));
      if (m.numel() < (total + 7) / 8)
        fail(kOp, ": dropout_mask must hold at least ceil(", total, " / 8) = ", (total + 7) / 8,
             " bytes (one bit per element of [B, N, Sq, Skv]), got ", m.numel());
      dr.kind = DropoutSpec::Kind::External;
      dr.mask = static_cast<const uint8_t*>(m.data);
      dr.mask_stride = m.dim() == 1 ? m.stride(0) : 1;
    } else {
      dr.kind = DropoutSpec::Kind::Philox;
      dr.seed = static_cast<uint64_t>(p.seed);
      dr.offset = static_cast<uint64_t>(p.offset);
    }
  }

  c.stats_t_major = sl == "TND";
  if (with_outputs) {
    check_tensor(kOp, p.attention_out, "attention_out", p.query.dtype, c.shapes.attention_out);
    check_tensor(kOp, p.softmax_max, "softmax_max", DType::F32, c.shapes.softmax_max);
    check_tensor(kOp, p.softmax_sum, "softmax_sum", DType::F32, c.shapes.softmax_sum);
    pr.out = acc_for(p.attention_out, layout, d.Dv);
    pr.smax = stat_acc(kOp, p.softmax_max, "softmax_max", c);
    pr.ssum = stat_acc(kOp, p.softmax_sum, "softmax_sum", c);
  }
  return c;
}

FusionAttentionGradCanon canonicalize_fusion_attention_grad(const FusionAttentionGradParams& g) {
  const char* op = g.fwd.op;  // the caller names the grad entry ("npu_fusion_attention_grad", ...)
  FusionAttentionGradCanon gc;
  gc.fwd = canonicalize_fusion_attention(g.fwd, false);
  FusionAttentionCanon& c = gc.fwd;
  AttnProblem& pr = c.problem;
  const FusionAttentionParams& p = g.fwd;
  check_tensor(op, g.dy, "dy", p.query.dtype, c.shapes.attention_out);
  for (auto [t, name] : {std::pair{&g.softmax_max, "softmax_max"}, std::pair{&g.softmax_sum, "softmax_sum"},
                         std::pair{&g.attention_in, "attention_in"}})
    if (!*t)
      fail(op, ": ", name, " is required (the forward's ", name == std::string("attention_in") ? "attention_out" : name,
           "), got None");
  check_tensor(op, *g.softmax_max, "softmax_max", DType::F32, c.shapes.softmax_max);
  check_tensor(op, *g.softmax_sum, "softmax_sum", DType::F32, c.shapes.softmax_sum);
  check_tensor(op, *g.attention_in, "attention_in", p.query.dtype, c.shapes.attention_out);
  if (pr.dropout.kind == DropoutSpec::Kind::Philox && g.numels != c.numels)
    fail(op, ": numels must be the forward's mask length for these shapes (", c.numels,
         ") when keep_prob < 1, got ", g.numels);
  pr.smax = stat_acc(op, *g.softmax_max, "softmax_max", c);
  pr.ssum = stat_acc(op, *g.softmax_sum, "softmax_sum", c);

  check_tensor(op, g.dq, "dq", p.query.dtype, p.query.shape);
  check_tensor(op, g.dk, "dk", p.key.dtype, p.key.shape);
  check_tensor(op, g.dv, "dv", p.value.dtype, p.value.shape);
  BwdIO& io = gc.io;
  io.dy = acc_for(g.dy, c.layout, pr.Dv);
  io.o = acc_for(*g.attention_in, c.layout, pr.Dv);
  io.dq = acc_for(g.dq, c.layout, pr.D);
  io.dk = acc_for(g.dk, c.layout, pr.D);
  io.dv = acc_for(g.dv, c.layout, pr.Dv);
  if (p.pse && pr.pse.kind != PseSpec::Kind::Slopes) {  // generated alibi: no gradient for the slopes
    if (!g.dpse) fail(op, ": dpse output is required when pse is given");
    // dpse is accumulated in the pse's element-offset space: both must be plain contiguous.
    if (!is_contiguous(*p.pse))
      fail(op, ": pse must be contiguous for the backward, got strides ", shape_str(p.pse->strides));
    check_tensor(op, *g.dpse, "dpse", p.pse->dtype, p.pse->shape);
    if (!is_contiguous(*g.dpse)) fail(op, ": dpse must be contiguous");
    io.dpse_numel = p.pse->numel();
  }
  if (p.query_rope) {
    if (!g.dq_rope || !g.dk_rope) fail(op, ": dq_rope/dk_rope outputs are required when query_rope/key_rope are given");
    check_tensor(op, *g.dq_rope, "dq_rope", p.query.dtype, p.query_rope->shape);
    check_tensor(op, *g.dk_rope, "dk_rope", p.query.dtype, p.key_rope->shape);
    io.dq_rope = acc_for(*g.dq_rope, c.layout, pr.Dr);
    io.dk_rope = acc_for(*g.dk_rope, c.layout, pr.Dr);
  }
  if (p.sink) {
    if (!g.dsink) fail(op, ": dsink output is required when sink is given");
    check_tensor(op, *g.dsink, "dsink", DType::F32, {pr.Nq});
    if (g.dsink->stride(0) != 1) fail(op, ": dsink must be contiguous");
    io.dsink = static_cast<float*>(g.dsink->data);
  }
  return gc;
}

}  // namespace npufa
