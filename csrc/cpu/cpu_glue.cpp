// The CPU kernels behind the ops (ops.h): tensors in, AttentionParams to the kernel, outputs
// allocated here; and the CPU helpers Python calls (module.cpp binds them).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "../dropout_hash.h"
#include "../ops.h"
#include "flash_cpu.h"
#include "micro_kernels.h"

namespace fastattn {

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool poison = [] {
    const char* env = std::getenv("FASTATTN_POISON");
    return env != nullptr && std::strcmp(env, "1") == 0;
  }();
  at::Tensor t = at::empty(sizes, options);
  return poison ? t.fill_(std::numeric_limits<double>::quiet_NaN()) : t;
}

at::Tensor new_output(const at::Tensor& like, std::optional<at::ScalarType> dtype) {
  // like's dimensions from outermost (largest stride) in, ties by position: a q sliced out of a
  // (B, N, 3, H, D) projection gets an out that reshapes back to (B, N, H * D) with no copy. A
  // broadcast dimension (stride 0, an expanded q) goes outermost and the last dimension innermost,
  // whatever their strides: kernels write rows of the last dimension (backends.base.out_strides).
  const int64_t n = like.dim();
  std::array<int64_t, 8> order{};
  TORCH_CHECK(n <= 8, "new_output takes up to 8 dims");
  for (int64_t d = 0; d < n; ++d) order[d] = d;
  const auto rank = [&](int64_t d) { return d == n - 1 ? 2 : like.stride(d) == 0 ? 0 : 1; };
  std::stable_sort(order.begin(), order.begin() + n, [&](int64_t a, int64_t b) {
    return rank(a) != rank(b) ? rank(a) < rank(b) : like.stride(a) > like.stride(b);
  });
  std::array<int64_t, 8> sizes{}, inverse{};
  bool in_order = true;
  for (int64_t i = 0; i < n; ++i) sizes[i] = like.size(order[i]), inverse[order[i]] = i, in_order &= order[i] == i;
  at::Tensor t = new_output(at::IntArrayRef(sizes.data(), n), like.options().dtype(dtype.value_or(like.scalar_type())));
  return in_order ? t : t.permute(at::IntArrayRef(inverse.data(), n));
}

