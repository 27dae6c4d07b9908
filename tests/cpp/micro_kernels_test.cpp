// The micro-kernels' own test, with no torch: every table this CPU runs against plain loops.
// `make aarch64-check` cross-compiles it and runs it under qemu (the generic table as NEON).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../../csrc/cpu/micro_kernels.h"

namespace {

using fastattn::cpu::MicroKernels;

std::mt19937 rng(0);
std::vector<float> random_vector(size_t n, float lo = -2.f, float hi = 2.f) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

int checks = 0, failures = 0;
void expect_close(const char* what, const char* isa, float got, double want, double tol) {
  ++checks;
  if (!(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)))) {
    if (++failures <= 10) std::printf("FAIL %s [%s]: got %g, want %g\n", what, isa, got, want);
  }
}

void check_gemm(const MicroKernels& mk) {
  for (int M : {1, 5, 8, 13, 64}) {
    for (int N : {1, 7, 16, 33, 128}) {
      for (int K : {1, 16, 64}) {
        for (bool transposed : {false, true}) {
          const int64_t sam = transposed ? 1 : K, sak = transposed ? M : 1;
          auto A = random_vector(M * K), B = random_vector(K * N), C = random_vector(M * N);
          const auto C0 = C;
          mk.gemm(M, N, K, A.data(), sam, sak, B.data(), N, C.data(), N, true);
          for (int m = 0; m < M; ++m)
            for (int n = 0; n < N; ++n) {
              double want = C0[m * N + n];
              for (int k = 0; k < K; ++k) want += double(A[m * sam + k * sak]) * B[k * N + n];
              expect_close("gemm", mk.isa, C[m * N + n], want, 1e-5);
            }
        }
      }
    }
  }
}

// bf16 bits, rounded to nearest even (finite inputs), and back.
uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
float from_bf16(uint32_t bits) {
  const uint32_t u = bits << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// The bf16 dot products (tables that have them): exact products of bf16 inputs, fp32 sums.
void check_gemm_bf16(const MicroKernels& mk) {
  if (mk.gemm_bf16 == nullptr) return;
  for (int M : {16, 48, 64}) {
    for (int N : {16, 48, 128}) {
      for (int Kp : {16, 48}) {
        for (bool accumulate : {false, true}) {
          const int64_t lda = Kp + 16, ldb = N + 16, ldc = N + 32;  // leading dims past the operands
          std::vector<uint32_t> A(M * lda), B(Kp * ldb);
          for (uint32_t& x : A) x = to_bf16(random_vector(1)[0]) | uint32_t{to_bf16(random_vector(1)[0])} << 16;
          for (uint32_t& x : B) x = to_bf16(random_vector(1)[0]) | uint32_t{to_bf16(random_vector(1)[0])} << 16;
          auto C = random_vector(M * ldc);
          const auto C0 = C;
          mk.gemm_bf16(M, N, Kp, A.data(), lda, B.data(), ldb, C.data(), ldc, accumulate);
          for (int m = 0; m < M; ++m)
            for (int n = 0; n < ldc; ++n) {
              if (n >= N) {  // untouched past N
                expect_close("gemm_bf16 bounds", mk.isa, C[m * ldc + n], C0[m * ldc + n], 0);
                continue;
              }
              double want = accumulate ? C0[m * ldc + n] : 0.0;
              for (int kp = 0; kp < Kp; ++kp) {
                const uint32_t a = A[m * lda + kp], b = B[kp * ldb + n];
                want += double(from_bf16(a & 0xffff)) * from_bf16(b & 0xffff) +
                        double(from_bf16(a >> 16)) * from_bf16(b >> 16);
              }
              expect_close("gemm_bf16", mk.isa, C[m * ldc + n], want, 1e-5);
            }
        }
      }
    }
  }
  // pack_pairs_bf16: rows 2r and 2r+1 rounded to nearest even, an odd row count padded with 0.
  const int rows = 7, cols = 32;
  const auto x = random_vector(rows * cols);
  std::vector<uint32_t> out(4 * cols);
  mk.pack_pairs_bf16(x.data(), rows, cols, cols, out.data(), cols);
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < cols; ++c) {
      const uint32_t odd = 2 * r + 1 < rows ? to_bf16(x[(2 * r + 1) * cols + c]) : 0u;
      const uint32_t want = to_bf16(x[2 * r * cols + c]) | odd << 16;
      ++checks;
      if (out[r * cols + c] != want && ++failures <= 10) std::printf("FAIL pack_pairs_bf16 [%s]\n", mk.isa);
    }
  // narrow_bf16: each row rounded to nearest even up to cols (a masked tail), zeros up to cols_out.
  std::vector<uint16_t> narrow(rows * 40, 0xffff);
  mk.narrow_bf16(x.data(), rows, 21, cols, 40, narrow.data(), 40);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < 40; ++c) {
      ++checks;
      if (narrow[r * 40 + c] != (c < 21 ? to_bf16(x[r * cols + c]) : 0) && ++failures <= 10)
        std::printf("FAIL narrow_bf16 [%s]\n", mk.isa);
    }
}

