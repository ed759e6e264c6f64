// What an AVX2 core (no VNNI) can do with the integer products of kernels/linear.cpp's panels, one core,
// data in L1: the ceiling behind issue 15's one unmet target (benchmarks/README.md, "The AVX2 ceiling").
// Run through avx2_int_tiles.py, or:
//
//     g++ -O3 -mavx2 -mfma -mf16c -o /tmp/avx2_int_tiles benchmarks/avx2_int_tiles.cpp && /tmp/avx2_int_tiles
//
// 1. Which execution ports the multiply-adds share: 12 independent vpmaddwd, 12 vfmadd231ps, and 6 of
//    each, in cycles-equivalent nanoseconds per loop (inline assembly, so the compiler cannot reorder).
// 2. A register tile of 3 rows of x x 24 outputs over 16 blocks of 32 (one slice of a panel), as the AVX2
//    build runs it: int16 activations (madd_epi16 of pairs, int32 sums, converted and scaled once per
//    block into out); the same loop without the per-block scaling (the multiply-adds alone: a bound, its
//    results not a product); and int8 activations as llama.cpp uses them (maddubs_epi16 of 4-bit codes
//    x int8, int16 sums over a block, widened once per block). Best of 40 rounds, GMAC/s. The tiles
//    alone: in linear.cpp's whole product (packing, quantizing, scaling) their gains shrink (int8:
//    1.65x here, 1.0-1.27x there; benchmarks/README.md).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlocks = 16, kRows = 48, kLdx = 576, kNbx = 18, kPanel = 24;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

#define PORT_LOOP(name, body)                                                                                   \
  {                                                                                                            \
    const long n = 100000000;                                                                                  \
    const auto t0 = std::chrono::steady_clock::now();                                                          \
    for (long i = 0; i < n; ++i)                                                                               \
      __asm__ volatile(body ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", \
                       "xmm10", "xmm11", "xmm14", "xmm15");                                                    \
    std::printf("  %-24s %.3f ns per loop\n", name, seconds_since(t0) / n * 1e9);                              \
  }
#define MADD(d) "vpmaddwd %%ymm14, %%ymm15, %%ymm" #d "\n"
#define FMA(d) "vfmadd231ps %%ymm14, %%ymm15, %%ymm" #d "\n"

void ports() {
  std::printf("ports (12 independent instructions per loop):\n");
  PORT_LOOP("12 vpmaddwd", MADD(0) MADD(1) MADD(2) MADD(3) MADD(4) MADD(5) MADD(6) MADD(7) MADD(8) MADD(9) MADD(10)
                               MADD(11))
  PORT_LOOP("12 vfmadd231ps", FMA(0) FMA(1) FMA(2) FMA(3) FMA(4) FMA(5) FMA(6) FMA(7) FMA(8) FMA(9) FMA(10) FMA(11))
  PORT_LOOP("6 vpmaddwd + 6 vfmadd", MADD(0) FMA(6) MADD(1) FMA(7) MADD(2) FMA(8) MADD(3) FMA(9) MADD(4) FMA(10)
                                         MADD(5) FMA(11))
}

// One step's three weight vectors (24 outputs' units) at p.
inline void load_units(const int32_t* p, __m256i (&w)[3]) {
  for (int j = 0; j < 3; ++j) w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8 * j));
}

// Block b's int32 sums of row t of x, vector j, into out: scaled by the weight scales x x's block scale,
// plus the mins' term (both tiles end each block with this).
inline void add_block(__m256i sum, const float* scales, const float* mins, const float* xd, const float* xs, int64_t b,
                      int t, int j, float* out) {
  float* o = out + t * kPanel + 8 * j;
  const __m256 d = _mm256_set1_ps(xd[t * kNbx + b]), total = _mm256_set1_ps(xs[t * kNbx + b]);
  const __m256 acc = _mm256_fmadd_ps(_mm256_loadu_ps(mins + b * kPanel + 8 * j), total, _mm256_loadu_ps(o));
  const __m256 scale = _mm256_mul_ps(_mm256_loadu_ps(scales + b * kPanel + 8 * j), d);
  _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc));
}

