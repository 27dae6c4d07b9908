// Flash attention on the CPU: tiled, online softmax, masks applied per tile, dead tiles skipped.
//
// Score tiles are kept transposed, s[key][query], so that each query's softmax statistics run
// along a contiguous row of the tile and vectorize without horizontal reductions. Accumulation is
// float32 whatever the input dtype; inputs are packed (converted, de-strided) once per kv head or
// per tile, and the dot products run in the micro-kernels (micro_kernels.h).
#include "flash_cpu.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../dropout_hash.h"
#include "../seq_info.h"
#include "cpu_tiles.h"
#include "micro_kernels.h"
#include "non_finite.h"

namespace fastattn::cpu {
namespace {

constexpr int kBlockQ = 128; // queries per tile: the columns of a score tile
constexpr int kBlockK = 64;  // keys per tile: the rows of a score tile
constexpr int kBf16BlockK = 256;  // with bf16 dot products: 4-8% faster than 64 keys, measured
constexpr int kBwdBlockK = 128;  // the backward's key tiles: fewer passes over Q, dO and dQ

// The valid keys [begin, end) of one batch row, before causality.
struct KeyRange {
  int64_t begin, end;
};

// The keys a query tile [i0, i0 + mq) of a sequence can see, by position: [begin, end) within
// the valid ones, narrowed by causality and the window (aligned by seq.offset).
KeyRange visible_keys(const AttentionParams& p, const SeqInfo& seq, int64_t i0, int64_t mq) {
  KeyRange keys{seq.key_begin, seq.key_end};
  const int64_t first = i0 + seq.offset, last = i0 + mq - 1 + seq.offset;  // the tile's queries' key positions
  if (p.causal) keys.end = std::min(keys.end, last + 1);
  if (p.window_right >= 0) keys.end = std::min(keys.end, last + p.window_right + 1);
  if (p.window_left >= 0 && first - p.window_left > keys.begin)  // an even step: packed bf16 keys come in pairs
    keys.begin += (first - p.window_left - keys.begin) & ~int64_t{1};
  return keys;
}

// The query tiles that can see some key of the key tile [j0, j0 + nk): from begin (a tile's first
// query) to end (at most Nq); none when begin = end.
KeyRange visible_queries(const AttentionParams& p, const SeqInfo& seq, int64_t j0, int64_t nk) {
  int64_t begin = 0, end = seq.q_len;
  if (p.causal) begin = std::max(begin, j0 - seq.offset);
  if (p.window_right >= 0) begin = std::max(begin, j0 - seq.offset - p.window_right);
  if (p.window_left >= 0) end = std::min(end, j0 + nk - 1 + p.window_left - seq.offset + 1);
  end = std::max<int64_t>(end, 0);
  return begin < end ? KeyRange{begin / kBlockQ * kBlockQ, end} : KeyRange{end, end};  // from a tile's start
}

// s *= f over a kBlockQ-wide tile's nk rows and mq columns.
void scale_by(float* s, const float* f, int nk, int mq) {
  for (int j = 0; j < nk; ++j)
    for (int i = 0; i < mq; ++i) s[j * kBlockQ + i] *= f[j * kBlockQ + i];
}

// s = c tanh(s / c) over a tile's nk rows and mq columns (row length ld), through the micro-kernels'
// vector exp2: tanh y = sign(y) (1 - e) / (1 + e), e = exp(-2|y|), which cannot overflow; below
// |y| = 1/8, where 1 - e would lose digits, its series to y^7 (next term under 4e-9 relative).
// cap (the backward): 1 - tanh^2 per score. Some 5x faster than std::tanh score by score.
void softcap_tile(float* s, int nk, int mq, int64_t ld, float c, float* cap) {
  thread_local std::vector<float> e;
  e.resize(static_cast<size_t>(nk) * ld);
  static const float zeros[kBlockQ] = {};
  const float inv_c = 1.f / c, k = -2.f * kLog2e * inv_c;
  for (int j = 0; j < nk; ++j)
    for (int i = 0; i < mq; ++i) e[j * ld + i] = k * std::fabs(s[j * ld + i]);
  micro_kernels().exp2_shifted(e.data(), nk, mq, ld, zeros);
  for (int j = 0; j < nk; ++j)
    for (int i = 0; i < mq; ++i) {
      const float x = s[j * ld + i], y = x * inv_c, y2 = y * y, ex = e[j * ld + i];
      const float series = y * (1.f + y2 * (-1.f / 3 + y2 * (2.f / 15 + y2 * (-17.f / 315))));
      const float t = y2 < 1.f / 64 ? series : std::copysign((1.f - ex) / (1.f + ex), x);
      s[j * ld + i] = c * t;
      if (cap != nullptr) cap[j * ld + i] = 1.f - t * t;
    }
}

// Everything that masks one (batch, head): applied to a transposed score tile in log2 units,
// after the score modifiers (softcap, ALiBi).
struct TileMasker {
  const AttentionParams& p;
  const SeqInfo& seq;
  int64_t b, h;
  int64_t ld = kBlockQ;  // the tile's row length (its queries)

