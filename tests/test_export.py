"""resnet-deploy export: artifacts, the ONNX translation, the parity gate and the refusals, on a small
ResNet-18 with random weights and synthetic images."""
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from conftest import REAL_DATASET, make_dataset, requires_real_dataset
from test_models import randomize_batch_norms

import resnet_deploy  # noqa: F401  (loads the operators)
from resnet_deploy import cli, data, export, models

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")

INPUT = {"size": [28, 28], "mean": data.MEAN, "std": data.STD}


def small_model(arch: str = "resnet18", num_classes: int = 10, seed: int = 0) -> models.ResNet:
    """A fused ResNet with random weights and non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    return randomize_batch_norms(models.build_model(arch, num_classes=num_classes), seed).eval()


def write_checkpoint(path: Path, model: models.ResNet, config: dict = None, input_config: dict = None) -> Path:
    """A checkpoint as `resnet-deploy train` writes it (the keys export reads)."""
    torch.save({"model": config or dict(model.config), "state_dict": model.state_dict(),
                "classes": list(data.CLASSES), "input": input_config or INPUT, "epoch": 1}, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export through the command line, shared by the tests that only read its artifacts."""
    root = tmp_path_factory.mktemp("export")
    run_dir = root / "run"
    run_dir.mkdir()
    model = small_model()
    write_checkpoint(run_dir / "checkpoint.pt", model)
    with pytest.MonkeyPatch.context() as patch:  # synthetic images, as the conftest fixture would ensure
        patch.setattr(data, "SYSTEM_DIR", root / "no-dataset")
        patch.delenv(data.ENV_VAR, raising=False)
        code = cli.main(["export", str(run_dir), "--out", str(root / "out"), "--parity-images", "24"])
    assert code == 0
    return model, root / "out"


def test_export_writes_verified_artifacts(exported):
    model, out = exported
    manifest = json.loads((out / export.MANIFEST).read_text())
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert set(manifest["sha256"]) == {export.TORCHSCRIPT, export.ONNX, export.PARITY}
    assert manifest["input"] == {"name": "images", "shape": ["batch", 1, 28, 28], "dtype": "float32",
                                 "layout": "NCHW"}
    assert manifest["preprocess"]["mean"] == data.MEAN and manifest["preprocess"]["std"] == data.STD
    assert manifest["classes"] == data.CLASSES and manifest["onnx"]["opset"] == export.OPSET
    # The scripted module keeps its training branch: the eval op, and the train op and the running-stats update.
    assert manifest["torchscript"]["custom_operators"] == ["resnet_deploy::bn_add_relu_eval",
                                                           "resnet_deploy::bn_add_relu_train",
                                                           "resnet_deploy::bn_update_running_stats"]
    assert manifest["versions"]["torch"] == torch.__version__

    parity = json.loads((out / export.PARITY).read_text())
    assert parity["passed"] and parity["images"] == 24 and "synthetic" in parity["source"]
    checked = {(check["runtime"], check["batch_size"]) for check in parity["checks"]}
    assert checked == {(runtime, batch) for runtime in ("torchscript", "onnxruntime") for batch in (1, 7)}
    assert export.EXPORT_BATCH not in export.PARITY_BATCH_SIZES
    assert all(check["top1_agreement"] == 1.0 and check["max_abs_logit_diff"] <= 1e-3 for check in parity["checks"])


def test_onnx_is_standard_with_a_dynamic_batch(exported):
    model, out = exported
    onnx.checker.check_model(str(out / export.ONNX), full_check=True)
    graph = onnx.load(str(out / export.ONNX)).graph
    ops = {node.op_type for node in graph.node}
    assert {"Conv", "Add", "Relu"} <= ops
    assert all(node.domain in ("", "ai.onnx") for node in graph.node)  # no custom operator left
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis
    session = onnxruntime.InferenceSession(str(out / export.ONNX), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), model(x),
                                   atol=1e-4, rtol=1e-4)


