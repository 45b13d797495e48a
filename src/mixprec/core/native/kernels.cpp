// mixprec's hand-written CPU kernels, loaded by mixprec.core.native:
// - block quantization with amax scales (NVFP4, DeepSeek-V3's FP8 blocks) in one pass
//   over memory: per block the amax, the scale in its format, and the elements rounded
//   onto their grid, times the scale (mixprec.core.block_kernels' amax_scales,
//   flushed_nearest and _round_bits), optionally packed into codes;
// - decoding of block codes (block_storage.unpack_blocks);
// - rounding to a scalar format (mixprec.core.kernels.round_grid, with a per-tensor
//   scale), with FP8 storage bytes and the amax beside (storage.quantize_stored_with_amax).
// Each equals the torch kernels bit for bit; tests/core/test_native.py compares them on
// adversarial inputs.
//
// The arithmetic is the torch kernels', operation for operation: integer operations on
// float32 bit patterns (int32 with two's complement wrap, spelled with uint32 where C++
// would call the wrap undefined), IEEE float32 multiplies and divides, round half to
// even. Compiled without fast-math, so no float operation is reassociated or flushed.
// Loops are branch-free so that the compiler vectorises them.

#include <cstdint>
#include <cmath>
#include <cstring>
#include <algorithm>
#include <vector>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// The element-level helpers below are called inside loops meant to vectorise: a call
// left there stops the loop from vectorising (scalar stochastic rounding ran 10x slower
// once the file outgrew gcc's inlining budget), so they are always inlined.
#define MIXPREC_INLINE inline __attribute__((always_inline))

namespace {

constexpr int32_t kAbsMask = 0x7FFFFFFF;
constexpr int32_t kInt32Min = INT32_MIN;
constexpr int32_t kF32Inf = 0x7F800000;
constexpr int32_t kF32QNaN = 0x7FC00000;
constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr uint32_t kMix1 = 0x85EBCA6Bu;
constexpr uint32_t kMix2 = 0xC2B2AE35u;

MIXPREC_INLINE int32_t bits_of(float v) { return __builtin_bit_cast(int32_t, v); }
MIXPREC_INLINE float float_of(int32_t b) { return __builtin_bit_cast(float, b); }

// The kernel parameters of a format (mixprec.core.kernels.param_values).
struct Params {
  int32_t shift, max_bits, overflow_bits, subnormal_below, step_bits, f32_subnormal_drop, min_bits,
      invalid_below;
};

MIXPREC_INLINE Params params_of(const int32_t* p) {
  return Params{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
}

// mixprec.core.kernels._hash_bits of flat index ``index``.
MIXPREC_INLINE uint32_t hash_bits(uint32_t index, uint32_t key0, uint32_t key1) {
  uint32_t h = ((index ^ key1) * kGolden) ^ key0;
  h ^= h >> 16;
  h *= kMix1;
  h ^= h >> 13;
  h *= kMix2;
  return h ^ (h >> 16);
}

// mixprec.core.kernels._round_bits of the float32 with bits ``bits``; ``stochastic``
// adds the random bits ``random``.
MIXPREC_INLINE int32_t round_bits(int32_t bits, const Params p, bool stochastic, uint32_t random) {
  int32_t magnitude = bits & kAbsMask;
  int32_t sign = bits & kInt32Min;
  int32_t exponent = std::max(magnitude >> 23, 1);
  int32_t significand = magnitude - ((exponent - 1) << 23);
  int32_t drop = p.shift + std::max(p.subnormal_below - exponent, 0);
  drop = magnitude < (1 << 23) ? p.f32_subnormal_drop : drop;
  int32_t increment, drop_mask;
  bool tiny_up;
  if (!stochastic) {
    drop = std::min(drop, 25);
    drop_mask = (1 << drop) - 1;
    increment = (drop_mask >> 1) + ((significand >> drop) & 1 & drop_mask);
    tiny_up = significand > ((1 << drop) >> 1);
  } else {
    drop = std::min(drop, 61);
    drop_mask = (1 << std::min(drop, 24)) - 1;
    increment = static_cast<int32_t>(random) & drop_mask;
    int32_t left = static_cast<int32_t>(static_cast<uint32_t>(significand) << std::max(30 - drop, 0));
    int32_t threshold = left >> std::min(std::max(drop - 30, 0), 31);
    tiny_up = static_cast<int32_t>(random & 0x3FFFFFFFu) < threshold;
  }
  int32_t rounded = static_cast<int32_t>((static_cast<uint32_t>(magnitude) + static_cast<uint32_t>(increment)) &
                                         ~static_cast<uint32_t>(drop_mask));
  const int32_t step_bits = p.step_bits;  // a value, not a load under a mask
  int32_t result = drop >= 24 ? (tiny_up ? step_bits : 0) : rounded;
  result = result > p.max_bits ? p.overflow_bits : result;
  result = std::max(result, p.min_bits);
  result = magnitude > kF32Inf ? magnitude : result;
  return bits < p.invalid_below ? kF32QNaN : (result | sign);
}

// mixprec.core.block_kernels.flushed_nearest's rounding of one product's bits: round to
// nearest even in float arithmetic (mixprec.core.kernels.nearest_steps), saturating at
// the element's largest value, NaN kept.
MIXPREC_INLINE int32_t nearest_saturating(int32_t bits, int32_t mantissa_bits, int32_t step_min, int32_t largest) {
  int32_t magnitude = bits & kAbsMask;
  int32_t clamped = std::min(magnitude, kF32Inf - 1);
  int32_t step_exp = std::max((clamped >> 23) - mantissa_bits, step_min);
  float inverse = float_of((254 - step_exp) << 23);
  float step = float_of(step_exp << 23);
  float kept = float_of(clamped <= ((step_min - 1) << 23) ? 0 : clamped);
  // kept * inverse is x in steps, at most 2**(mantissa_bits + 1) <= 2**23: adding and
  // subtracting 2**23 rounds it half to even (the default rounding mode), vectorised
  // where gcc's roundevenf is not
  const float in_steps = kept * inverse;
  const float whole = (in_steps + 8388608.0f) - 8388608.0f;
  int32_t rounded = std::min(bits_of(whole * step), largest);
  rounded = magnitude > kF32Inf ? magnitude : rounded;
  return rounded | (bits & kInt32Min);
}

template <typename T>
inline int32_t load_bits(const T* x, int64_t i);

template <>
MIXPREC_INLINE int32_t load_bits<float>(const float* x, int64_t i) { return bits_of(x[i]); }

// an IEEE half, read through its bits (a type of its own, for the templates)
struct Half {
  uint16_t bits;
};

template <>
MIXPREC_INLINE int32_t load_bits<Half>(const Half* x, int64_t i) {
  // widened exactly, as torch's cast: a subnormal half is its integer significand times
  // 2**-24 (an exact conversion and product), Inf and NaN keep their payload
  const int32_t h = x[i].bits;
  const int32_t sign = (h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  const int32_t normal = ((exponent + 112) << 23) | (mantissa << 13);
  const int32_t special = kF32Inf | (mantissa << 13);
  const int32_t subnormal = bits_of(static_cast<float>(mantissa) * 0x1p-24f);
  return sign | (exponent == 0 ? subnormal : (exponent == 31 ? special : normal));
}

// torch's float32 -> float16 cast (c10's fp16_ieee_from_fp32_value): half to even, Inf
// past the range, NaN to 0x7E00 with its sign.
MIXPREC_INLINE uint16_t half_bits(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = static_cast<uint32_t>(bits_of(f));
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = float_of(static_cast<int32_t>((bias >> 1) + 0x07800000u)) + base;
  const uint32_t bits = static_cast<uint32_t>(bits_of(base));
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

template <>
MIXPREC_INLINE int32_t load_bits<uint16_t>(const uint16_t* x, int64_t i) {  // bfloat16
  return static_cast<int32_t>(static_cast<uint32_t>(x[i]) << 16);
}

// Store n floats (a multiple of 16; dst 64-byte aligned) with non-temporal stores where
// the CPU has AVX-512: written past the cache, without first reading the line.
inline void stream_row(float* dst, const float* src, int64_t n) {
#if defined(__AVX512F__)
  for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_load_ps(src + i));
#else
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
#endif
}

MIXPREC_INLINE uint16_t bf16_bits(float v) {
  // torch's float32 -> bfloat16 conversion: round half to even, NaN to 0x7FC0
  const uint32_t u = static_cast<uint32_t>(bits_of(v));
  const uint16_t rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return v != v ? static_cast<uint16_t>(0x7FC0) : rounded;
}

// bf16_bits of 16 floats, stored as 16-bit words: in 32-bit lanes with AVX-512, then
// narrowed (gcc vectorises the plain loop for 32 elements, and 16 ran in its scalar
// remainder).
MIXPREC_INLINE void bf16_16(const float* v, uint16_t* out) {
#if defined(__AVX512F__)
  const __m512 f = _mm512_loadu_ps(v);
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0))));
#else
  for (int c = 0; c < 16; ++c) out[c] = bf16_bits(v[c]);
#endif
}

struct Job {
  int64_t groups, rows, h, cols;
  Params element, scale;
  float largest, divisor, scale_min;  // element largest, scale largest * element largest, scale's smallest normal
  int two_level, unscaled, stochastic, stream, out_bf16;
  float tensor_scale;
  uint32_t key0, key1;
  const int32_t* codes;  // the element's encoding (pack only)
  int code_bits;
};

// storage._encode of an element value on its grid (finite): the format's code, sign
// bit on top, from the format's mantissa bits, bias, float32 biased exponent of the
// smallest normal and sign bit.
MIXPREC_INLINE int32_t encode(int32_t bits, int32_t m, int32_t bias, int32_t min_exp_biased, int32_t sign_bit) {
  const int32_t magnitude = bits & kAbsMask;
  const int32_t exponent = magnitude >> 23;
  const int32_t normal = ((exponent - 127 + bias) << m) | ((magnitude & 0x7FFFFF) >> (23 - m));
  // a subnormal k * 2**(min_exponent - m) times 2**(m - min_exponent) is the integer k
  const int32_t steps = static_cast<int32_t>(float_of(magnitude + ((m - (min_exp_biased - 127)) << 23)));
  const int32_t subnormal = exponent == 0 ? 0 : steps;
  const int32_t code = exponent < min_exp_biased ? subnormal : normal;
  return code | (((bits >> 31) & 1) << sign_bit);
}

// One row of a block (cols a multiple of 16) packed as block_storage's pack kernel does:
// the element codes (zero in a block whose scale is NaN; 4-bit ones two a byte, the
// first in the low nibble) and, where ``out`` is not null, the values element * scale.
template <typename T>
void pack_row(const T* x, float* out, uint8_t* codes, int64_t start, int64_t cols, float f, int32_t fl, float s,
              const Job& job) {
  const int32_t mantissa_bits = 23 - job.element.shift;
  const int32_t step_min = job.element.step_bits >> 23;
  const int32_t largest = job.element.max_bits;
  const Params element = job.element;
  const uint32_t key0 = job.key0, key1 = job.key1;
  const bool bad = s != s;
  const int32_t m = job.codes[0], bias = job.codes[1], min_exp_biased = job.codes[2], sign_bit = job.codes[3];
  const bool stochastic = job.stochastic;  // read once (see run_unit)
  const int code_bits = job.code_bits;
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {
    const int64_t at = start + c0;
    int32_t rounded[16];
    if (!stochastic) {
#pragma omp simd
      for (int c = 0; c < 16; ++c) {
        const int32_t b = load_bits(x, at + c);
        const int32_t kept = (b & kAbsMask) < fl ? (b & kInt32Min) : b;
        rounded[c] = nearest_saturating(bits_of(float_of(kept) * f), mantissa_bits, step_min, largest);
      }
    } else {
#pragma omp simd
      for (int c = 0; c < 16; ++c) {
        const int32_t b = load_bits(x, at + c);
        const int32_t kept = (b & kAbsMask) < fl ? (b & kInt32Min) : b;
        const uint32_t random = hash_bits(static_cast<uint32_t>(at + c), key0, key1);
        rounded[c] = round_bits(bits_of(float_of(kept) * f), element, true, random);
      }
    }
    if (out != nullptr) {
#pragma omp simd
      for (int c = 0; c < 16; ++c) out[at + c] = float_of(rounded[c]) * s;
    }
    int32_t code[16];
#pragma omp simd
    for (int c = 0; c < 16; ++c) code[c] = bad ? 0 : encode(rounded[c], m, bias, min_exp_biased, sign_bit);
    if (code_bits == 4) {
      for (int c = 0; c < 8; ++c) codes[at / 2 + c] = static_cast<uint8_t>(code[2 * c] | (code[2 * c + 1] << 4));
    } else {
      for (int c = 0; c < 16; ++c) codes[at + c] = static_cast<uint8_t>(code[c]);
    }
  }
}

constexpr int64_t kUnitBlocks = 64;  // blocks per unit of work where blocks are rows of one (1-D blocks)

