// CPU kernel of bn_update_running_stats: one loop over the channels, in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "bn_add_relu.h"
#include "bn_add_relu_args.h"

namespace resnet_deploy {
namespace {

void bn_update_running_stats_cpu(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                 const at::Tensor& invstd, double momentum, double eps, int64_t count) {
  check_running_stats_update(running_mean, running_var, mean, invstd, count);
  // The training operators' statistics (float32 or float64, contiguous) are read in place; anything else is
  // converted to double first.
  const bool in_place = (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble) &&
                        invstd.scalar_type() == mean.scalar_type() && mean.is_contiguous() && invstd.is_contiguous();
  const at::Tensor batch_mean = in_place ? mean : mean.to(at::kDouble).contiguous();
  const at::Tensor batch_invstd = in_place ? invstd : invstd.to(at::kDouble).contiguous();
  AT_DISPATCH_FLOATING_TYPES(batch_mean.scalar_type(), "bn_update_running_stats", [&] {
    using stats_t = scalar_t;
    const stats_t* m = batch_mean.data_ptr<stats_t>();
    const stats_t* s = batch_invstd.data_ptr<stats_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "bn_update_running_stats",
                                    [&] {
      auto rm = running_mean.accessor<scalar_t, 1>();  // accessors: the buffers may be strided views
      auto rv = running_var.accessor<scalar_t, 1>();
      for (int64_t c = 0; c < running_mean.size(0); ++c) {
        const double batch_var = unbiased_var_from_invstd(static_cast<double>(s[c]), eps, count);
        rm[c] = static_cast<scalar_t>(moving_average(static_cast<double>(rm[c]), static_cast<double>(m[c]), momentum));
        rv[c] = static_cast<scalar_t>(moving_average(static_cast<double>(rv[c]), batch_var, momentum));
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_deploy, CPU, m) {
  m.impl("bn_update_running_stats", &bn_update_running_stats_cpu);
}

}  // namespace resnet_deploy