  // cap: where given (the backward, with a softcap), the softcap's derivative 1 - tanh^2 per score,
  // by which dS scales (finite everywhere: where a mask hides a score, dS is 0 already).
  void apply(float* s, int64_t j0, int nk, int64_t i0, int mq, float* cap = nullptr) const {
    if (p.softcap > 0.f) softcap_tile(s, nk, mq, ld, p.softcap * kLog2e, cap);  // the tile's log2 units
    if (p.alibi_slopes != nullptr) {
      const float slope = p.alibi_slopes[b * p.alibi_stride + h] * kLog2e;
      for (int j = 0; j < nk; ++j)
        for (int i = 0; i < mq; ++i) s[j * ld + i] -= slope * static_cast<float>(std::abs(j0 + j - i0 - i - seq.offset));
    }
    if (p.mask_kind != MaskKind::kNone) {
      const int64_t* st = p.mask_stride;
      const int64_t base = b * st[0] + h * st[1] + i0 * st[2] + j0 * st[3];
      for (int j = 0; j < nk; ++j) {
        float* row = s + j * ld;
        const int64_t at = base + j * st[3];
        if (p.mask_kind == MaskKind::kFloat) {  // -inf hides: set, so a NaN score stays hidden
          const float* m = static_cast<const float*>(p.mask) + at;
          for (int i = 0; i < mq; ++i) row[i] = m[i * st[2]] == kNegInf ? kNegInf : row[i] + m[i * st[2]] * kLog2e;
        } else {
          const bool* m = static_cast<const bool*>(p.mask) + at;
          for (int i = 0; i < mq; ++i)
            if (!m[i * st[2]]) row[i] = kNegInf;
        }
      }
    }
    if (p.key_padding != nullptr && p.kv_holes[b]) {
      const bool* pad = p.key_padding + b * p.kpm_stride[0];
      for (int j = 0; j < nk; ++j)
        if (pad[(j0 + j) * p.kpm_stride[1]]) std::fill(s + j * ld, s + j * ld + mq, kNegInf);
    }
    // By position, only on tiles a bound crosses: key j0 + j, query i0 + i at i0 + i + offset.
    const int64_t at = i0 + seq.offset;
    const bool upper = p.causal || p.window_right >= 0;  // keys past the query (+ window_right) hidden
    const int64_t right = p.window_right < 0 ? 0 : (p.causal ? std::min<int64_t>(p.window_right, 0) : p.window_right);
    if (upper && j0 + nk - 1 - at > right) {
      for (int j = 0; j < nk; ++j) {
        const int64_t hidden = std::min<int64_t>(mq, j0 + j - at - right);  // queries i < key - right
        if (hidden > 0) std::fill(s + j * ld, s + j * ld + hidden, kNegInf);
      }
    }
    if (p.window_left >= 0 && j0 - (at + mq - 1) < -p.window_left) {
      for (int j = 0; j < nk; ++j) {
        const int64_t first = std::max<int64_t>(0, j0 + j - at + p.window_left + 1);  // queries i > key + left
        if (first < mq) std::fill(s + j * ld + first, s + j * ld + mq, kNegInf);
      }
    }
  }

  // Multiplies the tile by keep / (1 - p) (or writes that factor into `out` when given).
  // Sequence b of a packed batch draws what a lone call with seed + b * H would.
  void dropout(float* s, int64_t j0, int nk, int64_t i0, int mq, float* out = nullptr) const {
    const float inv_keep = 1.f / (1.f - p.dropout_p);
    const bool packed = p.cu_seqlens_q != nullptr;
    const uint64_t seed = p.seed + (packed ? b * p.heads : 0);
    const uint64_t row0 = static_cast<uint64_t>(((packed ? 0 : b * p.heads) + h) * seq.q_len + i0);
    for (int j = 0; j < nk; ++j)
      for (int i = 0; i < mq; ++i) {
        const uint64_t index = (row0 + i) * seq.k_len + j0 + j;
        const float f = dropout_keep(seed, index, p.dropout_p) ? inv_keep : 0.f;
        if (out != nullptr) out[j * ld + i] = f; else s[j * ld + i] *= f;
      }
  }
};

// bf16 inputs with bf16 dot products (AMX tiles, or vdpbf16ps), whose operands are bf16 pairs
// along the reduction dim: the score tile is S^T = K Q^T as in the fp32 kernels, and the output
// is accumulated transposed, O^T += V^T P^T, so that K and V^T are row-major A operands and
// Q^T and P^T the paired B operands. Head dims are padded to kBf16Depth, keys to whole tiles of
// kBf16BlockK, whose larger score tiles mean fewer passes over O^T's tiles.
constexpr int64_t kBf16Depth = 32;
uint32_t bf16_bits(c10::BFloat16 x) { return x.x; }
uint32_t bf16_bits(float x) { return c10::BFloat16(x).x; }

// The bf16 pair (src[r, c], src[r, c + 1]) at dst[r * ld + c / 2]: bf16 rows as they are. Past
// cols (the second half of an odd last pair, and the padding) dst is left as it is: callers zero it.
template <typename T>
void pack_pairs_along_rows(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, uint32_t* dst,
                           int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = src + r * rs;
    uint16_t* d = reinterpret_cast<uint16_t*>(dst + r * ld);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (cs == 1) {
        std::memcpy(d, s, cols * sizeof(T));
        continue;
      }
    }
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<uint16_t>(bf16_bits(s[c * cs]));
  }
}

// The bf16 pair (src[r, c], src[r + 1, c]) at dst[c * ld + r / 2], the second 0 past rows.
template <typename T>
void pack_pairs_across_rows(const T* src, int64_t rs, int64_t cs, int64_t rows, int64_t cols, uint32_t* dst,
                            int64_t ld) {
  for (int64_t r = 0; r < rows; r += 2) {
    const T* even = src + r * rs;
    const T* odd = r + 1 < rows ? even + rs : nullptr;
    for (int64_t c = 0; c < cols; ++c)
      dst[c * ld + r / 2] = bf16_bits(even[c * cs]) | (odd != nullptr ? bf16_bits(odd[c * cs]) << 16 : 0u);
  }
}

