"""Benchmark of the fused operator against the unfused expression, eager and torch.compile'd.

Every figure is a median from torch.utils.benchmark, measured in one run next to its baselines and next to the
machine's memory-bandwidth bound: the bytes the operation must move divided by the copy bandwidth measured
on a tensor of the same size in the same run.
"""
import json
import platform
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from resnet_deploy.ops import batch_norm_add_relu

# Tensor passes that must move at the least: eval reads x and residual and writes y; training forward and
# backward together are counted as ten passes of the activation.
EVAL_PASSES = 3
TRAIN_PASSES = 10
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass
class Row:
    shape: List[int]
    memory_format: str
    mode: str  # "eval forward" or "train forward+backward"
    fused_ms: float
    eager_ms: float
    compile_ms: Optional[float]
    bound_ms: float

    @property
    def speedup_vs_eager(self) -> float:
        return self.eager_ms / self.fused_ms


def median_ms(fn: Callable[[], object], min_run_time: float) -> float:
    fn()  # warm-up (and, for torch.compile, compilation)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def copy_bandwidth(numel: int, min_run_time: float) -> float:
    """Bytes per second of a same-size float32 copy (read + write counted)."""
    src = torch.randn(numel)
    dst = torch.empty_like(src)
    seconds = median_ms(lambda: dst.copy_(src), min_run_time) / 1e3
    return 2 * src.numel() * src.element_size() / seconds


def _inputs(shape, memory_format, requires_grad):
    channels = shape[1]
    x = torch.randn(shape).contiguous(memory_format=memory_format).requires_grad_(requires_grad)
    residual = torch.randn(shape).contiguous(memory_format=memory_format).requires_grad_(requires_grad)
    weight = (torch.rand(channels) + 0.5).requires_grad_(requires_grad)
    bias = torch.randn(channels).requires_grad_(requires_grad)
    return x, residual, torch.zeros(channels), torch.ones(channels), weight, bias


def unfused(x, residual, running_mean, running_var, weight, bias, training: bool):
    return F.relu(F.batch_norm(x, running_mean, running_var, weight, bias, training) + residual)


def fused(x, residual, running_mean, running_var, weight, bias, training: bool):
    return batch_norm_add_relu(x, residual, running_mean, running_var, weight, bias, training)


def _eval_step(fn, args):
    def step():
        with torch.inference_mode():
            return fn(*args, False)
    return step


def _train_step(fn, args):
    x, residual, _, _, weight, bias = args
    grad = torch.randn_like(x)

    def step():
        out = fn(*args, True)
        return torch.autograd.grad(out, (x, residual, weight, bias), grad)
    return step


def measure(shape, memory_format: str, bandwidth: float, with_compile: bool, min_run_time: float) -> List[Row]:
    fmt = FORMATS[memory_format]
    activation_bytes = torch.Size(shape).numel() * 4
    compiled = torch.compile(unfused, dynamic=False) if with_compile else None
    rows = []
    for mode, make_step, passes, grad in (("eval forward", _eval_step, EVAL_PASSES, False),
                                          ("train forward+backward", _train_step, TRAIN_PASSES, True)):
        args = _inputs(shape, fmt, grad)
        times: Dict[str, Optional[float]] = {}
        for name, fn in (("fused", fused), ("eager", unfused), ("compile", compiled)):
            times[name] = median_ms(make_step(fn, args), min_run_time) if fn is not None else None
        rows.append(Row(list(shape), memory_format, mode, times["fused"], times["eager"], times["compile"],
                        passes * activation_bytes / bandwidth * 1e3))
    return rows


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def format_table(rows: List[Row]) -> str:
    lines = ["| shape | layout | mode | fused ms | eager ms | compile ms | bound ms | fused vs eager | fused / bound |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        compile_ms = f"{r.compile_ms:.3f}" if r.compile_ms is not None else "-"
        lines.append(f"| {'x'.join(map(str, r.shape))} | {r.memory_format} | {r.mode} | {r.fused_ms:.3f} | "
                     f"{r.eager_ms:.3f} | {compile_ms} | {r.bound_ms:.3f} | {r.speedup_vs_eager:.2f}x | "
                     f"{r.fused_ms / r.bound_ms:.2f}x |")
    return "\n".join(lines)


def run(shapes, memory_formats, with_compile=True, min_run_time=1.0, json_path=None, log=print) -> dict:
    results = []
    for shape in shapes:
        bandwidth = copy_bandwidth(torch.Size(shape).numel(), min_run_time)
        log(f"copy bandwidth at {'x'.join(map(str, shape))} float32: {bandwidth / 1e9:.1f} GB/s")
        for memory_format in memory_formats:
            for row in measure(shape, memory_format, bandwidth, with_compile, min_run_time):
                results.append(row)
                log(f"  {memory_format:13s} {row.mode:24s} fused {row.fused_ms:7.3f} ms  eager {row.eager_ms:7.3f} ms  "
                    f"compile {row.compile_ms if row.compile_ms is not None else float('nan'):7.3f} ms  "
                    f"bound {row.bound_ms:7.3f} ms")
    report = {"env": environment(), "results": [dict(asdict(r), speedup_vs_eager=r.speedup_vs_eager)
                                                for r in results]}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    log(format_table(results))
    return report