// One query's online-softmax step: its n scores before (s0) and after (s), `step` apart, its
// running max and sum before (m0, l0), and the alpha and sum the kernel left.
void expect_softmax_step(const char* what, const char* isa, const float* s0, const float* s, int n, int step,
                         float m0, float l0, float alpha, float l) {
  double mx = m0;
  for (int i = 0; i < n; ++i) mx = std::fmax(mx, s0[i * step]);
  const double safe = std::isinf(mx) ? 0.0 : mx;
  double sum = 0;
  for (int i = 0; i < n; ++i) {
    const double p = std::exp2(s0[i * step] - safe);
    sum += p;
    expect_close(what, isa, s[i * step], p, 1e-6);
  }
  expect_close(what, isa, alpha, std::exp2(m0 - safe), 1e-6);
  expect_close(what, isa, l, l0 * std::exp2(m0 - safe) + sum, 1e-6);
}

void check_softmax(const MicroKernels& mk) {
  for (int cols : {1, 5, 13, 16, 37, 128}) {  // full vectors, then narrower ones, then scalars
    const int rows = 23;
    auto s = random_vector(rows * cols, -30.f, 5.f), m = random_vector(cols, -10.f, 3.f);
    auto l = random_vector(cols, 0.5f, 3.f);
    m[0] = -INFINITY, l[0] = 0.f;  // a column that has seen no key yet
    for (int r = 0; r < rows; ++r) s[r * cols + cols - 1] = -INFINITY;  // one that sees none here
    const auto s0 = s, m0 = m, l0 = l;
    std::vector<float> alpha(cols);
    mk.softmax_step(s.data(), rows, cols, cols, m.data(), l.data(), alpha.data());
    for (int c = 0; c < cols; ++c)  // each query's scores run down a column
      expect_softmax_step("softmax", mk.isa, s0.data() + c, s.data() + c, rows, cols, m0[c], l0[c], alpha[c], l[c]);
    auto g = random_vector(rows * cols), dp = random_vector(rows * cols), delta = random_vector(cols);
    const auto g0 = g;
    mk.softmax_grad(g.data(), dp.data(), rows, cols, cols, delta.data());
    for (int i = 0; i < rows * cols; ++i)
      expect_close("softmax_grad", mk.isa, g[i], double(g0[i]) * (dp[i] - delta[i % cols]), 1e-6);
    auto x = random_vector(rows * cols);
    const auto x0 = x, f = random_vector(cols);
    mk.scale_cols(x.data(), rows, cols, cols, f.data());
    for (int i = 0; i < rows * cols; ++i) expect_close("scale_cols", mk.isa, x[i], double(x0[i]) * f[i % cols], 1e-6);
  }
}

