// Exact multi-head self-attention for short token sequences on the CPU, read straight from the fused qkv matmul.
//
// Why: at ViT lengths (N ~ 200, head dim 64) PyTorch's CPU flash-attention kernel splits each head's queries into
// blocks of 64 rows (the last one 5 rows long) and runs at ~40% of the machine's matmul rate. Here each
// (image, head) pair is one task: S = Q K^T / sqrt(d) as one GEMM read in place from the (B, N, 3, H, D) qkv
// buffer, E = exp(S - rowmax) in cache (plus an optional per-key bias, ToMe's log-size), and O = E V written
// straight into the (B, N', H, D) layout that the output projection reads, so no transposes or copies; each
// output row is then divided by its row sum of E (D multiplies per row instead of N). S is
// N' x N floats per thread (at most 4 MiB for N <= 1024; longer sequences keep using the flash kernel, which never
// holds an N x N matrix). The GEMMs are MKL's sgemm_, which PyTorch's x86 builds export.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

using Vec = at::vec::Vectorized<float>;

extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

// Column-major C (m x n, ldc) = alpha op(A) op(B) + beta C, as BLAS.
inline void gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
                 float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// row <- exp(row + bias - max) over n entries, in place; returns 1 / sum (the softmax's normaliser, applied later
// to the D-wide output row instead of the n-wide probabilities).
inline float exp_row(float* row, const float* bias, int64_t n) {
  constexpr int64_t W = Vec::size();
  const int64_t nv = n - n % W;
  float lanes[W];
  Vec vmax(-std::numeric_limits<float>::infinity());
  float mx = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j < nv; j += W) {
    Vec x = Vec::loadu(row + j);
    if (bias) {
      x = x + Vec::loadu(bias + j);
      x.store(row + j);
    }
    vmax = at::vec::maximum(vmax, x);
  }
  for (; j < n; ++j) {
    if (bias) row[j] += bias[j];
    mx = std::max(mx, row[j]);
  }
  vmax.store(lanes);
  for (int64_t l = 0; l < W; ++l) mx = std::max(mx, lanes[l]);
  const Vec vmx(mx);
  Vec vsum(0.0f);
  for (j = 0; j < nv; j += W) {
    Vec e = (Vec::loadu(row + j) - vmx).exp_u20();
    e.store(row + j);
    vsum = vsum + e;
  }
  vsum.store(lanes);
  float sum = 0.0f;
  for (int64_t l = 0; l < W; ++l) sum += lanes[l];
  for (; j < n; ++j) {
    row[j] = std::exp(row[j] - mx);
    sum += row[j];
  }
  return 1.0f / sum;
}

// x[0:n] *= a
inline void scale_row(float* x, float a, int64_t n) {
  constexpr int64_t W = Vec::size();
  const Vec va(a);
  int64_t j = 0;
  for (; j + W <= n; j += W) (Vec::loadu(x + j) * va).store(x + j);
  for (; j < n; ++j) x[j] *= a;
}

// The optional per-key bias (B, N) as a contiguous fp32 buffer kept alive by `hold`, or nullptr without one.
const float* key_bias_ptr(const c10::optional<torch::Tensor>& key_bias, int64_t numel, torch::Tensor& hold) {
  if (!key_bias.has_value() || !key_bias->defined()) return nullptr;
  hold = key_bias->to(at::kFloat).contiguous();
  TORCH_CHECK(hold.numel() == numel, "key_bias must have B * N elements");
  return hold.data_ptr<float>();
}

}  // namespace

// qkv: (B, N, 3, H, D) float32, contiguous (the fused qkv matmul's output, viewed). key_bias: optional (B, N)
// float32 added to every query's logits. Returns (B, nq, H, D): attention outputs of the first nq tokens.
torch::Tensor attention(const torch::Tensor& qkv, int64_t nq, const c10::optional<torch::Tensor>& key_bias) {
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3, "qkv must be (B, N, 3, H, D), got ", qkv.sizes());
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.device().is_cpu() && qkv.is_contiguous(),
              "qkv must be a contiguous float32 CPU tensor");
  const int64_t B = qkv.size(0), N = qkv.size(1), H = qkv.size(3), D = qkv.size(4), C = H * D;
  TORCH_CHECK(nq >= 1 && nq <= N, "nq must be in [1, N]");
  TORCH_CHECK(3 * C < std::numeric_limits<int>::max() && N <= 65536, "sizes too large for this kernel");
  torch::Tensor bias_t;
  const float* bias = key_bias_ptr(key_bias, B * N, bias_t);
  auto out = at::empty({B, nq, H, D}, qkv.options());
  const float* base = qkv.data_ptr<float>();
  float* obase = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int n = static_cast<int>(N), q_rows = static_cast<int>(nq), d = static_cast<int>(D);
  const int ld_qkv = static_cast<int>(3 * C), ld_out = static_cast<int>(C);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(nq * N), inv(nq);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H;
      const float* q = base + b * N * 3 * C + h * D;
      const float* k = q + C;
      const float* v = q + 2 * C;
      // S (nq x N, row-major) = scale Q K^T; column-major that is S^T (N x nq) = K (N x D) Q^T (D x nq)
      gemm('T', 'N', n, q_rows, d, scale, k, ld_qkv, q, ld_qkv, 0.0f, S.data(), n);
      const float* brow = bias ? bias + b * N : nullptr;
      for (int64_t r = 0; r < nq; ++r) inv[r] = exp_row(S.data() + r * N, brow, N);
      // O (nq x D, row stride C) = E V, then each row / its sum; column-major O^T (D x nq) = V^T (D x N) E^T (N x nq)
      float* o = obase + b * nq * C + h * D;
      gemm('N', 'N', d, q_rows, n, 1.0f, v, ld_qkv, S.data(), n, 0.0f, o, ld_out);
      for (int64_t r = 0; r < nq; ++r) scale_row(o + r * C, inv[r], D);
    }
  });
  return out;
}

// ---- the int8 path's dynamic per-tensor uint8 quantisation --------------------------------------------------------
namespace {

using MinMax = std::pair<float, float>;

// (min, max) of p[0:n] folded into acc
inline MinMax min_max(const float* p, int64_t n, MinMax acc) {
  constexpr int64_t W = Vec::size();
  Vec lo(acc.first), hi(acc.second);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    Vec v = Vec::loadu(p + i);
    lo = at::vec::minimum(lo, v);
    hi = at::vec::maximum(hi, v);
  }
  float l[W], h[W];
  lo.store(l);
  hi.store(h);
  for (int64_t k = 0; k < W; ++k) acc = MinMax(std::min(acc.first, l[k]), std::max(acc.second, h[k]));
  for (; i < n; ++i) acc = MinMax(std::min(acc.first, p[i]), std::max(acc.second, p[i]));
  return acc;
}

inline MinMax merge(MinMax a, MinMax b) { return MinMax(std::min(a.first, b.first), std::max(a.second, b.second)); }

// as PyTorch's choose_qparams (quint8, no reduced range): the range [min(x, 0), max(x, 0)] over 256 levels, a float32
// scale, the zero point rounded and clamped into [0, 255]
inline std::pair<float, int64_t> qparams(MinMax mm) {
  float scale = (static_cast<double>(mm.second) - mm.first) / 255.0;
  if (scale == 0.0f || !std::isfinite(1.0f / scale)) scale = 0.1f;
  double zp_real = 0.0 - mm.first / static_cast<double>(scale);
  return {scale, static_cast<int64_t>(std::nearbyint(std::min(255.0, std::max(0.0, zp_real))))};
}

