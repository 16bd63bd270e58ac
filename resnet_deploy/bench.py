"""`resnet-deploy bench ARTIFACT_DIR --out DIR`: latency and throughput of every backend, batch size and thread
setting, with the fused-operator benchmark beside them.

Method, for each backend and thread setting: load a predictor (load_ms), then for each batch size call it
once (first_call_ms: for torch.compile this includes compiling), warm up for `warmup_s`, and time single
calls on one pre-processed batch (seeded random images) until the median is stable: after `min_runs` runs
and `min_time_s`, the medians of the first and second half of the runs differ by at most `tolerance`, or
`max_time_s` (once `min_runs` ran) or `max_runs` ran out (then `stable` says whether the halves agree). Only predict() is timed, not pre-processing.
Dynamo's in-memory cache is reset before every torch.compile load; Inductor's on-disk cache is kept, so a
repeated run compiles faster than a fresh machine does.

Writes into DIR: bench.json, bench.md (tables) and bench.png (latency and throughput against batch size).

bench.json, schema_version 1:
  schema_version  1
  env             the fingerprint: cpu, cpu_capability, cores, available_cores, memory_gb, platform, python,
                  versions {torch, onnxruntime, onnx, numpy, resnet_deploy}, op_library (build info),
                  git_commit, git_dirty, threads (the settings), torch_interop_threads, thread_env
                  (OMP_NUM_THREADS, MKL_NUM_THREADS, ...), cuda_available, baseline_rss_mb,
                  malloc (resnet_deploy.allocator.status()), timestamp (UTC)
  artifact        dir, model (the manifest's), input (shape without the batch axis)
  settings        backends, batch_sizes, threads, warmup_s, min_time_s, max_time_s, min_runs, max_runs, tolerance
  results         one per backend x threads x batch size that ran:
                    backend, batch_size, threads, device         what ran
                    p50_ms, p90_ms, p99_ms, mean_ms, std_ms,     the timed calls (p99 of few runs is near the max)
                    min_ms, max_ms, runs, stable
                    throughput                                   images/s: batch_size / mean latency
                    first_call_ms                                the first call at this batch size after loading
                    load_ms                                      loading this predictor (the same for its batch sizes)
                    peak_rss_mb                                  the process's peak resident memory while this
                                                                 predictor was loaded and run (Python and libraries
                                                                 included; env.baseline_rss_mb is the floor)
                    rss_growth_mb                                that peak less the resident memory before loading:
                                                                 what the predictor added (memory freed earlier
                                                                 in the process may be reused, so a lower bound)
  errors          [{backend, threads, error, traceback}] of predictors that failed to load or run (the others
                  still run), or of the fused comparison (backend "eager-fused against eager"); traceback: the
                  failure's traceback, at most 5 frames
  fused_vs_unfused  null, or (when eager and eager-fused both ran) one row per thread setting x batch size of the
                  eager-fused model against two loads of the eager one, timed in turns (fused_vs_unfused()):
                    threads, batch_size, rounds, candidate_ms (eager-fused), baseline_ms (eager),
                    baseline_again_ms (its second load), speedup and speedup_ci (eager / eager-fused, with the
                    95% interval), speedup_vs_again and speedup_vs_again_ci, a_a_ratio and a_a_ci (second load /
                    first), verdict ("faster", "slower" or "within the noise")
  op_benchmark    op_benchmark.run's report (fused operator vs eager vs torch.compile), or null
"""
import argparse
import dataclasses
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import time
import traceback
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import resnet_deploy
from resnet_deploy import allocator, outputs, runtime

SCHEMA_VERSION = 1
FUSED_COMPARISON_ROUNDS = 40
JSON_FILE, MARKDOWN_FILE, PLOT_FILE = "bench.json", "bench.md", "bench.png"
DEFAULT_BATCH_SIZES = (1, 8, 64)
RESULT_FIELDS = {  # name: type, the fields every result has (checked by check_schema)
    "backend": str, "batch_size": int, "threads": int, "device": str, "p50_ms": float, "p90_ms": float,
    "p99_ms": float, "mean_ms": float, "std_ms": float, "min_ms": float, "max_ms": float, "runs": int,
    "stable": bool, "throughput": float, "first_call_ms": float, "load_ms": float, "peak_rss_mb": float,
    "rss_growth_mb": float}


