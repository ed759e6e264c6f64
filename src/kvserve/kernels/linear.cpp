// kvserve's CPU matrix products (kernels/__init__.py builds this file, with fused.cpp, once per ISA:
// AVX2+FMA+F16C, and AVX-512 (F/BW/VL) with VNNI where the CPU has it).
//
// q_linear: out [M, N] = x [M, K] @ W^T (+ bias) for a weight W [N, K] kept quantized
// (models/quantized.py packs it once at load, from GGUF blocks or by int8 quantization):
//   codes   [N, K/2] uint8 for 4-bit codes: in each block of 32 elements, byte j holds element j
//           in its low nibble and element j + 16 in its high nibble (GGML's Q4_0/Q4_1 order);
//           or [N, K] int8 for 8-bit codes.
//   scales  [N, K/G] fp16, G = 32 or 16 (Q6_K's sub-blocks).
//   mins    [N, K/32] fp16 (always per 32 elements), or empty: w = scale * code + min.
// Each row of x is quantized once per product to int16 in blocks of 32 (one fp32 scale each, plus the
// block's exact fp32 sum for the mins), and each weight block meets it in an integer dot product:
//   sum_i w_i x_i ~= scale * d * sum_i code_i q_i + min * sum_i x_i
// A register tile of up to four weight rows x four rows of x shares each unpacked weight block and each
// loaded block of x (tile_kernel); the integer path is for a few rows of x (3 or 4, kDefaultIntRows).
// Past `max_int_rows` rows of x (prefill chunks, large decode batches) the product is compute-bound,
// and a blocked path takes over, where a panel of weight rows is prepared into a buffer that stays in
// cache and every row of x meets it: integer panels (int_panel_product: the codes widened to int16, the
// same integer products as above, 16 outputs per instruction on AVX-512 builds, 8 on AVX2 builds).
//
// f32_linear: the same product for a plain fp32 weight: few rows of x take dot products, where BLAS's
// matrix-vector path reads the weight at a fraction of the memory's speed (PEERS.md); many take the
// same panels, which beat BLAS's sgemm at the row counts a serving step has.
//
// Threads: at::parallel_for over output rows (OpenMP, one thread per core).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "check.h"
#include "line_vector.h"

namespace {

constexpr int64_t kBlock = 32;     // elements per activation block and per code block
constexpr int kTile = 4;           // rows of x per register tile
// Activation codes: int16 (|code| <= 32767; with |w| <= 128 a block's sum stays far inside int32).
// int8 activations (llama.cpp's Q8 scheme) miss the 99% top-1 agreement with the fp32 model
// over 1,000 tokens: 92.7% with the mins against x's exact block sums, 98.3% (perplexity -0.13%)
// against the rounded x's sums (benchmarks/avx512_int8_panels.patch: 1.3x the 32-at-once workload on
// AVX-512 VNNI). int16 costs the same instructions per block on AVX2 (two madd_epi16 instead of
// maddubs + madd) and matches fp32.
constexpr float kActMax = 32767.0f;

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// x [32] fp32 -> q [32] int16 with x ~= d * q; returns d, and the exact sum of x in *sum.
inline float quantize_block(const float* x, int16_t* q, float* sum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[4];
  __m256 amax = _mm256_setzero_ps(), total = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
    total = _mm256_add_ps(total, v[i]);
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float max_abs = _mm_cvtss_f32(m);
  *sum = hsum(total);
  const float d = max_abs / kActMax;
  const __m256 inv = _mm256_set1_ps(max_abs > 0.0f ? kActMax / max_abs : 0.0f);
  for (int i = 0; i < 2; ++i) {
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * i], inv));  // rounds to nearest
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * i + 1], inv));
    // packs works within 128-bit lanes (a0-3 b0-3 a4-7 b4-7): the 64-bit permute restores the order
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16 * i), packed);
  }
  return d;
}

// Activations of one product, quantized: per row of x, K int16 codes, and per block its scale and sum.
struct QuantizedActs {
  LineVector<int16_t> codes;
  LineVector<float> scales, sums;
  LineVector<float> scales16;  // each block's scale twice: per 16 elements, for weights with 16-element groups
  void build(const float* x, int64_t rows, int64_t k, bool group16) {
    const int64_t nb = k / kBlock;
    codes.resize(rows * k);
    scales.resize(rows * nb);
    sums.resize(rows * nb);
    at::parallel_for(0, rows * nb, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / nb, b = i % nb;
        scales[i] = quantize_block(x + r * k + b * kBlock, codes.data() + r * k + b * kBlock, &sums[i]);
      }
    });
    if (group16) {
      scales16.resize(2 * rows * nb);
      for (int64_t i = 0; i < rows * nb; ++i) scales16[2 * i] = scales16[2 * i + 1] = scales[i];
    }
  }
};

struct PackedWeight {
  const uint8_t* codes;
  const uint16_t* scales;
  const uint16_t* mins;  // nullptr: no mins
  int64_t row_bytes, scales_per_row, blocks;
};

// One block of 32 int16 codes (a weight row's, or a row of x's), and its dot products, in the widest
// registers the build has. AVX-512: one 32-lane vector, and one multiply-add instruction per block
// pair (VNNI's dpwssd, or madd); AVX2: two 16-lane halves, elements 0-15 in lo, 16-31 in hi.
#if defined(__AVX512BW__)
struct Codes {
  __m512i v;
};
using BlockAcc = __m512;  // per block: 16 int32 sums of pairs, lanes 0-7 from elements 0-15, 8-15 from 16-31
inline BlockAcc acc_zero() { return _mm512_setzero_ps(); }
inline float acc_sum(BlockAcc a) { return _mm512_reduce_add_ps(a); }