// o[0:n] = clamp(nearbyint(p * inv) + zp, 0, 255)
inline void narrow_u8(const float* p, int64_t n, float inv, int64_t zp, uint8_t* o) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  // round to nearest even (the default rounding mode, as nearbyint), add the zero point, then narrow with unsigned
  // saturation: 16 values per step with no scalar stores (those made this pass 3x slower than the min/max one)
  const __m512 finv = _mm512_set1_ps(inv);
  const __m512i izp = _mm512_set1_epi32(static_cast<int>(zp)), izero = _mm512_setzero_si512();
  for (; i + 16 <= n; i += 16) {
    __m512i r = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p + i), finv)), izp);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), _mm512_cvtusepi32_epi8(_mm512_max_epi32(r, izero)));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  // 32 values per step: int32 -> int16 -> uint8 with saturation (packs work per 128-bit lane: permute back)
  const __m256 finv = _mm256_set1_ps(inv);
  const __m256i izp = _mm256_set1_epi32(static_cast<int>(zp)), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  auto q8 = [&](const float* s) {
    return _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(s), finv)), izp);
  };
  for (; i + 32 <= n; i += 32) {
    __m256i a = _mm256_packs_epi32(q8(p + i), q8(p + i + 8)), c = _mm256_packs_epi32(q8(p + i + 16), q8(p + i + 24));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i),
                        _mm256_permutevar8x32_epi32(_mm256_packus_epi16(a, c), order));
  }
#endif
  for (; i < n; ++i) o[i] = static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, std::nearbyint(p[i] * inv) + zp)));
}

}  // namespace

// x (fp32, any shape) -> (uint8 values, scale, zero point): PyTorch's dynamic per-tensor quantisation
// (`quantize_per_tensor_dynamic(x, quint8, reduce_range=False)`) in two passes over x (one min/max, one quantise)
// writing plain uint8, where PyTorch takes four (min, max, quantise and the `int_repr` copy). The int8 path of
// vitkit.optimize quantises every linear's input this way.
std::tuple<torch::Tensor, double, int64_t> quantize_u8(const torch::Tensor& x_) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && x_.device().is_cpu(), "quantize_u8: expected a float32 CPU tensor");
  auto x = x_.contiguous();
  const float* p = x.data_ptr<float>();
  const int64_t n = x.numel();
  MinMax mm = at::parallel_reduce(
      0, n, 1 << 15, MinMax(0.0f, 0.0f), [&](int64_t b, int64_t e, MinMax acc) { return min_max(p + b, e - b, acc); },
      merge);
  auto [scale, zp] = qparams(mm);
  auto q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  uint8_t* o = q.data_ptr<uint8_t>();
  const float inv = 1.0f / scale;
  at::parallel_for(0, n, 1 << 15, [&](int64_t b, int64_t e) { narrow_u8(p + b, e - b, inv, zp, o + b); });
  return std::make_tuple(q, static_cast<double>(scale), zp);
}



// ---- bf16 attention (AVX-512 BF16 dot products) ----------------------------------------------------------------
// The same attention from a bf16 qkv buffer (the bf16 path's qkv matmul output), with both products as bf16 dot
// products accumulated in fp32 (vdpbf16ps, twice fp32's rate on CPUs that have it): S = Q K^T in fp32, softmax in
// fp32, the probabilities rounded to bf16 for E V (as bf16 autocast's attention does), fp32 output rows divided by
// their sums and written as bf16 or fp32. Compiled for AVX-512 BF16 by function attributes, so the module still
// builds and loads everywhere; `has_bf16()` says whether this CPU runs it (the Python side checks it first).
#include <immintrin.h>

namespace {

#define VITKIT_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

inline uint32_t pair_bits(const at::BFloat16* p) {  // two adjacent bf16 values as one 32-bit word
  uint32_t w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}

// exp(x) for x <= 0 (scores minus their row's max), AVX-512 in any build: 2^n e^r with |r| <= ln2 / 2, e^r by its
// degree-6 Taylor polynomial (relative error ~1e-7, far under the bf16 rounding of the probabilities), clamped at
// -87 (e^-87 ~ 1.6e-38 where it would underflow)
VITKIT_BF16 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2 in two parts: r = x - n ln 2 exactly
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// S (R rows x 32 columns, row stride lds) = Q (R rows, row stride ldq, as D/2 bf16 pairs) K^T from Kp: packed
// [D/2][ldk] pairs (VNNI layout), columns j0 .. j0 + 31.
template <int R>
VITKIT_BF16 inline void qk_tile(const uint32_t* q, int64_t ldq, const uint32_t* kp, int64_t ldk, int64_t pairs,
                                float* s, int64_t lds, __m512 scale) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(kp + p * ldk);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(kp + p * ldk + 16);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * ldq + p]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(s + r * lds, _mm512_mul_ps(acc[r][0], scale));
    _mm512_storeu_ps(s + r * lds + 16, _mm512_mul_ps(acc[r][1], scale));
  }
}

// O (R rows x 16 NV columns, fp32) = P (R rows of bf16 pairs, row stride ldp pairs) Vp ([N/2][ldv] pairs)
template <int R, int NV>
VITKIT_BF16 inline void pv_tile(const uint32_t* pb, int64_t ldp, const uint32_t* vp, int64_t ldv, int64_t pairs,
                                float* o, int64_t ldo) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh b[NV];
    for (int c = 0; c < NV; ++c) b[c] = (__m512bh)_mm512_loadu_si512(vp + p * ldv + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(pb[r * ldp + p]));
      for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + r * ldo + 16 * c, acc[r][c]);
}

template <int NV>
VITKIT_BF16 void pv_rows(const uint32_t* pb, int64_t ldp, const uint32_t* vp, int64_t ldv, int64_t pairs,
                         float* o, int64_t ldo, int64_t rows) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) pv_tile<4, NV>(pb + r * ldp, ldp, vp, ldv, pairs, o + r * ldo, ldo);
  for (; r < rows; ++r) pv_tile<1, NV>(pb + r * ldp, ldp, vp, ldv, pairs, o + r * ldo, ldo);
}

// rows [0, rows) of o (fp32, rows of D) times their 1 / sum → output rows first.. (row stride ld_out), bf16 or fp32
VITKIT_BF16 void write_rows(const float* o, const float* inv, int64_t rows, int64_t D, void* out, int64_t ld_out,
                            bool out_bf16, int64_t first) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* src = o + i * D;
    const __m512 vinv = _mm512_set1_ps(inv[i]);
    if (out_bf16) {
      uint16_t* dst = reinterpret_cast<uint16_t*>(static_cast<at::BFloat16*>(out) + (first + i) * ld_out);
      for (int64_t d = 0; d < D; d += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + d), vinv)));
    } else {
      float* dst = static_cast<float*>(out) + (first + i) * ld_out;
      for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(src + d), vinv));
    }
  }
}

