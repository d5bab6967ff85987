"""Data loading: IDX parsing against hand-built files, image folders, arrays, the synthetic set and sharding."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from diffcore import data
from diffcore import images as image_io


def write_idx(path, array: np.ndarray, type_code: int = 0x08, compress: bool = True) -> None:
    """Write an IDX file by hand (independently of the reader): magic, big-endian dims, raw big-endian data."""
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    raw = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + big_endian.tobytes()
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(raw)
    else:
        path.write_bytes(raw)


def make_fmnist_folder(folder, n_train=5, n_test=3, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
        arrays[split] = (images, labels)
    return arrays


def test_read_idx_hand_built_values(tmp_path):
    values = np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4) * 1000 - 7000
    write_idx(tmp_path / "a.idx", values, type_code=0x0C, compress=False)
    out = data.read_idx(tmp_path / "a.idx")
    assert out.dtype == np.int32 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, values)
    floats = np.array([1.5, -2.25, 3e10], dtype=np.float64)
    write_idx(tmp_path / "f.idx.gz", floats, type_code=0x0E)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "f.idx.gz"), floats)


def test_load_fashion_mnist_from_folder(tmp_path):
    arrays = make_fmnist_folder(tmp_path)
    images, labels = data.load_fashion_mnist("train", tmp_path)
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    np.testing.assert_array_equal(images.numpy(), arrays["train"][0])
    np.testing.assert_array_equal(labels.numpy(), arrays["train"][1].astype(np.int64))
    images, labels = data.load_fashion_mnist("test", tmp_path)
    np.testing.assert_array_equal(images.numpy(), arrays["t10k"][0])
    ds = data.open_dataset(str(tmp_path), split="test", pad_to=32)
    x, y = ds[1]
    assert x.shape == (1, 32, 32)
    # 28 -> 32 padding puts 2 rows/cols of -1 on each side; the inside is x / 127.5 - 1
    expected = torch.full((32, 32), -1.0)
    expected[2:30, 2:30] = torch.from_numpy(arrays["t10k"][0][1].astype(np.float32)) / 127.5 - 1
    torch.testing.assert_close(x[0], expected, rtol=0, atol=1e-6)
    assert int(y) == int(arrays["t10k"][1][1])


def test_fashion_mnist_errors(tmp_path):
    make_fmnist_folder(tmp_path)
    # truncated gzip stream
    path = tmp_path / "train-images-idx3-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        data.load_fashion_mnist("train", tmp_path)
    # a valid gzip whose IDX payload is short
    images = np.zeros((5, 28, 28), np.uint8)
    raw = bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 28, 28) + images.tobytes()[:-10]
    with gzip.open(path, "wb") as handle:
        handle.write(raw)
    with pytest.raises(ValueError, match="truncated"):
        data.load_fashion_mnist("train", tmp_path)
    # bad magic
    with gzip.open(path, "wb") as handle:
        handle.write(b"\x01\x02\x08\x03" + raw[4:])
    with pytest.raises(ValueError, match="magic"):
        data.load_fashion_mnist("train", tmp_path)
    # images / labels count mismatch
    write_idx(path, np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="4 images but .* 5 labels"):
        data.load_fashion_mnist("train", tmp_path)
    # missing file
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load_fashion_mnist("test", tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        data.load_fashion_mnist("train", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        data.load_fashion_mnist("validation", tmp_path)


@pytest.mark.skipif(not data.is_idx_folder("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist missing")
def test_real_fashion_mnist_test_split():
    images, labels = data.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28)
    assert labels.bincount().tolist() == [1000] * 10  # the test split is balanced


def test_image_folder(tmp_path):
    from PIL import Image

    # class folders; a 40x20 image whose left half is red and right half is blue -> centre crop 8x8 of its middle
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:] = (0, 0, 255)
    Image.fromarray(wide).save(tmp_path / "b" / "wide.png")
    flat = np.full((10, 10, 3), (10, 200, 30), np.uint8)
    Image.fromarray(flat).save(tmp_path / "a" / "flat.png")
    Image.fromarray(flat).save(tmp_path / "a" / "flat.jpg", quality=100)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    images, labels, names = data.load_image_folder(tmp_path, 8, channels=3)
    assert names == ["a", "b"] and labels.tolist() == [0, 0, 1]
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8
    # flat image: resize keeps the colour exactly for PNG; JPEG within a few levels
    assert (images[1].permute(1, 2, 0) == torch.tensor([10, 200, 30], dtype=torch.uint8)).all()
    assert (images[0].int() - torch.tensor([10, 200, 30]).view(3, 1, 1)).abs().max() <= 4
    # wide image: 40x20 -> 16x8 (box halving then bicubic), centre crop 8x8 = columns 4..11: left half red, right blue
    wide_out = images[2]
    assert (wide_out[0, :, :2] == 255).all() and (wide_out[2, :, :2] == 0).all()
    assert (wide_out[2, :, -2:] == 255).all() and (wide_out[0, :, -2:] == 0).all()
    gray, _, _ = data.load_image_folder(tmp_path / "a", 8, channels=1)
    expected_l = round(10 * 299 / 1000 + 200 * 587 / 1000 + 30 * 114 / 1000)  # PIL's ITU-R 601-2 luma
    assert gray.shape == (2, 1, 8, 8) and abs(int(gray[1, 0, 0, 0]) - expected_l) <= 1


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        data.load_image_folder(tmp_path / "missing", 8)
    with pytest.raises(ValueError, match="no image files"):
        data.load_image_folder(tmp_path, 8)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="broken.png"):
        data.load_image_folder(tmp_path, 8)
    with pytest.raises(ValueError, match="channels"):
        data.load_image_folder(tmp_path, 8, channels=2)


def test_arrays(tmp_path):
    rng = np.random.default_rng(1)
    nhwc = rng.integers(0, 256, size=(6, 5, 4, 3), dtype=np.uint8)
    labels = np.arange(6)
    np.savez(tmp_path / "d.npz", images=nhwc, labels=labels)
    images, got_labels = image_io.load_array(tmp_path / "d.npz")
    np.testing.assert_array_equal(images.numpy(), nhwc.transpose(0, 3, 1, 2))
    assert got_labels.tolist() == list(range(6))
    floats = np.array([[[-1.0, 0.0], [1.0, 0.5]]], dtype=np.float32)  # [1, 2, 2] in [-1, 1]
    np.save(tmp_path / "f.npy", floats)
    images, got_labels = image_io.load_array(tmp_path / "f.npy")
    assert images.shape == (1, 1, 2, 2) and got_labels.tolist() == [0]
    assert images.flatten().tolist() == [0, 128, 255, 191]  # round((v + 1) * 127.5)
    np.save(tmp_path / "bad.npy", floats * 3)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        image_io.load_array(tmp_path / "bad.npy")
    blob = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="cut.npz"):
        image_io.load_array(tmp_path / "cut.npz")
    with pytest.raises(FileNotFoundError, match="nothing.npy"):
        image_io.load_array(tmp_path / "nothing.npy")
    ds = data.open_dataset(str(tmp_path / "d.npz"))
    x, y = ds[2]
    torch.testing.assert_close(x, torch.from_numpy(nhwc[2].transpose(2, 0, 1).astype(np.float32)) / 127.5 - 1)


def test_synthetic_is_deterministic_and_has_its_shapes():
    a, la = data.synthetic_images(32, 16, seed=3)
    b, lb = data.synthetic_images(32, 16, seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, data.synthetic_images(32, 16, seed=4)[0])
    for image, label in zip(a[:, 0], la):
        rows, cols = torch.nonzero(image, as_tuple=True)
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        if label == 0:  # a filled square: its bounding box is all ink
            assert height == width and int((image > 0).sum()) == height * width
        elif label == 2:
            assert width > height
        elif label == 3:
            assert height > width


def test_sharded_batches_match_single_process_and_resume():
    images, labels = data.synthetic_images(40, 8, seed=0)
    ds = data.ImageDataset(images, labels, hflip=True)
    single = data.ShardedBatches(ds, 8, seed=5, rank=0, world_size=1)
    ranks = [data.ShardedBatches(ds, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    assert single.batches_per_epoch == 5
    for _ in range(12):  # crosses two epoch boundaries
        x, y = next(single)
        parts = [next(r) for r in ranks]
        # same multiset of (image, label) in the global batch: compare sorted flattened rows
        union_x = torch.cat([p[0] for p in parts])
        key = lambda t: sorted(map(tuple, t.flatten(1).tolist()))  # noqa: E731
        assert key(union_x) == key(x)
        assert sorted(torch.cat([p[1] for p in parts]).tolist()) == sorted(y.tolist())
    # every epoch visits every image exactly once (un-flipped or flipped)
    fresh = data.ShardedBatches(data.ImageDataset(images, labels), 8, seed=5, rank=0, world_size=1)
    seen = torch.cat([next(fresh)[0] for _ in range(5)])
    assert key(seen) == key(images.float() / 127.5 - 1)
    # resume: a stream restored from a state continues with identical batches
    state = single.state_dict()
    expected = [next(single)[0] for _ in range(4)]
    restored = data.ShardedBatches(ds, 8, seed=5, rank=0, world_size=1)
    restored.load_state_dict(state)
    for want in expected:
        assert torch.equal(next(restored)[0], want)
    with pytest.raises(ValueError, match="larger than the data set"):
        data.ShardedBatches(ds, 32, rank=0, world_size=2)
    with pytest.raises(ValueError, match="seed"):
        data.ShardedBatches(ds, 8, seed=6, rank=0, world_size=1).load_state_dict(state)


def test_dataset_errors_and_flip():
    images = torch.arange(2 * 3 * 3, dtype=torch.uint8).view(2, 1, 3, 3)
    ds = data.ImageDataset(images)
    x, _ = ds.batch(torch.tensor([1, 0]), torch.tensor([True, False]))
    torch.testing.assert_close(x[0], images[1].float().flip(-1) / 127.5 - 1)
    torch.testing.assert_close(x[1], images[0].float() / 127.5 - 1)
    with pytest.raises(TypeError, match="uint8"):
        data.ImageDataset(images.float())
    with pytest.raises(ValueError, match="pad_to"):
        data.ImageDataset(images, pad_to=2)
    with pytest.raises(FileNotFoundError, match="source"):
        data.open_dataset("/no/such/thing")
