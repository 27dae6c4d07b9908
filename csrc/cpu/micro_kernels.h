// fp32 micro-kernels behind the CPU flash-attention tile loop, one table per ISA.
// The tile loop (flash_cpu.cpp) only packs, masks and schedules; all heavy arithmetic goes
// through this table, so faster micro-kernels slot in without touching the algorithm.
#pragma once
#include <cstdint>
#include <string>

namespace fastattn::cpu {

struct MicroKernels {
  const char* isa;
  // C[M,N] (+)= A[M,K] @ B[K,N]. A is read element-wise at A[m*sam + k*sak] (any layout);
  // B and C are row-major with unit column stride.
  void (*gemm)(int M, int N, int K, const float* A, int64_t sam, int64_t sak,
               const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate);
  // One online-softmax step over a transposed score tile s[rows=keys][cols=queries] in log2
  // units: updates the running max m and sum l per query, replaces s with exp2(s - m_new),
  // and writes alpha = exp2(m_old - m_new), the factor that rescales the output accumulator.
  void (*softmax_step)(float* s, int rows, int cols, int64_t ld, float* m, float* l, float* alpha);
  // s[r][c] = exp2(s[r][c] - shift[c]); a shift of -inf (a row that saw no key) gives 0.
  void (*exp2_shifted)(float* s, int rows, int cols, int64_t ld, const float* shift);
  // x[r][c] *= f[r].
  void (*scale_rows)(float* x, int rows, int cols, int64_t ld, const float* f);
  // x[r][c] *= f[c].
  void (*scale_cols)(float* x, int rows, int cols, int64_t ld, const float* f);
  // p[r][c] = p[r][c] * (dp[r][c] - delta[c]): the softmax backward, in place.
  void (*softmax_grad)(float* p, const float* dp, int rows, int cols, int64_t ld, const float* delta);
  // softmax_step for a tile laid out s[rows=queries][cols=keys]: the statistics per row.
  void (*softmax_step_rows)(float* s, int rows, int cols, int64_t ld, float* m, float* l, float* alpha);
  // C[m * ldc + n] = dot(A row m, B row n) over K, a multiple of 16; rows of A and B contiguous:
  // scores of a few queries (decoding), which the GEMM would pad to a full vector of columns.
  void (*row_dots)(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                   int64_t ldc);

  // 16-bit floats (their bits) -> fp32: dst[i] = src[i] for i < n.
  void (*widen_bf16)(const uint16_t* src, int64_t n, float* dst);
  void (*widen_f16)(const uint16_t* src, int64_t n, float* dst);

  // bf16 dot products with fp32 accumulation (vdpbf16ps, or AMX tiles); nullptr on tables
  // without them. C[M,N] (+)= A[M,Kp] @ B[Kp,N], A and B in bf16 pairs along K (one uint32 each,
  // low half = even k), all three row-major with leading dims lda, ldb, ldc. M, N and Kp are
  // multiples of 16: callers pad with zeros.
  void (*gemm_bf16)(int M, int N, int Kp, const uint32_t* A, int64_t lda, const uint32_t* B, int64_t ldb,
                    float* C, int64_t ldc, bool accumulate);
  // out[r][c] = the bf16 pair (x[2r][c], x[2r+1][c]), rounded to nearest even, for 2r < rows;
  // row 2r+1 = 0 past rows; cols a multiple of 16.
  void (*pack_pairs_bf16)(const float* x, int rows, int cols, int64_t ld, uint32_t* out, int64_t ld_out);
  // out[r][c] = x[r][c] as bf16 bits, rounded to nearest even, for c < cols; 0 for cols <= c <
  // cols_out: rows of bf16 pairs along them.
  void (*narrow_bf16)(const float* x, int rows, int cols, int64_t ld, int cols_out, uint16_t* out, int64_t ld_out);

  // The FMA-peak micro-benchmark: n rounds of 12 independent vector multiply-adds; returns the
  // flops done (2 per lane each).
  double (*fma_loop)(int64_t n);
  // The same for gemm_bf16's instruction (vdpbf16ps chains, or AMX tile products on registers);
  // nullptr on tables without bf16 dot products.
  double (*bf16_dot_loop)(int64_t n);
};

// The active table: the best this CPU supports, unless FASTATTN_CPU_ISA=amx_bf16|avx512_bf16|avx512|avx2|generic
// or set_isa() chose another.
const MicroKernels& micro_kernels();
void set_isa(const std::string& isa);  // throws std::invalid_argument if this CPU lacks it
// Every table this CPU can run, best first, nullptr-terminated.
const char* const* supported_isas();
// The table of `isa`, which this CPU must run (else std::invalid_argument).
const MicroKernels& table(const std::string& isa);

}  // namespace fastattn::cpu