VITKIT_BF16 void attention_bf16_task(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v,
                                     int64_t ld_qkv, int64_t N, int64_t nq, int64_t D, float scale, const float* bias,
                                     void* out, int64_t ld_out, bool out_bf16, std::vector<uint32_t>& kp,
                                     std::vector<uint32_t>& vp, std::vector<uint32_t>& qp, std::vector<float>& S,
                                     std::vector<uint32_t>& pb, std::vector<float>& o, bool brgemm) {
  const int64_t dp = D / 2, n32 = (N + 31) / 32 * 32, np = (N + 1) / 2;
  // K^T and V in VNNI layout (pairs along the reduction), zero-padded; Q as pairs, rows contiguous
  kp.resize(dp * n32);
  {  // 16 keys at a time: gather word p of each key row into kp[p][j .. j + 15]; rows past N are zeros
    const int32_t ld_words = static_cast<int32_t>(ld_qkv / 2);
    const __m512i step = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(ld_words));
    const int* kw = reinterpret_cast<const int*>(k);
    for (int64_t j = 0; j < n32; j += 16) {
      const int64_t valid = std::max<int64_t>(0, std::min<int64_t>(16, N - j));
      const __mmask16 m = static_cast<__mmask16>((1u << valid) - 1u);
      for (int64_t p = 0; p < dp; ++p)
        _mm512_storeu_si512(kp.data() + p * n32 + j,
                            _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, step, kw + j * ld_words + p, 4));
    }
  }
  vp.resize(np * D);
  {  // rows j, j + 1 of V interleaved into bf16 pairs (row j low, row j + 1 high), 32 or 16 columns at a time; a
     // missing last row is zeros
    __m512i lo_pairs, hi_pairs;  // u16 lanes (a0, b0, a1, b1, ...): a's and b's first 16, then their last 16
    {
      alignas(64) uint16_t lo[32], hi[32];
      for (int l = 0; l < 16; ++l) {
        lo[2 * l] = l, lo[2 * l + 1] = 32 + l;
        hi[2 * l] = 16 + l, hi[2 * l + 1] = 48 + l;
      }
      lo_pairs = _mm512_load_si512(lo);
      hi_pairs = _mm512_load_si512(hi);
    }
    for (int64_t j = 0; j < N; j += 2) {
      const uint16_t* r0 = reinterpret_cast<const uint16_t*>(v + j * ld_qkv);
      const uint16_t* r1 = j + 1 < N ? reinterpret_cast<const uint16_t*>(v + (j + 1) * ld_qkv) : nullptr;
      uint32_t* dst = vp.data() + (j / 2) * D;
      int64_t d = 0;
      for (; d + 32 <= D; d += 32) {  // 32 columns: two 16-bit interleaves across the two rows
        const __m512i a = _mm512_loadu_si512(r0 + d);
        const __m512i b = r1 ? _mm512_loadu_si512(r1 + d) : _mm512_setzero_si512();
        _mm512_storeu_si512(dst + d, _mm512_permutex2var_epi16(a, lo_pairs, b));
        _mm512_storeu_si512(dst + d + 16, _mm512_permutex2var_epi16(a, hi_pairs, b));
      }
      for (; d < D; d += 16) {
        const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + d)));
        const __m512i b = r1 ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + d)))
                             : _mm512_setzero_si512();
        _mm512_storeu_si512(dst + d, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
      }
    }
  }
  if (!brgemm) {
    qp.resize(nq * dp);
    for (int64_t i = 0; i < nq; ++i) std::memcpy(qp.data() + i * dp, q + i * ld_qkv, D * sizeof(at::BFloat16));
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  const int64_t n16 = (N + 15) / 16 * 16, ldp = n32 / 2;
  if (brgemm) {
    // On oneDNN's brgemm ukernel (AMX tiles where the CPU has them), 32 query rows at a time, Q read in place: a
    // block's scores (32 x n32 fp32) and probabilities stay in L1 between the two products, where a whole head's
    // would not (197 x 224 scores: 176 KB). Softmax in two passes over the unscaled scores: the max, then
    // exp(scale s + bias - max) straight to bf16 E with its sum (keys past N masked to 0).
    constexpr int64_t kQ = 32;
    S.resize(kQ * n32);
    pb.resize(kQ * ldp);
    o.resize(kQ * D);
    float inv[kQ];
    for (int64_t i0 = 0; i0 < nq; i0 += kQ) {
      const int64_t rows = std::min(kQ, nq - i0);
      at::native::cpublas::brgemm(rows, n32, D, ld_qkv, n32, n32, false, q + i0 * ld_qkv,
                                  reinterpret_cast<const at::BFloat16*>(kp.data()), S.data());
      for (int64_t i = 0; i < rows; ++i) {
        const float* row = S.data() + i * n32;
        __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int64_t j = 0; j < n16; j += 16) {
          const __mmask16 m = j + 16 <= N ? static_cast<__mmask16>(0xFFFF)
                                          : static_cast<__mmask16>((1u << (N - j)) - 1u);
          __m512 x = _mm512_mul_ps(_mm512_loadu_ps(row + j), vscale);
          if (bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, bias + j));
          vmax = _mm512_mask_max_ps(vmax, m, vmax, x);
        }
        const __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        uint16_t* prow = reinterpret_cast<uint16_t*>(pb.data() + i * ldp);
        for (int64_t j = 0; j < n16; j += 16) {
          const __mmask16 m = j + 16 <= N ? static_cast<__mmask16>(0xFFFF)
                                          : static_cast<__mmask16>((1u << (N - j)) - 1u);
          __m512 x = _mm512_mul_ps(_mm512_loadu_ps(row + j), vscale);
          if (bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, bias + j));
          const __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(x, vmx)));
          vsum = _mm512_add_ps(vsum, e);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow + j), (__m256i)_mm512_cvtneps_pbh(e));
        }
        inv[i] = 1.0f / _mm512_reduce_add_ps(vsum);
      }
      // E V over the keys padded to even (a zero key in V's last pair, exp 0 in E)
      at::native::cpublas::brgemm(rows, D, 2 * np, 2 * ldp, D, D, false,
                                  reinterpret_cast<const at::BFloat16*>(pb.data()),
                                  reinterpret_cast<const at::BFloat16*>(vp.data()), o.data());
      write_rows(o.data(), inv, rows, D, out, ld_out, out_bf16, i0);
    }
    return;
  }
  S.resize(nq * n32);
  for (int64_t j0 = 0; j0 < n32; j0 += 32) {
    int64_t i = 0;
    for (; i + 8 <= nq; i += 8)
      qk_tile<8>(qp.data() + i * dp, dp, kp.data() + j0, n32, dp, S.data() + i * n32 + j0, n32, vscale);
    for (; i < nq; ++i)
      qk_tile<1>(qp.data() + i * dp, dp, kp.data() + j0, n32, dp, S.data() + i * n32 + j0, n32, vscale);
  }
  // softmax rows in fp32 over whole vectors (the columns past N set to -inf: exp gives 0 there): e = exp(s + bias -
  // max), rounded to bf16 pairs; 1 / sum kept for the output rows
  pb.resize(nq * ldp);
  std::vector<float> inv(nq);
  for (int64_t i = 0; i < nq; ++i) {
    float* row = S.data() + i * n32;
    if (bias)
      for (int64_t j = 0; j + 16 <= N; j += 16) _mm512_storeu_ps(row + j, _mm512_add_ps(_mm512_loadu_ps(row + j),
                                                                                         _mm512_loadu_ps(bias + j)));
    for (int64_t j = bias ? N / 16 * 16 : N; j < N; ++j) row[j] += bias[j];
    for (int64_t j = N; j < n16; ++j) row[j] = -std::numeric_limits<float>::infinity();
    inv[i] = exp_row(row, nullptr, n16);
    uint16_t* prow = reinterpret_cast<uint16_t*>(pb.data() + i * ldp);
    for (int64_t j = 0; j < n16; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(prow + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + j)));
  }
  // O = E V in fp32, then each row / its sum, written out
  o.resize(nq * D);
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) pv_rows<4>(pb.data(), ldp, vp.data() + d0, D, np, o.data() + d0, D, nq);
  for (; d0 + 16 <= D; d0 += 16) pv_rows<1>(pb.data(), ldp, vp.data() + d0, D, np, o.data() + d0, D, nq);
  write_rows(o.data(), inv.data(), nq, D, out, ld_out, out_bf16, 0);
}

}  // namespace

