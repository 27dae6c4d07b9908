// Counter-based dropout: keep/drop of score (b, h, i, j) is a pure function of (seed, index),
// so the backward regenerates the forward's mask without storing it.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTATTN_HOST_DEVICE inline
#endif

namespace fastattn {

// splitmix64's finaliser: a bijective mix with full avalanche.
FASTATTN_HOST_DEVICE uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// index = ((b * H + h) * Nq + i) * Nk + j. Keeps with probability 1 - p.
FASTATTN_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t index, float p) {
  const uint64_t z = mix64(seed + index * 0x9E3779B97F4A7C15ull);
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f) >= p;  // 24 uniform bits
}

}  // namespace fastattn
