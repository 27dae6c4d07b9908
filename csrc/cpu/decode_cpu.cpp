// Decoding against a KV cache on the CPU: flash-decoding. A few new queries per sequence
// (q_len <= 16) against a long cache: the work is reading the cache, so a task is one split of
// one kv head's valid keys against every query of its GQA group at once (rows r = g * q_len + i
// for query i of head hk * group + g), and each cached key is read once per group. Splits keep
// every thread busy when batch * kv heads is small; a merge then combines their partial
// outputs by their log-sum-exp.
#include <cmath>
#include <vector>

#include "cpu_tiles.h"
#include "flash_cpu.h"
#include "micro_kernels.h"
#include "non_finite.h"

namespace fastattn::cpu {
namespace {

constexpr int kDecodeBlockK = 128;   // keys per score tile
constexpr int64_t kMinSplit = 1024;  // keys per split at least: below that, merging costs more
// Up to this many query rows, a score tile is laid out s[row][key] (scores as dot products along
// the head dim, the softmax vectorized along keys); beyond, s[key][row] as in the forward kernel,
// whose GEMM vectors run along the rows (padded to 16).
constexpr int64_t kFewRows = 4;

// Asks for key and value rows [first, last) ahead of use: the tile loop is too short for the
// out-of-order window to keep enough cache-line reads in flight on its own (measured on 8k-key
// caches: 1.23x faster with it; on 512-key ones, which stay in cache, 1.3x slower).
template <typename T>
void prefetch_rows(const T* k, const int64_t* ks, const T* v, const int64_t* vs, int64_t first, int64_t last,
                   int64_t D) {
  constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  for (int64_t j = first; j < last; ++j)
    for (int64_t d = 0; d < D; d += kLine) {
      __builtin_prefetch(k + j * ks[2] + d * ks[3]);
      __builtin_prefetch(v + j * vs[2] + d * vs[3]);
    }
}

// The score modifiers on one task's score tile (log2 units), s(r, j) at s[r * row_step + j *
// key_step]: softcap, ALiBi, then the causal and window bounds. Row r is query i = r % Nq of head
// hk * group + r / Nq, at key position len - Nq + i (end-aligned).
struct DecodeMasker {
  const AttentionParams& p;
  int64_t Nq, group, row_step, key_step;

  // Whether a tile [j0, j0 + nk) of a row with len keys needs apply.
  bool needed(int64_t j0, int nk, int64_t len) const {
    const int64_t last = len - 1;  // the last query's position; the first's is len - Nq
    const bool crosses_upper = (p.causal || p.window_right >= 0) && j0 + nk - 1 > len - Nq + upper();
    const bool crosses_left = p.window_left >= 0 && j0 < last - p.window_left;
    return p.softcap > 0.f || p.alibi_slopes != nullptr || crosses_upper || crosses_left;
  }

  // How far past its position a query sees (causal: 0, at most window_right).
  int64_t upper() const {
    if (p.window_right < 0) return 0;
    return p.causal ? std::min<int64_t>(p.window_right, 0) : p.window_right;
  }