bool has_bf16() { return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw"); }

bool bf16_linear_available();  // whether oneDNN's brgemm ukernel runs bf16 here (below)

// qkv: (B, N, 3, H, D) bfloat16, contiguous, D a multiple of 16; key_bias: optional (B, N). Returns (B, nq, H, D)
// in bf16 (out_bf16) or fp32. Only where has_bf16().
torch::Tensor attention_bf16(const torch::Tensor& qkv, int64_t nq, const c10::optional<torch::Tensor>& key_bias,
                             bool out_bf16, bool brgemm) {
  TORCH_CHECK(has_bf16(), "attention_bf16: this CPU has no AVX-512 BF16");
  TORCH_CHECK(!brgemm || bf16_linear_available(),
              "attention_bf16: the brgemm ukernel does not run bf16 on this CPU (brgemm=True)");
  TORCH_CHECK(qkv.dim() == 5 && qkv.size(2) == 3, "qkv must be (B, N, 3, H, D), got ", qkv.sizes());
  TORCH_CHECK(qkv.scalar_type() == at::kBFloat16 && qkv.device().is_cpu() && qkv.is_contiguous(),
              "qkv must be a contiguous bfloat16 CPU tensor");
  const int64_t B = qkv.size(0), N = qkv.size(1), H = qkv.size(3), D = qkv.size(4), C = H * D;
  TORCH_CHECK(D % 16 == 0, "attention_bf16: the head dim must be a multiple of 16, got ", D);
  TORCH_CHECK(nq >= 1 && nq <= N, "nq must be in [1, N]");
  torch::Tensor bias_t;
  const float* bias = key_bias_ptr(key_bias, B * N, bias_t);
  auto out = at::empty({B, nq, H, D}, qkv.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  const at::BFloat16* base = qkv.data_ptr<at::BFloat16>();
  char* obase = static_cast<char*>(out.data_ptr());
  const int64_t esize = out_bf16 ? 2 : 4;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> kp, vp, qp, pb;
    std::vector<float> S, o;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H;
      const at::BFloat16* q = base + b * N * 3 * C + h * D;
      attention_bf16_task(q, q + C, q + 2 * C, 3 * C, N, nq, D, scale, bias ? bias + b * N : nullptr,
                          obase + (b * nq * C + h * D) * esize, C, out_bf16, kp, vp, qp, S, pb, o, brgemm);
    }
    if (brgemm) at::native::cpublas::brgemm_release();
  });
  return out;
}

// ---- bf16 linear with a fused epilogue, on oneDNN's brgemm ukernel ------------------------------------------------
// Why: PyTorch's prepacked oneDNN linear sets its primitive up afresh at every call (~20-30 us even for an 8 x 64
// matrix), which at ViT-S/16's batch-1 shapes (197 x 384) is a large share of each matmul; and its bf16 output must
// be added to the fp32 residual stream by a separate pass. Here the weight is packed once into oneDNN's VNNI
// blocks of 64 output columns (`pack_blocks`), and each (32-row, 64-column) output tile is one call of the brgemm
// ukernel that PyTorch's own flash attention uses (AMX tiles where the CPU has them, AVX-512 BF16 otherwise), its
// fp32 result finished in registers: + bias, exact (erf) GELU, + the fp32 residual, written as bf16 or fp32. An fp32
// input (the LayerNorm's output) is rounded to bf16 once at the start of the same call, not by a separate op.
constexpr int64_t kLinN = 64;   // output columns per packed weight block (the most cpublas::pack takes)
constexpr int64_t kLinM = 32;   // rows per tile

// A (K, 64) block of wt (row stride ld_in elements of esize bytes) → oneDNN's VNNI layout for the brgemm ukernel:
// v consecutive k of each column side by side ((K / v, 64, v); v = 2 for bf16, 4 for int8), as `cpublas::pack`
// writes it where PyTorch packs (AMX only).
void pack_vnni(const char* in, int64_t K, int64_t ld_in, int64_t esize, int64_t v, char* out) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < kLinN; ++n)
      std::memcpy(out + (((k / v) * kLinN + n) * v + k % v) * esize, in + (k * ld_in + n) * esize, esize);
}

// wt (K, N) contiguous, bf16 or int8 → (N / 64, K, 64): each block of 64 columns in the brgemm ukernel's VNNI layout
// (pairs of k for bf16, fours for int8), by `cpublas::pack` where PyTorch packs for this CPU, else (or own) by
// pack_vnni
at::Tensor pack_blocks(const at::Tensor& wt, bool own = false) {
  const int64_t K = wt.size(0), N = wt.size(1), esize = wt.element_size();
  const bool native = !own && at::native::cpublas::could_pack(wt.scalar_type());
  at::Tensor out = at::empty({N / kLinN, K, kLinN}, wt.options());
  const char* in = static_cast<const char*>(wt.data_ptr());
  for (int64_t nb = 0; nb < N / kLinN; ++nb) {
    if (native)
      at::native::cpublas::pack(K, kLinN, N, kLinN, wt.scalar_type(), wt.scalar_type(), in + nb * kLinN * esize,
                                out[nb].data_ptr());
    else
      pack_vnni(in + nb * kLinN * esize, K, N, esize, wt.scalar_type() == at::kBFloat16 ? 2 : 4,
                static_cast<char*>(out[nb].data_ptr()));
  }
  return out;
}