// The largest magnitude's bits of each of ``count`` blocks whose element (r, j, c) lies at
// base + r * row_stride + j * cols + c, into amax[j] (a NaN's bits above Inf's).
template <typename T, int64_t kCols>
MIXPREC_INLINE void block_amax(const T* x, int64_t base, int64_t count, int64_t row_stride, const Job& job, int32_t* amax) {
  const int64_t rows = job.rows, cols = kCols != 0 ? kCols : job.cols;
  for (int64_t j = 0; j < count; ++j) amax[j] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < count; ++j) {
      const int64_t start = base + r * row_stride + j * cols;
      int32_t m = amax[j];
      for (int64_t c = 0; c < cols; ++c) m = std::max(m, load_bits(x, start + c) & kAbsMask);
      amax[j] = m;
    }
  }
}

// One unit of work: ``count`` blocks laid out as block_amax reads them, block j's scale
// going to scales[j]. ``known`` (not null): the blocks' amaxes, found by the tensor amax's
// pass; else they are found here, into ``amax``.
// kCols: the block's columns as a constant (0: job.cols), so that a block of 16 is one
// vector with no loop around it.
template <typename T, int64_t kCols, bool kPack>
void run_unit(const T* x, float* out, uint8_t* codes, int64_t base, int64_t count, int64_t row_stride, const Job& job,
              float* full_out, const int32_t* known, int32_t* amax, float* factor, int32_t* floor, float* full,
              float* scale_of) {
  const int64_t rows = job.rows, cols = kCols != 0 ? kCols : job.cols;
  if (known != nullptr) {
    for (int64_t j = 0; j < count; ++j) amax[j] = known[j];
  } else {
    block_amax<T, kCols>(x, base, count, row_stride, job, amax);
  }
  // the scales, as block_kernels.amax_scales computes them: in whole vectors of 16
  // blocks (the arrays are padded with zero amaxes), so that no store is masked, which
  // would stall the element loop's reads of them (no store-to-load forwarding)
  const float tensor_scale = job.tensor_scale;
  const float tensor_inverse = 1.0f / tensor_scale;
  const float element_largest = job.largest, scale_min = job.scale_min;
  const Params scale_params = job.scale;
  const bool two_level = job.two_level, unscaled = job.unscaled;
  const int64_t padded = (count + 15) / 16 * 16;
  for (int64_t j = count; j < padded; ++j) amax[j] = 0;
  for (int64_t j0 = 0; j0 < padded; j0 += 16) {
#pragma omp simd
    for (int64_t l = 0; l < 16; ++l) {
      const int64_t j = j0 + l;
      const int32_t a = amax[j];
      const bool bad = a >= kF32Inf;
      float block = float_of(a) / element_largest;
      block = two_level ? block / tensor_scale : block;
      block = block < scale_min ? scale_min : block;  // NaN stays NaN, as torch.clamp
      block = float_of(round_bits(bits_of(block), scale_params, false, 0));
      block = bad ? float_of(kF32QNaN) : block;
      float reciprocal = two_level ? tensor_inverse / block : 1.0f / block;
      reciprocal = a == 0 ? 0.0f : reciprocal;
      factor[j] = reciprocal;
      // block_kernels.flush_floor: x under it gives a product under 2**-125, zero either way
      const int32_t r_exp = (bits_of(reciprocal) >> 23) & 0xFF;
      const float tiny = (1.0f / reciprocal) * 0x1.6a09e6p-126f;  // 2**-125.5 in float32
      floor[j] = (r_exp != 0 && r_exp != 0xFF) ? bits_of(tiny) : 0;
      full[j] = two_level && !unscaled ? tensor_scale * block : block;
      scale_of[j] = block;
    }
  }
  if (full_out != nullptr) {
    for (int64_t j = 0; j < count; ++j) full_out[j] = scale_of[j];
  }
  const int32_t mantissa_bits = 23 - job.element.shift;
  const int32_t step_min = job.element.step_bits >> 23;
  const int32_t largest = job.element.max_bits;
  const Params element = job.element;
  const uint32_t key0 = job.key0, key1 = job.key1;
  if constexpr (kPack) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < count; ++j) {
        const int64_t start = base + r * row_stride + j * cols;
        pack_row(x, out, codes, start, cols, factor[j], floor[j], full[j], job);
      }
    }
    return;
  }
  // the job's flags read once: read through ``job`` inside the loop, they were reloaded
  // after every store to ``out`` (a float store may alias the job's float fields)
  const bool stochastic = job.stochastic, out_bf16 = job.out_bf16;
  const bool staged = kCols != 0 && kCols % 16 == 0 && (job.stream || out_bf16);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < count; ++j) {
      const int64_t start = base + r * row_stride + j * cols;
      const float f = factor[j], s = full[j];
      const int32_t fl = floor[j];
      // a row of a block is computed into ``row`` and then stored, streaming past the
      // cache where the caller asks (a tensor too large for it), else in place
      // (BF16 output: computed into ``row``, then rounded to BF16 as torch casts)
      alignas(64) float row[kCols != 0 ? kCols : 1];
      float* o = staged ? row : out + start;
      if (!stochastic) {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          const int32_t b = load_bits(x, start + c);
          const int32_t kept = (b & kAbsMask) < fl ? (b & kInt32Min) : b;
          const int32_t product = bits_of(float_of(kept) * f);
          o[c] = float_of(nearest_saturating(product, mantissa_bits, step_min, largest)) * s;
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          const int32_t b = load_bits(x, start + c);
          const int32_t kept = (b & kAbsMask) < fl ? (b & kInt32Min) : b;
          const int32_t product = bits_of(float_of(kept) * f);
          const uint32_t random = hash_bits(static_cast<uint32_t>(start + c), key0, key1);
          o[c] = float_of(round_bits(product, element, true, random)) * s;
        }
      }
      if (staged && out_bf16) {
        uint16_t* narrow = reinterpret_cast<uint16_t*>(out) + start;
        for (int64_t c = 0; c < cols; c += 16) bf16_16(row + c, narrow + c);
      } else if (staged) {
        stream_row(out + start, row, cols);
      }
    }
  }
}

// The whole quantization in one OpenMP parallel region (under a passive wait policy each
// region wakes the threads anew, which costs more than the work on small tensors): the
// tensor amax where a two-level format needs it, then the units of blocks. The tensor
// amax's pass finds every block's amax on the way (its reads are the memory's pace, the
// reductions come free), kept for the second pass, which then only scales and rounds;
// the tensor amax leaves out the blocks that hold NaN or Inf.
template <typename T, int64_t kCols, bool kPack>
void run_all(const T* x, float* out, uint8_t* codes, const Job& job, const float* tensor_amax,
             float* tensor_scale_out, float* scales_out, int threads) {
  const int64_t blocks_total = job.groups * job.h;
  const bool one_d = job.rows == 1;
  const int64_t units = one_d ? (blocks_total + kUnitBlocks - 1) / kUnitBlocks : job.groups;
  const int64_t per_unit = one_d ? kUnitBlocks : job.h;
  const int64_t padded = (per_unit + 15) / 16 * 16;
  const bool find_amax = job.two_level && tensor_amax == nullptr;
  std::vector<int32_t> amaxes(find_amax ? units * padded : 0);  // each unit's block amaxes
  int32_t finite = 0;  // shared: the reduction below combines into it
#pragma omp parallel num_threads(threads)
  {
    if (find_amax) {
#pragma omp for reduction(max : finite) schedule(static)
      for (int64_t u = 0; u < units; ++u) {
        const int64_t first_block = u * per_unit;
        const int64_t base = one_d ? first_block * job.cols : u * job.rows * job.h * job.cols;
        const int64_t count = one_d ? std::min(kUnitBlocks, blocks_total - first_block) : job.h;
        int32_t* amax = amaxes.data() + u * padded;
        block_amax<T, kCols>(x, base, count, job.h * job.cols, job, amax);
        int32_t m = 0;
        for (int64_t j = 0; j < count; ++j) m = std::max(m, amax[j] < kF32Inf ? amax[j] : 0);
        finite = std::max(finite, m);
      }
    }
    Job local = job;  // each thread's copy, with the tensor scale (the same in every thread)
    if (job.two_level) {
      const float amax_value = tensor_amax != nullptr ? *tensor_amax : float_of(finite);
      const float scale = amax_value / job.divisor;
      local.tensor_scale = scale < 0x1p-126f ? 0x1p-126f : scale;
#pragma omp single nowait
      *tensor_scale_out = local.tensor_scale;
    }
    std::vector<int32_t> amax(padded), floor(padded);
    std::vector<float> factor(padded), full(padded), scale_of(padded);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      int64_t base, count, first_block;
      if (one_d) {
        first_block = u * kUnitBlocks;
        base = first_block * job.cols;
        count = std::min(kUnitBlocks, blocks_total - first_block);
      } else {
        first_block = u * job.h;
        base = u * job.rows * job.h * job.cols;
        count = job.h;
      }
      run_unit<T, kCols, kPack>(x, out, codes, base, count, job.h * job.cols, local,
                                scales_out == nullptr ? nullptr : scales_out + first_block,
                                find_amax ? amaxes.data() + u * padded : nullptr, amax.data(), factor.data(),
                                floor.data(), full.data(), scale_of.data());
    }
#if defined(__AVX512F__)
    if (job.stream) _mm_sfence();  // this thread's streamed stores are visible before it returns
#endif
  }
}

template <typename T, bool kPack>
int dispatch_cols(const T* x, float* out, uint8_t* codes, const Job& job, const float* tensor_amax,
                  float* tensor_scale_out, float* scales_out, int threads) {
  switch (job.cols) {
    case 16:
      run_all<T, 16, kPack>(x, out, codes, job, tensor_amax, tensor_scale_out, scales_out, threads);
      break;
    case 128:
      run_all<T, 128, kPack>(x, out, codes, job, tensor_amax, tensor_scale_out, scales_out, threads);
      break;
    default:
      run_all<T, 0, kPack>(x, out, codes, job, tensor_amax, tensor_scale_out, scales_out, threads);
  }
  return 0;
}

template <typename T>
int dispatch_pack(const T* x, float* out, uint8_t* codes, const Job& job, const float* tensor_amax,
                  float* tensor_scale_out, float* scales_out, int threads) {
  if (codes == nullptr) return dispatch_cols<T, false>(x, out, codes, job, tensor_amax, tensor_scale_out, scales_out,
                                                       threads);
  return dispatch_cols<T, true>(x, out, codes, job, tensor_amax, tensor_scale_out, scales_out, threads);
}

// Decode block-format codes: each element's value (``table``, indexed by code) times its
// block's scale, as block_storage.unpack_blocks computes it: (value * (tensor_scale *
// scale)) rounded to the output dtype. Blocked layout as for quantization; cols a
// multiple of 16.

// 16 codes starting at element ``at``: 4-bit ones from 8 bytes (element 2i in the low
// nibble of byte i), else one a byte.
inline void load_codes(const uint8_t* codes, int code_bits, int64_t at, int32_t* code) {
  if (code_bits == 4) {
    for (int c = 0; c < 8; ++c) {
      const int32_t byte = codes[at / 2 + c];
      code[2 * c] = byte & 0xF;
      code[2 * c + 1] = byte >> 4;
    }
  } else {
    for (int c = 0; c < 16; ++c) code[c] = codes[at + c];
  }
}

template <typename Out>
void unpack_row(const uint8_t* codes, int code_bits, const float* table, float full, Out* out, int64_t start,
                int64_t cols) {
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {
    const int64_t at = start + c0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (code_bits == 4) {
      // the 8 bytes widened to 16-bit lanes, each lane's two nibbles moved into its two
      // bytes (low nibble first), widened again to 16 int32 codes: a register lookup
      // into the 16-entry table
      const __m128i bytes = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + at / 2)));
      const __m128i nibbles = _mm_or_si128(_mm_and_si128(bytes, _mm_set1_epi16(0xF)),
                                           _mm_slli_epi16(_mm_srli_epi16(bytes, 4), 8));
      const __m512 values = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nibbles),
                                                                 _mm512_loadu_ps(table)),
                                          _mm512_set1_ps(full));
      if constexpr (sizeof(Out) == 4) {
        _mm512_storeu_ps(reinterpret_cast<float*>(out + at), values);
      } else {
        alignas(64) float staged[16];
        _mm512_store_ps(staged, values);
#pragma omp simd
        for (int c = 0; c < 16; ++c) out[at + c] = bf16_bits(staged[c]);
      }
      continue;
    }
#endif
    int32_t code[16];
    load_codes(codes, code_bits, at, code);
    if constexpr (sizeof(Out) == 4) {
#pragma omp simd
      for (int c = 0; c < 16; ++c) out[at + c] = table[code[c]] * full;
    } else {
#pragma omp simd
      for (int c = 0; c < 16; ++c) out[at + c] = bf16_bits(table[code[c]] * full);
    }
  }
}

