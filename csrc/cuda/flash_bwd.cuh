// FlashAttention-2 backward on tensor cores (mma.sync m16n8k16, sm_80+), split as FA2 without
// atomics: deterministic. No torch headers.
//
// Probabilities are recomputed from the forward's lse. A preprocess writes, per query row, lse
// in log2 units and delta = rowsum(dO * O) - dlse into a workspace padded to 128 rows per
// (batch, head), so the kernels stage both with 16-byte copies and never test a row's end. Then
// two kernels, each with what its registers hold:
//   dQ:    a CTA per 128 queries sweeps the keys the forward visited in 32-key tiles (S and dP
//          again); at D 64 each of its 4 warps owns 32 queries (two MMA blocks sharing every K
//          and V fragment read), at D 128, where dQ takes twice the registers, each of 8 warps 16;
//   dK/dV: a CTA per 128 keys, 8 warps of 16, sweeps the query tiles that can see them (64
//          queries a step at D 64, 32 at D 128), Q, dO, lse and delta double-buffered with
//          cp.async. Two fp32 accumulators of 16 x D per warp are what the register file holds
//          beside the step's S and dP at D 128.
// Gradients come out in fp32, dK/dV per query head (the caller sums GQA groups), as
// AttentionBwdParams says.
#pragma once
#include "flash_fwd.cuh"

namespace fastattn::cuda {

constexpr int kWorkspaceRowPad = 128;  // workspace rows per (batch, head) are padded to a multiple of this

__host__ __device__ inline int64_t padded_rows(int64_t q_len) { return (q_len + kWorkspaceRowPad - 1) / kWorkspaceRowPad * kWorkspaceRowPad; }
// The workspace: (2, B * H, padded_rows(Nq)) floats, lse * log2 e (+inf for rows that see no key,
// 0 past Nq) then delta (0 past Nq).
inline int64_t bwd_workspace_floats(const AttentionParams& p) { return 2 * p.batch * p.heads * padded_rows(p.q_len); }

template <int D>
struct DqTile {
  static constexpr int kRowBlocks = D <= 64 ? 2 : 1, kWarps = D <= 64 ? 4 : 8, kThreads = 32 * kWarps;
  // kBlockN: what the registers hold at D 64, and at D 128 what keeps shared memory within the
  // 99 KiB sm_86/sm_89 grant a block (they run the sm_80 build)
  static constexpr int kBlockM = 16 * kRowBlocks * kWarps, kBlockN = 32;
  static constexpr int smem_bytes(int elem) { return (2 * kBlockM + 4 * kBlockN) * D * elem; }  // Q, dO, 2 x (K, V)
};

template <int D>
struct DkvTile {
  static constexpr int kRowBlocks = 1, kWarps = 8, kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kRowBlocks * kWarps, kBlockM = D <= 64 ? 64 : 32;  // keys per CTA, queries per step
  static constexpr int smem_bytes(int elem) {  // K, V, 2 x (Q, dO, lse, delta)
    return (2 * kBlockN + 4 * kBlockM) * D * elem + 4 * kBlockM * static_cast<int>(sizeof(float));
  }
};
static_assert(DkvTile<64>::kBlockN % DkvTile<64>::kBlockM == 0 && DkvTile<128>::kBlockN % DkvTile<128>::kBlockM == 0,
              "a causal sweep starts at the CTA's first key");

template <int D, typename T>
__global__ void __launch_bounds__(256) bwd_prep_kernel(const AttentionBwdParams p, float* ws) {
  constexpr int kLanes = D / 8, kRows = 256 / kLanes;  // kLanes lanes per row, 8 columns each
  const int64_t rows = padded_rows(p.q_len), total = p.batch * p.heads * rows;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / kLanes;  // over (b h, padded row)
  const int c = threadIdx.x % kLanes;
  const int64_t bh = r / rows, i = r % rows, b = bh / p.heads, h = bh % p.heads;
  const bool valid = r < total && i < p.q_len;
  float acc = 0.f;
  if (valid) {
    const uint4 o = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1] +
                                                    i * p.o_stride[2] + c * 8);
    const uint4 d = *reinterpret_cast<const uint4*>(static_cast<const T*>(p.dout) + b * p.do_stride[0] +
                                                    h * p.do_stride[1] + i * p.do_stride[2] + c * 8);
    const T* ot = reinterpret_cast<const T*>(&o);
    const T* dt = reinterpret_cast<const T*>(&d);
    #pragma unroll
    for (int j = 0; j < 8; ++j) acc += to_float(ot[j]) * to_float(dt[j]);
  }
  #pragma unroll
  for (int lanes = kLanes / 2; lanes > 0; lanes /= 2) acc += __shfl_xor_sync(0xffffffff, acc, lanes);
  if (c == 0 && r < total) {
    float lse2 = 0.f, delta = 0.f;
    if (valid) {
      const float lse = p.lse[bh * p.q_len + i];
      const bool seen = lse != -INFINITY;
      lse2 = seen ? lse * 1.4426950408889634f : INFINITY;  // exp2(s - inf) = 0: no weight
      delta = acc - (p.dlse != nullptr && seen ? p.dlse[bh * p.q_len + i] : 0.f);
    }
    ws[r] = lse2;
    ws[total + r] = delta;
  }
}

