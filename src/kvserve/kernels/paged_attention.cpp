// Decode attention straight from a plain paged KV cache, float32 or float16 (kv_cache_dtype float16:
// half the bytes per token, converted to fp32 as they are read), for an fp32 model: attention.py's
// decode path on the CPU.
//
// The PyTorch path gathers every decode's blocks into one padded [Nd, L, Hkv, D] copy per layer and
// runs SDPA with a mask over it: two passes over the K/V plus the padding. Here each (sequence, KV
// head) walks its own block table and reads its keys and values where they lie, one block at a time,
// with an online softmax (running max and denominator per query head, rescaled when the max grows),
// the G query heads that share the KV head read together. No copy, no padding, no mask.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace {

// Eight cache elements as fp32: a float32 cache as it is, a float16 one through F16C (exact).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline float to_float(float x) { return x; }
inline float to_float(at::Half x) { return static_cast<float>(x); }

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

using kvserve_vec::exp8;

// [q . k_0, ..., q . k_7] for 8 keys `row` floats apart; dim a multiple of 8. The 8 partial-sum vectors
// are reduced together (two rounds of pairwise adds and one 128-bit swap) instead of one by one.
template <typename T>
inline __m256 dots8(const float* __restrict__ q, const T* __restrict__ k, int64_t row, int64_t dim) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < dim; c += 8) {
    const __m256 qv = _mm256_loadu_ps(q + c);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, load8(k + j * row + c), a[j]);
  }
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// a [dim] += sum over t < tokens of weights[t] x v[t * row ...]. Head dims that are a multiple of 64 keep
// 64 outputs in registers across all the block's tokens; others go through memory.
template <typename T>
inline void accumulate_values(float* __restrict__ a, const float* __restrict__ weights, const T* __restrict__ v,
                              int64_t tokens, int64_t row, int64_t dim) {
  if (dim % 64 == 0) {
    for (int64_t c0 = 0; c0 < dim; c0 += 64) {
      __m256 sum[8];
      for (int j = 0; j < 8; ++j) sum[j] = _mm256_loadu_ps(a + c0 + 8 * j);
      for (int64_t t = 0; t < tokens; ++t) {
        const __m256 w = _mm256_set1_ps(weights[t]);
        const T* vt = v + t * row + c0;
        for (int j = 0; j < 8; ++j) sum[j] = _mm256_fmadd_ps(w, load8(vt + 8 * j), sum[j]);
      }
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(a + c0 + 8 * j, sum[j]);
    }
    return;
  }
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = 0; c < dim; ++c) a[c] += weights[t] * to_float(v[t * row + c]);
}

// One token's key and value rows of one head (dim float16 each) -> fp32.
inline void widen_row(const at::Half* k, const at::Half* v, int64_t dim, float* wk, float* wv) {
  int64_t c = 0;
  for (; c + 8 <= dim; c += 8) {
    _mm256_storeu_ps(wk + c, load8(k + c));
    _mm256_storeu_ps(wv + c, load8(v + c));
  }
  for (; c < dim; ++c) wk[c] = to_float(k[c]), wv[c] = to_float(v[c]);
}

// Blocks prefetched ahead (batch 32, 30 layers, blocks scattered, float16 / float32 ms a step: 1 ahead
// 10.3 / 13.4, 2 ahead 9.1 / 12.7, 4 ahead 7.8 / 10.3, 8 ahead 8.0 / 11.3).
constexpr int64_t kAhead = 4;

// A block's keys and values for one head (block_size rows of dim elements, `row` apart) into L2: the
// blocks of a sequence lie anywhere in the pool, where the hardware prefetcher cannot follow, and a
// batch's cache is read from memory once per step (measured, batch 32: ~10 GB/s without).
template <typename T>
inline void prefetch_block(const T* k, const T* v, int64_t block_size, int64_t row, int64_t dim) {
  const int64_t bytes = dim * static_cast<int64_t>(sizeof(T));
  for (int64_t t = 0; t < block_size; ++t)
    for (int64_t offset = 0; offset < bytes; offset += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(k + t * row) + offset, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(v + t * row) + offset, _MM_HINT_T1);
    }
}

