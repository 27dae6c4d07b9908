// The one parameter struct shared by every C++/CUDA attention kernel.
// Plain C++: no torch headers, so CUDA translation units can include it too.
#pragma once
#include <cstdint>

namespace fastattn {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class MaskKind : int32_t { kNone = 0, kBool = 1, kFloat = 2 };

// Strides are in elements. Tensor strides are ordered (batch, head, seq, dim);
// masks broadcast to (B, H, Nq, Nk) carry stride 0 on broadcast dims.
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_stride[4], k_stride[4], v_stride[4];

  void* out;             // (B, H, Nq, D), dtype of q, strides o_stride
  int64_t o_stride[4];
  float* lse;            // (B, H, Nq), natural log; -inf for rows that see no key
  int64_t lse_stride[2]; // batch, head; rows contiguous

  int64_t batch, heads, kv_heads, q_len, kv_len, head_dim;

  // Packed (varlen) sequences, or nullptr: sequence b holds token rows [cu[b], cu[b + 1]) of the
  // seq dim, batch strides are 0, and q_len/kv_len are the longest sequences. Attention stays
  // within each sequence, causal top-left in it (seq_info.h).
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  // Decoding against a KV cache (decode(), nullptr elsewhere): batch row b attends to the first
  // seqused_k[b] keys, and causal is aligned to the last of them: query i sees keys
  // j <= seqused_k[b] - q_len + i.
  const int32_t* seqused_k;
  DType dtype;
  float scale;
  bool causal;           // query i sees keys j <= i (top-left aligned)

  // Key padding. kv_begin/kv_end (B,) bound the valid keys of each batch row; kv_holes (B,) is
  // nonzero where padding also lies inside that range, and only those rows test key_padding
  // (B, Nk), true = ignore, key by key. All four are set together, or none.
  const int32_t* kv_begin;
  const int32_t* kv_end;
  const int32_t* kv_holes;
  const bool* key_padding;
  int64_t kpm_stride[2];

  // attn_mask: bool (true = may attend) or float32 added to the scores.
  MaskKind mask_kind;
  const void* mask;
  int64_t mask_stride[4];

  float dropout_p;       // probability of dropping an attention weight
  uint64_t seed;

  // Score modifiers (fastattn.reference defines them; the CPU kernels take them). Query i sits at
  // key position i + offset, offset = Nk - Nq of its sequence with bottom_right, else 0 (causal
  // too). It sees keys j with i + offset - window_left <= j <= i + offset + window_right (-1:
  // unbounded). Scores are softcapped to softcap * tanh(s / softcap) (0: off), then get
  // - slope * |j - i - offset| (alibi_slopes[b * alibi_stride + h], alibi_stride 0 for (H,)
  // slopes); sinks[h] joins each softmax denominator (nullptr: none).
  int64_t window_left = -1, window_right = -1;
  float softcap = 0.f;
  const float* alibi_slopes = nullptr;
  int64_t alibi_stride = 0;
  const float* sinks = nullptr;
  bool bottom_right = false;
};

// Backward: the forward's inputs plus the output gradient. Gradients come out in float32 with
// contiguous rows of D; dk/dv per *query* head, (B, H, Nk, D), summed over GQA groups by the
// caller.
struct AttentionBwdParams : AttentionParams {
  const void* dout;      // strides do_stride, dtype of q
  int64_t do_stride[4];
  const float* dlse;     // optional (B, H, Nq) contiguous gradient of lse
  float* dq;             // (B, H, Nq, D)
  float* dk;             // (B, H, Nk, D)
  float* dv;             // (B, H, Nk, D), dk's strides
  int64_t dq_stride[2], dkv_stride[2];  // batch, head
};

}  // namespace fastattn