def default_threads() -> List[int]:
    """One core, and every available core: the two ends of the trade-off."""
    return sorted({1, runtime.available_cores()})


# ------------------------------------------------------------------------------------------ environment
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _proc_status_mb(key: str) -> Optional[float]:
    """VmRSS / VmHWM of this process in MB, from /proc (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def environment(threads: Sequence[int]) -> Dict[str, Any]:
    import onnx
    import onnxruntime

    from resnet_deploy import _library

    memory = None
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    commit = _git("rev-parse", "HEAD")
    return {
        "cpu": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
        "available_cores": runtime.available_cores(), "memory_gb": memory, "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
                     "numpy": np.__version__, "resnet_deploy": resnet_deploy.__version__},
        "op_library": {k: v for k, v in _library.build_info().items() if k != "path"},
        "git_commit": commit, "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")) if commit else None,
        "threads": list(threads), "torch_interop_threads": torch.get_num_interop_threads(),
        "thread_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
        "cuda_available": torch.cuda.is_available(), "onnxruntime_providers": onnxruntime.get_available_providers(),
        "baseline_rss_mb": _proc_status_mb("VmRSS"), "malloc": allocator.status(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------- timing
def _halves_agree(times: List[float], tolerance: float) -> bool:
    half = len(times) // 2
    first, second = statistics.median(times[:half]), statistics.median(times[half:])
    return abs(first - second) <= tolerance * min(first, second)


def time_calls(call: Callable[[], Any], warmup_s: float, min_time_s: float, max_time_s: float,
               min_runs: int, max_runs: int, tolerance: float) -> Tuple[List[float], bool]:
    """(seconds of each timed call, whether the median settled) after warming up.

    At least min_runs calls (unless max_runs is smaller), then until stable after min_time_s, or until
    max_time_s or max_runs."""
    started, warm = time.perf_counter(), 0
    while warm < 2 or time.perf_counter() - started < warmup_s:
        call()
        warm += 1
    times, next_check = [], min_runs
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - started
        if len(times) >= max_runs or (elapsed >= max_time_s and len(times) >= min_runs):
            return times, len(times) >= 4 and _halves_agree(times, tolerance)
        if len(times) >= next_check and elapsed >= min_time_s:
            if _halves_agree(times, tolerance):
                return times, True
            next_check = int(len(times) * 1.25) + 1  # medians cost a sort: check now and then


def summarize(times: List[float], batch_size: int) -> Dict[str, Any]:
    ms = np.asarray(times) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(ms.mean()),
            "std_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0, "min_ms": float(ms.min()),
            "max_ms": float(ms.max()), "runs": len(ms), "throughput": float(batch_size / (ms.mean() / 1e3))}


# ----------------------------------------------------------------------------------------------- bench
def _check_settings(backends, batch_sizes, threads, min_time_s, max_time_s) -> None:
    unknown = [b for b in backends if b not in runtime.BACKENDS]
    if unknown or not backends:
        raise ValueError(f"unknown backend(s) {', '.join(unknown) or '(none given)'}; expected some of "
                         f"{', '.join(runtime.BACKENDS)}")
    if not batch_sizes or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in batch_sizes):
        raise ValueError(f"every batch size must be a positive integer, got {list(batch_sizes)}")
    for value in threads:
        runtime.check_threads(value)
    for name, values in (("backend", backends), ("batch size", batch_sizes), ("thread setting", threads)):
        repeated = [str(v) for v in sorted({v for v in values if list(values).count(v) > 1})]
        if repeated:
            raise ValueError(f"{name} {', '.join(repeated)} given more than once; expected each once")
    if not 0 <= min_time_s <= max_time_s:
        raise ValueError(f"the time budget needs 0 <= min time <= max time, got {min_time_s} and {max_time_s}")


def check_options(options: Dict[str, Any]) -> None:
    """Raise what bench(artifact_dir, out, **options) would raise for its settings, before any work."""
    given = {**{name: parameter.default for name, parameter in inspect.signature(bench).parameters.items()
                if parameter.default is not inspect.Parameter.empty}, **options}
    _check_settings(given["backends"], given["batch_sizes"], list(given["threads"] or default_threads()),
                    given["min_time_s"], given["max_time_s"])


def bench(artifact_dir: Union[str, Path], out: Union[str, Path], backends: Sequence[str] = runtime.BACKENDS,
          batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, threads: Optional[Sequence[int]] = None,
          warmup_s: float = 0.3, min_time_s: float = 1.0, max_time_s: float = 3.0, min_runs: int = 10,
          max_runs: int = 10_000, tolerance: float = 0.05, op_benchmark: bool = True, seed: int = 0,
          log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Measure, write bench.json / bench.md / bench.png into out, and return the report (schema above)."""
    threads = list(threads or default_threads())
    _check_settings(backends, batch_sizes, threads, min_time_s, max_time_s)
    manifest = runtime.read_manifest(artifact_dir)
    out = outputs.output_directory(out)
    settings = {"backends": list(backends), "batch_sizes": list(batch_sizes), "threads": threads,
                "warmup_s": warmup_s, "min_time_s": min_time_s, "max_time_s": max_time_s, "min_runs": min_runs,
                "max_runs": max_runs, "tolerance": tolerance}
    report = {"schema_version": SCHEMA_VERSION, "env": environment(threads),
              "artifact": {"dir": str(artifact_dir), "model": manifest["model"],
                           "input": manifest["input"]["shape"][1:]},
              "settings": settings, "results": [], "errors": [], "fused_vs_unfused": None, "op_benchmark": None}
    images = np.random.default_rng(seed).integers(0, 256, (max(batch_sizes), *manifest["preprocess"]["size"]),
                                                  dtype=np.uint8)
    log(f"benchmarking {', '.join(backends)} at batch sizes {', '.join(map(str, batch_sizes))} and "
        f"{', '.join(map(str, threads))} thread(s) on {report['env']['cpu']}")
    for backend in backends:
        for n_threads in threads:
            try:
                report["results"] += _bench_predictor(artifact_dir, backend, n_threads, images, batch_sizes,
                                                      settings, log)
            except Exception as error:  # one broken backend must not hide the others' figures
                log(f"{backend} with {n_threads} thread(s) FAILED: {type(error).__name__}: {error}")
                report["errors"].append({"backend": backend, "threads": n_threads,
                                         "error": f"{type(error).__name__}: {error}",
                                         "traceback": traceback.format_exc(limit=5)})
            gc.collect()

    ran = {(r["backend"], r["threads"]) for r in report["results"]}
    compared_threads = [n for n in threads if {("eager", n), ("eager-fused", n)} <= ran]
    if compared_threads:
        report["fused_vs_unfused"] = []
        log(f"eager-fused against eager, in {FUSED_COMPARISON_ROUNDS} interleaved rounds:")
    for n_threads in compared_threads:
        try:
            report["fused_vs_unfused"] += fused_vs_unfused(artifact_dir, images, batch_sizes, n_threads,
                                                           2 * min_time_s, log)
        except Exception as error:  # the figures so far are kept and written
            log(f"eager-fused against eager with {n_threads} thread(s) FAILED: {type(error).__name__}: {error}")
            report["errors"].append({"backend": "eager-fused against eager", "threads": n_threads,
                                     "error": f"{type(error).__name__}: {error}",
                                     "traceback": traceback.format_exc(limit=5)})
        gc.collect()
    if op_benchmark:
        report["op_benchmark"] = run_op_benchmark(manifest, max(batch_sizes), log)
    check_schema(report)
    (out / JSON_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (out / MARKDOWN_FILE).write_text(markdown(report))
    plot(report, out / PLOT_FILE)
    log(results_table(report))
    log(f"wrote {out / JSON_FILE}, {out / MARKDOWN_FILE} and {out / PLOT_FILE}")
    return report


def _bench_predictor(artifact_dir, backend: str, threads: int, images: np.ndarray, batch_sizes: Sequence[int],
                     settings: Dict[str, Any], log: Callable[[str], None]) -> List[Dict[str, Any]]:
    if backend == "torch.compile":
        torch._dynamo.reset()  # compile from scratch, as a new process would, not from the last load's cache
    _reset_peak_rss()
    before = _proc_status_mb("VmRSS") or 0.0
    started = time.perf_counter()
    predictor = runtime.load(artifact_dir, backend, threads=threads)
    load_ms = (time.perf_counter() - started) * 1e3
    rows = []
    for batch_size in batch_sizes:
        batch = predictor.preprocess(images[:batch_size])
        started = time.perf_counter()
        predictor.predict(batch)
        first_call_ms = (time.perf_counter() - started) * 1e3
        times, stable = time_calls(lambda: predictor.predict(batch), settings["warmup_s"], settings["min_time_s"],
                                   settings["max_time_s"], settings["min_runs"], settings["max_runs"],
                                   settings["tolerance"])
        row = {"backend": backend, "batch_size": batch_size, "threads": threads, "device": predictor.device,
               **summarize(times, batch_size), "stable": stable, "first_call_ms": first_call_ms, "load_ms": load_ms}
        rows.append(row)
        log(f"  {backend:13s} threads {threads}  batch {batch_size:3d}  p50 {row['p50_ms']:8.2f} ms  "
            f"p90 {row['p90_ms']:8.2f} ms  {row['throughput']:8.0f} img/s  first call {first_call_ms:8.0f} ms  "
            f"({row['runs']} runs{'' if stable else ', not stable'})")
    peak = _proc_status_mb("VmHWM") or 0.0
    for row in rows:
        row.update(peak_rss_mb=peak, rss_growth_mb=max(0.0, peak - before))
    del predictor
    return rows


def fused_vs_unfused(artifact_dir, images: np.ndarray, batch_sizes: Sequence[int], n_threads: int,
                     seconds_per_model: float, log: Callable[[str], None],
                     rounds: int = FUSED_COMPARISON_ROUNDS) -> List[Dict[str, Any]]:
    """Does the fused operator make the eager model faster here? The rows above time each predictor alone, one
    after another, so a slow spell of the machine lands on whichever ran then, and a few percent either way
    says nothing. Here the eager-fused model and two loads of the eager one take turns on the same batch, in
    `rounds` rounds of seconds_per_model / rounds each, with n_threads threads, and the fused model counts as
    faster only if it beat both loads, each by a 95% interval above 1 (op_benchmark.compare_in_rounds)."""
    from resnet_deploy import op_benchmark

    rows = []
    predictors = {"eager-fused": runtime.load(artifact_dir, "eager-fused", threads=n_threads),
                  "eager": runtime.load(artifact_dir, "eager", threads=n_threads),
                  "eager again": runtime.load(artifact_dir, "eager", threads=n_threads)}
    for batch_size in batch_sizes:
        batch = predictors["eager"].preprocess(images[:batch_size])
        per_round = op_benchmark.interleaved_rounds_ms(
            {name: partial(predictor.predict, batch) for name, predictor in predictors.items()},
            seconds_per_model, rounds)
        row = op_benchmark.compare_in_rounds(per_round, "eager-fused", "eager", "eager again")
        rows.append({"threads": n_threads, "batch_size": batch_size, **row})
        log(f"  threads {n_threads}  batch {batch_size:3d}: " +
            op_benchmark.comparison_line(row, "eager-fused", "eager"))
    return rows


def run_op_benchmark(manifest: Dict[str, Any], batch_size: int, log: Callable[[str], None]) -> Dict[str, Any]:
    """op_benchmark.run at the model's largest fused site with a residual (a block of the first stage)."""
    from resnet_deploy import op_benchmark

    sites = op_benchmark.resnet18_fused_sites(manifest["preprocess"]["size"][0], batch_size)
    shape = max((shape for shape, residual, _ in sites if residual), key=lambda s: int(np.prod(s)))
    torch.set_num_threads(runtime.available_cores())
    log(f"fused operator benchmark at {'x'.join(map(str, shape))} ({torch.get_num_threads()} threads)")
    return op_benchmark.run([shape], ["nchw"], with_compile=True, min_run_time=0.5, log=log)


# ---------------------------------------------------------------------------------------------- schema
def check_schema(report: Dict[str, Any]) -> None:
    """Raise ValueError naming the first field of report that does not follow the schema above."""
    for key, kind in (("schema_version", int), ("env", dict), ("artifact", dict), ("settings", dict),
                      ("results", list), ("errors", list)):
        if not isinstance(report.get(key), kind):
            raise ValueError(f"bench report field {key!r} is {report.get(key)!r}; expected a {kind.__name__}")
    for key in ("cpu", "cores", "versions", "git_commit", "threads", "timestamp"):
        if key not in report["env"]:
            raise ValueError(f"bench report env lacks {key!r}; expected the environment fingerprint")
    comparison = report.get("fused_vs_unfused")
    if comparison is not None and not (isinstance(comparison, list) and all(map(_is_comparison_row, comparison))):
        raise ValueError("bench report field 'fused_vs_unfused' must be null or a list of comparison rows, each "
                         f"with {', '.join(COMPARISON_FIELDS)}, intervals as [low, high] and a verdict")
    for index, row in enumerate(report["results"]):
        for key, kind in RESULT_FIELDS.items():
            value = row.get(key)
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if kind is float:
                ok = _is_finite_number(value)
            if not ok:
                raise ValueError(f"bench result {index} field {key!r} is {value!r}; expected a {kind.__name__}")


COMPARISON_FIELDS = ("threads", "batch_size", "rounds", "candidate_ms", "baseline_ms", "baseline_again_ms", "speedup",
                     "speedup_ci", "speedup_vs_again", "speedup_vs_again_ci", "a_a_ratio", "a_a_ci", "verdict")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def _is_comparison_row(row: Any) -> bool:
    from resnet_deploy.op_benchmark import VERDICTS

    def interval(value):
        return (isinstance(value, list) and len(value) == 2 and all(map(_is_finite_number, value))
                and value[0] <= value[1])
    return (isinstance(row, dict) and all(key in row for key in COMPARISON_FIELDS)
            and all(_is_finite_number(row[key]) for key in COMPARISON_FIELDS
                    if not key.endswith("_ci") and key != "verdict")
            and all(interval(row[key]) for key in ("speedup_ci", "speedup_vs_again_ci", "a_a_ci"))
            and row["verdict"] in VERDICTS)


def load_report(path: Union[str, Path]) -> Dict[str, Any]:
    """A bench.json, checked against the schema."""
    report = json.loads(Path(path).read_text())
    check_schema(report)
    return report


# ----------------------------------------------------------------------------------- tables and plot
def _ordered(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    order = {name: i for i, name in enumerate(runtime.BACKENDS)}
    return sorted(report["results"], key=lambda r: (r["threads"], r["batch_size"], order.get(r["backend"], 99)))


def results_table(report: Dict[str, Any]) -> str:
    """The latency table in markdown; `vs eager` is the eager backend's p50 over this one's (same batch, threads)."""
    eager = {(r["threads"], r["batch_size"]): r["p50_ms"] for r in report["results"] if r["backend"] == "eager"}
    lines = ["| backend | threads | batch | p50 ms | p90 ms | p99 ms | mean ± std ms | images/s | vs eager | "
             "first call ms | load ms | peak RSS MB (+growth) | runs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in _ordered(report):
        reference = eager.get((r["threads"], r["batch_size"]))
        speedup = f"{reference / r['p50_ms']:.2f}x" if reference else "-"
        lines.append(f"| {r['backend']} | {r['threads']} | {r['batch_size']} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} | {r['mean_ms']:.2f} ± {r['std_ms']:.2f} | {r['throughput']:.0f} | {speedup} | "
                     f"{r['first_call_ms']:.0f} | {r['load_ms']:.0f} | {r['peak_rss_mb']:.0f} (+{r['rss_growth_mb']:.0f}) | "
                     f"{r['runs']}{'' if r['stable'] else ' (unstable)'} |")
    for e in report["errors"]:
        lines.append(f"| {e['backend']} | {e['threads']} | - | failed: {e['error'][:120]} | | | | | | | | | |")
    return "\n".join(lines)


def fastest(report: Dict[str, Any]) -> str:
    """One line per thread setting: the backend with the lowest p50 at each batch size."""
    lines = []
    for n_threads in sorted({r["threads"] for r in report["results"]}):
        best = []
        for batch_size in sorted({r["batch_size"] for r in report["results"]}):
            rows = [r for r in report["results"] if r["threads"] == n_threads and r["batch_size"] == batch_size]
            if rows:
                top = min(rows, key=lambda r: r["p50_ms"])
                best.append(f"batch {batch_size}: {top['backend']} ({top['p50_ms']:.2f} ms)")
        lines.append(f"- fastest with {n_threads} thread(s): {'; '.join(best)}")
    return "\n".join(lines)


def op_table(op_report: Dict[str, Any]) -> str:
    from resnet_deploy import op_benchmark

    # The JSON adds derived columns; reports from before a column was added lack it (its default then applies).
    names = [field.name for field in dataclasses.fields(op_benchmark.Row)]
    return op_benchmark.format_table([op_benchmark.Row(**{k: r[k] for k in names if k in r})
                                      for r in op_report["results"]])


def fused_table(report: Dict[str, Any]) -> str:
    """The eager-fused against eager comparison in markdown (fused_vs_unfused), or "" without one."""
    rows = report.get("fused_vs_unfused")
    if not rows:
        return ""

    def interval(low_high):
        return f"{low_high[0]:.3f}-{low_high[1]:.3f}"
    lines = ["| threads | batch | eager-fused ms | eager ms | speedup (95% CI) | over a second eager load | "
             "A/A | verdict |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['batch_size']} | {r['candidate_ms']:.2f} | {r['baseline_ms']:.2f} | "
                     f"{r['speedup']:.3f}x ({interval(r['speedup_ci'])}) | {r['speedup_vs_again']:.3f}x "
                     f"({interval(r['speedup_vs_again_ci'])}) | {r['a_a_ratio']:.3f}x ({interval(r['a_a_ci'])}) | "
                     f"{r['verdict']} |")
    return "\n".join(lines)


FUSED_TABLE_INTRO = ("The fused eager model against the unfused one, timed in turns on the same batch with a second "
                     "load of the unfused model (A/A: its time over the first's): the speedup is the median of the "
                     "per-round ratios, and counts as faster only if its 95% interval over both loads lies above 1.\n")


def environment_line(env: Dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    commit = (env["git_commit"] or "unknown")[:10] + (" (modified)" if env.get("git_dirty") else "")
    return (f"{env['cpu']} ({env['cpu_capability']}), {env['available_cores']} of {env['cores']} cores available, "
            f"{env['memory_gb']} GB; {versions}; commit {commit}; {env['timestamp']}")


def markdown(report: Dict[str, Any]) -> str:
    s = report["settings"]
    text = [f"# Inference latency and throughput\n",
            f"Environment: {environment_line(report['env'])}.\n",
            f"Each row: one predictor call on a batch of pre-processed images, timed after a "
            f"{s['warmup_s']} s warm-up until the median settled (±{100 * s['tolerance']:.0f}%, "
            f"{s['min_time_s']}-{s['max_time_s']} s per row). first call includes torch.compile's compilation.\n",
            results_table(report), "", fastest(report), ""]
    if report.get("fused_vs_unfused"):
        text += ["## Fused against unfused eager model\n", FUSED_TABLE_INTRO, fused_table(report), ""]
    if report.get("op_benchmark"):
        text += ["## Fused BatchNorm+add+ReLU operator\n",
                 "Median times of the operator alone against the unfused expression (eager and torch.compile) and "
                 "the memory-bandwidth bound, at the model's first-stage activation.\n",
                 op_table(report["op_benchmark"]), ""]
    return "\n".join(text)


def plot(report: Dict[str, Any], path: Union[str, Path]) -> None:
    """p50 latency (whisker to p90) and throughput against batch size, one line per backend, one column
    per thread setting."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    threads = sorted({r["threads"] for r in report["results"]}) or [0]
    batch_sizes = sorted({r["batch_size"] for r in report["results"]})
    fig, axes = plt.subplots(2, len(threads), figsize=(5 * len(threads), 7), squeeze=False, sharey="row")
    for column, n_threads in enumerate(threads):
        for backend in runtime.BACKENDS:
            rows = sorted((r for r in report["results"] if r["backend"] == backend and r["threads"] == n_threads),
                          key=lambda r: r["batch_size"])
            if not rows:
                continue
            sizes = [r["batch_size"] for r in rows]
            p50 = np.array([r["p50_ms"] for r in rows])
            p90 = np.array([r["p90_ms"] for r in rows])
            axes[0, column].errorbar(sizes, p50, yerr=[np.zeros_like(p50), p90 - p50], marker="o", capsize=3,
                                     label=backend)
            axes[1, column].plot(sizes, [r["throughput"] for r in rows], marker="o", label=backend)
        axes[0, column].set_title(f"{n_threads} thread{'s' if n_threads > 1 else ''}")
        for ax in axes[:, column]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel("batch size")
            ax.grid(True, which="major", alpha=0.3)
        axes[0, column].legend(fontsize=8)
    axes[0, 0].set_ylabel("latency per batch, ms (p50, bar to p90)")
    axes[1, 0].set_ylabel("throughput, images/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- CLI
def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, like 1,8,64; got {text!r}")
    return values


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="latency and throughput of every backend, with the fused-operator benchmark",
        description="Time every backend at every batch size and thread setting; write bench.json, bench.md and "
                    "bench.png into --out. Figures are medians of calls timed until stable. When eager and "
                    "eager-fused both run, they also take turns on the same batch with a second load of eager, "
                    "to say whether the fused operator makes the model faster beyond the noise.")
    add = parser.add_argument
    add("artifact_dir", metavar="ARTIFACT_DIR", help="a directory written by `resnet-deploy export`")
    add("--out", required=True, help="directory for bench.json, bench.md and bench.png")
    add("--backends", default=",".join(runtime.BACKENDS),
        help=f"comma-separated (default: all: {','.join(runtime.BACKENDS)})")
    add("--batch-sizes", type=_int_list, default=list(DEFAULT_BATCH_SIZES), help="default: 1,8,64")
    add("--threads", type=_int_list,
        help="thread settings, each from 1 to the available cores (default: 1 and all available cores)")
    add("--min-time", type=float, default=1.0, help="seconds of timed calls per figure at least (default 1)")
    add("--max-time", type=float, default=3.0, help="seconds of timed calls per figure at most (default 3)")
    add("--op-benchmark", action=argparse.BooleanOptionalAction, default=True,
        help="also time the fused operator alone (default: yes)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    report = bench(args.artifact_dir, args.out, [b.strip() for b in args.backends.split(",") if b.strip()],
                   args.batch_sizes, args.threads, min_time_s=args.min_time, max_time_s=args.max_time,
                   op_benchmark=args.op_benchmark, log=lambda line: print(line, flush=True))
    if report["errors"]:
        failed = ", ".join(f"{e['backend']} ({e['threads']} threads)" for e in report["errors"])
        raise SystemExit(f"resnet-deploy bench: error: {failed} failed; the others' figures are in {args.out}")
