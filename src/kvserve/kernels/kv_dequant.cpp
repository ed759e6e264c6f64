// kvserve's CPU kernels for the int8 KV cache (kv/quant.py has the format; kernels/__init__.py builds
// and loads them as torch.ops.kvserve).
//
// PyTorch has no int8 x float product, so attention.py's plain path gathers a step's blocks, converts
// the codes into the model dtype and applies the scales (a pass through memory each) and then attends
// over that copy. Two kernels replace it:
// - decode_attention: the decode batch's attention, reading the codes where they lie, with no copy,
//   and each sequence's last two blocks from its recent window.
// - gather_dequant: the gather for prefill chunks and cascade attention (SDPA attends over it), in one
//   pass: 1 byte read and 4 written per element for fp32, where gathering an fp32 cache moves 4 and 4.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "check.h"

namespace {

constexpr int64_t kValueGroup = 32;    // channels per value scale: kv/quant.py VALUE_GROUP
constexpr int64_t kWindowBlocks = 2;  // entries of a window slot: kv/quant.py WINDOW_BLOCKS

// out [2, M, bs, H, D] = the blocks block_ids [M] of data [2, NB, bs, H, D] int8, dequantized:
// keys (plane 0) as code * key_params[0] + key_params[1] per (block, head, channel), in one fused
// multiply-add; values (plane 1) as code * value_scales per (block, token, head, group of D / G).
template <typename Out>
void gather_dequant_impl(const at::Tensor& data, const at::Tensor& key_params, const at::Tensor& value_scales,
                         const at::Tensor& block_ids, at::Tensor& out) {
  const int64_t num_blocks = data.size(1), block_size = data.size(2), heads = data.size(3), dim = data.size(4);
  const int64_t groups = value_scales.size(4), group_dim = dim / groups, m = block_ids.size(0);
  const int64_t row = heads * dim, block = block_size * row;
  const int8_t* codes = data.data_ptr<int8_t>();
  const float* params = key_params.data_ptr<float>();
  const float* vscales = value_scales.data_ptr<float>();
  const int64_t* ids = block_ids.data_ptr<int64_t>();
  Out* dst = out.data_ptr<Out>();
  // One task per (plane, gathered block): a block is 1-4 KiB of codes per layer, so the grain keeps
  // several blocks per task.
  at::parallel_for(0, 2 * m, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t plane = task / m, i = task % m, b = ids[i];
      KV_CHECK(b >= 0 && b < num_blocks, "block id ", b, " out of range");
      const int8_t* src = codes + (plane * num_blocks + b) * block;
      Out* o = dst + (plane * m + i) * block;
      if (plane == 0) {
        const float* scale = params + b * row;
        const float* center = params + (num_blocks + b) * row;
        for (int64_t t = 0; t < block_size; ++t) {
          const int8_t* __restrict__ s = src + t * row;
          Out* __restrict__ d = o + t * row;
          for (int64_t c = 0; c < row; ++c) d[c] = static_cast<Out>(std::fma(float(s[c]), scale[c], center[c]));
        }
      } else {
        const float* scale = vscales + b * block_size * heads * groups;
        for (int64_t g = 0; g < block_size * heads * groups; ++g) {
          const int8_t* __restrict__ s = src + g * group_dim;
          Out* __restrict__ d = o + g * group_dim;
          const float k = scale[g];
          for (int64_t c = 0; c < group_dim; ++c) d[c] = static_cast<Out>(float(s[c]) * k);
        }
      }
    }
  });
}

// tile [tokens, dim] fp32 = `tokens` rows of a window, `row` elements apart. c10::Half converts in
// software one value at a time (its vectorized path needs torch's own AVX2 build flags, which an
// extension does not get); GCC's _Float16 converts with the CPU's F16C instructions, vectorized.
template <typename W>
void widen_rows(const W* __restrict__ src, int64_t tokens, int64_t dim, int64_t row, float* __restrict__ tile) {
#if defined(__FLT16_MANT_DIG__)
  if constexpr (std::is_same_v<W, c10::Half>) {
    const _Float16* __restrict__ h = reinterpret_cast<const _Float16*>(src);  // the same IEEE bits
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t c = 0; c < dim; ++c) tile[t * dim + c] = static_cast<float>(h[t * row + c]);
    return;
  }