template <typename Out>
void unpack_all(const uint8_t* codes, int code_bits, const float* table, const float* scales, const float* tensor_scale,
                Out* out, int64_t groups, int64_t rows, int64_t h, int64_t cols, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < h; ++j) {
        const float scale = scales[g * h + j];
        const float full = tensor_scale != nullptr ? *tensor_scale * scale : scale;
        unpack_row(codes, code_bits, table, full, out, ((g * rows + r) * h + j) * cols, cols);
      }
    }
  }
}

// mixprec.core.kernels._round_nearest_float of the float32 with bits ``bits``: round to
// nearest even in float arithmetic (nearest_steps), past the largest to the overflow
// result, NaN kept.
MIXPREC_INLINE int32_t nearest_float(int32_t bits, int32_t mantissa_bits, int32_t step_min, int32_t largest,
                             int32_t overflow_bits) {
  const int32_t magnitude = bits & kAbsMask;
  const int32_t clamped = std::min(magnitude, kF32Inf - 1);
  const int32_t step_exp = std::max((clamped >> 23) - mantissa_bits, step_min);
  const float inverse = float_of((254 - step_exp) << 23);
  const float step = float_of(step_exp << 23);
  const float kept = float_of(clamped <= ((step_min - 1) << 23) ? 0 : clamped);
  const float whole = (kept * inverse + 8388608.0f) - 8388608.0f;  // half to even, as above
  int32_t rounded = bits_of(whole * step);
  rounded = rounded > largest ? overflow_bits : rounded;
  rounded = magnitude > kF32Inf ? magnitude : rounded;
  return rounded | (bits & kInt32Min);
}

// torch's float32 -> float8 cast of a value on the FP8 grid (finite), or of Inf / NaN:
// the generic encoding for finite values, E4M3FN's NaN code for Inf and NaN, E5M2's
// Inf and NaN codes. kind 1: e4m3fn, 2: e5m2.
MIXPREC_INLINE int32_t fp8_code(int32_t bits, int kind) {
  const int32_t magnitude = bits & kAbsMask;
  const int32_t sign = (bits >> 24) & 0x80;
  int32_t code;
  if (kind == 1) {
    code = magnitude >= kF32Inf ? 0x7F : encode(bits & kAbsMask, 3, 7, 121, 7);
  } else {
    code = magnitude > kF32Inf ? 0x7F : (magnitude == kF32Inf ? 0x7C : encode(bits & kAbsMask, 2, 15, 113, 7));
  }
  return code | sign;
}

// 16 elements of a 16-bit x as float32 bits (load_bits), into ``out``: with AVX-512 by
// the conversion instructions (gcc vectorises the plain loop for 32 elements, and 16
// then ran in its scalar remainder), FP16 NaNs patched to keep their payload as
// torch's cast does (the instruction sets the quiet bit).
template <typename T>
MIXPREC_INLINE void widen16(const T* x, int32_t* out) {
#if defined(__AVX512F__)
  const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m512i h = _mm512_cvtepu16_epi32(words);
  if constexpr (std::is_same_v<T, Half>) {
    const __m512i converted = _mm512_castps_si512(_mm512_cvtph_ps(words));
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(h, _mm512_set1_epi32(0x7FFF)),
                                                  _mm512_set1_epi32(0x7C00));
    const __m512i special = _mm512_or_si512(
        _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(h, _mm512_set1_epi32(0x8000)), 16),
                        _mm512_set1_epi32(kF32Inf)),
        _mm512_slli_epi32(_mm512_and_si512(h, _mm512_set1_epi32(0x3FF)), 13));
    _mm512_storeu_si512(out, _mm512_mask_mov_epi32(converted, nan, special));
  } else {
    _mm512_storeu_si512(out, _mm512_slli_epi32(h, 16));
  }
#else
  for (int c = 0; c < 16; ++c) out[c] = load_bits(x, c);
#endif
}

// half_bits of 16 floats, stored as 16-bit words (see bf16_16): with AVX-512 by the
// conversion instruction (round to nearest even, Inf past the range, as torch's cast),
// NaN patched to torch's 0x7E00 with its sign.
MIXPREC_INLINE void half16(const float* v, uint16_t* out) {
#if defined(__AVX512F__)
  const __m512 f = _mm512_loadu_ps(v);
  const __m512i half = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  const __m512i nan_half = _mm512_or_si512(_mm512_and_si512(half, _mm512_set1_epi32(0x8000)), _mm512_set1_epi32(0x7E00));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(half, nan, nan_half)));
#else
  for (int c = 0; c < 16; ++c) out[c] = half_bits(v[c]);
#endif
}

// fp8_code(bits, 2) of 16 float32 values on the E5M2 grid (or Inf, NaN): E5M2 is
// FP16's top byte, so with AVX-512 the FP16 conversion (exact on that grid) shifted
// right by 8, NaN patched to 0x7F.
MIXPREC_INLINE void e5m2_codes16(const int32_t* rounded, int32_t* out) {
#if defined(__AVX512F__)
  const __m512i bits = _mm512_loadu_si512(rounded);
  const __m512i half = _mm512_cvtepu16_epi32(
      _mm512_cvtps_ph(_mm512_castsi512_ps(bits), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m512i code = _mm512_srli_epi32(half, 8);
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(bits, _mm512_set1_epi32(kAbsMask)),
                                                _mm512_set1_epi32(kF32Inf));
  const __m512i nan_code = _mm512_or_si512(_mm512_and_si512(code, _mm512_set1_epi32(0x80)), _mm512_set1_epi32(0x7F));
  _mm512_storeu_si512(out, _mm512_mask_mov_epi32(code, nan, nan_code));
#else
  for (int c = 0; c < 16; ++c) out[c] = fp8_code(rounded[c], 2);
#endif
}

struct RoundJob {
  Params p;
  int float_path, stochastic;
  uint32_t key0, key1;
  int scaled;
  float scale_inverse, scale;
  int values_dtype;  // -1 none, 0 float32, 1 bfloat16
  int storage_kind;  // 0 none, 1 e4m3fn, 2 e5m2
};

// Elements per step of round_range's loop: four vectors of 16, so that each step's
// constants are set up once for 64 elements and the four vectors' dependency chains
// overlap (one vector a step, on one thread: rounding to nearest 1.1-1.5x slower,
// stochastic rounding 1.07x).
constexpr int64_t kRoundStep = 64;

template <typename T>
void round_range(const T* x, int64_t begin, int64_t end, const RoundJob& job, void* values, uint8_t* storage) {
  const Params p = job.p;
  const int32_t mantissa_bits = 23 - p.shift, step_min = p.step_bits >> 23;
  const int32_t largest = p.max_bits, overflow_bits = p.overflow_bits;
  const uint32_t key0 = job.key0, key1 = job.key1;
  const float scale_inverse = job.scale_inverse, scale = job.scale;
  const bool scaled = job.scaled, stochastic = job.stochastic, float_path = job.float_path;
  for (int64_t c0 = begin; c0 < end; c0 += kRoundStep) {
    const int64_t width = std::min<int64_t>(kRoundStep, end - c0);
    int32_t rounded[kRoundStep];
    if (width == kRoundStep) {
      // x's bits in 32-bit lanes: float32 read where it lies; 16-bit x widened into a
      // local array first (widen16)
      int32_t widened[kRoundStep];
      const int32_t* bits;
      if constexpr (std::is_same_v<T, float>) {
        bits = reinterpret_cast<const int32_t*>(x + c0);
      } else {
        for (int64_t v = 0; v < kRoundStep; v += 16) widen16(x + c0 + v, widened + v);
        bits = widened;
      }
      if (stochastic) {
#pragma omp simd
        for (int c = 0; c < kRoundStep; ++c) {
          const float v = scaled ? float_of(bits[c]) * scale_inverse : float_of(bits[c]);
          rounded[c] = round_bits(bits_of(v), p, true, hash_bits(static_cast<uint32_t>(c0 + c), key0, key1));
        }
      } else if (float_path) {
#pragma omp simd
        for (int c = 0; c < kRoundStep; ++c) {
          const float v = scaled ? float_of(bits[c]) * scale_inverse : float_of(bits[c]);
          rounded[c] = nearest_float(bits_of(v), mantissa_bits, step_min, largest, overflow_bits);
        }
      } else {
#pragma omp simd
        for (int c = 0; c < kRoundStep; ++c) {
          const float v = scaled ? float_of(bits[c]) * scale_inverse : float_of(bits[c]);
          rounded[c] = round_bits(bits_of(v), p, false, 0);
        }
      }
    } else {
      std::fill(rounded, rounded + kRoundStep, 0);  // the lanes past x's end, computed below and not written
      for (int c = 0; c < width; ++c) {
        const float v = scaled ? float_of(load_bits(x, c0 + c)) * scale_inverse : float_of(load_bits(x, c0 + c));
        rounded[c] = stochastic ? round_bits(bits_of(v), p, true, hash_bits(static_cast<uint32_t>(c0 + c), key0, key1))
                     : float_path ? nearest_float(bits_of(v), mantissa_bits, step_min, largest, overflow_bits)
                                  : round_bits(bits_of(v), p, false, 0);
      }
    }
    if (job.values_dtype == 0) {
      float* out = static_cast<float*>(values) + c0;
#pragma omp simd
      for (int c = 0; c < width; ++c) out[c] = scaled ? float_of(rounded[c]) * scale : float_of(rounded[c]);
    }
    // 8- and 16-bit outputs computed in 32-bit lanes first, then narrowed by a plain
    // copy: a loop that computes and stores them at once is vectorised by gcc for 32 or
    // 64 elements, and a chunk of 16 then ran in its scalar remainder (3-4x slower)
    if (job.values_dtype == 1 || job.values_dtype == 2) {
      for (int64_t v = 0; v < width; v += 16) {
        float staged[16];
#pragma omp simd simdlen(16)
        for (int c = 0; c < 16; ++c) staged[c] = scaled ? float_of(rounded[v + c]) * scale : float_of(rounded[v + c]);
        uint16_t words[16];
        if (job.values_dtype == 1) {
          bf16_16(staged, words);
        } else {
          half16(staged, words);
        }
        std::memcpy(static_cast<uint16_t*>(values) + c0 + v, words,
                    static_cast<size_t>(std::min<int64_t>(16, width - v)) * sizeof(uint16_t));
      }
    }
    if (job.storage_kind != 0) {
      for (int64_t v = 0; v < width; v += 16) {
        int32_t narrow[16];
        if (job.storage_kind == 1) {
#pragma omp simd simdlen(16)
          for (int c = 0; c < 16; ++c) narrow[c] = fp8_code(rounded[v + c], 1);
        } else {
          e5m2_codes16(rounded + v, narrow);
        }
        const int64_t valid = std::min<int64_t>(16, width - v);
        for (int c = 0; c < valid; ++c) storage[c0 + v + c] = static_cast<uint8_t>(narrow[c]);
      }
    }
  }
}

template <typename T>
void round_all(const T* x, int64_t n, const RoundJob& job, void* values, uint8_t* storage, float* amax, int threads) {
  int32_t largest = 0;
  const int64_t chunks = (n + 4095) / 4096;
#pragma omp parallel num_threads(threads)
  {
    if (amax != nullptr) {
#pragma omp for simd reduction(max : largest) schedule(static)
      for (int64_t i = 0; i < n; ++i) largest = std::max(largest, load_bits(x, i) & kAbsMask);
#pragma omp single nowait
      *amax = float_of(largest);
    }
#pragma omp for schedule(static)
    for (int64_t k = 0; k < chunks; ++k) round_range(x, k * 4096, std::min(n, (k + 1) * 4096), job, values, storage);
  }
}


// ---- power-of-two (E8M0) block scales: the MX formats ------------------------------------
// mixprec.core.block_kernels' pow2 kernels: per block the amax, the scale exponent k by
// the block's rule (_pow2_exponent), and each element rounded onto the element grid moved
// up k binades, written as the dequantized value (pow2_nearest_fused to nearest where the
// moved grid's smallest spacing is a float32 normal, round_pow2_grid otherwise and for
// stochastic rounding), optionally with its code (the value times 2**-k, encoded).

// 1 << n and a >> n as torch's int32 shifts compute them: 0 (or the sign) for shifts past
// the width, where C++ leaves them undefined
// (both shifts evaluated unconditionally, with in-range counts, so that the loops stay
// branch-free and vectorise)
MIXPREC_INLINE int32_t shl(int32_t a, int32_t n) {
  const int32_t shifted = static_cast<int32_t>(static_cast<uint32_t>(a) << (n & 31));
  return n >= 32 ? 0 : shifted;
}
MIXPREC_INLINE int32_t shr(int32_t a, int32_t n) { return a >> std::min(n, 31); }

// block_kernels._pow2: the bits of 2**k for k in [-127, 127]
MIXPREC_INLINE int32_t pow2_bits(int32_t k) {
  return k >= -126 ? (k + 127) << 23 : 1 << std::min(std::max(k + 149, 0), 22);
}

struct Pow2Job {
  int64_t groups, rows, h, cols;
  Params element;
  int rule;
  int32_t emax, even_add;
  float largest;
  int stochastic, stream, out_kind;  // out_kind: 0 none, 1 float32, 2 bfloat16
  uint32_t key0, key1;
  const int32_t* codes;  // the element's encoding (see encode); null: no codes
  int code_bits;
};

// block_kernels._pow2_exponent of a finite amax's bits (any bits: unused where not
// finite). Every rule is computed and one selected, branch-free, so that the loop over
// blocks vectorises.
MIXPREC_INLINE int32_t pow2_exponent(int32_t abits, const Pow2Job& job) {
  const int32_t floor_k = (abits >> 23) - 127 - job.emax;
  const int32_t ceil_k = floor_k + ((abits & 0x7FFFFF) != 0 ? 1 : 0);
  const int32_t even_k =
      ((static_cast<int32_t>(static_cast<uint32_t>(abits) + static_cast<uint32_t>(job.even_add)) >> 23) & 0xFF) - 127 -
      job.emax;
  const int32_t rbits = bits_of(float_of(abits) / job.largest);
  const int32_t e_rceil = (rbits >> 23) - 127 + ((rbits & 0x7FFFFF) != 0 ? 1 : 0);
  const int32_t subnormal = rbits > (1 << 22) ? -126 : -127;
  const int32_t rceil_k = rbits < (1 << 23) ? subnormal : e_rceil;
  const int rule = job.rule;
  const int32_t k = rule == 0 ? floor_k : (rule == 1 ? ceil_k : (rule == 2 ? even_k : rceil_k));
  return std::min(std::max(k, -127), 127);
}

// block_kernels.round_pow2_grid of one element's bits (flat index ``index``) onto the grid
// with bounds sb (subnormal_below), largest, past and step.
// kNormal: the caller vouches that x is zero or a float32 normal, where x's own binade
// is its exponent field's and nothing is normalised (zero rounds to zero either way):
// the stochastic path in fewer operations.
template <bool kStochastic, bool kNormal = false>
MIXPREC_INLINE int32_t round_moved(int32_t bits, int32_t sb, int32_t largest, int32_t past, int32_t step, int32_t shift,
                           uint32_t random) {
  const int32_t magnitude = bits & kAbsMask;
  const int32_t sign = bits & kInt32Min;
  const int32_t exponent = std::max(magnitude >> 23, 1);
  int32_t significand = magnitude - ((exponent - 1) << 23);
  // the conversion's exponent (exact below 2**23), used whatever the magnitude: gcc would
  // sink a conversion used in one arm of the select into a branch (it may raise an
  // inexact flag), and the loop would not vectorise. A normal x's converted exponent plus
  // 1024 lies above every exponent, so the minimum picks the exponent there.
  int32_t own = exponent;
  if constexpr (!kNormal) {
    const int32_t converted = (bits_of(static_cast<float>(magnitude)) >> 23) - 149;
    own = std::min(converted + (magnitude < (1 << 23) ? 0 : 1024), exponent);
  }
  int32_t drop = shift + std::max(sb, own) - exponent;
  int32_t increment, drop_mask;
  bool tiny_up;
  if (!kStochastic) {
    drop = std::min(drop, 25);
    drop_mask = shl(1, drop) - 1;
    increment = (drop_mask >> 1) + (shr(significand, drop) & 1 & drop_mask);
    tiny_up = significand > (shl(1, drop) >> 1);
  } else if constexpr (kNormal) {
    drop = std::min(drop, 61);
    drop_mask = shl(1, std::min(drop, 24)) - 1;
    increment = static_cast<int32_t>(random) & drop_mask;
    const int32_t threshold = shr(shl(significand, std::max(30 - drop, 0)), std::min(std::max(drop - 30, 0), 31));
    tiny_up = static_cast<int32_t>(random & 0x3FFFFFFFu) < threshold;
  } else {
    const int32_t normalise = exponent - own;
    drop = std::min(drop + normalise, 61);
    const int32_t wide_mask = shl(1, std::min(drop, 24)) - 1;
    increment = shr(static_cast<int32_t>(random) & wide_mask, normalise);
    drop_mask = shr(wide_mask, normalise);
    significand = shl(significand, normalise);
    const int32_t threshold = shr(shl(significand, std::max(30 - drop, 0)), std::min(std::max(drop - 30, 0), 31));
    tiny_up = static_cast<int32_t>(random & 0x3FFFFFFFu) < threshold;
  }
  const int32_t rounded = static_cast<int32_t>((static_cast<uint32_t>(magnitude) + static_cast<uint32_t>(increment)) &
                                               ~static_cast<uint32_t>(drop_mask));
  // selects one at a time on int32 values (a select on combined conditions did not vectorise)
  const int32_t tiny = tiny_up ? step : 0;
  int32_t result = drop >= 24 ? tiny : rounded;
  result = result < 0 ? past : result;
  result = result > largest ? past : result;  // past is largest, or NaN in a block where largest is -1
  return result | sign;
}

// The per-block constants of a unit's blocks (block_kernels.pow2_grid), computed for 16
// blocks at a time in vector registers (the arrays are padded with zero amaxes).
struct Pow2Blocks {
  std::vector<int32_t> amax, step_min, sb, largest, past, step, integer_path, bad, overflows, subnormal_input;
  std::vector<float> inverse, scale;
  explicit Pow2Blocks(int64_t n)
      : amax(n), step_min(n), sb(n), largest(n), past(n), step(n), integer_path(n), bad(n), overflows(n),
        subnormal_input(n), inverse(n), scale(n) {}
};

inline void pow2_block_constants(Pow2Blocks& b, int64_t count, const Pow2Job& job) {
  const Params pe = job.element;
  const int64_t padded = (count + 15) / 16 * 16;
  for (int64_t j = count; j < padded; ++j) b.amax[j] = 0;
  const bool stochastic = job.stochastic;
#pragma omp simd
  for (int64_t j = 0; j < padded; ++j) {
    const int32_t a = b.amax[j];
    const int32_t bad = a >= kF32Inf ? 1 : 0;
    const int32_t k = pow2_exponent(a, job);
    const int32_t step_min = (pe.step_bits >> 23) + k;
    const int32_t largest = static_cast<int32_t>(static_cast<uint32_t>(pe.max_bits) + (static_cast<uint32_t>(k) << 23));
    b.step_min[j] = std::max(step_min, 2);
    b.sb[j] = pe.subnormal_below + k;
    b.largest[j] = bad ? -1 : largest;
    b.past[j] = bad ? kF32QNaN : largest;
    b.step[j] = pow2_bits(((pe.step_bits >> 23) - 127) + k);
    // pow2_nearest_fused leaves the blocks whose moved grid reaches below float32's
    // normals to round_pow2_grid; stochastic rounding takes that path everywhere
    b.integer_path[j] = (stochastic || (step_min < 2 && a > 0)) ? 1 : 0;
    b.bad[j] = bad;
    b.overflows[j] = (!bad && (pe.max_bits >> 23) + k >= 255) ? 1 : 0;  // largest * 2**k past float32's range
    b.inverse[j] = float_of(pow2_bits(-k));  // 2**-k: a value times it is its element, exactly
    b.scale[j] = bad ? float_of(kF32QNaN) : float_of(pow2_bits(k));
  }
}

// Store n (a multiple of 16) rounded float32 bit patterns as kOut: 1 float32 (streamed
// past the cache where asked), 2 BF16 as torch casts them.
template <int kOut>
inline void store_values(void* out, int64_t at, const int32_t* rounded, int64_t n, bool stream) {
  if constexpr (kOut == 1) {
    float* o = static_cast<float*>(out) + at;
#if defined(__AVX512F__)
    if (stream) {
      for (int64_t c = 0; c < n; c += 16) _mm512_stream_ps(o + c, _mm512_load_ps(reinterpret_cast<const float*>(rounded + c)));
      return;
    }
#endif
    std::memcpy(o, rounded, static_cast<size_t>(n) * sizeof(float));
  } else if constexpr (kOut == 2) {
    uint16_t* o = static_cast<uint16_t*>(out) + at;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) o[c] = bf16_bits(float_of(rounded[c]));
  }
}

