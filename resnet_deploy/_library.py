"""Finds and loads the compiled operator library; one clear error if it is missing."""
import importlib

import torch  # noqa: F401  (loads libtorch, which the compiled library links against)

BUILD_HINT = (
    "the compiled operator library resnet_deploy._C is missing or does not load ({error}); "
    "build it with `make build` (or `pip install --no-build-isolation -e .` in an environment with torch==2.14.1)"
)


def load():
    """Import resnet_deploy._C, which registers the resnet_deploy::* operators with the dispatcher."""
    try:
        return importlib.import_module("resnet_deploy._C")
    except ImportError as error:
        raise ImportError(BUILD_HINT.format(error=error)) from error


def build_info():
    """How the library was built: {'cuda': bool, 'cuda_archs': str, 'torch': str, 'path': str}."""
    module = load()
    info = dict(module.build_info())
    info["path"] = module.__file__
    return info


def cpu_kernels():
    """Which CPU kernels run on this CPU: {'level': instruction-set level of the inner loops, 'small_plane_lanes':
    vector lanes of the small NCHW planes' walk (0: rows of repeated values), 'streaming_min_bytes': outputs from
    this size are written with streaming stores (negative: none)}."""
    return dict(load().cpu_kernels())
