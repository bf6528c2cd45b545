// Weir's CPU decode ops: the small per-layer work of a decode step, one call each instead of tens of torch ops.
//
// At a few tokens per step a decoder layer's matmuls take about as long as the ~15 small torch ops around them
// (norms, rotary, cache writes, the attention's gathers and dtype casts), each paying dispatch and allocation.
// These ops do the same math in one pass each; weir_server/kernels/cpu_ops.py builds and loads them, and the
// torch paths they replace stay the reference the tests compare against.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "quant_matmul.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// out = round(x / rms(x) * w) per row; with a residual, first residual = round(x + residual) and the norm is of
// that sum. Rounding points follow F.rms_norm on bf16 input (fp32 math, one rounding at the end), so the result
// matches the torch path bit for bit in most rows.
template <typename T>
void rms_rows(T* x, T* residual, const T* w, int64_t rows, int64_t n, double eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n);
    for (int64_t r = begin; r < end; ++r) {
      T* xr = x + r * n;
      float ss = 0.f;
      if (residual != nullptr) {
        T* rr = residual + r * n;
        for (int64_t i = 0; i < n; ++i) {
          T s = static_cast<T>(to_f(xr[i]) + to_f(rr[i]));
          rr[i] = s;
          buf[i] = to_f(s);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) buf[i] = to_f(xr[i]);
      }
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) ss += buf[i] * buf[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
      for (int64_t i = 0; i < n; ++i) xr[i] = static_cast<T>(buf[i] * inv * to_f(w[i]));
    }
  });
}

void check_rows(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "x must be a contiguous CPU tensor");
  TORCH_CHECK(w.dim() == 1 && w.is_contiguous() && w.numel() == x.size(-1), "weight must be [hidden]");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "weight and x must share a dtype");
}

inline float float_dot(const float* a, const float* b, int64_t K) {
#if defined(__AVX512F__)
  if (K % 64 == 0) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
           acc3 = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16), _mm512_loadu_ps(b + k + 16), acc1);
      acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 32), _mm512_loadu_ps(b + k + 32), acc2);
      acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 48), _mm512_loadu_ps(b + k + 48), acc3);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
  }
#endif
  float dot = 0.f;
  _Pragma("omp simd reduction(+ : dot)")
  for (int64_t k = 0; k < K; ++k) dot += a[k] * b[k];
  return dot;
}

// dst[0:n] = src[0:n] in fp32 (bf16 widens by a shift; AVX-512 does 16 at a time).
template <typename T>
inline void to_float_row(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <>
inline void to_float_row<float>(const float* src, float* dst, int64_t n) {
  std::copy(src, src + n, dst);
}

template <>
inline void to_float_row<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16)));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

#if defined(__AVX512F__)
// exp of 16 floats: n = round(x log2 e), r = x - n ln 2 in two steps (Cody-Waite), exp(r) by Cephes's degree-5
// polynomial, then 2^n by scalef (which underflows to 0 below about -103). Within 2 ulp of expf over the
// range a softmax sees (x <= 0).
inline __m512 exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// s[0:n] = softmax(s[0:n]) in place, fp32. Every element takes the same vector path (the tail through a mask),
// so a score's result does not depend on where it sits in the row.
inline void softmax_row(float* s, int64_t n) {
#if defined(__AVX512F__)
  auto lanes = [](int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); };
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(n - j);
    mx = _mm512_mask_max_ps(mx, m, mx, _mm512_maskz_loadu_ps(m, s + j));
  }
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(n - j);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), top));
    _mm512_mask_storeu_ps(s + j, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes(n - j);
    _mm512_mask_storeu_ps(s + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + j), inv));
  }
#else
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  const float inv = 1.f / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
#endif
}

// Keys ahead of the one in use whose cache rows the attention prefetches.
constexpr int64_t kPrefetchKeys = 16;

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// out[j] = the sum of v[j]'s 16 lanes, for 16 vectors at once: four rounds of pairwise shuffles and adds (46
// instructions) in place of 16 horizontal reductions (about 8 each). After the rounds lane 4 k + e holds key 4 e + k.
inline __m512 reduce16(__m512* v) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i) {
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int i = 0; i < 4; ++i) {
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  for (int i = 0; i < 2; ++i) {
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, z);
}

