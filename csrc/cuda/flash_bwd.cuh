// FlashAttention-2 backward on tensor cores (mma.sync m16n8k16, sm_80+). No torch headers.
//
// Probabilities are recomputed from the forward's lse. A preprocess computes
// delta = rowsum(dO * O) - dlse; a dQ kernel per 64-query tile sweeps the key tiles the forward
// visited; a dK/dV kernel per 64-key tile sweeps the query tiles (32, or 16 at D = 128) that can
// see it. No atomics:
// the result is deterministic. Gradients come out in fp32, dK/dV per query head (the caller sums
// GQA groups), as AttentionBwdParams says.
#pragma once
#include "flash_fwd.cuh"

namespace fastattn::cuda {

constexpr int kBwdThreads = 128;
constexpr int kDqBlockM = 64, kDqBlockN = 64;    // dQ: queries per CTA, keys per step
constexpr int kDkvBlockN = 64;                   // dK/dV: keys per CTA...
template <int D>
__host__ __device__ constexpr int dkv_block_m() { return D <= 64 ? 32 : 16; }  // ...queries per step: fits 255 registers

template <typename T>
__global__ void bwd_delta_kernel(const AttentionBwdParams p, float* delta) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // over B*H*Nq
  if (row >= p.batch * p.heads * p.q_len) return;
  const int64_t bh = row / p.q_len, i = row % p.q_len, b = bh / p.heads, h = bh % p.heads;
  const T* o = static_cast<const T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1] + i * p.o_stride[2];
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1] + i * p.do_stride[2];
  float acc = 0.f;
  for (int64_t d = 0; d < p.head_dim; ++d)
    acc += to_float(o[d * p.o_stride[3]]) * to_float(dout[d * p.do_stride[3]]);
  if (p.dlse != nullptr && isfinite(p.lse[row])) acc -= p.dlse[row];
  delta[row] = acc;
}