// Block b of a weight row. A 4-bit block's 16 bytes are loaded twice into 32 16-bit lanes; the first
// 16 keep the low nibbles (elements 0-15), the last 16 the high ones (elements 16-31).
template <int Bits>
inline Codes load_codes(const uint8_t* codes, int64_t b) {
  if constexpr (Bits == 4) {
    const __m256i twice = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + b * 16)));
    const __m512i wide = _mm512_cvtepu8_epi16(twice);
    const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    return {_mm512_and_si512(_mm512_srlv_epi16(wide, shift), _mm512_set1_epi16(0x0F))};
  } else {
    return {_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + b * kBlock)))};
  }
}
inline Codes load_x(const int16_t* x) { return {_mm512_loadu_si512(x)}; }

// acc + dot(w, x) x scale: one scale for the block, or (Group16) s_lo for elements 0-15, s_hi for 16-31.
template <bool Group16>
inline BlockAcc fold(Codes w, Codes x, float s_lo, float s_hi, BlockAcc acc) {
#if defined(__AVX512VNNI__)
  const __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w.v, x.v);
#else
  const __m512i dot = _mm512_madd_epi16(w.v, x.v);
#endif
  const __m512 scale =
      Group16 ? _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s_lo), _mm512_set1_ps(s_hi)) : _mm512_set1_ps(s_lo);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc);
}
#else
struct Codes {
  __m256i lo, hi;
};
using BlockAcc = __m256;
inline BlockAcc acc_zero() { return _mm256_setzero_ps(); }
inline float acc_sum(BlockAcc a) { return hsum(a); }

// Block b of a weight row. A 4-bit block's 16 bytes are widened to 16-bit lanes as they load; each
// lane's low nibble is element j, its high one j + 16.
template <int Bits>
inline Codes load_codes(const uint8_t* codes, int64_t b) {
  if constexpr (Bits == 4) {
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + b * 16)));
    return {_mm256_and_si256(bytes, _mm256_set1_epi16(0x0F)), _mm256_srli_epi16(bytes, 4)};
  } else {
    return {_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + b * kBlock))),
            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + b * kBlock + 16)))};
  }
}
inline Codes load_x(const int16_t* x) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))};
}

// 8 int32 lanes, each the sum of two products w * x (16 int16 of each).
inline __m256i dot_i16(__m256i w, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpwssd_epi32(_mm256_setzero_si256(), w, x);
#else
  return _mm256_madd_epi16(w, x);
#endif
}

template <bool Group16>
inline BlockAcc fold(Codes w, Codes x, float s_lo, float s_hi, BlockAcc acc) {
  const __m256i dot_lo = dot_i16(w.lo, x.lo), dot_hi = dot_i16(w.hi, x.hi);
  if constexpr (Group16) {
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_lo), _mm256_set1_ps(s_lo), acc);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_hi), _mm256_set1_ps(s_hi), acc);
  }
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(dot_lo, dot_hi)), _mm256_set1_ps(s_lo), acc);
}
#endif

// 8 float16 at src (only the first `count` <= 8 read; the rest are zeros) -> fp32.
inline __m256 load_halves(const uint16_t* src, int64_t count) {
  if (count >= 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  uint16_t padded[8] = {};
  std::memcpy(padded, src, count * sizeof(uint16_t));
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(padded)));
}

// dst[j] = src[j] (float16) x (by ? by[j] : 1), for j < n; 8 at a time, the last few one by one.
inline void widen_scales(const uint16_t* src, int64_t n, const float* by, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    if (by) v = _mm256_mul_ps(v, _mm256_loadu_ps(by + i));
    _mm256_storeu_ps(dst + i, v);
  }
  for (; i < n; ++i) dst[i] = half_to_float(src[i]) * (by ? by[i] : 1.0f);
}

// sum_b mins[b] * sums[b]: a row's mins (float16) against one row of x's block sums.
inline float dot_mins(const uint16_t* mins, const float* sums, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(load_halves(mins + i, 8), _mm256_loadu_ps(sums + i), acc);
  float total = hsum(acc);
  for (; i < n; ++i) total += half_to_float(mins[i]) * sums[i];
  return total;
}