// Block b of a (sequence, KV head)'s table, checked; the blocks kAhead on are prefetched meanwhile (the
// first blocks before).
template <typename T>
inline int64_t block_and_prefetch(const int64_t* table, int64_t b, int64_t blocks, int64_t num_blocks, const T* keys,
                                  const T* values, int64_t block_size, int64_t row, int64_t h, int64_t dim) {
  const int64_t id = table[b], block = block_size * row;
  TORCH_CHECK(id >= 0 && id < num_blocks, "block id ", id, " out of range");
  for (int64_t ahead = b == 0 ? 1 : kAhead; ahead <= kAhead && b + ahead < blocks; ++ahead) {
    const int64_t next = table[b + ahead];
    if (next >= 0 && next < num_blocks)
      prefetch_block(keys + next * block + h * dim, values + next * block + h * dim, block_size, row, dim);
  }
  return id;
}

// The online softmax of the `group` query heads of one (sequence, KV head), in the calling thread's
// buffer: the queries x the softmax scale, the outputs unnormalized, per head the running max score and
// the denominator relative to it; then `extra` floats of scratch for the caller.
struct HeadsState {
  float* q;      // [group, dim]
  float* acc;    // [group, dim]
  float* top;    // [group]
  float* total;  // [group]
  float* extra;
  int64_t group, dim;

  HeadsState(const float* query, int64_t group_, int64_t dim_, float scale, int64_t extra_floats)
      : group(group_), dim(dim_) {
    thread_local std::vector<float> buffer;
    buffer.resize(group * (2 * dim + 2) + extra_floats);
    q = buffer.data(), acc = q + group * dim, top = acc + group * dim, total = top + group, extra = total + group;
    for (int64_t i = 0; i < group * dim; ++i) q[i] = query[i] * scale;
    std::fill(acc, acc + group * dim, 0.f);
    std::fill(top, top + group, std::numeric_limits<float>::lowest());
    std::fill(total, total + group, 0.f);
  }

  // Head g's new running max (higher than top[g]): what it accumulated so far is rescaled to it. Before
  // anything is accumulated there is nothing to rescale (and exp(lowest) underflows).
  void raise_top(int64_t g, float new_top) {
    if (total[g] > 0.f) {
      const float rescale = std::exp(top[g] - new_top);
      for (int64_t c = 0; c < dim; ++c) acc[g * dim + c] *= rescale;
      total[g] *= rescale;
    }
    top[g] = new_top;
  }

  void finish(float* out) const {
    for (int64_t g = 0; g < group; ++g)
      for (int64_t c = 0; c < dim; ++c) out[g * dim + c] = acc[g * dim + c] / total[g];
  }
};

