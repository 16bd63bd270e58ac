"""Deployment artifacts of a trained model, verified before they are declared good.

`resnet-deploy export RUN_DIR_OR_CHECKPOINT --out DIR` writes:
  model.torchscript.pt  torch.jit.script of the eval model; it calls the resnet_deploy::* operators, so
                        it loads after `import resnet_deploy` (Python) or with libresnet_deploy_ops.so
                        (C++, `make cpp`). It also carries input_shape, input_mean, input_std and
                        class_names, so the C++ runner pre-processes exactly as manifest.json says.
  model.onnx            the dynamo exporter's graph, the fused operator translated into standard ONNX
                        (BatchNormalization, folded into Conv on export, Add, Relu), dynamic batch axis;
                        weights beside it in model.onnx.data only when they exceed one file's 2 GB.
  parity.json           eager vs TorchScript vs ONNX Runtime on real (or synthetic) images, at batch 1
                        and at a batch size other than the export one.
  manifest.json         input, normalization, classes, opset, versions, how to load the operator library,
                        the parity summary and the sha256 of every artifact. Written only when the parity
                        gate passes: a directory with a manifest holds verified artifacts.
"""
import argparse
import copy
import hashlib
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

import resnet_deploy
from resnet_deploy import data, outputs
from resnet_deploy.models import build_model, load_checkpoint

TORCHSCRIPT, ONNX, MANIFEST, PARITY = "model.torchscript.pt", "model.onnx", "manifest.json", "parity.json"
CHECKPOINT = "checkpoint.pt"  # what `resnet-deploy train` writes into a run directory
OPSET = 18
EXPORT_BATCH = 2  # the example batch torch.export traces with; the batch axis stays dynamic
PARITY_BATCH_SIZES = (1, 7)  # batch 1, and one that is neither the export batch nor a power of two
MAX_LOGIT_DIFF = 1e-3
INPUT_NAME, OUTPUT_NAME = "images", "logits"


class ParityError(ValueError):
    """The exported artifacts disagree with the eager model beyond the limits."""


# ------------------------------------------------------------------------------------------ the model
def _resolve_checkpoint(source: Union[str, Path]) -> Path:
    source = Path(source)
    if source.is_dir():
        if not (source / CHECKPOINT).is_file():
            # `resnet-deploy demo` keeps its training run in a subdirectory
            inside = sorted(path.parent for path in source.glob(f"*/{CHECKPOINT}"))
            hint = f" ({inside[0]} holds one)" if inside else ""
            raise FileNotFoundError(f"run directory {source} has no {CHECKPOINT}{hint}; expected a directory written "
                                    f"by `resnet-deploy train` or a checkpoint file")
        return source / CHECKPOINT
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist; expected a run directory or a checkpoint file")
    return source


