// CPU kernels of the fused BatchNorm + residual add + ReLU. Two passes forward in training (statistics,
// then normalize-add-relu), two passes backward (reduction, then elementwise); each walks NCHW planes or
// channels_last rows directly, multi-threaded with at::parallel_for, inner loops vectorized.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "bn_add_relu.h"
#include "bn_add_relu_args.h"

namespace resnet_deploy {
namespace {

// Work below this many elements per task is not worth a thread hand-off.
constexpr int64_t kElementsPerTask = 32768;

template <typename acc_t>
struct TermPair {
  acc_t first;
  acc_t second;
};

// sum0[c], sum1[c] = sums of term(i, c).first / .second over every element i of channel c, in double.
template <typename acc_t, typename Term>
void sum_per_channel(const Geometry& g, const Term& term, std::vector<double>& sum0, std::vector<double>& sum1) {
  const int64_t channels = g.channels;
  sum0.assign(channels, 0.0);
  sum1.assign(channels, 0.0);
  if (!g.channels_last) {
    at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        double s0 = 0, s1 = 0;
        for (int64_t n = 0; n < g.batch; ++n) {
          const int64_t base = (n * channels + c) * g.plane;
          acc_t p0 = 0, p1 = 0;  // one plane in acc_t lanes, then into double
#pragma omp simd reduction(+ : p0, p1)
          for (int64_t i = 0; i < g.plane; ++i) {
            const TermPair<acc_t> t = term(base + i, c);
            p0 += t.first;
            p1 += t.second;
          }
          s0 += p0;
          s1 += p1;
        }
        sum0[c] = s0;
        sum1[c] = s1;
      }
    });
    return;
  }
  // channels_last: every thread adds whole rows of C values into partial sums of its own.
  const int64_t rows = g.batch * g.plane;
  const int threads = at::get_num_threads();
  std::vector<double> partial(2 * threads * channels, 0.0);
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / channels);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    double* p0 = partial.data() + 2 * at::get_thread_num() * channels;
    double* p1 = p0 + channels;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        const TermPair<acc_t> t = term(base + c, c);
        p0[c] += t.first;
        p1[c] += t.second;
      }
    }
  });
  for (int t = 0; t < threads; ++t) {
    for (int64_t c = 0; c < channels; ++c) {
      sum0[c] += partial[2 * t * channels + c];
      sum1[c] += partial[(2 * t + 1) * channels + c];
    }
  }
}

// out[i] = op(i, c) over every element i of channel c, in memory order.
template <typename ElementOp>
void for_each_element(const Geometry& g, const ElementOp& op) {
  const int64_t channels = g.channels;
  if (!g.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, g.plane));
    at::parallel_for(0, g.batch * channels, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t c = p % channels;
        const int64_t base = p * g.plane;
#pragma omp simd
        for (int64_t i = 0; i < g.plane; ++i) op(base + i, c);
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / channels);
  at::parallel_for(0, g.batch * g.plane, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t base = row * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) op(base + c, c);
    }
  });
}

// Batch mean and inverse std of every channel, from sums shifted by the channel's first value.
template <typename scalar_t, typename acc_t>
void batch_stats(const Geometry& g, const scalar_t* __restrict__ x, acc_t* mean, acc_t* invstd, double eps) {
  std::vector<acc_t> shift(g.channels);
  for (int64_t c = 0; c < g.channels; ++c) {
    shift[c] = static_cast<acc_t>(x[g.channels_last ? c : c * g.plane]);
  }
  const acc_t* __restrict__ shift_ptr = shift.data();
  std::vector<double> sum, sum_sq;
  sum_per_channel<acc_t>(
      g,
      [=](int64_t i, int64_t c) {
        const acc_t d = static_cast<acc_t>(x[i]) - shift_ptr[c];
        return TermPair<acc_t>{d, d * d};
      },
      sum, sum_sq);
  for (int64_t c = 0; c < g.channels; ++c) {
    const MeanVar<acc_t> mv = mean_var_from_shifted_sums<acc_t>(sum[c], sum_sq[c], double(g.per_channel()), shift[c]);
    mean[c] = mv.mean;
    invstd[c] = inverse_std<acc_t>(mv.var, eps);
  }
}

