"""resnet_deploy: a ResNet from a fused BatchNorm+add+ReLU kernel to fast, verified deployment.

Importing the package loads the compiled operator library, so torch.ops.resnet_deploy.* (and TorchScript
files that call them) work afterwards.
"""
from resnet_deploy import _library

_C = _library.load()

from resnet_deploy import ops  # noqa: E402  (registers the operators' fake kernels)

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
