"""Shared fixtures: small Fashion-MNIST-like idx files written by the tests, and isolation from the real
dataset and the network."""
import gzip
from pathlib import Path

import pytest
import torch

from resnet_deploy import data

REAL_DATASET = Path("/usr/share/datasets/fashion-mnist")
requires_real_dataset = pytest.mark.skipif(
    not all((REAL_DATASET / f"{name}.gz").is_file() for name in data.FILES.values()),
    reason=f"the real Fashion-MNIST is not installed in {REAL_DATASET} (apt-get install dataset-fashion-mnist)")


def write_idx(path: Path, array: torch.Tensor) -> Path:
    """array (uint8) as an idx file, gzip-compressed when path ends in .gz."""
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.contiguous().numpy().tobytes()
    if path.suffix == ".gz":
        raw = gzip.compress(raw, compresslevel=1)
    path.write_bytes(raw)
    return path


def make_dataset(directory: Path, train: int = 64, test: int = 32, size: int = 28, gz: bool = True,
                 seed: int = 0) -> Path:
    """A tiny learnable stand-in: class c is a bright horizontal band at row height c, plus noise."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for split, count in (("train", train), ("t10k", test)):
        labels = torch.arange(count, dtype=torch.uint8) % 10
        images = torch.randint(0, 60, (count, size, size), generator=generator, dtype=torch.uint8)
        for i, label in enumerate(labels.tolist()):
            row = label * size // 10
            images[i, row:row + max(1, size // 10)] = 255
        suffix = ".gz" if gz else ""
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels)
    return directory


@pytest.fixture(autouse=True)
def no_real_dataset_or_network(monkeypatch, tmp_path):
    """Tests see only the data they make: no $RESNET_DEPLOY_DATA, no system dataset, no downloads."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "no-system-dataset")
    monkeypatch.setattr(data, "DOWNLOAD_DIR", tmp_path / "no-download")

    def no_download(root):
        raise RuntimeError("downloads are disabled in tests")

    monkeypatch.setattr(data, "_download", no_download)


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    return make_dataset(tmp_path / "fashion-mnist")


@pytest.fixture(autouse=True, scope="session")
def own_compile_cache(tmp_path_factory):
    """torch.compile keeps compiled graphs across processes (/tmp/torchinductor_$USER) under keys that leave out
    custom operators' schemas (pytorch/pytorch#144344): a backward compiled against another build of the operators
    would be replayed with that build's arguments. Each test session compiles into a directory of its own."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("torchinductor")))
    yield
    patch.undo()
