// Quantized-weight matmuls for steps of a few rows (decode, speculative verify), with integer dot products.
//
// 4-bit: weights are Q4_0/Q4_1-style groups of 32 along K: W[n, k] = (q - 8) * scale + zero, q in 0..15 (the layout
// torch's int4 CPU kernel takes, and what a dequantized GGUF Q4 tensor holds). torch's kernel widens every weight to
// fp32 and is bound by that arithmetic at about half of what one core can stream from memory. Here each row of x is
// split, per group of 32, into two int8 levels, x ~= dx / 256 * (256 * x1 + x2), so a group's dot product is
// integer (VNNI's u8 x s8 dot, or AVX2's maddubs), and the float work happens once per group instead of per
// weight. The split's error is at most 1/64516 of the group's largest |x| (bf16 itself rounds each x to 1/256 of
// its own size), and the zero term uses the exact fp32 sum of the group's x.
//
// Layout (int4_pack): rows in blocks of 8, then groups; a (block, group) is 160 bytes: 128 bytes of nibbles where
// byte 4 * j + b of 32-byte load s holds row j's weights 8 s + b (low nibble) and 8 s + 4 + b (high nibble), then
// 8 bf16 scales and 8 bf16 zeros. One 256-bit lane per row: a dot instruction multiplies 4 weights of each of 8
// rows by the same 4 x values (one broadcast int32), and the 8 rows' accumulators stay in registers over all of K.
// Each row of x sees the same operations in the same order whatever else shares the step (batch-invariant), and
// the scalar path computes the same integers and float operations, so every path gives the same bits.
//
// 8-bit (int8_pack, int8_packed_matmul): GGUF's Q8_0 and Q5_K rows (int8 with a float scale and offset per group
// of 32), laid out the same way with q + 128 as the unsigned operand (the 128 * sum of x's levels it adds is taken
// off in integers); an LM head's rows for one-token steps, and a GGUF's int8 projections. Q6_K's scales per 16
// weights take a variant with two scales per group (Int8HalvesFormat): each half's integer dot is kept apart. int8_group_matmul keeps the plain [N, K] layout an
// embedding looks rows up in, any group size (Q6_K's 16), and exact fp32 weights times fp32 x.
#include "quant_matmul.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kRowBlock = 8;
constexpr int kMaxRows = 8;                        // rows of x per pass over the weights

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// One row of x, quantized for the dot products: per group, two int8 levels and the float terms of the group.
struct QuantRow {
  const int8_t* x1;    // [K]
  const int8_t* x2;    // [K]
  const float* step;   // dx / 256 per group
  const float* sum;    // exact sum of x per group
  const float* sum8;   // 8 * sum: the (q - 8) offset folded into one fused multiply-subtract
  const int32_t* level_sum;  // 256 * sum(x1) + sum(x2) per group: the 8-bit path's q + 128 correction
  const int32_t* half_level_sum;  // the same per half group (2 per group): Q6_K's scales of 16
};

// The rows' storage, reused from call to call (a step makes ~120 of these calls; allocations would show).
struct QuantRows {
  std::vector<int8_t> x1, x2;
  std::vector<float> step, sum, sum8;
  std::vector<int32_t> level_sum, half_level_sum;
  std::vector<QuantRow> rows;
};

template <typename T>
void quantize_row(const T* x, int64_t K, int8_t* x1, int8_t* x2, float* step, float* sums, float* sums8,
                  int32_t* level_sums, int32_t* half_level_sums) {
  const int64_t groups = K / kGroup;
  float xs[kGroup];
  for (int64_t g = 0; g < groups; ++g) {
    float amax = 0.f, sum = 0.f;
    for (int64_t i = 0; i < kGroup; ++i) {
      xs[i] = static_cast<float>(x[g * kGroup + i]);
      amax = std::max(amax, std::fabs(xs[i]));
      sum += xs[i];
    }
    sums[g] = sum;
    sums8[g] = 8.f * sum;
    step[g] = 0.f;
    level_sums[g] = 0;
    half_level_sums[2 * g] = half_level_sums[2 * g + 1] = 0;
    int8_t* q1 = x1 + g * kGroup;
    int8_t* q2 = x2 + g * kGroup;
    if (amax == 0.f) {
      std::memset(q1, 0, kGroup);
      std::memset(q2, 0, kGroup);
      continue;
    }
    const float dx = amax / 127.f, inv = 127.f / amax;
    step[g] = dx / 256.f;
    int32_t halves[2] = {0, 0};
    for (int64_t i = 0; i < kGroup; ++i) {
      const float first = std::nearbyint(xs[i] * inv);
      const float rest = std::fma(-first, dx, xs[i]);
      q1[i] = static_cast<int8_t>(first);
      q2[i] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(rest * inv * 256.f))));
      halves[i >= kGroup / 2] += 256 * q1[i] + q2[i];
    }
    level_sums[g] = halves[0] + halves[1];
    half_level_sums[2 * g] = halves[0];
    half_level_sums[2 * g + 1] = halves[1];
  }
}