// Whether oneDNN's brgemm ukernel multiplies t (kBFloat16: bf16 x bf16 → fp32; kChar: uint8 x int8 → int32) here.
// PyTorch packs weights for the ukernel only on AMX (`cpublas::could_pack`), but the ukernel itself runs bf16 on
// AVX-512 BF16 and uint8 x int8 on AVX-512 VNNI (e.g. an AMD EPYC); there pack_blocks packs the weights itself.
// Checked once by an exact 32 x 64 x 64 product of small integers, so a CPU or build where the call is refused
// (oneDNN's ISA capped by ONEDNN_MAX_CPU_ISA, say) or wrong reports false and the callers keep oneDNN's matmul.
bool brgemm_runs(at::ScalarType t) {
  if (at::native::cpublas::could_pack(t)) return true;
  if (t == at::kBFloat16 ? !has_bf16()
                         : !(__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")))
    return false;
  constexpr int64_t M = 32, K = 64;
  try {
    const bool bf = t == at::kBFloat16;
    const auto i64 = at::TensorOptions().dtype(at::kLong);
    const at::Tensor ai = (at::arange(M, i64).unsqueeze(1) * 7 + at::arange(K, i64) * 3) % 11;          // 0 .. 10
    const at::Tensor bi = (at::arange(K, i64).unsqueeze(1) * 5 + at::arange(kLinN, i64) * 3) % 7 - 3;  // -3 .. 3
    const at::Tensor a = ai.to(bf ? at::kBFloat16 : at::kByte);
    const at::Tensor bp = pack_blocks(bi.to(bf ? at::kBFloat16 : at::kChar));
    at::Tensor c = at::empty({M, kLinN}, i64.dtype(bf ? at::kFloat : at::kInt));
    if (bf)
      at::native::cpublas::brgemm(M, kLinN, K, K, kLinN, kLinN, false, a.data_ptr<at::BFloat16>(),
                                  bp.data_ptr<at::BFloat16>(), c.data_ptr<float>());
    else
      at::native::cpublas::brgemm(M, kLinN, K, K, kLinN, kLinN, false, a.data_ptr<uint8_t>(), bp.data_ptr<int8_t>(),
                                  c.data_ptr<int32_t>());
    at::native::cpublas::brgemm_release();
    return at::equal(c.to(at::kLong), at::mm(ai, bi));  // exact: the sums are small integers
  } catch (const std::exception&) {
    return false;
  }
}

bool bf16_linear_available() {
  static const bool ok = brgemm_runs(at::kBFloat16);
  return ok;
}

// 1 / x to ~23 bits: the hardware's reciprocal estimate and one Newton step (a division costs several times more)
inline at::vec::Vectorized<float> reciprocal_fast(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
#if defined(CPU_CAPABILITY_AVX512)
  Vec r(_mm512_rcp14_ps(x));
#else
  Vec r(_mm256_rcp_ps(x));
#endif
  return r * (Vec(2.0f) - x * r);
}

// exact GELU, x Phi(x) = x (1 + erf(x / sqrt 2)) / 2, with erf as the rational function (odd degree-13 numerator,
// even degree-8 denominator, argument clamped to [-4, 4]) of Eigen's and XLA's fast float erf: 18 multiply-adds and
// a reciprocal estimate, no exp. Within ~1.1e-6 + 2e-7 |x| of nn.GELU (float), far under the bf16 rounding of the
// output. PyTorch's vectorised erf divides and calls Sleef's exp; an earlier A&S 7.1.26 erf with exp_u20 here was
// 2.4x slower than this one per value (fc1's epilogue at ViT-S/16 batch 1 on an AMX Xeon).
inline at::vec::Vectorized<float> gelu_erf(const at::vec::Vectorized<float>& x0) {
  using Vec = at::vec::Vectorized<float>;
  const Vec x = at::vec::clamp(x0 * Vec(static_cast<float>(M_SQRT1_2)), Vec(-4.0f), Vec(4.0f));
  const Vec x2 = x * x;
  Vec p = at::vec::fmadd(x2, Vec(-2.72614225801306e-10f), Vec(2.77068142495902e-08f));
  p = at::vec::fmadd(x2, p, Vec(-2.10102402082508e-06f));
  p = at::vec::fmadd(x2, p, Vec(-5.69250639462346e-05f));
  p = at::vec::fmadd(x2, p, Vec(-7.34990630326855e-04f));
  p = at::vec::fmadd(x2, p, Vec(-2.95459980854025e-03f));
  p = at::vec::fmadd(x2, p, Vec(-1.60960333262415e-02f));
  Vec q = at::vec::fmadd(x2, Vec(-1.45660718464996e-05f), Vec(-2.13374055278905e-04f));
  q = at::vec::fmadd(x2, q, Vec(-1.68282697438203e-03f));
  q = at::vec::fmadd(x2, q, Vec(-7.37332916720468e-03f));
  q = at::vec::fmadd(x2, q, Vec(-1.42647390514189e-02f));
  const Vec erf = x * p * reciprocal_fast(q);
  const Vec half = x0 * Vec(0.5f);
  return at::vec::fmadd(half, erf, half);
}

// w (N, K) → bf16 (N / 64, K, 64), each block in oneDNN's VNNI layout for the brgemm ukernel
at::Tensor pack_linear_bf16(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) % kLinN == 0 && w.size(1) % 2 == 0,
              "pack_linear_bf16: the weight must be (N, K) with N a multiple of 64 and K even, got ", w.sizes());
  TORCH_CHECK(bf16_linear_available(), "pack_linear_bf16: the brgemm ukernel does not run bf16 on this CPU");
  return pack_blocks(w.detach().t().contiguous().to(at::kBFloat16));
}

