"""`resnet-deploy demo --out RUN_DIR`: the whole pipeline in one command, each stage a function call:
train the quick preset on Fashion-MNIST, export (with the parity gate), predict the 10,000 test images,
benchmark every backend, and write RUN_DIR/REPORT.md (the layout is in report.py).

A run directory that already holds a finished training run is resumed (to nothing), so re-running the demo
after a later stage failed does not train again; the later stages are always redone.
"""
import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

from resnet_deploy import bench, data, export, infer, outputs, report, runtime

# The benchmark's budget per figure: enough runs for stable medians at these model sizes, and the whole
# demo well within 20 minutes on two cores.
BENCH_OPTIONS = {"min_time_s": 0.5, "max_time_s": 2.0}


def demo(out: Union[str, Path] = "runs/demo", data_dir: Optional[str] = None,
         train_options: Optional[Dict[str, Any]] = None, infer_backend: str = infer.DEFAULT_BACKEND,
         bench_options: Optional[Dict[str, Any]] = None, progress: bool = True,
         log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run every stage into out; returns {"report": path, "bench": bench report, "infer": summary}.

    train_options override the quick preset (e.g. {"epochs": 1}); bench_options override BENCH_OPTIONS and
    bench.bench's other defaults (e.g. {"backends": ["eager"]}).
    """
    from resnet_deploy.train import CHECKPOINT, TrainConfig, train

    out = Path(out)
    train_dir, artifact_dir = out / report.TRAIN, out / report.ARTIFACTS
    given = dict(train_options or {})
    # Checked before anything is written: a bad setting leaves no empty run directory behind.
    config = TrainConfig.from_preset("quick", out=str(train_dir), data_dir=data_dir, progress=progress,
                                     resume=(train_dir / CHECKPOINT).is_file(), **given)
    bench_options = {**BENCH_OPTIONS, **(bench_options or {})}
    bench.check_options(bench_options)
    for directory in (out, train_dir, artifact_dir, out / report.BENCH):
        outputs.check_output_directory(directory)
    if out.is_dir():
        outputs.check_output_file(out / report.PREDICTIONS)
    files = data.find_dataset(data_dir, config.download)  # where training will find it
    outputs.output_directory(out)
    stages: List[Dict[str, Any]] = []
    started = time.perf_counter()

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        log(f"\n=== {name} ===")
        t0 = time.perf_counter()
        yield
        stages.append({"name": name, "seconds": round(time.perf_counter() - t0, 1)})
        summary = {"stages": stages, "total_seconds": round(time.perf_counter() - started, 1)}
        (out / report.DEMO_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")

    with stage("train"):
        if config.resume:
            log(f"{train_dir} holds a training run: resuming it (nothing to do if it finished)")
        train(config, given=given)

    with stage("export"):
        export.export(train_dir, artifact_dir, data_dir=data_dir, log=log)

    with stage("infer"):
        summary = infer.infer(artifact_dir, files["test_images"], out / report.PREDICTIONS, infer_backend,
                              labels=files["test_labels"], progress=progress, log=log)
        (out / report.INFER_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")

    with stage("bench"):
        bench_report = bench.bench(artifact_dir, out / report.BENCH, **bench_options, log=log)

    with stage("report"):
        path = report.write_report(out)
    log(f"\nwrote {path} ({(time.perf_counter() - started) / 60:.1f} minutes)")
    return {"report": path, "bench": bench_report, "infer": summary}


# -------------------------------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="train, export, infer, benchmark and write REPORT.md, in one command",
        description="Train the quick preset on Fashion-MNIST, export it behind the parity gate, predict the test "
                    "set, benchmark every backend and write REPORT.md into --out.")
    add = parser.add_argument
    add("--out", default="runs/demo", help="run directory (default: runs/demo)")
    add("--data-dir", help="directory with the Fashion-MNIST idx files (default: as train finds them)")
    add("--epochs", type=int, help="override the quick preset's epochs (a shorter smoke run)")
    add("--infer-backend", choices=runtime.BACKENDS, default=infer.DEFAULT_BACKEND,
        help=f"backend of the test-set predictions (default: {infer.DEFAULT_BACKEND})")
    add("--bench-min-time", type=float, default=BENCH_OPTIONS["min_time_s"],
        help=f"seconds of timed calls per benchmark figure at least (default: {BENCH_OPTIONS['min_time_s']})")
    add("--bench-max-time", type=float, default=BENCH_OPTIONS["max_time_s"],
        help=f"seconds of timed calls per benchmark figure at most (default: {BENCH_OPTIONS['max_time_s']})")
    add("--progress", action=argparse.BooleanOptionalAction,
        help="show progress bars (default: when stderr is a terminal)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    # Checked here, not when the benchmark starts after minutes of training.
    if not 0 <= args.bench_min_time <= args.bench_max_time:
        raise ValueError(f"--bench-min-time and --bench-max-time need 0 <= min <= max, got {args.bench_min_time} "
                         f"and {args.bench_max_time}")
    result = demo(args.out, args.data_dir, {"epochs": args.epochs} if args.epochs is not None else None, args.infer_backend,
                  {"min_time_s": args.bench_min_time, "max_time_s": args.bench_max_time}, args.progress,
                  log=lambda line: print(line, flush=True))
    if result["bench"]["errors"]:
        failed = ", ".join(f"{e['backend']} ({e['threads']} threads)" for e in result["bench"]["errors"])
        raise SystemExit(f"resnet-deploy demo: error: the benchmark of {failed} failed; see {result['report']}")
