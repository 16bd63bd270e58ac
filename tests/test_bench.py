"""resnet-deploy bench: the files it writes and their schema, the timing loop's stopping rules, failures of
one backend, and the refusals. Budgets are tiny: these tests check behaviour, never speed."""
import json
import time

import numpy as np
import pytest
from test_runtime import shared_artifacts

from resnet_deploy import bench, cli, op_benchmark, runtime

TINY = dict(warmup_s=0.0, min_time_s=0.0, max_time_s=0.05, min_runs=3, max_runs=5)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


@pytest.fixture
def fast_op_benchmark(monkeypatch):
    """The real op_benchmark.run with every timing replaced by a constant (nothing is run or compiled)."""
    monkeypatch.setattr(op_benchmark, "interleaved_medians_ms",
                        lambda steps, min_run_time: {name: 1.0 for name in steps})
    monkeypatch.setattr(op_benchmark, "faults_per_call", lambda fn: 0.0)


def test_bench_writes_json_markdown_and_plot(artifacts, tmp_path, fast_op_benchmark):
    report = bench.bench(artifacts, tmp_path / "out", backends=["eager", "onnxruntime"], batch_sizes=[1, 3],
                         threads=[1, 2], log=lambda line: None, **TINY)
    written = bench.load_report(tmp_path / "out" / "bench.json")  # checks the schema
    assert written == json.loads(json.dumps(report))
    assert written["schema_version"] == bench.SCHEMA_VERSION and written["errors"] == []
    combos = {(r["backend"], r["batch_size"], r["threads"]) for r in written["results"]}
    assert combos == {(b, n, t) for b in ("eager", "onnxruntime") for n in (1, 3) for t in (1, 2)}
    for row in written["results"]:
        assert set(bench.RESULT_FIELDS) <= set(row)
        assert row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["throughput"] == pytest.approx(row["batch_size"] / row["mean_ms"] * 1e3)
        assert 3 <= row["runs"] <= 5 and row["load_ms"] > 0 and row["first_call_ms"] > 0
        assert row["peak_rss_mb"] > row["rss_growth_mb"] >= 0
    env = written["env"]
    for key in ("cpu", "cores", "available_cores", "versions", "git_commit", "threads", "torch_interop_threads",
                "op_library", "timestamp"):
        assert key in env
    assert env["threads"] == [1, 2] and env["versions"]["onnxruntime"]
    assert written["settings"]["batch_sizes"] == [1, 3]

    # The fused-operator figures: at the model's largest fused site with a residual (64 channels, 7x7 at 28x28).
    op = written["op_benchmark"]
    assert {tuple(r["shape"]) for r in op["results"]} == {(3, 64, 7, 7)}

    table = (tmp_path / "out" / "bench.md").read_text()
    assert "| eager | 1 | 3 |" in table and "| onnxruntime | 2 | 1 |" in table and "1.00x" in table
    assert "Fused BatchNorm+add+ReLU operator" in table and "3x64x7x7" in table
    assert "- fastest with 2 thread(s): batch 1: " in table
    assert (tmp_path / "out" / "bench.png").read_bytes()[:4] == b"\x89PNG"
    # eager-fused did not run: nothing to set against eager
    assert written["fused_vs_unfused"] is None and "Fused against unfused" not in table


def test_bench_times_eager_fused_against_two_loads_of_eager_in_turns(artifacts, tmp_path, fast_op_benchmark):
    report = bench.bench(artifacts, tmp_path / "out", backends=["eager", "eager-fused"], batch_sizes=[1, 3],
                         threads=[1, 2], log=lambda line: None, **TINY)
    rows = bench.load_report(tmp_path / "out" / "bench.json")["fused_vs_unfused"]
    assert rows == json.loads(json.dumps(report["fused_vs_unfused"]))
    assert [(r["threads"], r["batch_size"]) for r in rows] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    for row in rows:
        assert row["rounds"] == bench.FUSED_COMPARISON_ROUNDS
        assert row["candidate_ms"] > 0 and row["baseline_ms"] > 0 and row["baseline_again_ms"] > 0
        for value, (low, high) in ((row["speedup"], row["speedup_ci"]), (row["a_a_ratio"], row["a_a_ci"]),
                                   (row["speedup_vs_again"], row["speedup_vs_again_ci"])):
            assert low <= value <= high
        assert row["verdict"] == op_benchmark.verdict([row["speedup_ci"], row["speedup_vs_again_ci"]])
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "## Fused against unfused eager model" in table
    assert f"| 2 | 3 | {rows[-1]['candidate_ms']:.2f} | {rows[-1]['baseline_ms']:.2f} | " in table


