// Argument checking and preparation shared by the CPU and CUDA kernels: every error a caller can cause is
// reported here, once, in one sentence.
#pragma once

#include <ATen/ATen.h>
#include <optional>

#include "bn_add_relu.h"

namespace resnet_deploy {

// The two layouts the kernels walk; any other strides are copied into NCHW first.
inline at::MemoryFormat kernel_memory_format(const at::Tensor& input) {
  if (!input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// Statistics and parameters are kept in float32 (float64 for float64 inputs), as PyTorch's BatchNorm does.
inline at::ScalarType stats_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK_VALUE(input.dim() == 4, op, ": expected a 4-D input (N, C, H, W), got a ", input.dim(),
                    "-D tensor of shape ", input.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()), op,
                   ": expected a floating-point input (float32, float64, bfloat16 or float16), got ",
                   input.scalar_type());
  TORCH_CHECK_VALUE(input.size(1) > 0, op, ": expected at least one channel, got input of shape ", input.sizes());
}

inline void check_same_device(const char* op, const at::Tensor& input, const at::Tensor& other, const char* name) {
  TORCH_CHECK_VALUE(other.device() == input.device(), op, ": ", name, " is on ", other.device(),
                    " but the input is on ", input.device(), "; all tensors must be on one device");
}

inline void check_like_input(const char* op, const at::Tensor& input, const at::Tensor& other, const char* name) {
  check_same_device(op, input, other, name);
  TORCH_CHECK_VALUE(other.sizes() == input.sizes(), op, ": ", name, " must have the input's shape ",
                    input.sizes(), ", got ", other.sizes());
  TORCH_CHECK_TYPE(other.scalar_type() == input.scalar_type(), op, ": ", name, " must have the input's dtype ",
                   input.scalar_type(), ", got ", other.scalar_type());
}

inline void check_channel_param(const char* op, const at::Tensor& input, const at::Tensor& param, const char* name) {
  check_same_device(op, input, param, name);
  TORCH_CHECK_VALUE(param.dim() == 1 && param.size(0) == input.size(1), op, ": ", name,
                    " must have one value per channel (shape [", input.size(1), "]), got shape ", param.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(param.scalar_type()), op, ": ", name, " must be floating-point, got ",
                   param.scalar_type());
}

// As in PyTorch, an empty input (no values at all) is allowed: its output is empty.
inline void check_training_count(const char* op, const at::Tensor& input) {
  TORCH_CHECK_VALUE(input.numel() / input.size(1) != 1, op,
                    ": expected more than 1 value per channel when training, got input of shape ", input.sizes());
}

// A tensor of the input's shape, in the kernel's layout (a no-op when it already is).
inline at::Tensor in_layout(const at::Tensor& tensor, at::MemoryFormat format) {
  return tensor.contiguous(format);
}

// A per-channel tensor as a contiguous stats-dtype vector, `fill` when absent.
inline at::Tensor channel_vector(const std::optional<at::Tensor>& param, const at::Tensor& input, double fill) {
  if (param.has_value() && param->defined()) {
    // Checked here: to() is a dispatched call even when the dtype already matches, on every vector, every call.
    if (param->scalar_type() == stats_dtype(input)) return param->contiguous();
    return param->to(stats_dtype(input)).contiguous();
  }
  return at::full({input.size(1)}, fill, input.options().dtype(stats_dtype(input)));
}

inline Geometry geometry(const at::Tensor& input, at::MemoryFormat format) {
  return {input.size(0), input.size(1), input.size(2) * input.size(3), format == at::MemoryFormat::ChannelsLast};
}

}  // namespace resnet_deploy

namespace resnet_deploy {

// Forward arguments, checked and laid out for the kernels.
struct ForwardArgs {
  at::Tensor input;     // in `format`
  at::Tensor residual;  // in `format`, or undefined
  at::Tensor weight;    // stats dtype, contiguous [C]
  at::Tensor bias;      // stats dtype, contiguous [C]
  at::MemoryFormat format;
  Geometry geom;
};

inline ForwardArgs prepare_forward(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  check_input(op, input);
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) check_like_input(op, input, *residual, "residual");
  if (weight.has_value() && weight->defined()) check_channel_param(op, input, *weight, "weight");
  if (bias.has_value() && bias->defined()) check_channel_param(op, input, *bias, "bias");
  const auto format = kernel_memory_format(input);
  return {in_layout(input, format), has_residual ? in_layout(*residual, format) : at::Tensor(),
          channel_vector(weight, input, 1.0), channel_vector(bias, input, 0.0), format, geometry(input, format)};
}

