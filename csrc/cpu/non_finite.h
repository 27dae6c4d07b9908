// What a mask hides must not reach a result, NaN included (README, "Non-finite inputs"): a hidden
// pair's p = 0 (or dS = 0) times a NaN or inf in a value, key, query or dO row is NaN. The CPU
// kernels look for such rows (cheap: O(N D) against the O(N^2 D) products) and only where one
// meets a tile with hidden pairs take a slower exact path: the operand's non-finite elements 0,
// and the rows that see them made NaN through their scores.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastattn::cpu {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// The exponent bits of T: all ones for inf and NaN.
template <typename T>
constexpr uint32_t exponent_bits() {
  if constexpr (std::is_same_v<T, float>) return 0x7f800000u;
  if constexpr (std::is_same_v<T, c10::Half>) return 0x7c00u;
  return 0x7f80u;  // bf16
}

// bad[r] = whether row r of x (rows x cols, strides rs, cs) holds a non-finite element; returns
// whether any does. Bit tests, so that the usual unit-stride rows vectorize.
template <typename T>
bool non_finite_rows(const T* x, int64_t rs, int64_t cs, int64_t rows, int64_t cols, uint8_t* bad) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
  constexpr Bits kExp = static_cast<Bits>(exponent_bits<T>());
  bool any = false;
  const auto exponent_full = [](const T* at) {
    Bits bits;
    std::memcpy(&bits, at, sizeof(Bits));
    return (bits & kExp) == kExp;
  };
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = x + r * rs;
    int found = 0;
    if (cs == 1) {  // the usual layout: a loop the compiler vectorizes
      for (int64_t c = 0; c < cols; ++c) found |= exponent_full(row + c);
    } else {
      for (int64_t c = 0; c < cols; ++c) found |= exponent_full(row + c * cs);
    }
    bad[r] = static_cast<uint8_t>(found);
    any |= found != 0;
  }
  return any;
}

inline float finite_or_zero(float x) { return std::isfinite(x) ? x : 0.f; }

// A word of two bf16 with each non-finite half 0.
inline uint32_t finite_pair(uint32_t w) {
  const uint32_t lo = (w & 0x7f80u) == 0x7f80u ? 0u : w & 0xffffu;
  const uint32_t hi = (w & 0x7f800000u) == 0x7f800000u ? 0u : w & 0xffff0000u;
  return lo | hi;
}

// Over a score tile, score (key j, query i) at s[j * key_step + i * query_step]: NaN where a query
// sees (score not -inf) a key marked bad, so that query's softmax, output and lse turn NaN.
inline void poison_seen(float* s, int64_t key_step, int64_t query_step, const uint8_t* bad_key, int nk, int mq) {
  for (int j = 0; j < nk; ++j)
    if (bad_key[j])
      for (int i = 0; i < mq; ++i) {
        float& x = s[j * key_step + i * query_step];
        if (x != -std::numeric_limits<float>::infinity()) x = kNaN;
      }
}

// rows x cols of x (row stride ld) into out (row stride cols), non-finite elements 0.
inline const float* finite_copy(const float* x, int64_t ld, int64_t rows, int64_t cols, std::vector<float>& out) {
  out.resize(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = finite_or_zero(x[r * ld + c]);
  return out.data();
}

}  // namespace fastattn::cpu