template <typename T>
const QuantRow* quantize_rows(const T* x, int64_t rows, int64_t K) {
  thread_local QuantRows buf;
  const int64_t groups = K / kGroup;
  buf.x1.resize(rows * K);
  buf.x2.resize(rows * K);
  buf.step.resize(rows * groups);
  buf.sum.resize(rows * groups);
  buf.sum8.resize(rows * groups);
  buf.level_sum.resize(rows * groups);
  buf.half_level_sum.resize(rows * groups * 2);
  buf.rows.resize(rows);
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t g0 = t * groups;
    quantize_row(x + t * K, K, &buf.x1[t * K], &buf.x2[t * K], &buf.step[g0], &buf.sum[g0], &buf.sum8[g0],
                 &buf.level_sum[g0], &buf.half_level_sum[2 * g0]);
    buf.rows[t] = QuantRow{&buf.x1[t * K], &buf.x2[t * K], &buf.step[g0], &buf.sum[g0], &buf.sum8[g0],
                           &buf.level_sum[g0], &buf.half_level_sum[2 * g0]};
  }
  return buf.rows.data();
}

// The two weight formats of a (block of 8 rows, group of 32). `u(blk, j, i)` is row j's weight i as the unsigned
// operand of the dot; `finish` turns a group's integer dot S = sum u * (256 x1 + x2) into the row's float terms.
//
// 4-bit: 128 bytes of nibbles (see the top), 8 bf16 scales, 8 bf16 zeros; W = (u - 8) * scale + zero.
struct Int4Format {
  static constexpr int64_t kBlockBytes = 128 + 8 * 2 + 8 * 2;
  static constexpr int kRowsPerPass = kMaxRows;
  static int u(const uint8_t* blk, int j, int i) {
    const uint8_t byte = blk[32 * (i / 8) + 4 * j + i % 4];
    return (i % 8) < 4 ? (byte & 15) : (byte >> 4);
  }
  static float scale(const uint8_t* blk, int j) { return bf16_to_float(reinterpret_cast<const uint16_t*>(blk + 128)[j]); }
  static float zero(const uint8_t* blk, int j) { return bf16_to_float(reinterpret_cast<const uint16_t*>(blk + 144)[j]); }
  // acc + scale * (step * S - 8 * sum) + zero * sum, S = half[0] + half[1]
  static float finish(float acc, const int32_t* half, const uint8_t* blk, int j, const QuantRow& row, int64_t g) {
    const float a = std::fma(static_cast<float>(half[0] + half[1]), row.step[g], -row.sum8[g]);
    return std::fma(zero(blk, j), row.sum[g], std::fma(a, scale(blk, j), acc));
  }
};

// 8-bit: 256 bytes where byte 4 * j + b of 32-byte load i holds row j's q[4 i + b] + 128, 8 fp32 scales and 8 fp32
// offsets; W = q * scale - offset = (u - 128) * scale - offset.
// W = (u - Format::kShift) * scale - offset: acc + scale * step * (S - kShift * levels) - offset * sum, S = half[0]
// + half[1]. The 8-bit and 5-bit layouts' finish.
template <typename Format>
inline float scale_offset_finish(float acc, const int32_t* half, const uint8_t* blk, int j, const QuantRow& row,
                                 int64_t g) {
  const float a = static_cast<float>(half[0] + half[1] - Format::kShift * row.level_sum[g]) * row.step[g];
  return std::fma(-Format::scales(blk)[8 + j], row.sum[g], std::fma(a, Format::scales(blk)[j], acc));
}

struct Int8Format {
  static constexpr int64_t kBlockBytes = 256 + 8 * 4 + 8 * 4;
  static constexpr int kShift = 128;  // u = q + 128
  // More rows of x per pass run out of vector registers (eight 256-bit weight vectors a group): at 4 a pass took
  // 3.5x the time of 2 on this machine's Zen 4, so a block is read from cache again instead.
  static constexpr int kRowsPerPass = 2;
  static int u(const uint8_t* blk, int j, int i) { return blk[32 * (i / 4) + 4 * j + i % 4]; }
  static const float* scales(const uint8_t* blk) { return reinterpret_cast<const float*>(blk + 256); }
  static float finish(float acc, const int32_t* half, const uint8_t* blk, int j, const QuantRow& row, int64_t g) {
    return scale_offset_finish<Int8Format>(acc, half, blk, j, row, g);
  }
};