// R weight rows from n0 against C rows of x from `first`: out[r][t] = sum over K of w[n0 + r] * x[first + t].
// Each weight block is unpacked once and meets the C rows of x; each block of x is loaded once and meets
// the R weight rows; the R x C accumulators are independent chains. The weight rows' scales are widened
// to fp32 once (into `scratch`, R x scales_per_row), and the mins meet x's block sums after the loop.
template <int Bits, bool Group16, bool Mins, int R, int C>
inline void tile_kernel(const PackedWeight& w, int64_t n0, const QuantizedActs& acts, int64_t first, int64_t k,
                        float* scratch, float (&out)[R][C]) {
  const int64_t nb = w.blocks, ns = w.scales_per_row;
  const uint8_t* codes[R];
  const float* scales[R];
  const float* xd = acts.scales.data() + first * nb;
  for (int r = 0; r < R; ++r) {
    codes[r] = w.codes + (n0 + r) * w.row_bytes;
    float* widened = scratch + r * ns;
    // One row of x: its block scales fold into the weight's (x's scale per 16 elements for Group16).
    widen_scales(w.scales + (n0 + r) * ns, ns, C == 1 ? (Group16 ? acts.scales16.data() + first * ns : xd) : nullptr,
                 widened);
    scales[r] = widened;
  }
  BlockAcc acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < C; ++t) acc[r][t] = acc_zero();
  const int16_t* xq = acts.codes.data() + first * k;
  for (int64_t b = 0; b < nb; ++b) {
    Codes wb[R];
    for (int r = 0; r < R; ++r) {
      // The rows two tiles ahead, from memory into L2 while this tile computes: a weight larger than the
      // caches (the LM head) is otherwise read at half the memory's speed.
      // (measured on the Q8_0 LM head at one row of x: 8 -> 14 GB/s; the fp32 product's single stream
      // gains nothing from it)
      if constexpr (C <= 2)
        _mm_prefetch(reinterpret_cast<const char*>(codes[r] + 2 * R * w.row_bytes) + b * (Bits * 4), _MM_HINT_T1);
      wb[r] = load_codes<Bits>(codes[r], b);
    }
    for (int t = 0; t < C; ++t) {
      const Codes xb = load_x(xq + t * k + b * kBlock);
      const float d = C == 1 ? 1.0f : xd[t * nb + b];  // folded into the scales when C == 1
      for (int r = 0; r < R; ++r) {
        if constexpr (Group16)
          acc[r][t] = fold<true>(wb[r], xb, scales[r][2 * b] * d, scales[r][2 * b + 1] * d, acc[r][t]);
        else
          acc[r][t] = fold<false>(wb[r], xb, scales[r][b] * d, 0.0f, acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < C; ++t) {
      out[r][t] = acc_sum(acc[r][t]);
      if constexpr (Mins) out[r][t] += dot_mins(w.mins + (n0 + r) * nb, acts.sums.data() + (first + t) * nb, nb);
    }
}

// Rows [n0, n0 + R) x rows [first, first + C) of x into out (+ bias).
template <int Bits, bool Group16, bool Mins, int R, int C>
inline void run_tile(const PackedWeight& w, int64_t n0, const QuantizedActs& acts, int64_t first, int64_t k,
                     int64_t n_rows, const float* bias, float* scratch, float* out) {
  float tile[R][C];
  tile_kernel<Bits, Group16, Mins, R, C>(w, n0, acts, first, k, scratch, tile);
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < C; ++t) out[(first + t) * n_rows + n0 + r] = tile[r][t] + (bias ? bias[n0 + r] : 0.0f);
}

// Weight rows [n0, n0 + R) against every row of x, four rows of x at a time: the R rows' codes stay in
// L1 while x passes (x's codes, M x K int16, stay in L1/L2), so the weight is read from memory once.
template <int Bits, bool Group16, bool Mins, int R>
void row_group(const PackedWeight& w, int64_t n0, const QuantizedActs& acts, int64_t m, int64_t k, int64_t n_rows,
               const float* bias, float* scratch, float* out) {
  int64_t t = 0;
  for (; t + kTile <= m; t += kTile)
    run_tile<Bits, Group16, Mins, R, kTile>(w, n0, acts, t, k, n_rows, bias, scratch, out);
  const int64_t rest = m - t;
  if (rest == 3) run_tile<Bits, Group16, Mins, R, 3>(w, n0, acts, t, k, n_rows, bias, scratch, out);
  if (rest == 2) run_tile<Bits, Group16, Mins, R, 2>(w, n0, acts, t, k, n_rows, bias, scratch, out);
  if (rest == 1) run_tile<Bits, Group16, Mins, R, 1>(w, n0, acts, t, k, n_rows, bias, scratch, out);
}

template <int Bits, bool Group16, bool Mins>
void q_linear_impl(const PackedWeight& w, const QuantizedActs& acts, int64_t m, int64_t n_rows, int64_t k,
                   const float* bias, float* out) {
  // Grain: at least 8 output rows per task; ATen splits the range into one chunk per thread. Four weight
  // rows per register tile for one or two rows of x (decode batches: more independent chains), else two.
  at::parallel_for(0, n_rows, 8, [&](int64_t begin, int64_t end) {
    thread_local LineVector<float> scratch;
    scratch.resize(4 * w.scales_per_row);
    float* s = scratch.data();
    int64_t n = begin;
    if (m <= 2)
      for (; n + 4 <= end; n += 4) row_group<Bits, Group16, Mins, 4>(w, n, acts, m, k, n_rows, bias, s, out);
    else
      for (; n + 2 <= end; n += 2) row_group<Bits, Group16, Mins, 2>(w, n, acts, m, k, n_rows, bias, s, out);
    for (; n < end; ++n) row_group<Bits, Group16, Mins, 1>(w, n, acts, m, k, n_rows, bias, s, out);
  });
}

// ---- The blocked path for fp32 weights: many rows of x (prefill chunks, large decode batches), where
// the product is compute-bound. A panel of kPanel weight rows is transposed into a [K][kPanel] buffer
// that stays in L1/L2, so one k's kPanel weights are three vectors. Every row of x then meets the panel
// in a register tile of up to kPanelRows rows x kPanel outputs (x broadcast one element at a time), and
// the result is stored as vectors. The transpose is paid once per panel per chunk of x, ~1/M of the
// multiply-adds. Measured on the AVX2 kind (benchmarks/README.md): 1.3-1.4x BLAS (MKL's sgemm) at
// M = 32, 1.1x at 512. Quantized weights take the integer panels below, which share this blocking.

#if defined(__AVX512F__)
// 32 vector registers: a tile of 8 rows of x x 48 outputs (24 accumulators, three weight vectors, the
// broadcast x folded into the multiply-add as a memory operand).
constexpr int64_t kPanel = 48;  // weight rows per panel: three 16-float vectors
constexpr int kPanelRows = 8;   // rows of x per register tile
using PanelVec = __m512;
inline PanelVec panel_load(const float* p) { return _mm512_loadu_ps(p); }
inline PanelVec panel_broadcast(const float* p) { return _mm512_set1_ps(*p); }
inline PanelVec panel_fma(PanelVec a, PanelVec b, PanelVec c) { return _mm512_fmadd_ps(a, b, c); }
inline void panel_store(float* p, PanelVec v) { _mm512_storeu_ps(p, v); }
inline PanelVec panel_zero() { return _mm512_setzero_ps(); }
inline PanelVec panel_add(PanelVec a, PanelVec b) { return _mm512_add_ps(a, b); }
#else
// 16 vector registers: 4 rows of x x 24 outputs (12 accumulators, three weight vectors, one broadcast).
constexpr int64_t kPanel = 24;  // weight rows per panel: three 8-float vectors
constexpr int kPanelRows = 4;
using PanelVec = __m256;
inline PanelVec panel_load(const float* p) { return _mm256_loadu_ps(p); }
inline PanelVec panel_broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline PanelVec panel_fma(PanelVec a, PanelVec b, PanelVec c) { return _mm256_fmadd_ps(a, b, c); }
inline void panel_store(float* p, PanelVec v) { _mm256_storeu_ps(p, v); }
inline PanelVec panel_zero() { return _mm256_setzero_ps(); }
inline PanelVec panel_add(PanelVec a, PanelVec b) { return _mm256_add_ps(a, b); }
#endif
constexpr int64_t kLanes = kPanel / 3;      // floats per vector
constexpr int64_t kChunkBytes = 256 << 10;  // rows of x per pass: about half an L2, read once per panel

// Eight rows of eight 32-bit values in registers -> their columns at dst, ldd apart (dst[c * ldd + r] = r[r][c]).
inline void transpose8_store(const __m256 (&r)[8], float* dst, int64_t ldd) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // t0 = a0 b0 a1 b1 | a4 b4 a5 b5, t2 = c0 d0 c1 d1 | ...: shuffles pair them into a b c d quads
  const __m256 s0 = _mm256_shuffle_ps(t[0], t[2], 0x44), s1 = _mm256_shuffle_ps(t[0], t[2], 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t[1], t[3], 0x44), s3 = _mm256_shuffle_ps(t[1], t[3], 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t[4], t[6], 0x44), s5 = _mm256_shuffle_ps(t[4], t[6], 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t[5], t[7], 0x44), s7 = _mm256_shuffle_ps(t[5], t[7], 0xEE);
  const __m256 quads[8] = {s0, s1, s2, s3, s4, s5, s6, s7};
  for (int i = 0; i < 4; ++i) {  // the low halves hold columns 0-3, the high halves columns 4-7
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(quads[i], quads[4 + i], 0x20));
    _mm256_storeu_ps(dst + (4 + i) * ldd, _mm256_permute2f128_ps(quads[i], quads[4 + i], 0x31));
  }
}