def _check_state_dict(model: nn.Module, state_dict: Dict[str, Tensor], path: Path) -> None:
    """Refuse weights that do not fit the architecture, in one sentence instead of load_state_dict's list."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    reshaped = [f"{key} is {tuple(state_dict[key].shape)} but the model's is {tuple(value.shape)}"
                for key, value in expected.items()
                if key in state_dict and state_dict[key].shape != value.shape]
    if missing or unexpected or reshaped:
        problems = [f"{len(items)} {what} (first: {items[0]})" for what, items in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", reshaped))
                    if items]
        raise ValueError(f"{path} does not match its architecture {model.config['arch']}: {', '.join(problems)}; "
                         f"expected the weights of that architecture, as `resnet-deploy train` writes them")


def _input_config(checkpoint: Dict[str, Any], path: Path) -> Dict[str, Any]:
    spec = checkpoint["input"]
    size = spec.get("size") if isinstance(spec, dict) else None
    if (not isinstance(size, (list, tuple)) or len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size)
            or not isinstance(spec.get("mean"), (int, float)) or not spec.get("std")):
        raise ValueError(f"{path} has input {spec!r}; expected {{'size': [H, W], 'mean': float, 'std': float}}")
    return {"size": [int(s) for s in size], "mean": float(spec["mean"]), "std": float(spec["std"])}


def load_model(source: Union[str, Path]) -> Tuple[nn.Module, Dict[str, Any]]:
    """(the fused eval model, its description) from a run directory or checkpoint file.

    The model is always rebuilt fused, whatever it was trained with (the state dicts are identical), so
    the TorchScript calls the resnet_deploy operator.
    """
    path = _resolve_checkpoint(source)
    checkpoint = load_checkpoint(path)
    config = dict(checkpoint["model"], fused=True)
    model = build_model(**config)
    _check_state_dict(model, checkpoint["state_dict"], path)
    model.load_state_dict(checkpoint["state_dict"])
    classes = [str(name) for name in checkpoint["classes"]]
    if len(classes) != config["num_classes"]:
        raise ValueError(f"{path} names {len(classes)} classes for a model with {config['num_classes']} outputs; "
                         f"expected one name per output")
    info = {"checkpoint": str(path), "epoch": checkpoint["epoch"], "model": config,
            "input": _input_config(checkpoint, path), "classes": classes}
    return model.eval(), info


# ------------------------------------------------------------------------------------------ TorchScript
def script_model(model: nn.Module, input_config: Dict[str, Any], classes: Sequence[str]) -> torch.jit.ScriptModule:
    """torch.jit.script of a copy of model that also carries its pre-processing and class names, so a
    runtime holding only this file (the C++ runner) needs nothing else."""
    model = copy.deepcopy(model)
    model.input_shape = [int(model.config["in_channels"]), *input_config["size"]]
    model.input_mean = float(input_config["mean"])
    model.input_std = float(input_config["std"])
    model.class_names = list(classes)
    return torch.jit.script(model)


def custom_operators(scripted: torch.jit.ScriptModule) -> List[str]:
    """The resnet_deploy::* operators the TorchScript graph calls: what a runtime must have loaded."""
    graph = scripted.inlined_graph  # held: its nodes die with it
    kinds, blocks = set(), [graph]
    while blocks:  # the graph and the blocks of its if/loop nodes
        for node in blocks.pop().nodes():
            kinds.add(node.kind())
            blocks.extend(node.blocks())
    return sorted(kind for kind in kinds if kind.startswith("resnet_deploy::"))


# ------------------------------------------------------------------------------------------------- ONNX
def bn_add_relu_onnx(input, residual, running_mean, running_var, weight, bias, eps: float):
    """resnet_deploy::bn_add_relu_eval in standard ONNX: BatchNormalization (+ Add) + Relu, a pattern graph
    optimizers know: the exporter's optimizer already folds the BatchNormalization into the preceding Conv
    (ONNX Runtime would too), and ONNX Runtime fuses Add + Relu into its convolution kernels."""
    from onnxscript import opset18 as op

    if weight is None:  # BatchNormalization needs a scale and a bias: the identity ones
        weight = op.Expand(op.Constant(value_float=1.0), op.Shape(running_mean))
    if bias is None:
        bias = op.Expand(op.Constant(value_float=0.0), op.Shape(running_mean))
    y = op.BatchNormalization(input, weight, bias, running_mean, running_var, epsilon=eps)
    if residual is not None:
        y = op.Add(y, residual)
    return op.Relu(y)


def export_onnx(model: nn.Module, example: Tensor, path: Path) -> List[Path]:
    """Write model.onnx (dynamic batch axis) and check it; returns its files (with any external data)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    program = torch.onnx.export(
        model, (example,), dynamo=True, opset_version=OPSET, verbose=False,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        custom_translation_table={torch.ops.resnet_deploy.bn_add_relu_eval.default: bn_add_relu_onnx})
    program.save(str(path))  # weights go to an external file only when they exceed protobuf's 2 GB
    onnx.checker.check_model(str(path), full_check=True)  # by path: works with external data too
    graph = onnx.load(str(path), load_external_data=False).graph
    external = {ExternalDataInfo(t).location for t in graph.initializer if uses_external_data(t)}
    return [path] + [path.parent / name for name in sorted(external)]


# ----------------------------------------------------------------------------------------------- parity
def parity_images(count: int, input_config: Dict[str, Any], in_channels: int,
                  data_dir: Optional[Union[str, Path]] = None, seed: int = 0,
                  log: Optional[Callable[[str], None]] = None) -> Tuple[Tensor, Optional[Tensor], str]:
    """(inputs, labels or None, where they came from): the first `count` Fashion-MNIST test images,
    pre-processed as in training, or seeded synthetic 28x28 images when the dataset is absent. log is told,
    as in training, where the dataset was found and which configured places (a mistyped data_dir) were passed over."""
    labels = None
    try:
        files = data.find_dataset(data_dir, download=False, log=log)
        images = data.read_idx(files["test_images"], ndim=3)[:count]
        labels = data.read_idx(files["test_labels"], ndim=1)[:count].long()
        source = f"{len(images)} Fashion-MNIST test images from {files['test_images'].parent}"
    except data.DatasetNotFoundError:
        if data_dir is not None:
            raise
        generator = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
        source = f"{count} synthetic images (Fashion-MNIST not found)"
    inputs = data.preprocess(images, input_config["size"], input_config["mean"], input_config["std"])
    if in_channels != 1:
        inputs = inputs.expand(-1, in_channels, -1, -1).contiguous()
    return inputs, labels, source


