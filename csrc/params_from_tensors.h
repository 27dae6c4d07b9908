// Tensor -> AttentionParams, shared by the CPU and CUDA glue. Checks every precondition the
// kernels rely on with TORCH_CHECK (Python validates user input before this; these guard the C++
// entry points themselves).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "attention_params.h"
#include "call.h"

namespace fastattn {

// The call's masks and options into the kernels' params (its score modifiers: the CPU glue's
// set_score_mods; the CUDA kernels take none).
AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& lse, const Call& call);

AttentionBwdParams make_bwd_params(const at::Tensor& dout, const at::Tensor& q,
                                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                   const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
                                   const Call& call, const at::Tensor& dq,
                                   const at::Tensor& dk, const at::Tensor& dv);

}  // namespace fastattn