#endif
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = 0; c < dim; ++c) tile[t * dim + c] = static_cast<float>(src[t * row + c]);
}

// Where block `id` of one head keeps its codes, parameters and value scales.
struct BlockView {
  const int8_t* keys;         // [block_size] rows of dim codes, `row` apart
  const int8_t* values;       // same
  const float* key_scale;     // [dim]
  const float* key_center;    // [dim]
  const float* value_scales;  // [block_size] rows of value_groups scales, heads x value_groups apart
};

// The next block's codes and value scales into L2 while this one is read: a sequence's blocks lie anywhere
// in the pool, where the hardware prefetcher cannot follow (paged_attention.cpp measured the same for the
// float16 cache). One head's rows are dim bytes each, a line for dim 64: 2 x block_size lines a block.
// Always inlined: GCC dropped an out-of-line call that only prefetched, as a pure function's.
__attribute__((always_inline)) inline void prefetch_block(const BlockView& v, int64_t block_size, int64_t row, int64_t dim,
                                                         int64_t heads, int64_t value_groups) {
  for (int64_t t = 0; t < block_size; ++t)
    for (int64_t c = 0; c < dim; c += 64) {
      __builtin_prefetch(v.keys + t * row + c, 0, 2);  // locality 2: prefetcht1
      __builtin_prefetch(v.values + t * row + c, 0, 2);
    }
  for (int64_t t = 0; t < block_size; t += 4)  // the value scales: heads x value_groups floats a token
    __builtin_prefetch(v.value_scales + t * heads * value_groups, 0, 2);
}

