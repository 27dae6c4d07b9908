// Tensor-core building blocks for sm_80+: cp.async, ldmatrix, mma.sync m16n8k16 (fp16/bf16 in,
// fp32 accumulate), and the swizzled shared-memory layout the tiles use. No torch headers.
//
// Fragment layouts (lane = threadIdx.x % 32, g = lane / 4, t = lane % 4), per PTX's mma.m16n8k16:
//   A 16x16 (row-major), 4 regs of 2 halves: a0 (row g, cols 2t..2t+1), a1 (row g+8, same cols),
//                                            a2 (row g, cols 8+2t..), a3 (row g+8, cols 8+2t..)
//   B 16x8  (k x n),     2 regs:             b0 (k 2t..2t+1, col n = g), b1 (k 8+2t.., col g)
//   C 16x8  fp32,        4 floats:           c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8, same)
// So the C fragments of two adjacent 8-column blocks are exactly an A fragment (after packing to
// 16 bits): the probabilities P feed P @ V straight from registers, as in FlashAttention-2.
//
// The primitives written in PTX (cp.async, ldmatrix, mma) have a CPU emulation for the tests
// (tests/cuda_emu/cuda_emu.h, built with FASTATTN_CUDA_EMU): the kernels run there unchanged.
#pragma once
#include <cstdint>

#ifdef FASTATTN_CUDA_EMU
#include "cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The kernels' dynamic shared memory.
#define FASTATTN_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]

namespace fastattn::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-fills when !valid (nothing is read).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Four 8x8 16-bit matrices; lane i gives the address of row i % 8 of matrix i / 8, and
// register j receives matrix j in the fragment layout (row g, cols 2t, 2t+1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
// The same, each matrix transposed: register j holds (rows 2t, 2t+1; col g) of matrix j.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace fastattn::cuda
#endif  // FASTATTN_CUDA_EMU

namespace fastattn::cuda {

// Explicit conversions: torch builds define __CUDA_NO_HALF_CONVERSIONS__ and friends.
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// A [rows x D] tile of 16-bit elements in shared memory, in 16-byte chunks, chunk c of row r
// stored at position c ^ (r % 8) of its row: the 8 rows one ldmatrix reads hit 8 different
// bank groups (D >= 64, so a row holds at least 8 chunks).
template <int D>
struct Swizzled {
  static constexpr int kChunks = D / 8;
  static_assert(kChunks >= 8, "the swizzle needs rows of at least 8 chunks");
  __device__ __forceinline__ static int offset(int row, int chunk) {  // in elements
    return (row * kChunks + (chunk ^ (row & 7))) * 8;
  }
};

// Copies rows [0, kRows) x D of a global tile (row stride `row_stride`, unit column stride) into
// a swizzled shared tile with all kThreads threads; rows at or past `valid_rows` become zeros.
// Each thread keeps one 16-byte column chunk and steps down the rows with one pointer.
template <int D, int kThreads, int kRows, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t row_stride, int valid_rows) {
  constexpr int kChunks = D / 8, kRowStep = kThreads / kChunks;
  static_assert(kThreads % kChunks == 0 && kRows % kRowStep == 0 && kRowStep % 8 == 0, "whole rows per step");
  const int c = threadIdx.x % kChunks, r0 = threadIdx.x / kChunks;
  T* dst = smem + Swizzled<D>::offset(r0, c);  // rows r0 + kRowStep i (kRowStep % 8 == 0) keep r0's swizzle
  const T* src = gmem + r0 * row_stride + c * 8;
#pragma unroll
  for (int i = 0; i < kRows / kRowStep; ++i, src += kRowStep * row_stride) {
    const bool valid = r0 + i * kRowStep < valid_rows;
    cp_async_16(dst + i * kRowStep * D, valid ? src : gmem, valid);
  }
}

// Copies n floats (n a multiple of 4, both addresses 16-byte aligned) global -> shared with all
// threads.
template <int kThreads>
__device__ __forceinline__ void load_floats_async(float* smem, const float* gmem, int n) {
  for (int i = threadIdx.x; i < n / 4; i += kThreads) cp_async_16(smem + 4 * i, gmem + 4 * i, true);
}

