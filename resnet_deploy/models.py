"""The ResNet of the d2l chapter (https://d2l.ai/chapter_convolutional-modern/resnet.html), fused or plain,
and the checkpoint helpers that rebuild it without importing the training code.

fused=True puts BatchNormAddReLU2d wherever a BatchNorm is followed by ReLU (the stem, each block's bn1,
and each block's bn2 + residual add); fused=False uses BatchNormReLU2d, the same computation in plain
PyTorch. The two have identical module trees and state_dict keys, so weights move freely between them.
"""
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resnet_deploy.nn import BatchNormAddReLU2d

ARCHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
STAGE_CHANNELS = (64, 128, 256, 512)


class BatchNormReLU2d(nn.BatchNorm2d):
    """relu(BatchNorm2d(x) + residual) in plain PyTorch: the reference for BatchNormAddReLU2d."""

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        y = super().forward(x)
        if residual is not None:
            y += residual  # in place, as torchvision's ResNet: the BN output is not needed by its backward
        return F.relu(y, inplace=True)


def _norm_class(fused: bool) -> Type[nn.Module]:
    return BatchNormAddReLU2d if fused else BatchNormReLU2d


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    # No bias: the BatchNorm that follows every such conv subtracts the mean, which cancels it.
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)


class Stem(nn.Module):
    """7x7 conv, 64 channels, stride 2; BN + ReLU; 3x3 max-pool, stride 2."""

    def __init__(self, in_channels: int, fused: bool):
        super().__init__()
        self.conv = _conv(in_channels, 64, 7, stride=2)
        self.bn = _norm_class(fused)(64)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.bn(self.conv(x)))


class Residual(nn.Module):
    """Two 3x3 convs; the first may halve height and width, and then a 1x1 conv (with bias, as in d2l)
    carries the input to the new shape."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, fused: bool):
        super().__init__()
        norm = _norm_class(fused)
        self.conv1 = _conv(in_channels, out_channels, 3, stride)
        self.bn1 = norm(out_channels)
        self.conv2 = _conv(out_channels, out_channels, 3)
        self.bn2 = norm(out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn1(self.conv1(x))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.bn2(self.conv2(y), identity)


class ResNet(nn.Module):
    """stem -> four stages of Residual blocks (64, 128, 256, 512 channels) -> global average pool -> linear."""

    def __init__(self, arch: str = "resnet18", in_channels: int = 1, num_classes: int = 10, fused: bool = True):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
        if in_channels < 1 or num_classes < 1:
            raise ValueError(f"in_channels and num_classes must be positive, got {in_channels} and {num_classes}")
        # Everything needed to rebuild this model: stored in checkpoints and manifests.
        self.config = {"arch": arch, "in_channels": in_channels, "num_classes": num_classes, "fused": fused}
        self.stem = Stem(in_channels, fused)
        stages, channels = [], 64
        for index, (blocks, out_channels) in enumerate(zip(ARCHS[arch], STAGE_CHANNELS)):
            stride = 1 if index == 0 else 2  # stages 2-4 start by halving height and width
            stage = [Residual(channels, out_channels, stride, fused)]
            stage += [Residual(out_channels, out_channels, 1, fused) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
        self._init_weights()

    def _init_weights(self):
        # He initialization for convs under ReLU (torchvision's choice), and each block's last BN scale at
        # zero so that every block starts as the identity: without it the residual sums grow block by block
        # and high learning rates diverge (Goyal et al., 2017, "Accurate, large minibatch SGD").
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, Residual):
                nn.init.zeros_(module.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


def resnet18(in_channels: int = 1, num_classes: int = 10, fused: bool = True) -> ResNet:
    """ResNet-18 of d2l: 2 blocks in each of the four stages."""
    return ResNet("resnet18", in_channels, num_classes, fused)


def resnet34(in_channels: int = 1, num_classes: int = 10, fused: bool = True) -> ResNet:
    """ResNet-34 of d2l: 3, 4, 6 and 3 blocks in the four stages."""
    return ResNet("resnet34", in_channels, num_classes, fused)


def build_model(arch: str = "resnet18", in_channels: int = 1, num_classes: int = 10, fused: bool = True) -> ResNet:
    """The model a config dict describes: build_model(**model.config) rebuilds model's architecture."""
    return ResNet(arch, in_channels, num_classes, fused)


# ------------------------------------------------------------------------------------------ checkpoints
# A training checkpoint is a dict written with torch.save:
#   model       {"arch", "in_channels", "num_classes", "fused"}  (ResNet.config)
#   state_dict  the model's weights and BN statistics
#   classes     class names, index = label
#   input       {"size": [H, W], "mean": float, "std": float}: what data.preprocess needs
#   epoch       epochs completed
# and, for resuming, train_config, optimizer, scheduler, rng, metrics.
CHECKPOINT_KEYS = ("model", "state_dict", "classes", "input", "epoch")
MODEL_KEYS = ("arch", "in_channels", "num_classes", "fused")  # build_model's arguments; fused may be absent


def _check_model_config(config: Any, path: Path) -> None:
    """Refuse a model entry build_model cannot take, naming the keys instead of a KeyError or TypeError."""
    expected = "{'arch', 'in_channels', 'num_classes', 'fused'} as `resnet-deploy train` writes it"
    if not isinstance(config, dict):
        raise ValueError(f"{path} has model {config!r}; expected a dict {expected}")
    missing = [key for key in MODEL_KEYS[:3] if key not in config]
    unexpected = [str(key) for key in config if key not in MODEL_KEYS]
    if missing or unexpected:
        problems = [f"{what} {', '.join(keys)}" for what, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected)) if keys]
        raise ValueError(f"{path} has a model entry with {' and '.join(problems)}; expected {expected}")


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """The checkpoint dict at path, checked to hold what build_model_from_checkpoint needs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; expected a file written by `resnet-deploy train`")
    try:
        # weights_only: a checkpoint holds tensors and plain containers, never code to run
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        # torch's refusal spans lines and suggests loading with code execution: one line, without that advice.
        lines = str(error).strip().splitlines()
        reason = ("not a PyTorch file of tensors and plain containers" if "Weights only load failed" in str(error)
                  else f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__)
        raise ValueError(f"{path} cannot be loaded as a checkpoint ({reason}); expected a file written by "
                         f"`resnet-deploy train`") from error
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; expected a checkpoint written by `resnet-deploy train`")
    _check_model_config(checkpoint["model"], path)
    return checkpoint


def build_model_from_checkpoint(checkpoint: Union[str, Path, Dict[str, Any]], fused: Optional[bool] = None) -> ResNet:
    """The checkpoint's model with its weights, in eval mode; fused overrides the fused flag it was trained with."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    config = dict(checkpoint["model"])
    if fused is not None:
        config["fused"] = fused
    model = build_model(**config)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