// One (sequence, KV head) of decode attention straight from the int8 cache, in fp32, one block at a
// time (online softmax, as in flash attention: a running max rescales what is accumulated), through
// block-sized tiles that stay in L1: nothing of the cache is written anywhere in full precision.
// - A full block's keys are k = code x scale + center per channel, so q.k = (q x scale).code +
//   q.center: the scale folds into the query once per block, and the codes are only converted.
// - Values are dequantized per block into a tile (code x the token's group scale), then accumulated
//   with the block's softmax weights.
// - Blocks from window_from on are read from the sequence's window (K and V in fp16 or bf16,
//   entry block % 2 of its slot) instead of their codes.
// Weights are floored at exp(-80) (~2e-35 of the max's): a vectorized exp falls back to a slow scalar
// path for lanes that underflow, which were a third of the time with spread-out scores.
// Every inner loop runs over contiguous channels, so the compiler vectorizes it; pointers are
// __restrict__ because int8 pointers may alias anything, and alias checks in the innermost loops
// cost more than their work.
template <typename T, typename W, int64_t kDim>
void decode_one(const T* __restrict__ query, int64_t group, int64_t dim_, int64_t heads, int64_t h, int64_t len,
                int64_t block_size, const int64_t* __restrict__ table, const int8_t* __restrict__ codes,
                const float* __restrict__ params, const float* __restrict__ vscales, int64_t value_groups,
                int64_t num_blocks, const W* __restrict__ window, int64_t num_slots, int64_t slot,
                int64_t window_from, float scale, T* __restrict__ out) {
  const int64_t dim = kDim ? kDim : dim_;  // a constant lets the compiler unroll and keep rows in registers
  const int64_t row = heads * dim, block = block_size * row, group_dim = kDim ? kValueGroup : dim / value_groups;
  const int64_t blocks = (len + block_size - 1) / block_size;
  thread_local std::vector<float> buffer;
  buffer.resize(group * (3 * dim + 3 + block_size) + block_size * dim);
  float* __restrict__ q = buffer.data();           // [group, dim] query x softmax scale
  float* __restrict__ qs = q + group * dim;        // [group, dim] q x the block's key scales
  float* __restrict__ acc = qs + group * dim;      // [group, dim] output, unnormalized
  float* __restrict__ bias = acc + group * dim;    // [group] q . the block's key centers
  float* __restrict__ top = bias + group;          // [group] running max score
  float* __restrict__ total = top + group;         // [group] running softmax denominator, relative to top
  float* __restrict__ weights = total + group;     // [group, block_size] the block's scores, then weights
  float* __restrict__ tile = weights + group * block_size;  // [block_size, dim] keys, then values
  for (int64_t i = 0; i < group * dim; ++i) q[i] = static_cast<float>(query[i]) * scale;
  std::fill(acc, acc + group * dim, 0.f);
  std::fill(top, top + group, std::numeric_limits<float>::lowest());
  std::fill(total, total + group, 0.f);

  auto view = [&](int64_t id) {
    KV_CHECK(id >= 0 && id < num_blocks, "block id ", id, " out of range");
    const int64_t base = id * block + h * dim;
    return BlockView{codes + base, codes + num_blocks * block + base, params + id * row + h * dim,
                     params + (num_blocks + id) * row + h * dim,
                     vscales + (id * block_size * heads + h) * value_groups};
  };
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t tokens = std::min(block_size, len - b * block_size);
    const BlockView v = view(table[b]);
    if (b + 1 < blocks && b + 1 < window_from) prefetch_block(view(table[b + 1]), block_size, row, dim, heads, value_groups);

    // The block's K and V in the window: [2, num_slots, kWindowBlocks, block_size, heads, dim].
    const bool windowed = slot >= 0 && b >= window_from;
    const W* __restrict__ window_keys =
        windowed ? window + (slot * kWindowBlocks + b % kWindowBlocks) * block + h * dim : nullptr;
    const W* __restrict__ window_values = windowed ? window_keys + num_slots * kWindowBlocks * block : nullptr;

    // Scores [group, tokens] into weights.
    const float* __restrict__ qk = qs;  // what the tile's keys are multiplied by
    if (windowed) {
      widen_rows(window_keys, tokens, dim, row, tile);
      std::fill(bias, bias + group, 0.f);
      qk = q;
    } else {
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t c = 0; c < dim; ++c) tile[t * dim + c] = static_cast<float>(v.keys[t * row + c]);
      for (int64_t g = 0; g < group; ++g) {
        float dot = 0.f;
        for (int64_t c = 0; c < dim; ++c) {
          qs[g * dim + c] = q[g * dim + c] * v.key_scale[c];
          dot += q[g * dim + c] * v.key_center[c];
        }
        bias[g] = dot;
      }
    }
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t g = 0; g < group; ++g) {
        float dot = bias[g];
        for (int64_t c = 0; c < dim; ++c) dot += qk[g * dim + c] * tile[t * dim + c];
        weights[g * block_size + t] = dot;
      }

    // Online softmax: a new max rescales the accumulated output and denominator.
    for (int64_t g = 0; g < group; ++g) {
      float* __restrict__ w = weights + g * block_size;
      float block_top = top[g];
      for (int64_t t = 0; t < tokens; ++t) block_top = std::max(block_top, w[t]);
      if (block_top > top[g]) {
        if (b > 0) {  // (before the first block nothing is accumulated, and exp(lowest) would underflow)
          const float rescale = std::exp(top[g] - block_top);
          for (int64_t c = 0; c < dim; ++c) acc[g * dim + c] *= rescale;
          total[g] *= rescale;
        }
        top[g] = block_top;
      }
      float sum = 0.f;
      for (int64_t t = 0; t < tokens; ++t) {
        w[t] = std::exp(std::max(w[t] - block_top, -80.f));
        sum += w[t];
      }
      total[g] += sum;
    }

    // acc += weights . values.
    if (windowed) {
      widen_rows(window_values, tokens, dim, row, tile);
    } else {
      for (int64_t t = 0; t < tokens; ++t)
        for (int64_t k = 0; k < value_groups; ++k) {
          const float s = v.value_scales[t * heads * value_groups + k];
          for (int64_t c = k * group_dim; c < (k + 1) * group_dim; ++c)
            tile[t * dim + c] = static_cast<float>(v.values[t * row + c]) * s;
        }
    }
    for (int64_t g = 0; g < group; ++g) {
      if constexpr (kDim > 0) {  // the row in registers across the block's tokens
        float a[kDim];
        for (int64_t c = 0; c < kDim; ++c) a[c] = acc[g * kDim + c];
        for (int64_t t = 0; t < tokens; ++t) {
          const float w = weights[g * block_size + t];
          for (int64_t c = 0; c < kDim; ++c) a[c] += w * tile[t * kDim + c];
        }
        for (int64_t c = 0; c < kDim; ++c) acc[g * kDim + c] = a[c];
      } else {
        for (int64_t t = 0; t < tokens; ++t) {
          const float w = weights[g * block_size + t];
          for (int64_t c = 0; c < dim; ++c) acc[g * dim + c] += w * tile[t * dim + c];
        }
      }
    }
  }
  for (int64_t g = 0; g < group; ++g)  // normalized once: [group, dim] divisions instead of [group, len]
    for (int64_t c = 0; c < dim; ++c) out[g * dim + c] = static_cast<T>(acc[g * dim + c] / total[g]);
}

