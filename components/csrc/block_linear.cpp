// y = x @ W^T + bias for a few rows of x, with W held in the blocks it was quantized in (GGUF Q4_1 or Q8_0).
//
// The weights are stored losslessly: components/block_linear.py keeps a matrix in this form only if every
// weight is exactly d*q + m (Q4_1) or d*q (Q8_0) in float32 for its block's fp16 scales, which is how a GGUF
// checkpoint's weights were produced when it was loaded. Each weight is rebuilt here with one fused multiply-add
// (d*q is exact in float32, so fma(q, d, m) rounds once, as float32 `d * q + m` does) and multiplied in float32.
// A decoding step then streams 0.625 (Q4_1) or 1.06 (Q8_0) bytes per weight instead of 4.
//
// Layouts (built by components/block_linear.py), per panel of 16 output features and block of 32 inputs:
//   Q4_1  nibbles uint8 [N/16][K/32][16][16]: byte [j][n] = q[n][2j] | q[n][2j+1] << 4
//         scales  fp16  [N/16][K/32][2][16]:  d[n], then m[n]
//   Q8_0  values  int8  [N/16][K/32][32][16]: q[n][k]
//         scales  fp16  [N/16][K/32][16]:     d[n]
// Each output is accumulated over k in order, in one float32 accumulator per (row, output).
// Plain C ABI, called through ctypes (which releases the GIL for the call).

#include <immintrin.h>

#include <cstdint>
#include <vector>

#define KERNEL_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,fma,f16c")))

extern "C" int block_linear_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

namespace {

// One format per struct: its code type, the bytes of codes and fp16 scales per panel-block, and the panel kernel.
// A panel kernel multiplies MR rows by one panel (16 outputs) over all K inputs; xt is x transposed and
// zero-padded to MR rows: xt[k * MR + r] = x[r][k].
struct Q4_1 {
  using Code = uint8_t;
  static constexpr int code_bytes = 256;   // 32 inputs x 16 outputs, two nibbles a byte
  static constexpr int scale_halves = 32;  // d and m for 16 outputs

  template <int MR>
  KERNEL_TARGET static void panel(const float* xt, int blocks, const Code* codes, const uint16_t* scales,
                                  float* out) {
    __m512 acc[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
    const __m128i low = _mm_set1_epi8(0x0F);
    for (int b = 0; b < blocks; ++b) {
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + b * 32)));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + b * 32 + 16)));
      const Code* cb = codes + b * code_bytes;
      const float* xb = xt + b * 32 * MR;
#pragma GCC unroll 2
      for (int j = 0; j < 16; ++j) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cb + j * 16));
        const __m128i lo = _mm_and_si128(v, low);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
        const __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d, m);
        const __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d, m);
        const float* x0 = xb + (2 * j) * MR;
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x0[r]), w0, acc[r]);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x0[MR + r]), w1, acc[r]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) _mm512_storeu_ps(out + r * 16, acc[r]);
  }
};

struct Q8_0 {
  using Code = int8_t;
  static constexpr int code_bytes = 512;   // 32 inputs x 16 outputs
  static constexpr int scale_halves = 16;  // d for 16 outputs

  template <int MR>
  KERNEL_TARGET static void panel(const float* xt, int blocks, const Code* codes, const uint16_t* scales,
                                  float* out) {
    __m512 acc[MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
    for (int b = 0; b < blocks; ++b) {
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + b * 16)));
      const Code* cb = codes + b * code_bytes;
      const float* xb = xt + b * 32 * MR;
#pragma GCC unroll 2
      for (int k = 0; k < 32; ++k) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cb + k * 16));
        const __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)), d);
        const float* x0 = xb + k * MR;
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x0[r]), w, acc[r]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) _mm512_storeu_ps(out + r * 16, acc[r]);
  }
};

template <typename Format, int MR>
void run(const float* x, int rows, int K, int N, const typename Format::Code* codes, const uint16_t* scales,
         const float* bias, float* y, int threads) {
  std::vector<float> xt(static_cast<size_t>(K) * MR, 0.0f);
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < K; ++k) xt[static_cast<size_t>(k) * MR + r] = x[static_cast<size_t>(r) * K + k];
  const int blocks = K / 32, panels = N / 16;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
  for (int p = 0; p < panels; ++p) {
    alignas(64) float out[MR * 16];
    Format::template panel<MR>(xt.data(), blocks, codes + static_cast<size_t>(p) * blocks * Format::code_bytes,
                               scales + static_cast<size_t>(p) * blocks * Format::scale_halves, out);
    for (int r = 0; r < rows; ++r)
      for (int n = 0; n < 16; ++n)
        y[static_cast<size_t>(r) * N + p * 16 + n] = out[r * 16 + n] + (bias ? bias[p * 16 + n] : 0.0f);
  }
}

// Returns 0 on success, 1 if the shapes are not the kernel's (rows outside 1..16, K % 32, N % 16).
template <typename Format>
int linear(const float* x, int rows, int K, int N, const typename Format::Code* codes, const uint16_t* scales,
           const float* bias, float* y, int threads) {
  if (rows < 1 || rows > 16 || K % 32 != 0 || N % 16 != 0) return 1;
  // The fewest registers that hold the rows: a narrowed batch does not pay for 16.
  if (rows <= 1) run<Format, 1>(x, rows, K, N, codes, scales, bias, y, threads);
  else if (rows <= 2) run<Format, 2>(x, rows, K, N, codes, scales, bias, y, threads);
  else if (rows <= 4) run<Format, 4>(x, rows, K, N, codes, scales, bias, y, threads);
  else if (rows <= 8) run<Format, 8>(x, rows, K, N, codes, scales, bias, y, threads);
  else run<Format, 16>(x, rows, K, N, codes, scales, bias, y, threads);
  return 0;
}

}  // namespace

extern "C" int q4_1_linear(const float* x, int rows, int K, int N, const uint8_t* codes, const uint16_t* scales,
                           const float* bias, float* y, int threads) {
  return linear<Q4_1>(x, rows, K, N, codes, scales, bias, y, threads);
}

extern "C" int q8_0_linear(const float* x, int rows, int K, int N, const int8_t* codes, const uint16_t* scales,
                           const float* bias, float* y, int threads) {
  return linear<Q8_0>(x, rows, K, N, codes, scales, bias, y, threads);
}