// scores[j] = scale * q . k_j for up to 16 bf16 key rows (rows[j], D a multiple of 32, at most 256), q as bf16
// [D]: each product of two bf16 values is exact in fp32, and the bf16 dot instruction adds them pairwise.
inline void bf16_scores16(const uint16_t* q, const c10::BFloat16* const* rows, int count, int64_t D, float scale,
                          float* scores) {
  __m512 part[16];
  for (int j = 0; j < 16; ++j) {
    __m512 acc = _mm512_setzero_ps();
    if (j < count) {
      for (int64_t c = 0; c < D / 32; ++c) {
        const __m512bh k = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(rows[j] + 32 * c));
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + 32 * c), k);
      }
    }
    part[j] = acc;
  }
  const __mmask16 lanes = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  _mm512_mask_storeu_ps(scores, lanes, _mm512_mul_ps(reduce16(part), _mm512_set1_ps(scale)));
}

// acc[g][:] = sum_j scores[g * n + j] * v_j for the query heads g0 .. g0 + count - 1 (count <= 16 / NC) over n bf16
// value rows of D = 16 * NC: each row widened once and the heads' sums kept in registers, in key order (the fp32
// fused multiply-adds of the plain loop, so the same bits), instead of a pass over memory per head and key.
template <int NC>
void bf16_weighted_values(const float* scores, int64_t n, const c10::BFloat16* const* rows, int64_t g0, int count,
                          float* acc) {
  constexpr int kHeads = 16 / NC;
  __m512 sum[kHeads][NC];
  for (int g = 0; g < kHeads; ++g)
    for (int c = 0; c < NC; ++c) sum[g][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    if (j + kPrefetchKeys < n) {
      const char* ahead = reinterpret_cast<const char*>(rows[j + kPrefetchKeys]);
      for (int b = 0; b < 32 * NC; b += 64) __builtin_prefetch(ahead + b, 0, 3);
    }
    __m512 v[NC];
    for (int c = 0; c < NC; ++c) {
      const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[j] + 16 * c));
      v[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    }
    for (int g = 0; g < kHeads; ++g) {
      if (g >= count) break;
      const __m512 p = _mm512_set1_ps(scores[(g0 + g) * n + j]);
      for (int c = 0; c < NC; ++c) sum[g][c] = _mm512_fmadd_ps(p, v[c], sum[g][c]);
    }
  }
  for (int g = 0; g < count; ++g)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(acc + (g0 + g) * 16 * NC + 16 * c, sum[g][c]);
}
#endif

}  // namespace

// x [.., n] -> a new normed tensor.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check_rows(x, w);
  torch::Tensor out = x.clone();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_rows<scalar_t>(out.data_ptr<scalar_t>(), nullptr, w.data_ptr<scalar_t>(), x.numel() / x.size(-1),
                       x.size(-1), eps);
  });
  return out;
}

// In place: residual = x + residual, x = norm(residual). Returns (x, residual).
std::tuple<torch::Tensor, torch::Tensor> fused_add_rms_norm(torch::Tensor x, torch::Tensor residual,
                                                            const torch::Tensor& w, double eps) {
  check_rows(x, w);
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() &&
                  residual.scalar_type() == x.scalar_type(), "residual must match x");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fused_add_rms_norm", [&] {
    rms_rows<scalar_t>(x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                       x.numel() / x.size(-1), x.size(-1), eps);
  });
  return {x, residual};
}

