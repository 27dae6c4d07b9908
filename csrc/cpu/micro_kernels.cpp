// Portable fp32 micro-kernels, compiled once per ISA with GCC/Clang target attributes.
// The loops are written so the compiler vectorizes them: fixed-size register blocks for the
// GEMM, and column-wise (query-wise) loops for the softmax, whose statistics are per column.
#include "micro_kernels.h"

#include <cmath>
#include <cstdlib>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#define FA_INLINE inline __attribute__((always_inline))

namespace fastattn::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kMaxCols = 256;  // widest score tile (query block) the softmax helpers take

// W fp32 lanes: GCC/Clang vector extensions, which become SSE/NEON, AVX2 or AVX-512 registers in
// the table whose target attribute allows them (the templates are inlined there).
template <int W>
struct Lanes {
  typedef float type __attribute__((vector_size(4 * W), aligned(4)));
};

template <typename V>
FA_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
FA_INLINE void store(float* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// *p in every lane. For 32- and 64-byte vectors one vbroadcastss from memory (a load-port uop,
// leaving the FMA ports free), written out: GCC 12 builds a 64-byte splat lane by lane (16 masked
// broadcasts) in the GEMM loop. Elsewhere *p - 0.f, which is exactly *p: only a broadcast is left.
template <typename V>
FA_INLINE V broadcast(const float* p) {
#if defined(__x86_64__)
  if constexpr (sizeof(V) > 16) {
    V v;
    asm("vbroadcastss %1, %0" : "=v"(v) : "m"(*p));
    return v;
  }
#endif
  return *p - V{};
}

// 2^x for x <= ~1, on a float or a vector of them: round to nearest, then 1 + f q(f) with a
// degree-4 q, a relative-error minimax fit of 2^f on [-0.5, 0.5] (error below 2e-7 in fp32),
// exact at 0 so that a lone key's weight is exactly 1; the exponent bits give 2^n. Exactly 0
// below -126 and at -inf. Branch-free, so that it vectorizes in every table.
template <typename T>
FA_INLINE T exp2_approx(T x) {
  using I = decltype(x < x);  // bool for a float, an int32 vector for a float vector
  const T low = T{} - 126.f;
  const T xc = x < low ? low : x;
  const T n = (xc + 12582912.f) - 12582912.f;  // 1.5 * 2^23: rounds to an integer
  const T f = xc - n;
  T p = f * 1.3272632189884172e-03f + 9.67150976317388e-03f;
  p = p * f + 5.550706532009351e-02f;
  p = p * f + 2.4022242154067291e-01f;
  p = p * f + 6.93146998248302e-01f;
  p = p * f + 1.0f;
  T two_n;
  if constexpr (std::is_same_v<T, float>) {
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    std::memcpy(&two_n, &bits, sizeof(two_n));
  } else {
    const I bits = (__builtin_convertvector(n, I) + 127) << 23;
    std::memcpy(&two_n, &bits, sizeof(two_n));
  }
  return x < low ? T{} : p * two_n;
}

// Column-wise steps of the softmax helpers: Step::at<T>(c, ...) on columns c .. c + lanes(T),
// T a vector of W floats, then of W/2, ... 4 floats for what is left (a decoding tile has only
// a few columns), then a float at a time.
template <int W, typename Step, typename... Args>
FA_INLINE void over_columns_from(int c, int cols, Args... args) {
  for (; c + W <= cols; c += W) Step::template at<typename Lanes<W>::type>(c, args...);
  if constexpr (W > 4) {
    over_columns_from<W / 2, Step>(c, cols, args...);
  } else {
    for (; c < cols; ++c) Step::template at<float>(c, args...);
  }
}

template <int W, typename Step, typename... Args>
FA_INLINE void over_columns(int cols, Args... args) {
  over_columns_from<W, Step>(0, cols, args...);
}

// One MR x NR register block of C, NR a multiple of W: MR x NR/W accumulator vectors stay in
// registers across the K loop; each k broadcasts MR values of A against NR/W vectors of B.
template <int W, int MR, int NR>
FA_INLINE void gemm_block(int K, const float* A, int64_t sam, int64_t sak, const float* B,
                          int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  using V = typename Lanes<W>::type;
  constexpr int NV = NR / W;
  V c[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? load<V>(C + r * ldc + v * W) : V{};
  for (int k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = load<V>(B + k * ldb + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V a = broadcast<V>(A + r * sam + k * sak);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * W, c[r][v]);
}

// A block of `rows` <= MR rows, with the row count fixed at compile time.
template <int W, int MR, int NR>
FA_INLINE void gemm_rows(int rows, int K, const float* A, int64_t sam, int64_t sak,
                         const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if constexpr (MR == 1) {
    gemm_block<W, 1, NR>(K, A, sam, sak, B, ldb, C, ldc, accumulate);
  } else if (rows == MR) {
    gemm_block<W, MR, NR>(K, A, sam, sak, B, ldb, C, ldc, accumulate);
  } else {
    gemm_rows<W, MR - 1, NR>(rows, K, A, sam, sak, B, ldb, C, ldc, accumulate);
  }
}

// Full NR-wide column panels, then narrower panels down to one vector, then scalar columns.
template <int W, int MR, int NR>
FA_INLINE void gemm_impl(int M, int N, int K, const float* A, int64_t sam, int64_t sak,
                         const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  int n0 = 0;
  for (; n0 + NR <= N; n0 += NR)
    for (int m0 = 0; m0 < M; m0 += MR)
      gemm_rows<W, MR, NR>(M - m0 < MR ? M - m0 : MR, K, A + m0 * sam, sam, sak, B + n0, ldb,
                           C + m0 * ldc + n0, ldc, accumulate);
  if (n0 == N) return;
  if constexpr (NR > W) {
    gemm_impl<W, MR, NR / 2>(M, N - n0, K, A, sam, sak, B + n0, ldb, C + n0, ldc, accumulate);
  } else {
    for (int m = 0; m < M; ++m)
      for (int n = n0; n < N; ++n) {
        float acc = accumulate ? C[m * ldc + n] : 0.f;
        for (int k = 0; k < K; ++k) acc += A[m * sam + k * sak] * B[k * ldb + n];
        C[m * ldc + n] = acc;
      }
  }
}

struct Fill {  // x[c] = value
  template <typename T>
  static FA_INLINE void at(int c, float* x, float value) { store(x + c, T{} + value); }
};
struct MaxInto {  // mx[c] = max(mx[c], row[c])
  template <typename T>
  static FA_INLINE void at(int c, const float* row, float* mx) {
    const T v = load<T>(row + c), m = load<T>(mx + c);
    store(mx + c, v > m ? v : m);
  }
};
struct NewMax {  // from the tile max (in alpha): the new running max, its safe shift, alpha
  template <typename T>
  static FA_INLINE void at(int c, float* m, float* alpha, float* m_safe, float* sum) {
    const T m_old = load<T>(m + c), tile = load<T>(alpha + c);
    const T m_new = tile > m_old ? tile : m_old;
    const T safe = m_new == T{} + kNegInf ? T{} : m_new;  // no key yet: keep exp2 finite
    store(m + c, m_new);
    store(m_safe + c, safe);
    store(alpha + c, exp2_approx(m_old - safe));
    store(sum + c, T{});
  }
};
struct ExpSum {  // row[c] = exp2(row[c] - shift[c]), summed into sum[c]
  template <typename T>
  static FA_INLINE void at(int c, float* row, const float* shift, float* sum) {
    const T p = exp2_approx(load<T>(row + c) - load<T>(shift + c));
    store(row + c, p);
    store(sum + c, load<T>(sum + c) + p);
  }
};
struct Rescale {  // l[c] = l[c] * alpha[c] + sum[c]
  template <typename T>
  static FA_INLINE void at(int c, float* l, const float* alpha, const float* sum) {
    store(l + c, load<T>(l + c) * load<T>(alpha + c) + load<T>(sum + c));
  }
};
struct ExpShifted {  // row[c] = exp2(row[c] - shift[c]), shift -inf giving 0
  template <typename T>
  static FA_INLINE void at(int c, float* row, const float* shift) {
    const T sh = load<T>(shift + c);
    store(row + c, exp2_approx(load<T>(row + c) - (sh == T{} + kNegInf ? T{} : sh)));
  }
};
struct Scale {  // row[c] *= f
  template <typename T>
  static FA_INLINE void at(int c, float* row, float f) { store(row + c, load<T>(row + c) * f); }
};
struct ScaleBy {  // row[c] *= f[c]
  template <typename T>
  static FA_INLINE void at(int c, float* row, const float* f) { store(row + c, load<T>(row + c) * load<T>(f + c)); }
};
struct SoftmaxGrad {  // p[c] *= dp[c] - delta[c]
  template <typename T>
  static FA_INLINE void at(int c, float* p, const float* dp, const float* delta) {
    store(p + c, load<T>(p + c) * (load<T>(dp + c) - load<T>(delta + c)));
  }
};

template <int W>
FA_INLINE void softmax_step_impl(float* s, int rows, int cols, int64_t ld, float* m, float* l,
                                 float* alpha) {
  float m_safe[kMaxCols], sum[kMaxCols];
  over_columns<W, Fill>(cols, alpha, kNegInf);
  for (int r = 0; r < rows; ++r) over_columns<W, MaxInto>(cols, static_cast<const float*>(s + r * ld), alpha);
  over_columns<W, NewMax>(cols, m, alpha, m_safe, sum);
  for (int r = 0; r < rows; ++r)
    over_columns<W, ExpSum>(cols, s + r * ld, static_cast<const float*>(m_safe), sum);
  over_columns<W, Rescale>(cols, l, static_cast<const float*>(alpha), static_cast<const float*>(sum));
}

template <int W>
FA_INLINE void exp2_shifted_impl(float* s, int rows, int cols, int64_t ld, const float* shift) {
  for (int r = 0; r < rows; ++r) over_columns<W, ExpShifted>(cols, s + r * ld, shift);
}

template <int W>
FA_INLINE void scale_rows_impl(float* x, int rows, int cols, int64_t ld, const float* f) {
  for (int r = 0; r < rows; ++r) over_columns<W, Scale>(cols, x + r * ld, f[r]);
}

template <int W>
FA_INLINE void scale_cols_impl(float* x, int rows, int cols, int64_t ld, const float* f) {
  for (int r = 0; r < rows; ++r) over_columns<W, ScaleBy>(cols, x + r * ld, f);
}

template <int W>
FA_INLINE void softmax_grad_impl(float* p, const float* dp, int rows, int cols, int64_t ld,
                                 const float* delta) {
  for (int r = 0; r < rows; ++r) over_columns<W, SoftmaxGrad>(cols, p + r * ld, dp + r * ld, delta);
}

// op over a vector's lanes, halving it: log2(W) steps. op takes floats and vectors alike.
template <int W, typename Op>
FA_INLINE float lane_reduce(typename Lanes<W>::type v, Op op) {
  if constexpr (W == 4) {
    return op(op(v[0], v[2]), op(v[1], v[3]));
  } else {
    typename Lanes<W / 2>::type lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return lane_reduce<W / 2>(op(lo, hi), op);
  }
}

constexpr auto kAdd = [](auto a, auto b) { return a + b; };
constexpr auto kMax = [](auto a, auto b) { return a > b ? a : b; };

template <int W>
FA_INLINE float lane_sum(typename Lanes<W>::type v) {
  return lane_reduce<W>(v, kAdd);
}

// The online-softmax step of softmax_step_impl for a tile laid out the other way round,
// s[query][key]: each query's statistics run along its own row, W keys a vector (decoding, where
// a tile has a few queries and many keys).
template <int W>
FA_INLINE void softmax_step_rows_impl(float* s, int rows, int cols, int64_t ld, float* m, float* l,
                                      float* alpha) {
  using V = typename Lanes<W>::type;
  for (int r = 0; r < rows; ++r) {
    float* row = s + r * ld;
    V vmax = V{} + kNegInf;
    int c = 0;
    for (; c + W <= cols; c += W) vmax = kMax(vmax, load<V>(row + c));
    float tile = lane_reduce<W>(vmax, kMax);
    for (; c < cols; ++c) tile = kMax(tile, row[c]);
    const float m_new = kMax(m[r], tile), safe = m_new == kNegInf ? 0.f : m_new;
    alpha[r] = exp2_approx(m[r] - safe);
    m[r] = m_new;
    V vsum{};
    for (c = 0; c + W <= cols; c += W) {
      const V p = exp2_approx(load<V>(row + c) - safe);
      store(row + c, p);
      vsum += p;
    }
    float sum = lane_sum<W>(vsum);
    for (; c < cols; ++c) sum += row[c] = exp2_approx(row[c] - safe);
    l[r] = l[r] * alpha[r] + sum;
  }
}

// C[m * ldc + n] = A row m . B row n over K (a multiple of W): four A rows at a time, each B row
// reused across them from registers.
template <int W>
FA_INLINE void row_dots_impl(int M, int N, int K, const float* A, int64_t lda, const float* B, int64_t ldb,
                             float* C, int64_t ldc) {
  using V = typename Lanes<W>::type;
  constexpr int kRows = 4;
  int m = 0;
  for (; m + kRows <= M; m += kRows)
    for (int n = 0; n < N; ++n) {
      V acc[kRows] = {};
      for (int k = 0; k < K; k += W) {
        const V b = load<V>(B + n * ldb + k);
#pragma GCC unroll 4
        for (int i = 0; i < kRows; ++i) acc[i] += load<V>(A + (m + i) * lda + k) * b;
      }
#pragma GCC unroll 4
      for (int i = 0; i < kRows; ++i) C[(m + i) * ldc + n] = lane_sum<W>(acc[i]);
    }
  for (; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      V acc{};
      for (int k = 0; k < K; k += W) acc += load<V>(A + m * lda + k) * load<V>(B + n * ldb + k);
      C[m * ldc + n] = lane_sum<W>(acc);
    }
}

// bf16 -> fp32: the 16 bits become the top half of an fp32 whose low half is zero.
template <int W>
struct Bits {  // W lanes of 16 and of 32 bits
  typedef uint16_t half __attribute__((vector_size(2 * W), aligned(2)));
  typedef uint32_t full __attribute__((vector_size(4 * W), aligned(4)));
};

template <int W>
FA_INLINE void widen_bf16_impl(const uint16_t* src, int64_t n, float* dst) {
  using H = typename Bits<W>::half;
  using U = typename Bits<W>::full;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    H h;
    std::memcpy(&h, src + i, sizeof(h));
    const U u = __builtin_convertvector(h, U) << 16;
    std::memcpy(dst + i, &u, sizeof(u));
  }
  for (; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &u, sizeof(u));
  }
}

// IEEE binary16 -> binary32, subnormals, infinities and NaN included.
FA_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (exp == 0) {  // zero or subnormal: man * 2^-24
    const float f = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -f : f;
  }
  const uint32_t bits = sign | (exp == 31 ? 0x7f800000u : (exp + 112) << 23) | man << 13;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// vcvtph2ps over the whole multiples of 8 or 16 values, each under the least target that has it
// (not always_inline: GCC would inline it into widen_f16_impl before that has a target). Returns
// how many it converted.
__attribute__((target("avx,f16c"))) int64_t widen_f16_x8(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  return i;
}
__attribute__((target("avx512f"))) int64_t widen_f16_x16(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  return i;
}
#endif

// fp16 -> fp32: vcvtph2ps where the table's ISA has it (F16C with AVX2, AVX-512), else bit by bit.
template <int W>
FA_INLINE void widen_f16_impl(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if constexpr (W == 16) i = widen_f16_x16(src, n, dst);
  if constexpr (W == 8) i = widen_f16_x8(src, n, dst);
#endif
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

template <int W>
FA_INLINE double fma_loop_impl(int64_t n) {
  using V = typename Lanes<W>::type;
  constexpr int kChains = 12;  // independent chains: more than FMA latency x FMA units
  V acc[kChains];
#pragma GCC unroll 12
  for (int i = 0; i < kChains; ++i) acc[i] = V{} + static_cast<float>(i);
  const V x = V{} + 0.999999f, y = V{} + 1e-6f;
  for (int64_t it = 0; it < n; ++it)
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = acc[i] * x + y;
  float sink = 0.f;
  for (int i = 0; i < kChains; ++i) sink += acc[i][0];
  asm volatile("" : : "g"(sink));  // the chains' results are used: nothing is optimised away
  return 2.0 * W * kChains * static_cast<double>(n);
}

// One table per ISA: the same templates, compiled under a target attribute, with register
// blocks sized to the register file (MR rows x NR floats).
#define FASTATTN_DEFINE_ISA(NAME, TARGET, W, MR, NR)                                           \
  TARGET void gemm_##NAME(int M, int N, int K, const float* A, int64_t sam, int64_t sak,       \
                          const float* B, int64_t ldb, float* C, int64_t ldc, bool acc) {      \
    gemm_impl<W, MR, NR>(M, N, K, A, sam, sak, B, ldb, C, ldc, acc);                           \
  }                                                                                            \
  TARGET void softmax_step_##NAME(float* s, int rows, int cols, int64_t ld, float* m,          \
                                  float* l, float* alpha) {                                    \
    softmax_step_impl<W>(s, rows, cols, ld, m, l, alpha);                                         \
  }                                                                                            \
  TARGET void exp2_shifted_##NAME(float* s, int rows, int cols, int64_t ld,                    \
                                  const float* shift) {                                        \
    exp2_shifted_impl<W>(s, rows, cols, ld, shift);                                               \
  }                                                                                            \
  TARGET void scale_rows_##NAME(float* x, int rows, int cols, int64_t ld, const float* f) {    \
    scale_rows_impl<W>(x, rows, cols, ld, f);                                                     \
  }                                                                                            \
  TARGET void scale_cols_##NAME(float* x, int rows, int cols, int64_t ld, const float* f) {    \
    scale_cols_impl<W>(x, rows, cols, ld, f);                                                  \
  }                                                                                            \
  TARGET void softmax_grad_##NAME(float* p, const float* dp, int rows, int cols, int64_t ld,   \
                                  const float* delta) {                                        \
    softmax_grad_impl<W>(p, dp, rows, cols, ld, delta);                                           \
  }                                                                                            \
  TARGET void softmax_step_rows_##NAME(float* s, int rows, int cols, int64_t ld, float* m,     \
                                       float* l, float* alpha) {                               \
    softmax_step_rows_impl<W>(s, rows, cols, ld, m, l, alpha);                                 \
  }                                                                                            \
  TARGET void widen_bf16_##NAME(const uint16_t* src, int64_t n, float* dst) {                  \
    widen_bf16_impl<W>(src, n, dst);                                                           \
  }                                                                                            \
  TARGET void widen_f16_##NAME(const uint16_t* src, int64_t n, float* dst) {                   \
    widen_f16_impl<W>(src, n, dst);                                                            \
  }                                                                                            \
  TARGET void row_dots_##NAME(int M, int N, int K, const float* A, int64_t lda, const float* B,  \
                              int64_t ldb, float* C, int64_t ldc) {                            \
    row_dots_impl<W>(M, N, K, A, lda, B, ldb, C, ldc);                                         \
  }                                                                                            \
  TARGET double fma_loop_##NAME(int64_t n) { return fma_loop_impl<W>(n); }                     \
  const MicroKernels kernels_##NAME = {#NAME, gemm_##NAME, softmax_step_##NAME,                \
                                       exp2_shifted_##NAME, scale_rows_##NAME,                 \
                                       scale_cols_##NAME, softmax_grad_##NAME,                 \
                                       softmax_step_rows_##NAME, row_dots_##NAME,              \
                                       widen_bf16_##NAME, widen_f16_##NAME,                    \
                                       nullptr, nullptr, nullptr, fma_loop_##NAME, nullptr};