def test_a_failing_fused_comparison_keeps_the_other_figures(artifacts, tmp_path, fast_op_benchmark, monkeypatch):
    real = bench.fused_vs_unfused

    def fails_with_two_threads(artifact_dir, images, batch_sizes, n_threads, *args, **kwargs):
        if n_threads == 2:
            raise RuntimeError("out of memory")
        return real(artifact_dir, images, batch_sizes, n_threads, *args, **kwargs)
    monkeypatch.setattr(bench, "fused_vs_unfused", fails_with_two_threads)
    report = bench.bench(artifacts, tmp_path / "out", backends=["eager", "eager-fused"], batch_sizes=[1],
                         threads=[1, 2], log=lambda line: None, **TINY)
    assert [(r["threads"], r["batch_size"]) for r in report["fused_vs_unfused"]] == [(1, 1)]
    assert len(report["results"]) == 4
    assert report["errors"] == [{"backend": "eager-fused against eager", "threads": 2,
                                 "error": "RuntimeError: out of memory", "traceback": report["errors"][0]["traceback"]}]
    assert bench.load_report(tmp_path / "out" / "bench.json")["fused_vs_unfused"] == report["fused_vs_unfused"]


def test_fused_table_puts_each_figure_in_its_column():
    row = {"threads": 2, "batch_size": 8, "rounds": 40, "candidate_ms": 10.0, "baseline_ms": 11.0,
           "baseline_again_ms": 11.1, "speedup": 1.1, "speedup_ci": [1.05, 1.15], "speedup_vs_again": 1.11,
           "speedup_vs_again_ci": [1.06, 1.16], "a_a_ratio": 1.01, "a_a_ci": [0.99, 1.03], "verdict": "faster"}
    assert bench.fused_table({"fused_vs_unfused": [row]}).splitlines()[-1] == (
        "| 2 | 8 | 10.00 | 11.00 | 1.100x (1.050-1.150) | 1.110x (1.060-1.160) | 1.010x (0.990-1.030) | faster |")
    assert bench.fused_table({"fused_vs_unfused": None}) == ""


def test_a_failing_backend_is_reported_and_the_others_still_run(artifacts, tmp_path, monkeypatch, capsys):
    real_load = runtime.load

    def load(artifact_dir, backend, **kwargs):
        if backend == "torchscript":
            raise RuntimeError("no such operator")
        return real_load(artifact_dir, backend, **kwargs)

    monkeypatch.setattr(runtime, "load", load)
    report = bench.bench(artifacts, tmp_path, backends=["torchscript", "eager"], batch_sizes=[2], threads=[1],
                         op_benchmark=False, **TINY)
    assert [r["backend"] for r in report["results"]] == ["eager"]
    assert report["errors"][0]["backend"] == "torchscript" and "no such operator" in report["errors"][0]["error"]
    assert "torchscript | 1 | - | failed: RuntimeError: no such operator" in (tmp_path / "bench.md").read_text()
    capsys.readouterr()

    with pytest.raises(SystemExit, match="torchscript \\(1 threads\\) failed; the others' figures are in"):
        cli.main(["bench", str(artifacts), "--out", str(tmp_path), "--backends", "torchscript,eager",
                  "--batch-sizes", "2", "--threads", "1", "--min-time", "0", "--max-time", "0.05",
                  "--no-op-benchmark"])


def test_time_calls_stops_by_count_time_or_stability():
    calls = []
    times, stable = bench.time_calls(lambda: calls.append(1), warmup_s=0, min_time_s=0, max_time_s=10, min_runs=5,
                                     max_runs=7, tolerance=float("inf"))
    assert len(times) == 5 and stable and len(calls) == 5 + 2  # two warm-up calls at the least
    times, stable = bench.time_calls(lambda: None, warmup_s=0, min_time_s=0, max_time_s=10, min_runs=10**9,
                                     max_runs=50, tolerance=0.0)
    assert len(times) == 50
    times, _ = bench.time_calls(lambda: time.sleep(0.001), warmup_s=0, min_time_s=0, max_time_s=0.05, min_runs=3,
                                max_runs=10**9, tolerance=-1)  # never stable: only the time budget stops it
    assert 3 <= len(times) < 60
    times, _ = bench.time_calls(lambda: time.sleep(0.02), warmup_s=0, min_time_s=0, max_time_s=0.001, min_runs=3,
                                max_runs=10**9, tolerance=-1)
    assert len(times) == 3  # min_runs even past the time budget

    summary = bench.summarize([0.001 * i for i in range(1, 101)], batch_size=4)
    assert summary["p50_ms"] == pytest.approx(50.5) and summary["p90_ms"] == pytest.approx(90.1)
    assert summary["p99_ms"] == pytest.approx(99.01) and summary["mean_ms"] == pytest.approx(50.5)
    assert summary["std_ms"] == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert summary["throughput"] == pytest.approx(4 / 0.0505) and summary["runs"] == 100


