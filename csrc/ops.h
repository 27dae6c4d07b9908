// The fastattn:: ops' kernels, as the op layer (ops.cpp) calls them: the CPU kernels natively
// (cpu/cpu_glue.cpp), every other backend through Python (module.cpp holds the bridge).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/string_view.h>

#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "params_from_tensors.h"

namespace fastattn {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;
using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// The CPU kernels, allocating their outputs: out in q's dimension order, lse (B, H, Nq) fp32;
// gradients contiguous in the inputs' dtypes, dK/dV summed over each GQA group.
TensorPair cpu_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Call& call);
TensorTriple cpu_backward(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                          const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                          const Call& call);
// Writes k_new/v_new into the caches at rows cache_seqlens[b]..., then attends (flash-decoding).
TensorPair cpu_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                       const std::optional<at::Tensor>& v_new, const Call& call);

// The backends written in Python (reference, triton, ...), as fastattn.ops registers them: each
// takes the op's own arguments and the GIL.
TensorPair python_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::string_view backend,
                          const Call& call);
TensorTriple python_backward(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                             std::string_view backend, const Call& call);
TensorPair python_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                          const std::optional<at::Tensor>& v_new, std::string_view backend, const Call& call);

// The ops through the dispatcher, every key on the way (autograd, Python modes, the kernel):
// for the autograd formula, and for Python's front door, which reaches them in one call
// (module.cpp) where torch.ops' argument parsing would cost more than a small call's kernel.
TensorPair call_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, c10::string_view backend,
                        const Call& call);
TensorTriple call_backward(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                           const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                           c10::string_view backend, const Call& call);
TensorPair call_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
                        const std::optional<at::Tensor>& v_new, c10::string_view backend, const Call& call);

// The CPU helpers Python calls (fastattn._C): the padding mask's kernel form of a CPU mask, in
// one pass; the kernels' dropout keep mask, materialised (tests); the micro-kernel tables (the
// ISAs this CPU runs, the active one, forcing one) and their GEMM and peak rates, one thread.
at::Tensor key_ranges(const at::Tensor& padding);
at::Tensor dropout_keep_mask(int64_t seed, int64_t B, int64_t H, int64_t Nq, int64_t Nk, double p);
std::vector<std::string> cpu_isas();
std::string cpu_isa();
void cpu_set_isa(const std::string& isa);
std::pair<double, double> cpu_micro_gflops(int64_t M, int64_t N, int64_t K, double seconds);
std::pair<double, double> cpu_peak_gflops(const std::string& isa, double seconds);

// A new kernel output shaped and laid out like `like` (its dimension order), or of `sizes`
// (contiguous); NaN-filled when FASTATTN_POISON=1, so an element a kernel forgets to write fails.
at::Tensor new_output(const at::Tensor& like, std::optional<at::ScalarType> dtype = std::nullopt);
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace fastattn
