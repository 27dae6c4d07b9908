// FlashAttention-2 forward on tensor cores (mma.sync m16n8k16, sm_80+). No torch headers.
//
// A CTA owns kBlockM = 128 queries of one (batch, head); each of its 4 warps owns 32 of them as
// two 16-row MMA blocks, so every K and V fragment a warp reads from shared memory feeds two
// MMAs. Key tiles of kBlockN keys (64 at D 64, 32 at D 128: what 255 registers hold beside the
// output) stream through a three-stage cp.async ring, the next tile loading while this one is
// computed; with three stages the buffer being filled was last read two tiles ago, so one
// barrier per tile suffices. Scores stay in registers in log2 units (log2 e folded into the
// scale, applied in the exponent's FMA); the probabilities feed P V straight from registers.
// Key tiles outside the batch row's valid range are never loaded; causal tiles above the
// diagonal are skipped, and causal CTAs start with the longest rows; only tiles crossing a range
// end, the diagonal or a scattered padding mask pay for masking. Rows that see no key give zeros
// and lse = -inf. O leaves through shared memory in 16-byte stores.
#pragma once
#include <cmath>

#include "../attention_params.h"
#include "mma_utils.cuh"

namespace fastattn::cuda {

template <int D>
struct FwdTile {
  static constexpr int kBlockM = 128, kBlockN = D <= 64 ? 64 : 32, kWarps = 4, kThreads = 32 * kWarps, kStages = 3;
  static constexpr int kRowBlocks = kBlockM / (16 * kWarps);  // 16-row MMA blocks per warp
  static constexpr int smem_bytes(int elem) { return (kBlockM + 2 * kStages * kBlockN) * D * elem; }  // Q, stages x (K, V)
};

// Which elements of a tile of queries m0 + r x keys n0 + c are hidden, in the tile's own (32-bit)
// coordinates: keys outside the batch row's range [kv_lo, kv_hi), rows past the last query
// (which the backward must not count), causality, scattered padding. `any` is false for a tile
// wholly inside all of them, which then skips the test.
struct TileMask {
  int lo, hi, rows, diag;  // valid keys [lo, hi), valid rows [0, rows), causal: c <= r + diag
  bool causal, any;
  const bool* padding;  // this tile's first key's flag, or nullptr: no scattered padding
  int64_t pad_stride;

  __device__ __forceinline__ TileMask(const AttentionParams& p, int64_t b, int m0, int tile_rows, int n0, int tile_cols,
                                      int kv_lo, int kv_hi)
      : lo(kv_lo - n0), hi(kv_hi - n0), rows(static_cast<int>(p.q_len) - m0), diag(m0 - n0), causal(p.causal),
        padding(p.key_padding != nullptr && p.kv_holes[b] ? p.key_padding + b * p.kpm_stride[0] + n0 * p.kpm_stride[1]
                                                          : nullptr),
        pad_stride(p.kpm_stride[1]) {
    any = lo > 0 || hi < tile_cols || rows < tile_rows || (causal && tile_cols - 1 > diag) || padding != nullptr;
  }
  __device__ __forceinline__ bool hidden(int r, int c) const {
    return c < lo || c >= hi || r >= rows || (causal && c > r + diag) || (padding != nullptr && padding[c * pad_stride]);
  }
};

// The operand pair of two 8-column blocks of fp32 C fragments, packed to 16 bits: an A fragment.
template <typename T>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]), a[1] = pack2<T>(lo[2], lo[3]), a[2] = pack2<T>(hi[0], hi[1]), a[3] = pack2<T>(hi[2], hi[3]);
}

// The keys of this thread's score columns nb * 8 + 2t + j (bit 2 nb + j) whose row of the value
// tile holds a non-finite element, read with P V's own ldmatrix: lane (g, t) holds columns
// g and 8 + g of each 16-column chunk of keys 2t, 2t + 1, 8 + 2t, 9 + 2t, so OR-ing over g covers D.
template <int D, int kN, typename T>
__device__ __forceinline__ uint32_t nonfinite_value_keys(const T* tV) {
  uint32_t bits = 0;
  #pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {
    #pragma unroll
    for (int cc = 0; cc < D / 16; ++cc) {
      uint32_t vf[4];
      ldmatrix_x4_trans(vf, b_cols<D>(tV, kk * 16, cc));
      bits |= (nonfinite2<T>(vf[0]) | nonfinite2<T>(vf[2])) << (4 * kk);       // score block nb = 2 kk
      bits |= (nonfinite2<T>(vf[1]) | nonfinite2<T>(vf[3])) << (4 * kk + 2);   // nb = 2 kk + 1
    }
  }
  #pragma unroll
  for (int lanes = 4; lanes < 32; lanes *= 2) bits |= __shfl_xor_sync(0xffffffff, bits, lanes);
  return bits;
}

