// A whole stack of Llama decoder layers in one call, for a step of decodes only over plain fp32 caches
// (models/llama.py's LlamaForCausalLM.forward takes it when the step allows; everything else runs the
// layers from Python).
//
// Why: at batch 1 a layer's nine kernels (norm, QKV, RoPE + KV write, attention, O, norm, gate/up,
// SiLU x up, down) take ~150 us on the project's AVX2 machines, and the Python between them (module
// calls, views, splits, argument conversion) took ~180 us more: a third of a decode step. Here the
// same kernels run in the same order on the same tensors, so the result is bitwise the one the Python
// layers give (tests/test_compute_kernels.py checks it), and the step pays one Python call instead of
// ~300. The queries are read where they lie in the fused QKV output (no copy).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "check.h"

at::Tensor q_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& mins,
                    const at::Tensor& bias, int64_t bits, int64_t max_int_rows,
                    const c10::optional<at::Tensor>& out_buffer = c10::nullopt);
at::Tensor f32_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t max_dot_rows,
                      const c10::optional<at::Tensor>& out_buffer = c10::nullopt);
at::Tensor add_rms_norm(const c10::optional<at::Tensor>& x, at::Tensor& residual, const at::Tensor& weight,
                        double eps);
at::Tensor silu_mul(const at::Tensor& gate_up, const c10::optional<at::Tensor>& out_buffer = c10::nullopt);
void rope_kv_write(at::Tensor& qkv, int64_t num_heads, int64_t num_kv_heads, const at::Tensor& cos,
                   const at::Tensor& sin, const c10::optional<at::Tensor>& cache, const c10::optional<at::Tensor>& slots);
void decode_attention_rows(const float* q, int64_t q_stride, int64_t nd, int64_t heads, int64_t group, int64_t dim,
                           const at::Tensor& cache, const at::Tensor& block_tables, const at::Tensor& lens, double scale,
                           float* out);

namespace {

// One matrix product's weight, as layers.Linear holds it: quantized (codes, scales, mins may be empty)
// or dense fp32 (weight). bias may be empty. Dispatches as Linear.forward does, so results are equal.
struct Projection {
  at::Tensor codes, scales, mins, weight, bias;
  int64_t bits = 0;
  int64_t max_int_rows = 0;  // layers.INT_KERNEL_MAX_ROWS
  int64_t max_f32_rows = 0;  // layers.F32_KERNEL_MAX_ROWS

  at::Tensor operator()(const at::Tensor& x) const {
    if (codes.defined() && codes.numel() > 0) return q_linear(x, codes, scales, mins, bias, bits, max_int_rows);
    return f32_linear(x, weight, bias, max_f32_rows);
  }
};

std::shared_ptr<Projection> quantized_projection(at::Tensor codes, at::Tensor scales, at::Tensor mins,
                                                 at::Tensor bias, int64_t bits, int64_t max_int_rows) {
  KV_CHECK(codes.numel() > 0, "a quantized projection needs codes");
  auto p = std::make_shared<Projection>();
  p->codes = codes, p->scales = scales, p->mins = mins, p->bias = bias, p->bits = bits, p->max_int_rows = max_int_rows;
  return p;
}

std::shared_ptr<Projection> dense_projection(at::Tensor weight, at::Tensor bias, int64_t max_f32_rows) {
  KV_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "a dense projection needs a float32 [N, K] weight");
  auto p = std::make_shared<Projection>();
  p->weight = weight, p->bias = bias, p->max_f32_rows = max_f32_rows;
  return p;
}

struct LlamaLayer {
  at::Tensor input_norm, post_attention_norm;
  double eps;
  std::shared_ptr<Projection> qkv, o, gate_up, down;
  int64_t num_heads, num_kv_heads, head_dim;
  double scale;
};

struct DecoderStack {
  std::vector<std::shared_ptr<LlamaLayer>> layers;

  // residual [Nd, H] (the embeddings; updated in place as the stream); cos, sin [Nd, D/2];
  // caches: one plain [2, blocks, block_size, Hkv, D] float32 cache per layer; slots [Nd] int64;
  // block_tables [Nd, W] int64; lens [Nd] int64 (context length after this token).
  // -> (the last layer's MLP output, not yet added to the stream; the stream), as the Python layers.
  std::tuple<at::Tensor, at::Tensor> decode(at::Tensor residual, const at::Tensor& cos, const at::Tensor& sin,
                                            const std::vector<at::Tensor>& caches, const at::Tensor& slots,
                                            const at::Tensor& block_tables, const at::Tensor& lens) const {
    KV_CHECK(caches.size() == layers.size(), "one cache per layer: got ", caches.size(), " for ", layers.size());
    KV_CHECK(residual.dim() == 2 && residual.is_contiguous(), "residual must be a contiguous [Nd, H]");
    const int64_t nd = residual.size(0);
    c10::optional<at::Tensor> h;
    for (size_t i = 0; i < layers.size(); ++i) {
      const LlamaLayer& layer = *layers[i];
      const at::Tensor& cache = caches[i];
      const int64_t group = layer.num_heads / layer.num_kv_heads;
      at::Tensor x = add_rms_norm(h, residual, layer.input_norm, layer.eps);
      at::Tensor qkv = (*layer.qkv)(x);
      rope_kv_write(qkv, layer.num_heads, layer.num_kv_heads, cos, sin, cache, slots);
      at::Tensor attn = at::empty({nd, layer.num_heads * layer.head_dim}, residual.options());
      decode_attention_rows(qkv.data_ptr<float>(), qkv.stride(0), nd, layer.num_kv_heads, group, layer.head_dim, cache,
                            block_tables, lens, layer.scale, attn.data_ptr<float>());
      at::Tensor o = (*layer.o)(attn);
      x = add_rms_norm(o, residual, layer.post_attention_norm, layer.eps);
      h = (*layer.down)(silu_mul((*layer.gate_up)(x)));
    }
    KV_CHECK(h.has_value(), "the stack has no layers");
    return {*h, residual};
  }
};

}  // namespace

void bind_decoder(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Projection, std::shared_ptr<Projection>>(m, "Projection");
  m.def("quantized_projection", &quantized_projection, "a quantized weight for DecoderStack (linear.cpp's layout)");
  m.def("dense_projection", &dense_projection, "a dense fp32 weight for DecoderStack");
  py::class_<LlamaLayer, std::shared_ptr<LlamaLayer>>(m, "LlamaLayer")
      .def(py::init([](at::Tensor input_norm, at::Tensor post_attention_norm, double eps, std::shared_ptr<Projection> qkv,
                       std::shared_ptr<Projection> o, std::shared_ptr<Projection> gate_up,
                       std::shared_ptr<Projection> down, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                       double scale) {
        KV_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
        return std::make_shared<LlamaLayer>(LlamaLayer{input_norm, post_attention_norm, eps, qkv, o, gate_up, down,
                                                       num_heads, num_kv_heads, head_dim, scale});
      }));
  py::class_<DecoderStack, std::shared_ptr<DecoderStack>>(m, "DecoderStack")
      .def(py::init([](std::vector<std::shared_ptr<LlamaLayer>> layers) {
        return std::make_shared<DecoderStack>(DecoderStack{std::move(layers)});
      }))
      .def("decode", &DecoderStack::decode, "every layer for a step of decodes only (see decoder.cpp)",
           py::call_guard<py::gil_scoped_release>());
}
