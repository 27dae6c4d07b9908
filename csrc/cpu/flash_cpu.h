#pragma once
#include "../attention_params.h"

namespace fastattn::cpu {

// Fused flash-attention on the CPU. Both write every element of their outputs.
void forward(const AttentionParams& p);
void backward(const AttentionBwdParams& p);
// Decoding against a KV cache (p.seqused_k set, q_len <= 16): writes out and lse.
void decode(const AttentionParams& p);

}  // namespace fastattn::cpu