def _run_batched(run: Callable[[Tensor], Tensor], inputs: Tensor, batch_size: int) -> Tensor:
    return torch.cat([run(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])


def compare(reference: Callable[[Tensor], Tensor], candidates: Dict[str, Callable[[Tensor], Tensor]],
            inputs: Tensor, batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
            max_logit_diff: float = MAX_LOGIT_DIFF) -> Dict[str, Any]:
    """Top-1 agreement and largest logit difference of every candidate against the reference, at each
    batch size; passed when agreement is 100% and every difference is at most max_logit_diff."""
    checks = []
    # A batch size above the number of images runs as one batch of them all: report the size that ran.
    for batch_size in sorted({min(size, len(inputs)) for size in batch_sizes}):
        expected = _run_batched(reference, inputs, batch_size)
        for name, run in candidates.items():
            logits = _run_batched(run, inputs, batch_size)
            agreement = (logits.argmax(1) == expected.argmax(1)).double().mean().item()
            diff = (logits - expected).abs().max().item()
            checks.append({"runtime": name, "batch_size": batch_size, "top1_agreement": agreement,
                           "max_abs_logit_diff": diff, "passed": agreement == 1.0 and diff <= max_logit_diff})
    return {"passed": all(check["passed"] for check in checks), "images": len(inputs),
            "limits": {"top1_agreement": 1.0, "max_abs_logit_diff": max_logit_diff}, "checks": checks}


def _runtimes(model: nn.Module, torchscript_path: Path, onnx_path: Path) -> Tuple[Callable, Dict[str, Callable]]:
    """The eager model and the two artifacts, loaded back from disk, as logits functions."""
    import onnxruntime

    scripted = torch.jit.load(str(torchscript_path)).eval()
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def onnx_runtime(x: Tensor) -> Tensor:
        return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])

    return model, {"torchscript": scripted, "onnxruntime": onnx_runtime}


