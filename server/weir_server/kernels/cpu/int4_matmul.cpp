// 4-bit weight matmul for steps of a few rows (decode, speculative verify), with integer dot products.
//
// Weights are Q4_0/Q4_1-style groups of 32 along K: W[n, k] = (q - 8) * scale + zero, q in 0..15 (the layout
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
#include "int4_matmul.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kRowBlock = 8;
constexpr int64_t kBlockBytes = 128 + 2 * 8 * 2;  // nibbles, 8 bf16 scales, 8 bf16 zeros
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
};

// The rows' storage, reused from call to call (a step makes ~120 of these calls; allocations would show).
struct QuantRows {
  std::vector<int8_t> x1, x2;
  std::vector<float> step, sum, sum8;
  std::vector<QuantRow> rows;
};

template <typename T>
void quantize_row(const T* x, int64_t K, int8_t* x1, int8_t* x2, float* step, float* sums, float* sums8) {
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
    int8_t* q1 = x1 + g * kGroup;
    int8_t* q2 = x2 + g * kGroup;
    if (amax == 0.f) {
      std::memset(q1, 0, kGroup);
      std::memset(q2, 0, kGroup);
      continue;
    }
    const float dx = amax / 127.f, inv = 127.f / amax;
    step[g] = dx / 256.f;
    for (int64_t i = 0; i < kGroup; ++i) {
      const float first = std::nearbyint(xs[i] * inv);
      const float rest = std::fma(-first, dx, xs[i]);
      q1[i] = static_cast<int8_t>(first);
      q2[i] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(rest * inv * 256.f))));
    }
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
  buf.rows.resize(rows);
  for (int64_t t = 0; t < rows; ++t) {
    quantize_row(x + t * K, K, &buf.x1[t * K], &buf.x2[t * K], &buf.step[t * groups], &buf.sum[t * groups],
                 &buf.sum8[t * groups]);
    buf.rows[t] = QuantRow{&buf.x1[t * K], &buf.x2[t * K], &buf.step[t * groups], &buf.sum[t * groups],
                           &buf.sum8[t * groups]};
  }
  return buf.rows.data();
}