// ``count`` blocks of a unit (as run_unit lays them out): the values to ``out`` (kOut 0
// none, 1 float32, 2 BF16), codes where kCodes, scales (2**k, NaN for a block with NaN or
// Inf) to scales_out where it is not null. kCols: the block's columns as a constant (0:
// job.cols).
template <typename T, int kOut, bool kCodes, int64_t kCols>
void pow2_unit(const T* x, void* out, uint8_t* codes, int64_t base, int64_t count, int64_t row_stride,
               const Pow2Job& job, float* scales_out, Pow2Blocks& b) {
  const int64_t rows = job.rows, cols = kCols != 0 ? kCols : job.cols;
  for (int64_t j = 0; j < count; ++j) b.amax[j] = b.subnormal_input[j] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < count; ++j) {
      const int64_t start = base + r * row_stride + j * cols;
      int32_t m = b.amax[j];
#pragma omp simd reduction(max : m)
      for (int64_t c = 0; c < cols; ++c) m = std::max(m, load_bits(x, start + c) & kAbsMask);
      b.amax[j] = m;
      if (job.stochastic) {  // whether the block holds a float32 subnormal (round_moved's kNormal)
        int32_t subnormal = 0;
#pragma omp simd reduction(| : subnormal)
        for (int64_t c = 0; c < cols; ++c)
          subnormal |= static_cast<uint32_t>((load_bits(x, start + c) & kAbsMask) - 1) < 0x7FFFFFu ? 1 : 0;
        b.subnormal_input[j] |= subnormal;
      }
    }
  }
  pow2_block_constants(b, count, job);
  if (scales_out != nullptr) std::memcpy(scales_out, b.scale.data(), static_cast<size_t>(count) * sizeof(float));
  const Params pe = job.element;
  const int32_t mantissa_bits = 23 - pe.shift, shift = pe.shift;
  const uint32_t key0 = job.key0, key1 = job.key1;
  const bool stochastic = job.stochastic, stream = job.stream;
  const int m_code = kCodes ? job.codes[0] : 0, bias = kCodes ? job.codes[1] : 0;
  const int min_exp_biased = kCodes ? job.codes[2] : 0, sign_bit = kCodes ? job.codes[3] : 0;
  constexpr int64_t kStage = kCols != 0 ? kCols : 256;
  alignas(64) int32_t rounded[kStage];
  alignas(64) int32_t code[kStage];
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < count; ++j) {
      const int64_t start = base + r * row_stride + j * cols;
      const int32_t step_min = b.step_min[j], sb = b.sb[j], largest = b.largest[j], past = b.past[j], step = b.step[j];
      const bool bad = b.bad[j] != 0;
      for (int64_t c0 = 0; c0 < cols; c0 += kStage) {
        const int64_t n = std::min<int64_t>(kStage, cols - c0), at = start + c0;
        if (!b.integer_path[j]) {  // to nearest in float arithmetic (pow2_nearest_fused)
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) {
            const int32_t bits = load_bits(x, at + c);
            const int32_t nearest = nearest_saturating(bits, mantissa_bits, step_min, largest);
            rounded[c] = bad ? (kF32QNaN | (bits & kInt32Min)) : nearest;
          }
        } else if (!stochastic) {
#pragma omp simd
          for (int64_t c = 0; c < n; ++c)
            rounded[c] = round_moved<false>(load_bits(x, at + c), sb, largest, past, step, shift, 0);
        } else if (!b.subnormal_input[j]) {
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) {
            const uint32_t random = hash_bits(static_cast<uint32_t>(at + c), key0, key1);
            rounded[c] = round_moved<true, true>(load_bits(x, at + c), sb, largest, past, step, shift, random);
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < n; ++c) {
            const uint32_t random = hash_bits(static_cast<uint32_t>(at + c), key0, key1);
            rounded[c] = round_moved<true>(load_bits(x, at + c), sb, largest, past, step, shift, random);
          }
        }
        store_values<kOut>(out, at, rounded, n, stream);
        if constexpr (kCodes) {
          if (!b.overflows[j]) {
            const float inverse = b.inverse[j];
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) {
              const int32_t element = bits_of(float_of(rounded[c]) * inverse);
              code[c] = bad ? 0 : encode(element, m_code, bias, min_exp_biased, sign_bit);
            }
          } else {
            // the moved grid's top lies past float32's largest (scale rules that round
            // up, amax near 2**128): values there read Inf, elements are x / X rounded
            const float inverse = b.inverse[j];
            for (int64_t c = 0; c < n; ++c) {
              const int32_t product = bits_of(float_of(load_bits(x, at + c)) * inverse);
              const uint32_t random = stochastic ? hash_bits(static_cast<uint32_t>(at + c), key0, key1) : 0;
              code[c] = encode(round_bits(product, pe, stochastic, random), m_code, bias, min_exp_biased, sign_bit);
            }
          }
          if (job.code_bits == 4) {
#pragma omp simd
            for (int64_t c = 0; c < n / 2; ++c)
              codes[at / 2 + c] = static_cast<uint8_t>(code[2 * c] | (code[2 * c + 1] << 4));
          } else {
#pragma omp simd
            for (int64_t c = 0; c < n; ++c) codes[at + c] = static_cast<uint8_t>(code[c]);
          }
        }
      }
    }
  }
}

