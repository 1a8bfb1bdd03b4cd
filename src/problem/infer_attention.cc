// PFA / IFA / FIA v1 / FIA v2: every rule of spec §1, §5–§8, §11, §12 (conventions in
// docs/inference.md), then the canonical problem. The only place that knows inference layouts,
// sparse-mode numbers, paged caches, padding and prefixes.
#include "problem/infer_attention.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <string>
#include <utility>

#include "core/convert.h"
#include "npufa/error.h"
#include "problem/checks.h"
#include "problem/infer_quant.h"

namespace npufa {
namespace {

// Axis orders of the inference tensors. NBSD only ever describes an output.
enum class Ax { BSH, BSND, BNSD, TND, NTD, NBSD };

struct LayoutInfo {
  const char* name;
  Ax in, out;
};
constexpr std::array<LayoutInfo, 13> kLayouts = {{{"BSH", Ax::BSH, Ax::BSH},
                                                  {"BSND", Ax::BSND, Ax::BSND},
                                                  {"BNSD", Ax::BNSD, Ax::BNSD},
                                                  {"BNSD_BSND", Ax::BNSD, Ax::BSND},
                                                  {"BSH_BNSD", Ax::BSH, Ax::BNSD},
                                                  {"BSND_BNSD", Ax::BSND, Ax::BNSD},
                                                  {"BSH_NBSD", Ax::BSH, Ax::NBSD},
                                                  {"BSND_NBSD", Ax::BSND, Ax::NBSD},
                                                  {"BNSD_NBSD", Ax::BNSD, Ax::NBSD},
                                                  {"TND", Ax::TND, Ax::TND},
                                                  {"TND_NTD", Ax::TND, Ax::NTD},
                                                  {"NTD_TND", Ax::NTD, Ax::TND},
                                                  {"NTD", Ax::NTD, Ax::NTD}}};

bool packed(Ax a) { return a == Ax::TND || a == Ax::NTD; }
bool is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }
int64_t sat(int64_t x) { return std::clamp(x, -kUnbounded, kUnbounded); }

LayoutInfo parse_layout(const InferAttentionParams& p) {
  std::string up = p.input_layout;
  for (char& c : up) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  std::vector<std::string> allowed;
  switch (p.kind) {
    case InferOp::Prompt: allowed = {"BSH", "BSND", "BNSD", "BNSD_BSND", "TND"}; break;
    case InferOp::Incre: allowed = {"BSH", "BSND", "BNSD"}; break;
    default:
      for (const LayoutInfo& l : kLayouts) allowed.push_back(l.name);
  }
  if (std::find(allowed.begin(), allowed.end(), up) != allowed.end())
    for (const LayoutInfo& l : kLayouts)
      if (up == l.name) return l;
  std::string list;
  for (const std::string& a : allowed) list += (list.empty() ? "" : ", ") + a;
  fail(p.op, ": input_layout must be one of ", list, " (case-insensitive), got \"", p.input_layout, "\"");
}

// Element strides over (b, n, s, d) of a tensor with axis order `a`; BSH splits H as N x d_size.
Acc4 acc_of(const TensorView& t, Ax a, int64_t d_size) {
  Acc4 r;
  r.base = t.data;
  switch (a) {
    case Ax::BSH: r.sb = t.stride(0); r.ss = t.stride(1); r.sn = d_size * t.stride(2); r.sd = t.stride(2); break;
    case Ax::BSND: r.sb = t.stride(0); r.ss = t.stride(1); r.sn = t.stride(2); r.sd = t.stride(3); break;
    case Ax::BNSD: r.sb = t.stride(0); r.sn = t.stride(1); r.ss = t.stride(2); r.sd = t.stride(3); break;
    case Ax::TND: r.ss = t.stride(0); r.sn = t.stride(1); r.sd = t.stride(2); break;
    case Ax::NTD: r.sn = t.stride(0); r.ss = t.stride(1); r.sd = t.stride(2); break;
    case Ax::NBSD: r.sn = t.stride(0); r.sb = t.stride(1); r.ss = t.stride(2); r.sd = t.stride(3); break;
  }
  return r;
}

// Shape of a tensor with axis order `a`.
std::vector<int64_t> shape_of(Ax a, int64_t B, int64_t N, int64_t S, int64_t D) {
  switch (a) {
    case Ax::BSH: return {B, S, N * D};
    case Ax::BSND: return {B, S, N, D};
    case Ax::BNSD: return {B, N, S, D};
    case Ax::TND: return {S, N, D};
    case Ax::NTD: return {N, S, D};
    case Ax::NBSD: return {N, B, S, D};
  }
  return {};
}

// A q/k/v-like tensor with axis order `a`: its (B, N, S, D), N given for BSH (H split by it).
struct Dims4 {
  int64_t B = 1, N = 0, S = 0, D = 0;
};
Dims4 dims_of(const char* op, const TensorView& t, const char* name, Ax a, int64_t n_bsh, const char* layout,
              const char* n_name = "num_key_value_heads") {
  const int64_t rank = (a == Ax::BSND || a == Ax::BNSD) ? 4 : 3;
  if (t.dim() != rank)
    fail(op, ": ", name, " must be ", rank, "-D for input_layout ", layout, ", got shape ", shape_str(t.shape));
  Dims4 d;
  switch (a) {
    case Ax::BSH:
      d.B = t.size(0), d.S = t.size(1), d.N = n_bsh;
      if (n_bsh <= 0 || t.size(2) % n_bsh != 0)
        fail(op, ": ", name, " hidden size H = ", t.size(2), " must be a multiple of ", n_name, " = ", n_bsh,
             " for input_layout ", layout, ", got ", name, " shape ", shape_str(t.shape));
      d.D = t.size(2) / n_bsh;
      break;
    case Ax::BSND: d.B = t.size(0), d.S = t.size(1), d.N = t.size(2), d.D = t.size(3); break;
    case Ax::BNSD: d.B = t.size(0), d.N = t.size(1), d.S = t.size(2), d.D = t.size(3); break;
    case Ax::TND: d.S = t.size(0), d.N = t.size(1), d.D = t.size(2); break;
    case Ax::NTD: d.N = t.size(0), d.S = t.size(1), d.D = t.size(2); break;
    case Ax::NBSD: break;
  }
  return d;
}

// Per-batch lengths: one entry broadcasts, otherwise the first B entries; each in [0, S].
std::vector<int64_t> per_batch(const char* op, const std::vector<int64_t>& v, const char* name, int64_t B, int64_t S,
                               const char* sname) {
  if (v.size() != 1 && static_cast<int64_t>(v.size()) < B)
    fail(op, ": ", name, " must hold 1 or at least B = ", B, " lengths, got ", v.size(), " (", shape_str(v), ")");
  std::vector<int64_t> r(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t x = v[v.size() == 1 ? 0 : static_cast<size_t>(b)];
    if (x < 0 || (S >= 0 && x > S))
      fail(op, ": ", name, " must lie in [0, ", sname, "]", S >= 0 ? " = [0, " + std::to_string(S) + "]" : "",
           ", got ", x, " for batch ", b);
    r[static_cast<size_t>(b)] = x;
  }
  return r;
}

// Cumulative lengths -> (start, length) per batch.
std::vector<std::pair<int64_t, int64_t>> from_cumulative(const char* op, const std::vector<int64_t>& c,
                                                         const char* name, int64_t T, const char* tname) {
  check_cumulative(op, c, name, T, tname);
  std::vector<std::pair<int64_t, int64_t>> r;
  int64_t prev = 0;
  for (int64_t x : c) {
    r.emplace_back(prev, std::max<int64_t>(0, x - prev));
    prev = std::max(prev, x);
  }
  return r;
}

int64_t first_i64(const char* op, const TensorView& t, const char* name) {
  if (t.dtype != DType::I64 && t.dtype != DType::I32)
    fail<TypeError>(op, ": ", name, " must be an int64 tensor, got ", dtype_name(t.dtype));
  if (t.numel() < 1) fail(op, ": ", name, " must hold at least one element, got shape ", shape_str(t.shape));
  const int64_t x = t.dtype == DType::I64 ? *static_cast<const int64_t*>(t.data) : *static_cast<const int32_t*>(t.data);
  return std::max<int64_t>(0, x);  // negative => 0 (spec §12.1)
}

// The op's own names for the arguments the Params struct holds under FIA v1's names.
struct ArgNames {
  const char *heads = "num_heads", *qlen = "actual_seq_lengths", *kvlen = "actual_seq_lengths_kv";
};
ArgNames arg_names(InferOp k) {
  if (k == InferOp::FusedV2) return {"num_query_heads", "actual_seq_qlen", "actual_seq_kvlen"};
  if (k == InferOp::Incre) return {"num_heads", "(none)", "actual_seq_lengths"};
  return {};
}

struct Ctx {
  const InferAttentionParams& p;
  const char* op;
  LayoutInfo lay;
  ArgNames an = arg_names(p.kind);
  bool decode = false;  // decode semantics: sparse_mode / pre / next ignored (spec §7.2)
  bool left_q = false, left_kv = false;
  int64_t Sq = 0, T = 0;  // query S (TND: T)
  int64_t B = 0, Nq = 0, Nkv = 0, D = 0, Dv = 0;
  int64_t max_q = 0, max_kv = 0;
};

// The paged K/V/rope pool accessor for a (blocknum, bs, N·d) or (blocknum, N, bs, d) cache.
Acc4 paged_acc(const Ctx& c, const TensorView& t, const char* name, const TensorView& bt, int64_t* d_out) {
  const char* op = c.op;
  const int64_t bs = c.p.block_size;
  Acc4 a;
  a.base = t.data;
  a.table = static_cast<const int32_t*>(bt.data);
  a.tsb = bt.stride(0);
  a.tsw = bt.stride(1);
  a.bs = bs;
  if ((bs & (bs - 1)) == 0) a.bs_shift = __builtin_ctzll(static_cast<unsigned long long>(bs));
  if (t.dim() == 3) {
    if (t.size(1) != bs || t.size(2) % c.Nkv != 0)
      fail(op, ": paged ", name, " must have shape (blocknum, block_size = ", bs, ", num_key_value_heads x D) with ",
           c.Nkv, " KV heads, got ", shape_str(t.shape));
    *d_out = t.size(2) / c.Nkv;
    a.sblk = t.stride(0), a.ss = t.stride(1), a.sn = *d_out * t.stride(2), a.sd = t.stride(2);
  } else if (t.dim() == 4) {
    if (t.size(1) != c.Nkv || t.size(2) != bs)
      fail(op, ": paged ", name, " must have shape (blocknum, num_key_value_heads = ", c.Nkv, ", block_size = ", bs,
           ", D), got ", shape_str(t.shape));
    *d_out = t.size(3);
    a.sblk = t.stride(0), a.sn = t.stride(1), a.ss = t.stride(2), a.sd = t.stride(3);
  } else {
    fail(op, ": paged ", name, " must be (blocknum, block_size, H) or (blocknum, N, block_size, D)",
         t.dim() == 5 ? " (the NZ cache layout is not supported by npufa)" : "", ", got shape ", shape_str(t.shape));
  }
  return a;
}

void build_mask(Ctx& c, AttnProblem& pr) {
  const InferAttentionParams& p = c.p;
  const char* op = c.op;
  int64_t mode = p.sparse_mode;
  if (!c.decode) {
    if (p.kind == InferOp::Prompt && mode >= 10 && mode <= 14) mode -= 10;  // high-precision aliases (§5.3)
    if (mode == 9) fail(op, ": sparse_mode 9 (tree mask) is not supported by npufa, got sparse_mode = 9");
    if (mode < 0 || mode > 4)
      fail(op, ": sparse_mode must be one of 0, 1, 2, 3, 4", p.kind == InferOp::Prompt ? " (or 10-14)" : "",
           " for ", p.kind == InferOp::Prompt ? "npu_prompt_flash_attention" : "a query of more than one row",
           ", got sparse_mode = ", p.sparse_mode);
    if (mode >= 1 && !p.atten_mask) fail(op, ": sparse_mode ", mode, " needs atten_mask, got None");
  }
  if (!p.atten_mask) return;  // no mask: nothing masked, pre/next ignored (§1.6 note 1)
  const TensorView& m = *p.atten_mask;
  if (m.dtype != DType::Bool && m.dtype != DType::U8 && m.dtype != DType::I8)
    fail<TypeError>(op, ": atten_mask must be bool, int8 or uint8, got ", dtype_name(m.dtype));
  const int64_t B = pr.B;
  MaskSpec& ms = pr.mask;
  const bool compressed = !c.decode && mode >= 2;
  if (compressed) {
    bool ok = m.dim() >= 2 && m.dim() <= 4 && m.size(-2) == 2048 && m.size(-1) == 2048;
    for (int64_t i = 0; ok && i + 2 < m.dim(); ++i) ok = m.size(i) == 1;
    if (!ok)
      fail(op, ": atten_mask for sparse_mode ", mode,
           " must be the compressed 2048x2048 mask (shape [2048, 2048], [1, 2048, 2048] or [1, 1, 2048, 2048]), got "
           "shape ",
           shape_str(m.shape));
  } else {
    // Explicit mask, read at window-relative (i, j) (decision 5).
    const int64_t rows = std::max<int64_t>(c.max_q, 1), cols = c.max_kv;
    const std::string want =
        c.decode ? "(B, KV_S), (B, 1, KV_S) or (B, 1, 1, KV_S) (B may be 1) with B = " + std::to_string(B) +
                       " and KV_S >= " + std::to_string(cols)
                 : "(Q_S, KV_S), (B, Q_S, KV_S) or (B, 1, Q_S, KV_S) (B may be 1) with B = " + std::to_string(B) +
                       ", Q_S >= " + std::to_string(rows) + ", KV_S >= " + std::to_string(cols);
    auto bad = [&] { fail(op, ": atten_mask must have shape ", want, ", got ", shape_str(m.shape)); };
    if (m.dim() < 2 || m.dim() > 4) bad();
    const bool decode2 = c.decode && m.dim() == 2;
    const int64_t r = decode2 ? 1 : m.size(-2), cc = m.size(-1);
    if (r < rows || cc < cols) bad();
    if (m.dim() == 4 && m.size(1) != 1) bad();
    ms.data = static_cast<const uint8_t*>(m.data);
    ms.sj = m.stride(-1);
    ms.si = decode2 ? 0 : m.stride(-2);
    if (decode2 || m.dim() >= 3) {
      if (m.size(0) != B && m.size(0) != 1) bad();
      ms.sb = m.size(0) == 1 ? 0 : m.stride(0);
    }
    ms.row_off.assign(static_cast<size_t>(B), 0);
    ms.col_off.assign(static_cast<size_t>(B), 0);
  }
  if (c.decode || mode == 1) return;

  const int64_t pre = sat(p.pre_tokens), next = sat(p.next_tokens);
  const bool band_ignored = mode == 0 && (c.left_q || c.left_kv);  // left padding: pre/next ignored (§12.1)
  if ((mode == 0 || mode == 4) && !band_ignored && pr.out_dtype == DType::I8 && (pre < 0 || next < 0))
    fail(op, ": an int8 output (", p.kind == InferOp::FusedV2 ? "quant_scale_out" : "quant_scale2",
         ") cannot be combined with negative pre_tokens/next_tokens, got ", p.pre_tokens, " and ", p.next_tokens);
  if ((mode == 0 || mode == 4) && pre < 0 && next < 0)
    fail(op, ": pre_tokens and next_tokens must not both be negative (no valid data block), got pre_tokens = ",
         p.pre_tokens, ", next_tokens = ", p.next_tokens);
  if (band_ignored) return;
  ms.band.resize(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const SeqSpan& s = pr.seqs[static_cast<size_t>(b)];
    const int64_t d = s.kv_len - s.q_len;  // right-down anchor offset (kv includes a shared prefix)
    MaskSpec::Band& bd = ms.band[static_cast<size_t>(b)];
    switch (mode) {
      case 0: bd.pre = pre, bd.next = next; break;
      case 2: bd.next = 0; break;
      case 3: bd.next = d; break;
      case 4: bd.pre = sat(pre - d), bd.next = sat(next + d); break;
    }
  }
}

void build_pse(const Ctx& c, AttnProblem& pr) {
  if (!c.p.pse_shift) return;
  const TensorView& t = *c.p.pse_shift;
  if (!is_float(t.dtype))
    fail<TypeError>(c.op, ": pse_shift must be float16, bfloat16 or float32, got ", dtype_name(t.dtype));
  const int64_t rows = std::max<int64_t>(c.max_q, 1);
  if (t.dim() != 4 || (t.size(0) != pr.B && t.size(0) != 1) || t.size(1) != pr.Nq || t.size(2) < rows ||
      t.size(3) < c.max_kv)
    fail(c.op, ": pse_shift must have shape (B, N, Q_S, KV_S) or (1, N, Q_S, KV_S) with B = ", pr.B, ", N = ", pr.Nq,
         ", Q_S >= ", rows, ", KV_S >= ", c.max_kv, ", got ", shape_str(t.shape));
  PseSpec& ps = pr.pse;
  ps.kind = PseSpec::Kind::Dense;
  ps.data = t.data;
  ps.dtype = t.dtype;
  ps.sb = t.size(0) == 1 ? 0 : t.stride(0);
  ps.sn = t.stride(1);
  ps.si = t.stride(2);
  ps.sj = t.stride(3);
  ps.mul = 1.f;  // inference: qk·scale + pse (§1.4)
}

}  // namespace