// y = gelu?(x W^T + b) [+ residual]: x (M, K) fp32 or bf16, wp from pack_linear_bf16, bias fp32 (N) or None,
// residual fp32 (R, N) or None, row i of y adding row i % R (R = M: the residual stream; R = the patches of one
// image: the position embedding of a batch's patch tokens); y bf16 (out_bf16) or fp32
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& wp, const c10::optional<at::Tensor>& bias, bool gelu,
                       const c10::optional<at::Tensor>& residual, bool out_bf16) {
  using Vec = at::vec::Vectorized<float>;
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "linear_bf16: x must be a (M, K) float32 or bfloat16 matrix, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == kLinN && wp.scalar_type() == at::kBFloat16 && wp.size(1) == x.size(1),
              "linear_bf16: the packed weight ", wp.sizes(), " does not fit x ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1), blocks = wp.size(0), N = blocks * kLinN;
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous()),
              "linear_bf16: bias must be a contiguous float32 vector of ", N);
  TORCH_CHECK(!residual.has_value() || (residual->scalar_type() == at::kFloat && residual->is_contiguous() &&
                                        residual->dim() == 2 && residual->size(0) > 0 && M % residual->size(0) == 0 &&
                                        residual->size(1) == N),
              "linear_bf16: residual must be a contiguous float32 (R, ", N, ") matrix with R dividing ", M);
  const int64_t R = residual.has_value() ? residual->size(0) : M;  // row i adds residual row i % R
  // an fp32 input is rounded to bf16 once, in parallel (the LayerNorm's output: no separate cast pass)
  at::Tensor xb = x.scalar_type() == at::kBFloat16 ? x.contiguous() : x.contiguous().to(at::kBFloat16);
  at::Tensor out = at::empty({M, N}, x.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  if (M == 0) return out;
  const at::BFloat16* X = xb.data_ptr<at::BFloat16>();
  const at::BFloat16* W = wp.data_ptr<at::BFloat16>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float* rp = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  float* of = out_bf16 ? nullptr : out.data_ptr<float>();
  at::BFloat16* ob = out_bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
  const int64_t row_blocks = (M + kLinM - 1) / kLinM;
  at::parallel_for(0, row_blocks * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(kLinM * kLinN);
    for (int64_t t = begin; t < end; ++t) {
      // weight block outer: a thread's tasks share a (K x 64) weight block, kept in cache across the row blocks
      const int64_t nb = t / row_blocks, mb = t % row_blocks;
      const int64_t m0 = mb * kLinM, rows = std::min(kLinM, M - m0), n0 = nb * kLinN;
      const at::BFloat16* A = X + m0 * K;
      float* C = tile.data();
      at::native::cpublas::brgemm(rows, kLinN, K, K, kLinN, kLinN, false, A, W + nb * K * kLinN, C);
      for (int64_t i = 0; i < rows; ++i) {
        const float* c = C + i * kLinN;
        const int64_t at_ = (m0 + i) * N + n0;
        const float* res = rp ? rp + ((m0 + i) % R) * N + n0 : nullptr;
        for (int64_t j = 0; j < kLinN; j += 2 * Vec::size()) {
          Vec v0 = Vec::loadu(c + j), v1 = Vec::loadu(c + j + Vec::size());
          if (bp) {
            v0 = v0 + Vec::loadu(bp + n0 + j);
            v1 = v1 + Vec::loadu(bp + n0 + j + Vec::size());
          }
          if (gelu) {  // x Phi(x) = x (1 + erf(x / sqrt 2)) / 2, as nn.GELU()
            v0 = gelu_erf(v0);
            v1 = gelu_erf(v1);
          }
          if (res) {
            v0 = v0 + Vec::loadu(res + j);
            v1 = v1 + Vec::loadu(res + j + Vec::size());
          }
          if (ob) {
            at::vec::convert_float_bfloat16(v0, v1).store(ob + at_ + j);
          } else {
            v0.store(of + at_ + j);
            v1.store(of + at_ + j + Vec::size());
          }
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
  return out;
}

// ---- int8 linear (uint8 activations x int8 weights) on oneDNN's brgemm ukernel --------------------------------------
// The same as the int8 path's oneDNN matmul (`onednn::qlinear_pointwise`): x quantised to uint8 per tensor (scale,
// zero point), W to int8 symmetric per output channel, int32 accumulation, then in fp32 (acc - zp colsum(W)) s_x
// s_w + b, GELU, + the fp32 residual, written as fp32, bf16 or uint8 over a static (scale, zero point). Why: oneDNN
// sets its int8 primitive up at every call (~30 us), and at batch 1 the int8 matmuls are short (ViT-S/16: 197 rows);
// here the weight is packed once and each (32-row, 64-column) tile is one ukernel call (AMX-INT8 where the CPU has
// it, AVX-512 VNNI otherwise).
bool int8_linear_available() {
  static const bool ok = brgemm_runs(at::kChar);
  return ok;
}

// qw (N, K) int8 → (N / 64, K, 64) in the ukernel's VNNI layout (4 consecutive k per 32-bit lane)
at::Tensor pack_linear_s8(const at::Tensor& qw) {
  TORCH_CHECK(qw.dim() == 2 && qw.scalar_type() == at::kChar && qw.size(0) % kLinN == 0 && qw.size(1) % 4 == 0,
              "pack_linear_s8: the weight must be (N, K) int8 with N a multiple of 64 and K of 4, got ", qw.sizes(),
              " ", qw.scalar_type());
  TORCH_CHECK(int8_linear_available(), "pack_linear_s8: the brgemm ukernel does not run int8 on this CPU");
  return pack_blocks(qw.t().contiguous());
}

// y = gelu?((xq - x_zp) W^T x_scale w_scale + b) [+ residual]: xq (M, K) uint8, wp from pack_linear_s8, w_scale
// (N) fp32, colsum (N) int32 (each output channel's sum of int8 weights), bias fp32 (N) or None, residual fp32 (M, N)
// or None; out: 0 fp32, 1 bf16, 2 uint8 over (o_scale, o_zp) rounded half to even and saturated, as oneDNN does
at::Tensor linear_u8s8(const at::Tensor& xq, double x_scale, int64_t x_zp, const at::Tensor& wp,
                       const at::Tensor& w_scale, const at::Tensor& colsum, const c10::optional<at::Tensor>& bias,
                       bool gelu, const c10::optional<at::Tensor>& residual, int64_t out_kind, double o_scale,
                       int64_t o_zp) {
  using Vec = at::vec::Vectorized<float>;
  TORCH_CHECK(xq.dim() == 2 && xq.scalar_type() == at::kByte, "linear_u8s8: xq must be a (M, K) uint8 matrix, got ",
              xq.sizes(), " ", xq.scalar_type());
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == kLinN && wp.scalar_type() == at::kChar && wp.size(1) == xq.size(1),
              "linear_u8s8: the packed weight ", wp.sizes(), " does not fit xq ", xq.sizes());
  const int64_t M = xq.size(0), K = xq.size(1), blocks = wp.size(0), N = blocks * kLinN;
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == N && w_scale.is_contiguous() &&
              colsum.scalar_type() == at::kInt && colsum.numel() == N && colsum.is_contiguous(),
              "linear_u8s8: w_scale (float32) and colsum (int32) must be contiguous vectors of ", N);
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous()),
              "linear_u8s8: bias must be a contiguous float32 vector of ", N);
  TORCH_CHECK(!residual.has_value() || (residual->scalar_type() == at::kFloat && residual->is_contiguous() &&
                                        residual->size(0) == M && residual->size(1) == N),
              "linear_u8s8: residual must be a contiguous float32 (", M, ", ", N, ") matrix");
  TORCH_CHECK(out_kind >= 0 && out_kind <= 2, "linear_u8s8: out_kind must be 0 (fp32), 1 (bf16) or 2 (uint8)");
  const at::Tensor x = xq.contiguous();
  at::Tensor out = at::empty({M, N}, x.options().dtype(out_kind == 0 ? at::kFloat : out_kind == 1 ? at::kBFloat16
                                                                                                 : at::kByte));
  if (M == 0) return out;
  const uint8_t* X = x.data_ptr<uint8_t>();
  const int8_t* W = wp.data_ptr<int8_t>();
  const float* ws = w_scale.data_ptr<float>();
  const int32_t* cs = colsum.data_ptr<int32_t>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const float* rp = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  const float xs = static_cast<float>(x_scale), inv_o = static_cast<float>(1.0 / o_scale);
  const float fzp = static_cast<float>(x_zp), ozp = static_cast<float>(o_zp);
  const int64_t row_blocks = (M + kLinM - 1) / kLinM;
  at::parallel_for(0, row_blocks * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> tile(kLinM * kLinN);
    float scale[kLinN], shift[kLinN];  // per column: acc * scale + shift = (acc - zp colsum) s_x s_w + b
    int64_t cur = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t nb = t / row_blocks, mb = t % row_blocks;
      const int64_t m0 = mb * kLinM, rows = std::min(kLinM, M - m0), n0 = nb * kLinN;
      if (nb != cur) {
        for (int64_t j = 0; j < kLinN; ++j) {
          scale[j] = xs * ws[n0 + j];
          shift[j] = (bp ? bp[n0 + j] : 0.0f) - fzp * static_cast<float>(cs[n0 + j]) * scale[j];
        }
        cur = nb;
      }
      int32_t* C = tile.data();
      at::native::cpublas::brgemm(rows, kLinN, K, K, kLinN, kLinN, false, X + m0 * K, W + nb * K * kLinN, C);
      for (int64_t i = 0; i < rows; ++i) {
        const int32_t* c = C + i * kLinN;
        const int64_t at_ = (m0 + i) * N + n0;
        float y[kLinN];
        for (int64_t j = 0; j < kLinN; j += Vec::size()) {
          const Vec acc = at::vec::convert<float>(at::vec::Vectorized<int32_t>::loadu(c + j));
          Vec v = at::vec::fmadd(acc, Vec::loadu(scale + j), Vec::loadu(shift + j));
          if (gelu) v = gelu_erf(v);
          if (rp) v = v + Vec::loadu(rp + at_ + j);
          v.store(y + j);
        }
        if (out_kind == 0) {
          std::memcpy(out.data_ptr<float>() + at_, y, sizeof(y));
        } else if (out_kind == 1) {
          at::BFloat16* o = out.data_ptr<at::BFloat16>() + at_;
          for (int64_t j = 0; j < kLinN; j += 2 * Vec::size())
            at::vec::convert_float_bfloat16(Vec::loadu(y + j), Vec::loadu(y + j + Vec::size())).store(o + j);
        } else {
          narrow_u8(y, kLinN, inv_o, o_zp, out.data_ptr<uint8_t>() + at_);
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
  return out;
}

// ---- LayerNorm that writes what the next linear reads ----------------------------------------------------------
// nn.LayerNorm over the rows of x (M, K) fp32, mean and variance in two passes in fp32, written as bf16 for a bf16
// linear (no separate rounding pass) or fp32. Why: ATen's layer_norm took ~65 us for ViT-S/16's 197 x 384 tokens on
// an AMX Xeon, as long as the bf16 matmul after it; this is a few us per row block.
inline float hsum(const at::vec::Vectorized<float>& v) {
  float t[at::vec::Vectorized<float>::size()];
  v.store(t);
  float s = 0.0f;
  for (float e : t) s += e;
  return s;
}

at::Tensor layer_norm(const at::Tensor& x_, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, double eps, bool out_bf16) {
  using Vec = at::vec::Vectorized<float>;
  TORCH_CHECK(x_.dim() == 2 && x_.scalar_type() == at::kFloat, "layer_norm: x must be a (M, K) float32 matrix, got ",
              x_.sizes(), " ", x_.scalar_type());
  const at::Tensor x = x_.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  for (const auto* t : {&weight, &bias})
    TORCH_CHECK(!t->has_value() || ((*t)->scalar_type() == at::kFloat && (*t)->numel() == K && (*t)->is_contiguous()),
                "layer_norm: weight and bias must be contiguous float32 vectors of ", K);
  at::Tensor out = at::empty({M, K}, x.options().dtype(out_bf16 ? at::kBFloat16 : at::kFloat));
  const float* X = x.data_ptr<float>();
  const float* w = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t L = Vec::size(), KV = K - K % (2 * L);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t i = begin; i < end; ++i) {
      const float* r = X + i * K;
      Vec s0(0.0f), s1(0.0f);
      for (int64_t j = 0; j < KV; j += 2 * L) {
        s0 = s0 + Vec::loadu(r + j);
        s1 = s1 + Vec::loadu(r + j + L);
      }
      float sum = hsum(s0 + s1);
      for (int64_t j = KV; j < K; ++j) sum += r[j];
      const float mean = sum / K;
      Vec q0(0.0f), q1(0.0f);
      const Vec m(mean);
      for (int64_t j = 0; j < KV; j += 2 * L) {
        const Vec d0 = Vec::loadu(r + j) - m, d1 = Vec::loadu(r + j + L) - m;
        q0 = at::vec::fmadd(d0, d0, q0);
        q1 = at::vec::fmadd(d1, d1, q1);
      }
      float sq = hsum(q0 + q1);
      for (int64_t j = KV; j < K; ++j) sq += (r[j] - mean) * (r[j] - mean);
      const float rstd = 1.0f / std::sqrt(sq / K + static_cast<float>(eps));
      float* y = out_bf16 ? row.data() : out.data_ptr<float>() + i * K;
      const Vec rs(rstd);
      for (int64_t j = 0; j < KV; j += L) {
        Vec v = (Vec::loadu(r + j) - m) * rs;
        if (w) v = v * Vec::loadu(w + j);
        if (b) v = v + Vec::loadu(b + j);
        v.store(y + j);
      }
      for (int64_t j = KV; j < K; ++j) y[j] = (r[j] - mean) * rstd * (w ? w[j] : 1.0f) + (b ? b[j] : 0.0f);
      if (out_bf16) {
        at::BFloat16* o = out.data_ptr<at::BFloat16>() + i * K;
        int64_t j = 0;
        for (; j < KV; j += 2 * L)
          at::vec::convert_float_bfloat16(Vec::loadu(y + j), Vec::loadu(y + j + L)).store(o + j);
        for (; j < K; ++j) o[j] = y[j];
      }
    }
  });
  return out;
}

