"""Paper-scale loaders on tiny files in their real on-disk formats (no network, no real data)."""
import os
import pickle
import socket
import struct
import time

import numpy as np
import pytest
from PIL import Image

from tract_repro.data import imagenet64 as inet
from tract_repro.data import safe_pickle
from tract_repro.data.cifar10 import DatasetNotFoundError, cifar10
from tract_repro.data.imagenet64 import center_crop_box_resize, imagenet64

CIFAR = pytest.importorskip("torchvision.datasets").CIFAR10


def _message(exc_info):
    """The error's own message, which must be one line (gin appends "In call to configurable" lines)."""
    first, *rest = str(exc_info.value).splitlines()
    assert all(line.strip().startswith("In call to configurable") for line in rest), rest
    return first


# ---------------------------------------------------------------- CIFAR-10


def _cifar_batch(n, seed, first=None):
    """A dict shaped like a real batch: b"data" (n, 3072) uint8 rows of R, G, B planes, b"labels"."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    if first is not None:
        data[0] = first
    return {b"batch_label": b"training batch %d of 5" % seed, b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": data, b"filenames": [b"img_%d.png" % i for i in range(n)]}


def _write_cifar(root, split="train", dump=None):
    """Write tiny batches under root/cifar-10-batches-py; return the dicts in file order."""
    folder = root / CIFAR.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    files = CIFAR.train_list if split == "train" else CIFAR.test_list
    rgb = np.repeat(np.array([10, 20, 30], dtype=np.uint8), 1024)  # R plane 10, G 20, B 30
    batches = [_cifar_batch(2 + i, seed=i + 1, first=rgb if i == 0 else None) for i in range(len(files))]
    for (name, _), batch in zip(files, batches):
        with open(folder / name, "wb") as f:
            (dump or (lambda obj, fh: pickle.dump(obj, fh, protocol=2)))(batch, f)
    return batches


def _check_cifar(ds, batches, split="train"):
    assert str(ds.images.dtype) == "torch.uint8"
    assert ds.shape == (3, 32, 32) and ds.num_classes == 10 and ds.name == f"cifar10-{split}"
    assert ds.hflip == (split == "train")
    assert ds.images[0, 0].eq(10).all() and ds.images[0, 1].eq(20).all() and ds.images[0, 2].eq(30).all()
    data = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(ds.images.numpy(), data)
    np.testing.assert_array_equal(ds.labels.numpy(), sum((b[b"labels"] for b in batches), []))
    assert str(ds.labels.dtype) == "torch.int64"


def test_cifar10_reads_real_format_planes_and_labels(tmp_path):
    batches = _write_cifar(tmp_path, "train")
    _check_cifar(cifar10(root=tmp_path, split="train", check_md5=False), batches)
    test = _write_cifar(tmp_path, "test")
    _check_cifar(cifar10(root=str(tmp_path), split="test", check_md5=False), test, "test")
    assert cifar10(root=tmp_path, split="test", check_md5=False, hflip=True).hflip


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str (BINSTRING) and numpy 1's module name, like the real files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", "") == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def test_cifar10_reads_python2_pickles(tmp_path):
    batches = _write_cifar(tmp_path, "test", dump=lambda obj, fh: _Py2Pickler(fh, protocol=2).dump(obj))
    raw = (tmp_path / CIFAR.base_folder / "test_batch").read_bytes()
    assert b"numpy.core.multiarray" in raw and b"_codecs" not in raw
    _check_cifar(cifar10(root=tmp_path, split="test", check_md5=False), batches, "test")


def test_cifar10_md5_mismatch_is_one_line(tmp_path):
    _write_cifar(tmp_path, "test")
    with pytest.raises(ValueError) as e:
        cifar10(root=tmp_path, split="test", check_md5=True)
    msg = _message(e)
    assert "test_batch" in msg and "re-download" in msg
    assert CIFAR.test_list[0][1] in msg  # torchvision's own hash


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


@pytest.mark.parametrize("payload", ["system", "eval", "numpy"])
def test_safe_pickle_refuses_other_globals(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = {"system": _Evil(f"touch {marker}"), "eval": _EvalEvil(), "numpy": _NumpyEvil()}[payload]
    batch = _cifar_batch(2, seed=0)
    batch[b"labels"] = evil
    folder = tmp_path / CIFAR.base_folder
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(safe_pickle.UnsafePickleError) as e:
        cifar10(root=tmp_path, split="test", check_md5=False)
    msg = _message(e)
    assert "refusing to unpickle" in msg and str(folder / "test_batch") in msg
    assert {"system": ".system", "eval": "__builtin__.eval", "numpy": "numpy.load"}[payload] in msg
    assert not marker.exists()


class _EvalEvil:
    def __reduce__(self):
        return eval, ("1 + 1",)


class _NumpyEvil:
    def __reduce__(self):
        return np.load, ("/nonexistent",)


def test_safe_pickle_restricts_codecs(tmp_path):
    path = tmp_path / "p"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(safe_pickle.UnsafePickleError, match="latin-1"):
        safe_pickle.load(path)


def test_cifar10_missing_is_fast_one_line(tmp_path):
    root = tmp_path / "nowhere"
    start = time.perf_counter()
    with pytest.raises(DatasetNotFoundError) as e:
        cifar10(root=root, split="train")
    assert time.perf_counter() - start < 1.0
    msg = _message(e)
    assert isinstance(e.value, ValueError) and isinstance(e.value, FileNotFoundError)
    assert CIFAR.url in msg and str(root / CIFAR.base_folder) in msg
    assert msg.endswith(f"extract it into {root}")


def test_cifar10_download_failure_and_success(tmp_path, monkeypatch):
    from torchvision.datasets import utils as tv_utils

    seen = []

    def offline(url, download_root, **kw):
        seen.append((url, download_root, socket.getdefaulttimeout()))
        raise OSError("no network\nat all")

    before = socket.getdefaulttimeout()
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError) as e:
        cifar10(root=tmp_path, split="test", download=True)
    assert seen == [(CIFAR.url, str(tmp_path), 10)] and socket.getdefaulttimeout() == before
    assert "download failed: OSError: no network at all" in _message(e)

    batches = []
    monkeypatch.setattr(tv_utils, "download_and_extract_archive",
                        lambda url, root, **kw: batches.extend(_write_cifar(tmp_path, "test")))
    _check_cifar(cifar10(root=tmp_path, split="test", download=True, check_md5=False), batches, "test")


# ---------------------------------------------------------------- ImageNet 64×64


def test_center_crop_drops_side_margins():
    img = np.full((96, 128, 3), (50, 100, 150), dtype=np.uint8)  # H 96, W 128
    img[:, :16] = img[:, -16:] = (255, 0, 0)
    out = center_crop_box_resize(Image.fromarray(img))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out == (50, 100, 150)).all()
    tall = center_crop_box_resize(Image.fromarray(np.ascontiguousarray(img.transpose(1, 0, 2))))
    assert (tall == (50, 100, 150)).all()


def test_center_crop_offset_matches_google():
    cols = np.tile((np.arange(8, dtype=np.uint8) * 10)[None, :, None], (3, 1, 3))  # H 3, W 8
    out = center_crop_box_resize(Image.fromarray(cols), size=3)
    np.testing.assert_array_equal(out[0, :, 0], [30, 40, 50])  # offset 8//2 − 3//2 = 3, not (8−3)//2


def test_box_resize_averages_exactly():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = center_crop_box_resize(Image.fromarray(blocks.repeat(2, 0).repeat(2, 1)))
    np.testing.assert_array_equal(out, blocks)  # constant 2×2 blocks → the block values
    stripes = np.zeros((128, 128, 3), dtype=np.uint8)
    stripes[:, 1::2] = 200
    assert (center_crop_box_resize(Image.fromarray(stripes)) == 100).all()  # mean of 0 and 200
    gray = center_crop_box_resize(Image.fromarray(np.full((70, 90), 77, dtype=np.uint8)))
    assert gray.shape == (64, 64, 3) and (gray == 77).all()


def _npz_batch(path, images, labels1, **extra):
    np.savez(path, data=images.reshape(len(images), -1), labels=np.asarray(labels1), **extra)


def test_imagenet64_npz_planes_labels_order(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    a[0, 0], a[0, 1], a[0, 2] = 1, 2, 3
    b = rng.integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
    _npz_batch(tmp_path / "train_data_batch_1.npz", a, [1, 1000])
    _npz_batch(tmp_path / "train_data_batch_2.npz", b, [5, 6, 7])
    with pytest.warns(UserWarning, match="map_clsloc"):
        ds = imagenet64(root=tmp_path)
    assert ds.name == "imagenet64-npz-train" and ds.num_classes == 1000 and ds.hflip
    assert str(ds.images.dtype) == "torch.uint8" and ds.shape == (3, 64, 64)
    assert ds.images[0, 0].eq(1).all() and ds.images[0, 1].eq(2).all() and ds.images[0, 2].eq(3).all()
    np.testing.assert_array_equal(ds.images.numpy(), np.concatenate([a, b]))
    np.testing.assert_array_equal(ds.labels.numpy(), [0, 999, 4, 5, 6])

    _npz_batch(tmp_path / "val_data.npz", b, [3, 2, 1])
    (tmp_path / "map_clsloc.txt").write_text("n09 1 z\nn01 2 a\nn05 3 m\n")
    val = imagenet64(root=tmp_path, split="val", map_clsloc=tmp_path / "map_clsloc.txt")
    assert val.name == "imagenet64-npz-val" and not val.hflip
    np.testing.assert_array_equal(val.labels.numpy(), [1, 0, 2])  # devkit ids → sorted wnids


def test_imagenet64_npz_numeric_file_order_and_errors(tmp_path):
    planes = np.zeros((1, 3, 64, 64), dtype=np.uint8)
    for i in (1, 2, 10, 3, 4, 5, 6, 7, 8, 9):
        _npz_batch(tmp_path / f"train_data_batch_{i}.npz", planes + i, [i])
    with pytest.warns(UserWarning):
        ds = imagenet64(root=tmp_path)
    assert ds.labels.tolist() == list(range(10)) and ds.images[:, 0, 0, 0].tolist() == list(range(1, 11))

    (tmp_path / "train_data_batch_4.npz").unlink()
    with pytest.raises(DatasetNotFoundError, match="missing train_data_batch_4.npz"):
        imagenet64(root=tmp_path)
    empty = tmp_path / "empty"
    with pytest.raises(DatasetNotFoundError) as e:
        imagenet64(root=empty, split="val")
    msg = _message(e)
    assert "Imagenet64_train_npz.zip / Imagenet64_val_npz.zip" in msg
    assert "https://image-net.org/download-images" in msg and msg.endswith(f"unzip into {empty}")
    empty.mkdir()
    _npz_batch(empty / "val_data.npz", planes, [0])  # 0-based labels are not the published format
    with pytest.raises(ValueError, match="must be 1..1000"):
        imagenet64(root=empty, split="val")


def _write_folder(root, split="train"):
    """3 classes × 2 small images under root/split/<wnid>/, created out of sorted order."""
    rng = np.random.default_rng(2)
    for wnid in ("n03000000", "n01000000", "n02000000"):
        d = root / split / wnid
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(d / "a.png")
        Image.fromarray(rng.integers(0, 256, (80, 66), dtype=np.uint8)).save(d / "b.PNG")  # grayscale


def test_converter_round_trip(tmp_path, capsys):
    src, out = tmp_path / "imagenet", tmp_path / "npz"
    _write_folder(src)
    _write_folder(src, "val")
    inet.main(["--from-folder", str(src), "--out", str(out), "--per-file", "4"])
    inet.main(["--from-folder", str(src), "--out", str(out), "--split", "val", "--workers", "2"])
    assert sorted(p.name for p in out.iterdir()) == ["train_data_batch_1.npz", "train_data_batch_2.npz",
                                                     "val_data.npz"]
    with np.load(out / "train_data_batch_1.npz") as z:
        assert z["data"].shape == (4, 12288) and z["labels"].tolist() == [1, 1, 2, 2]

    folder = imagenet64(root=src, source="folder")
    npz = imagenet64(root=out, source="npz")
    assert folder.name == npz.name == "imagenet64-cropbox-train"
    np.testing.assert_array_equal(npz.images.numpy(), folder.images.numpy())
    assert npz.labels.tolist() == folder.labels.tolist() == [0, 0, 1, 1, 2, 2]
    with Image.open(src / "train" / "n02000000" / "b.PNG") as im:
        np.testing.assert_array_equal(npz.images[3].numpy(), center_crop_box_resize(im).transpose(2, 0, 1))
    val = imagenet64(root=out, split="val")
    assert val.name == "imagenet64-cropbox-val" and val.labels.tolist() == [0, 0, 1, 1, 2, 2]

    assert inet.main(["--from-folder", str(src), "--out", str(out)]) == 2  # inside the one error boundary
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "remove the old batches" in err


def test_digits_read_directly_equal_scikit_learns_loader():
    """The digits file read without importing sklearn gives exactly load_digits()'s images and labels."""
    from sklearn.datasets import load_digits

    from tract_repro.data.digits import digits, digits_arrays

    images, labels = digits_arrays()
    reference = load_digits()
    assert np.array_equal(images, reference.images) and np.array_equal(labels, reference.target)
    data = digits()
    assert data.images.shape == (1797, 1, 8, 8) and data.images.min() == -1 and data.images.max() == 1
