// Tile plumbing shared by the CPU kernels (flash_cpu.cpp, decode_cpu.cpp): scheduling, denormal
// control and packing of strided rows into the fp32 layout the micro-kernels read.
#pragma once
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "../attention_params.h"
#include "micro_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace fastattn::cpu {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// f(T{}) with T the element type of `dtype`: the kernels' one dtype dispatch.
template <typename F>
void with_dtype(DType dtype, const F& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(c10::Half{});
    case DType::kBFloat16: return f(c10::BFloat16{});
  }
}

// Flush-to-zero and denormals-are-zero for the calling thread while in scope. Probabilities
// below 2^-126 change no result measurably, but denormal arithmetic runs tens of times slower
// (training steps whose backward slowed 30x have been seen without it).
class FlushDenormals {
#if defined(__x86_64__) || defined(_M_X64)
 public:
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

// Runs body(next) on every thread; next() hands out the items [0, total) one at a time, then -1.
// Per-item cost varies with causality and padding, so static chunks would leave threads idle.
// Each item writes only its own outputs: the result does not depend on which thread ran what.
template <typename Body>
void parallel_dynamic(int64_t total, const Body& body) {
  std::atomic<int64_t> counter{0};
  const auto next = [&] {
    const int64_t item = counter.fetch_add(1);
    return item < total ? item : int64_t{-1};
  };
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { body(next); });
}

// dst[r * ld + c] = src[r, c] * mul for r < rows, c < cols; zero for cols <= c < ld.
template <typename T>
void pack_rows(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, int64_t ld,
               float* dst, float mul = 1.f) {
  constexpr bool kHalf = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;
  const auto widen = !kHalf ? nullptr : std::is_same_v<T, c10::BFloat16> ? micro_kernels().widen_bf16
                                                                         : micro_kernels().widen_f16;
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * rs;
    float* d = dst + r * ld;
    if constexpr (kHalf) {
      if (cs == 1) {  // widened in the ISA's vectors: c10's scalar conversions cost as much as decoding
        widen(reinterpret_cast<const uint16_t*>(s), cols, d);
        if (mul != 1.f)
          for (int64_t c = 0; c < cols; ++c) d[c] *= mul;
        std::fill(d + cols, d + ld, 0.f);
        continue;
      }
    }
    if (cs == 1) {  // the usual layout: a unit-stride loop the compiler vectorizes
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<float>(s[c]) * mul;
    } else {
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<float>(s[c * cs]) * mul;
    }
    std::fill(d + cols, d + ld, 0.f);
  }
}

// dst[c * ld + r] = src[r, c] * mul for r < rows, c < cols; zero for rows <= r < ld.
template <typename T>
void pack_transposed(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols,
                     int64_t ld, float* dst, float mul = 1.f) {
  for (int64_t c = 0; c < cols; ++c) {
    float* d = dst + c * ld;
    for (int64_t r = 0; r < rows; ++r) d[r] = static_cast<float>(src[r * rs + c * cs]) * mul;
    std::fill(d + rows, d + ld, 0.f);
  }
}

// A key or value tile as the micro-kernels read it: rows of `ld` floats with unit column
// stride. float32 rows that already have that layout are used in place; others are packed
// (into a buffer allocated at the first such load: small calls with in-place rows need none).
template <typename T>
struct RowTile {
  std::vector<float> buf;
  const float* data = nullptr;
  int64_t ld = 0, capacity;

  RowTile(int64_t rows, int64_t ld_packed) : capacity(rows * ld_packed) {}

  void load(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, int64_t ld_packed) {
    if constexpr (std::is_same_v<T, float>) {
      if (cs == 1 && cols == ld_packed) {
        data = src;
        ld = rs;
        return;
      }
    }
    if (buf.empty()) buf.resize(capacity);  // pack_rows writes every element it reads back
    pack_rows(src, rs, cs, rows, cols, ld_packed, buf.data());
    data = buf.data();
    ld = ld_packed;
  }
};

}  // namespace fastattn::cpu
