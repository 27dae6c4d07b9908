// The CUDA kernels of csrc/cuda on a CPU, for the tests on machines without a GPU: the kernels'
// source compiles unchanged (mma_utils.cuh includes this header under FASTATTN_CUDA_EMU), and
// this header supplies what they take from the hardware.
//
// - Each CUDA thread of a CTA is a fiber (ucontext); CTAs run one at a time. A fiber runs until
//   it waits at __syncthreads or at a warp collective. The scheduler takes the warps in a random
//   order (seeded) and runs each until all its lanes wait at __syncthreads: one warp gets a whole
//   barrier interval ahead of the others, where a missing barrier shows.
// - Warp collectives (ldmatrix, mma.sync, shuffles): every lane of the warp must reach the same
//   one; each lane then computes its registers from all 32 lanes' inputs, in the fragment
//   layouts PTX defines. A lane in a different collective, or a barrier some thread never
//   reaches, fails the launch.
// - cp.async: each commit group lands either at once or only at the wait that needs it (a coin
//   flip per group), so a read of shared memory before its wait, or a prefetch that overwrites a
//   stage other threads still read, gives wrong values. Sources must lie in a registered buffer
//   and be 16-byte aligned, like destinations in shared memory.
// - Shared memory starts as 0xFF bytes: NaN in fp16 and bf16.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define FASTATTN_DYNAMIC_SMEM(name) unsigned char* name = ::fastattn::emu::dynamic_smem()
#define threadIdx (::fastattn::emu::thread_index())
#define blockIdx (::fastattn::emu::block_index())
#define blockDim (::fastattn::emu::block_dim())
#define gridDim (::fastattn::emu::grid_dim())

// 16-bit floats as bits, with cuda_fp16.h / cuda_bf16.h's conversions (round to nearest even).
struct __nv_bfloat16 { uint16_t bits; };
struct __half { uint16_t bits; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
struct __half2 { __half x, y; };

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {0x7FC0};
  return {static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16)};
}
inline float __half2float(__half h) {
  _Float16 x;
  std::memcpy(&x, &h.bits, 2);
  return static_cast<float>(x);
}
inline __half __float2half_rn(float f) {
  const _Float16 x = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &x, 2);
  return h;
}
struct float2 { float x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }

inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }

namespace fastattn::emu {

struct Dim3 { unsigned x = 0, y = 0, z = 0; };

struct Copy { void* dst; const void* src; bool valid; };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  unsigned tid = 0;
  bool done = false;
  unsigned collectives = 0;  // warp collectives entered: the parity picks the slot set
  std::vector<Copy> open;    // cp.async copies since the last commit
  std::vector<std::vector<Copy>> pending;  // committed groups not landed yet, oldest first
};

// One lane's inputs to a warp collective.
struct Slot {
  int kind;
  const void* ptr;
  uint32_t a[4], b[2];
};

struct Warp {
  int arrived = 0;
  long generation = 0;
  Slot slots[2][32];  // double-buffered: a lane can be at most one collective ahead of another
};

struct Cta {
  Dim3 block, grid;
  unsigned threads = 0;
  std::vector<unsigned char> smem;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int arrived = 0;
  long generation = 0, progress = 0;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  std::string error;
  std::mt19937_64 rng;
  const std::function<void()>* body = nullptr;
  std::vector<std::pair<const char*, const char*>> buffers;  // where cp.async may read
};

inline Cta* g_cta = nullptr;

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("cuda emulation: " + what); }

inline Cta& cta() { return *g_cta; }
inline Fiber& fiber() { return *g_cta->current; }
inline Dim3 thread_index() { return {fiber().tid, 0, 0}; }
inline Dim3 block_index() { return cta().block; }
inline Dim3 block_dim() { return {cta().threads, 1, 1}; }
inline Dim3 grid_dim() { return cta().grid; }
inline unsigned char* dynamic_smem() { return cta().smem.data(); }

inline void yield() { swapcontext(&fiber().ctx, &cta().scheduler); }

// Waits until `expected` arrivals bump the generation (the last arrival does, and goes on).
inline void wait_at(int& arrived, long& generation, int expected) {
  const long mine = generation;
  ++cta().progress;
  if (++arrived == expected) {
    arrived = 0;
    ++generation;
    return;
  }
  while (generation == mine) yield();
}

inline void syncthreads() { wait_at(cta().arrived, cta().generation, static_cast<int>(cta().threads)); }