// The int8 cache's three tensors (QuantizedKVCache.block_tensors), as both kernels read them.
void check_cache(const at::Tensor& data, const at::Tensor& key_params, const at::Tensor& value_scales) {
  KV_CHECK(data.device().is_cpu() && data.scalar_type() == at::kChar && data.is_contiguous() && data.dim() == 5,
           "data: a contiguous int8 CPU tensor [2, num_blocks, block_size, heads, dim]");
  KV_CHECK(key_params.scalar_type() == at::kFloat && key_params.is_contiguous(), "key_params: contiguous fp32");
  KV_CHECK(value_scales.scalar_type() == at::kFloat && value_scales.is_contiguous(), "value_scales: contiguous fp32");
}

at::Tensor gather_dequant(const at::Tensor& data, const at::Tensor& key_params, const at::Tensor& value_scales,
                          const at::Tensor& block_ids, at::Tensor out) {
  check_cache(data, key_params, value_scales);
  KV_CHECK(block_ids.scalar_type() == at::kLong && block_ids.is_contiguous(), "block_ids: contiguous int64");
  KV_CHECK(out.is_contiguous() && out.numel() == 2 * block_ids.size(0) * data[0][0].numel(), "out: [2, M, ...]");
  switch (out.scalar_type()) {
    case at::kFloat: gather_dequant_impl<float>(data, key_params, value_scales, block_ids, out); break;
    case at::kBFloat16: gather_dequant_impl<c10::BFloat16>(data, key_params, value_scales, block_ids, out); break;
    case at::kHalf: gather_dequant_impl<c10::Half>(data, key_params, value_scales, block_ids, out); break;
    default: KV_CHECK(false, "out: fp32, bf16 or fp16");
  }
  return out;
}

