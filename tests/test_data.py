import gzip

import pytest
import torch
from conftest import REAL_DATASET, make_dataset, requires_real_dataset, write_idx
from torch.utils.data import DistributedSampler

from resnet_deploy import data


# ---------------------------------------------------------------------------------------------- idx files
@pytest.mark.parametrize("suffix", [".gz", ""])
def test_read_idx_round_trip(tmp_path, suffix):
    images = torch.randint(0, 256, (5, 7, 3), dtype=torch.uint8)
    path = write_idx(tmp_path / f"images{suffix}", images)
    assert torch.equal(data.read_idx(path, ndim=3), images)


def test_read_idx_rejects_a_wrong_magic_number(tmp_path):
    path = write_idx(tmp_path / "labels.gz", torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"magic number 0x00000801, expected 0x00000803"):
        data.read_idx(path, ndim=3)


def test_read_idx_rejects_a_file_shorter_than_its_header_promises(tmp_path):
    path = write_idx(tmp_path / "images", torch.zeros(4, 6, 6, dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"header \(shape \[4, 6, 6\]\) promises 160; the file is truncated"):
        data.read_idx(path, ndim=3)


def test_read_idx_rejects_a_truncated_gzip_file(tmp_path):
    path = write_idx(tmp_path / "images.gz", torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cannot be read as an idx file .*expected an intact Fashion-MNIST file"):
        data.read_idx(path, ndim=3)


def test_read_idx_rejects_a_file_that_is_not_gzip(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="cannot be read as an idx file"):
        data.read_idx(path, ndim=3)


def test_read_idx_rejects_an_empty_file(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="too short for an idx header"):
        data.read_idx(path, ndim=1)


# ------------------------------------------------------------------------------------------- the dataset
def test_load_gives_uint8_images_and_int64_labels(dataset_dir):
    train, test = data.load_fashion_mnist(dataset_dir, download=False)
    assert train.images.shape == (64, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (32, 28, 28)
    assert train.labels.dtype == torch.int64 and train.labels.tolist()[:3] == [0, 1, 2]
    assert len(train) == 64 and len(test) == 32


def test_load_reads_uncompressed_files_and_torchvisions_layout(tmp_path):
    make_dataset(tmp_path / "plain", gz=False)
    assert len(data.load_fashion_mnist(tmp_path / "plain", download=False)[0]) == 64
    make_dataset(tmp_path / "tv" / "FashionMNIST" / "raw")
    assert len(data.load_fashion_mnist(tmp_path / "tv", download=False)[0]) == 64


def test_load_rejects_images_and_labels_that_disagree(dataset_dir):
    write_idx(dataset_dir / "train-labels-idx1-ubyte.gz", torch.zeros(63, dtype=torch.uint8))
    with pytest.raises(ValueError, match="holds 64 images but .* holds 63 labels; expected one label per image"):
        data.load_fashion_mnist(dataset_dir, download=False)


def test_load_rejects_labels_out_of_range(dataset_dir):
    write_idx(dataset_dir / "t10k-labels-idx1-ubyte.gz", torch.full((32,), 10, dtype=torch.uint8))
    with pytest.raises(ValueError, match="has label 10; expected labels 0 to 9"):
        data.load_fashion_mnist(dataset_dir, download=False)


def test_load_rejects_train_and_test_images_of_different_sizes(dataset_dir):
    write_idx(dataset_dir / "t10k-images-idx3-ubyte.gz", torch.zeros(32, 20, 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"training images are \(28, 28\) but test images are \(20, 20\)"):
        data.load_fashion_mnist(dataset_dir, download=False)


def test_search_order_is_data_dir_then_environment_then_system(tmp_path, monkeypatch):
    first, second, third = (make_dataset(tmp_path / name, train=n) for name, n in
                            (("first", 20), ("second", 30), ("third", 40)))
    monkeypatch.setenv(data.ENV_VAR, str(second))
    monkeypatch.setattr(data, "SYSTEM_DIR", third)
    assert len(data.load_fashion_mnist(first, download=False)[0]) == 20
    assert len(data.load_fashion_mnist(None, download=False)[0]) == 30
    logged = []
    assert len(data.load_fashion_mnist(tmp_path / "missing", download=False, log=logged.append)[0]) == 30
    assert logged == [f"Fashion-MNIST from {second} (passed over --data-dir {tmp_path / 'missing'} (does not exist))"]
    monkeypatch.delenv(data.ENV_VAR)
    assert len(data.load_fashion_mnist(None, download=False)[0]) == 40


def test_download_is_the_last_resort_and_goes_into_data_dir(tmp_path, monkeypatch):
    roots = []

    def fake_download(root):
        roots.append(root)
        make_dataset(root / "FashionMNIST" / "raw")

    monkeypatch.setattr(data, "_download", fake_download)
    train, _ = data.load_fashion_mnist(tmp_path / "new", download=True)
    assert roots == [tmp_path / "new"] and len(train) == 64


def test_a_missing_dataset_names_every_place_tried(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    (tmp_path / "partial").mkdir()
    write_idx(tmp_path / "partial" / "train-images-idx3-ubyte.gz", torch.zeros(1, 2, 2, dtype=torch.uint8))
    with pytest.raises(data.DatasetNotFoundError) as caught:
        data.load_fashion_mnist(tmp_path / "partial", download=True)
    message = str(caught.value)
    assert message.startswith("Fashion-MNIST not found: tried --data-dir")
    assert "lacks train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte" in message
    assert f"$RESNET_DEPLOY_DATA {tmp_path / 'env'} (does not exist)" in message
    assert f"the system dataset {data.SYSTEM_DIR} (does not exist)" in message
    assert "torchvision download into" in message and "downloads are disabled in tests" in message
    assert "dataset-fashion-mnist" in message


def test_a_missing_dataset_without_download_says_so(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match=r"--data-dir \(not set\).*\(not set\).*download \(disabled\)"):
        data.load_fashion_mnist(None, download=False)


# ---------------------------------------------------------------------------------------- pre-processing
def test_preprocess_scales_normalizes_and_adds_the_channel():
    images = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)
    x = data.preprocess(images, 2, mean=0.5, std=0.25)
    assert x.shape == (1, 1, 2, 2) and x.dtype == torch.float32
    torch.testing.assert_close(x, (images.float().unsqueeze(1) / 255 - 0.5) / 0.25)


def test_preprocess_resizes_whole_batches():
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    assert data.preprocess(images, 96).shape == (3, 1, 96, 96)
    assert data.preprocess(images, (14, 20)).shape == (3, 1, 14, 20)
    assert data.preprocess(images.unsqueeze(1), 28).shape == (3, 1, 28, 28)
    # a constant image stays constant through resizing
    flat = torch.full((1, 28, 28), 200, dtype=torch.uint8)
    torch.testing.assert_close(data.preprocess(flat, 96, 0.0, 1.0), torch.full((1, 1, 96, 96), 200 / 255))


def test_preprocess_rejects_float_images_and_bad_shapes():
    with pytest.raises(ValueError, match="images must be uint8 pixels, got torch.float32"):
        data.preprocess(torch.zeros(1, 28, 28), 28)
    with pytest.raises(ValueError, match=r"must be \(N, H, W\) or \(N, C, H, W\), got shape \(28, 28\)"):
        data.preprocess(torch.zeros(28, 28, dtype=torch.uint8), 28)


def test_augment_crops_and_flips_each_image_reproducibly():
    images = torch.randint(1, 256, (16, 10, 10), dtype=torch.uint8)
    a = data.augment(images, torch.Generator().manual_seed(1))
    b = data.augment(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, images)
    flipped = data.augment(images, torch.Generator().manual_seed(2), pad=0)
    for original, out in zip(images, flipped):
        assert torch.equal(out, original) or torch.equal(out, original.flip(-1))
    shifted = data.augment(images, torch.Generator().manual_seed(3), pad=2, flip=False)
    assert ((shifted == 0).sum((1, 2)) <= 4 * 10 + 4 * 10).all()  # at most 2 zero rows and 2 zero columns


# --------------------------------------------------------------------------------------------- loading
def test_loader_covers_the_split_once_in_order(dataset_dir):
    train, _ = data.load_fashion_mnist(dataset_dir, download=False)
    loader = data.Loader(train, 10, range(len(train)), size=16)
    batches = list(loader)
    assert len(loader) == len(batches) == 7 and batches[-1][0].shape == (4, 1, 16, 16)
    assert torch.equal(torch.cat([labels for _, labels in batches]), train.labels)


def test_loader_shards_by_rank_and_shuffles_by_epoch(dataset_dir):
    train, _ = data.load_fashion_mnist(dataset_dir, download=False)

    def labels(rank, epoch):
        sampler = DistributedSampler(range(len(train)), num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = data.Loader(train, 8, sampler, size=28, augment=True, drop_last=True, rank=rank)
        loader.set_epoch(epoch)
        return [batch for batch in loader]

    rank0, rank1 = labels(0, 0), labels(1, 0)
    assert len(rank0) == len(rank1) == 4
    assert not torch.equal(rank0[0][0], rank1[0][0])
    again = labels(0, 0)
    assert all(torch.equal(x, y) and torch.equal(a, b) for (x, a), (y, b) in zip(rank0, again))
    assert not torch.equal(labels(0, 1)[0][1], rank0[0][1])


# ------------------------------------------------------------------------------------- the real dataset
@requires_real_dataset
def test_the_real_dataset_has_60000_training_and_10000_test_images():
    train, test = data.load_fashion_mnist(REAL_DATASET, download=False)
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    mean, std = train.images.float().div(255).mean().item(), train.images.float().div(255).std().item()
    assert abs(mean - data.MEAN) < 1e-3 and abs(std - data.STD) < 1e-3


@requires_real_dataset
def test_the_real_dataset_files_are_gzip_idx():
    with gzip.open(REAL_DATASET / "train-images-idx3-ubyte.gz") as f:
        assert f.read(4) == bytes([0, 0, 8, 3])


def test_a_failed_download_is_one_line_and_leaves_no_empty_folders(tmp_path, monkeypatch):
    def offline(root):
        (root / "FashionMNIST" / "raw").mkdir(parents=True)  # as torchvision does before fetching
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://a/, got:\n<urlopen error>")

    monkeypatch.setattr(data, "_download", offline)
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "no-system-dataset")
    with pytest.raises(data.DatasetNotFoundError) as caught:
        data.find_dataset(tmp_path / "new" / "data")
    message = str(caught.value)
    assert "\n" not in message
    assert (f"a torchvision download into {tmp_path / 'new' / 'data'} (failed: Error downloading "
            f"train-images-idx3-ubyte.gz: ... <urlopen error>)") in message
    assert not (tmp_path / "new").exists()  # the folders the download made, and no others, are gone

    (tmp_path / "mine").mkdir()  # an existing, empty --data-dir stays, without what the download put in it
    with pytest.raises(data.DatasetNotFoundError):
        data.find_dataset(tmp_path / "mine")
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []
