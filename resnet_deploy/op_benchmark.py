"""Benchmark of the fused operator against the unfused expression, eager and torch.compile'd, at one
activation shape or at every fused site of ResNet-18, and of whole fused vs unfused ResNet-18 steps.

Every figure is a median from torch.utils.benchmark, measured in one run next to its baselines and next to the
machine's memory-bandwidth bound: the bytes the operation must move divided by the bandwidth of a copy that
touches as many distinct bytes as the operation does (its footprint), measured in the same run. Matching the
footprint matters: one 9.4 MB activation copies from the last-level cache, while a training step's six
activations (56 MB) stream from DRAM at a third of that speed.

Eval rows also time PyTorch's own elementwise kernel moving the bound's bytes: relu(x) without a residual,
x + residual with one (the bound's reads and write, an output allocated per call, one dispatch). At the small
sites that kernel, not the bound's copy into a preallocated tensor, is the least an operator called from Python
costs.

Eval steps run inside torch.inference_mode, entered once per timed block of calls, not per call (see
_timing_mode).

Each row also counts the minor page faults per call, because fresh output allocations that the allocator
backs with new pages can cost more than the arithmetic (see resnet_deploy.allocator).
"""
import contextlib
import json
import platform
import re
import resource
import statistics
from dataclasses import asdict, dataclass
from functools import partial, wraps
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils import benchmark

from resnet_deploy import allocator
from resnet_deploy.ops import batch_norm_add_relu

# Tensor passes that must move at the least: eval reads x and residual and writes y; training forward and
# backward together are counted as ten passes of the activation. Without a residual, two passes fewer
# in training (its read in the forward, its gradient's write in the backward) and one fewer in eval.
EVAL_PASSES = 3
TRAIN_PASSES = 10
# Distinct activation-sized tensors each mode touches: x, residual, y; in training also grad_y, grad_x and
# grad_residual. Without a residual, one fewer in eval and two fewer in training.
EVAL_FOOTPRINT = 3
TRAIN_FOOTPRINT = 6
FAULT_COUNT_CALLS = 20
ROUNDS = 5
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclass
class Row:
    shape: List[int]
    memory_format: str
    residual: bool
    mode: str  # "eval forward" or "train forward+backward"
    fused_ms: float
    eager_ms: float
    compile_ms: Optional[float]
    bound_ms: float
    bandwidth_gbs: float  # of the footprint-matched copy behind bound_ms
    fused_faults: float  # minor page faults per call
    eager_faults: float
    builtin_ms: Optional[float] = None  # eval only: relu(x), or x + residual (see the module docstring)

    @property
    def speedup_vs_eager(self) -> float:
        return self.eager_ms / self.fused_ms

    @property
    def eager_vs_bound(self) -> float:
        """The most any implementation running at the bound could gain over eager."""
        return self.eager_ms / self.bound_ms