// A 8 x 8 block: dst[c * ldd + r] = src[r * lds + c].
inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  transpose8_store(r, dst, ldd);
}

// rows [kPanel][k] (row stride lds) -> panel [k][kPanel].
inline void transpose_panel(const float* rows, int64_t lds, int64_t k, float* panel) {
  int64_t c = 0;
  for (; c + 8 <= k; c += 8)
    for (int64_t r = 0; r < kPanel; r += 8) transpose8(rows + r * lds + c, lds, panel + c * kPanel + r, kPanel);
  for (; c < k; ++c)
    for (int64_t r = 0; r < kPanel; ++r) panel[c * kPanel + r] = rows[r * lds + c];
}

// R rows of x (row stride ldx) against `depth` of a panel's k steps -> out[t][0..kPanel) for t < R
// (row stride ldo), added to what out holds when `accumulate`, else written.
template <int R>
inline void panel_tile(const float* panel, const float* x, int64_t ldx, int64_t depth, float* out, int64_t ldo,
                       bool accumulate) {
  // The sums start at zero and meet out's only at the end: started from out (a load or a zero chosen at
  // run time), GCC kept a stack copy of every accumulator and stored it each step (2x slower, AVX2 build).
  PanelVec acc[R][3];
#pragma GCC unroll 8
  for (int t = 0; t < R; ++t)
    for (int j = 0; j < 3; ++j) acc[t][j] = panel_zero();
  for (int64_t c = 0; c < depth; ++c) {
    const float* p = panel + c * kPanel;
    const PanelVec w0 = panel_load(p), w1 = panel_load(p + kLanes), w2 = panel_load(p + 2 * kLanes);
#pragma GCC unroll 8
    for (int t = 0; t < R; ++t) {
      const PanelVec v = panel_broadcast(x + t * ldx + c);
      acc[t][0] = panel_fma(v, w0, acc[t][0]);
      acc[t][1] = panel_fma(v, w1, acc[t][1]);
      acc[t][2] = panel_fma(v, w2, acc[t][2]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < R; ++t)
    for (int j = 0; j < 3; ++j) {
      float* o = out + t * ldo + kLanes * j;
      panel_store(o, accumulate ? panel_add(acc[t][j], panel_load(o)) : acc[t][j]);
    }
}

// panel_tile for the r (1..kPanelRows) rows of x left: one instantiation per count.
template <int R = kPanelRows>
inline void panel_tile_rows(int64_t r, const float* panel, const float* x, int64_t ldx, int64_t depth, float* out,
                            int64_t ldo, bool accumulate) {
  if constexpr (R >= 1) {
    if (r == R) panel_tile<R>(panel, x, ldx, depth, out, ldo, accumulate);
    else panel_tile_rows<R - 1>(r, panel, x, ldx, depth, out, ldo, accumulate);
  }
}

// A panel's outputs for `rows` rows of out (row stride n) at columns [n0, n0 + valid): copied from
// `staged` ([rows][kPanel], a partial last panel's) unless the tiles wrote out directly (staged null),
// then the bias added.
inline void finish_panel(float* out, int64_t n, const float* staged, int64_t rows, int64_t n0, int64_t valid,
                         const float* bias) {
  for (int64_t i = 0; i < rows; ++i) {
    float* o = out + i * n + n0;
    if (staged) std::memcpy(o, staged + i * kPanel, valid * sizeof(float));
    if (bias)
      for (int64_t j = 0; j < valid; ++j) o[j] += bias[n0 + j];
  }
}

// Each panel is taken kDepth k steps at a time, every row tile in turn, so that slice (24 KiB) stays in
// L1 while all the rows of x meet it; a tile's sums go to out between slices. (Without the slices a
// K = 1536 panel is 288 KiB, read from L2 once per row tile: measured 40-70 GMAC/s against 100+.)
constexpr int64_t kDepth = (24 << 10) / (kPanel * 4);

// out [M, N] (+ bias) = x [M, K] @ W^T for a dense fp32 weight W [N, K].
void panel_product(const float* x, int64_t m, int64_t k, int64_t n, const float* weight, const float* bias, float* out) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const int64_t chunk = std::max<int64_t>(kPanelRows, kChunkBytes / (k * 4) / kPanelRows * kPanelRows);
  for (int64_t m0 = 0; m0 < m; m0 += chunk) {
    const int64_t rows_x = std::min(chunk, m - m0);
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      thread_local LineVector<float> scratch, panel, staged;
      scratch.resize(kPanel * k);
      panel.resize(kPanel * k);
      staged.resize(rows_x * kPanel);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n0 = p * kPanel, valid = std::min(kPanel, n - n0);
        const float* rows = weight + n0 * k;
        if (valid < kPanel) {  // the last panel: missing rows are zeros
          std::memcpy(scratch.data(), rows, valid * k * sizeof(float));
          std::fill(scratch.begin() + valid * k, scratch.end(), 0.0f);
          rows = scratch.data();
        }
        transpose_panel(rows, k, k, panel.data());
        const bool direct = valid == kPanel;  // else the outputs go to `staged`, and the valid columns to out
        float* dst = direct ? out + m0 * n + n0 : staged.data();
        const int64_t ldo = direct ? n : kPanel;
        for (int64_t c0 = 0; c0 < k; c0 += kDepth)
          for (int64_t t = 0; t < rows_x; t += kPanelRows)
            panel_tile_rows(std::min<int64_t>(kPanelRows, rows_x - t), panel.data() + c0 * kPanel,
                            x + (m0 + t) * k + c0, k, std::min(kDepth, k - c0), dst + t * ldo, ldo, c0 > 0);
        finish_panel(out + m0 * n, n, direct ? nullptr : staged.data(), rows_x, n0, valid, bias);
      }
    });
  }
}

