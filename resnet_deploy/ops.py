"""The fused operator y = relu(batch_norm(x) + residual), over torch.ops.resnet_deploy.* (in eager mode over the same
operators called from C++, resnet_deploy._C.batch_norm_add_relu).

The C++ library (csrc/ops.cpp) defines four operators:
  bn_add_relu_train(input, residual?, weight?, bias?, eps) -> (out, mean, invstd)    batch statistics
  bn_add_relu_eval(input, residual?, running_mean, running_var, weight?, bias?, eps) -> out
  bn_add_relu_backward(grad_out, out?, input, mean, invstd, weight?, bias?, training, residual_grad)
      -> (grad_input, grad_residual, grad_weight, grad_bias)     ReLU mask from out, or from input if out is None
  bn_update_running_stats(running_mean!, running_var!, mean, invstd, momentum, eps, count) -> ()
Autograd for the forwards is registered in C++ (csrc/autograd.cpp); they are functional: batch_norm_add_relu
updates the running statistics after a training forward with the last one, outside autograd.
"""
from typing import List, Optional

import torch
from torch import Tensor
from torch.overrides import has_torch_function

from resnet_deploy import _library

# Eager calls go to resnet_deploy._C.batch_norm_add_relu, which does what batch_norm_add_relu below does, with the
# same checks, through the dispatcher without torch.ops' per-argument conversions: an eval call at 1x512x3x3 took
# 2.2 µs instead of 3.8, a training forward at 2x512x3x3 12 instead of 17. TorchScript, torch.compile and
# __torch_function__ overrides (tensor subclasses, modes, torch.set_default_device) see the torch.ops calls below.
_eager = _library.load()
_ops = torch.ops.resnet_deploy


def _check_inputs(input: Tensor, residual: Optional[Tensor], running_mean: Optional[Tensor],
                  running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                  training: bool):
    # Shape and dtype errors are raised by the C++ operators, except the running statistics' in training (below).
    # Devices are checked here because a tensor on another device sends the call to that device's kernel before
    # any C++ check can run.
    tensors: List[Optional[Tensor]] = [residual, running_mean, running_var, weight, bias]
    for other in tensors:
        if other is not None and other.device != input.device:
            raise ValueError(f"batch_norm_add_relu: all tensors must be on the input's device {input.device}, "
                             f"got one on {other.device}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm_add_relu: eval mode (training=False) needs running_mean and running_var")
    if training:  # checked before the forward: only the update after it reads them (eval's operator checks them)
        _check_channel_stats("running_mean", running_mean, input)
        _check_channel_stats("running_var", running_var, input)


def _check_channel_stats(name: str, stats: Optional[Tensor], input: Tensor):
    if stats is not None and input.dim() == 4 and (stats.dim() != 1 or stats.size(0) != input.size(1)):
        raise ValueError(f"batch_norm_add_relu: {name} must have one value per channel (shape [{input.size(1)}]), "
                         f"got shape {list(stats.shape)}")


def batch_norm_add_relu(input: Tensor, residual: Optional[Tensor], running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                        training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """relu(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) + residual).

    input is (N, C, H, W), contiguous or channels_last; residual (same shape) may be None. In training the
    batch statistics normalize the input and running_mean / running_var (if given) are updated in place
    with the unbiased batch variance, as PyTorch does. Gradients flow to input, residual, weight and bias.
    """
    if not torch.jit.is_scripting():
        if not torch.compiler.is_compiling() and not has_torch_function(
                (input, residual, running_mean, running_var, weight, bias)):
            return _eager.batch_norm_add_relu(input, residual, running_mean, running_var, weight, bias, training,
                                              momentum, eps)
    _check_inputs(input, residual, running_mean, running_var, weight, bias, training)
    if not training:
        assert running_mean is not None and running_var is not None
        return _ops.bn_add_relu_eval(input, residual, running_mean, running_var, weight, bias, eps)
    out, mean, invstd = _ops.bn_add_relu_train(input, residual, weight, bias, eps)
    # An empty batch leaves the running statistics as they are, as in PyTorch.
    if running_mean is not None and running_var is not None and input.numel() > 0:
        _update_running_stats(input, mean, invstd, running_mean, running_var, momentum, eps)
    return out


def _update_running_stats(input: Tensor, mean: Tensor, invstd: Tensor, running_mean: Tensor,
                          running_var: Tensor, momentum: float, eps: float):
    # No torch.no_grad() needed: mean and invstd are non-differentiable outputs, and buffers need no gradient.
    _ops.bn_update_running_stats(running_mean, running_var, mean, invstd, momentum, eps,
                                 input.numel() // input.size(1))


# Fake kernels: shapes and dtypes only, so torch.compile / torch.export / ONNX export can trace the ops.
def _stats_dtype(input: Tensor) -> torch.dtype:
    return torch.float64 if input.dtype == torch.float64 else torch.float32


@torch.library.register_fake("resnet_deploy::bn_add_relu_train")
def _train_fake(input, residual, weight, bias, eps):
    channels = input.size(1)
    stats = input.new_empty((channels,), dtype=_stats_dtype(input))
    return torch.empty_like(input), stats, torch.empty_like(stats)


@torch.library.register_fake("resnet_deploy::bn_add_relu_eval")
def _eval_fake(input, residual, running_mean, running_var, weight, bias, eps):
    return torch.empty_like(input)


@torch.library.register_fake("resnet_deploy::bn_update_running_stats")
def _update_running_stats_fake(running_mean, running_var, mean, invstd, momentum, eps, count):
    return None


@torch.library.register_fake("resnet_deploy::bn_add_relu_backward")
def _backward_fake(grad_out, out, input, mean, invstd, weight, bias, training, residual_grad):
    channels = input.size(1)
    param_dtype = weight.dtype if weight is not None else _stats_dtype(input)
    grad_residual = torch.empty_like(input) if residual_grad else input.new_empty((0,))
    return (torch.empty_like(input), grad_residual,
            input.new_empty((channels,), dtype=param_dtype), input.new_empty((channels,), dtype=param_dtype))