def test_onnx_translation_handles_missing_residual_weight_and_bias(tmp_path):
    """The translation of every optional argument, against the operator itself."""

    class Block(torch.nn.Module):
        def forward(self, x, residual, mean, var):
            with_all = torch.ops.resnet_deploy.bn_add_relu_eval(x, residual, mean, var, var, mean, 1e-5)
            bare = torch.ops.resnet_deploy.bn_add_relu_eval(x, None, mean, var, None, None, 1e-5)
            return with_all + bare

    inputs = (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(3), torch.rand(3) + 0.5)
    program = torch.onnx.export(Block().eval(), inputs, dynamo=True, opset_version=export.OPSET, verbose=False,
                                custom_translation_table={
                                    torch.ops.resnet_deploy.bn_add_relu_eval.default: export.bn_add_relu_onnx})
    program.save(str(tmp_path / "block.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "block.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {name: t.numpy() for name, t in zip(names, inputs)})[0]
    torch.testing.assert_close(torch.from_numpy(got), Block()(*inputs), atol=1e-5, rtol=1e-5)


def test_torchscript_loads_in_a_fresh_process_after_import(exported):
    model, out = exported
    x = torch.randn(2, 1, 28, 28)
    torch.save(x, out.parent / "x.pt")
    script = textwrap.dedent(f"""
        import torch
        try:
            torch.jit.load({str(out / export.TORCHSCRIPT)!r})
            raise SystemExit("loaded without the operator library")
        except RuntimeError as error:
            assert "resnet_deploy" in str(error), error
        import resnet_deploy
        scripted = torch.jit.load({str(out / export.TORCHSCRIPT)!r})
        torch.save(scripted(torch.load({str(out.parent / 'x.pt')!r})), {str(out.parent / 'y.pt')!r})
        print(scripted.input_shape, scripted.class_names[0])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "[1, 28, 28] T-shirt/top" in result.stdout
    with torch.no_grad():
        torch.testing.assert_close(torch.load(out.parent / "y.pt"), model(x), atol=1e-5, rtol=1e-5)


def test_compare_flags_logit_and_top1_differences():
    inputs = torch.randn(10, 4)
    reference = lambda x: x * 2  # noqa: E731
    ok = export.compare(reference, {"same": lambda x: x * 2 + 1e-4}, inputs)
    assert ok["passed"] and len(ok["checks"]) == 2
    drift = export.compare(reference, {"drift": lambda x: x * 2 + 1e-2}, inputs)
    assert not drift["passed"] and drift["checks"][0]["top1_agreement"] == 1.0
    assert drift["checks"][0]["max_abs_logit_diff"] == pytest.approx(1e-2, rel=1e-3)
    flipped = export.compare(reference, {"flipped": lambda x: -x * 2}, inputs, batch_sizes=[3])
    assert not flipped["passed"] and flipped["checks"][0]["top1_agreement"] < 1.0


@requires_real_dataset
def test_parity_images_are_the_first_real_test_images():
    inputs, labels, source = export.parity_images(16, INPUT, 1, data_dir=REAL_DATASET)
    files = data.find_dataset(REAL_DATASET, download=False)
    assert torch.equal(labels, data.read_idx(files["test_labels"], ndim=1)[:16].long())
    assert torch.equal(inputs, data.preprocess(data.read_idx(files["test_images"], ndim=3)[:16], 28))
    assert source.startswith("16 Fashion-MNIST test images")


def test_parity_images_fall_back_to_synthetic_only_without_a_data_dir(tmp_path):
    inputs, labels, source = export.parity_images(5, INPUT, 1)
    assert inputs.shape == (5, 1, 28, 28) and labels is None and "synthetic" in source
    with pytest.raises(data.DatasetNotFoundError, match="Fashion-MNIST not found"):
        export.parity_images(5, INPUT, 1, data_dir=tmp_path)


def test_failing_parity_exits_non_zero_without_manifest(tmp_path, monkeypatch, capsys):
    translate = export.bn_add_relu_onnx

    def without_residual(input, residual, running_mean, running_var, weight, bias, eps):
        return translate(input, None, running_mean, running_var, weight, bias, eps)

    monkeypatch.setattr(export, "bn_add_relu_onnx", without_residual)
    checkpoint = write_checkpoint(tmp_path / "checkpoint.pt", small_model())
    out = tmp_path / "out"
    assert cli.main(["export", str(checkpoint), "--out", str(out), "--parity-images", "8"]) == 1
    captured = capsys.readouterr()
    assert "onnxruntime  batch 7" in captured.out and "FAILED" in captured.out
    error = captured.err.strip().splitlines()
    assert len(error) == 1 and "parity gate failed" in error[0] and "max |logit diff|" in error[0]
    assert not json.loads((out / export.PARITY).read_text())["passed"]
    assert not (out / export.MANIFEST).exists()


def test_refuses_a_model_in_train_mode(tmp_path):
    with pytest.raises(ValueError, match="the model is in train mode; expected an eval-mode model"):
        export.export_model(small_model().train(), tmp_path, INPUT, data.CLASSES)
    model = small_model()
    model.stages[1][0].bn2.train()
    with pytest.raises(ValueError, match=r"stages\.1\.0\.bn2 is in train mode"):
        export.export_model(model, tmp_path, INPUT, data.CLASSES)
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_refuses_a_checkpoint_that_does_not_match_its_architecture(tmp_path):
    resnet34 = small_model("resnet34")
    wrong_arch = write_checkpoint(tmp_path / "a.pt", resnet34, config=dict(resnet34.config, arch="resnet18"))
    with pytest.raises(ValueError, match=r"does not match its architecture resnet18: .* unexpected keys"):
        export.load_model(wrong_arch)
    five_classes = small_model(num_classes=5)
    wrong_head = write_checkpoint(tmp_path / "b.pt", five_classes, config=dict(five_classes.config, num_classes=10))
    mismatch = r"2 shape mismatches \(first: head\.2\.weight is \(5, 512\) but the model's is \(10, 512\)\)"
    with pytest.raises(ValueError, match=mismatch):
        export.load_model(wrong_head)
    bad_input = write_checkpoint(tmp_path / "c.pt", small_model(), input_config={"size": 28})
    with pytest.raises(ValueError, match=r"has input .*; expected \{'size': \[H, W\]"):
        export.load_model(bad_input)


def test_refuses_missing_or_foreign_sources(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="has no checkpoint.pt; expected a directory written by"):
        export.load_model(tmp_path)
    (tmp_path / "demo" / "train").mkdir(parents=True)  # a demo run keeps its training run in train/
    (tmp_path / "demo" / "train" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"demo has no checkpoint.pt \(.*demo/train holds one\); expected"):
        export.load_model(tmp_path / "demo")
    with pytest.raises(FileNotFoundError, match="does not exist; expected a run directory or a checkpoint file"):
        export.load_model(tmp_path / "nothing")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot be loaded as a checkpoint"):
        export.load_model(tmp_path / "notes.txt")
    assert cli.main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("resnet-deploy export: error: ")


@pytest.mark.parametrize("edit,message", [
    ({"drop": "num_classes"}, "missing keys num_classes;"),
    ({"add": "depth"}, "unexpected keys depth;"),
    ({"drop": "arch", "add": "width"}, "missing keys arch and unexpected keys width;"),
])
def test_refuses_a_malformed_model_entry(tmp_path, capsys, edit, message):
    model = small_model()
    config = dict(model.config)
    config.pop(edit.get("drop"), None)
    if "add" in edit:
        config[edit["add"]] = 1
    path = write_checkpoint(tmp_path / "a.pt", model, config=config)
    assert cli.main(["export", str(path), "--out", str(tmp_path / "out")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"resnet-deploy export: error: {path} has a model entry with ")
    assert message in error[0]
    assert not (tmp_path / "out").exists()


def test_parity_checks_report_the_batch_sizes_that_ran():
    ran = []

    def candidate(x):
        ran.append(len(x))
        return x

    report = export.compare(lambda x: x, {"same": candidate}, torch.randn(5, 4), batch_sizes=(1, 7))
    assert sorted(set(ran)) == [1, 5]  # 7 asked, but 5 images make one batch of 5
    assert [check["batch_size"] for check in report["checks"]] == [1, 5]
    report = export.compare(lambda x: x, {"same": candidate}, torch.randn(1, 4), batch_sizes=(1, 7))
    assert [check["batch_size"] for check in report["checks"]] == [1]


def test_export_says_when_it_passes_over_a_missing_data_dir_as_train_does(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "SYSTEM_DIR", make_dataset(tmp_path / "system"))
    checkpoint = write_checkpoint(tmp_path / "checkpoint.pt", small_model())
    missing = tmp_path / "nonexistent"
    assert cli.main(["export", str(checkpoint), "--out", str(tmp_path / "out"), "--parity-images", "5",
                     "--data-dir", str(missing)]) == 0
    printed = capsys.readouterr().out
    note = f"Fashion-MNIST from {tmp_path / 'system'} (passed over --data-dir {missing} (does not exist))"
    assert note in printed
    assert "batch 5 " in printed and "batch 7" not in printed
    assert cli.main(["train", "--data-dir", str(missing), "--out", str(tmp_path / "run"), "--epochs", "1",
                     "--batch-size", "8", "--image-size", "16", "--threads", "1", "--no-progress",
                     "--no-download"]) == 0
    assert note in capsys.readouterr().out  # the same note in training
