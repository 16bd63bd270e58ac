"""REPORT.md of a demo run directory: what was trained, how well, whether the exports agree, how fast each
backend is. It only reads the files the stages wrote (the layout below), so it can be re-written any time:

  RUN_DIR/train/        checkpoint.pt, metrics.json, curves.png   (resnet-deploy train)
  RUN_DIR/artifacts/    model.torchscript.pt, model.onnx, parity.json, manifest.json   (resnet-deploy export)
  RUN_DIR/predictions.csv, RUN_DIR/infer.json   (resnet-deploy infer: predictions and their summary)
  RUN_DIR/bench/        bench.json, bench.md, bench.png   (resnet-deploy bench)
  RUN_DIR/demo.json     the stages' wall-clock times
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from resnet_deploy import bench

TRAIN, ARTIFACTS, BENCH = "train", "artifacts", "bench"
PREDICTIONS, INFER_SUMMARY, DEMO_SUMMARY, REPORT = "predictions.csv", "infer.json", "demo.json", "REPORT.md"


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else None


def _missing(what: str, path: Path) -> str:
    return f"_Not available: {path} does not exist ({what} did not run or failed)._\n"


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 2**10:.1f} KB"


def _training(run_dir: Path) -> List[str]:
    metrics = _read_json(run_dir / TRAIN / "metrics.json")
    lines = ["## Training\n"]
    if metrics is None:
        return lines + [_missing("training", run_dir / TRAIN / "metrics.json")]
    config, epochs = metrics["config"], metrics["epochs"]
    final = epochs[-1]
    lines.append(f"{config['arch']} ({'fused' if config['fused'] else 'unfused'} BatchNorm+add+ReLU), preset "
                 f"`{config['preset']}`: {config['image_size']}x{config['image_size']} inputs, {len(epochs)} epoch(s) of "
                 f"batch {config['batch_size']} x {metrics.get('world_size', 1)} process(es), {config['optimizer']} "
                 f"(lr {config['lr']}, {config['schedule']}). Final test accuracy "
                 f"**{100 * final['test_acc']:.2f}%**.\n")
    lines.append("| epoch | train loss | train acc | test acc | examples/s | seconds |")
    lines.append("|---:|---:|---:|---:|---:|---:|")
    for row in epochs:
        lines.append(f"| {row['epoch']} | {row['train_loss']:.4f} | {100 * row['train_acc']:.2f}% | "
                     f"{100 * row['test_acc']:.2f}% | {row['examples_per_sec']:.0f} | {row['seconds']:.0f} |")
    lines.append(f"\n![training curves]({TRAIN}/curves.png)\n")
    return lines


def _parity(run_dir: Path) -> List[str]:
    artifacts = run_dir / ARTIFACTS
    parity, manifest = _read_json(artifacts / "parity.json"), _read_json(artifacts / "manifest.json")
    lines = ["## Export and parity gate\n"]
    if parity is None:
        return lines + [_missing("export", artifacts / "parity.json")]
    verdict = "**passed**" if parity["passed"] else "**FAILED** (no manifest was written)"
    limits = parity["limits"]
    lines.append(f"Parity gate {verdict} on {parity['source']}: every runtime must agree with the eager model on "
                 f"{100 * limits['top1_agreement']:.0f}% of top-1 predictions and within "
                 f"{limits['max_abs_logit_diff']:g} on every logit.\n")
    lines.append("| runtime | batch | top-1 agreement | max abs logit diff | result |")
    lines.append("|---|---:|---:|---:|---|")
    for check in parity["checks"]:
        lines.append(f"| {check['runtime']} | {check['batch_size']} | {100 * check['top1_agreement']:.2f}% | "
                     f"{check['max_abs_logit_diff']:.2e} | {'ok' if check['passed'] else 'FAILED'} |")
    if manifest is not None:
        files = ", ".join(f"`{name}` ({_size(artifacts / name)})" for name in manifest["sha256"]
                          if (artifacts / name).is_file())
        lines.append(f"\nArtifacts in `{ARTIFACTS}/`: {files}; `manifest.json` (ONNX opset "
                     f"{manifest['onnx']['opset']}, pre-processing {manifest['preprocess']['formula']} with mean "
                     f"{manifest['preprocess']['mean']} and std {manifest['preprocess']['std']}).\n")
    return lines


def _inference(run_dir: Path) -> List[str]:
    summary = _read_json(run_dir / INFER_SUMMARY)
    lines = ["## Batch inference\n"]
    if summary is None:
        return lines + [_missing("inference", run_dir / INFER_SUMMARY)]
    accuracy = f"accuracy **{100 * summary['accuracy']:.2f}%**" if summary["accuracy"] is not None else "no labels"
    lines.append(f"`resnet-deploy infer` over {summary['images']} images of `{summary['input']}` with "
                 f"{summary['backend']} ({summary['threads']} threads, batch {summary['batch_size']}): {accuracy}, "
                 f"{summary['images_per_sec']} images/s end to end (reading, pre-processing, inference, writing), "
                 f"{len(summary['unreadable'])} unreadable. Predictions: `{Path(summary['output']).name}`.\n")
    if summary.get("confusion"):
        lines.append("| class | images | accuracy | most often mistaken for |")
        lines.append("|---|---:|---:|---|")
        classes = summary["classes"]
        for index, row in enumerate(summary["confusion"]):
            total = sum(row)
            if not total:
                continue
            wrong = [(count, classes[j]) for j, count in enumerate(row) if j != index and count]
            mistaken = f"{max(wrong)[1]} ({max(wrong)[0]})" if wrong else "-"
            lines.append(f"| {classes[index]} | {total} | {100 * row[index] / total:.1f}% | {mistaken} |")
        lines.append("")
    return lines


def _latency(run_dir: Path) -> List[str]:
    path = run_dir / BENCH / bench.JSON_FILE
    lines = ["## Latency and throughput\n"]
    if not path.is_file():
        return lines + [_missing("the benchmark", path)]
    report = bench.load_report(path)
    s = report["settings"]
    lines.append(f"Per call of `predict` on one pre-processed batch, after a {s['warmup_s']} s warm-up, timed "
                 f"until the median settled (±{100 * s['tolerance']:.0f}%, {s['min_time_s']}-{s['max_time_s']} s per "
                 f"row). eager is the unfused PyTorch reference; `vs eager` compares medians at the same batch size "
                 f"and threads. first call includes torch.compile's compilation. Full figures: "
                 f"`{BENCH}/{bench.JSON_FILE}`.\n")
    lines += [bench.results_table(report), "", bench.fastest(report), "",
              f"![latency against batch size]({BENCH}/{bench.PLOT_FILE})\n"]
    if report.get("fused_vs_unfused"):
        lines += ["### Fused against unfused eager model\n", bench.FUSED_TABLE_INTRO, bench.fused_table(report), ""]
    if report.get("op_benchmark"):
        lines += ["### The fused operator alone\n", bench.op_table(report["op_benchmark"]), ""]
    lines += ["## Environment\n", bench.environment_line(report["env"]) + ".\n"]
    return lines


def _stages(run_dir: Path) -> List[str]:
    summary = _read_json(run_dir / DEMO_SUMMARY)
    if summary is None:
        return []
    stages = ", ".join(f"{stage['name']} {stage['seconds']:.0f} s" for stage in summary["stages"])
    return [f"Stages: {stages}; {summary['total_seconds'] / 60:.1f} minutes in all (set-up and the extension "
            f"build not included).\n"]


def write_report(run_dir: Union[str, Path]) -> Path:
    """Write RUN_DIR/REPORT.md from the files the stages left there; returns its path."""
    run_dir = Path(run_dir)
    lines = ["# resnet-deploy demo report\n",
             "A d2l ResNet-18 with the fused BatchNorm+add+ReLU operator, trained on Fashion-MNIST, exported to "
             "TorchScript and ONNX behind a parity gate, run over the test set and benchmarked on every backend.\n"]
    lines += _stages(run_dir)
    for section in (_training, _parity, _inference, _latency):
        lines += section(run_dir)
    path = run_dir / REPORT
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