template <int D, typename T>
__global__ void __launch_bounds__(DqTile<D>::kThreads) bwd_dq_kernel(const AttentionBwdParams p, const float* ws) {
  using Tile = DqTile<D>;
  constexpr int kM = Tile::kBlockM, kN = Tile::kBlockN, kThreads = Tile::kThreads, kMB = Tile::kRowBlocks;
  constexpr int kKC = D / 16, kNB = kN / 8, kDB = D / 8;
  FASTATTN_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kM * D;
  T* sK = sdO + kM * D;  // stage s at sK + s * kN * D
  T* sV = sK + 2 * kN * D;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int m_tile = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // causal: longest rows first
  const int m0 = m_tile * kM;
  const int64_t b = blockIdx.y, h = blockIdx.z, bh = b * p.heads + h, hk = h / (p.heads / p.kv_heads);
  int kv_lo = 0, kv_hi = static_cast<int>(p.kv_len);
  if (p.kv_begin != nullptr) kv_lo = p.kv_begin[b], kv_hi = p.kv_end[b];
  const int end = p.causal ? min(kv_hi, m0 + kM) : kv_hi;
  const int first = kv_lo / kN * kN;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const int q_rows = static_cast<int>(imin(kM, p.q_len - m0));
  auto load_kv = [&](int n0, int stage) {
    const int rows = static_cast<int>(imin(kN, p.kv_len - n0));
    load_tile_async<D, kThreads, kN>(sK + stage * kN * D, k + n0 * p.k_stride[2], p.k_stride[2], rows);
    load_tile_async<D, kThreads, kN>(sV + stage * kN * D, v + n0 * p.v_stride[2], p.v_stride[2], rows);
  };
  load_tile_async<D, kThreads, kM>(sQ, q + m0 * p.q_stride[2], p.q_stride[2], q_rows);
  load_tile_async<D, kThreads, kM>(sdO, dout + m0 * p.do_stride[2], p.do_stride[2], q_rows);
  if (first < end) load_kv(first, 0);
  cp_async_commit();

  const int64_t rows = padded_rows(p.q_len);
  const float* lse2 = ws + bh * rows;
  const float* delta = ws + p.batch * p.heads * rows + bh * rows;
  const int warp_row = warp * 16 * kMB;
  const int row0 = warp_row + g;  // in the tile
  float l2[kMB][2], dl[kMB][2];
  #pragma unroll
  for (int mb = 0; mb < kMB; ++mb) {
    #pragma unroll
    for (int r = 0; r < 2; ++r) l2[mb][r] = lse2[m0 + row0 + 16 * mb + 8 * r], dl[mb][r] = delta[m0 + row0 + 16 * mb + 8 * r];
  }
  const float qk_scale = p.scale * 1.4426950408889634f;
  float dq[kMB][kDB][4] = {};
  int stage = 0;
  for (int n0 = first; n0 < end; n0 += kN, stage ^= 1) {
    if (n0 + kN < end) load_kv(n0 + kN, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* tK = sK + stage * kN * D;
    const T* tV = sV + stage * kN * D;
    float s[kMB][kNB][4] = {}, dp[kMB][kNB][4] = {};
    #pragma unroll
    for (int kc = 0; kc < kKC; ++kc) {
      uint32_t qf[kMB][4], df[kMB][4];
      #pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
        ldmatrix_x4(qf[mb], a_operand<D>(sQ, warp_row + 16 * mb, kc));
        ldmatrix_x4(df[mb], a_operand<D>(sdO, warp_row + 16 * mb, kc));
      }
      #pragma unroll
      for (int nb = 0; nb < kNB; nb += 2) {
        uint32_t kf[4], vf[4];
        ldmatrix_x4(kf, b_rows<D>(tK, nb * 8, kc));
        ldmatrix_x4(vf, b_rows<D>(tV, nb * 8, kc));
        #pragma unroll
        for (int mb = 0; mb < kMB; ++mb) {
          mma_16816<T>(s[mb][nb], qf[mb], kf[0], kf[1]);  // S = Q K^T
          mma_16816<T>(s[mb][nb + 1], qf[mb], kf[2], kf[3]);
          mma_16816<T>(dp[mb][nb], df[mb], vf[0], vf[1]);  // dP = dO V^T
          mma_16816<T>(dp[mb][nb + 1], df[mb], vf[2], vf[3]);
        }
      }
    }
    const TileMask mask(p, b, m0, kM, n0, kN, kv_lo, kv_hi);
    #pragma unroll
    for (int mb = 0; mb < kMB; ++mb) {
      #pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = i / 2;
          const bool off = mask.any && mask.hidden(row0 + 16 * mb + 8 * r, nb * 8 + 2 * t + i % 2);
          const float prob = exp2f(fmaf(s[mb][nb][i], qk_scale, -l2[mb][r]));
          // a select, not 0 times: s, dP, lse and delta of a hidden pair may be NaN
          s[mb][nb][i] = off ? 0.f : prob * (dp[mb][nb][i] - dl[mb][r]);  // dS
        }
      }
    }
    #pragma unroll
    for (int kk = 0; kk < kNB / 2; ++kk) {  // dQ += dS K (masked tiles: K's non-finite elements zeroed)
      uint32_t af[kMB][4];
      #pragma unroll
      for (int mb = 0; mb < kMB; ++mb) pack_a<T>(af[mb], s[mb][2 * kk], s[mb][2 * kk + 1]);
      #pragma unroll
      for (int cc = 0; cc < kDB / 2; ++cc) {
        uint32_t kf[4];
        ldmatrix_x4_trans(kf, b_cols<D>(tK, kk * 16, cc));
        if (mask.any) zero_nonfinite<T>(kf);
        #pragma unroll
        for (int mb = 0; mb < kMB; ++mb) {
          mma_16816<T>(dq[mb][2 * cc], af[mb], kf[0], kf[1]);
          mma_16816<T>(dq[mb][2 * cc + 1], af[mb], kf[2], kf[3]);
        }
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }
  cp_async_wait<0>();
  #pragma unroll
  for (int mb = 0; mb < kMB; ++mb) {
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = m0 + row0 + 16 * mb + 8 * r;
      if (row >= p.q_len) continue;
      float* dst = p.dq + (bh * p.q_len + row) * D;
      #pragma unroll
      for (int db = 0; db < kDB; ++db)
        *reinterpret_cast<float2*>(dst + db * 8 + 2 * t) = make_float2(dq[mb][db][2 * r] * p.scale, dq[mb][db][2 * r + 1] * p.scale);
    }
  }
}