template <typename T, int kOut, bool kCodes, int64_t kCols>
void pow2_all(const T* x, void* out, uint8_t* codes, const Pow2Job& job, float* scales_out, int threads) {
  const int64_t blocks_total = job.groups * job.h;
  const bool one_d = job.rows == 1;
  const int64_t units = one_d ? (blocks_total + kUnitBlocks - 1) / kUnitBlocks : job.groups;
  const int64_t per_unit = one_d ? kUnitBlocks : job.h;
#pragma omp parallel num_threads(threads)
  {
    Pow2Blocks blocks((per_unit + 15) / 16 * 16);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      int64_t base, count, first_block;
      if (one_d) {
        first_block = u * kUnitBlocks;
        base = first_block * job.cols;
        count = std::min(kUnitBlocks, blocks_total - first_block);
      } else {
        first_block = u * job.h;
        base = u * job.rows * job.h * job.cols;
        count = job.h;
      }
      pow2_unit<T, kOut, kCodes, kCols>(x, out, codes, base, count, job.h * job.cols, job,
                                        scales_out == nullptr ? nullptr : scales_out + first_block, blocks);
    }
#if defined(__AVX512F__)
    if (job.stream) _mm_sfence();
#endif
  }
}

template <typename T, int kOut, bool kCodes>
void pow2_cols(const T* x, void* out, uint8_t* codes, const Pow2Job& job, float* scales_out, int threads) {
  if (job.cols == 32) {
    pow2_all<T, kOut, kCodes, 32>(x, out, codes, job, scales_out, threads);
  } else {
    pow2_all<T, kOut, kCodes, 0>(x, out, codes, job, scales_out, threads);
  }
}

template <typename T>
void pow2_dispatch(const T* x, void* out, uint8_t* codes, const Pow2Job& job, float* scales_out, int threads) {
  const bool with_codes = job.codes != nullptr;
  switch (job.out_kind * 2 + (with_codes ? 1 : 0)) {
    case 0: pow2_cols<T, 0, false>(x, out, codes, job, scales_out, threads); break;
    case 1: pow2_cols<T, 0, true>(x, out, codes, job, scales_out, threads); break;
    case 2: pow2_cols<T, 1, false>(x, out, codes, job, scales_out, threads); break;
    case 3: pow2_cols<T, 1, true>(x, out, codes, job, scales_out, threads); break;
    case 4: pow2_cols<T, 2, false>(x, out, codes, job, scales_out, threads); break;
    default: pow2_cols<T, 2, true>(x, out, codes, job, scales_out, threads);
  }
}

// Blocks of kBlock consecutive rows of x viewed as (outer, rows, inner) (MX blocks along
// a dimension that is not the last), written in the layout block_quantize.blocked_view
// moves them to, (outer, inner, rows), without that transposing copy first: per strip of
// kBlock rows and 16 columns the column amaxes (vertical maxima, one vector), the 16
// blocks' constants, the elements rounded row by row (a vector of 16 blocks), then
// stored transposed. The random bits are those of the element's index in the moved layout.
template <typename T, int kOut, int64_t kBlock>
void pow2_strided_all(const T* x, void* out, const Pow2Job& job, int64_t outer, int64_t rows, int64_t inner,
                      int threads) {
  const int64_t row_blocks = rows / kBlock, chunks = inner / 16;
  const int64_t units = outer * row_blocks;
  const Params pe = job.element;
  const int32_t mantissa_bits = 23 - pe.shift, shift = pe.shift;
  const uint32_t key0 = job.key0, key1 = job.key1;
  const bool stochastic = job.stochastic;
#pragma omp parallel num_threads(threads)
  {
    Pow2Blocks b(16);
    alignas(64) int32_t tile[kBlock][16];
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t o = u / row_blocks, rb = u % row_blocks;
      const int64_t in_base = (o * rows + rb * kBlock) * inner;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const int64_t col0 = chunk * 16;
        alignas(64) int32_t amax[16] = {0};
        for (int64_t r = 0; r < kBlock; ++r) {
#pragma omp simd
          for (int c = 0; c < 16; ++c) amax[c] = std::max(amax[c], load_bits(x, in_base + r * inner + col0 + c) & kAbsMask);
        }
        std::memcpy(b.amax.data(), amax, sizeof(amax));
        pow2_block_constants(b, 16, job);
        int32_t integer_path = 0;
        for (int c = 0; c < 16; ++c) integer_path |= b.integer_path[c];
        const int32_t* step_min = b.step_min.data();
        const int32_t* sb = b.sb.data();
        const int32_t* largest = b.largest.data();
        const int32_t* past = b.past.data();
        const int32_t* step = b.step.data();
        const int32_t* bad = b.bad.data();
        // the element's index in the moved layout: ((o * inner + column) * rows + row)
        const int64_t moved_base = (o * inner + col0) * rows + rb * kBlock;
        for (int64_t r = 0; r < kBlock; ++r) {
          const int64_t at = in_base + r * inner + col0;
          if (!integer_path) {
#pragma omp simd
            for (int c = 0; c < 16; ++c) {
              const int32_t bits = load_bits(x, at + c);
              const int32_t nearest = nearest_saturating(bits, mantissa_bits, step_min[c], largest[c]);
              tile[r][c] = bad[c] ? (kF32QNaN | (bits & kInt32Min)) : nearest;
            }
          } else if (!stochastic) {
#pragma omp simd
            for (int c = 0; c < 16; ++c)
              tile[r][c] = round_moved<false>(load_bits(x, at + c), sb[c], largest[c], past[c], step[c], shift, 0);
          } else {
#pragma omp simd
            for (int c = 0; c < 16; ++c) {
              const uint32_t index = static_cast<uint32_t>(moved_base + c * rows + r);
              tile[r][c] = round_moved<true>(load_bits(x, at + c), sb[c], largest[c], past[c], step[c], shift,
                                             hash_bits(index, key0, key1));
            }
          }
        }
        if constexpr (kOut == 1) {
          for (int c = 0; c < 16; ++c) {
            float* o32 = static_cast<float*>(out) + moved_base + c * rows;
#pragma omp simd
            for (int64_t r = 0; r < kBlock; ++r) o32[r] = float_of(tile[r][c]);
          }
        } else {
          // rounded to BF16 a row (vector) at a time, then moved as 16-bit words
          alignas(64) uint16_t narrow[kBlock][16];
          for (int64_t r = 0; r < kBlock; ++r) {
#pragma omp simd
            for (int c = 0; c < 16; ++c) narrow[r][c] = bf16_bits(float_of(tile[r][c]));
          }
          for (int c = 0; c < 16; ++c) {
            uint16_t* o16 = static_cast<uint16_t*>(out) + moved_base + c * rows;
            for (int64_t r = 0; r < kBlock; ++r) o16[r] = narrow[r][c];
          }
        }
      }
    }
  }
}

template <typename T>
int pow2_strided_dispatch(const T* x, void* out, const Pow2Job& job, int64_t outer, int64_t rows, int64_t inner,
                          int threads) {
  if (job.out_kind == 1) {
    pow2_strided_all<T, 1, 32>(x, out, job, outer, rows, inner, threads);
  } else {
    pow2_strided_all<T, 2, 32>(x, out, job, outer, rows, inner, threads);
  }
  return 0;
}

// ---- FP8 storage decoded: mixprec.core.storage.stored_values -----------------------------

// One value: table[code] times the scale where there is one, as float32 or BF16 bits.
template <typename Out>
MIXPREC_INLINE void decode_one(uint8_t code, const float* table, float scale, bool scaled, Out* out) {
  const float value = scaled ? table[code] * scale : table[code];
  if constexpr (sizeof(Out) == 4) {
    *out = value;
  } else {
    *out = bf16_bits(value);
  }
}

// 16 values (decode_one): with AVX-512 a gather from the table, BF16 narrowed in 32-bit
// lanes (bf16_16).
template <typename Out>
MIXPREC_INLINE void decode16(const uint8_t* codes, const float* table, float scale, bool scaled, Out* out) {
#if defined(__AVX512F__)
  const __m512i index = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
  __m512 values = _mm512_i32gather_ps(index, table, 4);
  if (scaled) values = _mm512_mul_ps(values, _mm512_set1_ps(scale));
  if constexpr (sizeof(Out) == 4) {
    _mm512_storeu_ps(reinterpret_cast<float*>(out), values);
  } else {
    alignas(64) float staged[16];
    _mm512_store_ps(staged, values);
    bf16_16(staged, out);
  }
#else
  for (int c = 0; c < 16; ++c) decode_one(codes[c], table, scale, scaled, out + c);
#endif
}

template <typename Out>
void decode_all(const uint8_t* codes, int64_t n, const float* table, const float* scale, Out* out, int threads) {
  const bool scaled = scale != nullptr;
  const float s = scaled ? *scale : 1.0f;
  const int64_t chunks = (n + 4095) / 4096;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t end = std::min(n, (k + 1) * 4096);
    int64_t i = k * 4096;
    for (; i + 16 <= end; i += 16) decode16(codes + i, table, s, scaled, out + i);
    for (; i < end; ++i) decode_one(codes[i], table, s, scaled, out + i);
  }
}

// ---- the random Hadamard transform of 16-element groups (mixprec.core.hadamard) ------------
// Each group v becomes (v * pre) through the four butterfly stages of the fast
// Walsh-Hadamard transform, h = 1, 2, 4, 8: (v[j], v[j + h]) -> (v[j] + v[j + h], v[j] -
// v[j + h]) for j with bit h clear; then times ``post`` where it is not null. Every
// addition in that order, as hadamard._butterflies computes them.

// 16 elements of x (``valid`` of them; zero past those) as float32 into ``dst``
template <typename T>
MIXPREC_INLINE void widen_floats(const T* x, int64_t valid, float* dst) {
  int32_t bits[16];
  if constexpr (std::is_same_v<T, float>) {
    for (int c = 0; c < 16; ++c) bits[c] = c < valid ? load_bits(x, c) : 0;
  } else {
    if (valid == 16) {
      widen16(x, bits);
    } else {
      for (int c = 0; c < 16; ++c) bits[c] = c < valid ? load_bits(x, c) : 0;
    }
  }
  std::memcpy(dst, bits, sizeof(bits));
}

// One group held in 16 lanes (the rotated axis is the last): the stages across lanes.
MIXPREC_INLINE void rotate_lanes(float* v, const float* pre, const float* post) {
#if defined(__AVX512F__)
  __m512 a = _mm512_mul_ps(_mm512_loadu_ps(v), _mm512_loadu_ps(pre));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int h = 1; h < 16; h *= 2) {
    const __m512 partner = _mm512_permutexvar_ps(_mm512_xor_si512(lane, _mm512_set1_epi32(h)), a);
    const __mmask16 upper = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(h));
    // lower lanes: own + partner (v[j] + v[j + h]); upper lanes: partner - own (v[j - h] - v[j])
    a = _mm512_mask_blend_ps(upper, _mm512_add_ps(a, partner), _mm512_sub_ps(partner, a));
  }
  if (post != nullptr) a = _mm512_mul_ps(a, _mm512_loadu_ps(post));
  _mm512_storeu_ps(v, a);
#else
  for (int j = 0; j < 16; ++j) v[j] *= pre[j];
  for (int h = 1; h < 16; h *= 2) {
    for (int j = 0; j < 16; ++j) {
      if (j & h) continue;
      const float lo = v[j], hi = v[j + h];
      v[j] = lo + hi;
      v[j + h] = lo - hi;
    }
  }
  if (post != nullptr) {
    for (int j = 0; j < 16; ++j) v[j] *= post[j];
  }
#endif
}

// 16 groups side by side, group element i in row i of ``tile`` (one group a column):
// the stages between rows, each a 16-lane vector operation.
MIXPREC_INLINE void rotate_rows(float (*tile)[16], const float* pre, const float* post) {
  for (int i = 0; i < 16; ++i) {
#pragma omp simd
    for (int c = 0; c < 16; ++c) tile[i][c] *= pre[i];
  }
  for (int h = 1; h < 16; h *= 2) {
    for (int j = 0; j < 16; ++j) {
      if (j & h) continue;
#pragma omp simd
      for (int c = 0; c < 16; ++c) {
        const float lo = tile[j][c], hi = tile[j + h][c];
        tile[j][c] = lo + hi;
        tile[j + h][c] = lo - hi;
      }
    }
  }
  if (post != nullptr) {
    for (int i = 0; i < 16; ++i) {
#pragma omp simd
      for (int c = 0; c < 16; ++c) tile[i][c] *= post[i];
    }
  }
}

