// CPU kernels libtorch has no fused form of, for passes that record no autograd graph (the
// teacher's): training-mode BatchNorm followed by ReLU, in place.
//
// libtorch runs that as three operators: the batch statistics (two reads of the input), the
// normalisation (a read and a new output) and ReLU (a read and a write), so the activations
// cross memory six times. Here: one read for the sums, one read and write for
// `max(0, x * alpha + beta)`, on a single thread (the caller uses it where a pass has one
// intra-op thread, as the teacher's passes on a CPU do).
//
// The statistics are summed in double precision, so they are at least as exact as libtorch's
// float sums (they agree to float rounding); the normalisation is libtorch's own formulation
// (alpha = weight / sqrt(var + eps), beta = bias - mean * alpha).

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <vector>

#include "guard.hpp"

namespace {

using uamt_shim::guarded;

// Lanes the loops below work in: the inner loops run over a fixed multiple of this many
// elements, which the compiler turns into vector instructions (accumulating element-wise, so
// no reordering of a floating-point reduction is needed).
constexpr int64_t kLanes = 8;

// Adds to sum[k] and sq[k] the sums and sums of squares of channel k of `rows` rows of `c`
// channels each (channels fastest; c = 1: a plane of contiguous values). period = c * kLanes
// elements are summed element-wise, then folded per channel.
__attribute__((target_clones("avx2", "default"))) void sums(const float* x, int64_t rows, int64_t c, double* sum,
                                                           double* sq) {
  const int64_t period = c * kLanes;
  std::vector<double> s(period, 0.0), q(period, 0.0);
  const int64_t whole = rows / kLanes;
  for (int64_t b = 0; b < whole; ++b) {
    const float* p = x + b * period;
    for (int64_t j = 0; j < period; ++j) {
      const double v = p[j];
      s[j] += v;
      q[j] += v * v;
    }
  }
  for (int64_t j = 0; j < period; ++j) {
    sum[j % c] += s[j];
    sq[j % c] += q[j];
  }
  for (int64_t r = whole * kLanes; r < rows; ++r) {
    for (int64_t k = 0; k < c; ++k) {
      const double v = x[r * c + k];
      sum[k] += v;
      sq[k] += v * v;
    }
  }
}

// x = max(0, x * alpha + beta) over `n` values where alpha and beta repeat with period
// `period` (n is a multiple of the period).
__attribute__((target_clones("avx2", "default"))) void affine_relu(float* x, int64_t n, const float* alpha,
                                                                  const float* beta, int64_t period) {
  for (int64_t b = 0; b < n; b += period) {
    float* p = x + b;
    for (int64_t j = 0; j < period; ++j) {
      p[j] = std::max(0.0f, p[j] * alpha[j] + beta[j]);
    }
  }
}

// affine_relu on `rows` rows of `c` channels (channels fastest; c = 1: a plane), channel k
// scaled by alpha[k] and shifted by beta[k]: whole periods of kLanes rows, then the rest row by
// row.
void affine_relu_rows(float* x, int64_t rows, int64_t c, const float* alpha, const float* beta) {
  const int64_t period = c * kLanes;
  std::vector<float> a(period), b(period);
  for (int64_t j = 0; j < period; ++j) {
    a[j] = alpha[j % c];
    b[j] = beta[j % c];
  }
  const int64_t whole = (rows / kLanes) * period;
  affine_relu(x, whole, a.data(), b.data(), period);
  affine_relu(x + whole, rows * c - whole, alpha, beta, c);
}

void bn_relu(at::Tensor& t, const at::Tensor& weight, const at::Tensor& bias, double eps, at::Tensor& mean_out,
             at::Tensor& var_out) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "bn_relu: a float32 CPU tensor");
  TORCH_CHECK(t.dim() >= 2, "bn_relu: [N, C, ...]");
  const int64_t n = t.size(0), c = t.size(1);
  TORCH_CHECK(n > 0 && c > 0, "bn_relu: an empty tensor");
  const int64_t per = t.numel() / (n * c);
  const int64_t count = n * per;
  TORCH_CHECK(count > 1, "bn_relu: more than one value per channel");
  const bool cl = t.dim() == 5 && t.is_contiguous(c10::MemoryFormat::ChannelsLast3d);
  TORCH_CHECK(cl || t.is_contiguous(), "bn_relu: channels-last or contiguous strides");
  for (const at::Tensor* p : std::initializer_list<const at::Tensor*>{&weight, &bias, &mean_out, &var_out}) {
    TORCH_CHECK(p->device().is_cpu() && p->scalar_type() == at::kFloat && p->is_contiguous() && p->numel() == c,
                "bn_relu: float32 CPU vectors of one value per channel");
  }
  float* x = t.data_ptr<float>();
  std::vector<double> sum(c, 0.0), sq(c, 0.0);
  if (cl) {
    sums(x, count, c, sum.data(), sq.data());
  } else {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t k = 0; k < c; ++k) {
        sums(x + (i * c + k) * per, per, 1, &sum[k], &sq[k]);
      }
    }
  }
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  float* mean = mean_out.data_ptr<float>();
  float* var = var_out.data_ptr<float>();
  std::vector<float> alpha(c), beta(c);
  for (int64_t k = 0; k < c; ++k) {
    const double m = sum[k] / count;
    const double v = std::max(0.0, sq[k] / count - m * m);
    const double invstd = 1.0 / std::sqrt(v + eps);
    alpha[k] = static_cast<float>(w[k] * invstd);
    beta[k] = static_cast<float>(b[k] - m * (w[k] * invstd));
    mean[k] = static_cast<float>(m);
    var[k] = static_cast<float>(v * count / (count - 1));
  }
  if (cl) {
    affine_relu_rows(x, count, c, alpha.data(), beta.data());
  } else {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t k = 0; k < c; ++k) {
        affine_relu_rows(x + (i * c + k) * per, per, 1, &alpha[k], &beta[k]);
      }
    }
  }
}

}  // namespace

extern "C" {

// Training-mode BatchNorm (batch statistics, eps) then ReLU on `x` in place: x is a float32
// CPU tensor [N, C, ...], channels-last (5-D) or contiguous; weight, bias, mean_out and
// var_out float32 CPU vectors of C values. mean_out and var_out receive the batch mean and the
// unbiased batch variance, for the caller's running statistics. No autograd: x must not need
// a gradient.
int uamt_bn_relu_(void* x, void* weight, void* bias, double eps, void* mean_out, void* var_out) {
  return guarded([&] {
    bn_relu(*static_cast<at::Tensor*>(x), *static_cast<at::Tensor*>(weight), *static_cast<at::Tensor*>(bias), eps,
            *static_cast<at::Tensor*>(mean_out), *static_cast<at::Tensor*>(var_out));
  });
}

}  // extern "C"