// Where a query tile reads its keys and values: fp32 rows of `ld` floats with unit column
// stride, or, for bf16 dot products, K and V^T as rows of bf16 pairs.
struct KVRows {
  const float* k;
  int64_t ldk;
  const float* v;
  int64_t ldv;
  const uint32_t* k2 = nullptr;  // [keys][Dk / 2]: pairs along the head dim
  const uint32_t* v2 = nullptr;  // [Dp][keys / 2]: pairs of keys
  int64_t ldv2 = 0;
};

// A query tile's buffers, ldq columns wide (queries): kBlockQ, or fewer for a short call. One
// set per thread, kept from call to call (no allocation on the hot path of small calls); every
// element is written before it is read, within a tile.
struct ForwardBuffers {
  std::vector<float> qt, s, acc, m, l, alpha;  // acc: O [queries][Dp], or O^T [Dp][queries] (bf16 dots)
  std::vector<uint32_t> qt2, pt2;              // Q^T and P^T in bf16 pairs, for bf16 dot products
  std::vector<uint8_t> bad_key = std::vector<uint8_t>(kBf16BlockK);  // a value row with NaN or inf
  std::vector<float> finite_v;                 // a value tile without them (non_finite.h)
  std::vector<uint32_t> finite_v2;

  // rows with a copy of their values' nk rows (or the pairs of them) whose non-finite elements are 0.
  KVRows with_finite_values(KVRows rows, int nk, int64_t Dp, bool bf16_dots) {
    if (bf16_dots) {
      const int64_t kp = round_up(nk, 32) / 2;  // the key pairs the product reads
      finite_v2.resize(Dp * kp);
      for (int64_t c = 0; c < Dp; ++c)
        for (int64_t w = 0; w < kp; ++w) finite_v2[c * kp + w] = finite_pair(rows.v2[c * rows.ldv2 + w]);
      rows.v2 = finite_v2.data();
      rows.ldv2 = kp;
    } else {
      rows.v = finite_copy(rows.v, rows.ldv, nk, Dp, finite_v);
      rows.ldv = Dp;
    }
    return rows;
  }

  static ForwardBuffers& of_this_thread(int64_t Dp, int64_t Dk, bool bf16_dots, int64_t ldq) {
    thread_local ForwardBuffers buf;
    for (auto [v, n] : {std::pair{&buf.qt, Dp * ldq}, std::pair{&buf.s, (bf16_dots ? kBf16BlockK : kBlockK) * ldq},
                        std::pair{&buf.acc, ldq * Dp}, std::pair{&buf.m, ldq}, std::pair{&buf.l, ldq},
                        std::pair{&buf.alpha, ldq}})
      v->resize(n);
    buf.qt2.resize(bf16_dots ? Dk / 2 * ldq : 0);
    buf.pt2.resize(bf16_dots ? kBf16BlockK / 2 * ldq : 0);
    return buf;
  }
};

// n rows of keys and values, converted and packed once, in the layout the dot products read.
struct PackedKV {
  std::vector<float> k, v;
  std::vector<uint32_t> k2, v2;
  int64_t n = 0, ldk2 = 0;

  // off_grid: tiles may start anywhere (even) in the rows, at a window's first key, and read on to
  // whole 16-key blocks (K) and 32-key pairs of blocks (V^T): 32 more zero keys.
  template <typename T>
  void pack(const T* ks, int64_t krs, int64_t kcs, const T* vs, int64_t vrs, int64_t vcs, int64_t rows,
            int64_t D, int64_t Dp, bool bf16_dots, bool off_grid = false) {
    n = rows;
    if (bf16_dots) {  // zero keys up to whole tiles, zero head dims up to Dk
      n = round_up(rows + (off_grid && rows > 0 ? 32 : 0), kBf16BlockK);
      ldk2 = round_up(D, kBf16Depth) / 2;
      k2.assign(n * ldk2, 0u);
      pack_pairs_along_rows(ks, krs, kcs, rows, D, k2.data(), ldk2);
      v2.assign(Dp * n / 2, 0u);
      pack_pairs_across_rows(vs, vrs, vcs, rows, D, v2.data(), n / 2);  // V^T
    } else {
      k.resize(n * Dp);
      v.resize(n * Dp);
      pack_rows(ks, krs, kcs, n, D, Dp, k.data());
      pack_rows(vs, vrs, vcs, n, D, Dp, v.data());
    }
  }

  KVRows from(int64_t first, int64_t Dp, bool bf16_dots) const {  // rows from `first` (even) on
    if (bf16_dots) return KVRows{nullptr, 0, nullptr, 0, k2.data() + first * ldk2, v2.data() + first / 2, n / 2};
    return KVRows{k.data() + first * Dp, Dp, v.data() + first * Dp, Dp};
  }
};