FASTATTN_DEFINE_ISA(generic, , 4, 6, 8)  // 16-byte vectors: SSE2 on x86-64, NEON on aarch64
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTATTN_X86 1
// 16 ymm registers: 6 x 2 accumulators. 32 zmm registers: 8 x 2 accumulators. (Every AVX2 CPU
// has F16C.)
FASTATTN_DEFINE_ISA(avx2, __attribute__((target("avx2,fma,f16c"))), 8, 6, 16)
FASTATTN_DEFINE_ISA(avx512, __attribute__((target("avx512f,avx512vl,avx512dq,avx2,fma"))), 16, 8, 32)

// vdpbf16ps: 16 lanes, each a 2-term bf16 dot product into fp32.
#define FASTATTN_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))

template <int MR, int NV>  // MR rows x NV vectors of 16 columns
FA_INLINE FASTATTN_BF16 void bf16_block(int Kp, const uint32_t* A, int64_t lda, const uint32_t* B, int64_t ldb,
                                        float* C, int64_t ldc, bool accumulate) {
  __m512 c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int kp = 0; kp < Kp; ++kp) {
    __m512i b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(B + kp * ldb + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(A[r * lda + kp]));
      for (int v = 0; v < NV; ++v) c[r][v] = _mm512_dpbf16_ps(c[r][v], a, (__m512bh)b[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
}

FASTATTN_BF16 void gemm_bf16_avx512(int M, int N, int Kp, const uint32_t* A, int64_t lda, const uint32_t* B,
                                    int64_t ldb, float* C, int64_t ldc, bool acc) {
  constexpr int MR = 8;  // 8 x 2 accumulators, as the fp32 kernel; M is a multiple of 16
  for (int n0 = 0; n0 < N; n0 += 32)
    for (int m0 = 0; m0 < M; m0 += MR) {
      const uint32_t* a = A + m0 * lda;
      float* c = C + m0 * ldc + n0;
      if (N - n0 >= 32)
        bf16_block<MR, 2>(Kp, a, lda, B + n0, ldb, c, ldc, acc);
      else
        bf16_block<MR, 1>(Kp, a, lda, B + n0, ldb, c, ldc, acc);
    }
}

FASTATTN_BF16 void pack_pairs_bf16_avx512(const float* x, int rows, int cols, int64_t ld, uint32_t* out,
                                          int64_t ld_out) {
  for (int r = 0; 2 * r < rows; ++r) {
    const float* even = x + 2 * r * ld;
    const float* odd = 2 * r + 1 < rows ? even + ld : nullptr;
    for (int c = 0; c < cols; c += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(even + c)));
      const __m512i hi = odd ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(odd + c)))
                             : _mm512_setzero_si512();
      _mm512_storeu_si512(out + r * ld_out + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

FASTATTN_BF16 void narrow_bf16_avx512(const float* x, int rows, int cols, int64_t ld, int cols_out, uint16_t* out,
                                      int64_t ld_out) {
  for (int r = 0; r < rows; ++r) {
    const float* src = x + r * ld;
    uint16_t* dst = out + r * ld_out;
    for (int c = 0; c < cols; c += 16) {  // the tail under a mask: nothing read or written past cols
      const __mmask16 live = cols - c >= 16 ? 0xffff : static_cast<__mmask16>((1u << (cols - c)) - 1);
      _mm256_mask_storeu_epi16(dst + c, live, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(live, src + c)));
    }
    std::fill(dst + cols, dst + cols_out, uint16_t{0});
  }
}

// fma_loop for vdpbf16ps: 12 independent chains, 64 flops each (16 lanes x 2 pairs x 2).
FASTATTN_BF16 double bf16_dot_loop_avx512(int64_t n) {
  constexpr int kChains = 12;
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f));
  for (int64_t it = 0; it < n; ++it)
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], x, x);
  float sink = 0.f;
  for (int i = 0; i < kChains; ++i) sink += _mm512_cvtss_f32(acc[i]);
  asm volatile("" : : "g"(sink));
  return 64.0 * kChains * static_cast<double>(n);
}