// y = relu(x * scale[c] + shift[c] + residual).
template <typename scalar_t, typename acc_t>
void normalize_add_relu(const ForwardArgs& a, const acc_t* mean, const acc_t* invstd, at::Tensor& out) {
  const int64_t channels = a.geom.channels;
  std::vector<acc_t> scale(channels), shift(channels);
  const acc_t* weight = a.weight.data_ptr<acc_t>();
  const acc_t* bias = a.bias.data_ptr<acc_t>();
  for (int64_t c = 0; c < channels; ++c) {
    const ChannelAffine<acc_t> affine = bn_affine(mean[c], invstd[c], weight[c], bias[c]);
    scale[c] = affine.scale;
    shift[c] = affine.shift;
  }
  const acc_t* __restrict__ sc = scale.data();
  const acc_t* __restrict__ sh = shift.data();
  const scalar_t* __restrict__ x = a.input.data_ptr<scalar_t>();
  scalar_t* __restrict__ y = out.data_ptr<scalar_t>();
  if (a.residual.defined()) {
    const scalar_t* __restrict__ r = a.residual.data_ptr<scalar_t>();
    for_each_element(a.geom, [=](int64_t i, int64_t c) {
      y[i] = static_cast<scalar_t>(
          bn_add_relu_forward(static_cast<acc_t>(x[i]), static_cast<acc_t>(r[i]), sc[c], sh[c]));
    });
  } else {
    for_each_element(a.geom, [=](int64_t i, int64_t c) {
      y[i] = static_cast<scalar_t>(bn_add_relu_forward(static_cast<acc_t>(x[i]), acc_t(0), sc[c], sh[c]));
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_add_relu_train_cpu(const at::Tensor& input,
                                                                     const std::optional<at::Tensor>& residual,
                                                                     const std::optional<at::Tensor>& weight,
                                                                     const std::optional<at::Tensor>& bias,
                                                                     double eps) {
  const ForwardArgs a = prepare_forward("bn_add_relu_train", input, residual, weight, bias);
  check_training_count("bn_add_relu_train", input);
  const auto stats_options = input.options().dtype(stats_dtype(input));
  at::Tensor mean = at::empty({a.geom.channels}, stats_options);
  at::Tensor invstd = at::empty({a.geom.channels}, stats_options);
  at::Tensor out = at::empty_like(a.input, a.format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_add_relu_train_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    batch_stats<scalar_t, acc_t>(a.geom, a.input.data_ptr<scalar_t>(), mean.data_ptr<acc_t>(),
                                 invstd.data_ptr<acc_t>(), eps);
    normalize_add_relu<scalar_t, acc_t>(a, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>(), out);
  });
  return {out, mean, invstd};
}

at::Tensor bn_add_relu_eval_cpu(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                const at::Tensor& running_mean, const at::Tensor& running_var,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                double eps) {
  const ForwardArgs a = prepare_forward("bn_add_relu_eval", input, residual, weight, bias);
  check_channel_param("bn_add_relu_eval", input, running_mean, "running_mean");
  check_channel_param("bn_add_relu_eval", input, running_var, "running_var");
  const at::Tensor mean = channel_vector(running_mean, input, 0.0);
  const at::Tensor var = channel_vector(running_var, input, 1.0);
  at::Tensor out = at::empty_like(a.input, a.format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_add_relu_eval_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> invstd(a.geom.channels);
    const acc_t* var_ptr = var.data_ptr<acc_t>();
    for (int64_t c = 0; c < a.geom.channels; ++c) invstd[c] = inverse_std<acc_t>(var_ptr[c], eps);
    normalize_add_relu<scalar_t, acc_t>(a, mean.data_ptr<acc_t>(), invstd.data(), out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_relu_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, bool training, bool residual_grad) {
  const BackwardArgs a = prepare_backward("bn_add_relu_backward", grad_out, out, input, mean, invstd, weight);
  const int64_t channels = a.geom.channels;
  at::Tensor grad_input = at::empty_like(a.input, a.format);
  at::Tensor grad_residual = residual_grad ? at::empty_like(a.input, a.format) : at::empty({0}, input.options());
  at::Tensor grad_weight = at::empty({channels}, a.mean.options());
  at::Tensor grad_bias = at::empty({channels}, a.mean.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "bn_add_relu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* __restrict__ gy = a.grad_out.data_ptr<scalar_t>();
    const scalar_t* __restrict__ y = a.out.data_ptr<scalar_t>();
    const scalar_t* __restrict__ x = a.input.data_ptr<scalar_t>();
    const acc_t* __restrict__ mu = a.mean.data_ptr<acc_t>();
    const acc_t* istd = a.invstd.data_ptr<acc_t>();
    const acc_t* w = a.weight.data_ptr<acc_t>();

    // Pass 1: per channel, sum(dz) and sum(dz * (x - mean)).
    std::vector<double> sum_dz, sum_dz_xmu;
    sum_per_channel<acc_t>(
        a.geom,
        [=](int64_t i, int64_t c) {
          const acc_t dz = relu_backward(static_cast<acc_t>(gy[i]), static_cast<acc_t>(y[i]));
          return TermPair<acc_t>{dz, dz * (static_cast<acc_t>(x[i]) - mu[c])};
        },
        sum_dz, sum_dz_xmu);

    std::vector<acc_t> ka(channels), kb(channels), kc(channels);
    acc_t* gw = grad_weight.data_ptr<acc_t>();
    acc_t* gb = grad_bias.data_ptr<acc_t>();
    const acc_t count = static_cast<acc_t>(a.geom.per_channel());
    for (int64_t c = 0; c < channels; ++c) {
      const InputGradCoeffs<acc_t> k = input_grad_coeffs<acc_t>(
          mu[c], istd[c], w[c], static_cast<acc_t>(sum_dz[c]), static_cast<acc_t>(sum_dz_xmu[c]), count, training);
      ka[c] = k.a;
      kb[c] = k.b;
      kc[c] = k.c;
      gw[c] = weight_grad<acc_t>(static_cast<acc_t>(sum_dz_xmu[c]), istd[c]);
      gb[c] = static_cast<acc_t>(sum_dz[c]);
    }

    // Pass 2: dx = a * dz + b * x + c, and dresidual = dz.
    const acc_t* __restrict__ pa = ka.data();
    const acc_t* __restrict__ pb = kb.data();
    const acc_t* __restrict__ pc = kc.data();
    scalar_t* __restrict__ gx = grad_input.data_ptr<scalar_t>();
    if (residual_grad) {
      scalar_t* __restrict__ gr = grad_residual.data_ptr<scalar_t>();
      for_each_element(a.geom, [=](int64_t i, int64_t c) {
        const acc_t dz = relu_backward(static_cast<acc_t>(gy[i]), static_cast<acc_t>(y[i]));
        gx[i] = static_cast<scalar_t>(bn_input_grad(dz, static_cast<acc_t>(x[i]), {pa[c], pb[c], pc[c]}));
        gr[i] = static_cast<scalar_t>(dz);
      });
    } else {
      for_each_element(a.geom, [=](int64_t i, int64_t c) {
        const acc_t dz = relu_backward(static_cast<acc_t>(gy[i]), static_cast<acc_t>(y[i]));
        gx[i] = static_cast<scalar_t>(bn_input_grad(dz, static_cast<acc_t>(x[i]), {pa[c], pb[c], pc[c]}));
      });
    }
  });
  const auto param_dtype = param_grad_dtype(input, weight);
  return {grad_input, grad_residual, grad_weight.to(param_dtype), grad_bias.to(param_dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_deploy, CPU, m) {
  m.impl("bn_add_relu_train", &bn_add_relu_train_cpu);
  m.impl("bn_add_relu_eval", &bn_add_relu_eval_cpu);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward_cpu);
}

}  // namespace resnet_deploy