// Writes rows [row0, row0 + rows) of a Swizzled<D> shared tile to global memory (row stride
// `row_stride`, unit column stride) with one warp, 16 bytes a store; rows at or past
// `valid_rows` are left alone.
template <int D, typename T>
__device__ __forceinline__ void store_tile(T* gmem, int64_t row_stride, const T* smem, int row0, int rows, int valid_rows) {
  constexpr int kChunks = D / 8;
  for (int i = threadIdx.x % 32; i < rows * kChunks; i += 32) {
    const int r = row0 + i / kChunks, c = i % kChunks;
    if (r < valid_rows)
      *reinterpret_cast<uint4*>(gmem + r * row_stride + c * 8) = *reinterpret_cast<const uint4*>(smem + Swizzled<D>::offset(r, c));
  }
}

// ldmatrix addresses for the three operand shapes, all on Swizzled<D> tiles:
//   A operand, rows r0..r0+15 x k-chunk kc (16 columns):            a_operand(tile, r0, kc)
//   B operand from rows (n = row, k = column), rows n0..n0+15 and
//     k-chunk kc: regs {0,1} = (b0,b1) of block n0, {2,3} of n0+8:  b_rows(tile, n0, kc)
//   B operand from rows (k = row, n = column), rows k0..k0+15 and
//     column chunks 2cc, 2cc+1: regs {0,1} of block 2cc, {2,3} of 2cc+1 (.trans): b_cols(tile, k0, cc)
// The first row is a multiple of 8, so the swizzle's row % 8 is the lane's own, and a 16-column
// step only flips chunk bits: each offset is a per-lane constant XOR a compile-time one, plus the
// first row's, which keeps the addresses of an unrolled loop from each taking a register.
template <int D>
__device__ __forceinline__ int lane_offset(int row, int chunk_bit) {  // row < 16, chunk 0 or 1
  return row * D + ((chunk_bit ^ (row & 7)) << 3);
}
template <int D, typename T>
__device__ __forceinline__ const T* a_operand(const T* tile, int r0, int kc) {
  const int lane = threadIdx.x % 32;
  return tile + r0 * D + (lane_offset<D>(lane % 8 + (lane / 8 % 2) * 8, lane / 16) ^ (kc << 4));
}
template <int D, typename T>
__device__ __forceinline__ const T* b_rows(const T* tile, int n0, int kc) {
  const int lane = threadIdx.x % 32;
  return tile + n0 * D + (lane_offset<D>(lane % 8 + (lane / 16) * 8, lane / 8 % 2) ^ (kc << 4));
}
template <int D, typename T>
__device__ __forceinline__ const T* b_cols(const T* tile, int k0, int cc) {
  return a_operand<D>(tile, k0, cc);  // the same rows and chunks as an A operand's
}

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Non-finite 16-bit floats (all exponent bits set: inf or NaN) in a packed pair: bit 0 the low
// one, bit 1 the high one. Masked tiles zero them in the operands of the products whose hidden
// pairs would otherwise meet them as 0 * NaN (issue 36's non-finite policy).
template <typename T>
struct ExponentBits { static constexpr uint32_t value = 0x7F80u; };  // bf16
template <>
struct ExponentBits<__half> { static constexpr uint32_t value = 0x7C00u; };
template <typename T>
__device__ __forceinline__ uint32_t nonfinite2(uint32_t x) {
  constexpr uint32_t e = ExponentBits<T>::value;
  return ((x & e) == e ? 1u : 0u) | ((x & (e << 16)) == (e << 16) ? 2u : 0u);
}
template <typename T>
__device__ __forceinline__ void zero_nonfinite(uint32_t (&r)[4]) {
  #pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t bad = nonfinite2<T>(r[i]);
    r[i] &= (bad & 1u ? 0xFFFF0000u : ~0u) & (bad & 2u ? 0x0000FFFFu : ~0u);
  }
}

// Reductions over the 4 lanes (t = 0..3) that share a fragment row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

}  // namespace fastattn::cuda