template <typename T>
void attend_one(const float* __restrict__ query, const T* __restrict__ keys, const T* __restrict__ values,
                const int64_t* table, int64_t len, int64_t num_blocks, int64_t block_size, int64_t heads, int64_t h,
                int64_t group, int64_t dim, float scale, float* __restrict__ out) {
  const int64_t row = heads * dim, block = block_size * row;
  const bool vector_dim = dim % 8 == 0;
  HeadsState state(query, group, dim, scale, group * block_size);
  const float* __restrict__ q = state.q;
  float* acc = state.acc;  // not __restrict__: state.raise_top rescales them too
  float* total = state.total;
  float* __restrict__ w = state.extra;  // [group, block_size] scores, then weights
  // A float16 block's rows of this head, widened to fp32 once for the G query heads ([2][block_size][dim]):
  // read through F16C per query head instead, they cost three conversions each and fp16 ran no faster
  // than fp32 (batch 32, 30 layers, blocks scattered: 13.5 ms against 17.6).
  thread_local std::vector<float> widened;
  if constexpr (!std::is_same_v<T, float>) widened.resize(2 * block_size * dim);
  const int64_t blocks = (len + block_size - 1) / block_size;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t id = block_and_prefetch(table, b, blocks, num_blocks, keys, values, block_size, row, h, dim);
    const int64_t tokens = std::min(block_size, len - b * block_size);
    const T* k_rows = keys + id * block + h * dim;
    const T* v_rows = values + id * block + h * dim;
    // k, v: this block's rows of head h as fp32, `stride` apart (where they lie for a float32 cache)
    const float* k;
    const float* v;
    int64_t stride = row;
    if constexpr (std::is_same_v<T, float>) {
      k = k_rows, v = v_rows;
    } else {
      float* wk = widened.data();
      float* wv = wk + block_size * dim;
      for (int64_t t = 0; t < tokens; ++t) widen_row(k_rows + t * row, v_rows + t * row, dim, wk + t * dim, wv + t * dim);
      k = wk, v = wv, stride = dim;
    }
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * dim;
      float* wg = w + g * block_size;
      int64_t t = 0;
      if (vector_dim)
        for (; t + 8 <= tokens; t += 8) _mm256_storeu_ps(wg + t, dots8(qg, k + t * stride, stride, dim));
      for (; t < tokens; ++t) {
        float dot = 0.f;
        for (int64_t c = 0; c < dim; ++c) dot += qg[c] * k[t * stride + c];
        wg[t] = dot;
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      float* __restrict__ wg = w + g * block_size;
      float block_top = state.top[g];
      for (int64_t t = 0; t < tokens; ++t) block_top = std::max(block_top, wg[t]);
      if (block_top > state.top[g]) state.raise_top(g, block_top);
      float sum = 0.f;
      int64_t t = 0;
      for (; t + 8 <= tokens; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(wg + t), _mm256_set1_ps(block_top)));
        _mm256_storeu_ps(wg + t, e);
        sum += hsum8(e);
      }
      for (; t < tokens; ++t) {
        wg[t] = std::exp(wg[t] - block_top);
        sum += wg[t];
      }
      total[g] += sum;
      accumulate_values(acc + g * dim, wg, v, tokens, stride, dim);
    }
  }
  state.finish(out);
}

#if defined(__AVX512F__)
// ---- AVX-512 builds: the same online softmax, 16 lanes wide and with no horizontal sum per key. Up to
// three query heads of a KV head pass over a block together, 8 keys at a time: each key row is read
// (and a float16 one widened) once for all of them, the 3 x 8 dot products are 24 independent vector
// sums reduced together at the end, the scores of 16 keys are one vector for the softmax, and the
// values meet the three heads' outputs (up to 4 x 16 dims each) in 12 independent accumulators. The
// AVX2 form above spent most of its time in dependency chains (one head's 16 tokens, 8 sums) and
// horizontal sums per 8 keys: on Zen 4, batch 32 at 192 tokens, a layer took 0.35 ms.

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

using kvserve_vec::exp16;

// [sum(a[0]), ..., sum(a[7])]: the halves added, then dots8's pairwise tree.
inline __m256 sums8(const __m512 (&a)[8]) {
  __m256 h[8];
  for (int j = 0; j < 8; ++j)
    h[j] = _mm256_add_ps(_mm512_castps512_ps256(a[j]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[j]), 1)));
  const __m256 s01 = _mm256_hadd_ps(h[0], h[1]), s23 = _mm256_hadd_ps(h[2], h[3]);
  const __m256 s45 = _mm256_hadd_ps(h[4], h[5]), s67 = _mm256_hadd_ps(h[6], h[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// Scores of G query heads (q [G][dim], scaled) against keys [0, tokens) of a chunk (tokens <= 16, rows
// `row` apart) -> s [G][16]; lanes past `tokens` are left as they are (the caller masks them). Keys
// past the chunk's end are read as its last key (valid memory, finite values).
template <typename T, int G>
inline void chunk_scores(const float* q, const T* k, int64_t row, int64_t tokens, int64_t dim, float* s) {
  for (int64_t t0 = 0; t0 < tokens; t0 += 8) {
    const T* rows[8];
    for (int j = 0; j < 8; ++j) rows[j] = k + std::min<int64_t>(t0 + j, tokens - 1) * row;
    __m512 acc[G][8];
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < 8; ++j) acc[g][j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < dim; c += 16) {
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) {
        const __m512 kv = load16(rows[j] + c);
        for (int g = 0; g < G; ++g) acc[g][j] = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q + g * dim + c), acc[g][j]);
      }
    }
    for (int g = 0; g < G; ++g) _mm256_storeu_ps(s + g * 16 + t0, sums8(acc[g]));
  }
}