def interleaved_rounds_ms(steps: Dict[str, Callable[[], object]], min_run_time: float,
                          rounds: int = ROUNDS) -> Dict[str, List[List[float]]]:
    """Milliseconds per call of each step, round by round (each figure one timed call, or the mean of a block of
    calls that torch.utils.benchmark sized): the steps take turns, `rounds` times, min_run_time / rounds each, so
    that a slow spell of a shared machine weighs on every step alike, not on whichever ran then. Each round
    starts one step further along the list, so that no step always runs first."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    timers = {}
    for name, fn in steps.items():
        with _timing_mode(fn):
            fn()  # warm-up (and, for torch.compile, compilation)
        timers[name] = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    per_round: Dict[str, List[List[float]]] = {name: [] for name in steps}
    names = list(timers)
    for round_index in range(rounds):
        start = round_index % len(names)
        for name in names[start:] + names[:start]:
            with _timing_mode(steps[name]):
                times = timers[name].blocked_autorange(min_run_time=min_run_time / rounds).times
            per_round[name].append([t * 1e3 for t in times])
    return per_round


def interleaved_medians_ms(steps: Dict[str, Callable[[], object]], min_run_time: float,
                           rounds: int = ROUNDS) -> Dict[str, float]:
    """Median milliseconds per call of each step over all calls of interleaved_rounds_ms."""
    per_round = interleaved_rounds_ms(steps, min_run_time, rounds)
    return {name: statistics.median(t for calls in runs for t in calls) for name, runs in per_round.items()}


def paired_ratio(numerators: List[float], denominators: List[float], confidence: float = 0.95,
                 resamples: int = 10_000, seed: int = 0) -> Tuple[float, float, float]:
    """The median of numerators[i] / denominators[i], and a percentile-bootstrap confidence interval of it.

    Given the per-round times of two steps timed in the same rounds, each ratio compares the two under the same
    machine conditions, which a ratio of overall medians does not; the interval says whether a difference of a
    few percent stands out from the round-to-round spread."""
    if len(numerators) != len(denominators) or not len(numerators):
        raise ValueError(f"paired_ratio needs as many numerators as denominators, at least one, got "
                         f"{len(numerators)} and {len(denominators)}")
    ratios = np.asarray(numerators, dtype=float) / np.asarray(denominators, dtype=float)
    rng = np.random.default_rng(seed)
    medians = np.median(rng.choice(ratios, size=(resamples, ratios.size)), axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(np.median(ratios)), float(low), float(high)


VERDICTS = ("faster", "slower", "within the noise")


def verdict(speedup_cis: List[Tuple[float, float]]) -> str:
    """What the confidence intervals of one step's speedups over several baselines (baseline time / its time) say
    together: faster or slower only if every interval lies on that side of 1. The baselines are identical model
    instances timed in the same rounds, which can land a few percent apart for a whole run (where their memory
    lies, say) in a way no number of rounds averages away: a speedup over just one of them could be that."""
    if not speedup_cis:
        raise ValueError("verdict needs at least one interval")
    faster, slower, within_the_noise = VERDICTS
    if all(low > 1 for low, _ in speedup_cis):
        return faster
    if all(high < 1 for _, high in speedup_cis):
        return slower
    return within_the_noise


def compare_in_rounds(per_round: Dict[str, List[List[float]]], candidate: str, baseline: str,
                      baseline_again: str) -> dict:
    """The candidate against two identical baselines from interleaved_rounds_ms: median milliseconds per call
    (of the per-round medians), the speedup over each baseline (median of the per-round ratios, with its 95%
    interval), the second baseline's time over the first's ("a_a_ratio", ideally 1.00) and the verdict."""
    medians = {name: [statistics.median(calls) for calls in per_round[name]]
               for name in (candidate, baseline, baseline_again)}
    speedup, speedup_low, speedup_high = paired_ratio(medians[baseline], medians[candidate])
    again, again_low, again_high = paired_ratio(medians[baseline_again], medians[candidate])
    a_a, a_a_low, a_a_high = paired_ratio(medians[baseline_again], medians[baseline])
    return {"rounds": len(medians[candidate]), "candidate_ms": statistics.median(medians[candidate]),
            "baseline_ms": statistics.median(medians[baseline]),
            "baseline_again_ms": statistics.median(medians[baseline_again]),
            "speedup": speedup, "speedup_ci": [speedup_low, speedup_high],
            "speedup_vs_again": again, "speedup_vs_again_ci": [again_low, again_high],
            "verdict": verdict([(speedup_low, speedup_high), (again_low, again_high)]),
            "a_a_ratio": a_a, "a_a_ci": [a_a_low, a_a_high]}


def comparison_line(row: dict, candidate: str, baseline: str) -> str:
    """One log line for a compare_in_rounds result (also given as a row's own fields)."""
    (low, high), (again_low, again_high) = row["speedup_ci"], row["speedup_vs_again_ci"]
    return (f"{candidate} {row['candidate_ms']:8.2f} ms  {baseline} {row['baseline_ms']:8.2f} ms  speedup "
            f"{row['speedup']:.3f}x (95% CI {low:.3f}-{high:.3f}), over the {baseline} again "
            f"{row['speedup_vs_again']:.3f}x ({again_low:.3f}-{again_high:.3f}): {row['verdict']}  "
            f"({baseline} again / {baseline} {row['a_a_ratio']:.3f}x, {row['a_a_ci'][0]:.3f}-{row['a_a_ci'][1]:.3f})")


def footprint_copy(footprint_bytes: int) -> Tuple[Callable[[], object], int]:
    """A float32 copy whose source and destination together take footprint_bytes, and the bytes it moves."""
    src = torch.randn(max(1, footprint_bytes // 8))
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


def faults_per_call(fn: Callable[[], object], calls: int = FAULT_COUNT_CALLS) -> float:
    """Minor page faults per call of fn (in every thread of the process), after a warm-up call."""
    with _timing_mode(fn):
        fn()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def _inputs(shape, memory_format, requires_grad, with_residual=True):
    channels = shape[1]
    x = torch.randn(shape).contiguous(memory_format=memory_format).requires_grad_(requires_grad)
    residual = None
    if with_residual:
        residual = torch.randn(shape).contiguous(memory_format=memory_format).requires_grad_(requires_grad)
    weight = (torch.rand(channels) + 0.5).requires_grad_(requires_grad)
    bias = torch.randn(channels).requires_grad_(requires_grad)
    return x, residual, torch.zeros(channels), torch.ones(channels), weight, bias


def unfused(x, residual, running_mean, running_var, weight, bias, training: bool):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training)
    return F.relu(y if residual is None else y + residual)


def fused(x, residual, running_mean, running_var, weight, bias, training: bool):
    return batch_norm_add_relu(x, residual, running_mean, running_var, weight, bias, training)


def builtin(x, residual, running_mean, running_var, weight, bias, training: bool):
    """PyTorch's own elementwise kernel with the eval bound's traffic (reads x and residual, writes y)."""
    return F.relu(x) if residual is None else x + residual


def _eval_step(fn, args):
    def step():
        return fn(*args, False)
    step.inference_mode = True  # see _timing_mode
    return step


def _timing_mode(step):
    """The grad mode a step runs in: eval steps inside torch.inference_mode, entered once around each warm-up,
    timed block of calls or fault count, as a model's forward enters it once for all of its operators. Entered
    around every call, the context manager took 1.1-1.2 µs per call, about as much as a whole `x + residual`
    step at 1x512x3x3 (1.3 µs): every operator paid it, the bound's copy did not."""
    return torch.inference_mode() if getattr(step, "inference_mode", False) else contextlib.nullcontext()


def _train_step(fn, args):
    x, residual, _, _, weight, bias = args
    grad = torch.randn_like(x)

    inputs = [t for t in (x, residual, weight, bias) if t is not None]

    def step():
        out = fn(*args, True)
        return torch.autograd.grad(out, inputs, grad)
    return step


def measure(shape, memory_format: str, with_compile: bool, min_run_time: float,
            with_residual: bool = True, log=print) -> List[Row]:
    fmt = FORMATS[memory_format]
    activation_bytes = torch.Size(shape).numel() * 4
    compiled = None
    if with_compile:
        # Dynamo's cache of `unfused` is shared by every shape and layout: past its recompile limit (8) it
        # would silently run the expression eagerly, so every shape starts from an empty cache.
        torch._dynamo.reset()
        compiled = torch.compile(unfused, dynamic=False)
    rows = []
    for mode, make_step, passes, footprint, grad in (
            ("eval forward", _eval_step, EVAL_PASSES, EVAL_FOOTPRINT, False),
            ("train forward+backward", _train_step, TRAIN_PASSES, TRAIN_FOOTPRINT, True)):
        if not with_residual:
            passes -= 1 if mode == "eval forward" else 2
            footprint -= 1 if mode == "eval forward" else 2
        copy, copied_bytes = footprint_copy(footprint * activation_bytes)
        args = _inputs(shape, fmt, grad, with_residual)
        steps = {"copy": copy, "fused": make_step(fused, args), "eager": make_step(unfused, args)}
        if compiled is not None:
            steps["compile"] = make_step(compiled, args)
        if mode == "eval forward":
            steps["builtin"] = make_step(builtin, args)
        times: Dict[str, Optional[float]] = {"compile": None, "builtin": None,
                                             **interleaved_medians_ms(steps, min_run_time)}
        bandwidth = copied_bytes / (times["copy"] / 1e3)
        row = Row(list(shape), memory_format, with_residual, mode, times["fused"], times["eager"], times["compile"],
                  passes * activation_bytes / bandwidth * 1e3, bandwidth / 1e9, faults_per_call(steps["fused"]),
                  faults_per_call(steps["eager"]), times["builtin"])
        log(f"  {memory_format:13s} {mode:24s} fused {row.fused_ms:7.3f} ms  eager {row.eager_ms:7.3f} ms  "
            f"compile {row.compile_ms if row.compile_ms is not None else float('nan'):7.3f} ms  "
            + (f"relu or add {row.builtin_ms:7.3f} ms  " if row.builtin_ms is not None else "") +
            f"bound {row.bound_ms:7.3f} ms ({row.bandwidth_gbs:.0f} GB/s)  "
            f"faults/call fused {row.fused_faults:.0f} eager {row.eager_faults:.0f}")
        rows.append(row)
    return rows


def compare_stores(shape, memory_formats, min_run_time: float, rounds: int = 2 * ROUNDS, log=print) -> List[dict]:
    """The fused op with streaming stores for its outputs against the same op with normal stores, interleaved
    in one process (the threshold is switched before every call), for eval forward and training steps."""
    from resnet_deploy import _library

    library = _library.load()
    previous = library.streaming_min_bytes()

    def with_threshold(min_bytes, step):
        @wraps(step)  # keeps the step's grad mode (_timing_mode)
        def call():
            library.set_streaming_min_bytes(min_bytes)
            return step()
        return call

    rows = []
    try:
        for memory_format in memory_formats:
            for mode, make_step, grad in (("eval forward", _eval_step, False),
                                          ("train forward+backward", _train_step, True)):
                step = make_step(fused, _inputs(shape, FORMATS[memory_format], grad))
                times = interleaved_medians_ms({"streaming": with_threshold(0, step),
                                                "normal": with_threshold(-1, step)}, min_run_time, rounds)
                rows.append({"shape": list(shape), "memory_format": memory_format, "mode": mode,
                             "streaming_ms": times["streaming"], "normal_ms": times["normal"]})
                log(f"  {memory_format:13s} {mode:24s} streaming stores {times['streaming']:7.3f} ms  "
                    f"normal stores {times['normal']:7.3f} ms  ({times['normal'] / times['streaming']:.2f}x)")
    finally:
        library.set_streaming_min_bytes(previous)
    return rows


def per_call_costs(shape=(1, 512, 3, 3), min_run_time: float = 1.0, log=print) -> List[dict]:
    """Microseconds per call of every step at a shape too small for its data to matter (by default one sample
    at the 3x3 sites' 512 channels: 18 KB per tensor), which leaves each step's fixed cost: Python, dispatch,
    autograd, allocation and per-channel work.

    At the small ResNet sites this fixed cost is a large part of the bound. The steps are those of the site
    table, next to the bound's own call (one copy into a preallocated tensor) and torch.autograd.grad of a
    single multiplication, the least any training step through autograd pays."""
    activation_bytes = torch.Size(shape).numel() * 4
    bound_copy, _ = footprint_copy(2 * activation_bytes)
    leaf = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    eval_args = _inputs(shape, torch.contiguous_format, requires_grad=False)
    train_args = _inputs(shape, torch.contiguous_format, requires_grad=True)
    steps = {
        ("copy", "the bound's call"): bound_copy,
        ("autograd", "grad of x * 2"): lambda: torch.autograd.grad(leaf * 2, [leaf], grad),
        ("eval forward", "fused"): _eval_step(fused, eval_args),
        ("eval forward", "eager"): _eval_step(unfused, eval_args),
        ("train forward+backward", "fused"): _train_step(fused, train_args),
        ("train forward+backward", "eager"): _train_step(unfused, train_args),
    }
    times = interleaved_medians_ms({f"{mode}: {name}": step for (mode, name), step in steps.items()}, min_run_time)
    rows = [{"shape": list(shape), "mode": mode, "step": name, "us": times[f"{mode}: {name}"] * 1e3}
            for mode, name in steps]
    log(f"per-call cost at {'x'.join(map(str, shape))} (median µs per call):")
    for row in rows:
        log(f"  {row['mode']:24s} {row['step']:16s} {row['us']:8.1f} µs")
    return rows


def environment() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "malloc": allocator.status()}


def format_table(rows: List[Row]) -> str:
    lines = ["| shape | layout | residual | mode | fused ms | eager ms | compile ms | relu or add ms | bound ms | "
             "fused vs eager | fused / bound | eager / bound | faults/call fused, eager |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def optional_ms(ms: Optional[float]) -> str:
        return f"{ms:.3f}" if ms is not None else "-"

    for r in rows:
        lines.append(f"| {'x'.join(map(str, r.shape))} | {r.memory_format} | {'yes' if r.residual else 'no'} | "
                     f"{r.mode} | {r.fused_ms:.3f} | {r.eager_ms:.3f} | {optional_ms(r.compile_ms)} | "
                     f"{optional_ms(r.builtin_ms)} | {r.bound_ms:.3f} | {r.speedup_vs_eager:.2f}x | "
                     f"{r.fused_ms / r.bound_ms:.2f}x | {r.eager_vs_bound:.2f}x | "
                     f"{r.fused_faults:.0f}, {r.eager_faults:.0f} |")
    return "\n".join(lines)


def resnet18_fused_sites(image_size: int = 96, batch_size: int = 64) -> List[Tuple[Tuple[int, ...], bool, int]]:
    """(input shape, has residual, how many) of every BatchNormAddReLU2d call in ResNet-18's forward."""
    from resnet_deploy.models import resnet18
    from resnet_deploy.nn import BatchNormAddReLU2d

    model = resnet18(fused=True).eval()
    sites: Dict[Tuple[Tuple[int, ...], bool], int] = {}

    def record(module, args):
        key = (tuple(args[0].shape), len(args) > 1 and args[1] is not None)
        sites[key] = sites.get(key, 0) + 1

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, BatchNormAddReLU2d)]
    with torch.inference_mode():
        model(torch.zeros(batch_size, 1, image_size, image_size))
    for hook in hooks:
        hook.remove()
    return [(shape, residual, count) for (shape, residual), count in sites.items()]