// ---- Integer panels: the panels' blocking with the integer path's arithmetic, for many rows of x on
// quantized weights (both builds). x is quantized to int16 blocks as for the integer path; a panel
// holds kPanel weight rows' codes widened to int16, as pairs (w[2c], w[2c + 1]) in 32-bit units
// transposed to [K/2][kPanel], with their scales (and mins) transposed to [groups][kPanel] fp32. One
// multiply-add of int16 pairs (AVX-512: dpwssd, or madd without VNNI, 16 outputs; AVX2: madd + add, 8
// outputs) broadcasts a pair of x's codes against the outputs' pairs, into int32 lanes: exact within a
// scale group, which is then converted once and scaled by the weight scales x x's block scale. The
// row-wise integer path converts and scales each (weight row, x row) pair per block instead: a
// conversion per 16 multiply-adds rather than per 16 x rows, which is why it stops at a few rows. Same
// products as the integer path, so the same accuracy (exact integer sums; x's int16 rounding).
// On AVX2 this replaced fp32 panels over the dequantized weight: a madd does 16 multiply-adds, an FMA 8,
// but on AMD Zen 4 (measured, AVX2 code) it issues once a cycle where the FMA issues twice, so the gain
// is not in the arithmetic: the panel holds int16 instead of fp32 (half the bytes to write and read),
// and the dequantizing is gone. Whole products, AVX2 build: 1.3x at 16-32 rows of x, 1.2x at 512.

// Rows [n0, n0 + valid) of the weight as a panel of int16 pairs, [K/2][kPanel] 32-bit units (rows past
// `valid` zeros): unit (c, j) holds row j's elements 2c (low half) and 2c + 1. Eight rows at a time, a
// block's 32 codes per row widen to two vectors of eight units (4-bit: the low nibbles of its 16 bytes
// are elements 0-15, the high ones 16-31), and each vector's 8 x 8 units are transposed in registers
// to the panel: no int16 copy of the rows is written and read back. The next eight rows (of this panel
// or of the next one, the same thread's) are prefetched a cache line at a time as these are read: a
// weight that does not stay in the caches (the LM head) is otherwise read at memory latency.
template <int Bits>
inline void pack_pairs(const PackedWeight& w, int64_t n0, int64_t valid, int64_t n_rows, int32_t* pairs) {
  float* dst = reinterpret_cast<float*>(pairs);  // 32-bit units moved by the float transpose, bits unchanged
  constexpr int64_t block_bytes = Bits * 4;    // 16 or 32 bytes of codes per 32-element block
  for (int64_t r0 = 0; r0 < kPanel; r0 += 8)
    for (int64_t b = 0; b < w.blocks; ++b) {
      const bool line_start = (b * block_bytes) % 64 == 0;
      __m256 lo[8], hi[8];  // per row: units 0-7 (elements 0-15) and 8-15 (elements 16-31) of block b
      for (int r = 0; r < 8; ++r) {
        __m256i first = _mm256_setzero_si256(), second = _mm256_setzero_si256();
        if (line_start && n0 + r0 + r + 8 < n_rows)
          _mm_prefetch(reinterpret_cast<const char*>(w.codes + (n0 + r0 + r + 8) * w.row_bytes + b * block_bytes),
                       _MM_HINT_T0);
        if (r0 + r < valid) {
          const uint8_t* codes = w.codes + (n0 + r0 + r) * w.row_bytes;
          if constexpr (Bits == 4) {
            const __m256i bytes =
                _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + b * 16)));
            first = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F));
            second = _mm256_srli_epi16(bytes, 4);
          } else {
            first = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + b * kBlock)));
            second = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + b * kBlock + 16)));
          }
        }
        lo[r] = _mm256_castsi256_ps(first);
        hi[r] = _mm256_castsi256_ps(second);
      }
      transpose8_store(lo, dst + (b * 16) * kPanel + r0, kPanel);
      transpose8_store(hi, dst + (b * 16 + 8) * kPanel + r0, kPanel);
    }
}

