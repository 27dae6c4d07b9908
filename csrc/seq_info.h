// Where one batch row lives in the tensors and which keys its queries see, for padded and packed
// (varlen) batches alike: FlashAttention's BlockInfo. Plain C++, like attention_params.h.
#pragma once
#include <cstdint>

#include "attention_params.h"

namespace fastattn {

struct SeqInfo {
  int64_t q_off = 0, k_off = 0;  // first token row of the sequence in the seq dim
  int64_t q_len, k_len;          // its queries and keys
  int64_t key_begin, key_end;    // its valid keys, local to the sequence
  int64_t offset = 0;            // query i's key position is i + offset (bottom-right: Nk - Nq)

  SeqInfo(const AttentionParams& p, int64_t b) : q_len(p.q_len), k_len(p.kv_len), key_begin(0), key_end(p.kv_len) {
    if (p.cu_seqlens_q != nullptr) {
      q_off = p.cu_seqlens_q[b];
      q_len = p.cu_seqlens_q[b + 1] - q_off;
      k_off = p.cu_seqlens_k[b];
      k_len = key_end = p.cu_seqlens_k[b + 1] - k_off;
    }
    if (p.kv_begin != nullptr) key_begin = p.kv_begin[b], key_end = p.kv_end[b];
    if (p.bottom_right) offset = k_len - q_len;
  }

  float* lse(const AttentionParams& p, int64_t b, int64_t h) const {
    return p.lse + b * p.lse_stride[0] + h * p.lse_stride[1] + q_off;
  }
};

}  // namespace fastattn