// The avx512 table with bf16 dot products.
constexpr MicroKernels with_bf16_dots(const char* isa, decltype(MicroKernels::gemm_bf16) gemm_bf16,
                                      decltype(MicroKernels::bf16_dot_loop) bf16_dot_loop) {
  return {isa, gemm_avx512, softmax_step_avx512, exp2_shifted_avx512, scale_rows_avx512, scale_cols_avx512,
          softmax_grad_avx512, softmax_step_rows_avx512, row_dots_avx512, widen_bf16_avx512, widen_f16_avx512,
          gemm_bf16, pack_pairs_bf16_avx512, narrow_bf16_avx512, fma_loop_avx512, bf16_dot_loop};
}

const MicroKernels kernels_avx512_bf16 = with_bf16_dots("avx512_bf16", gemm_bf16_avx512, bf16_dot_loop_avx512);

// AMX (Sapphire Rapids on): tdpbf16ps multiplies a 16 x 32 bf16 tile by a 32 x 16 one into a
// 16 x 16 fp32 tile, 12-15x the fp32 FMA rate of a core (register-only loops on this Xeon: 2.2-2.9
// TFLOPS against 185-190 GFLOPS). On the attention tiles the GEMM is bound by storing C tiles (about
// 100 cycles each against ~15 for a tdpbf16ps), so it runs at 0.6-0.8 TFLOPS there. Every tile
// is configured 16 rows x 64 bytes; a 32 x 32 block of C holds tiles 0-3, its A rows tiles 4-5
// and its B columns tiles 6-7.
#define FASTATTN_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))

