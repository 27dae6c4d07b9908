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

CallArgs score_mods(int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
                    const std::optional<at::Tensor>& sinks, bool bottom_right) {
  return CallArgs{false, 0.0, 0.0, 0, window_left, window_right, softcap, alibi_slopes, sinks, bottom_right};
}

namespace {

using OptTensor = std::optional<at::Tensor>;

MaskTensors mask_tensors(const OptTensor& key_padding, const OptTensor& key_ranges, const OptTensor& attn_mask,
                         const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, const c10::SymInt& max_seqlen_q,
                         const c10::SymInt& max_seqlen_k) {
  return MaskTensors{key_ranges,   key_padding,  attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q.expect_int(),
                     max_seqlen_k.expect_int()};
}

TensorPair forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& key_padding,
                   const OptTensor& key_ranges, const OptTensor& attn_mask, const OptTensor& cu_seqlens_q,
                   const OptTensor& cu_seqlens_k, c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, bool causal,
                   double scale, double dropout_p, c10::SymInt seed, c10::string_view backend, int64_t window_left,
                   int64_t window_right, double softcap, const OptTensor& alibi_slopes, const OptTensor& sinks,
                   bool bottom_right) {
  const MaskTensors masks =
      mask_tensors(key_padding, key_ranges, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const CallArgs args{causal,        scale,       dropout_p,    seed.expect_int(), window_left, window_right,
                      softcap,       alibi_slopes, sinks,       bottom_right};
  if (backend == "cpu") return cpu_forward(q, k, v, masks, args);
  return python_forward(q, k, v, masks, args, backend);
}

TensorTriple backward(const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const OptTensor& key_padding,
                      const OptTensor& key_ranges, const OptTensor& attn_mask, const OptTensor& cu_seqlens_q,
                      const OptTensor& cu_seqlens_k, c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, bool causal,
                      double scale, double dropout_p, c10::SymInt seed, c10::string_view backend,
                      int64_t window_left, int64_t window_right, double softcap, const OptTensor& alibi_slopes,
                      const OptTensor& sinks, bool bottom_right) {
  const MaskTensors masks =
      mask_tensors(key_padding, key_ranges, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const CallArgs args{causal,        scale,       dropout_p,    seed.expect_int(), window_left, window_right,
                      softcap,       alibi_slopes, sinks,       bottom_right};
  if (backend == "cpu") return cpu_backward(dout, dlse, q, k, v, out, lse, masks, args);
  return python_backward(dout, dlse, q, k, v, out, lse, masks, args, backend);
}

// Decoding is end-aligned (bottom-right): its score modifiers take no alignment.
TensorPair kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& cache_seqlens, const OptTensor& k_new, const OptTensor& v_new, bool causal,
                   double scale, c10::string_view backend, int64_t window_left, int64_t window_right, double softcap,
                   const OptTensor& alibi_slopes, const OptTensor& sinks) {
  CallArgs args = score_mods(window_left, window_right, softcap, alibi_slopes, sinks, true);
  args.causal = causal;
  args.scale = scale;
  if (backend == "cpu") return cpu_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, args);
  return python_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, args, backend);
}

}  // namespace

TensorPair call_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& key_padding,
                        const OptTensor& key_ranges, const OptTensor& attn_mask, const OptTensor& cu_seqlens_q,
                        const OptTensor& cu_seqlens_k, c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, bool causal,
                        double scale, double dropout_p, c10::SymInt seed, c10::string_view backend,
                        const CallArgs& mods) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattn::attention_forward", "")
                             .typed<decltype(fastattn::forward)>();
  return op.call(q, k, v, key_padding, key_ranges, attn_mask, cu_seqlens_q, cu_seqlens_k, std::move(max_seqlen_q),
                 std::move(max_seqlen_k), causal, scale, dropout_p, std::move(seed), backend, mods.window_left,
                 mods.window_right, mods.softcap, mods.alibi_slopes, mods.sinks, mods.bottom_right);
}

