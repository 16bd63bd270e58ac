import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import resnet_deploy
from resnet_deploy import cli, models
from resnet_deploy import train as training
from resnet_deploy.train import TrainConfig

# Tiny runs: 64 training images of 28x28 resized to 16x16, batches of 8, one thread.
TINY = ["--epochs", "1", "--batch-size", "8", "--image-size", "16", "--threads", "1", "--no-progress",
        "--no-download"]


def tiny_argv(dataset_dir: Path, out: Path, *extra: str):
    return ["train", "--data-dir", str(dataset_dir), "--out", str(out), *TINY, *extra]


def state_dicts_equal(a, b) -> bool:
    return list(a) == list(b) and all(torch.equal(a[key], b[key]) for key in a)


def test_train_writes_a_self_describing_run(dataset_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(tiny_argv(dataset_dir, out, "--epochs", "2", "--no-fused")) == 0
    printed = capsys.readouterr().out
    assert "epoch 2/2: loss" in printed and "train acc" in printed and "examples/sec" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2]
    for row in metrics["epochs"]:
        assert {"epoch", "train_loss", "train_acc", "test_acc", "examples_per_sec", "seconds"} <= set(row)
        assert 0 <= row["test_acc"] <= 1 and row["examples_per_sec"] > 0
    assert metrics["config"]["fused"] is False and metrics["config"]["epochs"] == 2
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))

    checkpoint = models.load_checkpoint(out / "checkpoint.pt")
    assert checkpoint["model"] == {"arch": "resnet18", "in_channels": 1, "num_classes": 10, "fused": False}
    assert checkpoint["classes"][0] == "T-shirt/top" and checkpoint["epoch"] == 2
    assert checkpoint["input"] == {"size": [16, 16], "mean": pytest.approx(0.2860), "std": pytest.approx(0.3530)}
    model = models.build_model_from_checkpoint(checkpoint, fused=True)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_training_learns_the_tiny_dataset(tmp_path):
    from conftest import make_dataset

    dataset = make_dataset(tmp_path / "data", train=640, test=100, size=12)
    config = TrainConfig(data_dir=str(dataset), out=str(tmp_path / "run"), epochs=3, batch_size=32, image_size=12,
                         lr=0.1, augment=False, threads=1, progress=False, download=False)
    training.train(config)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"][-1]["test_acc"] >= 0.9
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]


def test_runs_are_deterministic_for_a_seed(dataset_dir, tmp_path):
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert cli.main(tiny_argv(dataset_dir, tmp_path / name, "--seed", str(seed))) == 0
        runs.append(torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["state_dict"])
    assert state_dicts_equal(runs[0], runs[1])
    assert not state_dicts_equal(runs[0], runs[2])


def test_resume_continues_where_the_run_stopped_with_nothing_lost(dataset_dir, tmp_path, monkeypatch, capsys):
    argv = ["--epochs", "3", "--augment"]
    assert cli.main(tiny_argv(dataset_dir, tmp_path / "straight", *argv)) == 0

    save_run = training.save_run

    def save_then_crash(out, model, config, epoch, *args):
        save_run(out, model, config, epoch, *args)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_run", save_then_crash)
    assert cli.main(tiny_argv(dataset_dir, tmp_path / "resumed", *argv)) == 130
    monkeypatch.setattr(training, "save_run", save_run)
    assert cli.main(tiny_argv(dataset_dir, tmp_path / "resumed", *argv, "--resume")) == 0

    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert resumed["epoch"] == 3
    assert state_dicts_equal(straight["state_dict"], resumed["state_dict"])
    assert [row["test_acc"] for row in straight["metrics"]] == [row["test_acc"] for row in resumed["metrics"]]
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2, 3]

    capsys.readouterr()
    assert cli.main(tiny_argv(dataset_dir, tmp_path / "resumed", *argv, "--resume")) == 0
    assert "has finished its 3 epochs; nothing to do" in capsys.readouterr().out


def test_resume_refuses_to_change_the_recipe(dataset_dir, tmp_path, capsys):
    assert cli.main(tiny_argv(dataset_dir, tmp_path / "run")) == 0
    assert cli.main(tiny_argv(dataset_dir, tmp_path / "run", "--resume", "--lr", "0.5")) == 1
    assert ("holds a run, which is continued as it was configured (--resume, or a demo run again), but lr=0.5 "
            "differs from the run's 0.2; drop the flag") in capsys.readouterr().err