struct TileConfig {  // the ldtilecfg operand, palette 1
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) bytes_per_row[t] = 64, rows[t] = 16;
  }
};

// A 16 MT x 16 NT block of C over Kp pairs (tile numbers are immediates, hence the spelled-out cases).
template <int MT, int NT>
FA_INLINE FASTATTN_AMX void amx_block(int Kp, const uint32_t* A, int64_t lda, const uint32_t* B, int64_t ldb,
                                      float* C, int64_t ldc, bool accumulate) {
  const int64_t sa = lda * 4, sb = ldb * 4, sc = ldc * 4;
  float* c1 = C + 16 * ldc;
  if (accumulate) {
    _tile_loadd(0, C, sc);
    if constexpr (NT == 2) _tile_loadd(1, C + 16, sc);
    if constexpr (MT == 2) _tile_loadd(2, c1, sc);
    if constexpr (MT == 2 && NT == 2) _tile_loadd(3, c1 + 16, sc);
  } else {
    _tile_zero(0);
    if constexpr (NT == 2) _tile_zero(1);
    if constexpr (MT == 2) _tile_zero(2);
    if constexpr (MT == 2 && NT == 2) _tile_zero(3);
  }
  for (int kp = 0; kp < Kp; kp += 16) {
    _tile_loadd(4, A + kp, sa);
    if constexpr (MT == 2) _tile_loadd(5, A + 16 * lda + kp, sa);
    _tile_loadd(6, B + kp * ldb, sb);
    if constexpr (NT == 2) _tile_loadd(7, B + kp * ldb + 16, sb);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MT == 2 && NT == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, C, sc);
  if constexpr (NT == 2) _tile_stored(1, C + 16, sc);
  if constexpr (MT == 2) _tile_stored(2, c1, sc);
  if constexpr (MT == 2 && NT == 2) _tile_stored(3, c1 + 16, sc);
}