InferCanon canonicalize_infer_attention(const InferAttentionParams& p, bool with_outputs) {
  Ctx c{p, p.op, parse_layout(p)};
  const char* op = c.op;
  const char* lname = c.lay.name;
  InferCanon res;
  AttnProblem& pr = res.problem;
  const TensorView &q = p.query, &k = p.key, &v = p.value;
  const QuantPlan qp = plan_quant(p);
  pr.dtype = qp.compute;
  pr.out_dtype = qp.out;
  res.shapes.attention_out_dtype = qp.out;
  const ArgNames& an = c.an;
  if (p.num_heads <= 0) fail(op, ": ", an.heads, " must be positive, got ", p.num_heads);
  if (p.num_key_value_heads < 0) fail(op, ": num_key_value_heads must be >= 0, got ", p.num_key_value_heads);
  c.Nq = p.num_heads;
  c.Nkv = p.num_key_value_heads == 0 ? c.Nq : p.num_key_value_heads;
  if (c.Nq % c.Nkv != 0)
    fail(op, ": ", an.heads, " must be a multiple of num_key_value_heads, got ", c.Nq, " and ", c.Nkv);

  // ---- query
  const Ax qa = c.lay.in;
  const Dims4 qd = dims_of(op, q, "query", qa, c.Nq, lname, an.heads);
  if (qd.N != c.Nq)
    fail(op, ": ", an.heads, " = ", c.Nq, " must equal the query's head axis for input_layout ", lname, ", got query shape ",
         shape_str(q.shape));
  c.D = qd.D;
  c.Sq = qd.S;
  pr.q = acc_of(q, qa, c.D);
  const bool tnd = packed(qa);
  if (p.kind == InferOp::Incre && qd.S != 1)
    fail(op, ": query must have sequence length 1 (decode), got shape ", shape_str(q.shape));
  c.decode = p.kind == InferOp::Incre || ((p.kind == InferOp::Fused || p.kind == InferOp::FusedV2) && !tnd && qd.S == 1);

  // ---- inner_precise (no numerical effect: fp32 always, invalid rows always corrected)
  if (p.kind != InferOp::Prompt) {
    const int64_t hi = c.decode ? 1 : 3;
    if (p.inner_precise < 0 || p.inner_precise > hi)
      fail(op, ": inner_precise must be in [0, ", hi, "]", c.decode ? " for a single query row" : "", ", got ",
           p.inner_precise);
  }

  // ---- query windows
  std::vector<SeqSpan>& seqs = pr.seqs;
  if (tnd) {
    if (!p.actual_seq_lengths)
      fail(op, ": input_layout ", lname, " needs ", an.qlen, " (cumulative query lengths), got None");
    const auto spans = from_cumulative(op, *p.actual_seq_lengths, an.qlen, qd.S, "query");
    c.B = static_cast<int64_t>(spans.size());
    for (const auto& [s0, len] : spans) seqs.push_back({s0, len, 0, 0});
  } else {
    c.B = qd.B;
    seqs.assign(static_cast<size_t>(c.B), SeqSpan{0, qd.S, 0, 0});
    if (!c.decode && p.actual_seq_lengths) {
      const auto act = per_batch(op, *p.actual_seq_lengths, an.qlen, c.B, qd.S, "the query's S");
      c.left_q = p.query_padding_size.has_value();
      const int64_t pad = c.left_q ? first_i64(op, *p.query_padding_size, "query_padding_size") : 0;
      for (int64_t b = 0; b < c.B; ++b) {
        SeqSpan& s = seqs[static_cast<size_t>(b)];
        s.q_len = act[static_cast<size_t>(b)];
        if (c.left_q) {
          s.q_off = qd.S - pad - s.q_len;
          if (s.q_off < 0)
            fail(op, ": query_padding_size = ", pad, " leaves no room for actual_seq_lengths = ", s.q_len,
                 " in the query's S = ", qd.S, " (batch ", b, ")");
        }
      }
    }
  }
  pr.B = c.B;
  pr.Nq = c.Nq;
  pr.Nkv = c.Nkv;
  pr.G = c.Nq / c.Nkv;
  pr.D = c.D;
  pr.scale = static_cast<float>(p.scale);

  // ---- key / value: paged pools, packed, or batched (optionally left-padded, with a shared prefix)
  const bool paged = p.block_table.has_value();
  if (paged) {
    const TensorView& bt = *p.block_table;
    if (bt.dtype != DType::I32) fail<TypeError>(op, ": block_table must be int32, got ", dtype_name(bt.dtype));
    if (bt.dim() != 2 || bt.size(0) < c.B)
      fail(op, ": block_table must be 2-D [B, max_blocks] with B = ", c.B, ", got shape ", shape_str(bt.shape));
    if (p.block_size < 1) fail(op, ": block_size must be >= 1 with block_table, got ", p.block_size);
    if (p.query_padding_size || p.kv_padding_size)
      fail(op, ": query_padding_size / kv_padding_size (left padding) cannot be combined with block_table");
    if (p.key_shared_prefix || p.value_shared_prefix)
      fail(op, ": key_shared_prefix / value_shared_prefix cannot be combined with block_table");
    if (k.dim() != v.dim() || k.size(0) != v.size(0))
      fail(op, ": paged key and value must have the same number of blocks and rank, got key ", shape_str(k.shape),
           ", value ", shape_str(v.shape));
    int64_t dk = 0, dv = 0;
    pr.k = paged_acc(c, k, "key", bt, &dk);
    pr.v = paged_acc(c, v, "value", bt, &dv);
    if (dk != c.D) fail(op, ": paged key head dim ", dk, " must equal the query's head dim ", c.D);
    c.Dv = dv;
    if (!p.actual_seq_lengths_kv)
      fail(op, ": block_table needs ", an.kvlen,
           " (the KV length of every batch), got None");
    const char* kvname = an.kvlen;
    const auto act = per_batch(op, *p.actual_seq_lengths_kv, kvname, c.B, -1, "");
    const int64_t W = bt.size(1), nblocks = k.size(0);
    const auto* table = static_cast<const int32_t*>(bt.data);
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t len = act[static_cast<size_t>(b)];
      const int64_t need = (len + p.block_size - 1) / p.block_size;
      if (need > W)
        fail(op, ": block_table has ", W, " blocks per sequence but batch ", b, " needs ", need, " (", kvname, " = ",
             len, ", block_size = ", p.block_size, ")");
      for (int64_t i = 0; i < need; ++i) {
        const int64_t id = table[b * bt.stride(0) + i * bt.stride(1)];
        if (id < 0 || id >= nblocks)
          fail(op, ": block_table[", b, "][", i, "] = ", id, " is not a block of the cache (blocknum = ", nblocks, ")");
      }
      seqs[static_cast<size_t>(b)].kv_len = len;
    }
  } else {
    const Dims4 kd = dims_of(op, k, "key", qa, c.Nkv, lname);
    const Dims4 vd = dims_of(op, v, "value", qa, c.Nkv, lname);
    if (kd.N != c.Nkv)
      fail(op, ": key must have num_key_value_heads = ", c.Nkv, " heads for input_layout ", lname, ", got shape ",
           shape_str(k.shape));
    if (kd.D != c.D)
      fail(op, ": key head dim ", kd.D, " must equal the query's head dim ", c.D, " (query ", shape_str(q.shape),
           ", key ", shape_str(k.shape), ")");
    if (vd.B != kd.B || vd.N != kd.N || vd.S != kd.S)
      fail(op, ": key and value must have the same shape except the head dim, got key ", shape_str(k.shape),
           ", value ", shape_str(v.shape));
    if (!tnd && kd.B != c.B)
      fail(op, ": key must have the query's batch size ", c.B, ", got shape ", shape_str(k.shape));
    c.Dv = vd.D;
    pr.k = acc_of(k, qa, c.D);
    pr.v = acc_of(v, qa, c.Dv);
    const char* kvname = an.kvlen;
    if (tnd) {
      if (!p.actual_seq_lengths_kv)
        fail(op, ": input_layout ", lname, " needs ", kvname, " (cumulative KV lengths), got None");
      const auto spans = from_cumulative(op, *p.actual_seq_lengths_kv, kvname, kd.S, "key");
      if (static_cast<int64_t>(spans.size()) != c.B)
        fail(op, ": ", kvname, " must have as many entries as ", an.qlen, " (", c.B, "), got ", spans.size());
      for (int64_t b = 0; b < c.B; ++b)
        seqs[static_cast<size_t>(b)].kv_off = spans[static_cast<size_t>(b)].first,
                                 seqs[static_cast<size_t>(b)].kv_len = spans[static_cast<size_t>(b)].second;
    } else {
      for (SeqSpan& s : seqs) s.kv_len = kd.S;
      if (p.actual_seq_lengths_kv) {
        const auto act = per_batch(op, *p.actual_seq_lengths_kv, kvname, c.B, kd.S, "the key's S");
        c.left_kv = p.kv_padding_size.has_value();
        const int64_t pad = c.left_kv ? first_i64(op, *p.kv_padding_size, "kv_padding_size") : 0;
        for (int64_t b = 0; b < c.B; ++b) {
          SeqSpan& s = seqs[static_cast<size_t>(b)];
          s.kv_len = act[static_cast<size_t>(b)];
          if (!c.left_kv) continue;
          s.kv_off = kd.S - pad - s.kv_len;
          if (s.kv_off < 0) {
            if (!c.decode)
              fail(op, ": kv_padding_size = ", pad, " leaves no room for ", kvname, " = ", s.kv_len,
                   " in the key's S = ", kd.S, " (batch ", b, ")");
            s.kv_off = 0, s.kv_len = 0;  // decode: the batch reads nothing, output 0 (§6.2)
          }
        }
      }
    }
    if (tnd && (p.query_padding_size || p.kv_padding_size))
      fail(op, ": query_padding_size / kv_padding_size need a batched layout (BSH, BSND, BNSD), got ", lname);

    // Shared prefix: keys [0, Lp) of every batch, before its own (§12.2).
    if (p.key_shared_prefix.has_value() != p.value_shared_prefix.has_value())
      fail(op, ": key_shared_prefix and value_shared_prefix must be given together");
    if (p.key_shared_prefix) {
      if (tnd) fail(op, ": key_shared_prefix needs a batched layout (BSH, BSND, BNSD), got ", lname);
      if (c.left_kv) fail(op, ": key_shared_prefix cannot be combined with kv_padding_size (left padding)");
      const TensorView &kp = *p.key_shared_prefix, &vp = *p.value_shared_prefix;
      if (kp.dtype != q.dtype || vp.dtype != q.dtype)
        fail<TypeError>(op, ": key_shared_prefix / value_shared_prefix must have the query's dtype ",
                        dtype_name(q.dtype));
      const Dims4 kpd = dims_of(op, kp, "key_shared_prefix", qa, c.Nkv, lname);
      const Dims4 vpd = dims_of(op, vp, "value_shared_prefix", qa, c.Nkv, lname);
      if (kpd.B != 1 || kpd.N != c.Nkv || kpd.D != c.D || vpd.B != 1 || vpd.N != c.Nkv || vpd.D != c.Dv ||
          vpd.S != kpd.S)
        fail(op, ": key_shared_prefix / value_shared_prefix must have batch 1 and the heads and head dims of key / "
                 "value, got ",
             shape_str(kp.shape), " and ", shape_str(vp.shape));
      int64_t Lp = kpd.S;
      if (p.actual_shared_prefix_len) {
        const auto& l = *p.actual_shared_prefix_len;
        if (l.empty() || l[0] < 0 || l[0] > kpd.S)
          fail(op, ": actual_shared_prefix_len must hold one length in [0, ", kpd.S, "], got ", shape_str(l));
        Lp = l[0];
      }
      for (auto [acc, t] : {std::pair<Acc4*, const TensorView*>{&pr.k, &kp}, {&pr.v, &vp}}) {
        const Acc4 a = acc_of(*t, qa, t == &kp ? c.D : c.Dv);
        acc->pbase = t->data, acc->plen = Lp, acc->pss = a.ss, acc->psn = a.sn, acc->psd = a.sd;
      }
      for (SeqSpan& s : seqs) s.kv_off -= Lp, s.kv_len += Lp;
    } else if (p.actual_shared_prefix_len) {
      fail(op, ": actual_shared_prefix_len needs key_shared_prefix / value_shared_prefix");
    }
  }
  pr.Dv = c.Dv;

  // ---- MLA rope: q·k += q_rope·k_rope
  if (p.query_rope.has_value() != p.key_rope.has_value())
    fail(op, ": query_rope and key_rope must be given together");
  if (p.query_rope) {
    const TensorView &qr = *p.query_rope, &kr = *p.key_rope;
    if (qr.dtype != q.dtype || kr.dtype != q.dtype)
      fail<TypeError>(op, ": query_rope / key_rope must have the query's dtype ", dtype_name(q.dtype));
    if (p.key_shared_prefix) fail(op, ": query_rope cannot be combined with key_shared_prefix");
    const Dims4 rd = dims_of(op, qr, "query_rope", qa, c.Nq, lname, an.heads);
    if (rd.B != qd.B || rd.N != qd.N || rd.S != qd.S)
      fail(op, ": query_rope must match the query except the head dim, got ", shape_str(qr.shape), " for query ",
           shape_str(q.shape));
    pr.Dr = rd.D;
    pr.qr = acc_of(qr, qa, rd.D);
    if (paged) {
      int64_t dr = 0;
      if (kr.dim() != k.dim() || kr.size(0) != k.size(0))
        fail(op, ": paged key_rope must have key's block count and rank, got ", shape_str(kr.shape));
      pr.kr = paged_acc(c, kr, "key_rope", *p.block_table, &dr);
      if (dr != pr.Dr) fail(op, ": key_rope head dim ", dr, " must equal query_rope's ", pr.Dr);
    } else {
      const Dims4 krd = dims_of(op, kr, "key_rope", qa, c.Nkv, lname);
      const Dims4 kd = dims_of(op, k, "key", qa, c.Nkv, lname);
      if (krd.B != kd.B || krd.N != kd.N || krd.S != kd.S || krd.D != pr.Dr)
        fail(op, ": key_rope must match the key except the head dim, which must equal query_rope's ", pr.Dr, ", got ",
             shape_str(kr.shape), " for key ", shape_str(k.shape));
      pr.kr = acc_of(kr, qa, pr.Dr);
    }
  }

  int64_t max_pos = 0;
  for (const SeqSpan& s : seqs) {
    c.max_q = std::max(c.max_q, s.q_len);
    c.max_kv = std::max(c.max_kv, s.kv_len);
    max_pos = std::max(max_pos, s.kv_off + s.kv_len);
  }
  QuantShape qs;
  qs.B = c.B, qs.Nq = c.Nq, qs.Nkv = c.Nkv, qs.D = c.D, qs.Dv = c.Dv, qs.packed = tnd, qs.paged = paged;
  qs.blocknum = paged ? k.size(0) : 0, qs.block_size = p.block_size, qs.max_pos = max_pos;
  build_quant(p, qp, qs, pr);
  build_mask(c, pr);
  build_pse(c, pr);

  if (p.learnable_sink) {
    const TensorView& s = *p.learnable_sink;
    if (!is_float(s.dtype))
      fail<TypeError>(op, ": learnable_sink must be a float tensor, got ", dtype_name(s.dtype));
    if (s.dim() != 1 || s.size(0) != c.Nq)
      fail(op, ": learnable_sink must have shape [num_query_heads] = [", c.Nq, "], got ", shape_str(s.shape));
    for (int64_t n = 0; n < c.Nq; ++n) {
      const int64_t i = n * s.stride(0);
      pr.sink.push_back(s.dtype == DType::F32   ? static_cast<const float*>(s.data)[i]
                        : s.dtype == DType::F16 ? f16_to_f32(static_cast<const uint16_t*>(s.data)[i])
                                                : bf16_to_f32(static_cast<const uint16_t*>(s.data)[i]));
    }
  }

  // ---- outputs
  const Ax oa = c.lay.out;
  const int64_t B_or_1 = tnd ? 1 : c.B;
  res.shapes.attention_out = shape_of(oa, c.B, c.Nq, c.Sq, c.Dv);
  res.lse = p.softmax_lse_flag;
  if (res.lse && oa == Ax::NBSD)
    fail(op, ": softmax_lse is not available with input_layout ", lname,
         " (the *_NBSD layouts are the MLA-512 path, which has no lse)");
  res.shapes.softmax_lse = !res.lse ? std::vector<int64_t>{0}
                           : tnd    ? std::vector<int64_t>{c.Sq, c.Nq, 1}
                                    : std::vector<int64_t>{c.B, c.Nq, c.Sq, 1};
  int64_t covered = 0;
  for (const SeqSpan& s : seqs) covered += s.q_len;
  res.fill_B = B_or_1;
  res.fill_S = c.Sq;
  res.partial_rows = covered < B_or_1 * c.Sq;
  if (with_outputs) {
    check_tensor(op, p.attention_out, "attention_out", pr.out_dtype, res.shapes.attention_out);
    pr.out = acc_of(p.attention_out, oa, c.Dv);
    if (res.lse) {
      check_tensor(op, p.softmax_lse, "softmax_lse", DType::F32, res.shapes.softmax_lse);
      const TensorView& l = p.softmax_lse;
      pr.lse.base = l.data;
      if (tnd)
        pr.lse.ss = l.stride(0), pr.lse.sn = l.stride(1);
      else
        pr.lse.sb = l.stride(0), pr.lse.sn = l.stride(1), pr.lse.ss = l.stride(2);
    }
  }
  return res;
}

}  // namespace npufa