def test_check_schema_names_the_offending_field():
    row = {key: (kind(1) if kind is not str else "eager") for key, kind in bench.RESULT_FIELDS.items()}
    env = {"cpu": "x", "cores": 2, "versions": {}, "git_commit": None, "threads": [1], "timestamp": "now"}
    report = {"schema_version": 1, "env": env, "artifact": {}, "settings": {}, "results": [row], "errors": []}
    bench.check_schema(report)
    with pytest.raises(ValueError, match="bench result 0 field 'p90_ms' is None; expected a float"):
        bench.check_schema(dict(report, results=[dict(row, p90_ms=None)]))
    with pytest.raises(ValueError, match="bench result 0 field 'batch_size' is True; expected a int"):
        bench.check_schema(dict(report, results=[dict(row, batch_size=True)]))
    with pytest.raises(ValueError, match="bench report field 'results' is None; expected a list"):
        bench.check_schema(dict(report, results=None))
    comparison = {"threads": 1, "batch_size": 1, "rounds": 40, "candidate_ms": 1.0, "baseline_ms": 1.1,
                  "baseline_again_ms": 1.1, "speedup": 1.1, "speedup_ci": [1.0, 1.2], "speedup_vs_again": 1.1,
                  "speedup_vs_again_ci": [1.0, 1.2], "a_a_ratio": 1.0, "a_a_ci": [0.9, 1.1], "verdict": "faster"}
    bench.check_schema(dict(report, fused_vs_unfused=[comparison]))
    for bad in ([dict(comparison, verdict="probably faster")], [{"verdict": "faster"}],
                [dict(comparison, speedup_ci=[1.2, 1.0])], [dict(comparison, speedup=None)], 5):
        with pytest.raises(ValueError, match="'fused_vs_unfused' must be null or a list of comparison rows"):
            bench.check_schema(dict(report, fused_vs_unfused=bad))
    with pytest.raises(ValueError, match="bench report env lacks 'git_commit'"):
        bench.check_schema(dict(report, env={k: v for k, v in env.items() if k != "git_commit"}))


def test_refusals(artifacts, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown backend\\(s\\) tensorrt; expected some of eager"):
        bench.bench(artifacts, tmp_path, backends=["eager", "tensorrt"])
    with pytest.raises(ValueError, match="every batch size must be a positive integer, got \\[1, 0\\]"):
        bench.bench(artifacts, tmp_path, batch_sizes=[1, 0])
    cores = runtime.available_cores()
    with pytest.raises(ValueError, match=f"--threads must be an integer from 1 to {cores}, the cores this process"):
        bench.bench(artifacts, tmp_path, threads=[1, cores + 1])
    with pytest.raises(ValueError, match="backend onnxruntime given more than once; expected each once"):
        bench.bench(artifacts, tmp_path, backends=["onnxruntime", "eager", "onnxruntime"])
    with pytest.raises(ValueError, match="batch size 8 given more than once"):
        bench.bench(artifacts, tmp_path, batch_sizes=[8, 1, 8])
    with pytest.raises(ValueError, match="the time budget needs 0 <= min time <= max time, got 2 and 1"):
        bench.bench(artifacts, tmp_path, min_time_s=2, max_time_s=1)
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        bench.bench(tmp_path, tmp_path / "out")
    with pytest.raises(SystemExit):
        cli.main(["bench", str(artifacts), "--out", str(tmp_path), "--batch-sizes", "1,x"])
    assert "expected positive integers separated by commas, like 1,8,64; got '1,x'" in capsys.readouterr().err


def test_out_that_is_a_file_is_named_in_the_error(artifacts, tmp_path, capsys):
    (tmp_path / "x").write_text("not a directory")
    assert cli.main(["bench", str(artifacts), "--out", str(tmp_path / "x"), "--backends", "eager"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"resnet-deploy bench: error: --out {tmp_path / 'x'} cannot be used as the output directory "
                     f"(File exists); expected a directory, or a path where one can be created"]
    assert (tmp_path / "x").read_text() == "not a directory"