FASTATTN_AMX void gemm_bf16_amx(int M, int N, int Kp, const uint32_t* A, int64_t lda, const uint32_t* B,
                                int64_t ldb, float* C, int64_t ldc, bool acc) {
  static const TileConfig config;
  _tile_loadconfig(&config);
  for (int m0 = 0; m0 < M; m0 += 32)
    for (int n0 = 0; n0 < N; n0 += 32) {
      const uint32_t* a = A + m0 * lda;
      const uint32_t* b = B + n0;
      float* c = C + m0 * ldc + n0;
      const bool two_m = M - m0 >= 32, two_n = N - n0 >= 32;
      if (two_m && two_n) amx_block<2, 2>(Kp, a, lda, b, ldb, c, ldc, acc);
      else if (two_m) amx_block<2, 1>(Kp, a, lda, b, ldb, c, ldc, acc);
      else if (two_n) amx_block<1, 2>(Kp, a, lda, b, ldb, c, ldc, acc);
      else amx_block<1, 1>(Kp, a, lda, b, ldb, c, ldc, acc);
    }
  _tile_release();  // no tile state left for the OS to save on a context switch
}

// fma_loop for AMX: four independent tile products on tiles already loaded, 16384 flops each
// (16 x 16 x 32 x 2), nothing stored.
FASTATTN_AMX double bf16_dot_loop_amx(int64_t n) {
  static const TileConfig config;
  alignas(64) uint32_t operand[16 * 16];
  std::fill(operand, operand + 16 * 16, 0x3c003c00u);  // bf16 pairs of 1/128: real data, no overflow
  _tile_loadconfig(&config);
  _tile_zero(0);  // tile numbers are immediates
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, operand, 64);
  _tile_loadd(5, operand, 64);
  _tile_loadd(6, operand, 64);
  _tile_loadd(7, operand, 64);
  for (int64_t it = 0; it < n; ++it) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_release();
  return 4 * 16384.0 * static_cast<double>(n);
}

