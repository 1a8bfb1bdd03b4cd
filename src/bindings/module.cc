// npufa._C: ndarrays (any DLPack producer) -> TensorView, C++ errors -> Python errors. No logic.
#include <algorithm>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <variant>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include "npufa/npufa.h"

namespace nb = nanobind;
using Array = nb::ndarray<nb::device::cpu>;
using OptArray = std::optional<Array>;
using OptList = std::optional<std::vector<int64_t>>;

namespace {

npufa::DType to_dtype(const nb::dlpack::dtype& t) {
  using C = nb::dlpack::dtype_code;
  const auto code = static_cast<C>(t.code);
  if (code == C::Float && t.bits == 32) return npufa::DType::F32;
  if (code == C::Float && t.bits == 16) return npufa::DType::F16;
  if (code == C::Float && t.bits == 64) return npufa::DType::F64;
  if (code == C::Bfloat && t.bits == 16) return npufa::DType::BF16;
  if (code == C::Bool) return npufa::DType::Bool;
  if (code == C::Int && t.bits == 8) return npufa::DType::I8;
  if (code == C::Int && t.bits == 32) return npufa::DType::I32;
  if (code == C::Int && t.bits == 64) return npufa::DType::I64;
  if (code == C::UInt && t.bits == 8) return npufa::DType::U8;
  throw npufa::TypeError("npufa: unsupported tensor dtype (code " + std::to_string(t.code) + ", " +
                         std::to_string(t.bits) + " bits)");
}

npufa::TensorView view(const Array& a) {
  std::vector<int64_t> shape(a.ndim()), strides(a.ndim());
  for (size_t i = 0; i < a.ndim(); ++i) {
    shape[i] = static_cast<int64_t>(a.shape(i));
    strides[i] = static_cast<int64_t>(a.stride(i));
  }
  return npufa::TensorView(a.data(), to_dtype(a.dtype()), std::move(shape), std::move(strides));
}

std::optional<npufa::TensorView> view(const OptArray& a) {
  if (!a) return std::nullopt;
  return view(*a);
}

// DLPack's C exchange table (dlpack.h 1.3, `__dlpack_c_exchange_api__` on the tensor type; torch
// >= 2.9): a tensor's DLTensor in one C call. `__dlpack__` is a Python method, about 2 us a tensor
// warm and several times that after a decode step has swept the caches; an inference call hands over
// up to a dozen tensors.
struct DLPackExchangeAPI {
  struct { uint32_t major, minor; } version;
  void* prev_api;
  void* managed_tensor_allocator;
  void* managed_tensor_from_py_object_no_sync;
  void* managed_tensor_to_py_object_no_sync;
  int (*dltensor_from_py_object_no_sync)(void* py_object, nb::dlpack::dltensor* out);
  void* current_work_stream;
};

// The table of type tp, or null (no table, another major version, no DLTensor entry). One type cached:
// a process hands over one tensor type.
const DLPackExchangeAPI* exchange_api(PyTypeObject* tp) {
  static PyTypeObject* cached_type = nullptr;
  static const DLPackExchangeAPI* cached = nullptr;
  if (tp == cached_type) return cached;
  const DLPackExchangeAPI* api = nullptr;
  if (PyObject* cap = PyObject_GetAttrString(reinterpret_cast<PyObject*>(tp), "__dlpack_c_exchange_api__")) {
    if (PyCapsule_IsValid(cap, "dlpack_exchange_api")) {
      api = static_cast<const DLPackExchangeAPI*>(PyCapsule_GetPointer(cap, "dlpack_exchange_api"));
      if (api && (api->version.major != 1 || !api->dltensor_from_py_object_no_sync)) api = nullptr;
    }
    Py_DECREF(cap);
  }
  PyErr_Clear();
  cached_type = tp;
  cached = api;
  return api;
}

// Tensor argument `name` of op `op` as the core sees it: through the exchange table when its type has
// one, else through nanobind's ndarray (any DLPack producer). The view is valid while the object lives.
npufa::TensorView view(nb::handle h, const char* name, const std::string& op) {
  if (const DLPackExchangeAPI* api = exchange_api(Py_TYPE(h.ptr()))) {
    nb::dlpack::dltensor t;
    if (api->dltensor_from_py_object_no_sync(h.ptr(), &t) != 0) {  // sparse, quantised, no storage, ...
      const nb::python_error e;
      const std::string why = e.what();  // torch's message, without the C++ backtrace that follows it
      throw npufa::TypeError(op + ": " + name + " must be a dense CPU tensor (" + why.substr(0, why.find('\n')) + ")");
    }
    if (t.device.device_type != static_cast<int32_t>(nb::device::cpu::value))
      throw npufa::TypeError(op + ": " + name + " must be a CPU tensor (DLPack device type " +
                             std::to_string(t.device.device_type) + ")");
    std::vector<int64_t> shape(t.shape, t.shape + t.ndim), strides(static_cast<size_t>(t.ndim));
    if (!t.data && std::all_of(shape.begin(), shape.end(), [](int64_t n) { return n > 0; }))
      throw npufa::TypeError(op + ": " + name + " has elements but no storage (a zero tensor?)");
    int64_t st = 1;  // no strides: compact row-major
    for (int32_t i = t.ndim - 1; i >= 0; --i) {
      strides[static_cast<size_t>(i)] = t.strides ? t.strides[i] : st;
      st *= t.shape[i];
    }
    return npufa::TensorView(static_cast<char*>(t.data) + t.byte_offset, to_dtype(t.dtype), std::move(shape),
                             std::move(strides));
  }
  return view(nb::cast<Array>(h));
}

template <class T>
T item(const nb::tuple& t, size_t i) {
  return nb::cast<T>(t[i]);
}

// The forward's arguments, in torch_npu order without gen_mask_parallel/sync: query, key, value,
// head_num, input_layout, pse, padding_mask, atten_mask, scale, keep_prob, pre_tockens,
// next_tockens, inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen, sparse_mode,
// softmax_layout, sink, dropout_mask, seed, offset, then v2's pse_type, q_start_idx, kv_start_idx,
// query_rope, key_rope, and the op name for messages (kept alive in `op`).
npufa::FusionAttentionParams fwd_params(const nb::tuple& a, std::string& op) {
  if (a.size() != 28) throw npufa::ValueError("npufa._C: expected 28 forward arguments, got " + std::to_string(a.size()));
  npufa::FusionAttentionParams p;
  p.query = view(item<Array>(a, 0));
  p.key = view(item<Array>(a, 1));
  p.value = view(item<Array>(a, 2));
  p.head_num = item<int64_t>(a, 3);
  p.input_layout = item<std::string>(a, 4);
  p.pse = view(item<OptArray>(a, 5));
  p.padding_mask = view(item<OptArray>(a, 6));
  p.atten_mask = view(item<OptArray>(a, 7));
  p.scale = item<double>(a, 8);
  p.keep_prob = item<double>(a, 9);
  p.pre_tockens = item<int64_t>(a, 10);
  p.next_tockens = item<int64_t>(a, 11);
  p.inner_precise = item<int64_t>(a, 12);
  p.prefix = item<OptList>(a, 13);
  p.actual_seq_qlen = item<OptList>(a, 14);
  p.actual_seq_kvlen = item<OptList>(a, 15);
  p.sparse_mode = item<int64_t>(a, 16);
  p.softmax_layout = item<std::string>(a, 17);
  p.sink = view(item<OptArray>(a, 18));
  p.dropout_mask = view(item<OptArray>(a, 19));
  p.seed = item<int64_t>(a, 20);
  p.offset = item<int64_t>(a, 21);
  p.pse_type = item<int64_t>(a, 22);
  p.q_start_idx = item<OptList>(a, 23);
  p.kv_start_idx = item<OptList>(a, 24);
  p.query_rope = view(item<OptArray>(a, 25));
  p.key_rope = view(item<OptArray>(a, 26));
  op = item<std::string>(a, 27);
  p.op = op.c_str();
  return p;
}

// The inference ops' arguments by their FIA v1 names (the Python front maps PFA / IFA / v2 names),
// from a dict; absent keys keep the C++ defaults. The op name is kept alive in `op`. One pass over
// the dict's items: looking each name up would build and hash a Python string per name, twice.
npufa::InferAttentionParams infer_params(int kind, const nb::dict& a, std::string& op) {
  using P = npufa::InferAttentionParams;
  using Field = std::variant<npufa::TensorView P::*, std::optional<npufa::TensorView> P::*,
                             std::optional<std::vector<int64_t>> P::*, int64_t P::*, double P::*, bool P::*,
                             std::string P::*>;
  static const std::unordered_map<std::string_view, Field> fields = {
      {"query", &P::query}, {"key", &P::key}, {"value", &P::value},
      {"pse_shift", &P::pse_shift}, {"atten_mask", &P::atten_mask},
      {"actual_seq_lengths", &P::actual_seq_lengths}, {"actual_seq_lengths_kv", &P::actual_seq_lengths_kv},
      {"block_table", &P::block_table}, {"query_padding_size", &P::query_padding_size},
      {"kv_padding_size", &P::kv_padding_size}, {"key_shared_prefix", &P::key_shared_prefix},
      {"value_shared_prefix", &P::value_shared_prefix}, {"actual_shared_prefix_len", &P::actual_shared_prefix_len},
      {"query_rope", &P::query_rope}, {"key_rope", &P::key_rope}, {"learnable_sink", &P::learnable_sink},
      {"dequant_scale1", &P::dequant_scale1}, {"quant_scale1", &P::quant_scale1},
      {"dequant_scale2", &P::dequant_scale2}, {"quant_scale2", &P::quant_scale2},
      {"quant_offset2", &P::quant_offset2}, {"antiquant_scale", &P::antiquant_scale},
      {"antiquant_offset", &P::antiquant_offset}, {"key_antiquant_scale", &P::key_antiquant_scale},
      {"key_antiquant_offset", &P::key_antiquant_offset}, {"value_antiquant_scale", &P::value_antiquant_scale},
      {"value_antiquant_offset", &P::value_antiquant_offset},
      {"key_rope_antiquant_scale", &P::key_rope_antiquant_scale}, {"dequant_scale_query", &P::dequant_scale_query},
      {"num_heads", &P::num_heads}, {"scale", &P::scale}, {"pre_tokens", &P::pre_tokens},
      {"next_tokens", &P::next_tokens}, {"input_layout", &P::input_layout},
      {"num_key_value_heads", &P::num_key_value_heads}, {"sparse_mode", &P::sparse_mode},
      {"inner_precise", &P::inner_precise}, {"block_size", &P::block_size}, {"antiquant_mode", &P::antiquant_mode},
      {"key_antiquant_mode", &P::key_antiquant_mode}, {"value_antiquant_mode", &P::value_antiquant_mode},
      {"softmax_lse_flag", &P::softmax_lse_flag}};
  P p;
  p.kind = static_cast<npufa::InferOp>(kind);
  op = nb::cast<std::string>(a["op"]);  // first: tensor errors name the op
  p.op = op.c_str();
  int required = 0;  // query, key, value
  for (auto [k, v] : a) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(k.ptr(), &n);
    if (!s) throw nb::python_error();
    const std::string_view name(s, static_cast<size_t>(n));
    const auto it = fields.find(name);
    if (it == fields.end()) continue;  // "op", and names other ops' fronts may add
    std::visit(
        [&](auto field) {
          using T = std::remove_reference_t<decltype(p.*field)>;
          if constexpr (std::is_same_v<T, npufa::TensorView>) {
            p.*field = view(v, s, op);
            ++required;
          } else if constexpr (std::is_same_v<T, std::optional<npufa::TensorView>>) {
            if (!v.is_none()) p.*field = view(v, s, op);
          } else if constexpr (std::is_same_v<T, std::optional<std::vector<int64_t>>>) {
            if (!v.is_none()) p.*field = nb::cast<std::vector<int64_t>>(v);
          } else {
            p.*field = nb::cast<T>(v);
          }
        },
        it->second);
  }
  if (required != 3) throw npufa::ValueError(op + ": query, key and value are required");
  return p;
}

}  // namespace

