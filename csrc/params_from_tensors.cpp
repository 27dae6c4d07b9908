#include "params_from_tensors.h"

#include <tuple>

namespace fastattn {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "fastattn kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void copy_strides(const at::Tensor& t, int64_t* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = t.stride(i);
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& like, at::IntArrayRef sizes,
                at::ScalarType dtype) {
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.sizes() == sizes, name, " has shape ", t.sizes(), ", expected ", sizes);
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

void check_contiguous_f32(const at::Tensor& t, const char* name, const at::Tensor& like,
                          at::IntArrayRef sizes) {
  check_same(t, name, like, sizes, at::kFloat);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Packed sequences: validates the cumulative lengths against the packed tensors (on the CPU
// only: on a GPU that would cost a sync, and fastattn.attention_varlen checks them on the device).
void set_varlen(AttentionParams& p, const Call& call, const at::Tensor& q, const at::Tensor& k) {
  const at::Tensor& cq = *call.cu_seqlens_q;
  const at::Tensor& ck = *call.cu_seqlens_k;
  TORCH_CHECK(cq.dim() == 1 && cq.size(0) >= 1 && cq.is_contiguous(), "cu_seqlens_q must be a contiguous (B + 1,) tensor");
  check_same(ck, "cu_seqlens_k", q, cq.sizes(), at::kInt);
  check_same(cq, "cu_seqlens_q", q, cq.sizes(), at::kInt);
  TORCH_CHECK(ck.is_contiguous(), "cu_seqlens_k must be contiguous");
  TORCH_CHECK(q.size(0) == 1, "packed q must be (1, H, total, D), got ", q.sizes());
  p.batch = cq.size(0) - 1;
  p.q_len = call.max_seqlen_q.expect_int();
  p.kv_len = call.max_seqlen_k.expect_int();
  p.cu_seqlens_q = cq.data_ptr<int32_t>();
  p.cu_seqlens_k = ck.data_ptr<int32_t>();
  if (cq.is_cpu()) {
    for (auto [cu, total, longest, name] : {std::tuple{p.cu_seqlens_q, q.size(2), p.q_len, "cu_seqlens_q"},
                                            std::tuple{p.cu_seqlens_k, k.size(2), p.kv_len, "cu_seqlens_k"}}) {
      TORCH_CHECK(cu[0] == 0 && cu[p.batch] == total, name, " must run from 0 to ", total);
      for (int64_t b = 0; b < p.batch; ++b)
        TORCH_CHECK(cu[b] <= cu[b + 1] && cu[b + 1] - cu[b] <= longest, name,
                    " must be nondecreasing, with steps at most the max seqlen ", longest);
    }
  }
  // One (1, H, total, D) row serves every sequence: batch strides vanish.
  for (int64_t* stride : {p.q_stride, p.k_stride, p.v_stride, p.o_stride, p.lse_stride}) stride[0] = 0;
}

}  // namespace

AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& lse, const Call& call) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (B, H, N, D)");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "heads (", H, ") must be a multiple of kv heads (", Hkv, ")");
  check_same(k, "k", q, {B, Hkv, Nk, D}, q.scalar_type());
  check_same(v, "v", q, {B, Hkv, Nk, D}, q.scalar_type());
  check_same(out, "out", q, q.sizes(), q.scalar_type());
  check_contiguous_f32(lse, "lse", q, {B, H, Nq});
  TORCH_CHECK(call.cu_seqlens_q.has_value() == call.cu_seqlens_k.has_value(),
              "cu_seqlens_q and cu_seqlens_k come together");
  TORCH_CHECK(call.dropout_p >= 0.0 && call.dropout_p < 1.0, "dropout_p must be in [0, 1), got ", call.dropout_p);

  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  copy_strides(q, p.q_stride, 4);
  copy_strides(k, p.k_stride, 4);
  copy_strides(v, p.v_stride, 4);
  copy_strides(out, p.o_stride, 4);
  copy_strides(lse, p.lse_stride, 2);
  p.batch = B;
  p.heads = H;
  p.kv_heads = Hkv;
  p.q_len = Nq;
  p.kv_len = Nk;
  p.head_dim = D;
  p.dtype = dtype_of(q);
  p.scale = static_cast<float>(call.scale);
  p.causal = call.causal;
  p.dropout_p = static_cast<float>(call.dropout_p);
  p.seed = static_cast<uint64_t>(call.seed.expect_int());

  if (call.cu_seqlens_q) {
    TORCH_CHECK(!call.key_ranges && !call.attn_mask, "packed sequences take no other mask");
    set_varlen(p, call, q, k);
  }
  // key_ranges alone: no padding inside the ranges (a KV cache's valid prefix).
  TORCH_CHECK(call.key_ranges.has_value() || !call.key_padding.has_value(), "key_padding needs key_ranges");
  if (call.key_ranges) {
    const at::Tensor& r = *call.key_ranges;
    check_same(r, "key_ranges", q, {3, B}, at::kInt);
    TORCH_CHECK(r.is_contiguous(), "key_ranges must be contiguous");
    p.kv_begin = r.data_ptr<int32_t>();
    if (r.is_cpu())  // on a GPU this would cost a sync; Python derived the ranges itself
      for (int64_t i = 0; i < 2 * B; ++i)
        TORCH_CHECK(p.kv_begin[i] >= 0 && p.kv_begin[i] <= Nk, "key range entries must lie in [0, ", Nk, "]");
    p.kv_end = p.kv_begin + B;
    p.kv_holes = p.kv_end + B;
    if (call.key_padding) {
      check_same(*call.key_padding, "key_padding", q, {B, Nk}, at::kBool);
      p.key_padding = call.key_padding->data_ptr<bool>();
      copy_strides(*call.key_padding, p.kpm_stride, 2);
    }
  }
  if (call.attn_mask) {
    const at::Tensor& m = *call.attn_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == at::kFloat,
                "attn_mask must be bool or float32, got ", m.scalar_type());
    check_same(m, "attn_mask", q, {B, H, Nq, Nk}, m.scalar_type());
    p.mask_kind = m.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kFloat;
    p.mask = m.data_ptr();
    copy_strides(m, p.mask_stride, 4);
  }
  return p;
}

AttentionBwdParams make_bwd_params(const at::Tensor& dout, const at::Tensor& q,
                                   const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                   const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
                                   const Call& call, const at::Tensor& dq,
                                   const at::Tensor& dk, const at::Tensor& dv) {
  AttentionBwdParams p{};
  static_cast<AttentionParams&>(p) =
      make_params(q, k, v, out, lse, call);
  check_same(dout, "dout", q, q.sizes(), q.scalar_type());
  p.dout = dout.data_ptr();
  copy_strides(dout, p.do_stride, 4);
  if (dlse) {
    check_contiguous_f32(*dlse, "dlse", q, lse.sizes());
    p.dlse = dlse->data_ptr<float>();
  }
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(2);
  check_contiguous_f32(dq, "dq", q, {B, H, Nq, D});
  check_contiguous_f32(dk, "dk", q, {B, H, Nk, D});
  check_contiguous_f32(dv, "dv", q, {B, H, Nk, D});
  p.dq = dq.data_ptr<float>();
  p.dk = dk.data_ptr<float>();
  p.dv = dv.data_ptr<float>();
  copy_strides(dq, p.dq_stride, 2);
  copy_strides(dk, p.dkv_stride, 2);
  if (p.cu_seqlens_q != nullptr) p.do_stride[0] = p.dq_stride[0] = p.dkv_stride[0] = 0;
  return p;
}

}  // namespace fastattn