// 8-bit with a scale per half group (GGUF's Q6_K: scales per 16 weights): the 8-bit layout, then 16 fp32 scales
// (8 rows' first halves, then their second halves) and 8 fp32 offsets; W = q * scale[half] - offset.
struct Int8HalvesFormat {
  static constexpr int64_t kBlockBytes = 256 + 16 * 4 + 8 * 4;
  static constexpr int kRowsPerPass = Int8Format::kRowsPerPass;
  static int u(const uint8_t* blk, int j, int i) { return Int8Format::u(blk, j, i); }
  static const float* scales(const uint8_t* blk) { return reinterpret_cast<const float*>(blk + 256); }
  static float finish(float acc, const int32_t* half, const uint8_t* blk, int j, const QuantRow& row, int64_t g) {
    const float a0 = static_cast<float>(half[0] - 128 * row.half_level_sum[2 * g]) * row.step[g];
    const float a1 = static_cast<float>(half[1] - 128 * row.half_level_sum[2 * g + 1]) * row.step[g];
    acc = std::fma(a1, scales(blk)[8 + j], std::fma(a0, scales(blk)[j], acc));
    return std::fma(-scales(blk)[16 + j], row.sum[g], acc);
  }
};

// 5-bit (GGUF's Q5_0 and Q5_K): the 4-bit layout's 128 bytes of low nibbles, then 32 bytes whose byte 4 j + b
// holds, in bit k, the fifth bit of row j's weight 4 k + b (the weight lane j byte b of dot operand k carries), then
// 8 fp32 scales and 8 fp32 offsets; W = u * scale - offset with u in 0..31. 0.875 bytes a weight against the 8-bit
// layout's 1.25.
struct Int5Format {
  static constexpr int64_t kBlockBytes = 128 + 32 + 8 * 4 + 8 * 4;
  static constexpr int kRowsPerPass = Int8Format::kRowsPerPass;
  static int u(const uint8_t* blk, int j, int i) {
    return Int4Format::u(blk, j, i) | (((blk[128 + 4 * j + i % 4] >> (i / 4)) & 1) << 4);
  }
  static constexpr int kShift = 0;
  static const float* scales(const uint8_t* blk) { return reinterpret_cast<const float*>(blk + 160); }
  static float finish(float acc, const int32_t* half, const uint8_t* blk, int j, const QuantRow& row, int64_t g) {
    return scale_offset_finish<Int5Format>(acc, half, blk, j, row, g);
  }
};

template <typename Format>
constexpr bool kIsInt8 = std::is_same_v<Format, Int8Format> || std::is_same_v<Format, Int8HalvesFormat>;

// The scalar path: the same integers and the same float operations, in the same order, as the vector one.
template <typename Format>
void block_rows_scalar(const uint8_t* w, int64_t groups, const QuantRow* rows, int T, float* out /* [T][8] */) {
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < 8; ++j) out[t * 8 + j] = 0.f;
  }
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* blk = w + g * Format::kBlockBytes;
    for (int t = 0; t < T; ++t) {
      const int8_t* x1 = rows[t].x1 + g * kGroup;
      const int8_t* x2 = rows[t].x2 + g * kGroup;
      for (int j = 0; j < 8; ++j) {
        int32_t half[2];
        for (int h = 0; h < 2; ++h) {
          int32_t s1 = 0, s2 = 0;
          for (int i = h * kGroup / 2; i < (h + 1) * kGroup / 2; ++i) {
            s1 += Format::u(blk, j, i) * x1[i];
            s2 += Format::u(blk, j, i) * x2[i];
          }
          half[h] = s1 * 256 + s2;
        }
        out[t * 8 + j] = Format::finish(out[t * 8 + j], half, blk, j, rows[t], g);
      }
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif

// u8 x s8 dot of 4-byte lanes, added to acc.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  // maddubs saturates pairs at 32767: fine for 4-bit u (15 * 127 * 2) and for |q| of int8 (128 * 127 * 2), which
  // is why the 8-bit format takes (|q|, sign(x, q)) without VNNI instead of (q + 128, x).
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

inline __m256 load_bf16x8(const uint8_t* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

inline int32_t word(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// A group's 8 dot operands: u[i] holds weights 4 i .. 4 i + 3 of the group, one row per 32-bit lane. Without VNNI
// the 8-bit format gives |q| and keeps q itself in sign[] to flip x's signs with.
template <typename Format>
inline void load_group(const uint8_t* blk, __m256i* u, __m256i* sign) {
  if constexpr (!kIsInt8<Format>) {
    const __m256i low = _mm256_set1_epi8(15);
    for (int s = 0; s < 4; ++s) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * s));
      u[2 * s] = _mm256_and_si256(v, low);
      u[2 * s + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    if constexpr (std::is_same_v<Format, Int5Format>) {
      // Bit k of each byte of the fifth-bit vector moved to bit 4 (a 16-bit shift; the mask keeps each byte's own).
      const __m256i high = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128));
      const __m256i bit4 = _mm256_set1_epi8(16);
      for (int k = 0; k < 8; ++k) {
        const __m256i moved = k < 4 ? _mm256_sll_epi16(high, _mm_cvtsi32_si128(4 - k))
                                    : _mm256_srl_epi16(high, _mm_cvtsi32_si128(k - 4));
        u[k] = _mm256_or_si256(u[k], _mm256_and_si256(moved, bit4));
      }
    }
  } else {
    for (int i = 0; i < 8; ++i) {
      u[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * i));
      if (!kVnni) {
        sign[i] = _mm256_xor_si256(u[i], _mm256_set1_epi8(static_cast<char>(0x80)));  // q
        u[i] = _mm256_abs_epi8(sign[i]);
      }
    }
  }
}