// Attention for steps of a few query tokens per sequence (decode, speculative verify): sequence b owns query tokens
// query_start_loc[b]..query_start_loc[b+1], the last of its context_lens[b] positions. Rotates q and k (rotate-half
// RoPE over the first 2 * cos.size(-1) features of each head; cos/sin [T, rotary_dim / 2]), writes k and v at
// slot_mapping into the paged caches [blocks, block_size, Hkv, D], then lets each query token attend, in fp32 as
// the torch path does, to its sequence's keys up to its own position. Returns [T, H, D]. window > 0: only the
// last `window` keys; softcap > 0: scores = softcap * tanh(scores / softcap). A token's output comes from the
// same loops whatever else shares the step, so a verify row equals the decode of that token.
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor key_cache,
                               torch::Tensor value_cache, const torch::Tensor& block_tables,
                               const torch::Tensor& context_lens, const torch::Tensor& query_start_loc,
                               const torch::Tensor& slot_mapping, double scale, int64_t window, double softcap) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be [T, heads, D]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "q, k, v rows must be contiguous");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(key_cache.scalar_type() == q.scalar_type() && k.scalar_type() == q.scalar_type() &&
                  v.scalar_type() == q.scalar_type(), "q, k, v and the caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt &&
                  query_start_loc.scalar_type() == at::kInt && slot_mapping.scalar_type() == at::kLong,
              "int32 block tables, lengths and query starts, int64 slots");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), B = context_lens.numel();
  TORCH_CHECK(query_start_loc.numel() == B + 1 && slot_mapping.numel() == T, "query_start_loc must be [B + 1]");
  TORCH_CHECK(H % Hkv == 0, "heads must be a multiple of kv heads");
  const int64_t half = cos.size(-1), G = H / Hkv, block_size = key_cache.size(1);
  TORCH_CHECK(cos.scalar_type() == q.scalar_type() && sin.scalar_type() == q.scalar_type(), "cos/sin dtype");
  TORCH_CHECK(2 * half <= D && cos.is_contiguous() && sin.is_contiguous() && cos.numel() == T * half,
              "cos/sin must be [T, rotary_dim / 2]");
  const auto bt = block_tables.contiguous();
  const int32_t* tables = bt.data_ptr<int32_t>();
  const int64_t max_blocks = bt.size(1);
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  TORCH_CHECK(starts[0] == 0 && starts[B] == T, "query_start_loc must run from 0 to T");
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(starts[b + 1] >= starts[b] && starts[b + 1] - starts[b] <= lens[b] &&
                    (lens[b] + block_size - 1) / block_size <= max_blocks,
                "sequence ", b, ": its query tokens, context length and block table disagree");
  }
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  torch::Tensor out = torch::empty({T, H, D}, q.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    const scalar_t* cs = cos.data_ptr<scalar_t>();
    const scalar_t* sn = sin.data_ptr<scalar_t>();
    scalar_t* kc = key_cache.data_ptr<scalar_t>();
    scalar_t* vc = value_cache.data_ptr<scalar_t>();
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // Rotated copy of one head into `dst` (rounded to the dtype, as a rotated tensor would be).
    auto rotate = [&](const scalar_t* src, const scalar_t* c, const scalar_t* s, float* dst) {
      for (int64_t i = 0; i < half; ++i) {
        float x1 = to_f(src[i]), x2 = to_f(src[i + half]);
        dst[i] = to_f(static_cast<scalar_t>(x1 * to_f(c[i]) - x2 * to_f(s[i])));
        dst[i + half] = to_f(static_cast<scalar_t>(x2 * to_f(c[i]) + x1 * to_f(s[i])));
      }
      for (int64_t i = 2 * half; i < D; ++i) dst[i] = to_f(src[i]);
    };
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(G * D), kf(D), row(D), scores, acc(G * D);
      std::vector<uint16_t> qb;
      std::vector<const c10::BFloat16*> vrows;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / Hkv, h = task % Hkv;
        const int64_t length = lens[b], first_token = starts[b], num_tokens = starts[b + 1] - starts[b];
        const int32_t* table = tables + b * max_blocks;
        // Calls fn(j, row) for the cache rows of positions first..last, a block at a time (no division per key).
        auto for_each_key = [&](int64_t first, int64_t last, auto&& fn) {
          for (int64_t j = first; j <= last;) {
            const int64_t block = j / block_size, stop = std::min(last + 1, (block + 1) * block_size);
            int64_t row = (static_cast<int64_t>(table[block]) * block_size + j % block_size) * Hkv + h;
            for (; j < stop; ++j, row += Hkv) fn(j, row * D);
          }
        };
        // The cache row of position j (< the step's own) into L1 ahead of its use: a head's rows lie Hkv * D apart
        // and blocks anywhere, so the hardware prefetchers miss them, and a decode step's attention waits on memory.
        auto prefetch_row = [&](const scalar_t* cache, int64_t j, int64_t last) {
          if (j > last) return;
          const int64_t row = (static_cast<int64_t>(table[j / block_size]) * block_size + j % block_size) * Hkv + h;
          const char* p = reinterpret_cast<const char*>(cache + row * D);
          for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(scalar_t)); b += 64) __builtin_prefetch(p + b, 0, 3);
        };
        // This step's K and V into their slots first (skipping padding slots < 0): later tokens see earlier ones.
        for (int64_t t = first_token; t < first_token + num_tokens; ++t) {
          const int64_t slot = slots[t];
          if (slot < 0) continue;
          rotate(kp + t * k.stride(0) + h * k.stride(1), cs + t * half, sn + t * half, kf.data());
          scalar_t* kdst = kc + (slot * Hkv + h) * D;
          scalar_t* vdst = vc + (slot * Hkv + h) * D;
          const scalar_t* vsrc = vp + t * v.stride(0) + h * v.stride(1);
          for (int64_t i = 0; i < D; ++i) {
            kdst[i] = static_cast<scalar_t>(kf[i]);
            vdst[i] = vsrc[i];
          }
        }
        for (int64_t t = first_token; t < first_token + num_tokens; ++t) {
          const int64_t position = length - num_tokens + (t - first_token);
          for (int64_t g = 0; g < G; ++g) {
            rotate(qp + t * q.stride(0) + (h * G + g) * q.stride(1), cs + t * half, sn + t * half, &qf[g * D]);
          }
          const int64_t first = window > 0 ? std::max<int64_t>(0, position + 1 - window) : 0;
          const int64_t n = position + 1 - first;
          scores.resize(G * n);
          bool scored = false;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
          if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
            if (D % 32 == 0 && D <= 256) {  // q's rotated values are bf16 (rounded as the torch path rounds them)
              qb.resize(G * D);
              for (int64_t i = 0; i < G * D; ++i) qb[i] = c10::BFloat16(qf[i]).x;  // exact
              const c10::BFloat16* rows16[16];
              int count = 0;
              int64_t at = 0;
              // A chunk of up to 16 keys, its rows read once from memory and then from L1 for each query head.
              for_each_key(first, position, [&](int64_t j, int64_t offset) {
                if (count == 0) at = j - first;
                rows16[count++] = reinterpret_cast<const c10::BFloat16*>(kc + offset);
                prefetch_row(kc, j + kPrefetchKeys, position);
                if (count == 16 || j == position) {
                  for (int64_t g = 0; g < G; ++g) {
                    bf16_scores16(&qb[g * D], rows16, count, D, static_cast<float>(scale), &scores[g * n + at]);
                  }
                  count = 0;
                }
              });
              scored = true;
            }
          }
