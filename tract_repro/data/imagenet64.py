"""ImageNet 64×64: the published npz batches (Chrabaszcz et al. 2017) or a class-folder tree.

Variants (method-spec §8; reference statistics must come from the same one, so ``name`` records it):

* ``imagenet64-npz-<split>``: the published batches, whole images resized to 64×64 (no crop) by
  their scripts; their labels follow the devkit's ``map_clsloc.txt`` order, not sorted wnids.
* ``imagenet64-cropbox-<split>``: centre square crop then box (area) resize to 64×64, as Google's
  PD teacher saw; read from ``root/<split>/<wnid>/*`` or from npz files this module's converter wrote.

Converter (decodes the JPEGs once): ``python -m tract_repro.data.imagenet64 --from-folder DIR --out ROOT``.
"""
import argparse
import re
import sys
import warnings
from pathlib import Path

import gin
import numpy as np
import torch
from PIL import Image

from tract_repro.common.cli import command
from tract_repro.common.errors import ConfigError
from tract_repro.common.files import write_atomic
from tract_repro.data.arrays import ImageArrays
from tract_repro.data.cifar10 import DatasetNotFoundError

SIZE = 64
NUM_CLASSES = 1000
CROPBOX = "center-square-crop+box-resize"  # the ``preprocess`` marker the converter writes
EXTENSIONS = {".jpeg", ".jpg", ".png"}
DOWNLOAD = ("download Imagenet64_train_npz.zip / Imagenet64_val_npz.zip from "
            "https://image-net.org/download-images (downsampled ImageNet 64x64) and unzip into {root}")
PER_FILE = 128_117  # ⌈1,281,167 / 10⌉: ten train batches, like the published ones


def center_crop_box_resize(img, size=SIZE):
    """Largest centred square (offset L//2 − S//2 on the long side, as Google's PD data), box-resized.

    Returns (size, size, 3) uint8; each output pixel is the area-weighted mean of the pixels it covers.
    """
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = w // 2 - s // 2, h // 2 - s // 2
    square = img.crop((left, top, left + s, top + s))
    return np.asarray(square.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def _read(path):
    """One image file → (3, 64, 64) uint8 planes."""
    with Image.open(path) as im:
        return center_crop_box_resize(im).transpose(2, 0, 1)


def _list_folder(root, split):
    """[(path, label)] under root/split/<wnid>/, labels indexing the sorted wnids of root/train."""
    root = Path(root)
    split_dir, train_dir = root / split, root / "train"
    if not split_dir.is_dir():
        raise DatasetNotFoundError(f"ImageNet class folders not found: {split_dir} is not a directory "
                                   f"(expected {split_dir}/<wnid>/*.JPEG)")
    classes_dir = train_dir if train_dir.is_dir() else split_dir
    wnids = sorted(d.name for d in classes_dir.iterdir() if d.is_dir())
    index = {w: i for i, w in enumerate(wnids)}
    items = []
    for d in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if d.name not in index:
            raise ConfigError(f"{d} is not a class of {classes_dir} (labels index its sorted wnids)")
        items += [(f, index[d.name]) for f in sorted(d.iterdir()) if f.suffix.lower() in EXTENSIONS]
    if not items:
        raise DatasetNotFoundError(f"no .JPEG/.jpg/.png images found under {split_dir}/<wnid>/")
    if len(wnids) > NUM_CLASSES:
        raise ConfigError(f"{classes_dir} has {len(wnids)} class folders; ImageNet has {NUM_CLASSES}")
    return items, wnids


def _decode(paths, workers, chunk=1024):
    """Yield (3, 64, 64) uint8 arrays for ``paths`` in order; ``workers`` threads (PIL frees the GIL)."""
    if workers <= 1:
        yield from map(_read, paths)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(paths), chunk):
            yield from pool.map(_read, paths[start:start + chunk])


def _train_files(root):
    found = {}
    for p in root.glob("train_data_batch_*.npz"):
        if m := re.fullmatch(r"train_data_batch_(\d+)\.npz", p.name):
            found[int(m.group(1))] = p
    gaps = sorted(set(range(1, max(found, default=0) + 1)) - set(found))
    if gaps:
        raise DatasetNotFoundError(f"ImageNet 64x64 in {root} is incomplete (missing "
                                   f"{', '.join(f'train_data_batch_{i}.npz' for i in gaps)}): "
                                   + DOWNLOAD.format(root=root))
    return [found[i] for i in sorted(found)]


def _devkit_to_sorted(labels1, map_clsloc):
    """Devkit class ids (1-based, ``map_clsloc.txt`` lines "wnid id name") → indices of sorted wnids."""
    ids = {}
    for line in Path(map_clsloc).read_text().splitlines():
        if line.strip():
            wnid, cid = line.split()[:2]
            ids[int(cid)] = wnid
    order = {w: i for i, w in enumerate(sorted(ids.values()))}
    table = np.full(max(ids) + 1, -1, dtype=np.int64)
    for cid, wnid in ids.items():
        table[cid] = order[wnid]
    out = table[np.clip(labels1, 0, len(table) - 1)]
    if (labels1 >= len(table)).any() or (out < 0).any():
        raise ConfigError(f"{map_clsloc} does not list every class id in the data")
    return out


