"""resnet-deploy demo: every stage, one after the other, into one run directory with REPORT.md, on a tiny
synthetic dataset with a one-epoch training run and a tiny benchmark budget."""
import csv
import json
import re
from pathlib import Path

import pytest
from conftest import make_dataset

from resnet_deploy import bench, cli, data, demo, export, report

TINY_BENCH = {"backends": ["eager", "eager-fused", "onnxruntime"], "batch_sizes": [1, 4], "threads": [1], "warmup_s": 0.0,
              "min_time_s": 0.0, "max_time_s": 0.05, "min_runs": 3, "op_benchmark": False}
TINY_TRAIN = {"epochs": 1, "batch_size": 8}  # 64 images: the 8 steps the one-cycle schedule needs


def test_demo_runs_every_stage_and_writes_the_report(tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "ds", train=64, test=32)
    out = tmp_path / "run"
    result = demo.demo(out, data_dir=str(dataset), train_options=TINY_TRAIN, bench_options=TINY_BENCH,
                       progress=False, log=lambda line: None)

    assert result["report"] == out / report.REPORT
    for path in ("train/checkpoint.pt", "train/curves.png", "artifacts/manifest.json", "artifacts/parity.json",
                 "predictions.csv", "infer.json", "bench/bench.json", "bench/bench.md", "bench/bench.png",
                 "demo.json", "REPORT.md"):
        assert (out / path).is_file(), path
    summary = json.loads((out / "infer.json").read_text())
    assert summary["images"] == summary["labelled"] == 32 and summary["backend"] == "onnxruntime"
    with open(out / "predictions.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 32
    bench.load_report(out / "bench" / "bench.json")
    stages = json.loads((out / "demo.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["train", "export", "infer", "bench", "report"]

    text = (out / "REPORT.md").read_text()
    for heading in ("## Training", "## Export and parity gate", "## Batch inference", "## Latency and throughput",
                    "## Environment"):
        assert heading in text
    assert "Parity gate **passed**" in text and "![training curves](train/curves.png)" in text
    assert "![latency against batch size](bench/bench.png)" in text
    assert re.search(r"\| eager \| 1 \| 4 \| [\d.]+ \|", text) and re.search(r"\| onnxruntime \| 1 \| 1 \|", text)
    assert "### Fused against unfused eager model" in text
    assert re.search(r"\| 1 \| 4 \| [\d.]+ \| [\d.]+ \| [\d.]+x \([\d.]+-[\d.]+\) \|"
                     r".*\| (faster|slower|within the noise) \|",
                     text)
    assert f"accuracy **{100 * summary['accuracy']:.2f}%**" in text

    # A second run resumes the finished training run (no epoch is trained again) and redoes the rest
    # (export, tested on its own, is left out here: it is the slowest stage).
    checkpoint = (out / "train" / "checkpoint.pt").read_bytes()
    (out / "REPORT.md").unlink()
    lines = []
    monkeypatch.setattr(export, "export", lambda *args, **kwargs: lines.append("export called"))
    demo.demo(out, data_dir=str(dataset), train_options=TINY_TRAIN, bench_options=TINY_BENCH, progress=False,
              log=lines.append)
    assert (out / "train" / "checkpoint.pt").read_bytes() == checkpoint
    assert any("resuming it" in line for line in lines) and "export called" in lines
    assert (out / "REPORT.md").is_file()


def test_report_of_an_empty_run_directory_says_what_is_missing(tmp_path):
    text = report.write_report(tmp_path).read_text()
    assert text.count("_Not available:") == 4 and "training did not run or failed" in text


def test_command_line_reports_a_bad_option_in_one_line(tmp_path, capsys):
    dataset = make_dataset(tmp_path / "ds", train=64, test=32)
    out = tmp_path / "run"
    code = cli.main(["demo", "--out", str(out), "--data-dir", str(dataset), "--epochs", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("resnet-deploy demo: error: epochs must be at least 1, got 0")
    assert not out.exists()  # nothing written for a run that could not start

    code = cli.main(["demo", "--out", str(out), "--data-dir", str(dataset), "--bench-min-time", "5",
                     "--bench-max-time", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("resnet-deploy demo: error: --bench-min-time and --bench-max-time need "
                                        "0 <= min <= max, got 5.0 and 1.0")
    assert not out.exists()


def test_demo_checks_its_settings_and_data_before_writing_anything(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="backend eager given more than once"):
        demo.demo(out, bench_options={"backends": ["eager", "eager"]}, progress=False, log=lambda line: None)
    with pytest.raises(data.DatasetNotFoundError):
        demo.demo(out, data_dir=tmp_path / "empty", train_options={"download": False}, progress=False,
                  log=lambda line: None)
    assert not out.exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "predictions.csv").mkdir()
    with pytest.raises(IsADirectoryError, match="predictions.csv is a directory"):
        demo.demo(tmp_path / "taken", progress=False, log=lambda line: None)
    assert sorted(path.name for path in (tmp_path / "taken").iterdir()) == ["predictions.csv"]


def test_make_demo_builds_first_and_runs_the_demo_command():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert re.search(r"^demo: build dataset\n\t\$\(PY\) -m resnet_deploy.cli demo --out \$\(RUN_DIR\)$", makefile,
                     re.MULTILINE)