// The integer panels' vectors: kLanes int32 sums (IVec) and their fp32 scaling (PanelVec).
#if defined(__AVX512BW__)
using IVec = __m512i;
constexpr int kIntPanelRows = 4;  // rows of x per tile: 12 int32 sums + 3 weight vectors + the broadcast
inline IVec ivec_zero() { return _mm512_setzero_si512(); }
inline IVec ivec_load(const int32_t* p) { return _mm512_loadu_si512(p); }
inline IVec ivec_set1(int32_t v) { return _mm512_set1_epi32(v); }
inline PanelVec ivec_to_float(IVec v) { return _mm512_cvtepi32_ps(v); }
inline PanelVec panel_set1(float v) { return _mm512_set1_ps(v); }
inline PanelVec panel_mul(PanelVec a, PanelVec b) { return _mm512_mul_ps(a, b); }
inline IVec dot_pairs(IVec acc, IVec w, IVec x) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, w, x);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}
#else
using IVec = __m256i;
// 16 registers: 9 int32 sums + 3 weight vectors + the broadcast + the products before they are added.
constexpr int kIntPanelRows = 3;
inline IVec ivec_zero() { return _mm256_setzero_si256(); }
inline IVec ivec_load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline IVec ivec_set1(int32_t v) { return _mm256_set1_epi32(v); }
inline PanelVec ivec_to_float(IVec v) { return _mm256_cvtepi32_ps(v); }
inline PanelVec panel_set1(float v) { return _mm256_set1_ps(v); }
inline PanelVec panel_mul(PanelVec a, PanelVec b) { return _mm256_mul_ps(a, b); }
inline IVec dot_pairs(IVec acc, IVec w, IVec x) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x)); }
#endif

// R rows of x against `blocks` 32-element blocks of an integer panel (pairs, scales, mins from the
// slice's first block) -> out[t][0..kPanel), added to out when `accumulate`.
//   xq: x's codes at the slice's first element (row stride ldx); xd, xs: x's block scales and sums at
//   the slice's first block (row stride nbx).
// Registers hold the R x 3 int32 sums of one scale group, the three weight vectors and the broadcast;
// the fp32 sums live in out (L1) and are loaded and stored once per group, the mins' term with the
// block's last group: keeping them in registers too (AVX-512, R = 4) left the compiler copying and
// reloading vectors every pair.
template <bool Group16, bool Mins, int R>
inline void int_panel_tile(const int32_t* pairs, const float* scales, const float* mins, const int16_t* xq, int64_t ldx,
                           const float* xd, const float* xs, int64_t nbx, int64_t blocks, float* out, int64_t ldo,
                           bool accumulate) {
  constexpr int groups = Group16 ? 2 : 1;  // scale groups per block
  constexpr int64_t group_pairs = kBlock / 2 / groups;
  if (!accumulate)
    for (int t = 0; t < R; ++t) std::fill(out + t * ldo, out + t * ldo + kPanel, 0.0f);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int g = 0; g < groups; ++g) {
      IVec sum[R][3];
      for (int t = 0; t < R; ++t)
        for (int j = 0; j < 3; ++j) sum[t][j] = ivec_zero();
      const int64_t c0 = b * (kBlock / 2) + g * group_pairs;  // this group's first pair
      // A constant trip count, unrolled: the sums stay put (rolled, or with a remainder to handle, GCC
      // copies each of them to the stack every pair).
#pragma GCC unroll 4
      for (int i = 0; i < group_pairs; ++i) {
        const int64_t c = c0 + i;
        const int32_t* p = pairs + c * kPanel;
        const IVec w0 = ivec_load(p), w1 = ivec_load(p + kLanes), w2 = ivec_load(p + 2 * kLanes);
        for (int t = 0; t < R; ++t) {
          int32_t pair;
          std::memcpy(&pair, xq + t * ldx + 2 * c, 4);
          const IVec v = ivec_set1(pair);
          sum[t][0] = dot_pairs(sum[t][0], w0, v);
          sum[t][1] = dot_pairs(sum[t][1], w1, v);
          sum[t][2] = dot_pairs(sum[t][2], w2, v);
        }
      }
      const float* sg = scales + (b * groups + g) * kPanel;
      const bool with_mins = Mins && g == groups - 1;
      for (int t = 0; t < R; ++t) {
        const PanelVec d = panel_set1(xd[t * nbx + b]);
        const PanelVec total = panel_set1(with_mins ? xs[t * nbx + b] : 0.0f);
        for (int j = 0; j < 3; ++j) {
          float* o = out + t * ldo + kLanes * j;
          PanelVec acc = panel_load(o);
          if (with_mins) acc = panel_fma(panel_load(mins + b * kPanel + kLanes * j), total, acc);
          const PanelVec scale = panel_mul(panel_load(sg + kLanes * j), d);
          panel_store(o, panel_fma(ivec_to_float(sum[t][j]), scale, acc));
        }
      }
    }
  }
}

template <bool Group16, bool Mins, int R = kIntPanelRows>
inline void int_panel_tile_rows(int64_t r, const int32_t* pairs, const float* scales, const float* mins,
                                const int16_t* xq, int64_t ldx, const float* xd, const float* xs, int64_t nbx,
                                int64_t blocks, float* out, int64_t ldo, bool accumulate) {
  if constexpr (R >= 1) {
    if (r == R)
      int_panel_tile<Group16, Mins, R>(pairs, scales, mins, xq, ldx, xd, xs, nbx, blocks, out, ldo, accumulate);
    else
      int_panel_tile_rows<Group16, Mins, R - 1>(r, pairs, scales, mins, xq, ldx, xd, xs, nbx, blocks, out, ldo,
                                                accumulate);
  }
}

