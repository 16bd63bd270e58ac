"""The inputs `resnet-deploy infer` reads, one batch at a time, so memory stays flat however large they are.

  idx file   uint8 images (N, H, W), gzip-compressed when the name ends in .gz, as Fashion-MNIST ships
             them. Labels: --labels, or else the sibling file named with "labels-idx1" for "images-idx3".
  .npy file  a uint8 array (N, H, W), (N, 1, H, W), (N, H * W) (rows of flattened images of the model's
             size, when open_input is given it) or one image (H, W), read through a memory map.
             Labels: --labels (.npy or idx).
  folder     PNG and JPEG images, searched recursively in name order, converted to 8-bit grayscale (16-bit
             grayscale scaled from 0..65535). An image in a folder named after a class (case, spaces and
             punctuation aside: "t-shirt_top" is "T-shirt/top") has that label. Files that do not decode
             are skipped and listed in `unreadable`; hidden files and folders (names starting with ".") are
             passed over.

open_input(path, classes, labels) checks what it can before the first batch (headers, shapes, dtypes,
counts) and raises one-sentence ValueErrors; InputSource.batches(batch_size, prepare) yields Batch objects.
"""
import gzip
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_IDX_UBYTE = 0x08


@dataclass
class Batch:
    images: Union[np.ndarray, List[Any]]  # uint8 (N, H, W); from a folder, a list of what prepare made of each image
    names: List[str]                              # index in the file, or path relative to the folder
    labels: Optional[np.ndarray]                  # int64 (N,), -1 where unknown; None when there are no labels

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class InputSource:
    """count: images the input holds (for a folder: image files, readable or not); unreadable: (name,
    reason) of the files skipped so far; has_labels: whether batches carry labels."""
    path: Path
    kind: str
    count: int
    has_labels: bool
    labels_path: Optional[Path] = None
    unreadable: List[Tuple[str, str]] = field(default_factory=list)
    ignored: int = 0  # files in a folder that are not PNG or JPEG

    def batches(self, batch_size: int, prepare: Callable[[np.ndarray], Any] = lambda image: image) -> Iterator[Batch]:
        """Batches of up to batch_size images. A folder's images, of any sizes, each go through prepare(image)
        (uint8 (H, W)) as soon as they are decoded, so that a batch holds what prepare makes of them (the
        model's input, say) rather than full-size pictures; an array's images come as one uint8 array."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ idx
class IdxFile:
    """An idx file of unsigned bytes, read item by item (an item: one image, or one label)."""

    def __init__(self, path: Path, ndim: int):
        self.path = path
        self.file = self._open()
        header = self._read(4, "its magic number")
        if header[0] != 0 or header[1] != 0 or header[2] != _IDX_UBYTE or header[3] != ndim:
            self.file.close()
            raise ValueError(f"{path} has magic number 0x{header.hex()}, expected 0x0000{_IDX_UBYTE:02x}{ndim:02x} "
                             f"(an idx file of unsigned bytes with {ndim} dimension{'s' if ndim > 1 else ''})")
        self.shape = tuple(int.from_bytes(self._read(4, "its header"), "big") for _ in range(ndim))
        self.item_shape = self.shape[1:]
        if path.suffix != ".gz":  # the size of a compressed file says nothing until it is read
            expected = 4 + 4 * ndim + math.prod(self.shape)
            if path.stat().st_size != expected:
                self.file.close()
                raise ValueError(f"{path} is {path.stat().st_size} bytes but its header (shape {list(self.shape)}) "
                                 f"promises {expected}; the file is truncated or corrupt")

    def _open(self) -> BinaryIO:
        try:
            return gzip.open(self.path, "rb") if self.path.suffix == ".gz" else open(self.path, "rb")
        except OSError as error:
            raise ValueError(f"{self.path} cannot be opened ({error}); expected a readable idx file") from error

    def _read(self, size: int, what: str) -> bytes:
        try:
            raw = self.file.read(size)
        except (OSError, EOFError) as error:  # gzip: BadGzipFile is an OSError, a cut archive an EOFError
            raise ValueError(f"{self.path} cannot be read at {what} ({error}); expected an intact idx file, "
                             f"gzip-compressed when the name ends in .gz") from error
        if len(raw) != size:
            raise ValueError(f"{self.path} ends early, at {what}; the file is truncated")
        return raw

    def chunks(self, items: int) -> Iterator[np.ndarray]:
        """Arrays of up to `items` items, in order; the file is closed at the end."""
        item_bytes = math.prod(self.item_shape)
        try:
            for start in range(0, self.shape[0], items):
                count = min(items, self.shape[0] - start)
                raw = self._read(count * item_bytes, f"item {start}")
                yield np.frombuffer(raw, dtype=np.uint8).reshape(count, *self.item_shape)
        finally:
            self.file.close()


def _sibling_labels(path: Path) -> Optional[Path]:
    if "images-idx3" not in path.name:
        return None
    candidate = path.with_name(path.name.replace("images-idx3", "labels-idx1"))
    return candidate if candidate.is_file() else None


# ------------------------------------------------------------------------------------------------- npy
def _open_npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path} cannot be read as a .npy array ({error}); expected an array saved by numpy.save "
                         f"holding {what}") from error


def _npy_images(path: Path, image_size: Optional[Tuple[int, int]]) -> np.ndarray:
    array = _open_npy(path, "uint8 images")
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    elif array.ndim == 2 and image_size and array.shape[1] == math.prod(image_size) and array.shape != image_size:
        array = array.reshape(len(array), *image_size)  # (N, H * W): one flattened image per row
    elif array.ndim == 2:
        if max(array.shape) > 16 * min(array.shape):
            raise ValueError(f"{path} holds one image of {array.shape[0]}x{array.shape[1]} pixels, too narrow for a "
                             f"picture; if each row is a flattened image, reshape the array to (N, H, W) first")
        array = array[None]
    if array.dtype != np.uint8 or array.ndim != 3:
        raise ValueError(f"{path} holds a {array.dtype} array of shape {array.shape}; expected uint8 grayscale pixels "
                         f"of shape (N, H, W), (N, 1, H, W), (N, H * W) or (H, W)")
    return array


# --------------------------------------------------------------------------------------------- labels
class _Labels:
    """Labels from an idx or .npy file, read in step with the images."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".npy":
            self.array = _open_npy(path, "integer labels")
            if self.array.ndim != 1 or self.array.dtype.kind not in "iu":
                raise ValueError(f"{path} holds a {self.array.dtype} array of shape {self.array.shape}; expected "
                                 f"integer labels of shape (N,)")
            self.count = len(self.array)
        else:
            self.idx = IdxFile(path, ndim=1)
            self.count = self.idx.shape[0]

    def chunks(self, items: int) -> Iterator[np.ndarray]:
        if self.path.suffix == ".npy":
            for start in range(0, self.count, items):
                yield np.asarray(self.array[start:start + items], dtype=np.int64)
        else:
            for chunk in self.idx.chunks(items):
                yield chunk.astype(np.int64)