// Backward arguments: everything of the input's shape in the input's kernel layout.
struct BackwardArgs {
  at::Tensor grad_out;
  at::Tensor out;     // undefined when the ReLU mask comes from the input (a forward without residual)
  at::Tensor input;
  at::Tensor mean;    // stats dtype, contiguous [C]
  at::Tensor invstd;  // stats dtype, contiguous [C]
  at::Tensor weight;  // stats dtype, contiguous [C]
  at::Tensor bias;    // stats dtype, contiguous [C]; only without out (the mask needs the forward's shift)
  at::MemoryFormat format;
  Geometry geom;
};

inline BackwardArgs prepare_backward(const char* op, const at::Tensor& grad_out, const std::optional<at::Tensor>& out,
                                     const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     bool residual_grad) {
  check_input(op, input);
  check_like_input(op, input, grad_out, "grad_out");
  const bool has_out = out.has_value() && out->defined();
  if (has_out) check_like_input(op, input, *out, "out");
  TORCH_CHECK_VALUE(has_out || !residual_grad, op, ": residual_grad needs out, the output of a forward with a ",
                    "residual (without out, the ReLU mask is recomputed from the input, which is only right when ",
                    "there was no residual)");
  check_channel_param(op, input, mean, "mean");
  check_channel_param(op, input, invstd, "invstd");
  if (weight.has_value() && weight->defined()) check_channel_param(op, input, *weight, "weight");
  if (bias.has_value() && bias->defined()) check_channel_param(op, input, *bias, "bias");
  const auto format = kernel_memory_format(input);
  return {in_layout(grad_out, format),
          has_out ? in_layout(*out, format) : at::Tensor(),
          in_layout(input, format),
          channel_vector(mean, input, 0.0),
          channel_vector(invstd, input, 1.0),
          channel_vector(weight, input, 1.0),
          has_out ? at::Tensor() : channel_vector(bias, input, 0.0),
          format,
          geometry(input, format)};
}

// Arguments of bn_update_running_stats: four per-channel vectors on one device, enough values per channel.
inline void check_running_stats_update(const at::Tensor& running_mean, const at::Tensor& running_var,
                                       const at::Tensor& mean, const at::Tensor& invstd, int64_t count) {
  const char* op = "bn_update_running_stats";
  const at::Tensor* tensors[] = {&running_var, &mean, &invstd};
  const char* names[] = {"running_var", "mean", "invstd"};
  TORCH_CHECK_VALUE(running_mean.dim() == 1, op, ": running_mean must be 1-D, got shape ", running_mean.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(running_mean.scalar_type()), op, ": running_mean must be floating-point, got ",
                   running_mean.scalar_type());
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *tensors[i];
    TORCH_CHECK_VALUE(t.device() == running_mean.device(), op, ": ", names[i], " is on ", t.device(),
                      " but running_mean is on ", running_mean.device());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == running_mean.size(0), op, ": ", names[i], " must have shape [",
                      running_mean.size(0), "], got ", t.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", names[i], " must be floating-point, got ",
                     t.scalar_type());
  }
  TORCH_CHECK_TYPE(running_var.scalar_type() == running_mean.scalar_type(), op,
                   ": running_var must have running_mean's dtype ", running_mean.scalar_type(), ", got ",
                   running_var.scalar_type());
  TORCH_CHECK_VALUE(count > 1, op, ": expected more than 1 value per channel, got ", count);
}

// Parameter gradients have the weight's dtype (the stats dtype when there is no weight).
inline at::ScalarType param_grad_dtype(const at::Tensor& input, const std::optional<at::Tensor>& weight) {
  return weight.has_value() && weight->defined() ? weight->scalar_type() : stats_dtype(input);
}

}  // namespace resnet_deploy