// int16: pairs [16 per block][24] 32-bit units (two codes of one output row), x int16.
template <bool Scale>
__attribute__((noinline)) void tile_int16(const int32_t* pairs, const float* scales, const float* mins,
                                          const int16_t* xq, const float* xd, const float* xs, float* out) {
  for (int64_t b = 0; b < kBlocks; ++b) {
    __m256i sum[3][3];
    for (auto& row : sum)
      for (auto& s : row) s = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int i = 0; i < 16; ++i) {
      const int64_t c = b * 16 + i;
      __m256i w[3];
      load_units(pairs + c * kPanel, w);
      for (int t = 0; t < 3; ++t) {
        int32_t pair;
        std::memcpy(&pair, xq + t * kLdx + 2 * c, 4);
        const __m256i v = _mm256_set1_epi32(pair);
        for (int j = 0; j < 3; ++j) sum[t][j] = _mm256_add_epi32(sum[t][j], _mm256_madd_epi16(w[j], v));
      }
    }
    for (int t = 0; t < 3; ++t)
      for (int j = 0; j < 3; ++j) {
        if (Scale) add_block(sum[t][j], scales, mins, xd, xs, b, t, j, out);
        else if (b == kBlocks - 1)  // the multiply-adds alone: keep the sums observable, nothing more
          _mm256_storeu_ps(out + t * kPanel + 8 * j, _mm256_cvtepi32_ps(sum[t][j]));
      }
  }
}

// int8: quads [8 per block][24] 32-bit units (four 4-bit codes of one output row as bytes), x int8. A
// block's 8 maddubs results per lane stay within int16: 8 x 2 x 15 x 127 = 30,480.
__attribute__((noinline)) void tile_int8(const int32_t* quads, const float* scales, const float* mins,
                                         const int8_t* xq, const float* xd, const float* xs, float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < kBlocks; ++b) {
    __m256i sum[3][3];
    for (auto& row : sum)
      for (auto& s : row) s = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const int64_t c = b * 8 + i;
      __m256i w[3];
      load_units(quads + c * kPanel, w);
      for (int t = 0; t < 3; ++t) {
        int32_t quad;
        std::memcpy(&quad, xq + t * kLdx + 4 * c, 4);
        const __m256i v = _mm256_set1_epi32(quad);
        for (int j = 0; j < 3; ++j) sum[t][j] = _mm256_add_epi16(sum[t][j], _mm256_maddubs_epi16(w[j], v));
      }
    }
    for (int t = 0; t < 3; ++t)
      for (int j = 0; j < 3; ++j) add_block(_mm256_madd_epi16(sum[t][j], ones), scales, mins, xd, xs, b, t, j, out);
  }
}

}  // namespace

int main() {
  ports();
  std::vector<int32_t> pairs(kBlocks * 16 * kPanel, 0x00050003), quads(kBlocks * 8 * kPanel, 0x05030507);
  std::vector<float> scales(kBlocks * kPanel, 0.01f), mins(kBlocks * kPanel, -0.02f), out(kRows * kPanel);
  std::vector<int16_t> x16(kRows * kLdx, 7);
  std::vector<int8_t> x8(kRows * kLdx, 7);
  std::vector<float> xd(kRows * kNbx, 0.001f), xs(kRows * kNbx, 0.5f);
  const char* names[3] = {"int16 (the AVX2 build's)", "int16, multiply-adds alone", "int8 (llama.cpp's Q8)"};
  double best[3] = {};
  for (int round = 0; round < 40; ++round)
    for (int kind = 0; kind < 3; ++kind) {
      const auto t0 = std::chrono::steady_clock::now();
      const int reps = 2000;
      for (int r = 0; r < reps; ++r)
        for (int64_t t = 0; t < kRows; t += 3) {
          const int64_t xo = t * kLdx, so = t * kNbx;
          float* o = out.data() + t * kPanel;
          if (kind == 0) tile_int16<true>(pairs.data(), scales.data(), mins.data(), x16.data() + xo, xd.data() + so, xs.data() + so, o);
          if (kind == 1) tile_int16<false>(pairs.data(), scales.data(), mins.data(), x16.data() + xo, xd.data() + so, xs.data() + so, o);
          if (kind == 2) tile_int8(quads.data(), scales.data(), mins.data(), x8.data() + xo, xd.data() + so, xs.data() + so, o);
        }
      best[kind] = std::max(best[kind], double(reps) * kRows * kBlocks * 32 * kPanel / seconds_since(t0) / 1e9);
    }
  std::printf("register tiles, 3 rows of x x 24 outputs x 16 blocks, one core, best of 40 (GMAC/s):\n");
  for (int kind = 0; kind < 3; ++kind) std::printf("  %-28s %6.1f\n", names[kind], best[kind]);
  std::printf("(checksum %g)\n", out[3]);
}