void check_softmax_rows(const MicroKernels& mk) {
  for (int cols : {1, 5, 13, 16, 37, 128}) {
    const int rows = 3, ld = 130;
    auto s = random_vector(rows * ld, -30.f, 5.f), m = random_vector(rows, -10.f, 3.f), l = random_vector(rows, 0.5f, 3.f);
    m[0] = -INFINITY, l[0] = 0.f;                                 // a row that has seen no key yet
    for (int c = 0; c < cols; ++c) s[2 * ld + c] = -INFINITY;    // one that sees none here
    const auto s0 = s, m0 = m, l0 = l;
    std::vector<float> alpha(rows);
    mk.softmax_step_rows(s.data(), rows, cols, ld, m.data(), l.data(), alpha.data());
    for (int r = 0; r < rows; ++r)  // each query's scores run along a row
      expect_softmax_step("softmax_rows", mk.isa, s0.data() + r * ld, s.data() + r * ld, cols, 1, m0[r], l0[r],
                          alpha[r], l[r]);
  }
}

void check_row_dots(const MicroKernels& mk) {
  for (int M : {1, 3, 4, 9, 128}) {
    for (int N : {1, 2, 5}) {
      for (int K : {16, 64, 128}) {
        const int64_t lda = K + 3, ldb = K + 16, ldc = 7;  // rows apart in memory, as cache rows are
        auto A = random_vector(M * lda), B = random_vector(N * ldb), C = random_vector(M * ldc);
        mk.row_dots(M, N, K, A.data(), lda, B.data(), ldb, C.data(), ldc);
        for (int m = 0; m < M; ++m)
          for (int n = 0; n < N; ++n) {
            double want = 0;
            for (int k = 0; k < K; ++k) want += double(A[m * lda + k]) * B[n * ldb + k];
            expect_close("row_dots", mk.isa, C[m * ldc + n], want, 1e-5);
          }
      }
    }
  }
}

// Every 16-bit pattern, against the compiler's own half type and a shift for bf16.
#if defined(__aarch64__)
using Half = __fp16;
#else
using Half = _Float16;
#endif

void check_widen(const MicroKernels& mk) {
  std::vector<uint16_t> bits(1 << 16);
  for (size_t i = 0; i < bits.size(); ++i) bits[i] = static_cast<uint16_t>(i);
  std::vector<float> half(bits.size()), brain(bits.size());
  mk.widen_f16(bits.data(), static_cast<int64_t>(bits.size()), half.data());
  mk.widen_bf16(bits.data(), static_cast<int64_t>(bits.size()), brain.data());
  for (size_t i = 0; i < bits.size(); ++i) {
    Half h;
    std::memcpy(&h, &bits[i], sizeof(h));
    const uint32_t top = static_cast<uint32_t>(bits[i]) << 16;
    float b;
    std::memcpy(&b, &top, sizeof(b));
    ++checks;
    const bool ok = (std::isnan(half[i]) ? std::isnan(static_cast<float>(h)) : half[i] == static_cast<float>(h)) &&
                    (std::isnan(brain[i]) ? std::isnan(b) : brain[i] == b);
    if (!ok && ++failures <= 10) std::printf("FAIL widen [%s]: bits %04zx\n", mk.isa, i);
  }
}

}  // namespace

int main() {
  for (const char* const* isa = fastattn::cpu::supported_isas(); *isa != nullptr; ++isa) {
    fastattn::cpu::set_isa(*isa);
    check_gemm(fastattn::cpu::micro_kernels());
    check_gemm_bf16(fastattn::cpu::micro_kernels());
    check_softmax(fastattn::cpu::micro_kernels());
    check_softmax_rows(fastattn::cpu::micro_kernels());
    check_row_dots(fastattn::cpu::micro_kernels());
    check_widen(fastattn::cpu::micro_kernels());
    std::printf("%s: checked\n", *isa);
  }
  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures != 0;
}
