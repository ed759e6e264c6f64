// kvserve's fused CPU operations for the decoder layer (fp32), and the module that binds them with
// linear.cpp's products, paged_attention.cpp's decode attention and decoder.cpp's layer stack
// (kernels/__init__.py builds the four into one module per ISA).
//
// Each replaces several PyTorch operators, each a pass over memory and an interpreter round trip:
// - add_rms_norm: residual += x; out = rms_norm(residual) * weight (vLLM's fused_add_rms_norm).
// - silu_mul: [T, 2I] gate|up -> silu(gate) * up [T, I].
// - rope_kv_write: rotates this step's queries and keys in place inside the fused QKV output
//   (rotate-half / GPT-NeoX convention, as layers.apply_rotary) and writes the keys and values into
//   their slots of a plain [2, blocks, block_size, Hkv, D] cache.
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "check.h"
#include "vec_math.h"

at::Tensor q_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                    const at::Tensor& bias, int64_t bits, int64_t max_int_rows,
                    const c10::optional<at::Tensor>& out_buffer = c10::nullopt);
at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t max_dot_rows,
                      const c10::optional<at::Tensor>& out_buffer = c10::nullopt);
at::Tensor product_output(const at::Tensor& x, int64_t m, int64_t n, const c10::optional<at::Tensor>& out_buffer);
at::Tensor decode_attention_f32(const at::Tensor& queries, const at::Tensor& cache, const at::Tensor& block_tables,
                                const at::Tensor& lens, double scale);
void bind_decoder(pybind11::module& m);

namespace {

void check_rows(const at::Tensor& t, const char* name) {
  KV_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be float32 on the CPU");
  KV_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be [T, C] with contiguous rows");
}

}  // namespace

// residual [T, H] += x [T, H] (in place; x may be undefined: residual is then taken as it is);
// returns rms_norm(residual) * weight, [T, H]. Statistics in fp32, as HF's LlamaRMSNorm.
at::Tensor add_rms_norm(const c10::optional<at::Tensor>& x, at::Tensor& residual, const at::Tensor& weight,
                        double eps) {
  check_rows(residual, "residual");
  KV_CHECK(residual.is_contiguous(), "residual must be contiguous");
  const int64_t tokens = residual.size(0), hidden = residual.size(1);
  KV_CHECK(weight.is_contiguous() && weight.numel() == hidden && weight.scalar_type() == at::kFloat,
           "weight must be [H] float32");
  const bool add = x.has_value() && x->defined();
  if (add) {
    check_rows(*x, "x");
    KV_CHECK(x->size(0) == tokens && x->size(1) == hidden, "x and residual must have one shape");
  }
  at::Tensor out = at::empty_like(residual);
  float* r = residual.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float* xp = add ? x->data_ptr<float>() : nullptr;
  const int64_t x_stride = add ? x->stride(0) : 0;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* __restrict__ row = r + t * hidden;
      float sum = 0.0f;
      if (add) {
        const float* __restrict__ xr = xp + t * x_stride;
        for (int64_t i = 0; i < hidden; ++i) {
          row[i] += xr[i];
          sum += row[i] * row[i];
        }
      } else {
        for (int64_t i = 0; i < hidden; ++i) sum += row[i] * row[i];
      }
      const float inv = 1.0f / std::sqrt(sum / hidden + static_cast<float>(eps));
      float* __restrict__ dst = o + t * hidden;
      for (int64_t i = 0; i < hidden; ++i) dst[i] = w[i] * (row[i] * inv);
    }
  });
  return out;
}

// gate_up [T, 2I] -> silu(gate_up[:, :I]) * gate_up[:, I:], [T, I]. Eight lanes at a time through
// vec_math.h's exp8: with std::exp per element it took ~15 ms of a 256-token prefill step of the
// default model (Zen 4, either build), 4% of the step.
// out_buffer: where to write it (linear.cpp's product_output), else a new tensor.
at::Tensor silu_mul(const at::Tensor& gate_up, const c10::optional<at::Tensor>& out_buffer = c10::nullopt) {
  check_rows(gate_up, "gate_up");
  const int64_t tokens = gate_up.size(0), inner = gate_up.size(1) / 2;
  KV_CHECK(gate_up.size(1) == 2 * inner, "gate_up must have an even width");
  at::Tensor out = product_output(gate_up, tokens, inner, out_buffer);
  const float* g = gate_up.data_ptr<float>();
  const int64_t stride = gate_up.stride(0);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, tokens * inner, 2048, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t t = begin / inner, i0 = begin % inner, i1 = std::min(inner, i0 + (end - begin));
      const float* __restrict__ gate = g + t * stride;
      const float* __restrict__ up = gate + inner;
      float* __restrict__ dst = o + t * inner;
      int64_t i = i0;
      for (; i + 8 <= i1; i += 8) {
        const __m256 g8 = _mm256_loadu_ps(gate + i);
        const __m256 denominator = _mm256_add_ps(_mm256_set1_ps(1.0f), kvserve_vec::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g8)));
        _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_div_ps(g8, denominator), _mm256_loadu_ps(up + i)));
      }
      for (; i < i1; ++i) dst[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
      begin += i1 - i0;
    }
  });
  return out;
}