const MicroKernels kernels_amx_bf16 = with_bf16_dots("amx_bf16", gemm_bf16_amx, bf16_dot_loop_amx);

// Linux hands out AMX tile state only to a process that asks for it (arch_prctl, kernel 5.16+).
// Asked once, when the tables are first listed; a process granted it must give signal handlers
// alternate stacks big enough for the tile state (Linux refuses smaller sigaltstacks after),
// and if one already has a smaller one the request fails and amx_bf16 is not offered.
bool amx_permitted() {
#if defined(__linux__)
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}
#endif

bool cpu_has(const std::string& isa) {
#ifdef FASTATTN_X86
  if (isa == "amx_bf16")
    return cpu_has("avx512_bf16") && __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
           amx_permitted();
  if (isa == "avx512_bf16") return cpu_has("avx512") && __builtin_cpu_supports("avx512bf16");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq");
  if (isa == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return isa == "generic";
}

bool cpu_is_amd() {
#ifdef FASTATTN_X86
  return __builtin_cpu_is("amd");
#else
  return false;
#endif
}

const MicroKernels* table_for(const std::string& isa) {
#ifdef FASTATTN_X86
  if (isa == "amx_bf16") return &kernels_amx_bf16;
  if (isa == "avx512_bf16") return &kernels_avx512_bf16;
  if (isa == "avx512") return &kernels_avx512;
  if (isa == "avx2") return &kernels_avx2;
#endif
  if (isa == "generic") return &kernels_generic;
  return nullptr;
}

}  // namespace