// ---- patches as matrix rows (im2col) for the patch embedding's matmul ---------------------------------------------
// images (B, C, H, W) fp32 → (B H/ph W/pw, 2 C ph pw) bf16: row r is patch r (row-major over each image's grid) as
// its C ph pw pixels in the convolution weight's (c, i, j) order, rounded to bf16, then the same values again (for
// the two-term weight [W_hi; W_lo] of `fast._PatchLinear`). One parallel pass, where the strided view, cast and
// repeat took three (~120 us for a 224 x 224 image).
at::Tensor patch_cols(const at::Tensor& x_, int64_t ph, int64_t pw) {
  TORCH_CHECK(x_.dim() == 4 && x_.scalar_type() == at::kFloat, "patch_cols: images must be (B, C, H, W) float32, got ",
              x_.sizes(), " ", x_.scalar_type());
  TORCH_CHECK(ph > 0 && pw > 0 && x_.size(2) % ph == 0 && x_.size(3) % pw == 0, "patch_cols: image size ",
              x_.size(2), "x", x_.size(3), " is not a multiple of the patch size ", ph, "x", pw);
  const at::Tensor x = x_.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), gh = H / ph, gw = W / pw;
  const int64_t K = C * ph * pw, rows = B * gh * gw;
  at::Tensor out = at::empty({rows, 2 * K}, x.options().dtype(at::kBFloat16));
  const float* X = x.data_ptr<float>();
  at::BFloat16* O = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (gh * gw), p = r % (gh * gw), y0 = p / gw * ph, x0 = p % gw * pw;
      at::BFloat16* dst = O + r * 2 * K;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < ph; ++i)
          at::vec::convert(X + ((b * C + c) * H + y0 + i) * W + x0, dst + (c * ph + i) * pw, pw);
      std::memcpy(dst + K, dst, K * sizeof(at::BFloat16));
    }
  });
  return out;
}

// ---- a whole pre-norm block in one call ---------------------------------------------------------------------------
// x + proj(attention(qkv(LN1(x)))), then + fc2(GELU(fc1(LN2(.)))), each step the same kernel call as the Python
// block makes (`fast._PackedBlock`), so the result is bit for bit the same. Why: at ViT-S/16's batch 1 the seven
// calls per block are short (~40-290 us), and the Python between them (the picks, views, argument conversion, the
// int8 inputs' quantisation calls), time in which the second core waits, cost 0.2-0.3 ms of bf16's ~14 ms forward
// and 0.1-0.7 ms of int8's ~13 ms (an Intel Xeon with AMX, A/B in one process).
struct BlockLinear {  // one linear on the brgemm ukernel: bf16 (linear_bf16) or int8 (linear_u8s8)
  bool int8 = false;
  at::Tensor weight;                  // pack_linear_bf16 or pack_linear_s8
  c10::optional<at::Tensor> bias;     // fp32
  at::Tensor w_scale, colsum;         // int8: per output channel
  bool gelu = false;                  // exact GELU (never with a residual)
  int64_t out_kind = 0;               // without a residual: 0 fp32, 1 bf16, 2 uint8 over (o_scale, o_zp) (int8)
  double o_scale = 1.0;
  int64_t o_zp = 0;
};

struct Activation {  // a linear's input: a float32 or bf16 matrix, or uint8 values with their scale and zero point
  at::Tensor t;
  bool quantized = false;
  double scale = 1.0;
  int64_t zp = 0;
};

