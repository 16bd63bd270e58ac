"""Fashion-MNIST: finding and validating the idx files, batched pre-processing and in-memory loaders.

The whole dataset lives in memory as uint8 tensors (47 MB); batches are augmented, resized and normalized
with tensor ops on whole batches, so two CPU cores spend their time on the model, not on PIL.
"""
import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Pixel mean and standard deviation of the training images, scaled to [0, 1].
MEAN, STD = 0.2860, 0.3530

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
ENV_VAR = "RESNET_DEPLOY_DATA"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
DOWNLOAD_DIR = Path.home() / ".cache" / "resnet-deploy"

_IDX_UBYTE = 0x08  # the idx type code of unsigned bytes, the only one Fashion-MNIST uses


class DatasetNotFoundError(FileNotFoundError):
    """No location holds the four Fashion-MNIST idx files."""


@dataclass
class Split:
    """One split in memory: images (N, H, W) uint8 and labels (N,) int64."""
    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)


# ---------------------------------------------------------------------------------------------- idx files
def read_idx(path: Union[str, Path], ndim: int) -> Tensor:
    """The uint8 tensor stored in an idx file (gzip-compressed when the name ends in .gz), validated.

    ndim is what the caller expects: 3 for images, 1 for labels.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:  # truncated archives raise EOFError
        raise ValueError(f"{path} cannot be read as an idx file ({error}); expected an intact "
                         f"Fashion-MNIST file, so re-download or re-install it") from error
    header = 4 + 4 * ndim
    if len(raw) < 4:
        raise ValueError(f"{path} is {len(raw)} bytes, too short for an idx header of {header} bytes")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise ValueError(f"{path} has magic number 0x{raw[:4].hex()}, expected 0x0000{_IDX_UBYTE:02x}{ndim:02x} "
                         f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''})")
    if len(raw) < header:
        raise ValueError(f"{path} is {len(raw)} bytes, too short for an idx header of {header} bytes")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise ValueError(f"{path} is {len(raw)} bytes but its header (shape {dims}) promises {expected}; "
                         f"the file is truncated or corrupt")
    # bytearray: torch.frombuffer wants a writable buffer
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header, count=expected - header).view(dims)


def _find_file(directory: Path, name: str) -> Optional[Path]:
    """name.gz or name in directory, or in directory/FashionMNIST/raw (torchvision's layout)."""
    for folder in (directory, directory / "FashionMNIST" / "raw"):
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
    return None


def _dataset_files(directory: Path) -> Tuple[dict, list]:
    """({key: path} of the files found, [names missing]) for one directory."""
    found, missing = {}, []
    for key, name in FILES.items():
        path = _find_file(directory, name)
        if path is None:
            missing.append(name)
        else:
            found[key] = path
    return found, missing


def _download(root: Path) -> None:
    """Fetch the idx files with torchvision (imported only here: it is needed for nothing else)."""
    from torchvision.datasets import FashionMNIST

    for train in (True, False):
        FashionMNIST(str(root), train=train, download=True)


def _one_line(error: Exception) -> str:
    """torchvision's download error spans lines, one per mirror tried: its first and last (the cause) in one."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def find_dataset(data_dir: Optional[Union[str, Path]] = None, download: bool = True,
                 log: Optional[Callable[[str], None]] = None) -> dict:
    """Paths of the four idx files: from data_dir, then $RESNET_DEPLOY_DATA, then /usr/share/datasets/
    fashion-mnist, then a torchvision download (into data_dir, $RESNET_DEPLOY_DATA or ~/.cache/resnet-deploy).

    log, if given, is told where the files were found and which configured places were passed over (so a
    mistyped --data-dir is visible). Raises DatasetNotFoundError naming every place tried when none has them.
    """
    env_dir = os.environ.get(ENV_VAR) or None
    places = [("--data-dir", data_dir), (f"${ENV_VAR}", env_dir), ("the system dataset", SYSTEM_DIR)]
    tried, passed_over = [], []

    def found_in(files: dict) -> dict:
        if log is not None:
            log(f"Fashion-MNIST from {files['train_images'].parent}"
                + (f" (passed over {'; '.join(passed_over)})" if passed_over else ""))
        return files

    for label, directory in places:
        if directory is None:
            tried.append(f"{label} (not set)")
            continue
        found, missing = _dataset_files(Path(directory))
        if not missing:
            return found_in(found)
        what = "does not exist" if not Path(directory).is_dir() else f"lacks {', '.join(missing)}"
        tried.append(f"{label} {directory} ({what})")
        passed_over.append(tried[-1])

    target = Path(data_dir or env_dir or DOWNLOAD_DIR)
    if download:
        made = [path for path in (target, *target.absolute().parents) if not path.exists()]  # deepest first
        try:
            _download(target)
            found, missing = _dataset_files(target)
            if not missing:
                return found_in(found)
            tried.append(f"a torchvision download into {target} (it left out {', '.join(missing)})")
        except Exception as error:  # offline, proxy, DNS, ...: all mean "no download", reported below
            tried.append(f"a torchvision download into {target} (failed: {_one_line(error)})")
        # No empty folders left behind a download that got nothing: rmdir removes only empty ones.
        for folder in (target / "FashionMNIST" / "raw", target / "FashionMNIST", *made):
            try:
                folder.rmdir()
            except OSError:
                pass
    else:
        tried.append("a torchvision download (disabled)")
    raise DatasetNotFoundError(
        f"Fashion-MNIST not found: tried {'; '.join(tried)}; expected the four idx files "
        f"({', '.join(FILES.values())}, optionally .gz) in one of them: install the Debian package "
        f"dataset-fashion-mnist or pass --data-dir")


def load_fashion_mnist(data_dir: Optional[Union[str, Path]] = None, download: bool = True,
                       num_classes: int = len(CLASSES), log: Optional[Callable[[str], None]] = None
                       ) -> Tuple[Split, Split]:
    """(train, test) Splits from the first location find_dataset finds, validated against each other."""
    files = find_dataset(data_dir, download, log)
    splits = []
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"], ndim=3)
        labels = read_idx(files[f"{split}_labels"], ndim=1)
        if len(images) != len(labels):
            raise ValueError(f"{files[f'{split}_images']} holds {len(images)} images but "
                             f"{files[f'{split}_labels']} holds {len(labels)} labels; expected one label per image")
        if len(labels) == 0:
            raise ValueError(f"{files[f'{split}_labels']} holds no examples; expected at least one")
        if int(labels.max()) >= num_classes:
            raise ValueError(f"{files[f'{split}_labels']} has label {int(labels.max())}; "
                             f"expected labels 0 to {num_classes - 1}")
        splits.append(Split(images, labels.long()))
    train, test = splits
    if train.images.shape[1:] != test.images.shape[1:]:
        raise ValueError(f"training images are {tuple(train.images.shape[1:])} but test images are "
                         f"{tuple(test.images.shape[1:])}; expected one image size")
    return train, test


# ---------------------------------------------------------------------------------------- pre-processing
def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def preprocess(images: Tensor, size: Union[int, Sequence[int]], mean: float = MEAN, std: float = STD) -> Tensor:
    """uint8 images (N, H, W) or (N, C, H, W) -> float32 (N, C, *size), scaled to [0, 1], resized, normalized.

    The one pre-processing of training, evaluation and inference: bilinear resize of the whole batch
    (antialiased, so shrinking large images matches PIL), then (x - mean) / std.
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"preprocess: images must be uint8 pixels, got {images.dtype}")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ValueError(f"preprocess: images must be (N, H, W) or (N, C, H, W), got shape {tuple(images.shape)}")
    x = images.float().div_(255)
    size = _pair(size)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x.sub_(mean).div_(std)