  void apply(float* s, int64_t j0, int nk, int64_t b, int64_t hk, int64_t len, int64_t R) const {
    const float c = p.softcap * kLog2e, inv_c = c > 0.f ? 1.f / c : 0.f;
    const bool bounded_above = p.causal || p.window_right >= 0;
    const int64_t right = upper();
    for (int64_t r = 0; r < R; ++r) {
      const int64_t at = len - Nq + r % Nq;
      const float slope =
          p.alibi_slopes == nullptr ? 0.f : p.alibi_slopes[b * p.alibi_stride + hk * group + r / Nq] * kLog2e;
      for (int j = 0; j < nk; ++j) {
        float& x = s[r * row_step + j * key_step];
        const int64_t key = j0 + j;
        if (c > 0.f) x = c * std::tanh(x * inv_c);
        x -= slope * static_cast<float>(std::abs(key - at));
        if ((bounded_above && key - at > right) || (p.window_left >= 0 && at - key > p.window_left)) x = kNegInf;
      }
    }
  }
};

template <typename T>
void decode_impl(const AttentionParams& p) {
  const MicroKernels& mk = micro_kernels();
  const int64_t B = p.batch, H = p.heads, Hkv = p.kv_heads, Nq = p.q_len, D = p.head_dim;
  const int64_t Dp = round_up(D, 16), group = H / Hkv, R = group * Nq, ldr = round_up(R, 16);
  const bool few = R <= kFewRows;
  const int64_t row_step = few ? kDecodeBlockK : 1, key_step = few ? 1 : ldr;  // score (r, j): s[r * row_step + j * key_step]
  const float qk_scale = p.scale * kLog2e;
  const int64_t threads = at::get_num_threads();
  // The keys some query sees: from len - Nq - window_left (the first query's left edge) to len.
  const auto first_key = [&](int64_t len) {
    return p.window_left < 0 ? int64_t{0} : std::max<int64_t>(0, len - Nq - p.window_left);
  };
  const int64_t span = p.window_left < 0 ? p.kv_len : std::min(p.kv_len, p.window_left + Nq);
  const int64_t splits = std::clamp<int64_t>((2 * threads + B * Hkv - 1) / (B * Hkv), 1,
                                             std::max<int64_t>(1, span / kMinSplit));
  const int64_t split_len = round_up((span + splits - 1) / splits, kDecodeBlockK);
  const DecodeMasker masker{p, Nq, group, row_step, key_step};
  const bool hides = p.causal || p.window_left >= 0 || p.window_right >= 0;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const int64_t *qs = p.q_stride, *ks = p.k_stride, *vs = p.v_stride, *os = p.o_stride;
  // Each task's normalised partial output (R x D) and lse (R), natural log.
  std::vector<float> o_part(B * Hkv * splits * R * D), lse_part(B * Hkv * splits * R);

  parallel_dynamic(B * Hkv * splits, [&](const auto& next) {
    const FlushDenormals ftz;
    std::vector<float> qt(Dp * ldr), qr(R * Dp), s(kDecodeBlockK * ldr), acc(R * Dp), m(ldr), l(ldr), alpha(ldr);
    RowTile<T> kt(kDecodeBlockK, Dp), vt(kDecodeBlockK, Dp);
    std::vector<uint8_t> bad_key(kDecodeBlockK);
    std::vector<float> finite_v;
    for (int64_t item = next(); item >= 0; item = next()) {
      const int64_t b = item / (Hkv * splits), hk = item / splits % Hkv, split = item % splits;
      const int64_t len = p.seqused_k[b], lo = first_key(len) + split * split_len, hi = std::min(lo + split_len, len);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      if (lo < hi) {  // the group's queries, as rows [R][Dp] or transposed [Dp][ldr], zero-padded
        std::fill(qt.begin(), qt.end(), 0.f);
        std::fill(qr.begin(), qr.end(), 0.f);
        for (int64_t r = 0; r < R; ++r) {
          const T* row = q + b * qs[0] + (hk * group + r / Nq) * qs[1] + r % Nq * qs[2];
          for (int64_t d = 0; d < D; ++d) {
            const float x = static_cast<float>(row[d * qs[3]]) * qk_scale;
            (few ? qr[r * Dp + d] : qt[d * ldr + r]) = x;
          }
        }
      }
      const T* kh = k + b * ks[0] + hk * ks[1];
      const T* vh = v + b * vs[0] + hk * vs[1];
      for (int64_t j0 = lo; j0 < hi; j0 += kDecodeBlockK) {
        const int nk = static_cast<int>(std::min<int64_t>(kDecodeBlockK, hi - j0));
        if (hi - lo > kMinSplit)  // short runs come from cache, where the prefetches only cost
          prefetch_rows(kh, ks, vh, vs, j0 + kDecodeBlockK, std::min<int64_t>(hi, j0 + 2 * kDecodeBlockK), D);
        kt.load(kh + j0 * ks[2], ks[2], ks[3], nk, D, Dp);
        vt.load(vh + j0 * vs[2], vs[2], vs[3], nk, D, Dp);
        if (few)
          mk.row_dots(static_cast<int>(R), nk, Dp, qr.data(), Dp, kt.data, kt.ld, s.data(), row_step);
        else
          mk.gemm(nk, static_cast<int>(ldr), Dp, kt.data, kt.ld, 1, qt.data(), ldr, s.data(), ldr, false);
        const float* v_rows = vt.data;
        int64_t ldv = vt.ld;
        if (masker.needed(j0, nk, len)) {
          masker.apply(s.data(), j0, nk, b, hk, len, R);
          // Pairs the causal mask or the window hide: a NaN value there must not meet p = 0 (non_finite.h).
          if (hides && non_finite_rows(vh + j0 * vs[2], vs[2], vs[3], nk, D, bad_key.data())) {
            poison_seen(s.data(), key_step, row_step, bad_key.data(), nk, static_cast<int>(R));
            v_rows = finite_copy(vt.data, vt.ld, nk, Dp, finite_v);
            ldv = Dp;
          }
        }
        if (few)
          mk.softmax_step_rows(s.data(), static_cast<int>(R), nk, row_step, m.data(), l.data(), alpha.data());
        else
          mk.softmax_step(s.data(), nk, static_cast<int>(R), ldr, m.data(), l.data(), alpha.data());
        mk.scale_rows(acc.data(), static_cast<int>(R), Dp, Dp, alpha.data());
        mk.gemm(static_cast<int>(R), Dp, nk, s.data(), row_step, key_step, v_rows, ldv, acc.data(), Dp, true);
      }
      for (int64_t r = 0; r < R; ++r) {
        const bool seen = l[r] != 0.f;  // NaN: a tainted row
        const float inv_l = seen ? 1.f / l[r] : 0.f;
        float* o = o_part.data() + (item * R + r) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[r * Dp + d] * inv_l;
        lse_part[item * R + r] = seen ? m[r] * kLn2 + std::log(l[r]) : kNegInf;
      }
    }
  });

  // Merge: out = sum over splits of exp(lse_split - lse) * out_split, lse = logsumexp(lse_split).
  at::parallel_for(0, B * Hkv * R, 64, [&](int64_t first, int64_t last) {
    std::vector<float> o(D);
    for (int64_t row = first; row < last; ++row) {
      const int64_t bhk = row / R, r = row % R, b = bhk / Hkv, h = bhk % Hkv * group + r / Nq, i = r % Nq;
      const auto part = [&](int64_t split) { return (bhk * splits + split) * R + r; };
      const float sink = p.sinks == nullptr ? kNegInf : p.sinks[h];  // a split of its own, with no value
      float top = sink;
      for (int64_t sp = 0; sp < splits; ++sp) top = std::max(top, lse_part[part(sp)]);
      float total = sink == kNegInf ? 0.f : std::exp(sink - top);  // -inf: no sink (nor exp(-inf + inf))
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t sp = 0; sp < splits; ++sp) {
        const float wt = top == kNegInf ? 0.f : std::exp(lse_part[part(sp)] - top);
        total += wt;
        for (int64_t d = 0; d < D; ++d) o[d] += wt * o_part[part(sp) * D + d];
      }
      T* out = static_cast<T*>(p.out) + b * os[0] + h * os[1] + i * os[2];
      const float inv = total != 0.f ? 1.f / total : 0.f;
      for (int64_t d = 0; d < D; ++d) out[d * os[3]] = static_cast<T>(o[d] * inv);
      p.lse[b * p.lse_stride[0] + h * p.lse_stride[1] + i] = total != 0.f ? top + std::log(total) : kNegInf;
    }
  });
}

}  // namespace

void decode(const AttentionParams& p) {
  with_dtype(p.dtype, [&](auto element) { decode_impl<decltype(element)>(p); });
}

}  // namespace fastattn::cpu