NB_MODULE(_C, m) {
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const npufa::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  m.def("set_num_threads", &npufa::set_num_threads, nb::arg("n"));
  m.def("get_num_threads", &npufa::get_num_threads);

  m.def("philox4x32_10", [](std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
    return npufa::philox4x32_10(c, k);
  });
  m.def("dropout_mask_bytes", &npufa::dropout_mask_bytes, nb::arg("numels"));
  m.def(
      "dropout_gen_mask",
      [](const Array& out, int64_t numels, double keep_prob, int64_t seed, int64_t offset) {
        const auto v = view(out);
        if (v.dtype != npufa::DType::U8 || v.dim() != 1 || v.stride(0) != 1 ||
            v.size(0) != npufa::dropout_mask_bytes(numels))
          throw npufa::ValueError("dropout_gen_mask: out must be a contiguous uint8 vector of " +
                                  std::to_string(npufa::dropout_mask_bytes(numels)) + " bytes");
        npufa::dropout_gen_mask(static_cast<uint8_t*>(v.data), numels, keep_prob, static_cast<uint64_t>(seed),
                                static_cast<uint64_t>(offset));
      },
      nb::arg("out"), nb::arg("numels"), nb::arg("keep_prob"), nb::arg("seed"), nb::arg("offset"),
      nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "fusion_attention_fwd",
      [](const nb::tuple& args, OptArray out, OptArray smax, OptArray ssum) -> nb::object {
        std::string op;
        npufa::FusionAttentionParams p = fwd_params(args, op);
        if (!out || !smax || !ssum) {  // validation only: the output shapes
          const auto s = npufa::fusion_attention_output_shapes(p);
          return nb::cast(std::make_tuple(s.attention_out, s.softmax_max, s.softmax_sum));
        }
        p.attention_out = view(*out);
        p.softmax_max = view(*smax);
        p.softmax_sum = view(*ssum);
        npufa::FusionAttentionResult r;
        {
          nb::gil_scoped_release release;
          r = npufa::fusion_attention_fwd(p);
        }
        return nb::cast(std::make_tuple(r.seed, r.offset, r.numels));
      },
      nb::arg("args"), nb::arg("attention_out").none() = nb::none(), nb::arg("softmax_max").none() = nb::none(),
      nb::arg("softmax_sum").none() = nb::none(),
      "npu_fusion_attention into the given outputs; with no outputs, validates and returns their shapes. "
      "args: see fwd_params.");

  m.def(
      "fusion_attention_grad",
      [](const nb::tuple& args, const Array& dy, OptArray softmax_max, OptArray softmax_sum, OptArray attention_in,
         int64_t numels, const Array& dq, const Array& dk, const Array& dv, OptArray dpse, OptArray dsink,
         OptArray dq_rope, OptArray dk_rope) {
        npufa::FusionAttentionGradParams g;
        std::string op;
        g.fwd = fwd_params(args, op);
        g.dy = view(dy);
        g.softmax_max = view(softmax_max);
        g.softmax_sum = view(softmax_sum);
        g.attention_in = view(attention_in);
        g.numels = numels;
        g.dq = view(dq);
        g.dk = view(dk);
        g.dv = view(dv);
        g.dpse = view(dpse);
        g.dsink = view(dsink);
        g.dq_rope = view(dq_rope);
        g.dk_rope = view(dk_rope);
        nb::gil_scoped_release release;
        npufa::fusion_attention_grad(g);
      },
      nb::arg("args"), nb::arg("dy"), nb::arg("softmax_max").none(), nb::arg("softmax_sum").none(),
      nb::arg("attention_in").none(), nb::arg("numels"), nb::arg("dq"), nb::arg("dk"), nb::arg("dv"),
      nb::arg("dpse").none(), nb::arg("dsink").none(), nb::arg("dq_rope").none() = nb::none(),
      nb::arg("dk_rope").none() = nb::none());

  m.def(
      "infer_attention",
      [](int kind, const nb::dict& args, nb::handle out, nb::handle lse) -> nb::object {
        std::string op;
        npufa::InferAttentionParams p = infer_params(kind, args, op);
        if (out.is_none()) {  // validation only: the output shapes
          const auto s = npufa::infer_attention_output_shapes(p);
          return nb::cast(std::make_tuple(s.attention_out, s.softmax_lse, std::string(npufa::dtype_name(s.attention_out_dtype))));
        }
        p.attention_out = view(out, "attention_out", op);
        if (!lse.is_none()) p.softmax_lse = view(lse, "softmax_lse", op);
        nb::gil_scoped_release release;
        npufa::infer_attention(p);
        return nb::none();
      },
      nb::arg("kind"), nb::arg("args"), nb::arg("attention_out").none() = nb::none(),
      nb::arg("softmax_lse").none() = nb::none(),
      "PFA (kind 0), IFA (1), FIA (2), FIA v2 (3) into the given outputs; with no outputs, validates and returns "
      "their shapes. args: a dict by FIA v1 argument names.");

  m.def(
      "reshape_and_cache",
      [](const Array& key, const Array& value, const Array& key_cache, const Array& value_cache, const Array& slots) {
        npufa::ReshapeAndCacheParams p;
        p.key = view(key);
        p.value = view(value);
        p.key_cache = view(key_cache);
        p.value_cache = view(value_cache);
        p.slot_indices = view(slots);
        nb::gil_scoped_release release;
        npufa::reshape_and_cache(p);
      },
      nb::arg("key"), nb::arg("value"), nb::arg("key_cache"), nb::arg("value_cache"), nb::arg("slot_indices"));

  m.def(
      "trans_quant_param",
      [](const Array& scale, OptArray offset, int round_mode, const Array& out) {
        const auto sv = view(scale), ov = view(out);
        std::optional<npufa::TensorView> of;
        if (offset) of = view(*offset);
        npufa::trans_quant_param(sv, of, round_mode, ov);
      },
      nb::arg("scale"), nb::arg("offset").none(), nb::arg("round_mode"), nb::arg("out"));
}
