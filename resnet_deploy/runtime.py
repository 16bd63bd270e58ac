"""One predictor interface over the deployment backends of an exported model.

    predictor = runtime.load("artifacts/", "onnxruntime", threads=2)
    logits = predictor.predict(predictor.preprocess(uint8_images))

Everything comes from the directory `resnet-deploy export` wrote; its manifest.json says how to
pre-process (size, mean, std: the same for every backend) and its sha256 sums are checked on load.

Backends:
  eager          the unfused PyTorch model (plain BatchNorm, add, ReLU): the reference
  eager-fused    the PyTorch model with the fused BatchNorm+add+ReLU operator
  torchscript    model.torchscript.pt (calls the fused operator)
  onnxruntime    model.onnx in ONNX Runtime; the CUDA provider when onnxruntime-gpu and a GPU are present
  torch.compile  the unfused model compiled by Inductor (frozen weights, dynamic batch axis), so the compiler
                 fuses BatchNorm, add and ReLU itself: the baseline the hand-fused operator competes with

The eager models are rebuilt from the architecture in the manifest and the weights inside the TorchScript
file, so an artifact directory is all a backend needs.

Threads are set per predictor: torch backends call torch.set_num_threads before each batch (the setting is
process-wide, and another predictor may have changed it); ONNX Runtime gets its own intra-op pool of that
size and no inter-op pool. One predictor at a time thus uses at most `threads` cores.
"""
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

import resnet_deploy  # noqa: F401  (loads the fused operator, which the TorchScript file calls)
from resnet_deploy import data
from resnet_deploy.models import build_model

BACKENDS = ("eager", "eager-fused", "torchscript", "onnxruntime", "torch.compile")
MANIFEST = "manifest.json"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_threads(threads: Any, flag: str = "--threads") -> None:
    """A thread count must be 1 to the available cores: more only slows every backend down, and thousands of
    threads hang ONNX Runtime or crash the process."""
    cores = available_cores()
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= cores:
        raise ValueError(f"{flag} must be an integer from 1 to {cores}, the cores this process may use; got "
                         f"{threads!r}")