const char* const* supported_isas() {
  static const char* const* list = [] {
    static const char* names[6] = {};
    int n = 0;
    for (const char* isa : {"amx_bf16", "avx512_bf16", "avx512", "avx2", "generic"})
      if (table_for(isa) != nullptr && cpu_has(isa)) names[n++] = isa;
    // vdpbf16ps doubles the fp32 FMA rate on AMD Zen 4, but on Intel cores it runs at half of it
    // (measured on a Sapphire Rapids-class Xeon: 92 against 180 GFLOPS per core), so there bf16
    // inputs go through AMX or the fp32 kernels unless the vdpbf16ps table is asked for.
    for (int i = 0; i + 1 < n && !cpu_is_amd(); ++i)
      if (std::string(names[i]) == "avx512_bf16") {
        std::swap(names[i], names[i + 1]);  // below avx512
        break;
      }
    return names;
  }();
  return list;
}

static const MicroKernels* active = nullptr;  // chosen on first use

const MicroKernels& micro_kernels() {
  if (active == nullptr) {
    const char* forced = std::getenv("FASTATTN_CPU_ISA");
    set_isa(forced != nullptr && *forced != '\0' ? forced : supported_isas()[0]);
  }
  return *active;
}

const MicroKernels& table(const std::string& isa) {
  if (table_for(isa) == nullptr || !cpu_has(isa)) {
    std::string have;
    for (const char* const* name = supported_isas(); *name != nullptr; ++name)
      have += std::string(have.empty() ? "" : ", ") + *name;
    throw std::invalid_argument("CPU ISA '" + isa + "' is not available on this CPU; available: " + have);
  }
  return *table_for(isa);
}

void set_isa(const std::string& isa) { active = &table(isa); }

}  // namespace fastattn::cpu
