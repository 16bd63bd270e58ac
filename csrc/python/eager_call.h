// The eager-mode entry of resnet_deploy.ops.batch_norm_add_relu (see eager_call.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace resnet_deploy {

at::Tensor batch_norm_add_relu_eager(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& running_mean,
                                     const std::optional<at::Tensor>& running_var,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     bool training, double momentum, double eps);

}  // namespace resnet_deploy