#endif
          if (!scored) {
            for_each_key(first, position, [&](int64_t j, int64_t offset) {
              to_float_row(kc + offset, row.data(), D);  // widened once for the group's G queries
              for (int64_t g = 0; g < G; ++g) {
                scores[g * n + (j - first)] = float_dot(&qf[g * D], row.data(), D) * static_cast<float>(scale);
              }
            });
          }
          for (int64_t g = 0; g < G; ++g) {
            float* sg = &scores[g * n];
            if (softcap > 0) {
              for (int64_t j = 0; j < n; ++j) sg[j] = std::tanh(sg[j] / softcap) * softcap;
            }
            softmax_row(sg, n);
          }
          bool weighted = false;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
          if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
            if (D == 32 || D == 64 || D == 128 || D == 256) {
              vrows.resize(n);
              for_each_key(first, position, [&](int64_t j, int64_t offset) {
                vrows[j - first] = reinterpret_cast<const c10::BFloat16*>(vc + offset);
              });
              const int heads = static_cast<int>(256 / D);  // the register budget: 16 accumulators of 16 floats
              for (int64_t g0 = 0; g0 < G; g0 += heads) {
                const int count = static_cast<int>(std::min<int64_t>(heads, G - g0));
                const float* sc = scores.data();
                switch (D) {
                  case 32: bf16_weighted_values<2>(sc, n, vrows.data(), g0, count, acc.data()); break;
                  case 64: bf16_weighted_values<4>(sc, n, vrows.data(), g0, count, acc.data()); break;
                  case 128: bf16_weighted_values<8>(sc, n, vrows.data(), g0, count, acc.data()); break;
                  default: bf16_weighted_values<16>(sc, n, vrows.data(), g0, count, acc.data()); break;
                }
              }
              weighted = true;
            }
          }