// out [M, N] (+ bias) = x @ W^T through integer panels; acts is x quantized (QuantizedActs::build).
template <int Bits, bool Group16, bool Mins>
void int_panel_product(const PackedWeight& w, const QuantizedActs& acts, int64_t m, int64_t k, int64_t n,
                       const float* bias, float* out) {
  const int64_t nb = w.blocks, ns = w.scales_per_row, panels = (n + kPanel - 1) / kPanel;
  constexpr int64_t slice_blocks = kDepth / (kBlock / 2);  // a 24 KiB slice of pairs: kDepth units
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    thread_local LineVector<int32_t> pairs;
    thread_local LineVector<float> rows, scales, mins, staged;
    rows.resize(kPanel * ns);
    pairs.resize(kPanel * k / 2);
    scales.resize(ns * kPanel);
    mins.resize(nb * kPanel);
    staged.resize(m * kPanel);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kPanel, valid = std::min(kPanel, n - n0);
      pack_pairs<Bits>(w, n0, valid, n, pairs.data());
      // scales (and mins): the rows' float16 widened, missing rows zeros, then transposed to [groups][48]
      const auto transposed = [&](const uint16_t* src, int64_t cols, float* dst) {
        for (int64_t r = 0; r < valid; ++r) widen_scales(src + (n0 + r) * cols, cols, nullptr, rows.data() + r * cols);
        std::fill(rows.begin() + valid * cols, rows.begin() + kPanel * cols, 0.0f);
        transpose_panel(rows.data(), cols, cols, dst);
      };
      transposed(w.scales, ns, scales.data());
      if (Mins) transposed(w.mins, nb, mins.data());
      const bool direct = valid == kPanel;  // else the outputs go to `staged`, and the valid columns to out
      float* dst = direct ? out + n0 : staged.data();
      const int64_t ldo = direct ? n : kPanel;
      for (int64_t b0 = 0; b0 < nb; b0 += slice_blocks)
        for (int64_t t = 0; t < m; t += kIntPanelRows) {
          const int64_t blocks = std::min(slice_blocks, nb - b0), groups = Group16 ? 2 : 1;
          int_panel_tile_rows<Group16, Mins>(std::min<int64_t>(kIntPanelRows, m - t), pairs.data() + b0 * 16 * kPanel,
                                             scales.data() + b0 * groups * kPanel, mins.data() + b0 * kPanel,
                                             acts.codes.data() + t * k + b0 * kBlock, k, acts.scales.data() + t * nb + b0,
                                             acts.sums.data() + t * nb + b0, nb, blocks, dst + t * ldo, ldo, b0 > 0);
        }
      finish_panel(out, n, direct ? nullptr : staged.data(), m, n0, valid, bias);
    }
  });
}

void check_cpu_float(const at::Tensor& t, const char* name) {
  KV_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  KV_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  KV_CHECK(t.is_contiguous(), name, " must be contiguous");
}

thread_local QuantizedActs tls_acts;  // reused: a product allocates nothing once warm

// A weight's format as types: 4-bit (32-element groups) or 8-bit codes, 16- or 32-element scale groups,
// with or without mins.
template <int Bits, bool Group16, bool Mins>
struct Format {
  static constexpr int bits = Bits;
  static constexpr bool group16 = Group16, mins = Mins;
};

// f(Format<...>{}) for this weight's format: the one place the run-time format picks an instantiation.
template <class Fn>
void with_format(int64_t bits, bool group16, bool mins, Fn&& f) {
  if (bits == 4) {
    if (mins) f(Format<4, false, true>{});
    else f(Format<4, false, false>{});
  } else if (group16) {
    if (mins) f(Format<8, true, true>{});
    else f(Format<8, true, false>{});
  } else if (mins) {
    f(Format<8, false, true>{});
  } else {
    f(Format<8, false, false>{});
  }
}

}  // namespace

// Rows of x up to which the row-wise integer path runs, when the caller leaves the choice to the build
// (max_int_rows < 0): where the panels overtake it in whole decode steps of the default model, its
// weights read from memory as in serving (benchmarks/int_rows_crossover.py; Zen 4, median ms a step,
// the two settings alternating in one process):
//   AVX-512 build, row-wise up to 4 / 3 rows: batch 4 20.0 / 16.6, 16.6 / 15.3; up to 8 / 5: batch 6
//   26.1 / 20.6, batch 8 30.0 / 21.9.
//   AVX2 build, up to 4 / 3: batch 4 18.1 / 18.9, 13.9 / 14.8; up to 5 / 4: batch 5 19.6 / 18.5; up to
//   8 / 5: batch 6 26.5 / 21.6, batch 8 25.2 / 23.3.
// Single products agree (benchmarks/linear_kernels.py, AVX-512, 6 rows: 34-50 GMAC/s row-wise against
// 46-81 panels). The limit was 8 before, set on a Zen 5 machine where whole decode steps at batch 6 were
// no faster with the panels.
#if defined(__AVX512BW__)
constexpr int64_t kDefaultIntRows = 3;
#else
constexpr int64_t kDefaultIntRows = 4;
#endif

// A kernel's [M, N] float32 result (the products', and fused.cpp's silu_mul): out_buffer where the caller
// passes one (checked), else a new tensor like x. A caller that makes the same large product every step
// passes one it keeps (layers.Workspace): a fresh tensor of a MiB or more is a fresh mapping
// (kvserve/heap.py), its pages faulted in again each time.
at::Tensor product_output(const at::Tensor& x, int64_t m, int64_t n, const c10::optional<at::Tensor>& out_buffer) {
  if (!out_buffer.has_value()) return at::empty({m, n}, x.options());
  check_cpu_float(*out_buffer, "out");
  KV_CHECK(out_buffer->dim() == 2 && out_buffer->size(0) == m && out_buffer->size(1) == n, "out must be [M, N] = [",
           m, ", ", n, "]");
  return *out_buffer;
}