def test_a_finished_run_is_not_overwritten(dataset_dir, tmp_path):
    config = TrainConfig(data_dir=str(dataset_dir), out=str(tmp_path / "run"), epochs=1, batch_size=8,
                         image_size=16, threads=1, progress=False, download=False)
    training.train(config)
    with pytest.raises(FileExistsError, match="already holds a run .*pass --resume to continue it or choose another"):
        training.train(config)


def test_resume_without_a_checkpoint(tmp_path):
    config = TrainConfig(out=str(tmp_path / "nothing"), resume=True)
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint at .*checkpoint.pt; run without --resume"):
        training.train(config)


@pytest.mark.parametrize("flag, value, message", [
    ("epochs", 0, "epochs must be at least 1, got 0"),
    ("lr", -1.0, "lr must be a positive number, got -1.0"),
    ("momentum", 1.0, r"momentum must be in \[0, 1\), got 1.0"),
    ("label_smoothing", 1.5, r"label_smoothing must be in \[0, 1\), got 1.5"),
    ("image_size", 4, "image_size must be at least 8 pixels, got 4"),
    ("optimizer", "adam", "unknown optimizer 'adam'; expected sgd or adamw"),
    ("arch", "resnet50", "unknown architecture 'resnet50'; expected one of resnet18, resnet34"),
    ("threads", len(os.sched_getaffinity(0)) + 1, "threads must be 0 \\(automatic\\) to [0-9]+, the cores each"),
])
def test_bad_settings_are_rejected_early(flag, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{flag: value})


def test_threads_are_limited_to_each_local_process_share_of_the_cores(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    assert TrainConfig(threads=cores).threads == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # torchrun --nproc_per_node=<cores>: one core each
    with pytest.raises(ValueError, match="threads must be 0 \\(automatic\\) to 1, the cores each process may use; "
                                         "got 2"):
        TrainConfig(threads=2)
    assert TrainConfig(threads=1).threads == 1


def test_presets_and_overrides():
    d2l = TrainConfig.from_preset("d2l")
    assert (d2l.image_size, d2l.batch_size, d2l.lr, d2l.epochs, d2l.optimizer) == (96, 256, 0.05, 10, "sgd")
    assert d2l.out == "runs/d2l"
    assert TrainConfig.from_preset("d2l", lr=0.1, fused=False).lr == 0.1
    quick = TrainConfig.from_preset()
    assert quick.image_size == 28 and quick.fused
    with pytest.raises(ValueError, match="unknown preset 'slow'; expected one of quick, d2l"):
        TrainConfig.from_preset("slow")


def test_cli_reports_user_errors_in_one_line(tmp_path, dataset_dir, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--no-download"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("resnet-deploy train: error: Fashion-MNIST not found: tried --data-dir (not set)")
    assert "Traceback" not in err and err.count("\n") == 1

    assert cli.main(tiny_argv(dataset_dir, tmp_path / "run", "--epochs", "0")) == 1
    assert "error: epochs must be at least 1, got 0" in capsys.readouterr().err

    assert cli.main(tiny_argv(dataset_dir, tmp_path / "run", "--batch-size", "100")) == 1
    assert "batch_size 100 is larger than the 64 training images" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--optimizer", "adam"], "argument --optimizer: invalid choice: 'adam'"),
    (["train", "--epochs", "three"], "argument --epochs: invalid int value: 'three'"),
    (["train", "--fast"], "unrecognized arguments: --fast"),
    (["fly"], "invalid choice: 'fly'"),
])
def test_cli_rejects_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_info_prints_versions_and_build_info(capsys):
    assert cli.main(["info"]) == 0
    printed = capsys.readouterr().out
    assert f"resnet_deploy {resnet_deploy.__version__}" in printed and f"torch {torch.__version__}" in printed
    assert "operator library cuda:" in printed and "operator library path:" in printed
    assert "operator library CPU kernels: " in printed and "small NCHW planes" in printed


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        training.atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    training.atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"