#endif
          if (!weighted) {
            std::fill(acc.begin(), acc.end(), 0.f);
            for_each_key(first, position, [&](int64_t j, int64_t offset) {
              prefetch_row(vc, j + kPrefetchKeys, position);
              to_float_row(vc + offset, row.data(), D);
              for (int64_t g = 0; g < G; ++g) {
                const float p = scores[g * n + (j - first)];
                float* a = &acc[g * D];
                const float* r = row.data();
                _Pragma("omp simd")
                for (int64_t i = 0; i < D; ++i) a[i] += p * r[i];
              }
            });
          }
          for (int64_t g = 0; g < G; ++g) {
            scalar_t* o = op + (t * H + h * G + g) * D;
            for (int64_t i = 0; i < D; ++i) o[i] = static_cast<scalar_t>(acc[g * D + i]);
          }
        }
      }
    });
  });
  return out;
}

// Every decoder layer of a Llama-shaped model for a step of a few tokens per sequence, with the ops the layers'
// Python modules call, in the same order and on the same tensors (so the same bits), and no Python in between:
// at one stream the modules' calls, splits and views cost about a third of a step. Per layer, `weights` holds the
// input norm's weight, the packed qkv, o, the post-attention norm's weight, the packed [gate; up] and down
// projections, each in int4_pack's or int8_pack's layout; `parts` gives, per layer and projection (qkv, o,
// gate_up, down), how many packed weights it is made of: a GGUF projection mixing types (Q4_K_M's q and k in Q4_K
// beside v in Q6_K) runs each part and concatenates, as its module does. kv_caches[l] is [2, blocks, block_size,
// Hkv, D]; windows[l] > 0 is a sliding window. `residual` is None before the first layer. Returns (hidden,
// residual) for the final norm.
std::tuple<torch::Tensor, torch::Tensor> decode_layers(
    torch::Tensor hidden, c10::optional<torch::Tensor> residual_in, const std::vector<torch::Tensor>& weights,
    const std::vector<int64_t>& parts, const std::vector<torch::Tensor>& kv_caches, const torch::Tensor& cos,
    const torch::Tensor& sin, const torch::Tensor& block_tables, const torch::Tensor& context_lens,
    const torch::Tensor& query_start_loc, const torch::Tensor& slot_mapping, int64_t num_heads, int64_t num_kv_heads,
    int64_t head_dim, double eps, double scale, const std::vector<int64_t>& windows, double softcap) {
  const int64_t layers = static_cast<int64_t>(kv_caches.size());
  TORCH_CHECK(static_cast<int64_t>(parts.size()) == 4 * layers && static_cast<int64_t>(windows.size()) == layers,
              "decode_layers needs 4 part counts and a window per layer");
  int64_t expected = 2 * layers;  // the norms
  for (int64_t count : parts) {
    TORCH_CHECK(count >= 1, "a projection needs a packed weight");
    expected += count;
  }
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == expected, "decode_layers: weights and part counts disagree");
  TORCH_CHECK(hidden.dim() == 2, "hidden must be [T, hidden]");
  const int64_t T = hidden.size(0), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  size_t at = 0;
  // One projection's parts in order; with silu_and_mul on a [gate; up] split over parts, the module path's
  // bf16 silu(gate) * up after the concatenation.
  auto project = [&](const torch::Tensor& x, int64_t count, bool silu_and_mul) {
    if (count == 1) return packed_group_matmul(x, weights[at++], silu_and_mul);
    std::vector<torch::Tensor> outs;
    for (int64_t c = 0; c < count; ++c) outs.push_back(packed_group_matmul(x, weights[at++]));
    torch::Tensor out = torch::cat(outs, 1);
    if (!silu_and_mul) return out;
    const auto halves = out.chunk(2, 1);
    return torch::silu(halves[0]) * halves[1];
  };
  torch::Tensor residual = residual_in.has_value() ? *residual_in : torch::Tensor();
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t* count = &parts[4 * l];
    const torch::Tensor& input_norm = weights[at++];
    if (!residual.defined()) {
      residual = hidden;
      hidden = rms_norm(hidden, input_norm, eps);
    } else {
      std::tie(hidden, residual) = fused_add_rms_norm(hidden, residual, input_norm, eps);
    }
    const torch::Tensor qkv = project(hidden, count[0], false);
    const torch::Tensor attn = decode_attention(
        qkv.narrow(1, 0, q_size).view({T, num_heads, head_dim}),
        qkv.narrow(1, q_size, kv_size).view({T, num_kv_heads, head_dim}),
        qkv.narrow(1, q_size + kv_size, kv_size).view({T, num_kv_heads, head_dim}), cos, sin, kv_caches[l][0],
        kv_caches[l][1], block_tables, context_lens, query_start_loc, slot_mapping, scale, windows[l], softcap);
    hidden = project(attn.view({T, q_size}), count[1], false);
    std::tie(hidden, residual) = fused_add_rms_norm(hidden, residual, weights[at++], eps);
    hidden = project(project(hidden, count[2], true), count[3], false);
  }
  return {hidden, residual};
}