Activation run_linear(const BlockLinear& L, const Activation& a, const c10::optional<at::Tensor>& residual) {
  const bool add = residual.has_value();
  const int64_t kind = add ? 0 : L.out_kind;
  Activation y;
  if (!L.int8) {
    TORCH_CHECK(!a.quantized, "block: a bf16 linear cannot read a uint8 input");
    y.t = linear_bf16(a.t, L.weight, L.bias, L.gelu && !add, residual, kind == 1);
    return y;
  }
  at::Tensor xq = a.t;
  double s = a.scale;
  int64_t zp = a.zp;
  if (!a.quantized) std::tie(xq, s, zp) = quantize_u8(a.t.scalar_type() == at::kFloat ? a.t : a.t.to(at::kFloat));
  y.t = linear_u8s8(xq, s, zp, L.weight, L.w_scale, L.colsum, L.bias, L.gelu && !add, residual, kind, L.o_scale,
                    L.o_zp);
  if (kind == 2) y.quantized = true, y.scale = L.o_scale, y.zp = L.o_zp;
  return y;
}

// x (B, N, C) fp32; norms' (weight, bias, eps); qkv writes bf16 (B, N, 3, H, C / H) for attention_bf16 (brgemm:
// on the ukernel), whose output is bf16 where the projection is a bf16 linear, else fp32
at::Tensor block_forward(const at::Tensor& x, const c10::optional<at::Tensor>& n1w,
                         const c10::optional<at::Tensor>& n1b, double eps1, const c10::optional<at::Tensor>& n2w,
                         const c10::optional<at::Tensor>& n2b, double eps2, const BlockLinear& qkv,
                         const BlockLinear& proj, const BlockLinear& fc1, const BlockLinear& fc2, int64_t heads,
                         bool brgemm) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat, "block_forward: x must be (B, N, C) float32, got ",
              x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(qkv.out_kind == 1, "block_forward: the qkv linear must write bf16 for the bf16 attention");
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  at::Tensor x2 = x.contiguous().view({B * N, C});
  Activation h{layer_norm(x2, n1w, n1b, eps1, !qkv.int8)};
  at::Tensor q = run_linear(qkv, h, c10::nullopt).t.view({B, N, 3, heads, C / heads});
  Activation o{attention_bf16(q, N, c10::nullopt, !proj.int8, brgemm).view({B * N, C})};
  x2 = run_linear(proj, o, x2).t;
  Activation a = run_linear(fc1, Activation{layer_norm(x2, n2w, n2b, eps2, !fc1.int8)}, c10::nullopt);
  return run_linear(fc2, a, x2).t.view({B, N, C});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_u8", &quantize_u8, "dynamic per-tensor uint8 quantisation: (values, scale, zero point)");
  m.def("attention", &attention, "exact multi-head self-attention from a fused (B, N, 3, H, D) qkv buffer",
        pybind11::arg("qkv"), pybind11::arg("nq"), pybind11::arg("key_bias") = pybind11::none());
  m.def("has_bf16", &has_bf16, "whether this CPU runs attention_bf16 (AVX-512 BF16)");
  m.def("attention_bf16", &attention_bf16, "attention_bf16(qkv, nq, key_bias=None, out_bf16=True, brgemm=False): "
        "the same attention from a bf16 qkv buffer, with bf16 dot products (AVX-512 BF16 tiles, or brgemm: oneDNN's "
        "brgemm ukernel, AMX where the CPU has it)",
        pybind11::arg("qkv"), pybind11::arg("nq"), pybind11::arg("key_bias") = pybind11::none(),
        pybind11::arg("out_bf16") = true, pybind11::arg("brgemm") = false);
  m.def("bf16_linear_available", &bf16_linear_available, "whether oneDNN's brgemm ukernel runs bf16 here");
  m.def("pack_vnni", [](const at::Tensor& wt) {
          TORCH_CHECK(wt.dim() == 2 && wt.size(1) % kLinN == 0 && wt.is_contiguous() &&
                          (wt.scalar_type() == at::kBFloat16 || wt.scalar_type() == at::kChar) &&
                          wt.size(0) % (wt.scalar_type() == at::kBFloat16 ? 2 : 4) == 0,
                      "pack_vnni: wt must be a contiguous (K, N) bf16 or int8 matrix, N a multiple of 64, got ",
                      wt.sizes(), " ", wt.scalar_type());
          return pack_blocks(wt, true);
        }, "pack_vnni(wt): (K, N) bf16/int8 → (N / 64, K, 64) in the brgemm ukernel's VNNI layout, packed by vitkit "
        "(what PyTorch's cpublas::pack writes where it packs)");
  m.def("pack_linear_bf16", &pack_linear_bf16, "a (N, K) weight packed for linear_bf16 (N a multiple of 64)");
  m.def("int8_linear_available", &int8_linear_available, "whether oneDNN's brgemm ukernel runs uint8 x int8 here");
  m.def("pack_linear_s8", &pack_linear_s8, "a (N, K) int8 weight packed for linear_u8s8 (N a multiple of 64)");
  m.def("linear_u8s8", &linear_u8s8, "linear_u8s8(xq, x_scale, x_zp, wp, w_scale, colsum, bias, gelu, residual, "
        "out_kind, o_scale, o_zp): the int8 path's matmul on the brgemm ukernel");
  m.def("layer_norm", &layer_norm, "layer_norm(x, weight, bias, eps, out_bf16): nn.LayerNorm over the rows of x, "
        "written as bf16 or fp32");
  m.def("linear_bf16", &linear_bf16, "linear_bf16(x, wp, bias=None, gelu=False, residual=None, out_bf16=True): "
        "gelu?(x W^T + b) [+ residual] on the brgemm ukernel",
        pybind11::arg("x"), pybind11::arg("wp"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("gelu") = false, pybind11::arg("residual") = pybind11::none(),
        pybind11::arg("out_bf16") = true);
  m.def("patch_cols", &patch_cols, "patch_cols(images, ph, pw): the patches as bf16 rows, each twice (im2col)");
  pybind11::class_<BlockLinear>(m, "BlockLinear", "one linear of block_forward: bf16 or int8, on the brgemm ukernel")
      .def(pybind11::init([](bool int8, at::Tensor weight, c10::optional<at::Tensor> bias,
                             c10::optional<at::Tensor> w_scale, c10::optional<at::Tensor> colsum, bool gelu,
                             int64_t out_kind, double o_scale, int64_t o_zp) {
             TORCH_CHECK(!int8 || (w_scale.has_value() && colsum.has_value()),
                         "BlockLinear: an int8 linear needs w_scale and colsum");
             TORCH_CHECK(out_kind >= 0 && out_kind <= (int8 ? 2 : 1), "BlockLinear: out_kind out of range");
             BlockLinear L;
             L.int8 = int8, L.weight = weight, L.bias = bias, L.gelu = gelu, L.out_kind = out_kind;
             if (int8) L.w_scale = *w_scale, L.colsum = *colsum;
             L.o_scale = o_scale, L.o_zp = o_zp;
             return L;
           }),
           pybind11::arg("int8"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("w_scale"),
           pybind11::arg("colsum"), pybind11::arg("gelu"), pybind11::arg("out_kind"), pybind11::arg("o_scale") = 1.0,
           pybind11::arg("o_zp") = 0);
  m.def("block_forward", &block_forward, "block_forward(x, n1w, n1b, eps1, n2w, n2b, eps2, qkv, proj, fc1, fc2, heads, "
        "brgemm): a pre-norm block (LN, qkv, bf16 attention, proj + x, LN, fc1 + GELU, fc2 + x) in one call");
}