// out[g][c0 .. c0 + 16 V) += sum over t < tokens of w[g][t] x v[t][c0 ...], for G heads: G x V sums.
template <typename T, int G, int V>
inline void chunk_values(const float* w, const T* v, int64_t row, int64_t tokens, int64_t dim, int64_t c0, float* out) {
  __m512 acc[G][V];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < V; ++i) acc[g][i] = _mm512_loadu_ps(out + g * dim + c0 + 16 * i);
  for (int64_t t = 0; t < tokens; ++t) {
    __m512 vv[V];
    for (int i = 0; i < V; ++i) vv[i] = load16(v + t * row + c0 + 16 * i);
    for (int g = 0; g < G; ++g) {
      const __m512 weight = _mm512_set1_ps(w[g * 16 + t]);
      for (int i = 0; i < V; ++i) acc[g][i] = _mm512_fmadd_ps(weight, vv[i], acc[g][i]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < V; ++i) _mm512_storeu_ps(out + g * dim + c0 + 16 * i, acc[g][i]);
}

// Query heads [g0, g0 + G) (G = 1..3) of one (sequence, KV head), in `state`.
template <typename T, int G>
void attend_heads16(HeadsState& state, int64_t g0, const T* keys, const T* values, const int64_t* table, int64_t len,
                    int64_t num_blocks, int64_t block_size, int64_t row, int64_t h) {
  const int64_t dim = state.dim, block = block_size * row, blocks = (len + block_size - 1) / block_size;
  const float* q = state.q + g0 * dim;
  float* acc = state.acc + g0 * dim;
  alignas(64) float s[G * 16];
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t id = block_and_prefetch(table, b, blocks, num_blocks, keys, values, block_size, row, h, dim);
    const int64_t in_block = std::min(block_size, len - b * block_size);
    for (int64_t t0 = 0; t0 < in_block; t0 += 16) {
      const int64_t tokens = std::min<int64_t>(16, in_block - t0);
      const T* k = keys + id * block + t0 * row + h * dim;
      const T* v = values + id * block + t0 * row + h * dim;
      chunk_scores<T, G>(q, k, row, tokens, dim, s);
      const __mmask16 valid = static_cast<__mmask16>((1u << tokens) - 1);
      for (int g = 0; g < G; ++g) {
        const __m512 scores = _mm512_maskz_loadu_ps(valid, s + g * 16);
        const float chunk_top = _mm512_mask_reduce_max_ps(valid, scores);
        if (chunk_top > state.top[g0 + g]) state.raise_top(g0 + g, chunk_top);
        const __m512 e =
            _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(scores, _mm512_set1_ps(state.top[g0 + g]))));
        _mm512_storeu_ps(s + g * 16, e);
        state.total[g0 + g] += _mm512_reduce_add_ps(e);
      }
      int64_t c0 = 0;
      for (; c0 + 64 <= dim; c0 += 64) chunk_values<T, G, 4>(s, v, row, tokens, dim, c0, acc);
      for (; c0 < dim; c0 += 16) chunk_values<T, G, 1>(s, v, row, tokens, dim, c0, acc);
    }
  }
}

// attend_one for a head dim that is a multiple of 16, on AVX-512 builds.
template <typename T>
void attend_one16(const float* query, const T* keys, const T* values, const int64_t* table, int64_t len,
                  int64_t num_blocks, int64_t block_size, int64_t heads, int64_t h, int64_t group, int64_t dim,
                  float scale, float* out) {
  HeadsState state(query, group, dim, scale, 0);
  const int64_t row = heads * dim;
  for (int64_t g0 = 0; g0 < group; g0 += 3) {
    const auto heads_at_once = [&](auto n) {
      attend_heads16<T, decltype(n)::value>(state, g0, keys, values, table, len, num_blocks, block_size, row, h);
    };
    const int64_t n = std::min<int64_t>(3, group - g0);
    if (n == 3) heads_at_once(std::integral_constant<int, 3>{});
    else if (n == 2) heads_at_once(std::integral_constant<int, 2>{});
    else heads_at_once(std::integral_constant<int, 1>{});
  }
  state.finish(out);
}
#endif

}  // namespace