// Column c of ``tile`` (c < valid) into the 16 floats at out + c * stride: with AVX-512 a
// transposition in registers (unpacks and shuffles; a scalar copy of the columns took
// half the pass's time); ``stream``: with non-temporal stores (out and stride 64-byte
// aligned; the caller fences).
MIXPREC_INLINE void store_columns(float (*tile)[16], float* out, int64_t stride, int64_t valid, bool stream) {
#if defined(__AVX512F__)
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(tile[i]);
  for (int k = 0; k < 16; k += 2) {
    t[k] = _mm512_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm512_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 16; k += 4) {
    r[k] = _mm512_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[k + 1] = _mm512_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[k + 2] = _mm512_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[k + 3] = _mm512_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int k = 0; k < 16; k += 8) {
    for (int i = 0; i < 4; ++i) {
      t[k + i] = _mm512_shuffle_f32x4(r[k + i], r[k + i + 4], 0x88);
      t[k + i + 4] = _mm512_shuffle_f32x4(r[k + i], r[k + i + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
  if (stream) {
    for (int64_t c = 0; c < valid; ++c) _mm512_stream_ps(out + c * stride, r[c]);
  } else {
    for (int64_t c = 0; c < valid; ++c) _mm512_storeu_ps(out + c * stride, r[c]);
  }
#else
  for (int64_t c = 0; c < valid; ++c) {
    for (int i = 0; i < 16; ++i) out[c * stride + i] = tile[i][c];
  }
#endif
}

// x viewed as (outer, rows, inner), the groups along rows (a multiple of 16), into
// float32 ``out`` laid out (outer, inner, rows): the rotated axis moved last.
template <typename T>
void hadamard_moved(const T* x, float* out, int64_t outer, int64_t rows, int64_t inner, const float* pre,
                    const float* post, int threads) {
  const int64_t groups = rows / 16;
  if (inner == 1) {
    const int64_t total = outer * groups;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < total; ++g) {
      alignas(64) float v[16];
      widen_floats(x + g * 16, 16, v);
      rotate_lanes(v, pre, post);
      std::memcpy(out + g * 16, v, sizeof(v));
    }
    return;
  }
  // a unit: 16 columns of one outer index, every group down them, so that each of the
  // 16 output rows it writes is written from start to end
  const int64_t tiles = (inner + 15) / 16;
  // an output past the L2 cache (2 MiB here) goes past the caches: each tile writes 16
  // lines of 16 output rows far apart, and storing them the usual way first reads every
  // line in (2048 x 512 BF16 at 3.0 ns an element against 1.1 streamed, one thread)
  const bool stream = reinterpret_cast<uintptr_t>(out) % 64 == 0 && outer * rows * inner >= (int64_t{1} << 19);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < outer * tiles; ++t) {
      const int64_t o = t / tiles, c0 = (t % tiles) * 16, valid = std::min<int64_t>(16, inner - c0);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t r0 = g * 16;
        alignas(64) float tile[16][16];
        for (int i = 0; i < 16; ++i) widen_floats(x + (o * rows + r0 + i) * inner + c0, valid, tile[i]);
        rotate_rows(tile, pre, post);
        store_columns(tile, out + (o * inner + c0) * rows + r0, rows, valid, stream);
      }
    }
#if defined(__AVX512F__)
    if (stream) _mm_sfence();
#endif
  }
}


// ---- the LSTM cell's point-wise steps (mixprec.nn.recurrences) ------------------------------
// Each is the torch code of the recurrence's step operation for operation: IEEE float32
// multiplies and adds, torch's addcmul as one fused multiply-add (as its vectorised CPU
// kernel computes it), results cast to BF16/FP16 as torch casts them. The sigmoids stay
// torch's own (between these calls), so the recurrence's results are the same bit for bit
// with or without these kernels (tests/nn/test_recurrences.py compares them).

template <typename T>
MIXPREC_INLINE float widened(const T* x, int64_t i) {
  return float_of(load_bits<T>(x, i));
}

constexpr int64_t kWidenBlock = 256;

// x[0, n) widened to float32 into out (n <= kWidenBlock), exactly as torch casts: 16 at a
// time by widen16 (FP16 through the CPU's conversion instruction where it has AVX-512;
// load_bits<Half>'s bit arithmetic does not vectorise), the rest one by one.
template <typename T>
MIXPREC_INLINE void widen_block(const T* x, int64_t n, float* out) {
  int64_t k = 0;
  if constexpr (!std::is_same_v<T, float>) {
    for (; k + 16 <= n; k += 16) {
      int32_t bits[16];
      widen16(x + k, bits);
      std::memcpy(out + k, bits, sizeof(bits));
    }
  }
  for (; k < n; ++k) out[k] = widened(x, k);
}

template <typename T>
MIXPREC_INLINE void store_as(T* out, int64_t i, float v);

template <>
MIXPREC_INLINE void store_as<float>(float* out, int64_t i, float v) { out[i] = v; }

template <>
MIXPREC_INLINE void store_as<uint16_t>(uint16_t* out, int64_t i, float v) { out[i] = bf16_bits(v); }

template <>
MIXPREC_INLINE void store_as<Half>(Half* out, int64_t i, float v) { out[i].bits = half_bits(v); }

// A rounding fused into a recurrence step (an unscaled scalar format): the kernel
// parameters, and for stochastic rounding the key whose hash of each element's flat
// index in the tensor being rounded gives its random bits, as round_range draws them.
struct StepRounding {
  Params p;
  bool on, stochastic;
  uint32_t key0, key1;
};

MIXPREC_INLINE StepRounding step_rounding(const int32_t* p, const int32_t* key) {
  StepRounding r{};
  r.on = p != nullptr;
  if (r.on) r.p = params_of(p);
  r.stochastic = key != nullptr;
  if (r.stochastic) {
    r.key0 = static_cast<uint32_t>(key[0]);
    r.key1 = static_cast<uint32_t>(key[1]);
  }
  return r;
}

// src[0, n) rounded onto the format's grid into dst (may be src), as round_range rounds
// the elements with flat indices [base, base + n) of a tensor
MIXPREC_INLINE void round_step_row(const float* src, float* dst, int64_t n, int64_t base, const StepRounding& r) {
  const Params p = r.p;
  const uint32_t key0 = r.key0, key1 = r.key1;
  if (r.stochastic) {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k)
      dst[k] = float_of(round_bits(bits_of(src[k]), p, true, hash_bits(static_cast<uint32_t>(base + k), key0, key1)));
  } else {
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) dst[k] = float_of(round_bits(bits_of(src[k]), p, false, 0));
  }
}

// gates = projected + recurrent (widened; an FP32 recurrent product rounded first where
// ``r`` is on: the result's rounding, fused), the cell candidate's quarter doubled (its
// tanh is taken as 2 sigmoid(2x) - 1)
template <typename T>
void lstm_preact_rows(const float* projected, const T* recurrent, float* gates, int64_t batch, int64_t hidden,
                      const StepRounding& r, int threads) {
  const int64_t width = 4 * hidden;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t row = b * width;
    float wide[kWidenBlock];
    for (int64_t start = 0; start < width; start += kWidenBlock) {
      const int64_t n = std::min(kWidenBlock, width - start);
      widen_block(recurrent + row + start, n, wide);
      if (r.on) round_step_row(wide, wide, n, row + start, r);
      for (int64_t k = 0; k < n; ++k) gates[row + start + k] = projected[row + start + k] + wide[k];
    }
    for (int64_t k = 2 * hidden; k < 3 * hidden; ++k) gates[row + k] = gates[row + k] * 2.0f;
  }
}

// after the gates' sigmoid: g = 2 s - 1 (kept in gates), c = f c_prev + i g (addcmul: one
// fused multiply-add), doubled = 2 c (the argument of tanh(c)'s sigmoid); one row on
// restrict pointers, so that the loop vectorises
MIXPREC_INLINE void lstm_cell_row(float* __restrict__ gates, const float* __restrict__ c_prev, float* __restrict__ c,
                                  float* __restrict__ doubled, int64_t hidden) {
  const float* __restrict__ i = gates;
  const float* __restrict__ f = gates + hidden;
  float* __restrict__ g = gates + 2 * hidden;
  for (int64_t k = 0; k < hidden; ++k) {
    const float gk = g[k] * 2.0f - 1.0f;
    g[k] = gk;
    const float ck = __builtin_fmaf(i[k], gk, f[k] * c_prev[k]);
    c[k] = ck;
    doubled[k] = ck * 2.0f;
  }
}

void lstm_cell_rows(float* gates, const float* c_prev, float* c, float* doubled, int64_t batch, int64_t hidden,
                    int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t b = 0; b < batch; ++b)
    lstm_cell_row(gates + b * 4 * hidden, c_prev + b * hidden, c + b * hidden, doubled + b * hidden, hidden);
}

// after tanh(c)'s sigmoid s: h = o (2 s - 1), cast to h's dtype; where ``r`` is on, also
// the held h rounded onto the next step's GEMM input format, into q (dtype Q): that
// GEMM's operand, fused
template <typename T, typename Q>
void lstm_hidden_rows(const float* gates, const float* s, T* h, Q* q, int64_t batch, int64_t hidden,
                      const StepRounding& r, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t b = 0; b < batch; ++b) {
    const float* o = gates + b * 4 * hidden + 3 * hidden;
    const int64_t row = b * hidden;
    for (int64_t k = 0; k < hidden; ++k) store_as(h, row + k, o[k] * (s[row + k] * 2.0f - 1.0f));
    if (!r.on) continue;
    for (int64_t start = 0; start < hidden; start += kWidenBlock) {
      float held[kWidenBlock];
      const int64_t n = std::min(kWidenBlock, hidden - start);
      widen_block(h + row + start, n, held);
      round_step_row(held, held, n, row + start, r);
      for (int64_t k = 0; k < n; ++k) store_as(q, row + start + k, held[k]);
    }
  }
}

// One step of the backward sweep, before the recurrent product's dgrad, with the
// activations' slopes taken on the way (sigmoid's a (1 - a), tanh's 1 - g^2, and
// h = o tanh(c)'s o (1 - tanh(c)^2)): dh += the output's gradient; dc += dh out_slope
// (fused); the gates' gradients d_act (i, f, g, o) = (dc g, dc c_prev, dc i, dh tanh(c))
// times the slopes; dc *= f. One row (batch element) of it, on restrict pointers so
// that the loop vectorises:
MIXPREC_INLINE void lstm_backward_row(float* __restrict__ dh, float* __restrict__ dc,
                                      const float* __restrict__ cell_tanh, const float* __restrict__ acts,
                                      const float* __restrict__ c_prev, float* __restrict__ d_act, int64_t hidden) {
  const float* __restrict__ i = acts;
  const float* __restrict__ f = i + hidden;
  const float* __restrict__ g = f + hidden;
  const float* __restrict__ o = g + hidden;
  for (int64_t k = 0; k < hidden; ++k) {
    const float dhk = dh[k];
    const float tk = cell_tanh[k];
    const float out_slope = o[k] * (1.0f - tk * tk);
    const float dck = __builtin_fmaf(dhk, out_slope, dc[k]);
    d_act[k] = (dck * g[k]) * (i[k] * (1.0f - i[k]));
    d_act[hidden + k] = (dck * c_prev[k]) * (f[k] * (1.0f - f[k]));
    d_act[2 * hidden + k] = (dck * i[k]) * (1.0f - g[k] * g[k]);
    d_act[3 * hidden + k] = (dhk * tk) * (o[k] * (1.0f - o[k]));
    dc[k] = dck * f[k];
  }
}

template <typename T, typename E>
void lstm_backward_rows(float* dh, const T* grad_output, float* dc, const float* cell_tanh, const float* acts,
                        const float* c_prev, float* d_act, E* error, int64_t batch, int64_t hidden,
                        const StepRounding& r, const StepRounding& r_dh, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t row = b * hidden;
    // dh (the later step's dgrad sum, rounded first where r_dh is on: that GEMM's result
    // rounding, fused) += the output's gradient
    if (r_dh.on) round_step_row(dh + row, dh + row, hidden, row, r_dh);
    for (int64_t start = 0; start < hidden; start += kWidenBlock) {
      float out_grad[kWidenBlock];
      const int64_t n = std::min(kWidenBlock, hidden - start);
      widen_block(grad_output + row + start, n, out_grad);
      for (int64_t k = 0; k < n; ++k) dh[row + start + k] = dh[row + start + k] + out_grad[k];
    }
    lstm_backward_row(dh + row, dc + row, cell_tanh + row, acts + 4 * row, c_prev + row, d_act + 4 * row, hidden);
    if (!r.on) continue;
    // the gates' gradients rounded onto the recurrent dgrad's error format: that GEMM's
    // operand, fused
    for (int64_t start = 0; start < 4 * hidden; start += kWidenBlock) {
      float rounded[kWidenBlock];
      const int64_t n = std::min(kWidenBlock, 4 * hidden - start);
      round_step_row(d_act + 4 * row + start, rounded, n, 4 * row + start, r);
      for (int64_t k = 0; k < n; ++k) store_as(error, 4 * row + start + k, rounded[k]);
    }
  }
}