template <int D, typename T>
__global__ void __launch_bounds__(kBwdThreads) bwd_dq_kernel(const AttentionBwdParams p, const float* delta) {
  constexpr int kKC = D / 16, kNB = kDqBlockN / 8, kDB = D / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kDqBlockM * D;
  T* sK = sdO + kDqBlockM * D;  // 2 stages
  T* sV = sK + 2 * kDqBlockN * D;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kDqBlockM;
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, hk = h / (p.heads / p.kv_heads);
  int64_t kv_lo = 0, kv_hi = p.kv_len;
  if (p.kv_begin != nullptr) kv_lo = p.kv_begin[b], kv_hi = p.kv_end[b];
  int64_t end = kv_hi;
  if (p.causal) end = imin(end, m0 + kDqBlockM);
  const int64_t first = kv_lo / kDqBlockN * kDqBlockN;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const int q_rows = static_cast<int>(imin(kDqBlockM, p.q_len - m0));
  auto load_kv = [&](int64_t n0, int stage) {
    const int rows = static_cast<int>(imin(kDqBlockN, p.kv_len - n0));
    load_tile_async<D, kBwdThreads>(sK + stage * kDqBlockN * D, k + n0 * p.k_stride[2], p.k_stride[2], kDqBlockN, rows);
    load_tile_async<D, kBwdThreads>(sV + stage * kDqBlockN * D, v + n0 * p.v_stride[2], p.v_stride[2], kDqBlockN, rows);
  };
  load_tile_async<D, kBwdThreads>(sQ, q + m0 * p.q_stride[2], p.q_stride[2], kDqBlockM, q_rows);
  load_tile_async<D, kBwdThreads>(sdO, dout + m0 * p.do_stride[2], p.do_stride[2], kDqBlockM, q_rows);
  if (first < end) load_kv(first, 0);
  cp_async_commit();

  const int64_t row0 = m0 + warp * 16 + g;
  float lse2[2], dlt[2];
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + r * 8;
    const float lse = row < p.q_len ? p.lse[bh * p.q_len + row] : 0.f;
    lse2[r] = isfinite(lse) ? lse * 1.4426950408889634f : 0.f;  // -inf rows have only -inf scores
    dlt[r] = row < p.q_len ? delta[bh * p.q_len + row] : 0.f;
  }
  const float qk_scale = p.scale * 1.4426950408889634f;
  float dq[kDB][4] = {};
  int stage = 0;
  for (int64_t n0 = first; n0 < end; n0 += kDqBlockN, stage ^= 1) {
    if (n0 + kDqBlockN < end) load_kv(n0 + kDqBlockN, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* tK = sK + stage * kDqBlockN * D;
    const T* tV = sV + stage * kDqBlockN * D;
    float s[kNB][4] = {}, dp[kNB][4] = {};
    for (int kc = 0; kc < kKC; ++kc) {
      uint32_t qf[4], df[4];
      ldmatrix_x4(qf, a_operand<D>(sQ, warp * 16, kc));
      ldmatrix_x4(df, a_operand<D>(sdO, warp * 16, kc));
      for (int nb = 0; nb < kNB; nb += 2) {
        uint32_t kf[4], vf[4];
        ldmatrix_x4(kf, b_rows<D>(tK, nb * 8, kc));
        ldmatrix_x4(vf, b_rows<D>(tV, nb * 8, kc));
        mma_16816<T>(s[nb], qf, kf[0], kf[1]);  // S = Q K^T
        mma_16816<T>(s[nb + 1], qf, kf[2], kf[3]);
        mma_16816<T>(dp[nb], df, vf[0], vf[1]);  // dP = dO V^T
        mma_16816<T>(dp[nb + 1], df, vf[2], vf[3]);
      }
    }
    for (int nb = 0; nb < kNB; ++nb) {
      for (int i = 0; i < 4; ++i) {
        const int r = i / 2;
        const bool off = hidden(p, b, row0 + r * 8, n0 + nb * 8 + 2 * t + i % 2, kv_lo, kv_hi);
        const float prob = off ? 0.f : exp2f(s[nb][i] * qk_scale - lse2[r]);
        s[nb][i] = prob * (dp[nb][i] - dlt[r]);  // dS
      }
    }
    for (int kk = 0; kk < kNB / 2; ++kk) {  // dQ += dS K
      const uint32_t af[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      for (int cc = 0; cc < kDB / 2; ++cc) {
        uint32_t kf[4];
        ldmatrix_x4_trans(kf, b_cols<D>(tK, kk * 16, cc));
        mma_16816<T>(dq[2 * cc], af, kf[0], kf[1]);
        mma_16816<T>(dq[2 * cc + 1], af, kf[2], kf[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + r * 8;
    if (row >= p.q_len) continue;
    float* dst = p.dq + (bh * p.q_len + row) * D;
    for (int db = 0; db < kDB; ++db)
      *reinterpret_cast<float2*>(dst + db * 8 + 2 * t) = make_float2(dq[db][2 * r] * p.scale, dq[db][2 * r + 1] * p.scale);
  }
}

template <int D, typename T>
__global__ void __launch_bounds__(kBwdThreads) bwd_dkdv_kernel(const AttentionBwdParams p, const float* delta) {
  constexpr int kDkvBlockM = dkv_block_m<D>();
  constexpr int kKC = D / 16, kNB = kDkvBlockM / 8, kDB = D / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kDkvBlockN * D;
  T* sQ = sV + kDkvBlockN * D;       // 2 stages
  T* sdO = sQ + 2 * kDkvBlockM * D;  // 2 stages

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kDkvBlockN;
  const int64_t bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads, hk = h / (p.heads / p.kv_heads);
  int64_t kv_lo = 0, kv_hi = p.kv_len;
  if (p.kv_begin != nullptr) kv_lo = p.kv_begin[b], kv_hi = p.kv_end[b];
  const int64_t key0 = n0 + warp * 16 + g;  // this thread's first key
  float dk[kDB][4] = {}, dv[kDB][4] = {};

  if (n0 + kDkvBlockN > kv_lo && n0 < kv_hi) {  // else no query sees these keys: zeros
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
    const T* dout = static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1];
    const int k_rows = static_cast<int>(imin(kDkvBlockN, p.kv_len - n0));
    load_tile_async<D, kBwdThreads>(sK, static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + n0 * p.k_stride[2],
                                    p.k_stride[2], kDkvBlockN, k_rows);
    load_tile_async<D, kBwdThreads>(sV, static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + n0 * p.v_stride[2],
                                    p.v_stride[2], kDkvBlockN, k_rows);
    auto load_q = [&](int64_t m0, int stage) {
      const int rows = static_cast<int>(imin(kDkvBlockM, p.q_len - m0));
      load_tile_async<D, kBwdThreads>(sQ + stage * kDkvBlockM * D, q + m0 * p.q_stride[2], p.q_stride[2], kDkvBlockM, rows);
      load_tile_async<D, kBwdThreads>(sdO + stage * kDkvBlockM * D, dout + m0 * p.do_stride[2], p.do_stride[2], kDkvBlockM, rows);
    };
    const int64_t first = p.causal ? n0 / kDkvBlockM * kDkvBlockM : 0;  // queries before n0 see none
    if (first < p.q_len) load_q(first, 0);
    cp_async_commit();
    const float qk_scale = p.scale * 1.4426950408889634f;
    int stage = 0;
    for (int64_t m0 = first; m0 < p.q_len; m0 += kDkvBlockM, stage ^= 1) {
      if (m0 + kDkvBlockM < p.q_len) load_q(m0 + kDkvBlockM, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      const T* tQ = sQ + stage * kDkvBlockM * D;
      const T* tdO = sdO + stage * kDkvBlockM * D;
      float s[kNB][4] = {}, dp[kNB][4] = {};  // S^T and dP^T: this warp's 16 keys x 32 queries
      for (int kc = 0; kc < kKC; ++kc) {
        uint32_t kf[4], vf[4];
        ldmatrix_x4(kf, a_operand<D>(sK, warp * 16, kc));
        ldmatrix_x4(vf, a_operand<D>(sV, warp * 16, kc));
        for (int nb = 0; nb < kNB; nb += 2) {
          uint32_t qf[4], df[4];
          ldmatrix_x4(qf, b_rows<D>(tQ, nb * 8, kc));
          ldmatrix_x4(df, b_rows<D>(tdO, nb * 8, kc));
          mma_16816<T>(s[nb], kf, qf[0], qf[1]);  // S^T = K Q^T
          mma_16816<T>(s[nb + 1], kf, qf[2], qf[3]);
          mma_16816<T>(dp[nb], vf, df[0], df[1]);  // dP^T = V dO^T
          mma_16816<T>(dp[nb + 1], vf, df[2], df[3]);
        }
      }
      for (int nb = 0; nb < kNB; ++nb) {
        for (int i = 0; i < 4; ++i) {
          const int64_t query = m0 + nb * 8 + 2 * t + i % 2, key = key0 + (i / 2) * 8;
          float prob = 0.f, dlt = 0.f;
          if (!hidden(p, b, query, key, kv_lo, kv_hi)) {
            prob = exp2f(s[nb][i] * qk_scale - p.lse[bh * p.q_len + query] * 1.4426950408889634f);
            dlt = delta[bh * p.q_len + query];
          }
          s[nb][i] = prob;                    // P^T
          dp[nb][i] = prob * (dp[nb][i] - dlt);  // dS^T
        }
      }
      for (int kk = 0; kk < kNB / 2; ++kk) {  // dV += P^T dO, dK += dS^T Q
        const uint32_t pf[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
        const uint32_t sf[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]), pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                                pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
        for (int cc = 0; cc < kDB / 2; ++cc) {
          uint32_t df[4], qf[4];
          ldmatrix_x4_trans(df, b_cols<D>(tdO, kk * 16, cc));
          ldmatrix_x4_trans(qf, b_cols<D>(tQ, kk * 16, cc));
          mma_16816<T>(dv[2 * cc], pf, df[0], df[1]);
          mma_16816<T>(dv[2 * cc + 1], pf, df[2], df[3]);
          mma_16816<T>(dk[2 * cc], sf, qf[0], qf[1]);
          mma_16816<T>(dk[2 * cc + 1], sf, qf[2], qf[3]);
        }
      }
      __syncthreads();
    }
    cp_async_wait<0>();
  }
  for (int r = 0; r < 2; ++r) {
    const int64_t key = key0 + r * 8;
    if (key >= p.kv_len) continue;
    float* dk_row = p.dk + (bh * p.kv_len + key) * D;
    float* dv_row = p.dv + (bh * p.kv_len + key) * D;
    for (int db = 0; db < kDB; ++db) {
      *reinterpret_cast<float2*>(dk_row + db * 8 + 2 * t) = make_float2(dk[db][2 * r] * p.scale, dk[db][2 * r + 1] * p.scale);
      *reinterpret_cast<float2*>(dv_row + db * 8 + 2 * t) = make_float2(dv[db][2 * r], dv[db][2 * r + 1]);
    }
  }
}

template <int D, typename T>
void run_bwd(const AttentionBwdParams& p, float* delta, cudaStream_t stream) {
  const int64_t rows = p.batch * p.heads * p.q_len;
  bwd_delta_kernel<T><<<(rows + 255) / 256, 256, 0, stream>>>(p, delta);
  constexpr int dq_smem = (2 * kDqBlockM + 4 * kDqBlockN) * D * static_cast<int>(sizeof(T));
  cudaFuncSetAttribute(bwd_dq_kernel<D, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, dq_smem);
  bwd_dq_kernel<D, T><<<dim3((p.q_len + kDqBlockM - 1) / kDqBlockM, p.batch * p.heads), kBwdThreads, dq_smem, stream>>>(p, delta);
  constexpr int dkv_smem = (2 * kDkvBlockN + 4 * dkv_block_m<D>()) * D * static_cast<int>(sizeof(T));
  cudaFuncSetAttribute(bwd_dkdv_kernel<D, T>, cudaFuncAttributeMaxDynamicSharedMemorySize, dkv_smem);
  bwd_dkdv_kernel<D, T><<<dim3((p.kv_len + kDkvBlockN - 1) / kDkvBlockN, p.batch * p.heads), kBwdThreads, dkv_smem, stream>>>(p, delta);
}

}  // namespace fastattn::cuda
