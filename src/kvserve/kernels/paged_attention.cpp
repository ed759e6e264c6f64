// Decode attention straight from a plain fp32 paged KV cache (attention.py's decode path on the CPU).
//
// The PyTorch path gathers every decode's blocks into one padded [Nd, L, Hkv, D] copy per layer and
// runs SDPA with a mask over it: two passes over the K/V plus the padding. Here each (sequence, KV
// head) walks its own block table and reads its keys and values where they lie, one block at a time,
// with an online softmax (running max and denominator per query head, rescaled when the max grows),
// the G query heads that share the KV head read together. No copy, no padding, no mask.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

void attend_one(const float* __restrict__ query, const float* __restrict__ keys, const float* __restrict__ values,
                const int64_t* table, int64_t len, int64_t num_blocks, int64_t block_size, int64_t heads, int64_t h,
                int64_t group, int64_t dim, float scale, float* __restrict__ out) {
  const int64_t row = heads * dim, block = block_size * row;
  thread_local std::vector<float> buffer;
  buffer.resize(group * (2 * dim + 2 + block_size));
  float* __restrict__ q = buffer.data();        // [group, dim] query x softmax scale
  float* __restrict__ acc = q + group * dim;    // [group, dim] output, unnormalized
  float* __restrict__ top = acc + group * dim;  // [group] running max score
  float* __restrict__ total = top + group;      // [group] running denominator, relative to top
  float* __restrict__ w = total + group;        // [group, block_size] scores, then weights
  for (int64_t i = 0; i < group * dim; ++i) q[i] = query[i] * scale;
  std::fill(acc, acc + group * dim, 0.f);
  std::fill(top, top + group, std::numeric_limits<float>::lowest());
  std::fill(total, total + group, 0.f);
  const int64_t blocks = (len + block_size - 1) / block_size;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t id = table[b];
    TORCH_CHECK(id >= 0 && id < num_blocks, "block id ", id, " out of range");
    const int64_t tokens = std::min(block_size, len - b * block_size);
    const float* k = keys + id * block + h * dim;
    const float* v = values + id * block + h * dim;
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t g = 0; g < group; ++g) {
        float dot = 0.f;
        for (int64_t c = 0; c < dim; ++c) dot += q[g * dim + c] * k[t * row + c];
        w[g * block_size + t] = dot;
      }
    for (int64_t g = 0; g < group; ++g) {
      float* __restrict__ wg = w + g * block_size;
      float block_top = top[g];
      for (int64_t t = 0; t < tokens; ++t) block_top = std::max(block_top, wg[t]);
      if (block_top > top[g]) {
        if (b > 0) {  // before the first block nothing is accumulated (and exp(lowest) underflows)
          const float rescale = std::exp(top[g] - block_top);
          for (int64_t c = 0; c < dim; ++c) acc[g * dim + c] *= rescale;
          total[g] *= rescale;
        }
        top[g] = block_top;
      }
      float sum = 0.f;
      for (int64_t t = 0; t < tokens; ++t) {
        wg[t] = std::exp(std::max(wg[t] - block_top, -80.f));
        sum += wg[t];
      }
      total[g] += sum;
      float* __restrict__ a = acc + g * dim;
      for (int64_t t = 0; t < tokens; ++t) {
        const float weight = wg[t];
        const float* __restrict__ vt = v + t * row;
        for (int64_t c = 0; c < dim; ++c) a[c] += weight * vt[c];
      }
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t c = 0; c < dim; ++c) out[g * dim + c] = acc[g * dim + c] / total[g];
}

}  // namespace

// queries [Nd, Hkv, G, D] fp32; cache [2, blocks, block_size, Hkv, D] fp32; block_tables [Nd, W] int64
// (a decode's blocks in order, padded past its length); lens [Nd] int64, 1 <= len <= W * block_size.
// -> out [Nd, Hkv, G, D].
at::Tensor decode_attention_f32(const at::Tensor& queries, const at::Tensor& cache, const at::Tensor& block_tables,
                                const at::Tensor& lens, double scale) {
  TORCH_CHECK(queries.device().is_cpu() && queries.scalar_type() == at::kFloat && queries.is_contiguous() &&
                  queries.dim() == 4,
              "queries must be a contiguous float32 [Nd, Hkv, G, D]");
  TORCH_CHECK(cache.scalar_type() == at::kFloat && cache.is_contiguous() && cache.dim() == 5 && cache.size(0) == 2,
              "cache must be a contiguous float32 [2, blocks, block_size, Hkv, D]");
  const int64_t nd = queries.size(0), heads = queries.size(1), group = queries.size(2), dim = queries.size(3);
  TORCH_CHECK(cache.size(3) == heads && cache.size(4) == dim, "cache heads / head dim do not match the queries");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() && block_tables.dim() == 2 &&
                  block_tables.size(0) == nd,
              "block_tables must be [Nd, W] int64");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.is_contiguous() && lens.numel() == nd, "lens must be [Nd] int64");
  const int64_t num_blocks = cache.size(1), block_size = cache.size(2), width = block_tables.size(1);
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < nd; ++i)
    TORCH_CHECK(len[i] >= 1 && len[i] <= width * block_size, "context length ", len[i], " outside the block table");
  at::Tensor out = at::empty_like(queries);
  const float* q = queries.data_ptr<float>();
  const float* keys = cache.data_ptr<float>();
  const float* values = keys + num_blocks * block_size * heads * dim;
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, nd * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / heads, h = task % heads;
      const int64_t at = (i * heads + h) * group * dim;
      attend_one(q + at, keys, values, tables + i * width, len[i], num_blocks, block_size, heads, h, group, dim,
                 static_cast<float>(scale), o + at);
    }
  });
  return out;
}
