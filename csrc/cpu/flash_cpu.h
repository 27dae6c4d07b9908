#pragma once
#include "../attention_params.h"

namespace fastattn::cpu {

// Fused flash-attention on the CPU. Both write every element of their outputs.
void forward(const AttentionParams& p);
void backward(const AttentionBwdParams& p);

}  // namespace fastattn::cpu