template <int D, typename T>
__global__ void __launch_bounds__(DkvTile<D>::kThreads) bwd_dkdv_kernel(const AttentionBwdParams p, const float* ws) {
  using Tile = DkvTile<D>;
  constexpr int kM = Tile::kBlockM, kN = Tile::kBlockN, kThreads = Tile::kThreads, kKB = Tile::kRowBlocks;
  constexpr int kKC = D / 16, kNB = kM / 8, kDB = D / 8;
  FASTATTN_DYNAMIC_SMEM(smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kN * D;
  T* sQ = sV + kN * D;         // stage s at sQ + s * kM * D
  T* sdO = sQ + 2 * kM * D;    // likewise
  float* sL = reinterpret_cast<float*>(sdO + 2 * kM * D);  // lse2 of stage s at sL + s * kM
  float* sDl = sL + 2 * kM;                                 // delta, likewise

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int n0 = blockIdx.x * kN;
  const int64_t b = blockIdx.y, h = blockIdx.z, bh = b * p.heads + h, hk = h / (p.heads / p.kv_heads);
  int kv_lo = 0, kv_hi = static_cast<int>(p.kv_len);
  if (p.kv_begin != nullptr) kv_lo = p.kv_begin[b], kv_hi = p.kv_end[b];
  const int key0 = warp * 16 * kKB + g;  // this thread's first key in the tile; key block kb adds 16 kb
  float dk[kKB][kDB][4] = {}, dv[kKB][kDB][4] = {};

  if (n0 + kN > kv_lo && n0 < kv_hi) {  // else no query sees these keys: zeros
    const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
    const T* dout = static_cast<const T*>(p.dout) + b * p.do_stride[0] + h * p.do_stride[1];
    const int64_t rows = padded_rows(p.q_len);
    const float* lse2 = ws + bh * rows;
    const float* delta = ws + p.batch * p.heads * rows + bh * rows;
    const int k_rows = static_cast<int>(imin(kN, p.kv_len - n0));
    load_tile_async<D, kThreads, kN>(sK, static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1] + n0 * p.k_stride[2],
                                 p.k_stride[2], k_rows);
    load_tile_async<D, kThreads, kN>(sV, static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1] + n0 * p.v_stride[2],
                                 p.v_stride[2], k_rows);
    auto load_q = [&](int m0, int stage) {
      const int q_rows = static_cast<int>(imin(kM, p.q_len - m0));
      load_tile_async<D, kThreads, kM>(sQ + stage * kM * D, q + m0 * p.q_stride[2], p.q_stride[2], q_rows);
      load_tile_async<D, kThreads, kM>(sdO + stage * kM * D, dout + m0 * p.do_stride[2], p.do_stride[2], q_rows);
      load_floats_async<kThreads>(sL + stage * kM, lse2 + m0, kM);  // padded rows: always there
      load_floats_async<kThreads>(sDl + stage * kM, delta + m0, kM);
    };
    const int first = p.causal ? n0 : 0;  // queries before the first key see none of them
    if (first < p.q_len) load_q(first, 0);
    cp_async_commit();
    const float qk_scale = p.scale * 1.4426950408889634f;
    int stage = 0;
    for (int m0 = first; m0 < p.q_len; m0 += kM, stage ^= 1) {
      if (m0 + kM < p.q_len) load_q(m0 + kM, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      const T* tQ = sQ + stage * kM * D;
      const T* tdO = sdO + stage * kM * D;
      const float* tL = sL + stage * kM;
      const float* tDl = sDl + stage * kM;
      float s[kKB][kNB][4] = {}, dp[kKB][kNB][4] = {};  // S^T and dP^T: this warp's keys x kM queries
      #pragma unroll
      for (int kc = 0; kc < kKC; ++kc) {
        uint32_t kf[kKB][4], vf[kKB][4];
        #pragma unroll
        for (int kb = 0; kb < kKB; ++kb) {
          ldmatrix_x4(kf[kb], a_operand<D>(sK, warp * 16 * kKB + 16 * kb, kc));
          ldmatrix_x4(vf[kb], a_operand<D>(sV, warp * 16 * kKB + 16 * kb, kc));
        }
        #pragma unroll
        for (int nb = 0; nb < kNB; nb += 2) {
          uint32_t qf[4], df[4];
          ldmatrix_x4(qf, b_rows<D>(tQ, nb * 8, kc));
          ldmatrix_x4(df, b_rows<D>(tdO, nb * 8, kc));
          #pragma unroll
          for (int kb = 0; kb < kKB; ++kb) {
            mma_16816<T>(s[kb][nb], kf[kb], qf[0], qf[1]);  // S^T = K Q^T
            mma_16816<T>(s[kb][nb + 1], kf[kb], qf[2], qf[3]);
            mma_16816<T>(dp[kb][nb], vf[kb], df[0], df[1]);  // dP^T = V dO^T
            mma_16816<T>(dp[kb][nb + 1], vf[kb], df[2], df[3]);
          }
        }
      }
      const TileMask mask(p, b, m0, kM, n0, kN, kv_lo, kv_hi);
      #pragma unroll
      for (int kb = 0; kb < kKB; ++kb) {
        #pragma unroll
        for (int nb = 0; nb < kNB; ++nb) {
          #pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int ql = nb * 8 + 2 * t + i % 2;
            const bool off = mask.any && mask.hidden(ql, key0 + 16 * kb + (i / 2) * 8);
            const float prob = exp2f(fmaf(s[kb][nb][i], qk_scale, -tL[ql]));
            // Selects, not 0 times (issue 36's non-finite policy): s, dP, lse and delta of a
            // hidden pair may be NaN. A masked tile zeroes dO's non-finite elements for dV, so
            // there P^T is NaN where the row's delta is not finite (its dO, or O or dlse, holds a
            // non-finite element): a seen NaN in dO still reaches dV.
            s[kb][nb][i] = off ? 0.f : !mask.any || isfinite(tDl[ql]) ? prob : NAN;  // P^T
            dp[kb][nb][i] = off ? 0.f : prob * (dp[kb][nb][i] - tDl[ql]);          // dS^T
          }
        }
      }
      #pragma unroll
      for (int kk = 0; kk < kNB / 2; ++kk) {  // dV += P^T dO, dK += dS^T Q (masked tiles: dO, Q zeroed where non-finite)
        uint32_t pf[kKB][4], sf[kKB][4];
        #pragma unroll
        for (int kb = 0; kb < kKB; ++kb) {
          pack_a<T>(pf[kb], s[kb][2 * kk], s[kb][2 * kk + 1]);
          pack_a<T>(sf[kb], dp[kb][2 * kk], dp[kb][2 * kk + 1]);
        }
        #pragma unroll
        for (int cc = 0; cc < kDB / 2; ++cc) {
          uint32_t df[4], qf[4];
          ldmatrix_x4_trans(df, b_cols<D>(tdO, kk * 16, cc));
          ldmatrix_x4_trans(qf, b_cols<D>(tQ, kk * 16, cc));
          if (mask.any) zero_nonfinite<T>(df), zero_nonfinite<T>(qf);
          #pragma unroll
          for (int kb = 0; kb < kKB; ++kb) {
            mma_16816<T>(dv[kb][2 * cc], pf[kb], df[0], df[1]);
            mma_16816<T>(dv[kb][2 * cc + 1], pf[kb], df[2], df[3]);
            mma_16816<T>(dk[kb][2 * cc], sf[kb], qf[0], qf[1]);
            mma_16816<T>(dk[kb][2 * cc + 1], sf[kb], qf[2], qf[3]);
          }
        }
      }
      __syncthreads();  // the next iteration's prefetch overwrites this stage
    }
    cp_async_wait<0>();
  }
  #pragma unroll
  for (int kb = 0; kb < kKB; ++kb) {
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t key = n0 + key0 + 16 * kb + 8 * r;
      if (key >= p.kv_len) continue;
      float* dk_row = p.dk + (bh * p.kv_len + key) * D;
      float* dv_row = p.dv + (bh * p.kv_len + key) * D;
      #pragma unroll
      for (int db = 0; db < kDB; ++db) {
        *reinterpret_cast<float2*>(dk_row + db * 8 + 2 * t) =
            make_float2(dk[kb][db][2 * r] * p.scale, dk[kb][db][2 * r + 1] * p.scale);
        *reinterpret_cast<float2*>(dv_row + db * 8 + 2 * t) = make_float2(dv[kb][db][2 * r], dv[kb][db][2 * r + 1]);
      }
    }
  }
}

