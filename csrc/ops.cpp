// Operator schemas only. Kernels: cpu/*.cpp and cuda/*.cu; autograd: autograd.cpp; fake kernels: resnet_deploy/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(resnet_deploy, m) {
  // Training forward with batch statistics; returns the batch mean and inverse std for the backward
  // (float32, or float64 for float64 inputs). Running statistics are updated by the caller.
  m.def("bn_add_relu_train(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor out, Tensor mean, Tensor invstd)");
  // Eval forward with running statistics.
  m.def("bn_add_relu_eval(Tensor input, Tensor? residual, Tensor running_mean, Tensor running_var,"
        " Tensor? weight, Tensor? bias, float eps) -> Tensor");
  // Backward of either forward. The ReLU mask comes from `out`, or, when out is None (allowed only after a forward
  // without residual), from the input through weight, bias, mean and invstd, as the forward computed it: one
  // tensor read fewer. grad_residual is empty when not requested.
  m.def("bn_add_relu_backward(Tensor grad_out, Tensor? out, Tensor input, Tensor mean, Tensor invstd,"
        " Tensor? weight, Tensor? bias, bool training, bool residual_grad)"
        " -> (Tensor grad_input, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)");
  // The running statistics' update after a training forward, in place, from its batch mean and inverse std
  // over `count` values per channel: running = (1 - momentum) * running + momentum * batch, with the
  // unbiased batch variance, as nn.BatchNorm2d does. One call instead of a handful of small tensor ops.
  m.def("bn_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor invstd,"
        " float momentum, float eps, int count) -> ()");
}