TensorTriple call_backward(const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                           const OptTensor& key_padding, const OptTensor& key_ranges, const OptTensor& attn_mask,
                           const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
                           c10::SymInt max_seqlen_k, bool causal, double scale, double dropout_p, c10::SymInt seed,
                           c10::string_view backend, const CallArgs& mods) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattn::attention_backward", "")
                             .typed<decltype(fastattn::backward)>();
  return op.call(dout, dlse, q, k, v, out, lse, key_padding, key_ranges, attn_mask, cu_seqlens_q, cu_seqlens_k,
                 std::move(max_seqlen_q), std::move(max_seqlen_k), causal, scale, dropout_p, std::move(seed),
                 backend, mods.window_left, mods.window_right, mods.softcap, mods.alibi_slopes, mods.sinks,
                 mods.bottom_right);
}

TensorPair call_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& cache_seqlens, const OptTensor& k_new, const OptTensor& v_new, bool causal,
                        double scale, c10::string_view backend, const CallArgs& mods) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastattn::attention_kvcache", "")
                             .typed<decltype(fastattn::kvcache)>();
  return op.call(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, backend, mods.window_left,
                 mods.window_right, mods.softcap, mods.alibi_slopes, mods.sinks);
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

// The forward's autograd: saves what the backward op reads (no work redone) and hands it the
// incoming gradients of out and lse (either may be absent); the sinks' gradient comes from out,
// lse and those.
class Attention : public torch::autograd::Function<Attention> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const OptTensor& key_padding, const OptTensor& key_ranges, const OptTensor& attn_mask,
      const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
      c10::SymInt max_seqlen_k, bool causal, double scale, double dropout_p, c10::SymInt seed,
      c10::string_view backend, int64_t window_left, int64_t window_right, double softcap,
      const OptTensor& alibi_slopes, const OptTensor& sinks, bool bottom_right) {
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, lse] = call_forward(q, k, v, key_padding, key_ranges, attn_mask, cu_seqlens_q, cu_seqlens_k,
                                   max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, seed, backend,
                                   score_mods(window_left, window_right, softcap, alibi_slopes, sinks, bottom_right));
    const auto or_undefined = [](const OptTensor& t) { return t.value_or(at::Tensor()); };
    ctx->save_for_backward({q, k, v, out, lse, or_undefined(key_padding), or_undefined(key_ranges),
                            or_undefined(attn_mask), or_undefined(cu_seqlens_q), or_undefined(cu_seqlens_k),
                            or_undefined(alibi_slopes), or_undefined(sinks)});
    ctx->saved_data["max_seqlen_q"] = max_seqlen_q;
    ctx->saved_data["max_seqlen_k"] = max_seqlen_k;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["backend"] = std::string(backend);
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["bottom_right"] = bottom_right;
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto optional = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
    const at::Tensor& out = saved[3];
    const at::Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const OptTensor dlse = optional(grads[1]);
    const std::string backend = ctx->saved_data["backend"].toStringRef();
    const CallArgs mods = score_mods(ctx->saved_data["window_left"].toInt(), ctx->saved_data["window_right"].toInt(),
                                     ctx->saved_data["softcap"].toDouble(), optional(saved[10]), optional(saved[11]),
                                     ctx->saved_data["bottom_right"].toBool());
    auto [dq, dk, dv] =
        call_backward(dout, dlse, saved[0], saved[1], saved[2], out, saved[4], optional(saved[5]), optional(saved[6]),
                      optional(saved[7]), optional(saved[8]), optional(saved[9]),
                      ctx->saved_data["max_seqlen_q"].toSymInt(), ctx->saved_data["max_seqlen_k"].toSymInt(),
                      ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble(),
                      ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["seed"].toSymInt(), backend, mods);
    torch::autograd::variable_list result(21);  // one per forward argument: q, k, v, the sinks, then none
    result[0] = dq;
    result[1] = dk;
    result[2] = dv;
    if (mods.sinks && mods.sinks->requires_grad()) result[19] = sink_gradient(dout, dlse, out, saved[4], *mods.sinks);
    return result;
  }
};