def run(shapes, memory_formats, with_compile=True, min_run_time=1.0, json_path=None, log=print,
        residual_flags=None) -> dict:
    """Times every shape (with the matching residual flag, default with residual) in every layout."""
    results = []
    residual_flags = residual_flags or [True] * len(shapes)
    for shape, with_residual in zip(shapes, residual_flags):
        log(f"{'x'.join(map(str, shape))} float32, {'with' if with_residual else 'without'} residual:")
        for memory_format in memory_formats:
            results += measure(shape, memory_format, with_compile, min_run_time, with_residual, log)
    report = {"env": environment(), "results": [dict(asdict(r), speedup_vs_eager=r.speedup_vs_eager,
                                                     eager_vs_bound=r.eager_vs_bound) for r in results]}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    log(format_table(results))
    return report


# Top-level operators of the normalization sites, by profiler name: the fused op, or unfused BatchNorm,
# residual add and ReLU (in place or not).
_SITE_OPS = re.compile(r"^resnet_deploy::|batch_norm|^aten::(add|relu|clamp_min)_?$")
BREAKDOWN = ("sites", "convolution", "max_pool", "other")


def op_category(name: str) -> str:
    """Which part of a ResNet forward a top-level profiled operator belongs to (one of BREAKDOWN)."""
    if _SITE_OPS.search(name):
        return "sites"
    if "conv" in name:
        return "convolution"
    if "max_pool" in name:
        return "max_pool"
    return "other"