template <typename T>
void forward_impl(const AttentionParams& p) {
  const MicroKernels& mk = micro_kernels();
  const int64_t B = p.batch, H = p.heads, Hkv = p.kv_heads, Nq = p.q_len, D = p.head_dim;  // Nq: the longest
  const int64_t Dp = round_up(D, 16), Dk = round_up(D, kBf16Depth), group = H / Hkv;
  const int64_t q_blocks = (Nq + kBlockQ - 1) / kBlockQ;
  // A score tile's columns: kBlockQ queries, or all of a short call's (no work on empty columns).
  const int64_t ldq = std::min<int64_t>(kBlockQ, round_up(std::max<int64_t>(Nq, 1), 16));
  const float qk_scale = p.scale * kLog2e;  // exp(x) = exp2(x * log2 e): fold it into q
  const bool bf16_dots = std::is_same_v<T, c10::BFloat16> && mk.gemm_bf16 != nullptr;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  const int64_t *qs = p.q_stride, *ks = p.k_stride, *vs = p.v_stride, *os = p.o_stride;

  // One query tile of head h against its visible keys; kv(j0, nk) gives the key/value rows.
  const auto query_tile = [&](ForwardBuffers& buf, const SeqInfo& seq, int64_t b, int64_t h, int64_t i0,
                              const auto& kv) {
    if (i0 >= seq.q_len) return;  // past a packed sequence's queries
    const int mq = static_cast<int>(std::min<int64_t>(kBlockQ, seq.q_len - i0));
    const KeyRange keys = visible_keys(p, seq, i0, mq);
    const TileMasker masker{p, seq, b, h, ldq};
    const bool hides = p.causal || p.window_left >= 0 || p.window_right >= 0 || p.mask_kind != MaskKind::kNone ||
                       (p.key_padding != nullptr && p.kv_holes[b]);  // some pair may be hidden
    const T* v_rows = v + b * vs[0] + h / group * vs[1] + seq.k_off * vs[2];
    std::fill(buf.m.begin(), buf.m.end(), kNegInf);
    std::fill(buf.l.begin(), buf.l.end(), 0.f);
    std::fill(buf.acc.begin(), buf.acc.end(), 0.f);
    const T* qh = q + b * qs[0] + h * qs[1] + (seq.q_off + i0) * qs[2];
    if (keys.begin < keys.end) {
      pack_transposed(qh, qs[2], qs[3], mq, D, ldq, buf.qt.data(), qk_scale);
      std::fill(buf.qt.begin() + D * ldq, buf.qt.end(), 0.f);  // head dims D..Dp: the GEMM sums over Dp
      if (bf16_dots) {  // Q^T in pairs along the head dim, zero past D: [Dk / 2][queries]
        mk.pack_pairs_bf16(buf.qt.data(), static_cast<int>(D), ldq, ldq, buf.qt2.data(), ldq);
        std::fill(buf.qt2.begin() + (D + 1) / 2 * ldq, buf.qt2.end(), 0u);
      }
    }
    const int64_t block_k = bf16_dots ? kBf16BlockK : kBlockK;
    for (int64_t j0 = keys.begin; j0 < keys.end; j0 += block_k) {
      const int nk = static_cast<int>(std::min<int64_t>(block_k, keys.end - j0));
      KVRows rows = kv(j0, nk);
      if (bf16_dots)  // whole 16-key blocks: the keys past nk are zero padding or are ignored
        mk.gemm_bf16(round_up(nk, 16), ldq, Dk / 2, rows.k2, Dk / 2, buf.qt2.data(), ldq, buf.s.data(),
                     ldq, false);
      else
        mk.gemm(nk, ldq, Dp, rows.k, rows.ldk, 1, buf.qt.data(), ldq, buf.s.data(), ldq, false);
      masker.apply(buf.s.data(), j0, nk, i0, mq);
      // bf16 products read whole 32-key pairs of blocks of V^T: keys past nk, hidden, may be real ones
      const int64_t read = bf16_dots ? std::min<int64_t>(round_up(nk, 32), seq.key_end - j0) : nk;
      if (hides && non_finite_rows(v_rows + j0 * vs[2], vs[2], vs[3], read, D, buf.bad_key.data())) {
        poison_seen(buf.s.data(), ldq, 1, buf.bad_key.data(), nk, mq);
        rows = buf.with_finite_values(rows, nk, Dp, bf16_dots);
      }
      mk.softmax_step(buf.s.data(), nk, mq, ldq, buf.m.data(), buf.l.data(), buf.alpha.data());
      if (p.dropout_p > 0.f) masker.dropout(buf.s.data(), j0, nk, i0, mq);
      if (bf16_dots) {  // P^T in pairs of keys, zero past nk up to whole 32-key blocks: [keys / 2][queries]
        const int kp = static_cast<int>(round_up(nk, 32) / 2);
        mk.pack_pairs_bf16(buf.s.data(), nk, ldq, ldq, buf.pt2.data(), ldq);
        std::fill(buf.pt2.begin() + (nk + 1) / 2 * ldq, buf.pt2.begin() + kp * ldq, 0u);
        mk.scale_cols(buf.acc.data(), Dp, mq, ldq, buf.alpha.data());
        mk.gemm_bf16(Dp, ldq, kp, rows.v2, rows.ldv2, buf.pt2.data(), ldq, buf.acc.data(), ldq, true);
      } else {
        mk.scale_rows(buf.acc.data(), mq, Dp, Dp, buf.alpha.data());
        mk.gemm(mq, Dp, nk, buf.s.data(), 1, ldq, rows.v, rows.ldv, buf.acc.data(), Dp, true);
      }
    }
    T* o = out + b * os[0] + h * os[1] + (seq.q_off + i0) * os[2];
    float* lse = seq.lse(p, b, h) + i0;
    const int64_t acc_i = bf16_dots ? 1 : Dp, acc_d = bf16_dots ? ldq : 1;  // O^T or O
    const float sink = p.sinks == nullptr ? kNegInf : p.sinks[h] * kLog2e;
    for (int i = 0; i < mq; ++i) {
      float m = buf.m[i], l = buf.l[i], keep = 1.f;
      if (sink > m) {  // the sink joins the denominator, rescaled to the larger of it and the max
        keep = m == kNegInf ? 0.f : std::exp2(m - sink);
        l = l * keep + 1.f;
        m = sink;
      } else if (sink != kNegInf) {  // a sink of -inf is none (not exp2(-inf + inf))
        l += std::exp2(sink - m);
      }
      const bool seen = l != 0.f;  // false: no visible key and no sink, the row is zero; NaN: tainted
      const float inv_l = seen ? keep / l : 0.f;
      for (int64_t d = 0; d < D; ++d)
        o[i * os[2] + d * os[3]] = static_cast<T>(buf.acc[i * acc_i + d * acc_d] * inv_l);
      lse[i] = seen ? m * kLn2 + std::log(l) : kNegInf;
    }
  };

  if (B * Hkv >= 2 * at::get_num_threads()) {
    // Enough kv heads to keep every thread busy: a task is one kv head, whose valid keys and
    // values are converted and packed once (contiguous rows: no cache-set conflicts from long
    // strides) and then serve all its query heads and tiles.
    parallel_dynamic(B * Hkv, [&](const auto& next) {
      const FlushDenormals ftz;
      ForwardBuffers& buf = ForwardBuffers::of_this_thread(Dp, Dk, bf16_dots, ldq);
      PackedKV packed;
      for (int64_t item = next(); item >= 0; item = next()) {
        const int64_t b = item / Hkv, hk = item % Hkv;
        const SeqInfo seq(p, b);
        const int64_t first = seq.k_off + seq.key_begin;
        packed.pack(k + b * ks[0] + hk * ks[1] + first * ks[2], ks[2], ks[3],
                    v + b * vs[0] + hk * vs[1] + first * vs[2], vs[2], vs[3],
                    std::max<int64_t>(seq.key_end - seq.key_begin, 0), D, Dp, bf16_dots, p.window_left >= 0);
        const auto kv = [&](int64_t j0, int) { return packed.from(j0 - seq.key_begin, Dp, bf16_dots); };
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h)
          for (int64_t qb = q_blocks - 1; qb >= 0; --qb) query_tile(buf, seq, b, h, qb * kBlockQ, kv);
      }
    });
    return;
  }
  // Few heads: a task is one (query head, query tile); key/value tiles are packed as they come
  // (fp32 rows with unit stride are read in place), and the last query tiles go first: under
  // causality they cost most.
  parallel_dynamic(B * H * q_blocks, [&](const auto& next) {
    const FlushDenormals ftz;
    ForwardBuffers& buf = ForwardBuffers::of_this_thread(Dp, Dk, bf16_dots, ldq);
    RowTile<T> kt(bf16_dots ? 0 : kBlockK, Dp), vt(bf16_dots ? 0 : kBlockK, Dp);  // fp32 tiles
    PackedKV tile;
    for (int64_t item = next(); item >= 0; item = next()) {
      const int64_t bh = item % (B * H), b = bh / H, h = bh % H, hk = h / group;
      const SeqInfo seq(p, b);
      const auto kv = [&](int64_t j0, int nk) {
        const T* kr = k + b * ks[0] + hk * ks[1] + (seq.k_off + j0) * ks[2];
        const T* vr = v + b * vs[0] + hk * vs[1] + (seq.k_off + j0) * vs[2];
        if (bf16_dots) {
          tile.pack(kr, ks[2], ks[3], vr, vs[2], vs[3], nk, D, Dp, true);
          return tile.from(0, Dp, true);
        }
        kt.load(kr, ks[2], ks[3], nk, D, Dp);
        vt.load(vr, vs[2], vs[3], nk, D, Dp);
        return KVRows{kt.data, kt.ld, vt.data, vt.ld};
      };
      query_tile(buf, seq, b, h, (q_blocks - 1 - item / (B * H)) * kBlockQ, kv);
    }
  });
}