# ------------------------------------------------------------------------------------------- manifest
def read_manifest(artifact_dir: Union[str, Path], verify: bool = True) -> Dict[str, Any]:
    """The manifest of an artifact directory, checked to hold what a predictor needs; with verify, every
    artifact's sha256 must match the manifest's."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if artifact_dir.is_file():
        raise NotADirectoryError(f"{artifact_dir} is a file; expected the artifact directory that `resnet-deploy "
                                 f"export` wrote ({artifact_dir.parent}, if it holds {MANIFEST})")
    if not artifact_dir.is_dir():
        raise FileNotFoundError(f"artifact directory {artifact_dir} does not exist; expected a directory written "
                                f"by `resnet-deploy export`")
    if not path.is_file():
        raise FileNotFoundError(f"{artifact_dir} has no {MANIFEST}; expected a directory written by `resnet-deploy "
                                f"export` (it writes the manifest only when the parity gate passes)")
    try:
        manifest = json.loads(path.read_text())
        preprocess = manifest["preprocess"]
        size, mean, std = preprocess["size"], float(preprocess["mean"]), float(preprocess["std"])
        channels = int(manifest["input"]["shape"][1])
        ok = (len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size) and std > 0 and channels > 0
              and len(manifest["classes"]) == int(manifest["model"]["num_classes"])
              and manifest["torchscript"]["file"] and manifest["onnx"]["file"])
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise ValueError(f"{path} is not a valid manifest ({type(error).__name__}: {error}); expected the "
                         f"manifest.json `resnet-deploy export` writes") from error
    if not ok:
        raise ValueError(f"{path} has an invalid input, preprocess or classes entry; expected the manifest.json "
                         f"`resnet-deploy export` writes")
    if verify:
        digests = manifest.get("sha256")
        digests = digests if isinstance(digests, dict) else {}
        # A backend loads these files: without a sum a replaced file would load unchecked.
        loaded = [manifest["torchscript"]["file"], manifest["onnx"]["file"], *manifest["onnx"].get("external_data", [])]
        for name in loaded:
            if name not in digests:
                raise ValueError(f"{path} has no sha256 for {name}; expected the sha256 of every artifact, as "
                                 f"`resnet-deploy export` writes them")
        for name, digest in digests.items():
            file = artifact_dir / name
            if not file.is_file():
                raise FileNotFoundError(f"{file} is missing; the manifest lists it, so re-run `resnet-deploy export`")
            with open(file, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() != digest:
                    raise ValueError(f"{file} does not match the sha256 in {path}; it changed after export, so "
                                     f"re-run `resnet-deploy export`")
    return manifest


# ------------------------------------------------------------------------------------------ predictor
class Predictor:
    """predict(batch) -> logits for one backend; preprocess(images) -> batch as the manifest says.

    batch: float32 (N, C, H, W) on the CPU, as the manifest's input; logits: float32 (N, classes) on the CPU.
    """

    def __init__(self, backend: str, manifest: Dict[str, Any], run: Callable[[Tensor], Tensor], threads: int,
                 device: str, uses_torch_threads: bool = True, session: Any = None):
        self.backend, self.manifest, self.threads, self.device = backend, manifest, threads, device
        self.session = session  # the onnxruntime.InferenceSession of that backend
        self.classes = list(manifest["classes"])
        self.input_shape = tuple(int(d) for d in manifest["input"]["shape"][1:])
        preprocess = manifest["preprocess"]
        self.size, self.mean, self.std = tuple(preprocess["size"]), float(preprocess["mean"]), float(preprocess["std"])
        self._run, self._uses_torch_threads = run, uses_torch_threads

    def preprocess(self, images: Union[np.ndarray, Tensor, Sequence[np.ndarray]]) -> Tensor:
        """uint8 grayscale images -> the model's float32 input, with data.preprocess (resize, normalize).

        images: an array (N, H, W), or a list of (H, W) arrays whose sizes may differ (each is then
        resized on its own: the same function, so the same numbers as a batch of that size).
        """
        if isinstance(images, (list, tuple)):
            if len({image.shape for image in images}) > 1:
                return torch.cat([self.preprocess(image[None]) for image in images])
            images = np.stack(images) if images else np.zeros((0, *self.size), np.uint8)
        if isinstance(images, np.ndarray):
            images = np.require(images, requirements=["C", "W"])  # a memory map or file buffer is read-only
        images = torch.as_tensor(images)
        batch = data.preprocess(images, self.size, self.mean, self.std)
        channels = self.input_shape[0]
        return batch if batch.shape[1] == channels else batch.expand(-1, channels, -1, -1).contiguous()

    def predict(self, batch: Tensor) -> Tensor:
        if not isinstance(batch, Tensor):
            batch = torch.as_tensor(batch)
        if batch.dtype != torch.float32 or batch.dim() != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise ValueError(f"predict: the batch must be float32 (N, {', '.join(map(str, self.input_shape))}) as "
                             f"the manifest says, got {batch.dtype} {tuple(batch.shape)}; use preprocess(images)")
        if self._uses_torch_threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self._run(batch.contiguous())

    def __repr__(self) -> str:
        return f"Predictor({self.backend!r}, threads={self.threads}, device={self.device!r})"


def _jit_load(path: Path, device: str) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export; it is still our format
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
        try:
            return torch.jit.load(str(path), map_location=device)
        except RuntimeError as error:
            raise ValueError(f"{path} is not a readable TorchScript file; expected the one `resnet-deploy export` "
                             f"writes, so re-run it") from error


def _torch_runner(model: Callable[[Tensor], Tensor], device: str) -> Callable[[Tensor], Tensor]:
    def run(batch: Tensor) -> Tensor:
        return model(batch.to(device)).float().cpu()
    return run


def _eager_model(artifact_dir: Path, manifest: Dict[str, Any], fused: bool, device: str) -> torch.nn.Module:
    """The architecture of the manifest with the weights stored in the TorchScript file."""
    scripted = _jit_load(artifact_dir / manifest["torchscript"]["file"], "cpu")
    model = build_model(**dict(manifest["model"], fused=fused))
    model.load_state_dict(scripted.state_dict())
    return model.eval().to(device)


def _onnxruntime_runner(path: Path, threads: int, cuda: bool):
    import onnxruntime
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidProtobuf

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # sequential execution: no second pool competing for the cores
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    try:
        session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    except InvalidProtobuf as error:
        raise ValueError(f"{path} is not a readable ONNX model; expected the one `resnet-deploy export` writes, so "
                         f"re-run it") from error
    input_name, output_name = session.get_inputs()[0].name, session.get_outputs()[0].name

    def run(batch: Tensor) -> Tensor:
        return torch.from_numpy(session.run([output_name], {input_name: batch.numpy()})[0])
    return run, session


def _onnxruntime_cuda_available() -> bool:
    """Only when onnxruntime-gpu offers the CUDA provider and a GPU is really there (the provider is listed
    by onnxruntime-gpu on machines without one)."""
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers() and torch.cuda.is_available()


def load(artifact_dir: Union[str, Path], backend: str, threads: Optional[int] = None,
         device: Optional[str] = None, verify: bool = True) -> Predictor:
    """A Predictor of the artifacts in artifact_dir on one backend.

    threads: cores the predictor may use (default: all available); device: "cpu" or "cuda" for the torch
    backends (default: cuda when available); verify: check the artifacts' sha256 against the manifest.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if threads is None:
        threads = available_cores()
    check_threads(threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"device must be 'cpu' or 'cuda' (with a GPU present), got {device!r}")
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir, verify)
    torch.set_num_threads(threads)  # before building: some backends size their pools on construction

    if backend == "onnxruntime":
        cuda = _onnxruntime_cuda_available()
        run, session = _onnxruntime_runner(artifact_dir / manifest["onnx"]["file"], threads, cuda)
        device = "cuda" if session.get_providers()[0].startswith("CUDA") else "cpu"
        return Predictor(backend, manifest, run, threads, device, uses_torch_threads=False, session=session)
    if backend == "torchscript":
        model = _jit_load(artifact_dir / manifest["torchscript"]["file"], device).eval()
    elif backend == "torch.compile":
        # Freezing folds the weights into constants (conv+BN folding, prepacked convolution weights);
        # dynamic=True compiles one graph for every batch size instead of one per size.
        model = torch.compile(_eager_model(artifact_dir, manifest, fused=False, device=device), dynamic=True,
                              options={"freezing": True})
    else:
        model = _eager_model(artifact_dir, manifest, fused=backend == "eager-fused", device=device)
    return Predictor(backend, manifest, _torch_runner(model, device), threads, device)