template <int D, typename T>
__global__ void __launch_bounds__(FwdTile<D>::kThreads) flash_fwd_kernel(const AttentionParams p) {
  using Tile = FwdTile<D>;
  constexpr int kM = Tile::kBlockM, kN = Tile::kBlockN, kThreads = Tile::kThreads, kMB = Tile::kRowBlocks;
  constexpr int kKC = D / 16;  // 16-wide k-chunks of the head dim
  constexpr int kNB = kN / 8;  // 8-key column blocks of a score tile
  constexpr int kDB = D / 8;   // 8-wide column blocks of the output
  FASTATTN_DYNAMIC_SMEM(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kM * D;                 // stage s at sK + s * kN * D
  T* sV = sK + Tile::kStages * kN * D;  // likewise

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int m_tile = p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // causal: longest rows first
  const int m0 = m_tile * kM;
  const int64_t b = blockIdx.y, h = blockIdx.z, bh = b * p.heads + h, hk = h / (p.heads / p.kv_heads);
  int kv_lo = 0, kv_hi = static_cast<int>(p.kv_len);
  if (p.kv_begin != nullptr) kv_lo = p.kv_begin[b], kv_hi = p.kv_end[b];
  const int end = p.causal ? min(kv_hi, m0 + kM) : kv_hi;  // causal: no key past the tile's last query
  const int first = kv_lo / kN * kN;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  auto load_kv = [&](int n0, int stage) {
    const int rows = static_cast<int>(imin(kN, p.kv_len - n0));
    load_tile_async<D, kThreads, kN>(sK + stage * kN * D, k + n0 * p.k_stride[2], p.k_stride[2], rows);
    load_tile_async<D, kThreads, kN>(sV + stage * kN * D, v + n0 * p.v_stride[2], p.v_stride[2], rows);
  };
  load_tile_async<D, kThreads, kM>(sQ, q + m0 * p.q_stride[2], p.q_stride[2], static_cast<int>(imin(kM, p.q_len - m0)));
  if (first < end) load_kv(first, 0);
  cp_async_commit();

  float o[kMB][kDB][4] = {};
  float m_i[kMB][2], l_i[kMB][2];  // rows g and g + 8 of each row block: running max (raw), sum
  #pragma unroll
  for (int mb = 0; mb < kMB; ++mb) m_i[mb][0] = m_i[mb][1] = -INFINITY, l_i[mb][0] = l_i[mb][1] = 0.f;
  const int warp_row = warp * 16 * kMB;   // this warp's first row in the tile
  const int row0 = warp_row + g;  // this thread's first row in the tile; row block mb adds 16 mb
  // exp2(s * scale - max * scale) as one FMA needs scale > 0; otherwise the scale is applied to
  // the scores first, and the exponent's scale is 1.
  const float qk_scale = p.scale * 1.4426950408889634f;
  const bool fold = !(qk_scale > 0.f);
  const float exp_scale = fold ? 1.f : qk_scale;

  for (int n0 = first, stage = 0; n0 < end; n0 += kN) {
    const int next = stage + 1 == Tile::kStages ? 0 : stage + 1;
    if (n0 + kN < end) load_kv(n0 + kN, next);  // into the stage read two tiles ago
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();  // tile n0 (and Q) has landed; every thread is past the tile before last
    const T* tK = sK + stage * kN * D;
    const T* tV = sV + stage * kN * D;
    stage = next;

    float s[kMB][kNB][4] = {};  // S = Q K^T: this warp's 16 kMB rows x kN keys
    #pragma unroll
    for (int kc = 0; kc < kKC; ++kc) {
      uint32_t qf[kMB][4];
      #pragma unroll
      for (int mb = 0; mb < kMB; ++mb) ldmatrix_x4(qf[mb], a_operand<D>(sQ, warp_row + 16 * mb, kc));
      #pragma unroll
      for (int nb = 0; nb < kNB; nb += 2) {
        uint32_t kf[4];
        ldmatrix_x4(kf, b_rows<D>(tK, nb * 8, kc));
        #pragma unroll
        for (int mb = 0; mb < kMB; ++mb) {
          mma_16816<T>(s[mb][nb], qf[mb], kf[0], kf[1]);
          mma_16816<T>(s[mb][nb + 1], qf[mb], kf[2], kf[3]);
        }
      }
    }
    const TileMask mask(p, b, m0, kM, n0, kN, kv_lo, kv_hi);
    // Non-finite policy, on masked tiles only (elsewhere every pair is seen and 0 * NaN cannot
    // hide): a hidden score becomes -inf by a select (a hidden NaN k stays out), P V reads the
    // values with their non-finite elements zeroed (a hidden NaN v stays out of rows with p = 0),
    // and a key whose value row held one makes the scores of the rows that see it NaN instead.
    const uint32_t bad_keys = mask.any ? nonfinite_value_keys<D, kN>(tV) : 0u;
    float tile_max[kMB][2];
    #pragma unroll
    for (int mb = 0; mb < kMB; ++mb) {
      tile_max[mb][0] = tile_max[mb][1] = -INFINITY;
      #pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (fold) s[mb][nb][i] *= qk_scale;
          if (mask.any && mask.hidden(row0 + 16 * mb + (i / 2) * 8, nb * 8 + 2 * t + i % 2))
            s[mb][nb][i] = -INFINITY;
          else if (bad_keys >> (2 * nb + i % 2) & 1u)
            s[mb][nb][i] = NAN;
          tile_max[mb][i / 2] = fmaxf(tile_max[mb][i / 2], s[mb][nb][i]);
        }
      }
    }

    #pragma unroll
    for (int mb = 0; mb < kMB; ++mb) {
      float m_use[2], alpha[2];
      #pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float m_new = fmaxf(m_i[mb][r], quad_max(tile_max[mb][r]));
        m_use[r] = m_new == -INFINITY ? 0.f : m_new * exp_scale;  // a row with no key yet: exp2(-inf) = 0
        alpha[r] = exp2f(m_i[mb][r] * exp_scale - m_use[r]);
        m_i[mb][r] = m_new;
        l_i[mb][r] *= alpha[r];
      }
      #pragma unroll
      for (int nb = 0; nb < kNB; ++nb) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
          s[mb][nb][i] = exp2f(fmaf(s[mb][nb][i], exp_scale, -m_use[i / 2]));
          l_i[mb][i / 2] += s[mb][nb][i];  // this lane's share; the quad sums at the end
        }
      }
      #pragma unroll
      for (int db = 0; db < kDB; ++db) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) o[mb][db][i] *= alpha[i / 2];
      }
    }
    #pragma unroll
    for (int kk = 0; kk < kNB / 2; ++kk) {  // O += P V, 16 keys at a time
      uint32_t pf[kMB][4];
      #pragma unroll
      for (int mb = 0; mb < kMB; ++mb) pack_a<T>(pf[mb], s[mb][2 * kk], s[mb][2 * kk + 1]);
      #pragma unroll
      for (int cc = 0; cc < kDB / 2; ++cc) {
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, b_cols<D>(tV, kk * 16, cc));
        if (mask.any) zero_nonfinite<T>(vf);
        #pragma unroll
        for (int mb = 0; mb < kMB; ++mb) {
          mma_16816<T>(o[mb][2 * cc], pf[mb], vf[0], vf[1]);
          mma_16816<T>(o[mb][2 * cc + 1], pf[mb], vf[2], vf[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // with no key tile at all, Q's copies may still be landing

  // This warp's rows of O go to its own rows of sQ (no other warp reads them), then out in
  // 16-byte chunks; lse from the quad's lane 0.
  T* out = static_cast<T*>(p.out) + b * p.o_stride[0] + h * p.o_stride[1];
  #pragma unroll
  for (int mb = 0; mb < kMB; ++mb) {
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row + 16 * mb + 8 * r + g;
      const float l = quad_sum(l_i[mb][r]);
      const bool seen = l != 0.f;  // NaN: a tainted row, whose lse is NaN too (not -inf: the backward sees it)
      const float inv = seen ? 1.f / l : 0.f;
      #pragma unroll
      for (int db = 0; db < kDB; ++db) {
        *reinterpret_cast<uint32_t*>(sQ + Swizzled<D>::offset(row, db) + 2 * t) =
            pack2<T>(o[mb][db][2 * r] * inv, o[mb][db][2 * r + 1] * inv);
      }
      if (t == 0 && m0 + row < p.q_len)
        p.lse[bh * p.q_len + m0 + row] = seen ? (m_i[mb][r] * exp_scale + log2f(l)) * 0.6931471805599453f : -INFINITY;
    }
  }
  __syncwarp();
  store_tile<D>(out + m0 * p.o_stride[2], p.o_stride[2], sQ, warp_row, 16 * kMB, static_cast<int>(imin(kM, p.q_len - m0)));
}

// x: tiles; y, z: batch and head (each may reach 65535; one b * h dimension could overflow y).
struct Grid { unsigned x, y = 1, z = 1; };

// The forward's launches, through `launch(kernel, grid, threads, smem bytes, args...)`: a CUDA
// stream's (launch.cuh) or the CPU emulation's.
template <int D, typename T, typename Launch>
void forward_steps(const AttentionParams& p, const Launch& launch) {
  using Tile = FwdTile<D>;
  const Grid grid{static_cast<unsigned>((p.q_len + Tile::kBlockM - 1) / Tile::kBlockM), static_cast<unsigned>(p.batch),
                  static_cast<unsigned>(p.heads)};
  launch(flash_fwd_kernel<D, T>, grid, Tile::kThreads, Tile::smem_bytes(sizeof(T)), p);
}

}  // namespace fastattn::cuda