template <typename Format, int T>
void block_rows_avx2(const uint8_t* w, int64_t groups, const QuantRow* rows, float* out /* [T][8] */) {
  constexpr bool kSignTrick = !kVnni && kIsInt8<Format>;
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* blk = w + g * Format::kBlockBytes;
    __m256i u[8], sign[8];
    load_group<Format>(blk, u, sign);
    for (int t = 0; t < T; ++t) {
      const int8_t* x1 = rows[t].x1 + g * kGroup;
      const int8_t* x2 = rows[t].x2 + g * kGroup;
      __m256i s1a = _mm256_setzero_si256(), s1b = _mm256_setzero_si256();
      __m256i s2a = _mm256_setzero_si256(), s2b = _mm256_setzero_si256();
      // a: weights 0..15 of the group, b: 16..31 (the halves Q6_K scales apart; integer sums, so the order of
      // the other formats' additions does not change their bits).
      for (int i = 0; i < 4; ++i) {
        __m256i a1 = _mm256_set1_epi32(word(x1 + 4 * i)), b1 = _mm256_set1_epi32(word(x1 + 4 * i + 16));
        __m256i a2 = _mm256_set1_epi32(word(x2 + 4 * i)), b2 = _mm256_set1_epi32(word(x2 + 4 * i + 16));
        if constexpr (kSignTrick) {
          a1 = _mm256_sign_epi8(a1, sign[i]), b1 = _mm256_sign_epi8(b1, sign[i + 4]);
          a2 = _mm256_sign_epi8(a2, sign[i]), b2 = _mm256_sign_epi8(b2, sign[i + 4]);
        }
        s1a = dot_u8s8(s1a, u[i], a1);
        s1b = dot_u8s8(s1b, u[i + 4], b1);
        s2a = dot_u8s8(s2a, u[i], a2);
        s2b = dot_u8s8(s2b, u[i + 4], b2);
      }
      const __m256i s = _mm256_add_epi32(_mm256_slli_epi32(_mm256_add_epi32(s1a, s1b), 8), _mm256_add_epi32(s2a, s2b));
      if constexpr (std::is_same_v<Format, Int8HalvesFormat>) {
        const int64_t hl = 2 * g;
        const __m256i lo = _mm256_add_epi32(_mm256_slli_epi32(s1a, 8), s2a);
        const __m256i hi = _mm256_add_epi32(_mm256_slli_epi32(s1b, 8), s2b);
        const int levels = kSignTrick ? 0 : 128;
        const __m256 step = _mm256_set1_ps(rows[t].step[g]);
        const __m256 a0 = _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_sub_epi32(lo, _mm256_set1_epi32(levels * rows[t].half_level_sum[hl]))), step);
        const __m256 a1 = _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_sub_epi32(hi, _mm256_set1_epi32(levels * rows[t].half_level_sum[hl + 1]))), step);
        const float* scales = Int8HalvesFormat::scales(blk);
        acc[t] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(scales), acc[t]);
        acc[t] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(scales + 8), acc[t]);
        acc[t] = _mm256_fnmadd_ps(_mm256_loadu_ps(scales + 16), _mm256_set1_ps(rows[t].sum[g]), acc[t]);
      } else if constexpr (std::is_same_v<Format, Int4Format>) {
        const __m256 a = _mm256_fmsub_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(rows[t].step[g]),
                                         _mm256_set1_ps(rows[t].sum8[g]));
        acc[t] = _mm256_fmadd_ps(a, load_bf16x8(blk + 128), acc[t]);
        acc[t] = _mm256_fmadd_ps(load_bf16x8(blk + 144), _mm256_set1_ps(rows[t].sum[g]), acc[t]);
      } else {
        // The 8-bit layout: kSignTrick's S is sum q * x, VNNI's sum (q + 128) * x, both made sum q * x here; the
        // 5-bit one's u needs no shift.
        const __m256i levels = _mm256_set1_epi32((kSignTrick ? 0 : Format::kShift) * rows[t].level_sum[g]);
        const __m256 a = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s, levels)), _mm256_set1_ps(rows[t].step[g]));
        const float* scales = Format::scales(blk);
        acc[t] = _mm256_fmadd_ps(a, _mm256_loadu_ps(scales), acc[t]);
        acc[t] = _mm256_fnmadd_ps(_mm256_loadu_ps(scales + 8), _mm256_set1_ps(rows[t].sum[g]), acc[t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) _mm256_storeu_ps(out + t * 8, acc[t]);
}
#endif

