"""resnet-deploy infer: the three input kinds, labels, CSV and JSON output, unreadable images, streaming, and
the refusals, on the session's small exported model."""
import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL_DATASET, make_dataset, requires_real_dataset, write_idx
from PIL import Image
from test_runtime import shared_artifacts

from resnet_deploy import cli, data, infer, inputs, runtime


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(artifacts):
    return runtime.load(artifacts, "eager", threads=1)


def read_csv(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def expected_classes(reference, images) -> list:
    return reference.predict(reference.preprocess(images)).argmax(1).tolist()


@pytest.mark.parametrize("gz", [True, False])
def test_idx_input_finds_its_labels_and_writes_csv(artifacts, reference, tmp_path, gz):
    dataset = make_dataset(tmp_path / "ds", train=10, test=40, gz=gz)
    images_path = dataset / f"t10k-images-idx3-ubyte{'.gz' if gz else ''}"
    summary = infer.infer(artifacts, images_path, tmp_path / "p.csv", backend="eager", batch_size=16,
                          progress=False, log=lambda line: None)
    rows = read_csv(tmp_path / "p.csv")
    assert list(rows[0])[:6] == ["name", "predicted", "class", "probability", "label", "label_class"]
    assert list(rows[0])[6:] == data.CLASSES
    assert [row["name"] for row in rows] == [str(i) for i in range(40)]

    images = data.read_idx(images_path, 3).numpy()
    labels = data.read_idx(dataset / f"t10k-labels-idx1-ubyte{'.gz' if gz else ''}", 1).tolist()
    predicted = expected_classes(reference, images)
    assert [int(row["predicted"]) for row in rows] == predicted
    assert [row["class"] for row in rows] == [data.CLASSES[p] for p in predicted]
    assert [int(row["label"]) for row in rows] == labels
    for row in rows:
        probabilities = [float(row[name]) for name in data.CLASSES]
        assert sum(probabilities) == pytest.approx(1, abs=1e-4)
        assert float(row["probability"]) == max(probabilities)

    accuracy = np.mean(np.array(predicted) == np.array(labels))
    assert summary["images"] == summary["labelled"] == 40 and summary["accuracy"] == pytest.approx(accuracy)
    assert np.array(summary["confusion"]).sum() == 40 and summary["unreadable"] == []


def test_npy_input_with_labels_writes_json(artifacts, reference, tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (7, 1, 28, 28), dtype=np.uint8)  # (N, 1, H, W) too
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", np.arange(7) % 10)
    summary = infer.infer(artifacts, tmp_path / "images.npy", tmp_path / "p.json", backend="onnxruntime",
                          batch_size=3, labels=tmp_path / "labels.npy", progress=False, log=lambda line: None)
    written = json.loads((tmp_path / "p.json").read_text())
    assert written["summary"] == summary and summary["kind"] == "npy" and summary["labelled"] == 7
    records = written["predictions"]
    assert [r["predicted"] for r in records] == expected_classes(reference, images[:, 0])
    assert [r["label"] for r in records] == list(range(7))
    assert records[2]["label_class"] == data.CLASSES[2]
    assert list(records[0]["probabilities"]) == data.CLASSES
    assert records[0]["probability"] == max(records[0]["probabilities"].values())

    np.save(tmp_path / "flat.npy", images.reshape(7, 28 * 28))  # one flattened image per row
    summary = infer.infer(artifacts, tmp_path / "flat.npy", tmp_path / "flat.csv", backend="eager", progress=False,
                          log=lambda line: None)
    assert summary["images"] == 7
    flat_rows = read_csv(tmp_path / "flat.csv")
    assert [int(row["predicted"]) for row in flat_rows] == expected_classes(reference, images[:, 0])

    np.save(tmp_path / "one.npy", images[0, 0])  # a single (H, W) image
    summary = infer.infer(artifacts, tmp_path / "one.npy", tmp_path / "one.csv", backend="eager", progress=False,
                          log=lambda line: None)
    assert summary["images"] == 1 and summary["accuracy"] is None
    assert read_csv(tmp_path / "one.csv")[0]["label"] == ""


def test_folder_input_labels_from_class_folders_and_skips_unreadable_images(artifacts, reference, tmp_path, capsys):
    rng = np.random.default_rng(2)
    root = tmp_path / "images"
    for folder in ("Trouser", "t-shirt_top", "other"):
        (root / folder).mkdir(parents=True)
    gray = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(gray).save(root / "Trouser" / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(root / "t-shirt_top" / "b.JPG")
    Image.fromarray(gray).save(root / "other" / "c.jpeg")
    Image.fromarray(gray).save(root / "d.png")
    (root / "bad.png").write_bytes(b"this is not a png")
    png = (root / "d.png").read_bytes()
    (root / "cut.png").write_bytes(png[: len(png) // 2])
    (root / "notes.txt").write_text("not an image")
    (root / ".ipynb_checkpoints").mkdir()  # hidden: passed over, not counted
    Image.fromarray(gray).save(root / ".ipynb_checkpoints" / "a-checkpoint.png")
    (root / "._d.png").write_bytes(b"a macOS resource fork")

    summary = infer.infer(artifacts, root, tmp_path / "p.csv", backend="torchscript", batch_size=2, progress=False)
    out = capsys.readouterr().out
    assert [u["name"] for u in summary["unreadable"]] == ["bad.png", "cut.png"]
    assert "unreadable image skipped: bad.png" in out and "unreadable image skipped: cut.png" in out
    assert "2 unreadable image(s) skipped: bad.png, cut.png" in out
    assert summary["images"] == 4 and summary["ignored_files"] == 1

    rows = {row["name"]: row for row in read_csv(tmp_path / "p.csv")}
    assert sorted(rows) == ["Trouser/a.png", "d.png", "other/c.jpeg", "t-shirt_top/b.JPG"]
    assert rows["Trouser/a.png"]["label_class"] == "Trouser" and rows["t-shirt_top/b.JPG"]["label_class"] == "T-shirt/top"
    assert rows["d.png"]["label"] == "" and rows["other/c.jpeg"]["label"] == ""
    assert summary["labelled"] == 2
    assert int(rows["d.png"]["predicted"]) == expected_classes(reference, gray[None])[0]
    # The colour JPEG of another size is converted to grayscale and resized by the manifest's pre-processing.
    jpeg = np.asarray(Image.open(root / "t-shirt_top" / "b.JPG").convert("L"))
    assert int(rows["t-shirt_top/b.JPG"]["predicted"]) == expected_classes(reference, [jpeg])[0]


def test_folder_batches_hold_each_image_as_prepared_when_decoded(tmp_path):
    """Memory stays flat: a batch holds what prepare made of each picture, never the full-size pictures."""
    rng = np.random.default_rng(3)
    for name, size in (("a.png", (300, 200)), ("b.png", (28, 28)), ("c.png", (90, 120))):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "d.png").write_bytes(b"not a png")
    source = inputs.open_input(tmp_path)
    decoded = []

    def prepare(image):
        decoded.append(image.shape)
        return image[:7, :7].copy()

    batches = list(source.batches(2, prepare))
    assert decoded == [(300, 200), (28, 28), (90, 120)]
    assert [[image.shape for image in batch.images] for batch in batches] == [[(7, 7), (7, 7)], [(7, 7)]]
    assert [name for name, _ in source.unreadable] == ["d.png"]


def test_idx_input_is_read_batch_by_batch(tmp_path):
    """Memory stays flat: no read of the images file asks for more than one batch."""
    dataset = make_dataset(tmp_path / "ds", train=10, test=50)
    source = inputs.open_input(dataset / "t10k-images-idx3-ubyte.gz")
    idx = source._chunks.__self__
    sizes = []
    real_read = idx.file.read

    def spy(size=-1):
        sizes.append(size)
        return real_read(size)

    idx.file.read = spy
    batches = list(source.batches(8))
    assert [len(b) for b in batches] == [8] * 6 + [2] and source.has_labels
    assert max(sizes) == 8 * 28 * 28 and -1 not in sizes
    assert idx.file.closed


def test_backends_predict_the_same(artifacts, tmp_path):
    dataset = make_dataset(tmp_path / "ds", train=10, test=20)
    predictions = {}
    for backend in ("eager-fused", "onnxruntime"):
        infer.infer(artifacts, dataset / "t10k-images-idx3-ubyte.gz", tmp_path / f"{backend}.csv", backend=backend,
                    batch_size=8, threads=1, progress=False, log=lambda line: None)
        predictions[backend] = [row["predicted"] for row in read_csv(tmp_path / f"{backend}.csv")]
    assert predictions["eager-fused"] == predictions["onnxruntime"]


def test_refusals(artifacts, tmp_path):
    dataset = make_dataset(tmp_path / "ds", train=10, test=12)
    images = dataset / "t10k-images-idx3-ubyte.gz"
    out = tmp_path / "p.csv"

    def run(path, **kwargs):
        return infer.infer(artifacts, path, kwargs.pop("output", out), progress=False, log=lambda line: None,
                           **kwargs)

    with pytest.raises(ValueError, match=r"--output .*p.txt must end in .csv or .json"):
        run(images, output=tmp_path / "p.txt")
    with pytest.raises(FileNotFoundError, match="the folder of --output .* does not exist"):
        run(images, output=tmp_path / "missing" / "p.csv")
    (tmp_path / "taken.csv").mkdir()
    with pytest.raises(IsADirectoryError, match="--output .*taken.csv is a directory; expected a file name"):
        run(images, output=tmp_path / "taken.csv")
    with pytest.raises(ValueError, match="--batch-size must be a positive integer, got 0"):
        run(images, batch_size=0)
    with pytest.raises(ValueError, match="unknown backend 'tvm'"):
        run(images, backend="tvm")
    with pytest.raises(FileNotFoundError, match="input .*nothing.idx does not exist; expected an idx file, a .npy"):
        run(tmp_path / "nothing.idx")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="neither an idx file .* nor a folder"):
        run(tmp_path / "x.bin")

    # idx: wrong magic, truncated (plain and gzip), labels that do not fit
    labels_as_images = dataset / "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(ValueError, match="has magic number 0x00000801, expected 0x00000803"):
        run(labels_as_images)
    raw = tmp_path / "cut-images-idx3-ubyte"
    raw.write_bytes(gzip.decompress(images.read_bytes())[:-100])
    with pytest.raises(ValueError, match="is 9324 bytes but its header .* promises 9424; the file is truncated"):
        run(raw)
    cut = tmp_path / "cut-images-idx3-ubyte.gz"
    cut.write_bytes(gzip.compress(raw.read_bytes()))
    with pytest.raises(ValueError, match="cut-images-idx3-ubyte.gz ends early, at item 8; the file is truncated"):
        run(cut, batch_size=8)
    assert not out.exists() and not list(tmp_path.glob(".p.csv*"))  # no half-written predictions left
    write_idx(tmp_path / "five-labels-idx1-ubyte", torch.arange(5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="holds 5 labels but .* holds 12 images; expected one label per image"):
        run(images, labels=tmp_path / "five-labels-idx1-ubyte")
    write_idx(tmp_path / "big-labels-idx1-ubyte", torch.full((12,), 12, dtype=torch.uint8))
    with pytest.raises(ValueError, match="has label 12 for image 0; expected labels 0 to 9"):
        run(images, labels=tmp_path / "big-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError, match="labels file .*none.npy does not exist"):
        run(images, labels=tmp_path / "none.npy")

    # npy: wrong dtype or shape, not an array at all
    np.save(tmp_path / "float.npy", np.zeros((2, 28, 28), np.float32))
    with pytest.raises(ValueError, match=r"holds a float32 array of shape \(2, 28, 28\); expected uint8 grayscale"):
        run(tmp_path / "float.npy")
    np.save(tmp_path / "rgb.npy", np.zeros((2, 3, 28, 28), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 28, 28\); expected uint8 grayscale pixels of shape"):
        run(tmp_path / "rgb.npy")
    np.save(tmp_path / "strip.npy", np.zeros((3, 500), np.uint8))  # rows of images of another model's size
    with pytest.raises(ValueError, match="holds one image of 3x500 pixels, too narrow for a picture; if each row is"):
        run(tmp_path / "strip.npy")
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot be read as a .npy array"):
        run(tmp_path / "junk.npy")

    # folders: nothing to read, or --labels given
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds no PNG or JPEG images \(1 other files\)"):
        run(tmp_path / "empty")
    with pytest.raises(ValueError, match="--labels applies to idx and .npy inputs"):
        run(tmp_path / "empty", labels=labels_as_images)


def test_command_line(artifacts, tmp_path, capsys):
    dataset = make_dataset(tmp_path / "ds", train=10, test=12)
    out = tmp_path / "p.json"
    code = cli.main(["infer", str(artifacts), "--input", str(dataset / "t10k-images-idx3-ubyte.gz"), "--output",
                     str(out), "--backend", "eager", "--batch-size", "5", "--threads", "1", "--no-progress"])
    assert code == 0 and json.loads(out.read_text())["summary"]["images"] == 12
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "12 labelled images" in printed and "wrote 12 predictions" in printed

    code = cli.main(["infer", str(artifacts), "--input", str(tmp_path / "missing.npy")])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    assert captured.err.strip().startswith("resnet-deploy infer: error: input") and captured.err.count("\n") == 1


def test_labels_outside_the_classes_are_refused(artifacts, tmp_path, capsys):
    np.save(tmp_path / "images.npy", np.zeros((4, 28, 28), np.uint8))
    np.save(tmp_path / "labels.npy", np.array([0, 1, -3, 2]))
    out = tmp_path / "p.csv"
    code = cli.main(["infer", str(artifacts), "--input", str(tmp_path / "images.npy"), "--labels",
                     str(tmp_path / "labels.npy"), "--output", str(out), "--no-progress"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(error) == 1
    assert "labels.npy has label -3 for image 2; expected labels 0 to 9" in error[0]
    assert not out.exists()


@pytest.mark.parametrize("kind", ["unreadable folder", "empty npy", "empty idx"])
def test_inputs_with_nothing_to_predict_are_refused(artifacts, tmp_path, capsys, kind):
    if kind == "unreadable folder":
        path = tmp_path / "images"
        (path / "sneaker").mkdir(parents=True)
        (path / "a.png").write_bytes(b"not a png")
        (path / "sneaker" / "b.jpg").write_bytes(b"\xff\xd8 cut")
        message = f"no readable images in {path}: all 2 image files failed to decode"
    elif kind == "empty npy":
        path = tmp_path / "images.npy"
        np.save(path, np.zeros((0, 28, 28), np.uint8))
        message = f"no images found in {path}"
    else:
        path = write_idx(tmp_path / "t10k-images-idx3-ubyte", torch.zeros((0, 28, 28), dtype=torch.uint8))
        message = f"no images found in {path}"
    out = tmp_path / "p.csv"
    out.write_text("earlier predictions\n")
    code = cli.main(["infer", str(artifacts), "--input", str(path), "--output", str(out), "--no-progress"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(error) == 1 and error[0].startswith(f"resnet-deploy infer: error: {message}")
    assert out.read_text() == "earlier predictions\n"  # not overwritten
    assert not list(tmp_path.glob(".p.csv*"))


@requires_real_dataset
def test_16_bit_grayscale_images_read_as_their_8_bit_originals(tmp_path):
    originals = data.read_idx(REAL_DATASET / "t10k-images-idx3-ubyte.gz", ndim=3)[:4].numpy()
    for i, pixels in enumerate(originals):
        Image.fromarray(pixels).save(tmp_path / f"{i}-8.png")
        Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / f"{i}-16.png")  # 255 -> 65535
        Image.fromarray(pixels.astype(np.int32) * 257).save(tmp_path / f"{i}-32.tif")
        assert Image.open(tmp_path / f"{i}-16.png").mode == "I;16"
        assert Image.open(tmp_path / f"{i}-32.tif").mode == "I"
        for name in (f"{i}-8.png", f"{i}-16.png", f"{i}-32.tif"):
            np.testing.assert_array_equal(inputs.read_image(tmp_path / name), pixels)
    # scaled, rounded to the nearest 8-bit value: 65535 is 255, 32767 is 127.498 -> 127, 32896 is 128
    Image.fromarray(np.array([[0, 128, 129, 32767, 32896, 65535]], np.uint16)).save(tmp_path / "edge.png")
    np.testing.assert_array_equal(inputs.read_image(tmp_path / "edge.png"), [[0, 0, 1, 127, 128, 255]])


def test_progress_bar_only_on_a_terminal_unless_asked(artifacts, tmp_path, capsys):
    images = np.zeros((3, 28, 28), np.uint8)
    np.save(tmp_path / "x.npy", images)
    argv = ["infer", str(artifacts), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "p.csv")]
    assert cli.main(argv) == 0  # stderr is not a terminal here
    assert "infer:" not in capsys.readouterr().err
    assert cli.main([*argv, "--progress"]) == 0
    assert "infer: 100%" in capsys.readouterr().err