def forward_breakdown_ms(model, images, forwards: int = 5) -> Dict[str, float]:
    """Milliseconds per inference forward spent in each category of operators, and their sum as "total": the
    CPU time (torch.profiler, calling thread) of every top-level operator, with all it calls inside it."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(forwards):
            model(images)
    parts = dict.fromkeys(BREAKDOWN, 0.0)
    for event in prof.events():
        if event.cpu_parent is None:
            parts[op_category(event.name)] += event.cpu_time_total / 1e3 / forwards
    return {**parts, "total": sum(parts.values())}


def end_to_end(image_size: int = 96, train_batch: int = 64, eval_batches=(1, 8, 64), min_run_time: float = 20.0,
               memory_format: str = "nchw", rounds: int = 100, train_rounds: int = 40, log=print) -> dict:
    """Fused vs unfused ResNet-18 with the same weights: an SGD training step and eval inference.

    The fused sites are a few percent of a step (convolutions dominate), so the difference is small next to a
    shared machine's noise. The models take turns, min_run_time seconds per model for the training step in
    train_rounds rounds (one or two timed steps of each model per round), and half of that per model and batch size for
    eval in `rounds` rounds: short rounds, so that the models of one round run under the same conditions. Each
    row gives the median of each model's per-round medians, and the speedup as the median of the per-round
    ratios, with a 95% bootstrap interval (paired_ratio).

    A second unfused model with the same weights is timed in the same rounds: its time over the first's
    ("a_a_ratio", ideally 1.00, with its interval) is how far two identical models land apart in this run, the
    noise floor against which a speedup of a few percent is to be read. "verdict" says faster (or slower) only if
    the fused model beat (or lost to) both unfused models, each by an interval that excludes 1. Each eval row also
    profiles a few forwards of both models to say where the time goes (forward_breakdown_ms): the normalization
    sites (fused op, or BatchNorm, add and ReLU), convolutions, max-pooling and the rest."""
    from resnet_deploy.models import resnet18

    fmt = FORMATS[memory_format]
    models = {"fused": resnet18(fused=True), "unfused": resnet18(fused=False), "unfused again": resnet18(fused=False)}
    models["unfused"].load_state_dict(models["fused"].state_dict())
    models["unfused again"].load_state_dict(models["fused"].state_dict())
    for model in models.values():
        model.to(memory_format=fmt)
    rows = []

    def add(mode, batch, per_round):
        row = compare_in_rounds(per_round, "fused", "unfused", "unfused again")
        rows.append({"mode": mode, "batch_size": batch, "rounds": row["rounds"], "fused_ms": row["candidate_ms"],
                     "unfused_ms": row["baseline_ms"], "unfused_again_ms": row["baseline_again_ms"],
                     **{k: row[k] for k in ("speedup", "speedup_ci", "speedup_vs_again", "speedup_vs_again_ci",
                                            "verdict", "a_a_ratio", "a_a_ci")}})
        log(f"  {mode:12s} batch {batch:3d}: " + comparison_line(row, "fused", "unfused"))

    images = torch.randn(train_batch, 1, image_size, image_size).contiguous(memory_format=fmt)
    labels = torch.randint(0, 10, (train_batch,))
    train_steps = {}
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def train_step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
        train_steps[name] = train_step
    add("train step", train_batch, interleaved_rounds_ms(train_steps, min_run_time, train_rounds))

    for model in models.values():
        model.eval()
    for batch in eval_batches:
        batch_images = images[:batch].contiguous(memory_format=fmt)

        def infer(model):
            with torch.inference_mode():
                return model(batch_images)
        add("eval", batch, interleaved_rounds_ms({name: partial(infer, model) for name, model in models.items()},
                                                 min_run_time / 2, rounds))
        breakdown = {name: forward_breakdown_ms(models[name], batch_images) for name in ("fused", "unfused")}
        rows[-1]["breakdown_ms"] = breakdown
        log("    per forward (profiled), fused / unfused: " + ", ".join(
            f"{part} {breakdown['fused'][part]:.2f} / {breakdown['unfused'][part]:.2f} ms"
            for part in (*BREAKDOWN, "total")))
    return {"image_size": image_size, "memory_format": memory_format, "results": rows}