namespace {

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

at::Tensor new_lse(const at::Tensor& q) {
  return new_output({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
}

// The score modifiers into the kernel's params; slopes and sinks as fastattn.attention checked
// them (float32, on the CPU), made contiguous. Returns the tensors the params point into.
// A window wider than every query-key distance is that distance (|j - i - offset| < Nq + Nk):
// the kernels' position sums stay far from int64's end.
std::pair<at::Tensor, at::Tensor> set_score_mods(AttentionParams& p, const Call& call) {
  const auto bounded = [&](int64_t w) { return w < 0 ? int64_t{-1} : std::min(w, p.q_len + p.kv_len); };
  p.window_left = bounded(call.window_left);
  p.window_right = bounded(call.window_right);
  p.softcap = static_cast<float>(call.softcap);
  TORCH_CHECK(call.softcap == 0.0 || (p.softcap > 0.f && std::isfinite(p.softcap)),
              "softcap: expected 0 or a positive float32, got ", call.softcap);
  p.bottom_right = call.bottom_right;
  at::Tensor slopes, sinks;
  if (call.alibi_slopes) {
    slopes = call.alibi_slopes->to(at::kFloat).contiguous();
    check_cpu(slopes, "alibi_slopes");
    const bool per_head = slopes.dim() == 1 && slopes.size(0) == p.heads;
    const bool per_batch = slopes.dim() == 2 && slopes.size(1) == p.heads &&
                           (slopes.size(0) == 1 || slopes.size(0) == p.batch);
    TORCH_CHECK(per_head || per_batch, "alibi_slopes: expected (H,), (1, H) or (B, H) with H = ", p.heads, ", B = ",
                p.batch, ", got ", slopes.sizes());
    p.alibi_slopes = slopes.data_ptr<float>();
    p.alibi_stride = per_batch && slopes.size(0) > 1 ? p.heads : 0;
  }
  if (call.sinks) {
    sinks = call.sinks->to(at::kFloat).contiguous();
    check_cpu(sinks, "sinks");
    TORCH_CHECK(sinks.dim() == 1 && sinks.size(0) == p.heads, "sinks: expected (H,) with H = ", p.heads, ", got ",
                sinks.sizes());
    p.sinks = sinks.data_ptr<float>();
  }
  return {slopes, sinks};
}

// Per-query-head fp32 gradients (B, H, N, D) -> the inputs' dtype, dK/dV summed over each GQA group.
at::Tensor finish_kv_grad(const at::Tensor& g, const at::Tensor& like) {
  const int64_t B = g.size(0), H = g.size(1), Hkv = like.size(1);
  at::Tensor summed = H == Hkv ? g : g.view({B, Hkv, H / Hkv, g.size(2), g.size(3)}).sum(2);
  return summed.to(like.scalar_type());
}

}  // namespace

TensorPair cpu_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Call& call) {
  check_cpu(q, "q");
  at::Tensor out = new_output(q), lse = new_lse(q);
  AttentionParams p = make_params(q, k, v, out, lse, call);
  const auto held = set_score_mods(p, call);
  cpu::forward(p);
  return {out, lse};
}

TensorTriple cpu_backward(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                          const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                          const Call& call) {
  check_cpu(q, "q");
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t B = q.size(0), H = q.size(1), Nk = k.size(2), D = q.size(3);
  at::Tensor dq = new_output({B, H, q.size(2), D}, f32), dk = new_output({B, H, Nk, D}, f32),
             dv = new_output({B, H, Nk, D}, f32);
  std::optional<at::Tensor> dlse32;
  if (dlse) dlse32 = dlse->to(at::kFloat).contiguous();
  AttentionBwdParams p = make_bwd_params(dout, q, k, v, out, lse, dlse32, call, dq, dk, dv);
  const auto held = set_score_mods(p, call);
  cpu::backward(p);
  return {dq.to(q.scalar_type()), finish_kv_grad(dk, k), finish_kv_grad(dv, v)};
}

TensorPair cpu_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                       const std::optional<at::Tensor>& v_new, const Call& call) {
  check_cpu(q, "q");
  const int64_t B = q.size(0), Nmax = k_cache.size(2), Nnew = k_new ? k_new->size(2) : 0;
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.dim() == 1 && cache_seqlens.size(0) == B &&
                  cache_seqlens.is_cpu(),
              "cache_seqlens must be a CPU (B,) int32 tensor");
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "k_new and v_new come together");
  for (const auto& [name, t] : {std::pair{"k_new", k_new}, std::pair{"v_new", v_new}})
    if (t) {
      TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == k_cache.size(1) && t->size(3) == k_cache.size(3) &&
                      t->size(2) == Nnew,
                  name, " must be (B, Hkv, Nnew, D) = (", B, ", ", k_cache.size(1), ", ", Nnew, ", ", k_cache.size(3),
                  "), got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == k_cache.scalar_type() && t->device() == k_cache.device(), name,
                  " must have the caches' dtype and device");
    }
  for (const auto& [name, cache] : {std::pair{"k_cache", &k_cache}, std::pair{"v_cache", &v_cache}})
    for (int64_t d = 0; k_new && d < cache->dim(); ++d)  // an expanded cache: one row's append overwrites another's
      TORCH_CHECK_VALUE(cache->stride(d) != 0 || cache->size(d) <= 1, name,
                        ": expected no broadcast dim (stride 0) in a cache k_new is written to, got strides ",
                        cache->strides());
  const at::Tensor lengths = cache_seqlens.contiguous();
  const int32_t* n = lengths.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    if (n[b] < 0 || n[b] > Nmax - Nnew) {
      std::string got;
      for (int64_t i = 0; i < B; ++i) got += (i ? ", " : "") + std::to_string(n[i]);
      TORCH_CHECK_VALUE(false, "cache_seqlens: expected entries in [0, Nmax - Nnew] = [0, ", Nmax - Nnew, "], got [",
                        got, "]");
    }
  at::Tensor seqused = lengths;
  if (k_new) {  // append, then attend to the first cache_seqlens[b] + Nnew rows
    seqused = at::empty({B}, lengths.options());
    for (int64_t b = 0; b < B; ++b) {
      k_cache.select(0, b).narrow(1, n[b], Nnew).copy_(k_new->select(0, b));
      v_cache.select(0, b).narrow(1, n[b], Nnew).copy_(v_new->select(0, b));
      seqused.data_ptr<int32_t>()[b] = n[b] + static_cast<int32_t>(Nnew);
    }
  }
  at::Tensor out = new_output(q), lse = new_lse(q);
  TORCH_CHECK(!call.key_padding && !call.key_ranges && !call.attn_mask && !call.varlen() && call.dropout_p == 0.0,
              "decoding takes no masks, packed sequences or dropout");
  AttentionParams p = make_params(q, k_cache, v_cache, out, lse, call);
  p.seqused_k = seqused.data_ptr<int32_t>();
  const auto held = set_score_mods(p, call);
  cpu::decode(p);
  return {out, lse};
}

