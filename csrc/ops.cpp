// The fastattn:: ops: their schemas, the kernel that runs a call on the backend it names (the CPU
// kernels natively, the Python backends through fastattn.ops), and the autograd formula. A call
// is one dispatcher op from Python's front door to the kernel: no Python on the CPU path.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <limits>

#include "ops.h"

namespace fastattn {
namespace {

TensorPair forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   c10::string_view backend FASTATTN_CALL_PARAMS) {
  const Call call = FASTATTN_CALL_FROM_PARAMS;
  if (backend == "cpu") return cpu_forward(q, k, v, call);
  return python_forward(q, k, v, backend, call);
}

TensorTriple backward(const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                      c10::string_view backend FASTATTN_CALL_PARAMS) {
  const Call call = FASTATTN_CALL_FROM_PARAMS;
  if (backend == "cpu") return cpu_backward(dout, dlse, q, k, v, out, lse, call);
  return python_backward(dout, dlse, q, k, v, out, lse, backend, call);
}

TensorPair kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& cache_seqlens, const OptTensor& k_new, const OptTensor& v_new,
                   c10::string_view backend FASTATTN_CALL_PARAMS) {
  const Call call = FASTATTN_CALL_FROM_PARAMS;
  if (backend == "cpu") return cpu_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, call);
  return python_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, backend, call);
}

template <class Kernel>
auto typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Kernel>();
}

}  // namespace

TensorPair call_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::string_view backend,
                        const Call& call) {
  static const auto op = typed_op<decltype(fastattn::forward)>("fastattn::attention_forward");
  return op.call(q, k, v, backend FASTATTN_CALL_MEMBERS);
}

TensorTriple call_backward(const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                           c10::string_view backend, const Call& call) {
  static const auto op = typed_op<decltype(fastattn::backward)>("fastattn::attention_backward");
  return op.call(dout, dlse, q, k, v, out, lse, backend FASTATTN_CALL_MEMBERS);
}

TensorPair call_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& cache_seqlens, const OptTensor& k_new, const OptTensor& v_new,
                        c10::string_view backend, const Call& call) {
  static const auto op = typed_op<decltype(fastattn::kvcache)>("fastattn::attention_kvcache");
  return op.call(q, k_cache, v_cache, cache_seqlens, k_new, v_new, backend FASTATTN_CALL_MEMBERS);
}

namespace {

// d sinks (H,) from what the backward has at hand, for every backend (fastattn.reference's
// sink_gradient): -sum over the head's rows of exp(sink - lse) * (rowsum(dO * O) - dlse).
at::Tensor sink_gradient(const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& out, const at::Tensor& lse,
                         const at::Tensor& sinks) {
  const auto compute = at::promote_types(out.scalar_type(), at::kFloat);
  const at::Tensor o = out.to(compute);  // a zero output (a row that sees no key): delta 0 beside any dO
  at::Tensor delta = at::where(o == 0, at::zeros_like(o), dout.to(compute) * o).sum(-1);  // (B, H, Nq)
  if (dlse) delta = delta - dlse->to(compute);
  const at::Tensor sink = sinks.to(compute).view({1, -1, 1});
  // A sink of -inf is none: 0, not exp(-inf + inf) in a row that sees no key (lse -inf).
  const at::Tensor p_sink = at::where(sink == -std::numeric_limits<double>::infinity(), at::zeros_like(sink), at::exp(sink - lse.to(compute)));
  return (-(p_sink * delta).sum(at::IntArrayRef{0, 2})).to(sinks.scalar_type());
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// A call's fields in the autograd's saved state: tensors after the forward's own (q, k, v, out,
// lse), the rest in saved_data under their names.
void save_field(AutogradContext*, std::vector<at::Tensor>& tensors, const char*, const OptTensor& t) {
  tensors.push_back(t.value_or(at::Tensor()));
}
template <class T>
void save_field(AutogradContext* ctx, std::vector<at::Tensor>&, const char* name, const T& value) {
  ctx->saved_data[name] = value;
}
void load_field(AutogradContext*, const variable_list& saved, size_t& i, const char*, OptTensor& t) {
  const at::Tensor& s = saved[i++];
  t = s.defined() ? OptTensor(s) : std::nullopt;
}
void load_field(AutogradContext* ctx, const variable_list&, size_t&, const char* name, c10::SymInt& v) {
  v = ctx->saved_data[name].toSymInt();
}
void load_field(AutogradContext* ctx, const variable_list&, size_t&, const char* name, int64_t& v) {
  v = ctx->saved_data[name].toInt();
}
void load_field(AutogradContext* ctx, const variable_list&, size_t&, const char* name, double& v) {
  v = ctx->saved_data[name].toDouble();
}
void load_field(AutogradContext* ctx, const variable_list&, size_t&, const char* name, bool& v) {
  v = ctx->saved_data[name].toBool();
}

constexpr size_t kForwardTensors = 5;  // q, k, v, out, lse
constexpr size_t kLeadingArgs = 4;     // the forward op's q, k, v, backend before the call's fields

// The forward's autograd: saves what the backward op reads (no work redone) and hands it the
// incoming gradients of out and lse (either may be absent); the sinks' gradient comes from out,
// lse and those.
class Attention : public torch::autograd::Function<Attention> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               c10::string_view backend FASTATTN_CALL_PARAMS) {
    ctx->set_materialize_grads(false);
    const Call call = FASTATTN_CALL_FROM_PARAMS;
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, lse] = call_forward(q, k, v, backend, call);
    std::vector<at::Tensor> tensors{q, k, v, out, lse};
#define FASTATTN_SAVE_(type, name, ...) save_field(ctx, tensors, #name, call.name);
    FASTATTN_CALL_FIELDS(FASTATTN_SAVE_)
#undef FASTATTN_SAVE_
    ctx->save_for_backward(tensors);
    ctx->saved_data["backend"] = std::string(backend);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    Call call;
    size_t i = kForwardTensors;
#define FASTATTN_LOAD_(type, name, ...) load_field(ctx, saved, i, #name, call.name);
    FASTATTN_CALL_FIELDS(FASTATTN_LOAD_)
#undef FASTATTN_LOAD_
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const at::Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const OptTensor dlse = grads[1].defined() ? OptTensor(grads[1]) : std::nullopt;
    auto [dq, dk, dv] = call_backward(dout, dlse, q, k, v, out, lse, ctx->saved_data["backend"].toStringRef(), call);
    variable_list result(kLeadingArgs + static_cast<size_t>(CallField::count));  // one per forward argument
    result[0] = dq;
    result[1] = dk;
    result[2] = dv;
    if (call.sinks && call.sinks->requires_grad())
      result[kLeadingArgs + static_cast<size_t>(CallField::sinks)] = sink_gradient(dout, dlse, out, lse, *call.sinks);
    return result;
  }
};