template <typename Format>
void block_rows(const uint8_t* w, int64_t groups, const QuantRow* rows, int T, float* out, bool portable) {
#if defined(__AVX2__) && defined(__FMA__)
  if (!portable) switch (T) {
    case 1: return block_rows_avx2<Format, 1>(w, groups, rows, out);
    case 2: return block_rows_avx2<Format, 2>(w, groups, rows, out);
    case 3: return block_rows_avx2<Format, 3>(w, groups, rows, out);
    case 4: return block_rows_avx2<Format, 4>(w, groups, rows, out);
    case 5: return block_rows_avx2<Format, 5>(w, groups, rows, out);
    case 6: return block_rows_avx2<Format, 6>(w, groups, rows, out);
    case 7: return block_rows_avx2<Format, 7>(w, groups, rows, out);
    case 8: return block_rows_avx2<Format, 8>(w, groups, rows, out);
    default: break;
  }
#endif
  block_rows_scalar<Format>(w, groups, rows, T, out);
}

// packed [N / 8, groups, Format::kBlockBytes] times x [T, K] -> [T, N] in x's dtype, Format::kRowsPerPass rows of x
// per pass. With `silu_and_mul` the weight is a [gate; up] pair and the result [T, N / 2] = silu(gate) * up, formed
// in fp32 and rounded once (a gated MLP's activation without three more torch ops and passes over memory).
template <typename Format>
torch::Tensor packed_matmul(const torch::Tensor& x, const torch::Tensor& packed, bool portable, bool silu_and_mul) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && packed.dim() == 3 && packed.scalar_type() == at::kByte &&
                  packed.is_contiguous() && packed.size(2) == Format::kBlockBytes,
              "x must be contiguous [T, K] and the packed weight come from its pack op");
  const int64_t T = x.size(0), K = x.size(1), blocks = packed.size(0), groups = packed.size(1);
  TORCH_CHECK(groups * kGroup == K, "x and the packed weight disagree on K");
  const int64_t N = blocks * kRowBlock;
  TORCH_CHECK(!silu_and_mul || N % 2 == 0, "silu_and_mul needs a [gate; up] weight");
  torch::Tensor out = torch::empty({T, silu_and_mul ? N / 2 : N}, x.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  thread_local std::vector<float> scratch;  // [T, N] in fp32 before silu_and_mul
  if (silu_and_mul) scratch.resize(T * N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "packed_matmul", [&] {
    const QuantRow* rows = quantize_rows(x.data_ptr<scalar_t>(), T, K);
    scalar_t* outp = out.data_ptr<scalar_t>();
    float* full = silu_and_mul ? scratch.data() : nullptr;
    at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
      float tile[kMaxRows * 8];
      for (int64_t blk = begin; blk < end; ++blk) {
        for (int64_t t0 = 0; t0 < T; t0 += Format::kRowsPerPass) {
          const int rows_here = static_cast<int>(std::min<int64_t>(Format::kRowsPerPass, T - t0));
          block_rows<Format>(wp + blk * groups * Format::kBlockBytes, groups, rows + t0, rows_here, tile, portable);
          for (int t = 0; t < rows_here; ++t) {
            const int64_t at = (t0 + t) * N + blk * kRowBlock;
            for (int j = 0; j < 8; ++j) {
              if (full != nullptr) {
                full[at + j] = tile[t * 8 + j];
              } else {
                outp[at + j] = static_cast<scalar_t>(tile[t * 8 + j]);
              }
            }
          }
        }
      }
    });
    if (full != nullptr) {
      const int64_t half = N / 2;
      for (int64_t t = 0; t < T; ++t) {
        const float* gate = full + t * N;
        for (int64_t i = 0; i < half; ++i) {
          const float g = gate[i];
          outp[t * half + i] = static_cast<scalar_t>(g / (1.f + std::exp(-g)) * gate[half + i]);
        }
      }
    }
  });
  return out;
}

// out[r] = sum_k (q[k] * scale[k / group] - offset[k / group]) * x[r][k] for R rows of x (x[r] = x + r * K), the
// weight formed exactly in fp32. Each int8 chunk is widened once for all R rows, and every row sees the same
// operations in the same order whatever R is: a row's result does not depend on the rows beside it.
template <int R>
inline void int8_rows_dot(const int8_t* q, const float* scale, const float* offset, const float* x, int64_t K,
                          int64_t group, float* out) {
  const int64_t groups = K / group;
#if defined(__AVX512F__)
  if (group % 16 == 0) {
    __m512 total[R];
    float offset_sum[R];
    for (int r = 0; r < R; ++r) {
      total[r] = _mm512_setzero_ps();
      offset_sum[r] = 0.f;
    }
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* qg = q + g * group;
      __m512 dot[R], xs[R];
      for (int r = 0; r < R; ++r) dot[r] = xs[r] = _mm512_setzero_ps();
      for (int64_t i = 0; i < group; i += 16) {
        const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qg + i))));
        for (int r = 0; r < R; ++r) {
          const __m512 xv = _mm512_loadu_ps(x + r * K + g * group + i);
          dot[r] = _mm512_fmadd_ps(qf, xv, dot[r]);
          if (offset != nullptr) xs[r] = _mm512_add_ps(xs[r], xv);
        }
      }
      const __m512 vs = _mm512_set1_ps(scale[g]);
      for (int r = 0; r < R; ++r) {
        total[r] = _mm512_fmadd_ps(dot[r], vs, total[r]);
        if (offset != nullptr) offset_sum[r] += offset[g] * _mm512_reduce_add_ps(xs[r]);
      }
    }
    for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(total[r]) - offset_sum[r];
    return;
  }
