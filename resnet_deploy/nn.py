"""BatchNormAddReLU2d: a drop-in for BatchNorm2d followed by (+ residual and) ReLU, using the fused operator."""
from typing import Optional

import torch
from torch import Tensor, nn

from resnet_deploy.ops import batch_norm_add_relu


class BatchNormAddReLU2d(nn.Module):
    """relu(BatchNorm2d(x) + residual) in one fused pass.

    Parameters and buffers have the names and shapes of nn.BatchNorm2d (weight, bias, running_mean,
    running_var, num_batches_tracked), so state dicts load both ways. It deliberately does not subclass
    nn.BatchNorm2d: SyncBatchNorm conversion would silently swap it for a plain BatchNorm.
    """

    momentum: Optional[float]  # declared so TorchScript accepts None here, as in nn.BatchNorm2d

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def reset_running_stats(self):
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        momentum_or_none = self.momentum  # a local, so TorchScript can refine Optional[float]
        momentum = 0.0
        if momentum_or_none is not None:
            momentum = momentum_or_none
        elif self.training:  # cumulative moving average, as nn.BatchNorm2d
            momentum = 1.0 / float(self.num_batches_tracked.item())
        return batch_norm_add_relu(x, residual, self.running_mean, self.running_var, self.weight, self.bias,
                                   self.training, momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
