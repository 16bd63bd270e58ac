"""The C++ runner: built once per session with CMake (CPU-only), then checked against Python's predictions."""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import write_idx
from test_export import INPUT, small_model

from resnet_deploy import data, export

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")

REPO = Path(__file__).resolve().parent.parent
BUILD_DIR = REPO / "build" / "cpp-test"  # kept between sessions: later builds are incremental


@pytest.fixture(scope="session")
def runner() -> Path:
    """The resnet_deploy_infer program, built CPU-only against the pip torch's libtorch."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if shutil.which("cmake") is None or compiler is None:
        pytest.skip("cmake or a C++ compiler is not installed; the C++ runner cannot be built")
    configure = ["cmake", "-S", str(REPO), "-B", str(BUILD_DIR), "-DRESNET_DEPLOY_CUDA=OFF",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if shutil.which("ninja") and not (BUILD_DIR / "Makefile").exists():
        configure += ["-G", "Ninja"]
    started = time.perf_counter()
    for command in (configure, ["cmake", "--build", str(BUILD_DIR), "-j2"]):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    print(f"C++ runner built in {time.perf_counter() - started:.0f} s")
    return BUILD_DIR / "resnet_deploy_infer"


def run(runner: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(runner), *map(str, args)], capture_output=True, text=True, timeout=300)


def fake_test_set(tmp_path: Path, count: int = 100):
    """(images.gz, labels.gz, uint8 images, labels): Fashion-MNIST-like test files."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (count,), dtype=torch.uint8, generator=generator)
    return (write_idx(tmp_path / "images-idx3-ubyte.gz", images), write_idx(tmp_path / "labels-idx1-ubyte.gz", labels),
            images, labels.long())


def scripted_model(tmp_path: Path, size) -> tuple:
    """(model, model.torchscript.pt path) for an input size, as export writes it."""
    model = small_model()
    input_config = dict(INPUT, size=[size, size])
    path = tmp_path / export.TORCHSCRIPT
    export.script_model(model, input_config, data.CLASSES).save(str(path))
    return model, input_config, path


def read_predictions(path: Path) -> torch.Tensor:
    return torch.tensor([int(line) for line in path.read_text().split()])


@pytest.mark.parametrize("size", [28, 20])  # native, and a resize (antialiased, as in training)
def test_runner_reproduces_python_predictions(runner, tmp_path, size):
    model, input_config, model_path = scripted_model(tmp_path, size)
    images_path, labels_path, images, labels = fake_test_set(tmp_path)
    with torch.no_grad():
        expected = model(data.preprocess(images, [size, size], INPUT["mean"], INPUT["std"])).argmax(1)

    result = run(runner, model_path, "--images", images_path, "--labels", labels_path, "--batch-size", 32,
                 "--predictions", tmp_path / "predictions.txt", "--threads", 1)
    assert result.returncode == 0, result.stderr
    assert torch.equal(read_predictions(tmp_path / "predictions.txt"), expected)
    correct = int((expected == labels).sum())
    assert f"accuracy: {correct / 100:.4f} ({correct}/100)" in result.stdout
    assert f"input 1x{size}x{size}" in result.stdout and "latency per batch (ms): p50" in result.stdout
    first = ", ".join(f"{int(c)} {data.CLASSES[c]}" for c in expected[:5])
    assert f"first predictions: {first}\n" in result.stdout


def test_runner_reads_raw_float32_inputs(runner, tmp_path):
    model, _, model_path = scripted_model(tmp_path, 28)
    inputs = torch.randn(9, 1, 28, 28)
    inputs.numpy().tofile(tmp_path / "inputs.f32")
    result = run(runner, model_path, "--raw", tmp_path / "inputs.f32", "--batch-size", 4,
                 "--predictions", tmp_path / "predictions.txt")
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        assert torch.equal(read_predictions(tmp_path / "predictions.txt"), model(inputs).argmax(1))
    assert "accuracy" not in result.stdout


def test_runner_reports_user_errors_in_one_line(runner, tmp_path):
    _, _, model_path = scripted_model(tmp_path, 28)
    images_path, labels_path, _, _ = fake_test_set(tmp_path, count=10)

    def error_of(*args) -> str:
        result = run(runner, *args)
        assert result.returncode == 1
        return result.stderr.splitlines()[0]

    assert "no model at" in error_of(tmp_path / "missing.pt", "--images", images_path)
    assert "give exactly one of --images" in error_of(model_path)
    (tmp_path / "short.f32").write_bytes(b"\0" * 100)
    assert "expected a positive multiple of 3136" in error_of(model_path, "--raw", tmp_path / "short.f32")
    (tmp_path / "cut.gz").write_bytes(images_path.read_bytes()[:-200])
    assert "cut.gz" in error_of(model_path, "--images", tmp_path / "cut.gz")
    assert "expected one label per image" in error_of(model_path, "--images", images_path, "--labels",
                                                     write_idx(tmp_path / "l.gz", torch.zeros(3, dtype=torch.uint8)))
    plain = tmp_path / "plain.pt"
    torch.jit.script(small_model()).save(str(plain))
    assert "has no attribute 'input_shape'" in error_of(plain, "--images", images_path)
    assert "--batch-size must be an integer of at least 1" in error_of(model_path, "--images", images_path,
                                                                       "--batch-size", "0")
    cores = len(os.sched_getaffinity(0))
    assert f"--threads must be at most {cores}, the cores this process may use, got 100000" in error_of(
        model_path, "--images", images_path, "--threads", "100000")
    assert f"--threads must be at most {cores}, the cores this process may use, got 4294967297" in error_of(
        model_path, "--images", images_path, "--threads", "4294967297")  # 1 once narrowed to 32 bits
    no_images = write_idx(tmp_path / "none.gz", torch.zeros(0, 28, 28, dtype=torch.uint8))
    assert "no images in" in error_of(model_path, "--images", no_images)


def test_runner_keeps_freed_memory_unless_told_not_to(runner, tmp_path):
    _, _, model_path = scripted_model(tmp_path, 28)
    images_path, _, _, _ = fake_test_set(tmp_path, count=8)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    default = subprocess.run([str(runner), model_path, "--images", images_path], capture_output=True, text=True,
                             env=clean)
    opted_out = subprocess.run([str(runner), model_path, "--images", images_path, "--system-malloc"],
                               capture_output=True, text=True, env=clean)
    users_own = subprocess.run([str(runner), model_path, "--images", images_path], capture_output=True, text=True,
                               env={**clean, "MALLOC_ARENA_MAX": "2"})
    assert default.returncode == opted_out.returncode == users_own.returncode == 0
    assert "malloc: retain\n" in default.stdout
    assert "malloc: system\n" in opted_out.stdout
    assert "malloc: user (MALLOC_ARENA_MAX is set)\n" in users_own.stdout