#endif
  for (int r = 0; r < R; ++r) {
    const float* xr = x + r * K;
    float total = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      float dot = 0.f, xs = 0.f;
      for (int64_t i = g * group; i < (g + 1) * group; ++i) {
        dot += static_cast<float>(q[i]) * xr[i];
        xs += xr[i];
      }
      total += dot * scale[g] - (offset != nullptr ? offset[g] * xs : 0.f);
    }
    out[r] = total;
  }
}

}  // namespace

namespace {

// Row j's 32 quants' low 4 bits into a (block, group)'s 128 bytes of nibbles, in the layout of the top.
inline void pack_nibbles(const uint8_t* qr, int j, uint8_t* o) {
  for (int s = 0; s < 4; ++s) {
    for (int b = 0; b < 4; ++b) {
      o[32 * s + 4 * j + b] = static_cast<uint8_t>((qr[8 * s + b] & 15) | ((qr[8 * s + 4 + b] & 15) << 4));
    }
  }
}

}  // namespace

torch::Tensor int4_pack(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& zeros) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte, "q must be uint8 [N, K] with values 0..15");
  const int64_t N = q.size(0), K = q.size(1), groups = K / kGroup;
  TORCH_CHECK(N % kRowBlock == 0 && K % kGroup == 0, "int4_pack needs N % 8 == 0 and K % 32 == 0");
  TORCH_CHECK(scales.sizes() == torch::IntArrayRef({N, groups}) && zeros.sizes() == scales.sizes(),
              "scales and zeros must be [N, K / 32]");
  const torch::Tensor qc = q.contiguous();
  const torch::Tensor s16 = scales.to(at::kBFloat16).contiguous(), z16 = zeros.to(at::kBFloat16).contiguous();
  torch::Tensor packed = torch::empty({N / kRowBlock, groups, Int4Format::kBlockBytes}, q.options());
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(s16.data_ptr<at::BFloat16>());
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(z16.data_ptr<at::BFloat16>());
  uint8_t* out = packed.data_ptr<uint8_t>();
  for (int64_t blk = 0; blk < N / kRowBlock; ++blk) {
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* o = out + (blk * groups + g) * Int4Format::kBlockBytes;
      uint16_t* os = reinterpret_cast<uint16_t*>(o + 128);
      for (int j = 0; j < 8; ++j) {
        const int64_t n = blk * kRowBlock + j;
        const uint8_t* qr = qp + n * K + g * kGroup;
        pack_nibbles(qr, j, o);
        os[j] = sp[n * groups + g];
        os[8 + j] = zp[n * groups + g];
      }
    }
  }
  return packed;
}

torch::Tensor int4_group_matmul(const torch::Tensor& x, const torch::Tensor& packed, bool portable,
                                bool silu_and_mul) {
  return packed_matmul<Int4Format>(x, packed, portable, silu_and_mul);
}

torch::Tensor int8_pack(const torch::Tensor& q, const torch::Tensor& scales, const c10::optional<torch::Tensor>& offsets) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar, "q must be int8 [N, K]");
  const int64_t N = q.size(0), K = q.size(1), groups = K / kGroup;
  TORCH_CHECK(N % kRowBlock == 0 && K % kGroup == 0, "int8_pack needs N % 8 == 0 and K % 32 == 0");
  const bool halves = scales.dim() == 2 && scales.size(1) == 2 * groups;
  TORCH_CHECK(scales.sizes() == torch::IntArrayRef({N, groups}) || (halves && scales.size(0) == N),
              "scales must be [N, K / 32] or [N, K / 16]");
  TORCH_CHECK(!offsets.has_value() || offsets->sizes() == torch::IntArrayRef({N, groups}), "offsets must be [N, K / 32]");
  const int64_t block_bytes = halves ? Int8HalvesFormat::kBlockBytes : Int8Format::kBlockBytes;
  const int64_t per_group = halves ? 2 : 1;  // scales per group
  const torch::Tensor qc = q.contiguous();
  const torch::Tensor sf = scales.to(at::kFloat).contiguous();
  const torch::Tensor of = offsets.has_value() ? offsets->to(at::kFloat).contiguous()
                                               : torch::zeros({N, groups}, sf.options());
  torch::Tensor packed = torch::empty({N / kRowBlock, groups, block_bytes}, q.options().dtype(at::kByte));
  const int8_t* qp = qc.data_ptr<int8_t>();
  const float* sp = sf.data_ptr<float>();
  const float* op = of.data_ptr<float>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  for (int64_t blk = 0; blk < N / kRowBlock; ++blk) {
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* o = out + (blk * groups + g) * block_bytes;
      float* os = reinterpret_cast<float*>(o + 256);
      for (int j = 0; j < 8; ++j) {
        const int64_t n = blk * kRowBlock + j;
        const int8_t* qr = qp + n * K + g * kGroup;
        for (int i = 0; i < kGroup; ++i) o[32 * (i / 4) + 4 * j + i % 4] = static_cast<uint8_t>(qr[i] + 128);
        for (int64_t h = 0; h < per_group; ++h) os[8 * h + j] = sp[(n * groups + g) * per_group + h];
        os[8 * per_group + j] = op[n * groups + g];
      }
    }
  }
  return packed;
}