// qkv [T, (Hq + 2 Hkv) D]: queries, keys, values side by side per token. cos, sin [T, D/2].
// Rotates queries and keys in place; when cache is defined ([2, blocks, block_size, Hkv, D] float32, or
// float16: rounded to nearest even, as torch's .to(float16)), writes keys and values to flat slots
// `slots` [T] (block * block_size + offset).
void rope_kv_write(at::Tensor& qkv, int64_t num_heads, int64_t num_kv_heads, const at::Tensor& cos,
                   const at::Tensor& sin, const c10::optional<at::Tensor>& cache, const c10::optional<at::Tensor>& slots) {
  check_rows(qkv, "qkv");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  KV_CHECK(cos.is_contiguous() && sin.is_contiguous(), "cos and sin must be contiguous");
  const int64_t tokens = qkv.size(0), half = cos.size(1), dim = 2 * half;
  KV_CHECK(qkv.size(1) == (num_heads + 2 * num_kv_heads) * dim, "qkv width must be (Hq + 2 Hkv) * D");
  KV_CHECK(cos.size(0) == tokens && sin.size(0) == tokens && sin.size(1) == half, "cos, sin must be [T, D/2]");
  const bool write = cache.has_value() && cache->defined();
  int64_t num_slots = 0;
  if (write) {
    const auto type = cache->scalar_type();
    KV_CHECK(cache->device().is_cpu() && (type == at::kFloat || type == at::kHalf) && cache->is_contiguous() &&
                 cache->dim() == 5 && cache->size(0) == 2 && cache->size(3) == num_kv_heads && cache->size(4) == dim,
             "cache must be a contiguous float32 or float16 [2, blocks, block_size, Hkv, D]");
    KV_CHECK(slots.has_value() && slots->scalar_type() == at::kLong && slots->is_contiguous() &&
                 slots->numel() == tokens,
             "slots must be [T] int64");
    num_slots = cache->size(1) * cache->size(2);
  }
  float* base = qkv.data_ptr<float>();
  const int64_t stride = qkv.stride(0), row = num_kv_heads * dim;
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  const bool to_half = write && cache->scalar_type() == at::kHalf;
  float* keys = write && !to_half ? cache->data_ptr<float>() : nullptr;
  float* values = keys ? keys + num_slots * row : nullptr;
  at::Half* half_keys = to_half ? cache->data_ptr<at::Half>() : nullptr;
  at::Half* half_values = to_half ? half_keys + num_slots * row : nullptr;
  const int64_t* slot = write ? slots->data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* x = base + t * stride;
      const float* __restrict__ ct = c + t * half;
      const float* __restrict__ st = s + t * half;
      for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {  // queries, then keys
        float* __restrict__ x1 = x + h * dim;
        float* __restrict__ x2 = x1 + half;
        for (int64_t i = 0; i < half; ++i) {
          const float a = x1[i], b = x2[i];
          x1[i] = a * ct[i] - b * st[i];
          x2[i] = b * ct[i] + a * st[i];
        }
      }
      if (write) {
        const int64_t at_slot = slot[t];
        KV_CHECK(at_slot >= 0 && at_slot < num_slots, "slot ", at_slot, " out of range");
        const float* k = x + num_heads * dim;
        const float* v = k + row;
        if (to_half) {
          at::Half* __restrict__ hk = half_keys + at_slot * row;
          at::Half* __restrict__ hv = half_values + at_slot * row;
          for (int64_t i = 0; i < row; ++i) hk[i] = static_cast<at::Half>(k[i]);
          for (int64_t i = 0; i < row; ++i) hv[i] = static_cast<at::Half>(v[i]);
        } else {
          std::memcpy(keys + at_slot * row, k, row * sizeof(float));
          std::memcpy(values + at_slot * row, v, row * sizeof(float));
        }
      }
    }
  });
}

// Every kernel releases the GIL while it runs (it touches no Python object): the server's HTTP thread
// streams tokens meanwhile instead of waiting for the engine thread's next Python line.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("q_linear", &q_linear, "x @ W^T for a quantized W (linear.cpp)", py::arg("x"), py::arg("codes"),
        py::arg("scales"), py::arg("mins"), py::arg("bias"), py::arg("bits"), py::arg("max_int_rows"),
        py::arg("out") = py::none(), release());
  m.def("f32_linear", &f32_linear, "x @ W^T for an fp32 W (linear.cpp)", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("max_dot_rows"), py::arg("out") = py::none(), release());
  m.def("add_rms_norm", &add_rms_norm, "residual += x; rms_norm(residual) * weight", release());
  m.def("silu_mul", &silu_mul, "silu(gate) * up", py::arg("gate_up"), py::arg("out") = py::none(), release());
  m.def("rope_kv_write", &rope_kv_write, "rotary embedding in place, keys and values into the cache", release());
  m.def("decode_attention_f32", &decode_attention_f32, "decode attention from a plain fp32 or fp16 paged cache (paged_attention.cpp)",
        release());
  bind_decoder(m);  // decoder.cpp: DecoderStack, the layers in one call
}