// The scalar path: the same integers and the same float operations, in the same order, as the vector one.
void block_rows_scalar(const uint8_t* w, int64_t groups, const QuantRow* rows, int T, float* out /* [T][8] */) {
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < 8; ++j) out[t * 8 + j] = 0.f;
  }
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* blk = w + g * kBlockBytes;
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(blk + 128);
    const uint16_t* zeros = scales + 8;
    for (int t = 0; t < T; ++t) {
      const int8_t* x1 = rows[t].x1 + g * kGroup;
      const int8_t* x2 = rows[t].x2 + g * kGroup;
      for (int j = 0; j < 8; ++j) {
        int32_t s1 = 0, s2 = 0;
        for (int s = 0; s < 4; ++s) {
          for (int b = 0; b < 4; ++b) {
            const uint8_t byte = blk[32 * s + 4 * j + b];
            const int lo = 8 * s + b, hi = 8 * s + 4 + b;
            s1 += (byte & 15) * x1[lo] + (byte >> 4) * x1[hi];
            s2 += (byte & 15) * x2[lo] + (byte >> 4) * x2[hi];
          }
        }
        const float a = std::fma(static_cast<float>(s1 * 256 + s2), rows[t].step[g], -rows[t].sum8[g]);
        float o = std::fma(a, bf16_to_float(scales[j]), out[t * 8 + j]);
        out[t * 8 + j] = std::fma(bf16_to_float(zeros[j]), rows[t].sum[g], o);
      }
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// u8 x s8 dot of 4-byte lanes, added to acc.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  // maddubs cannot saturate here: 15 * 127 * 2 < 32767.
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

inline __m256 load_bf16x8(const uint16_t* p) {
  const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

inline int32_t word(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int T>
void block_rows_avx2(const uint8_t* w, int64_t groups, const QuantRow* rows, float* out /* [T][8] */) {
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(15);
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* blk = w + g * kBlockBytes;
    __m256i q[8];  // q[i]: weights 4 i .. 4 i + 3 of the group, one row per 32-bit lane
    for (int s = 0; s < 4; ++s) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * s));
      q[2 * s] = _mm256_and_si256(v, low);
      q[2 * s + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    }
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(blk + 128);
    const __m256 scale = load_bf16x8(scales), zero = load_bf16x8(scales + 8);
    for (int t = 0; t < T; ++t) {
      const int8_t* x1 = rows[t].x1 + g * kGroup;
      const int8_t* x2 = rows[t].x2 + g * kGroup;
      __m256i s1a = _mm256_setzero_si256(), s1b = _mm256_setzero_si256();
      __m256i s2a = _mm256_setzero_si256(), s2b = _mm256_setzero_si256();
      for (int i = 0; i < 8; i += 2) {
        s1a = dot_u8s8(s1a, q[i], _mm256_set1_epi32(word(x1 + 4 * i)));
        s1b = dot_u8s8(s1b, q[i + 1], _mm256_set1_epi32(word(x1 + 4 * i + 4)));
        s2a = dot_u8s8(s2a, q[i], _mm256_set1_epi32(word(x2 + 4 * i)));
        s2b = dot_u8s8(s2b, q[i + 1], _mm256_set1_epi32(word(x2 + 4 * i + 4)));
      }
      const __m256i s = _mm256_add_epi32(_mm256_slli_epi32(_mm256_add_epi32(s1a, s1b), 8), _mm256_add_epi32(s2a, s2b));
      const __m256 a = _mm256_fmsub_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(rows[t].step[g]),
                                       _mm256_set1_ps(rows[t].sum8[g]));
      acc[t] = _mm256_fmadd_ps(a, scale, acc[t]);
      acc[t] = _mm256_fmadd_ps(zero, _mm256_set1_ps(rows[t].sum[g]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm256_storeu_ps(out + t * 8, acc[t]);
}
#endif

void block_rows(const uint8_t* w, int64_t groups, const QuantRow* rows, int T, float* out, bool portable) {
#if defined(__AVX2__) && defined(__FMA__)
  if (!portable) switch (T) {
    case 1: return block_rows_avx2<1>(w, groups, rows, out);
    case 2: return block_rows_avx2<2>(w, groups, rows, out);
    case 3: return block_rows_avx2<3>(w, groups, rows, out);
    case 4: return block_rows_avx2<4>(w, groups, rows, out);
    case 5: return block_rows_avx2<5>(w, groups, rows, out);
    case 6: return block_rows_avx2<6>(w, groups, rows, out);
    case 7: return block_rows_avx2<7>(w, groups, rows, out);
    case 8: return block_rows_avx2<8>(w, groups, rows, out);
    default: break;
  }
#endif
  block_rows_scalar(w, groups, rows, T, out);
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
  torch::Tensor packed = torch::empty({N / kRowBlock, groups, kBlockBytes}, q.options());
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(s16.data_ptr<at::BFloat16>());
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(z16.data_ptr<at::BFloat16>());
  uint8_t* out = packed.data_ptr<uint8_t>();
  for (int64_t blk = 0; blk < N / kRowBlock; ++blk) {
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* o = out + (blk * groups + g) * kBlockBytes;
      uint16_t* os = reinterpret_cast<uint16_t*>(o + 128);
      for (int j = 0; j < 8; ++j) {
        const int64_t n = blk * kRowBlock + j;
        const uint8_t* qr = qp + n * K + g * kGroup;
        for (int s = 0; s < 4; ++s) {
          for (int b = 0; b < 4; ++b) {
            o[32 * s + 4 * j + b] = static_cast<uint8_t>((qr[8 * s + b] & 15) | ((qr[8 * s + 4 + b] & 15) << 4));
          }
        }
        os[j] = sp[n * groups + g];
        os[8 + j] = zp[n * groups + g];
      }
    }
  }
  return packed;
}

torch::Tensor int4_group_matmul(const torch::Tensor& x, const torch::Tensor& packed, bool portable) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && packed.dim() == 3 && packed.scalar_type() == at::kByte &&
                  packed.is_contiguous() && packed.size(2) == kBlockBytes,
              "x must be contiguous [T, K] and packed come from int4_pack");
  const int64_t T = x.size(0), K = x.size(1), blocks = packed.size(0), groups = packed.size(1);
  TORCH_CHECK(groups * kGroup == K, "x and the packed weight disagree on K");
  const int64_t N = blocks * kRowBlock;
  torch::Tensor out = torch::empty({T, N}, x.options());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int4_group_matmul", [&] {
    const QuantRow* rows = quantize_rows(x.data_ptr<scalar_t>(), T, K);
    scalar_t* outp = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
      float tile[kMaxRows * 8];
      for (int64_t blk = begin; blk < end; ++blk) {
        for (int64_t t0 = 0; t0 < T; t0 += kMaxRows) {
          const int rows_here = static_cast<int>(std::min<int64_t>(kMaxRows, T - t0));
          block_rows(wp + blk * groups * kBlockBytes, groups, rows + t0, rows_here, tile, portable);
          for (int t = 0; t < rows_here; ++t) {
            for (int j = 0; j < 8; ++j) outp[(t0 + t) * N + blk * kRowBlock + j] = static_cast<scalar_t>(tile[t * 8 + j]);
          }
        }
      }
    });
  });
  return out;
}