TensorPair forward_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const OptTensor& key_padding, const OptTensor& key_ranges, const OptTensor& attn_mask,
                            const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, c10::SymInt max_seqlen_q,
                            c10::SymInt max_seqlen_k, bool causal, double scale, double dropout_p, c10::SymInt seed,
                            c10::string_view backend, int64_t window_left, int64_t window_right, double softcap,
                            const OptTensor& alibi_slopes, const OptTensor& sinks, bool bottom_right) {
  const bool sinks_grad = sinks && sinks->requires_grad();
  if (!at::GradMode::is_enabled() || !(q.requires_grad() || k.requires_grad() || v.requires_grad() || sinks_grad)) {
    at::AutoDispatchBelowADInplaceOrView below;  // nothing to differentiate: no graph node to build
    return call_forward(q, k, v, key_padding, key_ranges, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                        max_seqlen_k, causal, scale, dropout_p, seed, backend,
                        score_mods(window_left, window_right, softcap, alibi_slopes, sinks, bottom_right));
  }
  auto outputs = Attention::apply(q, k, v, key_padding, key_ranges, attn_mask, cu_seqlens_q, cu_seqlens_k,
                                  max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, seed, backend, window_left,
                                  window_right, softcap, alibi_slopes, sinks, bottom_right);
  return {outputs[0], outputs[1]};
}

// Decoding: forward only, and the caches change in place, which their version counters must say
// (autograd's saved-tensor checks and torch.compile's guards read them): the returned tensors are
// fresh, so no fallback would bump them.
TensorPair kvcache_bumping_versions(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                    const at::Tensor& cache_seqlens, const OptTensor& k_new, const OptTensor& v_new,
                                    bool causal, double scale, c10::string_view backend, int64_t window_left,
                                    int64_t window_right, double softcap, const OptTensor& alibi_slopes,
                                    const OptTensor& sinks) {
  const auto wants_grad = [](const OptTensor& t) { return t.has_value() && t->requires_grad(); };
  TORCH_CHECK(!at::GradMode::is_enabled() || !(q.requires_grad() || k_cache.requires_grad() || v_cache.requires_grad() ||
                                                wants_grad(k_new) || wants_grad(v_new)),
              "fastattn::attention_kvcache is forward only: call it under torch.no_grad() or on detached tensors");
  TensorPair result;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    result = call_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, backend,
                          score_mods(window_left, window_right, softcap, alibi_slopes, sinks, true));
  }
  torch::autograd::impl::bump_version(k_cache);
  torch::autograd::impl::bump_version(v_cache);
  return result;
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY(fastattn, m) {
  m.set_python_module("fastattn.ops");  // the fake (meta) implementations live there
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? key_ranges, "
      "Tensor? attn_mask, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, "
      "bool causal, float scale, float dropout_p, SymInt seed, str backend, int window_left=-1, "
      "int window_right=-1, float softcap=0., Tensor? alibi_slopes=None, Tensor? sinks=None, bool bottom_right=False) "
      "-> (Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, Tensor? key_ranges, Tensor? attn_mask, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, bool causal, float scale, "
      "float dropout_p, SymInt seed, str backend, int window_left=-1, int window_right=-1, float softcap=0., "
      "Tensor? alibi_slopes=None, Tensor? sinks=None, bool bottom_right=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_kvcache(Tensor q, Tensor(a1!) k_cache, Tensor(a2!) v_cache, Tensor cache_seqlens, "
      "Tensor? k_new, Tensor? v_new, bool causal, float scale, str backend, int window_left=-1, "
      "int window_right=-1, float softcap=0., Tensor? alibi_slopes=None, Tensor? sinks=None) -> (Tensor, Tensor)");
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