// The window's dtype for a query dtype: kv/quant.py window_dtype.
template <typename T>
using WindowType = std::conditional_t<std::is_same_v<T, c10::BFloat16>, c10::BFloat16, c10::Half>;

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& data, const at::Tensor& key_params,
                            const at::Tensor& value_scales, const at::Tensor& window,
                            const at::Tensor& block_tables, const at::Tensor& context_lens,
                            const at::Tensor& window_slots, const at::Tensor& window_from, double scale,
                            at::Tensor out) {
  KV_CHECK(query.dim() == 4 && query.is_contiguous(), "query: contiguous [Nd, Hkv, G, D]");
  check_cache(data, key_params, value_scales);
  KV_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kBFloat16 ||
               query.scalar_type() == at::kHalf,
           "query: fp32, bf16 or fp16");
  const auto window_type = query.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kHalf;
  KV_CHECK(window.scalar_type() == window_type && window.is_contiguous() && window.dim() == 6 &&
               window.size(0) == 2 && window.size(2) == kWindowBlocks && window.size(3) == data.size(2) &&
               window.size(4) == data.size(3) && window.size(5) == data.size(4),
           "window: contiguous [2, slots, ", kWindowBlocks, ", block_size, heads, dim], bf16 for a bf16 query, else fp16");
  KV_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() && block_tables.dim() == 2,
           "block_tables: contiguous int64 [Nd, width]");
  KV_CHECK(block_tables.size(0) == query.size(0), "block_tables: one row per query");
  KV_CHECK(window.device().is_cpu() && query.device().is_cpu() && out.device().is_cpu(),
           "query, window, out: CPU tensors");
  KV_CHECK(context_lens.scalar_type() == at::kLong && window_slots.scalar_type() == at::kLong &&
               window_from.scalar_type() == at::kLong && context_lens.is_contiguous() &&
               window_slots.is_contiguous() && window_from.is_contiguous() &&
               context_lens.numel() == query.size(0) && window_slots.numel() == query.size(0) &&
               window_from.numel() == query.size(0),
           "context_lens, window_slots, window_from: contiguous int64 [Nd]");
  KV_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type() && out.is_contiguous(),
           "out: like query");
  const int64_t nd = query.size(0), heads = query.size(1), group = query.size(2), dim = query.size(3);
  const int64_t num_blocks = data.size(1), block_size = data.size(2), width = block_tables.size(1);
  KV_CHECK(data.size(3) == heads && data.size(4) == dim, "data: heads and dim of the query");
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* slots = window_slots.data_ptr<int64_t>();
  const int64_t* from = window_from.data_ptr<int64_t>();
  const int64_t num_slots = window.size(1);
  for (int64_t n = 0; n < nd; ++n) {
    KV_CHECK(lens[n] >= 1 && lens[n] <= width * block_size, "context length out of its block table");
    KV_CHECK(slots[n] >= -1 && slots[n] < num_slots, "window slot out of range");
    KV_CHECK(from[n] >= 0, "window_from: a block index");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "decode_attention", [&] {
    using W = WindowType<scalar_t>;
    const scalar_t* q = query.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    // Head dims 64 and 128 (value groups of kValueGroup channels) as compile-time constants.
    const bool grouped = value_scales.size(4) * kValueGroup == dim;
    auto one = grouped && dim == 64    ? decode_one<scalar_t, W, 64>
               : grouped && dim == 128 ? decode_one<scalar_t, W, 128>
                                       : decode_one<scalar_t, W, 0>;
    at::parallel_for(0, nd * heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / heads, h = task % heads, offset = task * group * dim;
        one(q + offset, group, dim, heads, h, lens[n], block_size, block_tables.data_ptr<int64_t>() + n * width,
            data.data_ptr<int8_t>(), key_params.data_ptr<float>(), value_scales.data_ptr<float>(),
            value_scales.size(4), num_blocks, window.data_ptr<W>(), num_slots, slots[n], from[n],
            static_cast<float>(scale), o + offset);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(kvserve, m) {
  m.def(
      "decode_attention(Tensor query, Tensor data, Tensor key_params, Tensor value_scales, Tensor window, "
      "Tensor block_tables, Tensor context_lens, Tensor window_slots, Tensor window_from, float scale, "
      "Tensor(a!) out) -> Tensor(a!)");
  m.def("gather_dequant(Tensor data, Tensor key_params, Tensor value_scales, Tensor block_ids, Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(kvserve, CPU, m) {
  m.impl("gather_dequant", &gather_dequant);
  m.impl("decode_attention", &decode_attention);
}