template <typename T>
int lstm_hidden_to(const float* gates, const float* s, T* h, void* q, int q_dtype, int64_t batch, int64_t hidden,
                   const StepRounding& r, int threads) {
  if (!r.on || q_dtype == 0) lstm_hidden_rows(gates, s, h, static_cast<float*>(q), batch, hidden, r, threads);
  else if (q_dtype == 1) lstm_hidden_rows(gates, s, h, static_cast<uint16_t*>(q), batch, hidden, r, threads);
  else return 1;
  return 0;
}

template <typename T>
int lstm_backward_to(float* dh, const T* grad_output, float* dc, const float* cell_tanh, const float* acts,
                     const float* c_prev, float* d_act, void* error, int e_dtype, int64_t batch, int64_t hidden,
                     const StepRounding& r, const StepRounding& r_dh, int threads) {
  if (!r.on || e_dtype == 0)
    lstm_backward_rows(dh, grad_output, dc, cell_tanh, acts, c_prev, d_act, static_cast<float*>(error), batch, hidden,
                       r, r_dh, threads);
  else if (e_dtype == 1)
    lstm_backward_rows(dh, grad_output, dc, cell_tanh, acts, c_prev, d_act, static_cast<uint16_t*>(error), batch,
                       hidden, r, r_dh, threads);
  else return 1;
  return 0;
}


// ---- column sums in float32 (a bias gradient from a 16-bit error) ----------------------------
// out[c] = the float32 sum over rows of x[r][c] widened as torch casts, in row order: torch's
// sum(dtype=float32) of a BF16 tensor first writes a float32 copy of all of it.
constexpr int64_t kSumColumns = 64;

template <typename T>
void column_sums(const T* x, int64_t rows, int64_t cols, float* out, int threads) {
  const int64_t chunks = (cols + kSumColumns - 1) / kSumColumns;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t c0 = chunk * kSumColumns, width = std::min(kSumColumns, cols - c0);
    alignas(64) float acc[kSumColumns] = {};
    alignas(64) float row[kSumColumns];
    for (int64_t r = 0; r < rows; ++r) {
      widen_block(x + r * cols + c0, width, row);
#pragma omp simd
      for (int64_t c = 0; c < kSumColumns; ++c) acc[c] += c < width ? row[c] : 0.0f;
    }
    for (int64_t c = 0; c < width; ++c) out[c0 + c] = acc[c];
  }
}


// ---- the FP32 sum of BF16 products: a GEMM on the CPU's BF16 dot-product units --------------
// C (float32) = A @ B for operands whose elements are BF16 values (held as float32 or
// BF16), each product exact in float32 and summed in float32: the sum an FP32 GEMM gives
// them, up to summation order, at the BF16 units' rate. torch on the CPU has no such GEMM
// (a BF16 GEMM returns BF16, aten::mm.dtype is CUDA-only, oneDNN's BF16 math mode takes
// float32 operands and converts them at every call). VDPBF16PS adds two products a lane
// to an FP32 accumulator (denormal inputs and results flushed to zero, as oneDNN's BF16
// GEMMs flush them). B is packed once (pack_b_bf16) and may serve many GEMMs: a weight at
// every step of a recurrence.

constexpr int64_t kPanel = 64;  // B's columns per packed panel: four vectors of 16
constexpr int64_t kTileRows = 6;  // A's rows per micro-tile: 6 x 4 accumulators of the 32 registers

template <typename T>
MIXPREC_INLINE uint32_t bf16_word(const T* x, int64_t i) {
  if constexpr (std::is_same_v<T, float>) {
    return bf16_bits(x[i]);
  } else {
    return x[i];
  }
}

// B (element (k, n) at b[k * sk + n * sn]) as panels of kPanel columns, each (K + 1) / 2
// rows of kPanel pairs (B[2q][n], B[2q + 1][n]) as 32-bit words, zero past K and N.
template <typename T>
void pack_b_bf16(const T* b, int64_t k_size, int64_t n_size, int64_t sk, int64_t sn, uint32_t* out, int threads) {
  const int64_t pairs = (k_size + 1) / 2, panels = (n_size + kPanel - 1) / kPanel;
#pragma omp parallel for num_threads(threads) collapse(2) schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    for (int64_t q = 0; q < pairs; ++q) {
      uint32_t* dst = out + (p * pairs + q) * kPanel;
      const int64_t k0 = 2 * q;
      const bool second = k0 + 1 < k_size;
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t n = p * kPanel + c;
        uint32_t word = 0;
        if (n < n_size) {
          word = bf16_word(b, k0 * sk + n * sn);
          if (second) word |= bf16_word(b, (k0 + 1) * sk + n * sn) << 16;
        }
        dst[c] = word;
      }
    }
  }
}

#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;

// rows x (up to kPanel) of C from a micro-tile's packed A rows (pairs as words, ``pairs``
// a row) and one panel of B
template <int kRows>
MIXPREC_INLINE void dot_tile(const uint32_t* a, int64_t pairs, const uint32_t* panel, float* c, int64_t ldc,
                             int64_t cols) {
  __m512 acc[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < pairs; ++q) {
    const uint32_t* row = panel + q * kPanel;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(row);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(row + 16);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(row + 32);
    const __m512bh b3 = (__m512bh)_mm512_loadu_si512(row + 48);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r * pairs + q]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], w, b2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], w, b3);
    }
  }
  for (int v = 0; v < 4; ++v) {
    const int64_t left = cols - 16 * v;
    if (left <= 0) break;
    const __mmask16 mask = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    for (int r = 0; r < kRows; ++r) _mm512_mask_storeu_ps(c + r * ldc + 16 * v, mask, acc[r][v]);
  }
}

template <typename T>
void gemm_bf16(const T* a, int64_t m_size, int64_t k_size, int64_t sm, int64_t sk, const uint32_t* packed,
               int64_t n_size, float* c, int64_t ldc, int threads) {
  const int64_t pairs = (k_size + 1) / 2, panels = (n_size + kPanel - 1) / kPanel;
  const int64_t tiles = (m_size + kTileRows - 1) / kTileRows;
#pragma omp parallel num_threads(threads)
  {
    std::vector<uint32_t> rows(kTileRows * pairs);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t m0 = t * kTileRows, count = std::min(kTileRows, m_size - m0);
      for (int64_t r = 0; r < count; ++r) {  // the tile's rows of A as pairs along K
        const T* x = a + (m0 + r) * sm;
        uint32_t* dst = rows.data() + r * pairs;
        for (int64_t q = 0; q < k_size / 2; ++q) dst[q] = bf16_word(x, 2 * q * sk) | (bf16_word(x, (2 * q + 1) * sk) << 16);
        if (k_size % 2 != 0) dst[pairs - 1] = bf16_word(x, (k_size - 1) * sk);
      }
      for (int64_t p = 0; p < panels; ++p) {
        const uint32_t* panel = packed + p * pairs * kPanel;
        float* out = c + m0 * ldc + p * kPanel;
        const int64_t cols = std::min(kPanel, n_size - p * kPanel);
        switch (count) {
          case 6: dot_tile<6>(rows.data(), pairs, panel, out, ldc, cols); break;
          case 5: dot_tile<5>(rows.data(), pairs, panel, out, ldc, cols); break;
          case 4: dot_tile<4>(rows.data(), pairs, panel, out, ldc, cols); break;
          case 3: dot_tile<3>(rows.data(), pairs, panel, out, ldc, cols); break;
          case 2: dot_tile<2>(rows.data(), pairs, panel, out, ldc, cols); break;
          default: dot_tile<1>(rows.data(), pairs, panel, out, ldc, cols); break;
        }
      }
    }
  }
}
#else
constexpr bool kBf16Dot = false;
#endif

}  // namespace