// Every op releases the GIL while it computes, as torch's own ops do: the engine runs its steps on a thread
// beside the server's event loop, which would otherwise wait out each call (a whole step, for decode_layers).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("rms_norm", &rms_norm, release, "RMSNorm of each row");
  m.def("fused_add_rms_norm", &fused_add_rms_norm, release, "residual += x; x = RMSNorm(residual), in place");
  m.def("int8_group_matmul", &int8_group_matmul, release, "x times int8 rows with per-group scales (and offsets)",
        py::arg("x"), py::arg("q"), py::arg("scales"), py::arg("offsets") = py::none());
  m.def("int8_pack", &int8_pack, release,
        "int8 weights (q, scales, offsets per group of 32) in int8_packed_matmul's layout",
        py::arg("q"), py::arg("scales"), py::arg("offsets") = py::none());
  m.def("int8_packed_matmul", &int8_packed_matmul, release, "x times packed int8 weights, for steps of a few rows",
        py::arg("x"), py::arg("packed"), py::arg("portable") = false, py::arg("silu_and_mul") = false);
  m.def("int4_pack", &int4_pack, release,
        "4-bit weights (q, scales, zeros per group of 32) in int4_group_matmul's layout");
  m.def("int5_pack", &int5_pack, release,
        "5-bit weights (u in 0..31, scales and offsets per group of 32: W = u * scale - offset) in the layout "
        "int8_packed_matmul also reads", py::arg("q"), py::arg("scales"), py::arg("offsets"));
  m.def("packed_dequantize", &packed_dequantize, release, "the weights of an int4_pack, int5_pack or int8_pack layout",
        py::arg("packed"), py::arg("dtype"));
  m.def("int4_group_matmul", &int4_group_matmul, release, "x times packed 4-bit weights, for steps of a few rows",
        py::arg("x"), py::arg("packed"), py::arg("portable") = false, py::arg("silu_and_mul") = false);
  m.def("decode_layers", &decode_layers, release,
        "every decoder layer of a Llama-shaped model for a step of a few tokens");
  m.def("decode_attention", &decode_attention, release,
        "rotary, cache write and attention for a few query tokens per sequence (decode, speculative verify)");
}
