// Autograd for the two forward operators, in C++ so that a training call costs no Python. Both forwards share
// bn_add_relu_backward (see save_for_backward for where its ReLU mask comes from). The forwards are functional:
// running statistics are updated by the caller with bn_update_running_stats.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "op_signatures.h"

namespace resnet_deploy {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The forward kernels, called below the autograd layer (from the autograd functions, or directly when there is
// no gradient to record).
std::tuple<at::Tensor, at::Tensor, at::Tensor> train_below_autograd(const at::Tensor& input,
                                                                    const OptionalTensor& residual,
                                                                    const OptionalTensor& weight,
                                                                    const OptionalTensor& bias, double eps) {
  static const auto train = find_op<TrainSig>("resnet_deploy::bn_add_relu_train");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return train.call(input, residual, weight, bias, eps);
}

at::Tensor eval_below_autograd(const at::Tensor& input, const OptionalTensor& residual,
                               const at::Tensor& running_mean, const at::Tensor& running_var,
                               const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
  static const auto eval = find_op<EvalSig>("resnet_deploy::bn_add_relu_eval");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return eval.call(input, residual, running_mean, running_var, weight, bias, eps);
}

bool requires_grad(const OptionalTensor& tensor) { return present(tensor) && tensor->requires_grad(); }

at::Tensor value_or_undefined(const OptionalTensor& tensor) { return present(tensor) ? *tensor : at::Tensor(); }

// Saves what bn_add_relu_backward needs and which gradients are wanted. The ReLU mask comes from `out` after a
// forward with residual and in eval (EvalFunction recomputes invstd, which may differ from the forward's in the
// last bit), else from the input, which the backward reads anyway: then `out` is not saved, the bias is.
// (AutogradContext::needs_input_grad counts only the tensors given, not the argument positions.)
void save_for_backward(AutogradContext* ctx, const at::Tensor& out, const at::Tensor& input, const at::Tensor& mean,
                       const at::Tensor& invstd, const OptionalTensor& residual, const OptionalTensor& weight,
                       const OptionalTensor& bias, bool training) {
  const bool mask_from_input = training && !present(residual);
  ctx->save_for_backward({mask_from_input ? at::Tensor() : out, input, mean, invstd, value_or_undefined(weight),
                          mask_from_input ? value_or_undefined(bias) : at::Tensor()});
  ctx->saved_data["training"] = training;
  ctx->saved_data["wanted"] = c10::List<bool>(
      {input.requires_grad(), requires_grad(residual), requires_grad(weight), requires_grad(bias)});
  // Gradients that never come (mean and invstd have none, `out` may get none) stay undefined, instead of being
  // allocated and zero-filled on every backward.
  ctx->set_materialize_grads(false);
}

OptionalTensor optional_of(const at::Tensor& tensor) {
  return tensor.defined() ? OptionalTensor(tensor) : std::nullopt;
}

// Gradients for (input, residual, weight, bias) from the shared backward operator; undefined where not wanted,
// and all undefined when no gradient reached `out`.
variable_list input_and_param_grads(AutogradContext* ctx, const at::Tensor& grad_out) {
  if (!grad_out.defined()) return variable_list(4);
  static const auto backward = find_op<BackwardSig>("resnet_deploy::bn_add_relu_backward");
  const variable_list saved = ctx->get_saved_variables();
  const c10::List<bool> wanted = ctx->saved_data["wanted"].toBoolList();
  auto [grad_input, grad_residual, grad_weight, grad_bias] =
      backward.call(grad_out, optional_of(saved[0]), saved[1], saved[2], saved[3], optional_of(saved[4]),
                    optional_of(saved[5]), ctx->saved_data["training"].toBool(), /*residual_grad=*/wanted[1]);
  return {wanted[0] ? grad_input : at::Tensor(), wanted[1] ? grad_residual : at::Tensor(),
          wanted[2] ? grad_weight : at::Tensor(), wanted[3] ? grad_bias : at::Tensor()};
}

struct TrainFunction : public torch::autograd::Function<TrainFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptionalTensor& residual,
                               const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
    auto [out, mean, invstd] = train_below_autograd(input, residual, weight, bias, eps);
    ctx->mark_non_differentiable({mean, invstd});
    save_for_backward(ctx, out, input, mean, invstd, residual, weight, bias, /*training=*/true);
    return {out, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads = input_and_param_grads(ctx, grad_outputs[0]);
    grads.emplace_back();  // eps
    return grads;
  }
};

struct EvalFunction : public torch::autograd::Function<EvalFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const OptionalTensor& residual,
                               const at::Tensor& running_mean, const at::Tensor& running_var,
                               const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
    at::Tensor out = eval_below_autograd(input, residual, running_mean, running_var, weight, bias, eps);
    // The backward operator takes the statistics in any floating dtype.
    const at::Tensor invstd = at::rsqrt(running_var + eps);
    save_for_backward(ctx, out, input, running_mean, invstd, residual, weight, bias, /*training=*/false);
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list g = input_and_param_grads(ctx, grad_outputs[0]);
    // input, residual, running_mean, running_var, weight, bias, eps
    return {g[0], g[1], at::Tensor(), at::Tensor(), g[2], g[3], at::Tensor()};
  }
};

// Without a gradient to record, calls go straight to the device kernel.
bool records_grad(const at::Tensor& input, const OptionalTensor& residual, const OptionalTensor& weight,
                  const OptionalTensor& bias) {
  return at::GradMode::is_enabled() &&
         (input.requires_grad() || requires_grad(residual) || requires_grad(weight) || requires_grad(bias));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> train_autograd(const at::Tensor& input, const OptionalTensor& residual,
                                                              const OptionalTensor& weight,
                                                              const OptionalTensor& bias, double eps) {
  if (!records_grad(input, residual, weight, bias)) {
    return train_below_autograd(input, residual, weight, bias, eps);
  }
  const variable_list outputs = TrainFunction::apply(input, residual, weight, bias, eps);
  return {outputs[0], outputs[1], outputs[2]};
}

at::Tensor eval_autograd(const at::Tensor& input, const OptionalTensor& residual, const at::Tensor& running_mean,
                         const at::Tensor& running_var, const OptionalTensor& weight, const OptionalTensor& bias,
                         double eps) {
  if (!records_grad(input, residual, weight, bias)) {
    return eval_below_autograd(input, residual, running_mean, running_var, weight, bias, eps);
  }
  return EvalFunction::apply(input, residual, running_mean, running_var, weight, bias, eps)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(resnet_deploy, Autograd, m) {
  m.impl("bn_add_relu_train", &train_autograd);
  m.impl("bn_add_relu_eval", &eval_autograd);
  // No double backward: differentiating the backward's outputs (after backward with create_graph=True) raises,
  // instead of the gradients silently missing.
  m.impl("bn_add_relu_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace resnet_deploy