def format_parity(report: Dict[str, Any]) -> str:
    lines = [f"parity on {report['source']} (limits: top-1 agreement 100%, max |logit diff| "
             f"{report['limits']['max_abs_logit_diff']:g}):"]
    for check in report["checks"]:
        lines.append(f"  {check['runtime']:<12} batch {check['batch_size']:<3} top-1 agreement "
                     f"{100 * check['top1_agreement']:.2f}%  max |logit diff| {check['max_abs_logit_diff']:.3g}  "
                     f"{'ok' if check['passed'] else 'FAILED'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- export
def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _versions() -> Dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    return {"resnet_deploy": resnet_deploy.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version()}


def export_model(model: nn.Module, out: Union[str, Path], input_config: Dict[str, Any], classes: Sequence[str],
                 parity_count: int = 1000, data_dir: Optional[Union[str, Path]] = None,
                 source: Optional[Dict[str, Any]] = None, log: Callable[[str], None] = lambda line: None
                 ) -> Dict[str, Any]:
    """Write the artifacts of an eval-mode model into out and gate them on parity; returns the manifest.

    input_config is {"size": [H, W], "mean": float, "std": float} (a checkpoint's "input"). Raises
    ParityError, after writing parity.json, when an artifact disagrees with the eager model.
    """
    training = [name or "the model" for name, module in model.named_modules() if module.training]
    if training:
        raise ValueError(f"{training[0]} is in train mode; expected an eval-mode model (call model.eval()): "
                         f"exported BatchNorm must use running statistics")
    if parity_count < 1:
        raise ValueError(f"the parity gate needs at least 1 image, got {parity_count}")
    in_channels = int(getattr(model, "config", {}).get("in_channels", 1))
    out = outputs.output_directory(out)
    (out / MANIFEST).unlink(missing_ok=True)  # a manifest must never vouch for the files written below

    started = time.perf_counter()
    scripted = script_model(model, input_config, classes)
    scripted.save(str(out / TORCHSCRIPT))
    operators = custom_operators(scripted)
    log(f"wrote {out / TORCHSCRIPT} (calls {', '.join(operators) or 'no custom operators'})")

    example = torch.zeros(EXPORT_BATCH, in_channels, *input_config["size"])
    onnx_files = export_onnx(model, example, out / ONNX)
    log(f"wrote {', '.join(str(p) for p in onnx_files)} (opset {OPSET}, passes onnx.checker full_check)")

    inputs, labels, image_source = parity_images(parity_count, input_config, in_channels, data_dir, log=log)
    reference, candidates = _runtimes(model, out / TORCHSCRIPT, out / ONNX)
    with torch.inference_mode():
        report = {"source": image_source, "export_batch_size": EXPORT_BATCH,
                  **compare(reference, candidates, inputs)}
        if labels is not None:
            predicted = _run_batched(reference, inputs, 256).argmax(1)
            report["eager_accuracy"] = (predicted == labels).double().mean().item()
    (out / PARITY).write_text(json.dumps(report, indent=2) + "\n")
    log(format_parity(report))
    if not report["passed"]:
        failed = [c for c in report["checks"] if not c["passed"]]
        worst = max(failed, key=lambda c: c["max_abs_logit_diff"])
        raise ParityError(f"parity gate failed in {len(failed)} of {len(report['checks'])} checks (worst: "
                          f"{worst['runtime']} at batch {worst['batch_size']}, top-1 agreement "
                          f"{100 * worst['top1_agreement']:.2f}%, max |logit diff| {worst['max_abs_logit_diff']:.3g}); "
                          f"expected 100% and at most {MAX_LOGIT_DIFF:g}; see {out / PARITY}")

    artifacts = [out / TORCHSCRIPT, *onnx_files, out / PARITY]
    manifest = {
        "format_version": 1,
        "source": source or {},
        "model": dict(getattr(model, "config", {})),
        "input": {"name": INPUT_NAME, "shape": ["batch", in_channels, *input_config["size"]], "dtype": "float32",
                  "layout": "NCHW"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(classes)], "dtype": "float32",
                   "meaning": "logits; softmax gives class probabilities"},
        "preprocess": {"from": "uint8 grayscale images (N, H, W)", "size": list(input_config["size"]),
                       "resize": "bilinear, antialias=True, align_corners=False; skipped at the native size",
                       "mean": input_config["mean"], "std": input_config["std"],
                       "formula": "(resize(pixels / 255) - mean) / std"},
        "classes": list(classes),
        "onnx": {"file": ONNX, "opset": OPSET, "external_data": [p.name for p in onnx_files[1:]],
                 "custom_operators": "none: resnet_deploy::bn_add_relu_eval is exported as BatchNormalization "
                                     "(folded into Conv), Add and Relu"},
        "torchscript": {"file": TORCHSCRIPT, "custom_operators": operators, "op_library": {
            "python": "import resnet_deploy before torch.jit.load (it loads resnet_deploy._C)",
            "cpp": "link libresnet_deploy_ops.so (`make cpp` builds it beside resnet_deploy_infer) with "
                   "-Wl,--no-as-needed, or dlopen it, before torch::jit::load; in Python without the package, "
                   "torch.ops.load_library(path) of the same file"}},
        "parity": {"passed": True, "images": report["images"], "source": image_source,
                   "max_abs_logit_diff": max(c["max_abs_logit_diff"] for c in report["checks"]),
                   "batch_sizes": sorted({c["batch_size"] for c in report["checks"]})},
        "versions": _versions(),
        "export_seconds": round(time.perf_counter() - started, 1),
        "sha256": {path.name: sha256(path) for path in artifacts},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {out / MANIFEST}")
    return manifest


def export(source: Union[str, Path], out: Union[str, Path], parity_count: int = 1000,
           data_dir: Optional[Union[str, Path]] = None, log: Callable[[str], None] = lambda line: None
           ) -> Dict[str, Any]:
    """export_model of the model in a run directory or checkpoint file."""
    model, info = load_model(source)
    log(f"exporting {info['checkpoint']} ({info['model']['arch']}, epoch {info['epoch']}, "
        f"input {info['input']['size'][0]}x{info['input']['size'][1]}) to {out}")
    return export_model(model, out, info["input"], info["classes"], parity_count, data_dir,
                        source={"checkpoint": info["checkpoint"], "epoch": info["epoch"]}, log=log)


# -------------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="TorchScript + ONNX + manifest of a trained model, gated on parity",
        description="Write model.torchscript.pt, model.onnx, parity.json and manifest.json into --out. The "
                    "parity gate compares eager, TorchScript and ONNX Runtime logits on test images; when it "
                    "fails the command exits non-zero and no manifest is written.")
    parser.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help="a run directory or checkpoint.pt")
    parser.add_argument("--out", required=True, help="directory for the artifacts")
    parser.add_argument("--parity-images", type=int, default=1000,
                        help="test images the parity gate compares (default: 1000; synthetic when Fashion-MNIST "
                             "is absent)")
    parser.add_argument("--data-dir", help="directory with the Fashion-MNIST idx files (default: as train finds them)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    export(args.source, args.out, args.parity_images, args.data_dir, log=lambda line: print(line, flush=True))