// The backward's bf16 operands, for bf16 dot products: per task, Q^T and dO^T in pairs along the
// head dim ([tile][Dk / 2][kBlockQ], for S^T and dP^T) and Q and dO in pairs of query rows
// ([tile][kBlockQ / 2][Dp], for dK and dV), each tile zero past its queries; dQ accumulates
// transposed, dQ^T += K^T dS^T. Per key tile, K and V as rows of pairs and K^T in pairs of keys.
struct BackwardBf16 {
  std::vector<uint32_t> qt, dot, q, dout, k, v, kt, a, b;
  std::vector<float> dqt;
  BackwardBf16(int64_t Nq_pad, int64_t Dp, int64_t Dk)
      : qt(Nq_pad * Dk / 2), dot(Nq_pad * Dk / 2), q(Nq_pad / 2 * Dp), dout(Nq_pad / 2 * Dp),
        k(kBwdBlockK * Dk / 2), v(kBwdBlockK * Dk / 2), kt(Dp * kBwdBlockK / 2), a(kBwdBlockK * kBlockQ / 2),
        b(kBwdBlockK / 2 * kBlockQ), dqt(Dp * Nq_pad) {}

  // One query tile's four operands from the fp32 ones (qt, dot: [Dp][kBlockQ]; q, dout rows).
  void pack_queries(const MicroKernels& mk, int64_t i0, int mq, int64_t D, int64_t Dp, int64_t Dk,
                    const float* qt_f, const float* dot_f, const float* q_f, const float* do_f) {
    const auto along_d = [&](const float* x, uint32_t* out) {
      mk.pack_pairs_bf16(x, static_cast<int>(D), kBlockQ, kBlockQ, out, kBlockQ);
      std::fill(out + (D + 1) / 2 * kBlockQ, out + Dk / 2 * kBlockQ, 0u);
    };
    const auto across_rows = [&](const float* x, uint32_t* out) {
      mk.pack_pairs_bf16(x, mq, static_cast<int>(Dp), Dp, out, Dp);
      std::fill(out + (mq + 1) / 2 * Dp, out + kBlockQ / 2 * Dp, 0u);
    };
    along_d(qt_f, qt.data() + i0 * Dk / 2);
    along_d(dot_f, dot.data() + i0 * Dk / 2);
    across_rows(q_f, q.data() + i0 / 2 * Dp);
    across_rows(do_f, dout.data() + i0 / 2 * Dp);
  }