def _open_labels(path: Union[str, Path], images: int, images_path: Path) -> _Labels:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist; expected an idx or .npy file of labels")
    labels = _Labels(path)
    if labels.count != images:
        raise ValueError(f"{path} holds {labels.count} labels but {images_path} holds {images} images; expected "
                         f"one label per image")
    return labels


class _ArraySource(InputSource):
    """idx and .npy images: chunks of one uniform array, with labels read alongside."""

    def __init__(self, path: Path, kind: str, count: int, chunks, labels: Optional[_Labels]):
        super().__init__(path, kind, count, labels is not None, labels.path if labels else None)
        self._chunks, self._labels = chunks, labels

    def batches(self, batch_size: int, prepare: Callable[[np.ndarray], Any] = lambda image: image) -> Iterator[Batch]:
        label_chunks = self._labels.chunks(batch_size) if self._labels else None
        start = 0
        for images in self._chunks(batch_size):
            labels = next(label_chunks) if label_chunks else None
            yield Batch(np.ascontiguousarray(images), [str(i) for i in range(start, start + len(images))], labels)
            start += len(images)


# ---------------------------------------------------------------------------------------------- folder
def _normalize(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def read_image(path: Path) -> np.ndarray:
    """An image file as uint8 grayscale (H, W); raises whatever the decoder raises for a bad file."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()  # decode now, so a truncated file fails here
        if image.mode.startswith("I"):
            # 16-bit grayscale ("I;16"; older Pillow opens 16-bit PNGs as 32-bit "I"): convert("L") would clip
            # at 255, so scale 0..65535 to 0..255 instead, rounded, which maps v * 257 back to v.
            pixels = np.asarray(image).astype(np.int64).clip(0, 65535)
            return ((pixels * 255 + 32767) // 65535).astype(np.uint8)
        return np.asarray(image.convert("L"))


class _FolderSource(InputSource):
    def __init__(self, path: Path, files: List[Path], labels: Optional[List[int]], ignored: int):
        super().__init__(path, "folder", len(files), labels is not None, ignored=ignored)
        self._files, self._labels = files, labels

    def batches(self, batch_size: int, prepare: Callable[[np.ndarray], Any] = lambda image: image) -> Iterator[Batch]:
        for start in range(0, len(self._files), batch_size):
            images, names, labels = [], [], []
            for index in range(start, min(start + batch_size, len(self._files))):
                file = self._files[index]
                name = file.relative_to(self.path).as_posix()
                try:
                    image = read_image(file)
                except Exception as error:  # any decoder failure means the same: this file is unreadable
                    self.unreadable.append((name, f"{type(error).__name__}: {error}"))
                    continue
                images.append(prepare(image))
                names.append(name)
                if self._labels is not None:
                    labels.append(self._labels[index])
            if names:
                yield Batch(images, names, np.asarray(labels, dtype=np.int64) if self._labels is not None else None)


def _folder_labels(root: Path, files: Sequence[Path], classes: Sequence[str]) -> Optional[List[int]]:
    """The class of each image's folder (-1 when the folder names no class), or None when no folder does."""
    by_name = {_normalize(name): index for index, name in enumerate(classes)}
    labels = [by_name.get(_normalize(file.parent.name), -1) if file.parent != root else -1 for file in files]
    return labels if any(label >= 0 for label in labels) else None


# ------------------------------------------------------------------------------------------------ open
def open_input(path: Union[str, Path], classes: Sequence[str] = (), labels: Optional[Union[str, Path]] = None,
               image_size: Optional[Tuple[int, int]] = None) -> InputSource:
    """The input at path (an idx file, a .npy file or a folder of images), checked as far as can be
    without reading it all. classes name the folders that give images their labels; image_size (H, W), the
    model's, lets a 2-D .npy array of width H * W be read as rows of flattened images instead of one image."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist; expected an idx file, a .npy file or a folder of "
                                f"PNG/JPEG images")
    if path.is_dir():
        if labels is not None:
            raise ValueError("--labels applies to idx and .npy inputs; a folder's labels come from its class-named "
                             "subfolders")
        # Hidden files and folders (.ipynb_checkpoints/, macOS's ._name resource forks) are not the user's images.
        candidates = sorted(p for p in path.rglob("*")
                            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        files = [p for p in candidates if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise ValueError(f"{path} holds no PNG or JPEG images ({len(candidates)} other files); expected image "
                             f"files named *.png, *.jpg or *.jpeg")
        return _FolderSource(path, files, _folder_labels(path, files, classes), len(candidates) - len(files))
    if path.suffix == ".npy":
        array = _npy_images(path, tuple(image_size) if image_size else None)
        label_file = _open_labels(labels, len(array), path) if labels is not None else None

        def chunks(items: int) -> Iterator[np.ndarray]:
            for start in range(0, len(array), items):
                yield array[start:start + items]
        return _ArraySource(path, "npy", len(array), chunks, label_file)
    if "idx" in path.name or path.suffix == ".gz":
        idx = IdxFile(path, ndim=3)
        labels = labels if labels is not None else _sibling_labels(path)
        try:
            label_file = _open_labels(labels, idx.shape[0], path) if labels is not None else None
        except (ValueError, OSError):
            idx.file.close()
            raise
        return _ArraySource(path, "idx", idx.shape[0], idx.chunks, label_file)
    raise ValueError(f"{path} is neither an idx file (a name with 'idx', or ending in .gz), a .npy file nor a folder; "
                     f"expected one of those")