def augment(images: Tensor, generator: torch.Generator, pad: int = 2, flip: bool = True) -> Tensor:
    """Random crop with zero padding and random horizontal flip of a uint8 batch (N, H, W), per image."""
    n, h, w = images.shape
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator)
        rows = dy + torch.arange(h).view(1, h, 1)
        cols = dx + torch.arange(w).view(1, 1, w)
        images = padded[torch.arange(n).view(n, 1, 1), rows, cols]  # every image its own window
    if flip:
        mirrored = torch.rand(n, generator=generator) < 0.5
        images = torch.where(mirrored.view(n, 1, 1), images.flip(-1), images)
    return images


# --------------------------------------------------------------------------------------------- loading
class Loader:
    """Batches (float32 NCHW images, int64 labels) of a Split, in the order its sampler gives.

    sampler is any iterable of indices: a DistributedSampler for training (shuffled by seed and epoch,
    sharded over processes), a range for evaluation. Augmentation draws from its own generator seeded by
    (seed, epoch, rank), so an epoch's batches are the same whether or not the run was resumed.
    """

    def __init__(self, split: Split, batch_size: int, sampler: Iterable[int], size: Union[int, Sequence[int]],
                 mean: float = MEAN, std: float = STD, augment: bool = False, drop_last: bool = False,
                 seed: int = 0, rank: int = 0, device: Union[str, torch.device] = "cpu"):
        self.split, self.batch_size, self.sampler = split, batch_size, sampler
        self.size, self.mean, self.std = size, mean, std
        self.augment, self.drop_last = augment, drop_last
        self.seed, self.rank, self.epoch = seed, rank, 0
        self.device = torch.device(device)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1009 + self.rank)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            images, labels = self.split.images[index], self.split.labels[index]
            if self.augment:
                images = augment(images, generator)
            images = preprocess(images.to(self.device), self.size, self.mean, self.std)
            yield images, labels.to(self.device)