// Every lane of the calling warp publishes its inputs (fill), waits for the others, then reads
// all 32 slots (use).
template <typename Fill, typename Use>
inline void collective(int kind, Fill fill, Use use) {
  Fiber& f = fiber();
  Warp& w = cta().warps[f.tid / 32];
  Slot* slots = w.slots[f.collectives++ & 1];
  slots[f.tid % 32].kind = kind;
  fill(slots[f.tid % 32]);
  wait_at(w.arrived, w.generation, 32);
  for (int i = 0; i < 32; ++i)
    if (slots[i].kind != kind) fail("lanes of one warp reached different collectives");
  use(slots);
}

inline bool in_smem(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= cta().smem.data() && c + bytes <= cta().smem.data() + cta().smem.size();
}

inline void land(std::vector<Copy>& group) {
  for (const Copy& c : group) {
    if (c.valid)
      std::memcpy(c.dst, c.src, 16);
    else
      std::memset(c.dst, 0, 16);
  }
  group.clear();
}

inline void fiber_main() {
  Cta& c = cta();
  try {
    (*c.body)();
  } catch (const std::exception& e) {
    if (c.error.empty()) c.error = e.what();
  }
  c.current->done = true;
  ++c.progress;
}

// Runs body as every thread of every CTA of the grid (x fastest), `smem_bytes` of dynamic
// shared memory each, the fibers' order drawn from `seed`. `buffers` (begin, bytes) are the
// global memory cp.async may read.
inline void launch(Dim3 grid, unsigned threads, size_t smem_bytes, uint64_t seed,
                   const std::vector<std::pair<const void*, size_t>>& buffers, const std::function<void()>& body) {
  if (threads == 0 || threads % 32 != 0) fail("block size " + std::to_string(threads) + " is not whole warps");
  Cta c;
  c.grid = grid;
  c.threads = threads;
  c.rng.seed(seed);
  c.body = &body;
  for (const auto& [p, n] : buffers) c.buffers.emplace_back(static_cast<const char*>(p), static_cast<const char*>(p) + n);
  c.fibers.resize(threads);
  for (auto& f : c.fibers) f.stack.resize(256 * 1024);
  g_cta = &c;
  std::vector<unsigned> order(threads);
  for (unsigned b = 0; b < grid.x * grid.y * grid.z; ++b) {
    {
      const unsigned bx = b % grid.x, by = b / grid.x % grid.y, bz = b / grid.x / grid.y;
      c.block = {bx, by, bz};
      c.smem.assign(smem_bytes, 0xFF);
      c.warps.assign(threads / 32, Warp{});
      c.arrived = 0;
      for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = c.fibers[t];
        f.tid = t;
        f.done = false;
        f.collectives = 0;
        f.open.clear();
        f.pending.clear();
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &c.scheduler;
        makecontext(&f.ctx, fiber_main, 0);
        order[t] = t;
      }
      std::vector<unsigned> warps(threads / 32);
      for (unsigned w = 0; w < warps.size(); ++w) warps[w] = w;
      for (unsigned left = threads; left > 0;) {
        const long round = c.progress;
        std::shuffle(warps.begin(), warps.end(), c.rng);
        for (unsigned w : warps) {  // a warp runs until all its lanes wait at __syncthreads or end
          for (long before = -1; before != c.progress;) {
            before = c.progress;
            std::shuffle(order.begin() + 32 * w, order.begin() + 32 * (w + 1), c.rng);
            for (unsigned i = 32 * w; i < 32 * (w + 1); ++i) {
              const unsigned t = order[i];
              if (c.fibers[t].done) continue;
              c.current = &c.fibers[t];
              swapcontext(&c.scheduler, &c.fibers[t].ctx);
              if (!c.error.empty()) {
                g_cta = nullptr;
                throw std::runtime_error(c.error + " (block " + std::to_string(bx) + ", " + std::to_string(by) +
                                         ", " + std::to_string(bz) + ", thread " + std::to_string(t) + ")");
              }
              left -= c.fibers[t].done;
            }
          }
        }
        if (left > 0 && c.progress == round) {
          g_cta = nullptr;
          fail("deadlock: threads wait at a barrier the others never reach (block " + std::to_string(bx) + ", " +
               std::to_string(by) + ", " + std::to_string(bz) + ")");
        }
      }
    }
  }
  g_cta = nullptr;
}

}  // namespace fastattn::emu

