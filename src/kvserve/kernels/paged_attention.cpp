// Decode attention straight from a plain paged KV cache, float32 or float16 (kv_cache_dtype float16:
// half the bytes per token, converted to fp32 as they are read), for an fp32 model: attention.py's
// decode path on the CPU.
//
// The PyTorch path gathers every decode's blocks into one padded [Nd, L, Hkv, D] copy per layer and
// runs SDPA with a mask over it: two passes over the K/V plus the padding. Here each sequence walks its
// own block table and reads its keys and values where they lie, one block at a time, with an online
// softmax (running max and denominator per query head, rescaled when the max grows). No copy, no
// padding, no mask.
//
// A block holds block_size tokens x Hkv heads x D, so a sequence's KV heads share its blocks. A thread
// takes its share of the (sequence, KV head) pairs a sequence at a time and walks the blocks once for
// all of that sequence's heads in its share, each block's heads in turn, prefetching the next block's
// rows as it goes (below).
//
// Within a block, up to three query heads of a KV head pass over it together, a chunk of keys at a time
// (16 on AVX-512 builds, 8 on AVX2 ones): each key row is read (and a float16 one widened) once for all
// of them, their dot products are independent vector sums reduced together at the end, a chunk's scores
// are one vector for the softmax, and the values meet the heads' outputs in independent accumulators.
// Head dims that are not a multiple of 8 take a plain loop.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "check.h"
#include "line_vector.h"
#include "vec_math.h"

namespace {

inline float to_float(float x) { return x; }
inline float to_float(at::Half x) { return static_cast<float>(x); }

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// A sequence's blocks lie anywhere in the pool, where the hardware prefetcher cannot follow from one
// to the next, and a batch's cache is read from memory once per step. So while a block is read, the
// same rows of the sequence's next block are prefetched into L2, a chunk of keys at a time (a line per
// 64 bytes). Measured (Zen 4; 32 sequences of 200 tokens, 30 layers of a float16 cache, blocks
// scattered; ms a step, AVX-512 / AVX2 builds): no prefetch 11.8 / -; every head's rows of a block 4
// blocks ahead at once 12.5 / 16.6; spread over the chunks 4 ahead 12.4 / 16.6, 2 ahead 9.8 / 12.6,
// 1 ahead 9.5 / 10.6; into L1 (T0) 17.6 / -. A burst of prefetches seems to hold the miss buffers
// that the demand loads then wait for. Against the earlier form (per (sequence, KV head) tasks, each
// head's rows of a block 4 blocks ahead at once), one run: 10.4 -> 7.5 / 12.0 -> 8.0 (20 GB/s; a plain
// read of the whole cache 23-30), 1,000 tokens 48 -> 34 / 55 -> 34, blocks in order 8.9 -> 6.5 /
// 11.0 -> 7.7, one sequence of 4,000 tokens 7.0 -> 6.2 / 8.3 -> 7.4.
__attribute__((always_inline)) inline void prefetch_rows(const void* p, int64_t rows, int64_t row_bytes, int64_t bytes) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t offset = 0; offset < bytes; offset += 64)
      _mm_prefetch(static_cast<const char*>(p) + r * row_bytes + offset, _MM_HINT_T1);
}

// One KV head's rows of a block: keys and values `row` elements apart, and the same rows of the sequence's
// next block (next_k null: none).
template <typename T>
struct HeadRows {
  const T* k;
  const T* v;
  const T* next_k;
  const T* next_v;
  int64_t row, tokens;
};

// Rows [t0, t0 + count) of the next block (dim elements each) into L2. Always inlined: GCC took a call that
// only prefetches, left out of line, for a pure function and dropped it (no prefetch instruction was left
// in the build, and the step was as slow as with none).
template <typename T>
__attribute__((always_inline)) inline void prefetch_next(const HeadRows<T>& rows, int64_t t0, int64_t count,
                                                         int64_t dim) {
  if (!rows.next_k) return;
  const int64_t row_bytes = rows.row * static_cast<int64_t>(sizeof(T)), bytes = dim * static_cast<int64_t>(sizeof(T));
  prefetch_rows(rows.next_k + t0 * rows.row, count, row_bytes, bytes);
  prefetch_rows(rows.next_v + t0 * rows.row, count, row_bytes, bytes);
}

// The online softmax of a sequence's query heads [h0 G, h1 G), in the calling thread's buffer: the
// queries x the softmax scale, the outputs unnormalized, per head the running max score and the
// denominator relative to it.
struct HeadsState {
  float* q;      // [heads, dim]
  float* acc;    // [heads, dim]
  float* top;    // [heads]
  float* total;  // [heads]
  int64_t heads, dim;