  // x's first nk rows and mq columns as the A operand of a product over queries: [keys][pairs].
  const uint32_t* rows_of(const MicroKernels& mk, const float* x, int nk, int mq, int kq) {
    uint16_t* out = reinterpret_cast<uint16_t*>(a.data());
    mk.narrow_bf16(x, nk, mq, kBlockQ, 2 * kq, out, kBlockQ);
    std::fill(out + nk * kBlockQ, out + round_up(nk, 16) * kBlockQ, uint16_t{0});
    return a.data();
  }
};

// Flash-attention-2 backward, one (batch, head) per task: for each key tile, sweep the query
// tiles that can see it, recomputing probabilities from lse. dK/dV accumulate in the key tile,
// dQ in a per-task buffer, so there are no atomics and the result is deterministic. bf16 inputs
// take bf16 dot products where the table has them (BackwardBf16), with the same steps.
template <typename T>
void backward_impl(const AttentionBwdParams& p) {
  const MicroKernels& mk = micro_kernels();
  const int64_t H = p.heads, D = p.head_dim, Dp = round_up(D, 16), Dk = round_up(D, kBf16Depth);
  const bool bf16_dots = std::is_same_v<T, c10::BFloat16> && mk.gemm_bf16 != nullptr;
  const int64_t Nq_pad = round_up(std::max<int64_t>(p.q_len, 1), kBlockQ);  // the longest sequence's
  const int64_t group = p.heads / p.kv_heads;
  const float qk_scale = p.scale * kLog2e;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* out = static_cast<const T*>(p.out);
  const T* dout = static_cast<const T*>(p.dout);
  const int64_t *qs = p.q_stride, *ks = p.k_stride, *vs = p.v_stride, *os = p.o_stride,
                *dos = p.do_stride;

  parallel_dynamic(p.batch * H, [&](const auto& next) {
    const FlushDenormals ftz;
    const int64_t fp32_only = bf16_dots ? 0 : 1;  // sizes the buffers the bf16 dot products do without
    // Whole-head query-side operands, packed once per task: O(Nq * D) memory.
    std::vector<float> qt(Dp * Nq_pad), qr(Nq_pad * Dp), dor(Nq_pad * Dp), dot(Dp * Nq_pad),
        lse2(Nq_pad), delta(Nq_pad), dq(fp32_only * Nq_pad * Dp);
    std::vector<float> kt(fp32_only * kBwdBlockK * Dp), vt(fp32_only * kBwdBlockK * Dp);  // serve every query tile
    constexpr int64_t kTile = kBwdBlockK * kBlockQ;
    std::vector<float> s(kTile), dp(kTile), pd(kTile), keep(kTile), dk(kBwdBlockK * Dp), dv(kBwdBlockK * Dp),
        cap(p.softcap > 0.f ? kTile : 0);
    // Non-finite rows (non_finite.h): per query, dO, tainted (query, dO or lse); per key, key or value.
    std::vector<uint8_t> do_bad(Nq_pad), row_bad(Nq_pad), k_bad(kBwdBlockK), key_bad(kBwdBlockK), seen(kTile);
    std::vector<float> kt_finite;
    std::optional<BackwardBf16> x16;
    if (bf16_dots) x16.emplace(Nq_pad, Dp, Dk);
    for (int64_t bh = next(); bh >= 0; bh = next()) {
      const int64_t b = bh / H, h = bh % H, hk = h / group;
      const SeqInfo seq(p, b);
      const int64_t Nq = seq.q_len, Nk = seq.k_len;
      const KeyRange keys{seq.key_begin, seq.key_end};
      const TileMasker masker{p, seq, b, h};
      const bool hides = p.causal || p.window_left >= 0 || p.window_right >= 0 || p.mask_kind != MaskKind::kNone ||
                         (p.key_padding != nullptr && p.kv_holes[b]);  // some pair may be hidden
      const int64_t kv_at = b * p.dkv_stride[0] + h * p.dkv_stride[1] + seq.k_off * D;
      float* dk_out = p.dk + kv_at;
      float* dv_out = p.dv + kv_at;
      std::fill(dk_out, dk_out + keys.begin * D, 0.f);  // keys no query sees
      std::fill(dk_out + std::max(keys.begin, keys.end) * D, dk_out + Nk * D, 0.f);
      std::fill(dv_out, dv_out + keys.begin * D, 0.f);
      std::fill(dv_out + std::max(keys.begin, keys.end) * D, dv_out + Nk * D, 0.f);
      std::fill(dq.begin(), dq.end(), 0.f);
      if (bf16_dots) std::fill(x16->dqt.begin(), x16->dqt.end(), 0.f);

      if (keys.begin < keys.end) {
        const T* qh = q + b * qs[0] + h * qs[1] + seq.q_off * qs[2];
        const T* doh = dout + b * dos[0] + h * dos[1] + seq.q_off * dos[2];
        const T* oh = out + b * os[0] + h * os[1] + seq.q_off * os[2];
        // Transposed Q and dO per query tile ([tile][Dp][kBlockQ]): a long row stride here would
        // map a GEMM operand's rows onto a few cache sets.
        for (int64_t i0 = 0; i0 < Nq; i0 += kBlockQ) {
          const int64_t mq = std::min<int64_t>(kBlockQ, Nq - i0);
          pack_transposed(qh + i0 * qs[2], qs[2], qs[3], mq, D, kBlockQ, qt.data() + i0 * Dp, qk_scale);
          pack_transposed(doh + i0 * dos[2], dos[2], dos[3], mq, D, kBlockQ, dot.data() + i0 * Dp);
        }
        pack_rows(qh, qs[2], qs[3], Nq, D, Dp, qr.data());
        pack_rows(doh, dos[2], dos[3], Nq, D, Dp, dor.data());
        const float* lse = seq.lse(p, b, h);
        const float* dlse = p.dlse == nullptr ? nullptr : p.dlse + (lse - p.lse);  // lse's layout
        for (int64_t i = 0; i < Nq; ++i) {
          lse2[i] = lse[i] * kLog2e;
          float dot_do_o = 0.f;  // delta = rowsum(dO * O) - dlse, the softmax-backward offset
          for (int64_t d = 0; d < D; ++d)
            dot_do_o += dor[i * Dp + d] * static_cast<float>(oh[i * os[2] + d * os[3]]);
          delta[i] = dot_do_o - (dlse != nullptr && std::isfinite(lse[i]) ? dlse[i] : 0.f);
        }
        if (hides) {  // Q and dO rows as dK's and dV's operands: non-finite elements 0 (P^T and dS^T hide them)
          if (non_finite_rows(qh, qs[2], qs[3], Nq, D, row_bad.data()))
            for (int64_t x = 0; x < Nq * Dp; ++x) qr[x] = finite_or_zero(qr[x]);
          if (non_finite_rows(doh, dos[2], dos[3], Nq, D, do_bad.data()))
            for (int64_t x = 0; x < Nq * Dp; ++x) dor[x] = finite_or_zero(dor[x]);
          for (int64_t i = 0; i < Nq; ++i) row_bad[i] |= do_bad[i] | std::isnan(lse[i]);
        }
        if (bf16_dots)
          for (int64_t i0 = 0; i0 < Nq; i0 += kBlockQ)
            x16->pack_queries(mk, i0, static_cast<int>(std::min<int64_t>(kBlockQ, Nq - i0)), D, Dp, Dk,
                              qt.data() + i0 * Dp, dot.data() + i0 * Dp, qr.data() + i0 * Dp, dor.data() + i0 * Dp);
      }

      for (int64_t j0 = keys.begin; j0 < keys.end; j0 += kBwdBlockK) {
        const int nk = static_cast<int>(std::min<int64_t>(kBwdBlockK, keys.end - j0)), nk16 = round_up(nk, 16);
        const T* kj = k + b * ks[0] + hk * ks[1] + (seq.k_off + j0) * ks[2];
        const T* vj = v + b * vs[0] + hk * vs[1] + (seq.k_off + j0) * vs[2];
        if (bf16_dots) {  // zero past nk keys and D head dims
          std::fill(x16->k.begin(), x16->k.end(), 0u);
          std::fill(x16->v.begin(), x16->v.end(), 0u);
          std::fill(x16->kt.begin(), x16->kt.end(), 0u);
          pack_pairs_along_rows(kj, ks[2], ks[3], nk, D, x16->k.data(), Dk / 2);
          pack_pairs_along_rows(vj, vs[2], vs[3], nk, D, x16->v.data(), Dk / 2);
          pack_pairs_across_rows(kj, ks[2], ks[3], nk, D, x16->kt.data(), kBwdBlockK / 2);
        } else {
          pack_rows(kj, ks[2], ks[3], nk, D, Dp, kt.data());
          pack_rows(vj, vs[2], vs[3], nk, D, Dp, vt.data());
        }
        bool keys_bad = false;
        const float* k_for_dq = kt.data();
        if (hides) {
          const bool k_any = non_finite_rows(kj, ks[2], ks[3], nk, D, k_bad.data());
          keys_bad = non_finite_rows(vj, vs[2], vs[3], nk, D, key_bad.data()) || k_any;
          if (k_any && bf16_dots) {  // K^T, dQ's operand, without them
            for (uint32_t& w : x16->kt) w = finite_pair(w);
          } else if (k_any) {
            k_for_dq = finite_copy(kt.data(), Dp, nk, Dp, kt_finite);
          }
        }
        std::fill(dk.begin(), dk.end(), 0.f);
        std::fill(dv.begin(), dv.end(), 0.f);
        const KeyRange queries = visible_queries(p, seq, j0, nk);
        for (int64_t i0 = queries.begin; i0 < queries.end; i0 += kBlockQ) {
          const int mq = static_cast<int>(std::min<int64_t>(kBlockQ, Nq - i0));
          const int kq = static_cast<int>(round_up(mq, 32) / 2);  // query pairs of the bf16 products
          if (bf16_dots)
            mk.gemm_bf16(nk16, kBlockQ, Dk / 2, x16->k.data(), Dk / 2, x16->qt.data() + i0 * Dk / 2, kBlockQ, s.data(),
                         kBlockQ, false);
          else
            mk.gemm(nk, kBlockQ, Dp, kt.data(), Dp, 1, qt.data() + i0 * Dp, kBlockQ, s.data(), kBlockQ, false);
          masker.apply(s.data(), j0, nk, i0, mq, cap.empty() ? nullptr : cap.data());
          // The exact path where a non-finite row meets this pair of tiles: P and dS set to 0 where
          // hidden (beside a NaN lse, dP or softcap derivative), not multiplied into 0.
          const bool exact = hides && (keys_bad || std::any_of(row_bad.begin() + i0, row_bad.begin() + i0 + mq,
                                                               [](uint8_t x) { return x != 0; }));
          const auto hide = [&](float* x) {
            for (int j = 0; j < nk; ++j)
              for (int i = 0; i < mq; ++i)
                if (!seen[j * kBlockQ + i]) x[j * kBlockQ + i] = 0.f;
          };
          if (exact)
            for (int j = 0; j < nk; ++j)
              for (int i = 0; i < mq; ++i) seen[j * kBlockQ + i] = s[j * kBlockQ + i] != kNegInf;
          mk.exp2_shifted(s.data(), nk, mq, kBlockQ, lse2.data() + i0);  // P^T
          if (exact) hide(s.data());
          if (bf16_dots)
            mk.gemm_bf16(nk16, kBlockQ, Dk / 2, x16->v.data(), Dk / 2, x16->dot.data() + i0 * Dk / 2, kBlockQ,
                         dp.data(), kBlockQ, false);
          else
            mk.gemm(nk, kBlockQ, Dp, vt.data(), Dp, 1, dot.data() + i0 * Dp, kBlockQ, dp.data(), kBlockQ, false);
          float* p_used = s.data();  // the probabilities that multiplied V
          if (p.dropout_p > 0.f) {
            masker.dropout(nullptr, j0, nk, i0, mq, keep.data());
            for (int j = 0; j < nk; ++j)
              for (int i = 0; i < mq; ++i) {
                pd[j * kBlockQ + i] = s[j * kBlockQ + i] * keep[j * kBlockQ + i];
                dp[j * kBlockQ + i] *= keep[j * kBlockQ + i];
              }
            p_used = pd.data();
          }
          if (exact)  // a row whose dO held NaN (0 in dor) still reaches the keys it sees
            for (int j = 0; j < nk; ++j)
              for (int i = 0; i < mq; ++i)
                if (do_bad[i0 + i] && seen[j * kBlockQ + i]) p_used[j * kBlockQ + i] = kNaN;
          if (!bf16_dots) {
            mk.gemm(nk, Dp, mq, p_used, kBlockQ, 1, dor.data() + i0 * Dp, Dp, dv.data(), Dp, true);
            mk.softmax_grad(s.data(), dp.data(), nk, mq, kBlockQ, delta.data() + i0);  // dS^T
            if (!cap.empty()) scale_by(s.data(), cap.data(), nk, mq);  // through the softcap
            if (exact) hide(s.data());
            mk.gemm(nk, Dp, mq, s.data(), kBlockQ, 1, qr.data() + i0 * Dp, Dp, dk.data(), Dp, true);
            mk.gemm(mq, Dp, nk, s.data(), 1, kBlockQ, k_for_dq, Dp, dq.data() + i0 * Dp, Dp, true);
            continue;
          }
          const uint32_t* q_pairs = x16->q.data() + i0 / 2 * Dp;
          const uint32_t* do_pairs = x16->dout.data() + i0 / 2 * Dp;
          mk.gemm_bf16(nk16, Dp, kq, x16->rows_of(mk, p_used, nk, mq, kq), kBlockQ / 2, do_pairs, Dp, dv.data(), Dp,
                       true);
          mk.softmax_grad(s.data(), dp.data(), nk, mq, kBlockQ, delta.data() + i0);  // dS^T
          if (!cap.empty()) scale_by(s.data(), cap.data(), nk, mq);  // through the softcap
          if (exact) hide(s.data());
          mk.gemm_bf16(nk16, Dp, kq, x16->rows_of(mk, s.data(), nk, mq, kq), kBlockQ / 2, q_pairs, Dp, dk.data(), Dp,
                       true);
          const int kk = static_cast<int>(round_up(nk, 32) / 2);  // dQ^T += K^T dS^T, over key pairs
          mk.pack_pairs_bf16(s.data(), nk, kBlockQ, kBlockQ, x16->b.data(), kBlockQ);
          std::fill(x16->b.begin() + (nk + 1) / 2 * kBlockQ, x16->b.begin() + kk * kBlockQ, 0u);
          mk.gemm_bf16(static_cast<int>(Dp), kBlockQ, kk, x16->kt.data(), kBwdBlockK / 2, x16->b.data(), kBlockQ,
                       x16->dqt.data() + i0, Nq_pad, true);
        }
        for (int j = 0; j < nk; ++j)
          for (int64_t d = 0; d < D; ++d) {
            dk_out[(j0 + j) * D + d] = dk[j * Dp + d] * p.scale;
            dv_out[(j0 + j) * D + d] = dv[j * Dp + d];
          }
      }
      float* dq_out = p.dq + b * p.dq_stride[0] + h * p.dq_stride[1] + seq.q_off * D;
      const float* dq_acc = bf16_dots ? x16->dqt.data() : dq.data();  // dQ^T or dQ
      const int64_t dq_i = bf16_dots ? 1 : Dp, dq_d = bf16_dots ? Nq_pad : 1;
      for (int64_t i = 0; i < Nq; ++i)
        for (int64_t d = 0; d < D; ++d) dq_out[i * D + d] = dq_acc[i * dq_i + d * dq_d] * p.scale;
    }
  });
}

}  // namespace

void forward(const AttentionParams& p) {
  with_dtype(p.dtype, [&](auto element) { forward_impl<decltype(element)>(p); });
}

void backward(const AttentionBwdParams& p) {
  with_dtype(p.dtype, [&](auto element) { backward_impl<decltype(element)>(p); });
}

}  // namespace fastattn::cpu