# Runs `resnet-deploy train` under torchrun and keeps each process's final weights for comparison.
DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from resnet_deploy import cli, train

    original = train.train

    def keep_weights(*args, **kwargs):
        model = original(*args, **kwargs)
        torch.save(model.state_dict(), os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
        return model

    train.train = keep_weights
    sys.exit(cli.main(sys.argv[2:]))
""")


def test_torchrun_trains_with_ddp_on_two_processes(dataset_dir, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "run"
    package_root = str(Path(resnet_deploy.__file__).resolve().parent.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(tmp_path), *tiny_argv(dataset_dir, out, "--epochs", "2")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert state_dicts_equal(rank0, rank1), [key for key in rank0 if not torch.equal(rank0[key], rank1[key])]
    checkpoint = models.load_checkpoint(out / "checkpoint.pt")
    assert state_dicts_equal(checkpoint["state_dict"], rank0)
    assert checkpoint["train_config"]["batch_size"] == 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["epochs"]) == 2
    assert result.stdout.count("epoch 2/2: loss") == 1  # logging from rank 0 only
    assert "x2" in result.stdout


@pytest.mark.parametrize("edit, message", [
    ("drop train_config", "lacks train_config; expected a checkpoint written by `resnet-deploy train`"),
    ("unknown setting", "the checkpoint's train_config has unknown settings width; expected"),
])
def test_resume_refuses_a_checkpoint_it_cannot_continue(dataset_dir, tmp_path, capsys, edit, message):
    assert cli.main(tiny_argv(dataset_dir, tmp_path / "run")) == 0
    path = tmp_path / "run" / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    if edit == "drop train_config":
        del checkpoint["train_config"]
    else:
        checkpoint["train_config"]["width"] = 2
    torch.save(checkpoint, path)
    capsys.readouterr()
    assert cli.main(tiny_argv(dataset_dir, tmp_path / "run", "--resume")) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("resnet-deploy train: error: --resume: ")
    assert message in error[0]


def test_batch_size_below_two_is_rejected_before_anything_is_written(dataset_dir, tmp_path, capsys):
    argv = ["train", "--data-dir", str(dataset_dir), "--out", str(tmp_path / "run"), "--epochs", "1",
            "--image-size", "16", "--threads", "1", "--no-progress", "--no-download", "--batch-size", "1"]
    assert cli.main(argv) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert error == ["resnet-deploy train: error: batch_size must be at least 2 (BatchNorm needs two images to "
                     "normalize over), got 1"]
    assert not (tmp_path / "run").exists()


def test_training_never_sees_a_batch_of_one(dataset_dir, tmp_path, monkeypatch):
    # 64 training images in batches of 3 leave one over: it must be dropped, not trained on alone
    sizes = []
    forward = models.ResNet.forward

    def record(self, x):
        if self.training:
            sizes.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(models.ResNet, "forward", record)
    config = TrainConfig(data_dir=str(dataset_dir), out=str(tmp_path / "run"), epochs=1, batch_size=3,
                         image_size=16, threads=1, progress=False, download=False, schedule="constant")
    training.train(config)
    assert sizes == [3] * (64 // 3)


@pytest.mark.parametrize("value, shows_traceback", [("", False), ("0", False), ("1", True), ("yes", True)])
def test_debug_variable_shows_tracebacks_unless_empty_or_zero(tmp_path, monkeypatch, capsys, value,
                                                              shows_traceback):
    monkeypatch.setenv("RESNET_DEPLOY_DEBUG", value)
    argv = ["train", "--out", str(tmp_path / "run"), "--no-download"]  # no dataset anywhere: a user error
    if shows_traceback:
        with pytest.raises(OSError, match="Fashion-MNIST not found"):
            cli.main(argv)
    else:
        assert cli.main(argv) == 1
        assert capsys.readouterr().err.startswith("resnet-deploy train: error: Fashion-MNIST not found")


def test_a_closed_pipe_ends_a_command_quietly():
    """`resnet-deploy info | head -1`: the reader leaves early; no error or traceback follows."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # gone before the first line: every write fails with EPIPE
    try:
        environment = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe buffers output
        command = subprocess.run([sys.executable, "-m", "resnet_deploy.cli", "info"], stdout=write_end,
                                 stderr=subprocess.PIPE, text=True, timeout=120, env=environment)
    finally:
        os.close(write_end)
    assert command.stderr == "" and command.returncode == 1