// x [M, K] fp32; codes/scales/mins as above (mins may be empty); bias [N] or empty -> [M, N] fp32.
// Up to max_int_rows rows of x (kDefaultIntRows when negative) take the row-wise integer path; more take
// the integer panels.
// out_buffer: where to write the result (product_output), else a new tensor.
at::Tensor q_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                    const at::Tensor& bias, int64_t bits, int64_t max_int_rows,
                    const c10::optional<at::Tensor>& out_buffer = c10::nullopt) {
  check_cpu_float(x, "x");
  KV_CHECK(x.dim() == 2, "x must be [M, K]");
  KV_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  const int64_t m = x.size(0), k = x.size(1), n = codes.size(0);
  KV_CHECK(k % kBlock == 0, "K (", k, ") must be a multiple of 32");
  KV_CHECK(codes.is_contiguous() && codes.dim() == 2 && codes.element_size() == 1, "codes must be [N, bytes] of 1-byte ints");
  KV_CHECK(codes.size(1) == (bits == 4 ? k / 2 : k), "codes do not match K = ", k, " at ", bits, " bits");
  KV_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 2 && scales.size(0) == n,
           "scales must be [N, K/G] float16");
  const int64_t nb = k / kBlock;
  const bool group16 = scales.size(1) == 2 * nb;
  KV_CHECK(group16 || scales.size(1) == nb, "scales must have K/32 or K/16 columns");
  const bool has_mins = mins.numel() > 0;
  if (has_mins)
    KV_CHECK(mins.scalar_type() == at::kHalf && mins.is_contiguous() && mins.size(0) == n && mins.size(1) == nb,
             "mins must be [N, K/32] float16");
  const bool has_bias = bias.numel() > 0;
  if (has_bias) {
    check_cpu_float(bias, "bias");
    KV_CHECK(bias.numel() == n, "bias must have N elements");
  }
  at::Tensor out = product_output(x, m, n, out_buffer);
  if (m == 0) return out;
  PackedWeight w{static_cast<const uint8_t*>(codes.data_ptr()),  // int8 codes are read as bytes too
                 reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
                 has_mins ? reinterpret_cast<const uint16_t*>(mins.data_ptr<at::Half>()) : nullptr,
                 codes.size(1), scales.size(1), nb};
  KV_CHECK(!(bits == 4 && group16), "4-bit codes take 32-element groups");
  const float* b = has_bias ? bias.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  QuantizedActs& acts = tls_acts;
  if (m > (max_int_rows < 0 ? kDefaultIntRows : max_int_rows)) {
    acts.build(xp, m, k, false);
    with_format(bits, group16, has_mins, [&](auto f) {
      using F = decltype(f);
      int_panel_product<F::bits, F::group16, F::mins>(w, acts, m, k, n, b, o);
    });
    return out;
  }
  acts.build(xp, m, k, group16);
  with_format(bits, group16, has_mins, [&](auto f) {
    using F = decltype(f);
    q_linear_impl<F::bits, F::group16, F::mins>(w, acts, m, n, k, b, o);
  });
  return out;
}

namespace {

// One weight row against C rows of x, fp32. C == 1 keeps four partial sums (FMA latency).
template <int C>
inline void f32_row_tile(const float* w, const float* x, int64_t k, float* out) {
  constexpr int Acc = C == 1 ? 4 : 1;
  __m256 acc[C][Acc];
  for (int t = 0; t < C; ++t)
    for (int a = 0; a < Acc; ++a) acc[t][a] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 * Acc <= k; i += 8 * Acc) {
    for (int a = 0; a < Acc; ++a) {
      const __m256 wv = _mm256_loadu_ps(w + i + 8 * a);
      for (int t = 0; t < C; ++t) acc[t][a] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * k + i + 8 * a), acc[t][a]);
    }
  }
  for (; i + 8 <= k; i += 8) {
    const __m256 wv = _mm256_loadu_ps(w + i);
    for (int t = 0; t < C; ++t) acc[t][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * k + i), acc[t][0]);
  }
  for (int t = 0; t < C; ++t) {
    __m256 s = acc[t][0];
    for (int a = 1; a < Acc; ++a) s = _mm256_add_ps(s, acc[t][a]);
    float total = hsum(s);
    for (int64_t j = i; j < k; ++j) total += w[j] * x[t * k + j];
    out[t] = total;
  }
}

}  // namespace

// x [M, K] fp32, weight [N, K] fp32, bias [N] or empty -> [M, N]. Up to max_dot_rows rows of x, each
// weight row meets a few rows of x in dot products (the weight streams from memory once); more take the
// panels, as quantized weights do.
// out_buffer: as q_linear's.
at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t max_dot_rows,
                      const c10::optional<at::Tensor>& out_buffer = c10::nullopt) {
  check_cpu_float(x, "x");
  check_cpu_float(weight, "weight");
  KV_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "x [M, K] and weight [N, K] must share K");
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  const bool has_bias = bias.numel() > 0;
  if (has_bias) {
    check_cpu_float(bias, "bias");
    KV_CHECK(bias.numel() == n, "bias must have N elements");
  }
  at::Tensor out = product_output(x, m, n, out_buffer);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  if (m > max_dot_rows) {
    panel_product(xp, m, k, n, wp, bp, o);
    return out;
  }
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    float tile[kTile];
    for (int64_t row = begin; row < end; ++row) {
      const float* w = wp + row * k;
      const float b = bp ? bp[row] : 0.0f;
      int64_t t = 0;
      for (; t + kTile <= m; t += kTile) {
        f32_row_tile<kTile>(w, xp + t * k, k, tile);
        for (int i = 0; i < kTile; ++i) o[(t + i) * n + row] = tile[i] + b;
      }
      const int64_t rest = m - t;
      if (rest == 3) f32_row_tile<3>(w, xp + t * k, k, tile);
      if (rest == 2) f32_row_tile<2>(w, xp + t * k, k, tile);
      if (rest == 1) f32_row_tile<1>(w, xp + t * k, k, tile);
      for (int i = 0; i < rest; ++i) o[(t + i) * n + row] = tile[i] + b;
    }
  });
  return out;
}
