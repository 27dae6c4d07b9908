// Tensor -> AttentionParams, shared by the CPU and CUDA glue. Checks every precondition the
// kernels rely on with TORCH_CHECK (Python validates user input before this; these guard the C++
// entry points themselves).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "attention_params.h"

namespace fastattn {

// Masks as the kernels take them, already normalised by Python.
struct MaskTensors {
  std::optional<at::Tensor> key_ranges;   // (3, B) int32: begin, end, holes (fastattn.masks)
  std::optional<at::Tensor> key_padding;  // (B, Nk) bool, true = ignore
  std::optional<at::Tensor> attn_mask;    // (B, H, Nq, Nk) bool or float32, may be expanded
  // Packed sequences, a block-diagonal mask in its kernel form: (B + 1,) int32 cumulative
  // lengths, with the longest of each. q, k, v, out are then (1, H, total, D) and lse (1, H, total).
  std::optional<at::Tensor> cu_seqlens_q, cu_seqlens_k;
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;
};

AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& lse, const MaskTensors& masks,
                            bool causal, double scale, double dropout_p, int64_t seed);

AttentionBwdParams make_bwd_params(const at::Tensor& dout, const at::Tensor& q,
                                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                   const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
                                   const MaskTensors& masks, bool causal, double scale,
                                   double dropout_p, int64_t seed, const at::Tensor& dq,
                                   const at::Tensor& dk, const at::Tensor& dv);

}  // namespace fastattn