// The padding mask's kernel form (fastattn.masks.key_ranges) in one pass: per batch row its
// first valid key, one past its last (begin >= end: none), and whether padding lies between.
at::Tensor key_ranges(const at::Tensor& padding) {
  TORCH_CHECK(padding.is_cpu() && padding.scalar_type() == at::kBool && padding.dim() == 2,
              "key_ranges takes a CPU (B, Nk) bool tensor");
  const int64_t B = padding.size(0), Nk = padding.size(1), sb = padding.stride(0), sk = padding.stride(1);
  at::Tensor ranges = at::empty({3, B}, padding.options().dtype(at::kInt));
  const bool* pad = padding.data_ptr<bool>();
  int32_t* r = ranges.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t begin = Nk, end = 0, valid = 0;
    for (int64_t j = 0; j < Nk; ++j)
      if (!pad[b * sb + j * sk]) {
        begin = std::min(begin, j);
        end = j + 1;
        ++valid;
      }
    r[b] = static_cast<int32_t>(begin);
    r[B + b] = static_cast<int32_t>(end);
    r[2 * B + b] = valid < end - begin;
  }
  return ranges;
}

// The keep mask the kernels draw for `seed`, materialised (for tests), (B, H, Nq, Nk) bool.
at::Tensor dropout_keep_mask(int64_t seed, int64_t B, int64_t H, int64_t Nq, int64_t Nk,
                             double p) {
  at::Tensor keep = at::empty({B, H, Nq, Nk}, at::kBool);
  bool* out = keep.data_ptr<bool>();
  at::parallel_for(0, keep.numel(), 4096, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i)
      out[i] = dropout_keep(static_cast<uint64_t>(seed), static_cast<uint64_t>(i), static_cast<float>(p));
  });
  return keep;
}

namespace {

// GFLOPS of call() (which runs once and returns the flops it did) in its best of 8 slices of
// seconds / 8: a shared machine only ever slows a slice down.
template <class Call>
double best_gflops(Call call, double seconds) {
  double best = 0;
  for (int slice = 0; slice < 8; ++slice) {
    call();
    const auto start = std::chrono::steady_clock::now();
    double flops = 0, elapsed = 0;
    while (elapsed < seconds / 8) {
      flops += call();
      elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    }
    best = std::max(best, flops / elapsed / 1e9);
  }
  return best;
}

}  // namespace

// One thread's GFLOPS on the active table: its GEMM on the score tile's shape (M keys x K head
// dims times K x N queries, in cache), and its FMA peak (fma_loop), timed in turns.
std::pair<double, double> cpu_micro_gflops(int64_t M, int64_t N, int64_t K, double seconds) {
  const cpu::MicroKernels& mk = cpu::micro_kernels();
  std::vector<float> A(M * K, 0.5f), B(K * N, 0.25f), C(M * N);
  double gemm = 0, peak = 0;
  for (int turn = 0; turn < 4; ++turn) {
    gemm = std::max(gemm, best_gflops([&] {
      mk.gemm(M, N, K, A.data(), K, 1, B.data(), N, C.data(), N, false);
      return 2.0 * M * N * K;
    }, seconds / 4));
    peak = std::max(peak, best_gflops([&] { return mk.fma_loop(1 << 14); }, seconds / 4));
  }
  return {gemm, peak};
}

// One thread's peak GFLOPS on the table of `isa`: fp32 FMAs, and its bf16 dot products (0 on a
// table without them).
std::pair<double, double> cpu_peak_gflops(const std::string& isa, double seconds) {
  const cpu::MicroKernels& mk = cpu::table(isa);
  const double fma = best_gflops([&] { return mk.fma_loop(1 << 14); }, seconds);
  const double bf16 = mk.bf16_dot_loop ? best_gflops([&] { return mk.bf16_dot_loop(1 << 12); }, seconds) : 0.0;
  return {fma, bf16};
}

std::vector<std::string> cpu_isas() {
  std::vector<std::string> names;
  for (const char* const* name = cpu::supported_isas(); *name != nullptr; ++name) names.emplace_back(*name);
  return names;
}

std::string cpu_isa() { return cpu::micro_kernels().isa; }

void cpu_set_isa(const std::string& isa) { cpu::set_isa(isa); }

}  // namespace fastattn