torch::Tensor int5_pack(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& offsets) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte, "q must be uint8 [N, K] with values 0..31");
  const int64_t N = q.size(0), K = q.size(1), groups = K / kGroup;
  TORCH_CHECK(N % kRowBlock == 0 && K % kGroup == 0, "int5_pack needs N % 8 == 0 and K % 32 == 0");
  TORCH_CHECK(scales.sizes() == torch::IntArrayRef({N, groups}) && offsets.sizes() == scales.sizes(),
              "scales and offsets must be [N, K / 32]");
  const torch::Tensor qc = q.contiguous();
  TORCH_CHECK(N * K == 0 || qc.max().item<uint8_t>() < 32, "q must hold values 0..31");
  const torch::Tensor sf = scales.to(at::kFloat).contiguous(), of = offsets.to(at::kFloat).contiguous();
  torch::Tensor packed = torch::zeros({N / kRowBlock, groups, Int5Format::kBlockBytes}, q.options());
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const float* sp = sf.data_ptr<float>();
  const float* op = of.data_ptr<float>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  for (int64_t blk = 0; blk < N / kRowBlock; ++blk) {
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* o = out + (blk * groups + g) * Int5Format::kBlockBytes;
      float* os = reinterpret_cast<float*>(o + 160);
      for (int j = 0; j < 8; ++j) {
        const int64_t n = blk * kRowBlock + j;
        const uint8_t* qr = qp + n * K + g * kGroup;
        pack_nibbles(qr, j, o);
        for (int i = 0; i < kGroup; ++i) o[128 + 4 * j + i % 4] |= static_cast<uint8_t>(((qr[i] >> 4) & 1) << (i / 4));
        os[j] = sp[n * groups + g];
        os[8 + j] = op[n * groups + g];
      }
    }
  }
  return packed;
}

torch::Tensor int8_packed_matmul(const torch::Tensor& x, const torch::Tensor& packed, bool portable, bool silu_and_mul) {
  if (packed.dim() == 3 && packed.size(2) == Int8HalvesFormat::kBlockBytes) {
    return packed_matmul<Int8HalvesFormat>(x, packed, portable, silu_and_mul);
  }
  if (packed.dim() == 3 && packed.size(2) == Int5Format::kBlockBytes) {
    return packed_matmul<Int5Format>(x, packed, portable, silu_and_mul);
  }
  return packed_matmul<Int8Format>(x, packed, portable, silu_and_mul);
}

namespace {

// Every weight of a packed [blocks, groups, Format::kBlockBytes] as `out` [blocks * 8, groups * 32] (fp32 math, one
// rounding to out's dtype), for steps of many rows, which multiply tiles of these instead. A (block, group) is first
// unpacked to its 8 rows' quants, so the per-row loop over 32 weights is plain arithmetic the compiler vectorizes.
template <typename T>
inline T round_to(float value) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // round to nearest even, as the cast does (no NaNs here)
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    bits += 0x7FFF + ((bits >> 16) & 1);
    return c10::BFloat16(static_cast<uint16_t>(bits >> 16), c10::BFloat16::from_bits());
  } else {
    return static_cast<T>(value);
  }
}

