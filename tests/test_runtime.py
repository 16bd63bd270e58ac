"""The runtime: every backend loads an artifact directory, pre-processes as its manifest says and agrees with
the unfused reference; threads are set per backend; bad directories and batches are refused in one sentence.

shared_artifacts() exports one small random ResNet-18 per test session (test_infer, test_bench reuse it)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_export import small_model

from resnet_deploy import cli, data, export, runtime

_ARTIFACTS = {}


def shared_artifacts(tmp_path_factory) -> Path:
    """Artifacts of a small random ResNet-18 (28x28 inputs), exported once per session on synthetic images."""
    if "dir" not in _ARTIFACTS:
        root = tmp_path_factory.mktemp("artifacts")
        with pytest.MonkeyPatch.context() as patch:  # parity on synthetic images, never the real dataset
            patch.setattr(data, "SYSTEM_DIR", root / "no-dataset")
            patch.delenv(data.ENV_VAR, raising=False)
            export.export_model(small_model(), root / "out", {"size": [28, 28], "mean": data.MEAN, "std": data.STD},
                                data.CLASSES, parity_count=8)
        _ARTIFACTS["dir"] = root / "out"
    return _ARTIFACTS["dir"]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference(artifacts):
    """The eager (unfused) predictor, which every other backend must agree with."""
    return runtime.load(artifacts, "eager", threads=1)


@pytest.mark.parametrize("backend", [b for b in runtime.BACKENDS if b != "torch.compile"])
def test_backends_agree_with_the_unfused_reference(artifacts, reference, images, backend):
    predictor = runtime.load(artifacts, backend, threads=1)
    assert predictor.backend == backend and predictor.device == "cpu" and predictor.classes == data.CLASSES
    for count in (1, 5):  # batch 1 and another size: the batch axis is dynamic everywhere
        batch = predictor.preprocess(images[:count])
        logits = predictor.predict(batch)
        assert logits.shape == (count, 10) and logits.dtype == torch.float32
        torch.testing.assert_close(logits, reference.predict(batch), atol=1e-3, rtol=1e-3)


def test_torch_compile_backend_agrees_with_the_reference(artifacts, reference, images):
    predictor = runtime.load(artifacts, "torch.compile", threads=2)
    batch = predictor.preprocess(images[:3])
    torch.testing.assert_close(predictor.predict(batch), reference.predict(batch), atol=1e-3, rtol=1e-3)


def test_preprocess_follows_the_manifest(artifacts, images, tmp_path):
    predictor = runtime.load(artifacts, "eager", threads=1)
    expected = data.preprocess(torch.from_numpy(images), 28, data.MEAN, data.STD)
    torch.testing.assert_close(predictor.preprocess(images), expected)

    # Images of other sizes are resized one by one, with the same function as a batch.
    mixed = [images[0], np.zeros((40, 30), np.uint8)]
    batch = predictor.preprocess(mixed)
    assert batch.shape == (2, 1, 28, 28)
    torch.testing.assert_close(batch[1:], data.preprocess(torch.zeros(1, 40, 30, dtype=torch.uint8), 28,
                                                          data.MEAN, data.STD))

    # Size, mean and std are read from the manifest, not assumed.
    changed = tmp_path / "changed"
    shutil.copytree(artifacts, changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["preprocess"].update(size=[32, 32], mean=0.5, std=0.25)
    (changed / "manifest.json").write_text(json.dumps(manifest))
    runtime.read_manifest(changed)  # still valid: the sha256 sums cover the artifacts, not the manifest
    resized = runtime.load(changed, "eager", threads=1).preprocess(images)
    torch.testing.assert_close(resized, data.preprocess(torch.from_numpy(images), 32, 0.5, 0.25))


def test_threads_are_set_per_backend(artifacts, images):
    one = runtime.load(artifacts, "torchscript", threads=1)
    two = runtime.load(artifacts, "eager-fused", threads=2)
    batch = one.preprocess(images)
    one.predict(batch)
    assert torch.get_num_threads() == 1
    two.predict(batch)
    assert torch.get_num_threads() == 2
    one.predict(batch)
    assert torch.get_num_threads() == 1
    session = runtime.load(artifacts, "onnxruntime", threads=1).session
    options = session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert session.get_providers() == ["CPUExecutionProvider"]  # no GPU here
    assert runtime.load(artifacts, "eager").threads == runtime.available_cores()


def test_refusals(artifacts, tmp_path, images):
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'; expected one of eager, eager-fused"):
        runtime.load(artifacts, "tensorrt")
    cores = runtime.available_cores()
    for threads in (0, cores + 1, 100_000):  # thousands of threads hang ONNX Runtime or crash the process
        with pytest.raises(ValueError, match=f"--threads must be an integer from 1 to {cores}, the cores this "
                                             f"process may use; got {threads}"):
            runtime.load(artifacts, "onnxruntime", threads=threads)
    with pytest.raises(FileNotFoundError, match="does not exist; expected a directory written by `resnet-deploy"):
        runtime.load(tmp_path / "nowhere", "eager")
    with pytest.raises(FileNotFoundError, match="has no manifest.json; expected a directory written by"):
        runtime.load(tmp_path, "eager")
    with pytest.raises(NotADirectoryError, match="model.onnx is a file; expected the artifact directory that"):
        runtime.load(artifacts / "model.onnx", "eager")

    broken = tmp_path / "broken"
    shutil.copytree(artifacts, broken)
    (broken / "manifest.json").write_text('{"preprocess": {}}')
    with pytest.raises(ValueError, match="is not a valid manifest .*KeyError"):
        runtime.load(broken, "eager")

    tampered = tmp_path / "tampered"
    shutil.copytree(artifacts, tampered)
    with open(tampered / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="model.onnx does not match the sha256 in .*changed after export"):
        runtime.load(tampered, "onnxruntime")
    (tampered / "model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="model.onnx is missing; the manifest lists it"):
        runtime.load(tampered, "onnxruntime")

    predictor = runtime.load(artifacts, "eager", threads=1)
    with pytest.raises(ValueError, match=r"the batch must be float32 \(N, 1, 28, 28\) .*got torch.uint8"):
        predictor.predict(torch.from_numpy(images))
    with pytest.raises(ValueError, match=r"got torch.float32 \(2, 1, 32, 32\); use preprocess"):
        predictor.predict(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="images must be uint8 pixels"):
        predictor.preprocess(images.astype(np.float32))


@pytest.mark.parametrize("manifest_edit", ["no sha256 section", "onnx not listed", "torchscript not listed"])
def test_every_loaded_artifact_needs_a_sha256(artifacts, tmp_path, manifest_edit):
    copy = tmp_path / "copy"
    shutil.copytree(artifacts, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    if manifest_edit == "no sha256 section":
        del manifest["sha256"]
        missing = "model.torchscript.pt"
    else:
        missing = "model.onnx" if manifest_edit == "onnx not listed" else "model.torchscript.pt"
        del manifest["sha256"][missing]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / missing).write_bytes(b"replaced after export")  # unchecked, this would reach the loader
    with pytest.raises(ValueError, match=f"manifest.json has no sha256 for {missing}; expected the sha256 of every"):
        runtime.load(copy, "onnxruntime" if missing == "model.onnx" else "torchscript")


@pytest.mark.parametrize("backend,file", [("onnxruntime", "model.onnx"), ("torchscript", "model.torchscript.pt"),
                                          ("eager", "model.torchscript.pt")])
def test_corrupt_artifacts_are_refused_in_one_sentence(artifacts, tmp_path, backend, file, capsys):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(artifacts, corrupt)
    (corrupt / file).write_bytes((corrupt / file).read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=f"{file} is not a readable (TorchScript file|ONNX model); expected") as error:
        runtime.load(corrupt, backend, verify=False)
    assert error.value.__cause__ is not None  # the loader's own error stays available (RESNET_DEPLOY_DEBUG=1)
    # with sums that match the corrupt file (a manifest rewritten by hand), the command line still says it in a line
    manifest = json.loads((corrupt / "manifest.json").read_text())
    manifest["sha256"][file] = export.sha256(corrupt / file)
    (corrupt / "manifest.json").write_text(json.dumps(manifest))
    images_path = tmp_path / "images.npy"
    np.save(images_path, np.zeros((2, 28, 28), np.uint8))
    assert cli.main(["infer", str(corrupt), "--input", str(images_path), "--output", str(tmp_path / "p.csv"),
                     "--backend", backend, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("resnet-deploy infer: error: ") and f"{file} is not a readable" in err
    assert "\n" not in err