// The backward's launches (see forward_steps); `ws` holds bwd_workspace_floats(p) floats.
template <int D, typename T, typename Launch>
void backward_steps(const AttentionBwdParams& p, float* ws, const Launch& launch) {
  const int64_t rows = p.batch * p.heads * padded_rows(p.q_len);
  const unsigned batch = static_cast<unsigned>(p.batch), heads = static_cast<unsigned>(p.heads);
  constexpr int kPrepRows = 256 / (D / 8);
  launch(bwd_prep_kernel<D, T>, Grid{static_cast<unsigned>((rows + kPrepRows - 1) / kPrepRows)}, 256, 0, p, ws);
  using Dq = DqTile<D>;
  launch(bwd_dq_kernel<D, T>, Grid{static_cast<unsigned>((p.q_len + Dq::kBlockM - 1) / Dq::kBlockM), batch, heads}, Dq::kThreads,
         Dq::smem_bytes(sizeof(T)), p, static_cast<const float*>(ws));
  using Dkv = DkvTile<D>;
  launch(bwd_dkdv_kernel<D, T>, Grid{static_cast<unsigned>((p.kv_len + Dkv::kBlockN - 1) / Dkv::kBlockN), batch, heads}, Dkv::kThreads,
         Dkv::smem_bytes(sizeof(T)), p, static_cast<const float*>(ws));
}

}  // namespace fastattn::cuda
