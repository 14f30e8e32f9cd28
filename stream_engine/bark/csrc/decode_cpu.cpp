// Kernels for decode steps on the CPU (AVX2 + FMA, float32). See stream_engine/bark/cpu_kernels.py.
//
// linear: a decode step multiplies a handful of rows (one per request) by every weight of the
// model, so it is bound by how fast the weights stream from memory. Each output row of the
// weight is read once, from start to end, while it is dotted with every input row; the threads
// of torch's pool split the output rows between them. GELU (erf) can be applied on the way out.
//
// attention: one query per slot against that slot's cached keys, after writing the step's own
// key and value into the cache; each slot reads keys [0, pos] only. Threads split (slot, head).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[b, n] = dot(w, x[b]) + bias for B (<= 8) input rows and one weight row w of length K.
inline float gelu(float v) { return 0.5f * v * (1.f + std::erf(v * static_cast<float>(M_SQRT1_2))); }

template <int B>
inline void dot_rows(const float* w, const float* x, int64_t K, float bias, bool act, float* y,
                     int64_t y_stride) {
  __m256 acc[B];
  for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_ps();
  const int64_t K8 = K - K % 8;
  for (int64_t k = 0; k < K8; k += 8) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + 256), _MM_HINT_T0);
    const __m256 wv = _mm256_loadu_ps(w + k);
    for (int b = 0; b < B; ++b) acc[b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * K + k), acc[b]);
  }
  for (int b = 0; b < B; ++b) {
    float s = hsum(acc[b]);
    for (int64_t k = K8; k < K; ++k) s += w[k] * x[b * K + k];
    s += bias;
    y[b * y_stride] = act ? gelu(s) : s;
  }
}

void dot_block(const float* w, const float* x, int64_t B, int64_t K, float bias, bool act,
               float* y, int64_t y_stride) {
  switch (B) {
    case 1: return dot_rows<1>(w, x, K, bias, act, y, y_stride);
    case 2: return dot_rows<2>(w, x, K, bias, act, y, y_stride);
    case 3: return dot_rows<3>(w, x, K, bias, act, y, y_stride);
    case 4: return dot_rows<4>(w, x, K, bias, act, y, y_stride);
    case 5: return dot_rows<5>(w, x, K, bias, act, y, y_stride);
    case 6: return dot_rows<6>(w, x, K, bias, act, y, y_stride);
    case 7: return dot_rows<7>(w, x, K, bias, act, y, y_stride);
    default: return dot_rows<8>(w, x, K, bias, act, y, y_stride);
  }
}

}  // namespace

// x (..., K) float32, weight (N, K) contiguous float32, bias (N,) or None -> (..., N);
// apply_gelu: apply GELU (the erf form, nn.GELU's default) to the result.
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& weight,
                     const c10::optional<torch::Tensor>& bias, bool apply_gelu) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "decode_cpu.linear: float32 only");
  TORCH_CHECK(!x.is_cuda() && !weight.is_cuda(), "decode_cpu.linear: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "decode_cpu.linear: weight (N, K)");
  const int64_t K = weight.size(1), N = weight.size(0);
  TORCH_CHECK(x.size(-1) == K, "decode_cpu.linear: x has ", x.size(-1), " features, weight ", K);
  const torch::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t B = x2.size(0);
  torch::Tensor y = torch::empty({B, N}, x.options());
  const float* W = weight.data_ptr<float>();
  const float* X = x2.data_ptr<float>();
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N,
                "decode_cpu.linear: bias (N,) float32");
    bp = bias->data_ptr<float>();
  }
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float bn = bp ? bp[n] : 0.f;
      for (int64_t b0 = 0; b0 < B; b0 += 8) {
        dot_block(W + n * K, X + b0 * K, std::min<int64_t>(8, B - b0), K, bn, apply_gelu, Y + b0 * N + n,
                  N);
      }
    }
  });
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}

// qkv (B, 3C) float32: each slot's query, key and value for this step (heads of hs = C / nh).
// cache_k, cache_v (slots >= B, nh, L, hs) contiguous; pos (B,) int64, each < L.
// Writes key and value b into cache[b, :, pos[b]], then returns (B, C): for every slot b and
// head h, softmax(q . k[0..pos[b]] / sqrt(hs)) @ v[0..pos[b]].
torch::Tensor attention(const torch::Tensor& qkv, torch::Tensor& cache_k, torch::Tensor& cache_v,
                        const torch::Tensor& pos) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && cache_k.scalar_type() == at::kFloat &&
                  cache_v.scalar_type() == at::kFloat,
              "decode_cpu.attention: float32 only");
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.is_contiguous() && cache_v.is_contiguous() &&
                  cache_k.sizes() == cache_v.sizes(),
              "decode_cpu.attention: caches (slots, nh, L, hs), contiguous");
  const int64_t nh = cache_k.size(1), L = cache_k.size(2), hs = cache_k.size(3), C = nh * hs;
  const torch::Tensor x = qkv.reshape({-1, 3 * C}).contiguous();
  const int64_t B = x.size(0);
  TORCH_CHECK(B <= cache_k.size(0), "decode_cpu.attention: more rows than cache slots");
  const torch::Tensor p = pos.to(at::kLong).contiguous();
  TORCH_CHECK(p.numel() == B, "decode_cpu.attention: one position per row");
  const int64_t* P = p.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(P[b] >= 0 && P[b] < L, "decode_cpu.attention: position ", P[b], " outside the cache");
  }
  torch::Tensor y = torch::empty({B, C}, x.options());
  const float* X = x.data_ptr<float>();
  float* Kc = cache_k.data_ptr<float>();
  float* Vc = cache_v.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(hs));
  at::parallel_for(0, B * nh, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> score(L);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / nh, h = t % nh, n = P[b] + 1;
      const float* q = X + b * 3 * C + h * hs;
      float* keys = Kc + ((b * nh + h) * L) * hs;
      float* values = Vc + ((b * nh + h) * L) * hs;
      std::copy(q + C, q + C + hs, keys + P[b] * hs);
      std::copy(q + 2 * C, q + 2 * C + hs, values + P[b] * hs);
      float top = -INFINITY;
      for (int64_t s = 0; s < n; ++s) {
        const float* k = keys + s * hs;
        __m256 acc = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= hs; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), acc);
        float v = hsum(acc);
        for (; d < hs; ++d) v += q[d] * k[d];
        score[s] = v * scale;
        top = std::max(top, score[s]);
      }
      float total = 0.f;
      for (int64_t s = 0; s < n; ++s) {
        score[s] = std::exp(score[s] - top);
        total += score[s];
      }
      float* out = Y + b * C + h * hs;
      std::fill(out, out + hs, 0.f);
      for (int64_t s = 0; s < n; ++s) {
        const float w = score[s] / total;
        const float* v = values + s * hs;
        for (int64_t d = 0; d < hs; ++d) out[d] += w * v[d];
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "y = x @ weight.T + bias (GELU optional) for decode steps");
  m.def("attention", &attention, "one decode step of attention over each slot's cache");
}