  HeadsState(const float* query, int64_t heads_, int64_t dim_, float scale) : heads(heads_), dim(dim_) {
    thread_local LineVector<float> buffer;
    buffer.resize(heads * (2 * dim + 2));
    q = buffer.data(), acc = q + heads * dim, top = acc + heads * dim, total = top + heads;
    for (int64_t i = 0; i < heads * dim; ++i) q[i] = query[i] * scale;
    std::fill(acc, acc + heads * dim, 0.f);
    std::fill(top, top + heads, std::numeric_limits<float>::lowest());
    std::fill(total, total + heads, 0.f);
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
    for (int64_t g = 0; g < heads; ++g)
      for (int64_t c = 0; c < dim; ++c) out[g * dim + c] = acc[g * dim + c] / total[g];
  }
};

// Any head dim: query head g of `state` against keys / values [0, tokens) `row` apart.
template <typename T>
void block_plain(HeadsState& state, int64_t g, const T* k, const T* v, int64_t row, int64_t tokens) {
  const int64_t dim = state.dim;
  const float* q = state.q + g * dim;
  float* acc = state.acc + g * dim;
  for (int64_t t = 0; t < tokens; ++t) {
    float score = 0.f;
    for (int64_t c = 0; c < dim; ++c) score += q[c] * to_float(k[t * row + c]);
    if (score > state.top[g]) state.raise_top(g, score);
    const float weight = std::exp(score - state.top[g]);
    state.total[g] += weight;
    for (int64_t c = 0; c < dim; ++c) acc[c] += weight * to_float(v[t * row + c]);
  }
}

// ---- The vector forms. A chunk is a vector's width of keys (8 on AVX2 builds; 16 on AVX-512 ones, for head
// dims that are a multiple of 16): G (<= 3) query heads x kKeysPerPass keys of dot products are independent
// vector sums in registers (3 x 4 of AVX2's 16 registers, 3 x 8 of AVX-512's 32), reduced together; a
// chunk's scores are one vector for the softmax; the values meet the heads' outputs kValueVectors
// vectors of dims at a time (G x that many sums, the value vectors and the broadcast weight).

// [sum(a[0]), ..., sum(a[3])].
inline __m128 sums4(const __m256 (&a)[4]) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