def _load_npz(root, split, map_clsloc):
    """Planes (N, 3, 64, 64) and 0-based labels from the batch files, preallocated (peak ≈ data + one file)."""
    root = Path(root)
    files = _train_files(root) if split == "train" else [root / "val_data.npz"]
    if not files or not files[0].is_file():
        expected = "train_data_batch_1..10.npz" if split == "train" else "val_data.npz"
        raise DatasetNotFoundError(f"ImageNet 64x64 ({split}) not found in {root} (expected {expected}): "
                                   + DOWNLOAD.format(root=root))
    labels, markers = [], set()
    for p in files:
        with np.load(p, allow_pickle=False) as z:
            labels.append(np.asarray(z["labels"], dtype=np.int64).reshape(-1))
            markers.add(str(z["preprocess"]) if "preprocess" in z.files else None)
    if len(markers) > 1:
        raise ConfigError(f"{root} mixes published and converted batches ({markers}); keep one kind")
    labels1 = np.concatenate(labels)
    if labels1.size and (labels1.min() < 1 or labels1.max() > NUM_CLASSES):
        raise ConfigError(f"ImageNet 64x64 labels in {root} must be 1..{NUM_CLASSES}, "
                         f"got {labels1.min()}..{labels1.max()}")
    images = np.empty((len(labels1), 3, SIZE, SIZE), dtype=np.uint8)
    start = 0
    for p, lab in zip(files, labels):
        with np.load(p, allow_pickle=False) as z:
            data = z["data"]
        if data.dtype != np.uint8 or data.shape != (len(lab), 3 * SIZE * SIZE):
            raise ConfigError(f"{p}: expected uint8 data ({len(lab)}, {3 * SIZE * SIZE}), "
                             f"got {data.dtype} {data.shape}")
        images[start:start + len(lab)] = data.reshape(-1, 3, SIZE, SIZE)
        start += len(lab)
    marker = markers.pop()
    if marker is None and map_clsloc is not None:
        return images, _devkit_to_sorted(labels1, map_clsloc), "npz"
    if marker is None:
        warnings.warn(f"ImageNet 64x64 labels in {root} follow the devkit's map_clsloc.txt order, not "
                      "sorted wnids; pass imagenet64.map_clsloc for teachers trained on sorted wnids")
        return images, labels1 - 1, "npz"
    if marker != CROPBOX:
        raise ConfigError(f"{root}: unknown preprocess marker {marker!r}")
    return images, labels1 - 1, "cropbox"


@gin.configurable
def imagenet64(root="data/imagenet64", split="train", source="npz", hflip=None, map_clsloc=None,
               workers=1):
    """uint8 images (N, 3, 64, 64) with labels 0..999; npz rows are R, G, B planes of 64×64.

    ``hflip`` defaults to True for train, False for val. ``map_clsloc`` (devkit file) remaps the
    published batches' labels to sorted-wnid order.
    """
    if split not in ("train", "val"):
        raise ConfigError(f"ImageNet 64x64 split must be 'train' or 'val', not {split!r}")
    if source == "npz":
        images, labels, variant = _load_npz(root, split, map_clsloc)
    elif source == "folder":
        items, _ = _list_folder(root, split)
        images = np.empty((len(items), 3, SIZE, SIZE), dtype=np.uint8)
        for i, planes in enumerate(_decode([p for p, _ in items], workers)):
            images[i] = planes
        labels, variant = np.array([lab for _, lab in items], dtype=np.int64), "cropbox"
    else:
        raise ConfigError(f"imagenet64 source must be 'npz' or 'folder', not {source!r}")
    return ImageArrays(torch.from_numpy(images), torch.from_numpy(labels), num_classes=NUM_CLASSES,
                       name=f"imagenet64-{variant}-{split}",
                       hflip=(split == "train") if hflip is None else bool(hflip))


def _save(path, **arrays):
    """np.savez written atomically: a crash never leaves a loadable half file."""
    write_atomic(path, lambda f: np.savez(f, **arrays))


def convert(folder, out, split="train", per_file=PER_FILE, workers=1):
    """Write root/split/<wnid>/* as npz batches: data (n, 12288) R, G, B planes, labels 1-based."""
    items, wnids = _list_folder(folder, split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob("train_data_batch_*.npz" if split == "train" else "val_data.npz"))
    if stale:
        raise ConfigError(f"{out} already holds {stale[0].name}; remove the old batches first")
    per_file = len(items) if split == "val" else per_file
    meta = dict(wnids=np.array(wnids), preprocess=np.array(CROPBOX))
    decoded = _decode([p for p, _ in items], workers)
    for k, start in enumerate(range(0, len(items), per_file), 1):
        chunk = items[start:start + per_file]
        data = np.stack([next(decoded).reshape(-1) for _ in chunk])
        labels = np.array([lab + 1 for _, lab in chunk], dtype=np.int64)
        name = f"train_data_batch_{k}.npz" if split == "train" else "val_data.npz"
        _save(out / name, data=data, labels=labels, **meta)
        print(f"wrote {out / name}: {len(chunk)} images", flush=True)


@command
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tract_repro.data.imagenet64", description=__doc__.splitlines()[0])
    parser.add_argument("--from-folder", required=True, help="DIR holding <split>/<wnid>/*.JPEG")
    parser.add_argument("--out", required=True, help="ROOT for the npz batches")
    parser.add_argument("--split", default="train", choices=["train", "val"])
    parser.add_argument("--per-file", type=int, default=PER_FILE, help="images per train batch file")
    parser.add_argument("--workers", type=int, default=1, help="decoding threads")
    args = parser.parse_args(argv)
    convert(args.from_folder, args.out, args.split, args.per_file, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
