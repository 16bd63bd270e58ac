"""Builds resnet_deploy._C: the fused BatchNorm+add+ReLU operators, with CUDA kernels when a matching
toolkit is found.

RESNET_DEPLOY_CUDA=1 forces the CUDA build (and fails if it cannot), RESNET_DEPLOY_CUDA=0 forces CPU-only;
unset, CUDA is used when nvcc's version matches the CUDA version torch was built with.
"""
import glob
import os
import re
import subprocess

# cpp_extension reads CUDA_HOME when it is imported; its own guess (/usr/local) misses the toolkit.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def nvcc_version():
    """The toolkit's 'major.minor', or None when there is no nvcc."""
    if not CUDA_HOME:
        return None
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def want_cuda():
    """Decide whether to build the CUDA kernels, saying why."""
    forced = os.environ.get("RESNET_DEPLOY_CUDA")
    found = nvcc_version()
    torch_cuda = torch.version.cuda
    if forced == "0":
        print("resnet_deploy: building CPU-only (RESNET_DEPLOY_CUDA=0)")
        return False
    if forced == "1":
        if torch_cuda is None:
            raise SystemExit("resnet_deploy: RESNET_DEPLOY_CUDA=1 but the installed torch is a CPU-only build")
        if found is None:
            raise SystemExit(f"resnet_deploy: RESNET_DEPLOY_CUDA=1 but no nvcc found under CUDA_HOME={CUDA_HOME!r}")
        if found != torch_cuda:
            raise SystemExit(f"resnet_deploy: RESNET_DEPLOY_CUDA=1 but nvcc is CUDA {found} and torch needs {torch_cuda}")
        print(f"resnet_deploy: building with CUDA {found} (forced)")
        return True
    if torch_cuda is not None and found == torch_cuda:
        print(f"resnet_deploy: building with CUDA {found} from {CUDA_HOME}")
        return True
    print(f"resnet_deploy: building CPU-only (torch CUDA {torch_cuda}, nvcc {found or 'not found'})")
    return False


def extension():
    with_cuda = want_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/python/*.cpp"))
    macros = [("RESNET_DEPLOY_WITH_CUDA", "1" if with_cuda else "0"),
              ("RESNET_DEPLOY_TORCH_VERSION", f'"{torch.__version__}"')]
    # -fopenmp: at::parallel_for is an OpenMP header template that runs serially unless the extension itself is
    # compiled with OpenMP; it also honours the kernels' `#pragma omp simd`. The runtime (libgomp.so.1) resolves
    # to the one torch ships and has already loaded.
    # -fno-math-errno: nothing reads errno, and setting it keeps square roots out of vector loops.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"]
    if not with_cuda:
        return CppExtension("resnet_deploy._C", sources, define_macros=macros, extra_link_args=["-fopenmp"],
                            extra_compile_args={"cxx": cxx_flags}, include_dirs=[os.path.join(HERE, "csrc")])
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs"
    print(f"resnet_deploy: CUDA architectures {archs}")
    macros.append(("RESNET_DEPLOY_CUDA_ARCHS", f'"{archs}"'))
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    return CUDAExtension("resnet_deploy._C", sources, define_macros=macros, extra_link_args=["-fopenmp"],
                         extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--use_fast_math"]},
                         include_dirs=[os.path.join(HERE, "csrc")])


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