extern "C" {

// Quantize x, contiguous in the blocked layout (groups, rows, h, cols), to an amax-scaled
// block format, writing the dequantized float32 values (element * scale; NVFP4 with
// ``unscaled``: element * block scale) into ``out`` (may be null where codes are asked
// for). dtype: 0 float32, 1 bfloat16. ``pe``/``ps``: the element's and the scale
// format's kernel parameters (saturating); ``fp``: element largest, scale largest *
// element largest, the scale format's smallest normal. Two-level formats take the tensor
// amax from ``tensor_amax`` where it is not null and write the tensor scale to
// ``tensor_scale_out``. Where ``scales_out`` is not null it receives each block's scale
// (groups * h floats). ``stream`` (honoured where out is 64-byte aligned) writes out with
// non-temporal stores. Where ``codes_out`` is not null (cols a multiple of 16), the
// element codes go there too, ``code_bits`` 4 (two a byte) or 8, encoded by
// ``element_codes`` (see encode). ``out_bf16`` (blocks 16 or 128 wide, no codes): out
// holds BF16, each value rounded as torch casts it. Returns 0, 1 for an unknown dtype, 2
// for columns the packing or the BF16 output cannot take.
int mixprec_amax_blocks(const void* x, int dtype, float* out, int64_t groups, int64_t rows, int64_t h, int64_t cols,
                        const int32_t* pe, const int32_t* ps, const float* fp, int two_level, const float* tensor_amax,
                        int unscaled, int stochastic, const int32_t* key, float* tensor_scale_out, float* scales_out,
                        int threads, int stream, uint8_t* codes_out, const int32_t* element_codes, int code_bits,
                        int out_bf16) {
  Job job{groups, rows, h, cols, params_of(pe), params_of(ps), fp[0], fp[1], fp[2], two_level, unscaled,
          stochastic, 0, out_bf16, 1.0f, 0u, 0u, element_codes, code_bits};
  if (codes_out != nullptr && (cols % 16 != 0 || (code_bits != 4 && code_bits != 8))) return 2;
  if (out_bf16 && (codes_out != nullptr || (cols != 16 && cols != 128))) return 2;
  if (stochastic) {
    job.key0 = static_cast<uint32_t>(key[0]);
    job.key1 = static_cast<uint32_t>(key[1]);
  }
  threads = std::max(threads, 1);
  job.stream = stream && codes_out == nullptr && !out_bf16 && reinterpret_cast<uintptr_t>(out) % 64 == 0;
  if (dtype == 0) return dispatch_pack(static_cast<const float*>(x), out, codes_out, job, tensor_amax,
                                       tensor_scale_out, scales_out, threads);
  if (dtype == 1) return dispatch_pack(static_cast<const uint16_t*>(x), out, codes_out, job, tensor_amax,
                                       tensor_scale_out, scales_out, threads);
  return 1;
}

// Round x (n elements; dtype 0 float32, 1 bfloat16, 2 float16) onto a scalar format's grid, as
// mixprec.core.kernels.round_grid does (``p``: the format's kernel parameters;
// ``float_path``: to nearest by float arithmetic; ``key``: stochastic, else nearest),
// as round(x * scale_inverse) where ``scaled``. Writes the values (times the scale) into ``values`` (values_dtype 0
// float32, 1 bfloat16; may be x's own memory), the FP8 storage bytes of the rounded
// values into ``storage`` (storage_kind 1 e4m3fn, 2 e5m2), and the largest |x| (NaN's
// bits above every other: a NaN where x holds one) into ``amax``, each where it is not
// null. Returns 0, 1 for an unknown dtype.
int mixprec_round(const void* x, int dtype, int64_t n, const int32_t* p, int float_path, const int32_t* key,
                  int scaled, float scale_inverse, float scale, void* values, int values_dtype, uint8_t* storage,
                  int storage_kind, float* amax, int threads) {
  RoundJob job{params_of(p), float_path, key != nullptr, 0u, 0u, scaled, scale_inverse, scale,
               values == nullptr ? -1 : values_dtype, storage == nullptr ? 0 : storage_kind};
  if (key != nullptr) {
    job.key0 = static_cast<uint32_t>(key[0]);
    job.key1 = static_cast<uint32_t>(key[1]);
  }
  threads = std::max(threads, 1);
  if (dtype == 0) {
    round_all(static_cast<const float*>(x), n, job, values, storage, amax, threads);
    return 0;
  }
  if (dtype == 1) {
    round_all(static_cast<const uint16_t*>(x), n, job, values, storage, amax, threads);
    return 0;
  }
  if (dtype == 2) {
    round_all(static_cast<const Half*>(x), n, job, values, storage, amax, threads);
    return 0;
  }
  return 1;
}

// Decode ``codes`` (4-bit two a byte, or 8-bit) of a block format into ``out`` (dtype 0
// float32, 1 bfloat16), blocked (groups, rows, h, cols) with cols a multiple of 16:
// ``table[code] * (tensor_scale * scales[block])`` (no tensor scale where it is null).
// Returns 0, 1 for an unknown dtype, 2 for columns or code widths it cannot take.
int mixprec_unpack_blocks(const uint8_t* codes, int code_bits, const float* table, const float* scales,
                          const float* tensor_scale, void* out, int dtype, int64_t groups, int64_t rows, int64_t h,
                          int64_t cols, int threads) {
  if (cols % 16 != 0 || (code_bits != 4 && code_bits != 8)) return 2;
  threads = std::max(threads, 1);
  if (dtype == 0) {
    unpack_all(codes, code_bits, table, scales, tensor_scale, static_cast<float*>(out), groups, rows, h, cols, threads);
    return 0;
  }
  if (dtype == 1) {
    unpack_all(codes, code_bits, table, scales, tensor_scale, static_cast<uint16_t*>(out), groups, rows, h, cols,
               threads);
    return 0;
  }
  return 1;
}

// Quantize x (dtype 0 float32, 1 bfloat16), contiguous in the blocked layout (groups,
// rows, h, cols) with cols a multiple of 16, to a block format with power-of-two scales
// (MX), as mixprec.core.block_quantize's pow2 kernels do: the dequantized values into
// ``out`` (out_kind 0 none, 1 float32, 2 bfloat16 as torch casts them), the element codes
// into ``codes_out`` (``code_bits`` 4, two a byte, or 8; encoded by ``element_codes``;
// zero in a block holding NaN or Inf) and the block scales (2**k as float32, NaN for such
// a block) into ``scales_out``, each where it is not null. ``pe``: the element's kernel
// parameters (saturating); ``bp``: int32 [rule, emax, even_add, bits of the element's
// largest value]. ``stream`` (float32 out, 64-byte aligned): non-temporal stores.
// Returns 0, 1 for an unknown dtype, 2 for columns or code widths it cannot take.
int mixprec_pow2_blocks(const void* x, int dtype, void* out, int out_kind, int64_t groups, int64_t rows, int64_t h,
                        int64_t cols, const int32_t* pe, const int32_t* bp, int stochastic, const int32_t* key,
                        float* scales_out, int threads, int stream, uint8_t* codes_out, const int32_t* element_codes,
                        int code_bits) {
  if (cols % 16 != 0 || (codes_out != nullptr && code_bits != 4 && code_bits != 8)) return 2;
  Pow2Job job{groups, rows, h, cols, params_of(pe), bp[0], bp[1], bp[2], float_of(bp[3]), stochastic, 0,
              out == nullptr ? 0 : out_kind, 0u, 0u, codes_out == nullptr ? nullptr : element_codes, code_bits};
  if (stochastic) {
    job.key0 = static_cast<uint32_t>(key[0]);
    job.key1 = static_cast<uint32_t>(key[1]);
  }
  job.stream = stream && job.out_kind == 1 && reinterpret_cast<uintptr_t>(out) % 64 == 0;
  threads = std::max(threads, 1);
  if (dtype == 0) {
    pow2_dispatch(static_cast<const float*>(x), out, codes_out, job, scales_out, threads);
    return 0;
  }
  if (dtype == 1) {
    pow2_dispatch(static_cast<const uint16_t*>(x), out, codes_out, job, scales_out, threads);
    return 0;
  }
  return 1;
}

// mixprec_pow2_blocks for blocks of 32 along the middle dimension of x viewed as (outer,
// rows, inner), rows a multiple of 32 and inner of 16: the values (out_kind 1 float32, 2
// bfloat16) written in the moved layout (outer, inner, rows), as block_quantize.quantize_blocks
// computes them after moving the block axis last. ``bp[1]``..: as mixprec_pow2_blocks.
// Returns 0, 1 for an unknown dtype, 2 for shapes or outputs it cannot take.
int mixprec_pow2_strided(const void* x, int dtype, void* out, int out_kind, int64_t outer, int64_t rows, int64_t inner,
                         const int32_t* pe, const int32_t* bp, int stochastic, const int32_t* key, int threads) {
  if (rows % 32 != 0 || inner % 16 != 0 || (out_kind != 1 && out_kind != 2) || out == nullptr) return 2;
  Pow2Job job{outer * rows / 32, 1, inner, 32, params_of(pe), bp[0], bp[1], bp[2], float_of(bp[3]), stochastic, 0,
              out_kind, 0u, 0u, nullptr, 0};
  if (stochastic) {
    job.key0 = static_cast<uint32_t>(key[0]);
    job.key1 = static_cast<uint32_t>(key[1]);
  }
  threads = std::max(threads, 1);
  if (dtype == 0) return pow2_strided_dispatch(static_cast<const float*>(x), out, job, outer, rows, inner, threads);
  if (dtype == 1) return pow2_strided_dispatch(static_cast<const uint16_t*>(x), out, job, outer, rows, inner, threads);
  return 1;
}

// Decode n bytes of FP8 storage into ``out`` (dtype 0 float32, 1 bfloat16): table[code]
// (``table``: the 256 float32 values torch's cast gives the codes) times ``*scale`` where
// scale is not null, rounded once to out's dtype, as mixprec.core.storage.stored_values
// computes it. Returns 0, 1 for an unknown dtype.
int mixprec_decode(const uint8_t* codes, int64_t n, const float* table, const float* scale, void* out, int dtype,
                   int threads) {
  threads = std::max(threads, 1);
  if (dtype == 0) {
    decode_all(codes, n, table, scale, static_cast<float*>(out), threads);
    return 0;
  }
  if (dtype == 1) {
    decode_all(codes, n, table, scale, static_cast<uint16_t*>(out), threads);
    return 0;
  }
  return 1;
}

// The Hadamard transform of 16-element groups along the middle dimension of x (dtype 0
// float32, 1 bfloat16, 2 float16) viewed as (outer, rows, inner), rows a multiple of 16,
// into float32 ``out`` laid out (outer, inner, rows) (hadamard_moved: ``pre`` and
// ``post`` hold 16 floats each, post may be null). Returns 0, 1 for an unknown dtype, 2
// for rows that are not whole groups.
int mixprec_hadamard16(const void* x, int dtype, float* out, int64_t outer, int64_t rows, int64_t inner,
                       const float* pre, const float* post, int threads) {
  if (rows % 16 != 0) return 2;
  threads = std::max(threads, 1);
  if (dtype == 0) {
    hadamard_moved(static_cast<const float*>(x), out, outer, rows, inner, pre, post, threads);
    return 0;
  }
  if (dtype == 1) {
    hadamard_moved(static_cast<const uint16_t*>(x), out, outer, rows, inner, pre, post, threads);
    return 0;
  }
  if (dtype == 2) {
    hadamard_moved(static_cast<const Half*>(x), out, outer, rows, inner, pre, post, threads);
    return 0;
  }
  return 1;
}

// The LSTM cell's point-wise steps (see lstm_preact_rows and the others above), on
// contiguous (batch, 4 hidden) gates and (batch, hidden) states; dtype codes 0 float32,
// 1 bfloat16, 2 float16. ``p`` (a format's kernel parameters) and ``key`` (stochastic
// rounding's two words) fuse a rounding where ``p`` is not null. Each returns 0, 1 for an
// unknown dtype.
int mixprec_lstm_preact(const float* projected, const void* recurrent, int dtype, float* gates, int64_t batch,
                        int64_t hidden, const int32_t* p, const int32_t* key, int threads) {
  threads = std::max(threads, 1);
  const StepRounding r = step_rounding(p, key);
  if (r.on && dtype != 0) return 1;  // the rounding takes the FP32 sum
  if (dtype == 0) lstm_preact_rows(projected, static_cast<const float*>(recurrent), gates, batch, hidden, r, threads);
  else if (dtype == 1)
    lstm_preact_rows(projected, static_cast<const uint16_t*>(recurrent), gates, batch, hidden, r, threads);
  else if (dtype == 2) lstm_preact_rows(projected, static_cast<const Half*>(recurrent), gates, batch, hidden, r, threads);
  else return 1;
  return 0;
}

int mixprec_lstm_cell(float* gates, const float* c_prev, float* c, float* doubled, int64_t batch, int64_t hidden,
                      int threads) {
  lstm_cell_rows(gates, c_prev, c, doubled, batch, hidden, std::max(threads, 1));
  return 0;
}

int mixprec_lstm_hidden(const float* gates, const float* s, void* h, int dtype, int64_t batch, int64_t hidden,
                        const int32_t* p, const int32_t* key, void* q, int q_dtype, int threads) {
  threads = std::max(threads, 1);
  const StepRounding r = step_rounding(p, key);
  if (dtype == 0) return lstm_hidden_to(gates, s, static_cast<float*>(h), q, q_dtype, batch, hidden, r, threads);
  if (dtype == 1) return lstm_hidden_to(gates, s, static_cast<uint16_t*>(h), q, q_dtype, batch, hidden, r, threads);
  if (dtype == 2) return lstm_hidden_to(gates, s, static_cast<Half*>(h), q, q_dtype, batch, hidden, r, threads);
  return 1;
}

int mixprec_lstm_backward(float* dh, const void* grad_output, int dtype, float* dc, const float* cell_tanh,
                          const float* acts, const float* c_prev, float* d_act, int64_t batch, int64_t hidden,
                          const int32_t* p, const int32_t* key, void* error, int e_dtype, const int32_t* p_dh,
                          const int32_t* key_dh, int threads) {
  threads = std::max(threads, 1);
  const StepRounding r = step_rounding(p, key), r_dh = step_rounding(p_dh, key_dh);
  if (dtype == 0)
    return lstm_backward_to(dh, static_cast<const float*>(grad_output), dc, cell_tanh, acts, c_prev, d_act, error,
                            e_dtype, batch, hidden, r, r_dh, threads);
  if (dtype == 1)
    return lstm_backward_to(dh, static_cast<const uint16_t*>(grad_output), dc, cell_tanh, acts, c_prev, d_act, error,
                            e_dtype, batch, hidden, r, r_dh, threads);
  if (dtype == 2)
    return lstm_backward_to(dh, static_cast<const Half*>(grad_output), dc, cell_tanh, acts, c_prev, d_act, error,
                            e_dtype, batch, hidden, r, r_dh, threads);
  return 1;
}

// out (cols float32) = the column sums of contiguous x (rows x cols; dtype 0 float32, 1
// bfloat16, 2 float16), each in float32 in row order. Returns 0, 1 for an unknown dtype.
int mixprec_column_sums(const void* x, int dtype, int64_t rows, int64_t cols, float* out, int threads) {
  threads = std::max(threads, 1);
  if (dtype == 0) {
    column_sums(static_cast<const float*>(x), rows, cols, out, threads);
    return 0;
  }
  if (dtype == 1) {
    column_sums(static_cast<const uint16_t*>(x), rows, cols, out, threads);
    return 0;
  }
  if (dtype == 2) {
    column_sums(static_cast<const Half*>(x), rows, cols, out, threads);
    return 0;
  }
  return 1;
}

// Whether this build has the BF16 dot-product GEMM (a CPU with AVX512_BF16).
int mixprec_bf16_dot_available() { return kBf16Dot ? 1 : 0; }

// The 32-bit words (K + 1) / 2 * ceil(N / 64) * 64 that pack_b_bf16 writes for K x N.
int64_t mixprec_bf16_packed_words(int64_t k_size, int64_t n_size) {
  return (k_size + 1) / 2 * ((n_size + kPanel - 1) / kPanel) * kPanel;
}

// Pack B (K x N, element (k, n) at b[k * sk + n * sn]; dtype 0 float32, 1 bfloat16;
// float32 elements rounded to BF16 as torch casts them, the identity on BF16 values)
// for mixprec_gemm_bf16. Returns 0, 1 for an unknown dtype.
int mixprec_pack_bf16(const void* b, int dtype, int64_t k_size, int64_t n_size, int64_t sk, int64_t sn, uint32_t* out,
                      int threads) {
  threads = std::max(threads, 1);
  if (dtype == 0) {
    pack_b_bf16(static_cast<const float*>(b), k_size, n_size, sk, sn, out, threads);
    return 0;
  }
  if (dtype == 1) {
    pack_b_bf16(static_cast<const uint16_t*>(b), k_size, n_size, sk, sn, out, threads);
    return 0;
  }
  return 1;
}

// C (M x N float32, row stride ldc) = A (M x K, element (m, k) at a[m * sm + k * sk];
// dtype as above) @ B packed by mixprec_pack_bf16: each product of BF16 values exact,
// summed in float32 on the BF16 dot-product units. Returns 0, 1 for an unknown dtype, 3
// where this build has no BF16 dot products.
int mixprec_gemm_bf16(const void* a, int dtype, int64_t m_size, int64_t k_size, int64_t sm, int64_t sk,
                      const uint32_t* packed, int64_t n_size, float* c, int64_t ldc, int threads) {
#if defined(__AVX512BF16__)
  threads = std::max(threads, 1);
  if (dtype == 0) {
    gemm_bf16(static_cast<const float*>(a), m_size, k_size, sm, sk, packed, n_size, c, ldc, threads);
    return 0;
  }
  if (dtype == 1) {
    gemm_bf16(static_cast<const uint16_t*>(a), m_size, k_size, sm, sk, packed, n_size, c, ldc, threads);
    return 0;
  }
  return 1;
#else
  (void)a; (void)dtype; (void)m_size; (void)k_size; (void)sm; (void)sk; (void)packed; (void)n_size; (void)c;
  (void)ldc; (void)threads;
  return 3;
#endif
}

}  // extern "C"