inline void __syncthreads() { ::fastattn::emu::syncthreads(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::fastattn::emu::fail("__syncwarp takes the whole warp");
  ::fastattn::emu::collective(6, [](::fastattn::emu::Slot&) {}, [](const ::fastattn::emu::Slot*) {});
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T x, int lane_mask) {
  static_assert(sizeof(T) == 4, "4-byte shuffles only");
  using namespace ::fastattn::emu;
  if (mask != 0xffffffffu) fail("shuffles take the whole warp");
  T out;
  collective(
      1, [&](Slot& s) { std::memcpy(s.a, &x, 4); },
      [&](const Slot* all) { std::memcpy(&out, all[(fiber().tid % 32) ^ lane_mask].a, 4); });
  return out;
}

namespace fastattn::cuda {
using std::isfinite;
using std::min;

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  using namespace ::fastattn::emu;
  if (!in_smem(smem, 16) || reinterpret_cast<uintptr_t>(smem) % 16) fail("cp.async to a bad shared address");
  if (valid) {
    const char* src = static_cast<const char*>(gmem);
    bool inside = false;
    for (const auto& [lo, hi] : cta().buffers) inside = inside || (src >= lo && src + 16 <= hi);
    if (!inside || reinterpret_cast<uintptr_t>(src) % 16) fail("cp.async reads outside its tensors or unaligned");
  }
  fiber().open.push_back({smem, gmem, valid});
}

__device__ __forceinline__ void cp_async_commit() {
  using namespace ::fastattn::emu;
  Fiber& f = fiber();
  f.pending.push_back(std::move(f.open));
  f.open.clear();
  if (cta().rng() & 1) land(f.pending.back());
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  auto& pending = ::fastattn::emu::fiber().pending;
  while (pending.size() > static_cast<size_t>(kPending)) {
    ::fastattn::emu::land(pending.front());
    pending.erase(pending.begin());
  }
}

namespace emu_detail {
using namespace ::fastattn::emu;

// ldmatrix: lane i names row i % 8 of matrix i / 8; lane (g, t) gets, of matrix j, (row g,
// cols 2t, 2t+1), or with .trans (rows 2t, 2t+1; col g).
inline void ldmatrix(uint32_t (&r)[4], const void* row, bool trans) {
  if (!in_smem(row, 16) || reinterpret_cast<uintptr_t>(row) % 16) fail("ldmatrix row outside shared memory or unaligned");
  collective(
      trans ? 3 : 2, [&](Slot& s) { s.ptr = row; },
      [&](const Slot* all) {
        const unsigned lane = fiber().tid % 32, g = lane / 4, t = lane % 4;
        for (int j = 0; j < 4; ++j) {
          uint16_t lo, hi;
          if (trans) {
            std::memcpy(&lo, static_cast<const uint16_t*>(all[j * 8 + 2 * t].ptr) + g, 2);
            std::memcpy(&hi, static_cast<const uint16_t*>(all[j * 8 + 2 * t + 1].ptr) + g, 2);
          } else {
            std::memcpy(&lo, static_cast<const uint16_t*>(all[j * 8 + g].ptr) + 2 * t, 2);
            std::memcpy(&hi, static_cast<const uint16_t*>(all[j * 8 + g].ptr) + 2 * t + 1, 2);
          }
          r[j] = lo | static_cast<uint32_t>(hi) << 16;
        }
      });
}

inline float half_of(uint32_t reg, int k, __nv_bfloat16) { return __bfloat162float({static_cast<uint16_t>(reg >> (16 * (k % 2)))}); }
inline float half_of(uint32_t reg, int k, __half) { return __half2float({static_cast<uint16_t>(reg >> (16 * (k % 2)))}); }
}  // namespace emu_detail

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { emu_detail::ldmatrix(r, smem, false); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) { emu_detail::ldmatrix(r, smem, true); }

// D (16x8) += A (16x16) B (16x8), from the fragments of all 32 lanes; products are exact in
// float and summed in double (the hardware's order and rounding differ within fp32 accuracy).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  using namespace emu_detail;
  collective(
      std::is_same_v<T, __half> ? 5 : 4,
      [&](Slot& s) {
        std::memcpy(s.a, a, sizeof(s.a));
        s.b[0] = b0, s.b[1] = b1;
      },
      [&](const Slot* all) {
        const unsigned lane = fiber().tid % 32, g = lane / 4, t = lane % 4;
        for (int i = 0; i < 4; ++i) {
          const int row = g + (i / 2) * 8, col = 2 * t + i % 2;
          double acc = 0;
          for (int k = 0; k < 16; ++k) {
            const float x = half_of(all[(row % 8) * 4 + (k % 8) / 2].a[row / 8 + 2 * (k / 8)], k, T{});
            const float y = half_of(all[col * 4 + (k % 8) / 2].b[k / 8], k, T{});
            acc += static_cast<double>(x * y);
          }
          d[i] += static_cast<float>(acc);
        }
      });
}

}  // namespace fastattn::cuda