TensorPair forward_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            c10::string_view backend FASTATTN_CALL_PARAMS) {
  const bool sinks_grad = sinks && sinks->requires_grad();
  if (!at::GradMode::is_enabled() || !(q.requires_grad() || k.requires_grad() || v.requires_grad() || sinks_grad)) {
    at::AutoDispatchBelowADInplaceOrView below;  // nothing to differentiate: no graph node to build
    return call_forward(q, k, v, backend, FASTATTN_CALL_FROM_PARAMS);
  }
#define FASTATTN_PASS_(type, name, ...) , name
  auto outputs = Attention::apply(q, k, v, backend FASTATTN_CALL_FIELDS(FASTATTN_PASS_));
#undef FASTATTN_PASS_
  return {outputs[0], outputs[1]};
}

// Decoding: forward only, and the caches change in place, which their version counters must say
// (autograd's saved-tensor checks and torch.compile's guards read them): the returned tensors are
// fresh, so no fallback would bump them.
TensorPair kvcache_bumping_versions(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& cache_seqlens, const OptTensor& k_new, const OptTensor& v_new,
                                    c10::string_view backend FASTATTN_CALL_PARAMS) {
  const auto wants_grad = [](const OptTensor& t) { return t.has_value() && t->requires_grad(); };
  TORCH_CHECK(!at::GradMode::is_enabled() || !(q.requires_grad() || k_cache.requires_grad() || v_cache.requires_grad() ||
                                                wants_grad(k_new) || wants_grad(v_new)),
              "fastattn::attention_kvcache is forward only: call it under torch.no_grad() or on detached tensors");
  TensorPair result;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    result = call_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, backend, FASTATTN_CALL_FROM_PARAMS);
  }
  torch::autograd::impl::bump_version(k_cache);
  torch::autograd::impl::bump_version(v_cache);
  return result;
}

}  // namespace
}  // namespace fastattn

// The schemas: each op's own tensors and the backend's name, then the call's fields (call.h).
TORCH_LIBRARY(fastattn, m) {
  m.set_python_module("fastattn.ops");  // the fake (meta) implementations live there
  m.def("attention_forward(Tensor q, Tensor k, Tensor v, str backend" FASTATTN_CALL_SCHEMA ") -> (Tensor, Tensor)");
  m.def("attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "str backend" FASTATTN_CALL_SCHEMA ") -> (Tensor, Tensor, Tensor)");
  m.def("attention_kvcache(Tensor q, Tensor(a1!) k_cache, Tensor(a2!) v_cache, Tensor cache_seqlens, Tensor? k_new, "
        "Tensor? v_new, str backend" FASTATTN_CALL_SCHEMA ") -> (Tensor, Tensor)");
}
// One kernel for every device: the backend named in the call decides (dispatch chose it outside
// anything torch.compile traces).
TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("attention_forward", &fastattn::forward);
  m.impl("attention_backward", &fastattn::backward);
  m.impl("attention_kvcache", &fastattn::kvcache);
}

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("attention_forward", &fastattn::forward);
  m.impl("attention_backward", &fastattn::backward);
  m.impl("attention_kvcache", &fastattn::kvcache);
}

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) {
  m.impl("attention_forward", &fastattn::forward_autograd);
  m.impl("attention_backward", torch::autograd::autogradNotImplementedFallback());  // no double backward
  m.impl("attention_kvcache", &fastattn::kvcache_bumping_versions);
}

TORCH_LIBRARY_IMPL(fastattn, ADInplaceOrView, m) {
  m.impl("attention_kvcache", &fastattn::kvcache_bumping_versions);
}
