// FlashAttention-2 forward on tensor cores (mma.sync m16n8k16, sm_80+). No torch headers.
//
// A CTA owns kBlockM = 64 queries of one (batch, head); each of its 4 warps owns 16 of them.
// K/V tiles of kBlockN = 64 keys stream through shared memory with cp.async, two stages deep.
// Scores stay in registers in log2 units (log2 e folded into the scale); the probabilities feed
// P @ V straight from registers. Key tiles outside the batch row's valid range are never loaded;
// causal tiles above the diagonal are skipped; only tiles crossing a range end, the diagonal or a
// scattered padding mask pay for masking. Rows that see no key give zeros and lse = -inf.
#pragma once
#include <cuda_runtime.h>

#include <cmath>

#include "../attention_params.h"
#include "mma_utils.cuh"

namespace fastattn::cuda {

constexpr int kFwdBlockM = 64, kFwdBlockN = 64, kFwdThreads = 128;

template <int D, typename T>
constexpr int fwd_smem_bytes() {
  return (kFwdBlockM + 4 * kFwdBlockN) * D * static_cast<int>(sizeof(T));  // Q, 2 x (K, V)
}

// Whether key `col` is hidden from query `row` by the range, causality or scattered padding
// (or is no query at all: rows past q_len, which the backward must not count).
__device__ __forceinline__ bool hidden(const AttentionParams& p, int64_t b, int64_t row, int64_t col,
                                       int64_t kv_lo, int64_t kv_hi) {
  if (col < kv_lo || col >= kv_hi || row >= p.q_len || (p.causal && col > row)) return true;
  return p.key_padding != nullptr && p.kv_holes[b] && p.key_padding[b * p.kpm_stride[0] + col * p.kpm_stride[1]];
}

template <int D, typename T>
__global__ void __launch_bounds__(kFwdThreads) flash_fwd_kernel(const AttentionParams p) {
  constexpr int kKC = D / 16;             // 16-wide k-chunks of the head dim
  constexpr int kNB = kFwdBlockN / 8;     // 8-key column blocks of a score tile
  constexpr int kDB = D / 8;              // 8-wide column blocks of the output
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kFwdBlockM * D;  // stage s at sK + s * kFwdBlockN * D
  T* sV = sK + 2 * kFwdBlockN * D;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kFwdBlockM;
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, hk = h / (p.heads / p.kv_heads);
  int64_t kv_lo = 0, kv_hi = p.kv_len;
  if (p.kv_begin != nullptr) kv_lo = p.kv_begin[b], kv_hi = p.kv_end[b];
  int64_t end = kv_hi;
  if (p.causal) end = imin(end, m0 + kFwdBlockM);  // keys past the last query of the tile
  const int64_t first = kv_lo / kFwdBlockN * kFwdBlockN;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const int q_rows = static_cast<int>(imin(kFwdBlockM, p.q_len - m0));
  auto load_kv = [&](int64_t n0, int stage) {
    const int rows = static_cast<int>(imin(kFwdBlockN, p.kv_len - n0));
    load_tile_async<D, kFwdThreads>(sK + stage * kFwdBlockN * D, k + n0 * p.k_stride[2], p.k_stride[2], kFwdBlockN, rows);
    load_tile_async<D, kFwdThreads>(sV + stage * kFwdBlockN * D, v + n0 * p.v_stride[2], p.v_stride[2], kFwdBlockN, rows);
  };
  load_tile_async<D, kFwdThreads>(sQ, q + m0 * p.q_stride[2], p.q_stride[2], kFwdBlockM, q_rows);
  if (first < end) load_kv(first, 0);
  cp_async_commit();

  float o[kDB][4] = {};
  float m_i[2] = {-INFINITY, -INFINITY}, l_i[2] = {0.f, 0.f};  // rows g and g + 8 of the warp
  const int64_t row0 = m0 + warp * 16 + g;                      // this thread's first query
  const float qk_scale = p.scale * 1.4426950408889634f;
  uint32_t qf[kKC][4];
  int stage = 0;
  for (int64_t n0 = first; n0 < end; n0 += kFwdBlockN, stage ^= 1) {
    if (n0 + kFwdBlockN < end) load_kv(n0 + kFwdBlockN, stage ^ 1);  // prefetch the next tile
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (n0 == first) {
      for (int kc = 0; kc < kKC; ++kc) ldmatrix_x4(qf[kc], a_operand<D>(sQ, warp * 16, kc));
    }
    const T* tK = sK + stage * kFwdBlockN * D;
    const T* tV = sV + stage * kFwdBlockN * D;

    float s[kNB][4] = {};  // S = Q K^T for this warp's 16 rows x 64 keys
    for (int kc = 0; kc < kKC; ++kc) {
      for (int nb = 0; nb < kNB; nb += 2) {
        uint32_t kf[4];
        ldmatrix_x4(kf, b_rows<D>(tK, nb * 8, kc));
        mma_16816<T>(s[nb], qf[kc], kf[0], kf[1]);
        mma_16816<T>(s[nb + 1], qf[kc], kf[2], kf[3]);
      }
    }
    const bool edge = n0 < kv_lo || n0 + kFwdBlockN > kv_hi || (p.causal && n0 + kFwdBlockN - 1 > m0) ||
                      (p.key_padding != nullptr && p.kv_holes[b]);
    float tile_max[2] = {-INFINITY, -INFINITY};
    for (int nb = 0; nb < kNB; ++nb) {
      for (int i = 0; i < 4; ++i) {
        s[nb][i] *= qk_scale;
        if (edge && hidden(p, b, row0 + (i / 2) * 8, n0 + nb * 8 + 2 * t + i % 2, kv_lo, kv_hi)) s[nb][i] = -INFINITY;
        tile_max[i / 2] = fmaxf(tile_max[i / 2], s[nb][i]);
      }
    }
    float m_use[2], alpha[2];
    for (int r = 0; r < 2; ++r) {
      const float m_new = fmaxf(m_i[r], quad_max(tile_max[r]));
      m_use[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with no key yet: exp2 of -inf is 0
      alpha[r] = exp2f(m_i[r] - m_use[r]);
      m_i[r] = m_new;
      l_i[r] *= alpha[r];
    }
    for (int nb = 0; nb < kNB; ++nb) {
      for (int i = 0; i < 4; ++i) {
        s[nb][i] = exp2f(s[nb][i] - m_use[i / 2]);
        l_i[i / 2] += s[nb][i];  // this lane's share; the quad sums at the end
      }
    }
    for (int db = 0; db < kDB; ++db) {
      for (int i = 0; i < 4; ++i) o[db][i] *= alpha[i / 2];
    }
    for (int kk = 0; kk < kNB / 2; ++kk) {  // O += P V, 16 keys at a time
      const uint32_t pf[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      for (int cc = 0; cc < kDB / 2; ++cc) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, b_cols<D>(tV, kk * 16, cc));
        mma_16816<T>(o[2 * cc], pf, vf[0], vf[1]);
        mma_16816<T>(o[2 * cc + 1], pf, vf[2], vf[3]);
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  cp_async_wait<0>();

  T* out = static_cast<T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1];
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + r * 8;
    const float l = quad_sum(l_i[r]);
    const bool seen = l > 0.f;
    const float inv = seen ? 1.f / l : 0.f;
    if (row >= p.q_len) continue;
    for (int db = 0; db < kDB; ++db) {
      T* dst = out + row * p.o_stride[2] + (db * 8 + 2 * t) * p.o_stride[3];
      dst[0] = from_float<T>(o[db][2 * r] * inv);
      dst[p.o_stride[3]] = from_float<T>(o[db][2 * r + 1] * inv);
    }
    if (t == 0) p.lse[bh * p.q_len + row] = seen ? (m_i[r] + log2f(l)) * 0.6931471805599453f : -INFINITY;
  }
}

template <int D, typename T>
void run_fwd(const AttentionParams& p, cudaStream_t stream) {
  constexpr int smem = fwd_smem_bytes<D, T>();
  cudaFuncSetAttribute(flash_fwd_kernel<D, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const dim3 grid((p.q_len + kFwdBlockM - 1) / kFwdBlockM, p.batch * p.heads);
  flash_fwd_kernel<D, T><<<grid, kFwdThreads, smem, stream>>>(p);
}

}  // namespace fastattn::cuda