template <typename Format, typename T>
void dequantize_blocks(const uint8_t* w, int64_t blocks, int64_t groups, T* out) {
  const int64_t K = groups * kGroup;
  at::parallel_for(0, blocks, 4, [&](int64_t begin, int64_t end) {
    float uq[8][kGroup];
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* blk = w + (b * groups + g) * Format::kBlockBytes;
        if constexpr (!kIsInt8<Format>) {  // the layouts of the top, read byte by byte
          for (int s = 0; s < 4; ++s) {
            for (int j = 0; j < 8; ++j) {
              for (int b = 0; b < 4; ++b) {
                const uint8_t byte = blk[32 * s + 4 * j + b];
                uq[j][8 * s + b] = static_cast<float>(byte & 15);
                uq[j][8 * s + 4 + b] = static_cast<float>(byte >> 4);
              }
            }
          }
          if constexpr (std::is_same_v<Format, Int5Format>) {  // bit k of byte 4 j + b: weight 4 k + b's 16
            for (int j = 0; j < 8; ++j) {
              for (int b = 0; b < 4; ++b) {
                const uint8_t high = blk[128 + 4 * j + b];
                for (int k = 0; k < 8; ++k) uq[j][4 * k + b] += static_cast<float>(((high >> k) & 1) << 4);
              }
            }
          }
        } else {
          for (int s = 0; s < 8; ++s) {
            for (int j = 0; j < 8; ++j) {
              for (int b = 0; b < 4; ++b) uq[j][4 * s + b] = static_cast<float>(blk[32 * s + 4 * j + b]);
            }
          }
        }
        for (int j = 0; j < 8; ++j) {
          T* row = out + (b * kRowBlock + j) * K + g * kGroup;
          if constexpr (std::is_same_v<Format, Int4Format>) {
            const float scale = Format::scale(blk, j), zero = Format::zero(blk, j);
            for (int i = 0; i < kGroup; ++i) row[i] = round_to<T>(std::fma(uq[j][i] - 8.f, scale, zero));
          } else if constexpr (std::is_same_v<Format, Int8Format> || std::is_same_v<Format, Int5Format>) {
            const float scale = Format::scales(blk)[j], offset = Format::scales(blk)[8 + j];
            const float shift = static_cast<float>(Format::kShift);
            for (int i = 0; i < kGroup; ++i) row[i] = round_to<T>(std::fma(uq[j][i] - shift, scale, -offset));
          } else {
            const float* sc = Format::scales(blk);
            const float offset = sc[16 + j];
            for (int i = 0; i < kGroup; ++i) {
              row[i] = round_to<T>(std::fma(uq[j][i] - 128.f, sc[8 * (i / 16) + j], -offset));
            }
          }
        }
      }
    }
  });
}

}  // namespace

torch::Tensor packed_dequantize(const torch::Tensor& packed, at::ScalarType dtype) {
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must come from int4_pack, int5_pack or int8_pack");
  const int64_t blocks = packed.size(0), groups = packed.size(1), bytes = packed.size(2);
  torch::Tensor out = torch::empty({blocks * kRowBlock, groups * kGroup}, packed.options().dtype(dtype));
  const uint8_t* w = packed.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "packed_dequantize", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    if (bytes == Int4Format::kBlockBytes) {
      dequantize_blocks<Int4Format>(w, blocks, groups, o);
    } else if (bytes == Int8Format::kBlockBytes) {
      dequantize_blocks<Int8Format>(w, blocks, groups, o);
    } else if (bytes == Int5Format::kBlockBytes) {
      dequantize_blocks<Int5Format>(w, blocks, groups, o);
    } else {
      TORCH_CHECK(bytes == Int8HalvesFormat::kBlockBytes, "packed must come from int4_pack, int5_pack or int8_pack");
      dequantize_blocks<Int8HalvesFormat>(w, blocks, groups, o);
    }
  });
  return out;
}

torch::Tensor packed_group_matmul(const torch::Tensor& x, const torch::Tensor& packed, bool silu_and_mul) {
  if (packed.dim() == 3 && packed.size(2) == Int4Format::kBlockBytes) {
    return packed_matmul<Int4Format>(x, packed, false, silu_and_mul);
  }
  return int8_packed_matmul(x, packed, false, silu_and_mul);
}

// x [T, K] times int8 rows q [N, K] with a scale (and optionally an offset) per group of `group` columns:
// W[n, k] = q[n, k] * scales[n, k / group] - offsets[n, k / group], exact in fp32. Returns fp32 [T, N]. Each weight
// row is read once per four rows of x (int8_rows_dot), so a step of a few tokens reads the int8 bytes about once;
// GGUF's Q8_0, Q6_K and Q5_K rows in their plain layout (the one an embedding looks rows up in) come this way.
torch::Tensor int8_group_matmul(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
                                const c10::optional<torch::Tensor>& offsets) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(),
              "x must be [T, K] and q int8 [N, K]");
  const int64_t T = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K, "x and q disagree on K");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && K % scales.size(1) == 0, "scales must be [N, K / group]");
  const int64_t groups = scales.size(1), group = K / groups;
  const torch::Tensor xf = x.to(at::kFloat).contiguous();
  const torch::Tensor sf = scales.to(at::kFloat).contiguous();
  torch::Tensor of;
  if (offsets.has_value()) {
    TORCH_CHECK(offsets->sizes() == scales.sizes(), "offsets must match scales");
    of = offsets->to(at::kFloat).contiguous();
  }
  torch::Tensor out = torch::empty({T, N}, x.options().dtype(at::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = sf.data_ptr<float>();
  const float* op = of.defined() ? of.data_ptr<float>() : nullptr;
  float* outp = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* qn = qp + n * K;
      const float* sn = sp + n * groups;
      const float* on = op != nullptr ? op + n * groups : nullptr;
      float dots[4];
      int64_t t = 0;
      for (; t + 4 <= T; t += 4) {  // four rows of x per pass over the weight row
        int8_rows_dot<4>(qn, sn, on, xp + t * K, K, group, dots);
        for (int r = 0; r < 4; ++r) outp[(t + r) * N + n] = dots[r];
      }
      for (; t < T; ++t) {
        int8_rows_dot<1>(qn, sn, on, xp + t * K, K, group, dots);
        outp[t * N + n] = dots[0];
      }
    }
  });
  return out;
}