struct Lanes8 {
  using Vec = __m256;
  using Mask = __m256;  // all ones in the lanes of a chunk's keys
  static constexpr int kWidth = 8, kKeysPerPass = 4, kValueVectors = 2;
  // a float32 cache's elements as they are, a float16 one's through F16C (exact)
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static Vec load(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec set1(float x) { return _mm256_set1_ps(x); }
  static Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static void store_sums(float* s, const Vec (&a)[kKeysPerPass]) { _mm_storeu_ps(s, sums4(a)); }
  static Mask first(int64_t count) {
    return _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  }
  static float max(Vec v, Mask m) { return hmax8(_mm256_blendv_ps(set1(std::numeric_limits<float>::lowest()), v, m)); }
  static bool any_above(Vec v, Mask m, float top) {
    return _mm256_movemask_ps(_mm256_and_ps(m, _mm256_cmp_ps(v, set1(top), _CMP_GT_OQ))) != 0;
  }
  static Vec exp(Vec v, Mask m) { return _mm256_and_ps(m, kvserve_vec::exp8(v)); }
  static float sum(Vec v) { return hsum8(v); }
};

#if defined(__AVX512F__)
// [sum(a[0]), ..., sum(a[7])]: the halves added, then a pairwise tree.
inline __m256 sums8(const __m512 (&a)[8]) {
  __m256 h[8];
  for (int j = 0; j < 8; ++j)
    h[j] = _mm256_add_ps(_mm512_castps512_ps256(a[j]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a[j]), 1)));
  const __m256 s01 = _mm256_hadd_ps(h[0], h[1]), s23 = _mm256_hadd_ps(h[2], h[3]);
  const __m256 s45 = _mm256_hadd_ps(h[4], h[5]), s67 = _mm256_hadd_ps(h[6], h[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

struct Lanes16 {
  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int kWidth = 16, kKeysPerPass = 8, kValueVectors = 4;
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static Vec load(const at::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec set1(float x) { return _mm512_set1_ps(x); }
  static Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static void store_sums(float* s, const Vec (&a)[kKeysPerPass]) { _mm256_storeu_ps(s, sums8(a)); }
  static Mask first(int64_t count) { return static_cast<__mmask16>((1u << count) - 1); }
  static float max(Vec v, Mask m) { return _mm512_mask_reduce_max_ps(m, v); }
  static bool any_above(Vec v, Mask m, float top) { return _mm512_mask_cmp_ps_mask(m, v, set1(top), _CMP_GT_OQ) != 0; }
  static Vec exp(Vec v, Mask m) { return _mm512_maskz_mov_ps(m, kvserve_vec::exp16(v)); }
  static float sum(Vec v) { return _mm512_reduce_add_ps(v); }
};
#endif

// Scores of G query heads (q [G][dim], scaled) against keys [0, tokens) of a chunk (rows `row` apart) ->
// s [G][kWidth]; a pass's keys past `tokens` are read as the last one (valid memory, finite) and lanes past
// the pass are left as they are (the caller masks them).
template <class L, typename T, int G>
inline void chunk_scores(const float* q, const T* k, int64_t row, int64_t tokens, int64_t dim, float* s) {
  constexpr int P = L::kKeysPerPass;
  for (int64_t t0 = 0; t0 < tokens; t0 += P) {
    const T* rows[P];
    for (int j = 0; j < P; ++j) rows[j] = k + std::min<int64_t>(t0 + j, tokens - 1) * row;
    typename L::Vec acc[G][P];
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < P; ++j) acc[g][j] = L::zero();
    for (int64_t c = 0; c < dim; c += L::kWidth) {
#pragma GCC unroll 8
      for (int j = 0; j < P; ++j) {
        const typename L::Vec kv = L::load(rows[j] + c);
        for (int g = 0; g < G; ++g) acc[g][j] = L::fma(kv, L::load(q + g * dim + c), acc[g][j]);
      }
    }
    for (int g = 0; g < G; ++g) L::store_sums(s + g * L::kWidth + t0, acc[g]);
  }
}

// out[g][c0 .. c0 + kWidth V) += sum over t < tokens of w[g][t] x v[t][c0 ...], for G heads: G x V sums.
template <class L, typename T, int G, int V>
inline void chunk_values(const float* w, const T* v, int64_t row, int64_t tokens, int64_t dim, int64_t c0, float* out) {
  typename L::Vec acc[G][V];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < V; ++i) acc[g][i] = L::load(out + g * dim + c0 + L::kWidth * i);
  for (int64_t t = 0; t < tokens; ++t) {
    typename L::Vec vv[V];
    for (int i = 0; i < V; ++i) vv[i] = L::load(v + t * row + c0 + L::kWidth * i);
    for (int g = 0; g < G; ++g) {
      const typename L::Vec weight = L::set1(w[g * L::kWidth + t]);
      for (int i = 0; i < V; ++i) acc[g][i] = L::fma(weight, vv[i], acc[g][i]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < V; ++i) L::store(out + g * dim + c0 + L::kWidth * i, acc[g][i]);
}

// Query heads [g0, g0 + G) of `state` against a block's rows of one KV head, a chunk of kWidth keys at a time.
template <class L, typename T, int G>
void block_heads_vec(HeadsState& state, int64_t g0, const HeadRows<T>& rows) {
  constexpr int W = L::kWidth;
  const int64_t row = rows.row, tokens = rows.tokens, dim = state.dim;
  const float* q = state.q + g0 * dim;
  float* acc = state.acc + g0 * dim;
  alignas(64) float s[G * W] = {};  // lanes past a chunk's keys: masked, and finite from the start
  for (int64_t t0 = 0; t0 < tokens; t0 += W) {
    const int64_t count = std::min<int64_t>(W, tokens - t0);
    const T* k = rows.k + t0 * row;
    const T* v = rows.v + t0 * row;
    prefetch_next(rows, t0, count, dim);
    chunk_scores<L, T, G>(q, k, row, count, dim, s);
    const typename L::Mask valid = L::first(count);
    for (int g = 0; g < G; ++g) {
      const typename L::Vec scores = L::load(s + g * W);
      // the chunk's max only when a score passes the running one (a compare), which after the first few
      // chunks is rare: the reduction is off the common path (benchmarks/kernel_ab.py, batch 32 x 192
      // tokens, one layer, ms; AVX2 build: float16 cache 0.175 -> 0.154, float32 0.192 -> 0.175; AVX-512
      // build, where it is one masked instruction: 0.147 -> 0.144, 0.176 -> 0.175)
      if (L::any_above(scores, valid, state.top[g0 + g])) state.raise_top(g0 + g, L::max(scores, valid));
      const typename L::Vec e = L::exp(L::sub(scores, L::set1(state.top[g0 + g])), valid);
      L::store(s + g * W, e);
      state.total[g0 + g] += L::sum(e);
    }
    constexpr int V = L::kValueVectors;
    int64_t c0 = 0;
    for (; c0 + W * V <= dim; c0 += W * V) chunk_values<L, T, G, V>(s, v, row, count, dim, c0, acc);
    for (; c0 < dim; c0 += W) chunk_values<L, T, G, 1>(s, v, row, count, dim, c0, acc);
  }
}

// Query heads [g0, g0 + G) of `state` against a block's rows of one KV head, in the widest form the build
// and the head dim allow.
template <typename T, int G>
void block_heads(HeadsState& state, int64_t g0, const HeadRows<T>& rows) {
#if defined(__AVX512F__)
  if (state.dim % 16 == 0) return block_heads_vec<Lanes16, T, G>(state, g0, rows);
#endif
  if (state.dim % 8 == 0) return block_heads_vec<Lanes8, T, G>(state, g0, rows);
  for (int g = 0; g < G; ++g) block_plain<T>(state, g0 + g, rows.k, rows.v, rows.row, rows.tokens);
}

// KV heads [h0, h1) of sequence i (its query [Hkv, G, D] at `query`, out likewise): block by block, each
// KV head's G query heads three at a time.
template <typename T>
void attend_sequence(const float* query, const T* keys, const T* values, const int64_t* table, int64_t len,
                     int64_t num_blocks, int64_t block_size, int64_t heads, int64_t h0, int64_t h1, int64_t group,
                     int64_t dim, float scale, float* out) {
  const int64_t row = heads * dim, block = block_size * row, blocks = (len + block_size - 1) / block_size;
  const auto checked = [&](int64_t b) {
    const int64_t id = table[b];
    KV_CHECK(id >= 0 && id < num_blocks, "block id ", id, " out of range");
    return id;
  };
  HeadsState state(query + h0 * group * dim, (h1 - h0) * group, dim, scale);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t id = checked(b), next = b + 1 < blocks ? checked(b + 1) : -1;
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t at = id * block + h * dim, next_at = next * block + h * dim;
      for (int64_t g = 0; g < group; g += 3) {
        // the next block's rows are prefetched once per KV head, by its first query heads' pass
        const bool prefetch = next >= 0 && g == 0;
        const HeadRows<T> rows{keys + at,
                               values + at,
                               prefetch ? keys + next_at : nullptr,
                               prefetch ? values + next_at : nullptr,
                               row,
                               std::min(block_size, len - b * block_size)};
        const int64_t first = (h - h0) * group + g;
        switch (std::min<int64_t>(3, group - g)) {
          case 3: block_heads<T, 3>(state, first, rows); break;
          case 2: block_heads<T, 2>(state, first, rows); break;
          default: block_heads<T, 1>(state, first, rows);
        }
      }
    }
  }
  state.finish(out + h0 * group * dim);
}

template <typename T>
void decode_attention_typed(const float* q, int64_t q_stride, int64_t nd, int64_t heads, int64_t group, int64_t dim,
                            const at::Tensor& cache, const int64_t* tables, int64_t width, const int64_t* len,
                            double scale, float* out) {
  const int64_t num_blocks = cache.size(1), block_size = cache.size(2);
  const T* keys = cache.data_ptr<T>();
  const T* values = keys + num_blocks * block_size * heads * dim;
  // The (sequence, KV head) pairs in equal shares per thread; a share's pairs of one sequence run together.
  at::parallel_for(0, nd * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end;) {
      const int64_t i = task / heads, h0 = task % heads, h1 = std::min(heads, h0 + (end - task));
      attend_sequence<T>(q + i * q_stride, keys, values, tables + i * width, len[i], num_blocks, block_size, heads, h0,
                         h1, group, dim, static_cast<float>(scale), out + i * heads * group * dim);
      task += h1 - h0;
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
  KV_CHECK(cache.device().is_cpu() && (half || cache.scalar_type() == at::kFloat) && cache.is_contiguous() &&
               cache.dim() == 5 && cache.size(0) == 2,
           "cache must be a contiguous float32 or float16 [2, blocks, block_size, Hkv, D]");
  KV_CHECK(cache.size(3) == heads && cache.size(4) == dim, "cache heads / head dim do not match the queries");
  KV_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() && block_tables.dim() == 2 &&
               block_tables.size(0) == nd,
           "block_tables must be [Nd, W] int64");
  KV_CHECK(lens.scalar_type() == at::kLong && lens.is_contiguous() && lens.numel() == nd, "lens must be [Nd] int64");
  const int64_t block_size = cache.size(2), width = block_tables.size(1);
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < nd; ++i)
    KV_CHECK(len[i] >= 1 && len[i] <= width * block_size, "context length ", len[i], " outside the block table");
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
  KV_CHECK(queries.device().is_cpu() && queries.scalar_type() == at::kFloat && queries.is_contiguous() &&
               queries.dim() == 4,
           "queries must be a contiguous float32 [Nd, Hkv, G, D]");
  const int64_t nd = queries.size(0), heads = queries.size(1), group = queries.size(2), dim = queries.size(3);
  at::Tensor out = at::empty_like(queries);
  decode_attention_rows(queries.data_ptr<float>(), heads * group * dim, nd, heads, group, dim, cache, block_tables,
                        lens, scale, out.data_ptr<float>());
  return out;
}