namespace {

template <typename T>
void decode_attention_typed(const float* q, int64_t q_stride, int64_t nd, int64_t heads, int64_t group, int64_t dim,
                            const at::Tensor& cache, const int64_t* tables, int64_t width, const int64_t* len,
                            double scale, float* out) {
  const int64_t num_blocks = cache.size(1), block_size = cache.size(2);
  const T* keys = cache.data_ptr<T>();
  const T* values = keys + num_blocks * block_size * heads * dim;
  at::parallel_for(0, nd * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / heads, h = task % heads;
#if defined(__AVX512F__)
      if (dim % 16 == 0) {
        attend_one16<T>(q + i * q_stride + h * group * dim, keys, values, tables + i * width, len[i], num_blocks,
                        block_size, heads, h, group, dim, static_cast<float>(scale), out + (i * heads + h) * group * dim);
        continue;
      }
#endif
      attend_one<T>(q + i * q_stride + h * group * dim, keys, values, tables + i * width, len[i], num_blocks,
                    block_size, heads, h, group, dim, static_cast<float>(scale), out + (i * heads + h) * group * dim);
    }
  });
}

}  // namespace

// Decode attention for nd queries, query i at q + i * q_stride ([Hkv, G, D] contiguous within it),
// out [nd, Hkv, G, D] contiguous: the shared body of decode_attention_f32 and decoder.cpp's layer
// (which reads the queries where they lie in the fused QKV output, no copy).
void decode_attention_rows(const float* q, int64_t q_stride, int64_t nd, int64_t heads, int64_t group, int64_t dim,
                           const at::Tensor& cache, const at::Tensor& block_tables, const at::Tensor& lens, double scale,
                           float* out) {
  const bool half = cache.scalar_type() == at::kHalf;
  TORCH_CHECK(cache.device().is_cpu() && (half || cache.scalar_type() == at::kFloat) && cache.is_contiguous() &&
                  cache.dim() == 5 && cache.size(0) == 2,
              "cache must be a contiguous float32 or float16 [2, blocks, block_size, Hkv, D]");
  TORCH_CHECK(cache.size(3) == heads && cache.size(4) == dim, "cache heads / head dim do not match the queries");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() && block_tables.dim() == 2 &&
                  block_tables.size(0) == nd,
              "block_tables must be [Nd, W] int64");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.is_contiguous() && lens.numel() == nd, "lens must be [Nd] int64");
  const int64_t block_size = cache.size(2), width = block_tables.size(1);
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < nd; ++i)
    TORCH_CHECK(len[i] >= 1 && len[i] <= width * block_size, "context length ", len[i], " outside the block table");
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  if (half)
    decode_attention_typed<at::Half>(q, q_stride, nd, heads, group, dim, cache, tables, width, len, scale, out);
  else
    decode_attention_typed<float>(q, q_stride, nd, heads, group, dim, cache, tables, width, len, scale, out);
}

// queries [Nd, Hkv, G, D] fp32; cache [2, blocks, block_size, Hkv, D] fp32 or fp16; block_tables [Nd, W] int64
// (a decode's blocks in order, padded past its length); lens [Nd] int64, 1 <= len <= W * block_size.
// -> out [Nd, Hkv, G, D].
at::Tensor decode_attention_f32(const at::Tensor& queries, const at::Tensor& cache, const at::Tensor& block_tables,
                                const at::Tensor& lens, double scale) {
  TORCH_CHECK(queries.device().is_cpu() && queries.scalar_type() == at::kFloat && queries.is_contiguous() &&
                  queries.dim() == 4,
              "queries must be a contiguous float32 [Nd, Hkv, G, D]");
  const int64_t nd = queries.size(0), heads = queries.size(1), group = queries.size(2), dim = queries.size(3);
  at::Tensor out = at::empty_like(queries);
  decode_attention_rows(queries.data_ptr<float>(), heads * group * dim, nd, heads, group, dim, cache, block_tables,
                        lens, scale, out.data_ptr<float>());
  return out;
}
