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
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
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
  const float* bias = nullptr;
  if (key_bias.has_value() && key_bias->defined()) {
    bias_t = key_bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_t.numel() == B * N, "key_bias must have B * N elements");
    bias = bias_t.data_ptr<float>();
  }
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

// x (fp32, any shape) -> (uint8 values, scale, zero point): PyTorch's dynamic per-tensor quantisation
// (`quantize_per_tensor_dynamic(x, quint8, reduce_range=False)`: the range [min(x, 0), max(x, 0)] over 256 levels)
// in two passes over x (one min/max, one quantise) writing plain uint8, where PyTorch takes four (min, max, quantise
// and the `int_repr` copy). The int8 path of vitkit.optimize quantises every linear's input this way.
std::tuple<torch::Tensor, double, int64_t> quantize_u8(const torch::Tensor& x_) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && x_.device().is_cpu(), "quantize_u8: expected a float32 CPU tensor");
  auto x = x_.contiguous();
  const float* p = x.data_ptr<float>();
  const int64_t n = x.numel();
  constexpr int64_t W = Vec::size();
  using Pair = std::pair<float, float>;
  Pair mm = at::parallel_reduce(
      0, n, 1 << 15, Pair(0.0f, 0.0f),
      [&](int64_t b, int64_t e, Pair acc) {
        Vec lo(acc.first), hi(acc.second);
        int64_t i = b;
        for (; i + W <= e; i += W) {
          Vec v = Vec::loadu(p + i);
          lo = at::vec::minimum(lo, v);
          hi = at::vec::maximum(hi, v);
        }
        float l[W], h[W];
        lo.store(l);
        hi.store(h);
        for (int64_t k = 0; k < W; ++k) acc = Pair(std::min(acc.first, l[k]), std::max(acc.second, h[k]));
        for (; i < e; ++i) acc = Pair(std::min(acc.first, p[i]), std::max(acc.second, p[i]));
        return acc;
      },
      [](Pair a, Pair b) { return Pair(std::min(a.first, b.first), std::max(a.second, b.second)); });
  // as PyTorch's choose_qparams (quint8, no reduced range): float32 scale, zero point clamped into [0, 255]
  float scale = (static_cast<double>(mm.second) - mm.first) / 255.0;
  if (scale == 0.0f || !std::isfinite(1.0f / scale)) scale = 0.1f;
  double zp_real = 0.0 - mm.first / static_cast<double>(scale);
  int64_t zp = static_cast<int64_t>(std::nearbyint(std::min(255.0, std::max(0.0, zp_real))));
  auto q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  uint8_t* o = q.data_ptr<uint8_t>();
  const float inv = 1.0f / scale;
  const Vec vinv(inv), vzp(static_cast<float>(zp)), vlo(0.0f), vhi(255.0f);
  at::parallel_for(0, n, 1 << 15, [&](int64_t b, int64_t e) {
    float buf[W];
    int64_t i = b;
    for (; i + W <= e; i += W) {
      at::vec::clamp(((Vec::loadu(p + i) * vinv).round() + vzp), vlo, vhi).store(buf);
      for (int64_t k = 0; k < W; ++k) o[i + k] = static_cast<uint8_t>(buf[k]);
    }
    for (; i < e; ++i) o[i] = static_cast<uint8_t>(std::min(255.0f, std::max(0.0f, std::nearbyint(p[i] * inv) + zp)));
  });
  return std::make_tuple(q, static_cast<double>(scale), zp);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_u8", &quantize_u8, "dynamic per-tensor uint8 quantisation: (values, scale, zero point)");
  m.def("attention", &attention, "exact multi-head self-attention from a fused (B, N, 3, H, D) qkv buffer",
        pybind11::arg("qkv"), pybind11::arg("nq"), pybind11::arg("key_bias") = pybind11::none());
}
