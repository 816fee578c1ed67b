"""Image–caption sources for latent encoding: a folder with ``captions.jsonl``, or WebDataset tar shards.

A source is N samples in a fixed order; sample i is an :class:`Item` (key, encoded image bytes, caption or
None, class label or None).  Both kinds decode and prepare images with the same :func:`prepare`, so the same
image files give the same pixels whichever way they are stored.

* **Folder**: ``DIR/captions.jsonl``, one JSON object a line, ``{"file": "0001.png", "caption": "...",
  "label": 3}`` (``caption`` and ``label`` optional), the file relative to DIR.
* **The upsampled digits** (``digits:R``, e.g. ``digits:32``): scikit-learn's 1797 digits with their labels,
  upsampled by nearest neighbour to R×R, 1 channel in [−1, 1] (:func:`~tract_repro.data.digits.upsample`), made in
  memory: no image file is written or decoded.
* **WebDataset shards** (the LAION/COCO layout written by img2dataset): tar files holding ``key.jpg`` (or
  ``.jpeg``, ``.png``, ``.webp``) with ``key.txt`` (the caption) or ``key.json`` (``{"caption": ...}``), and
  optionally ``key.cls`` or a ``label``/``cls`` entry of the JSON.  Given as a directory (its ``*.tar``,
  sorted), one path, or a brace pattern (``shards/{00000..00009}.tar``).  Before anything is encoded the
  shards' headers and small text members are scanned (tarfile, random access), which counts the samples and
  checks every one; images are then read through ``webdataset``.

Every fault is a one-line :class:`ConfigError` raised before anything is written.
"""
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tract_repro.common.errors import ConfigError
from tract_repro.common.files import sha256

CAPTIONS = "captions.jsonl"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FIRST_FEW = 3  # how many offending names an error message lists
_META = re.compile(r"__[^/]*__($|/)")  # members webdataset skips (``__key__``-style metadata)


@dataclass(frozen=True)
class Item:
    """One sample: ``image`` is the encoded file's bytes (an array (C, R, R) in [−1, 1] for a source made in memory);
    ``caption`` and ``label`` may be None."""

    key: str
    image: bytes | np.ndarray
    caption: str | None
    label: int | None


def prepare(image_bytes, resolution, key="image"):
    """Decode, take the largest centred square, resize it (bicubic, antialiased) to R×R: (3, R, R) float32.

    x = u8 / 127.5 − 1 ∈ [−1, 1]; the square's offset is ⌊(L − S) / 2⌋ on the long side L.
    """
    try:
        with Image.open(io.BytesIO(image_bytes)) as im:
            im = im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 (any decoding failure is the same fault for the user)
        raise ConfigError(f"cannot decode image {key}: {type(exc).__name__}: {' '.join(str(exc).split())}; "
                          "replace or remove it from the source") from None
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    square = im.crop((left, top, left + s, top + s))
    if s != resolution:
        square = square.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return (np.asarray(square, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


def _names(names, total=None):
    """'a, b, c and 7 more' for the first few of ``names``."""
    total = len(names) if total is None else total
    shown = ", ".join(str(n) for n in names[:FIRST_FEW])
    return shown + (f" and {total - FIRST_FEW} more" if total > FIRST_FEW else "")


def _label(value, where):
    try:
        label = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{where}: label {value!r} is not an integer") from None
    if label < 0:
        raise ConfigError(f"{where}: label {label} is negative; class labels are 0, 1, …")
    return label


class Source:
    """What every kind shares: N, the captions and labels summary, and the checks on them; how an item becomes
    pixels (:meth:`pixels`, described by ``preprocess``), with ``channels`` channels, at any resolution (or at the
    source's own, ``resolution``)."""

    kind = ""
    spec = ""
    preprocess = "center-square-crop+bicubic-resize, x = u8 / 127.5 - 1"
    channels = 3
    resolution = None  # a source of one fixed resolution says which

    def pixels(self, item, resolution):
        """Item ``item`` as the encoder's input: (C, R, R) float32 in [−1, 1]."""
        return prepare(item.image, resolution, item.key)

    def __len__(self):
        return self.count

    def _summarise(self, keys_without_caption, labels):
        """Record which samples lack a caption and check the labels: all samples have one, or none."""
        if self.count == 0:
            raise ConfigError(f"{self.spec} holds no samples: add images (and captions) to it")
        self.keys_without_caption = keys_without_caption
        have = [lab is not None for lab in labels]
        if any(have) and not all(have):
            missing = [str(i) for i, h in enumerate(have) if not h]
            raise ConfigError(f"{self.spec}: samples {_names(missing)} have no label while others have one; "
                              "label every sample or none")
        self.has_labels = all(have)
        self.max_label = max(labels) if self.has_labels else None

    def captions(self):
        """Every sample's caption (None where it has none), in order, without reading an image."""
        return list(self._captions)

    def require_captions(self, why):
        """One line naming the first samples without a caption, if there are any."""
        if self.keys_without_caption:
            raise ConfigError(f"{self.spec}: samples {_names(self.keys_without_caption)} have no caption, "
                              f"which {why}; add a caption to each")


class FolderSource(Source):
    """Images in a folder, listed with their captions (and labels) in ``captions.jsonl``."""

    kind = "folder"

    def __init__(self, root, spec=None):
        self.root = Path(root)
        self.spec = str(root) if spec is None else spec
        path = self.root / CAPTIONS
        if not path.is_file():
            raise ConfigError(f"no {CAPTIONS} in {self.root}: write one line "
                              '{"file": "0001.png", "caption": "..."} per image')
        self.captions_file = path
        self.entries = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{n} is not JSON ({exc.msg}): one object a line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("file"), str):
                raise ConfigError(f'{path}:{n} has no "file" entry: {{"file": "0001.png", "caption": "..."}}')
            caption = obj.get("caption")
            label = None if obj.get("label") is None else _label(obj["label"], f"{path}:{n}")
            self.entries.append((obj["file"], None if caption is None else str(caption), label))
        self.count = len(self.entries)
        self._captions = [c for _, c, _ in self.entries]
        missing = [f for f, _, _ in self.entries if not (self.root / f).is_file()]
        if missing:
            raise ConfigError(f"{path} lists {len(missing)} images missing from {self.root}: {_names(missing)}; "
                              "add them or remove their lines")
        self._summarise([f for f, c, _ in self.entries if c is None], [lab for _, _, lab in self.entries])

    def identity(self):
        return {"kind": self.kind, "path": self.spec, "captions_sha256": sha256(self.captions_file)}

    def items(self, start=0):
        """Items start, start + 1, …, N − 1."""
        for name, caption, label in self.entries[start:]:
            yield Item(name, (self.root / name).read_bytes(), caption, label)


def _text(data):
    return data.decode("utf-8").strip()


def _fields(sample, where):
    """(caption or None, label or None) from a sample's ``txt``/``json``/``cls`` members (bytes)."""
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}.json is not JSON ({exc}); fix or remove it") from None
        meta = meta if isinstance(meta, dict) else {}
    caption = _text(sample["txt"]) if "txt" in sample else meta.get("caption")
    label = sample.get("cls", meta.get("label", meta.get("cls")))
    label = None if label is None else _label(_text(label) if isinstance(label, bytes) else label, where)
    return None if caption is None else str(caption), label


def _image_ext(sample):
    return next((e for e in IMAGE_EXTENSIONS if e in sample), None)


def _split(name):
    """webdataset's (key, extension) of a member name: the key ends at the first dot of the file name."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2).lower()) if match else (None, None)


def _scan_shard(path):
    """The samples of one tar, in order: [(key, {ext: bytes of the small text members, or None})]."""
    samples = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isreg() or _META.match(member.name):
                    continue
                key, ext = _split(member.name)
                if key is None:
                    continue
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                small = ext in ("txt", "json", "cls")
                samples[-1][1][ext] = tar.extractfile(member).read() if small else None
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise ConfigError(f"cannot read shard {path}: {type(exc).__name__}: {' '.join(str(exc).split())}; "
                          "replace or remove it") from None
    return samples


def shard_paths(spec):
    """The shard files of a directory (its ``*.tar``, sorted), a path or a brace pattern, in order."""
    from webdataset.shardlists import expand_urls

    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith((".tar", ".tar.gz", ".tgz")))
    urls = expand_urls(str(spec))
    remote = [u for u in urls if re.match(r"^[a-z][a-z0-9+]*:", u) and not re.match(r"^[a-zA-Z]:[\\/]", u)]
    if remote:
        raise ConfigError(f"shard {remote[0]} is not a local file: copy the shards to a local folder first")
    return [Path(u) for u in urls]


class ShardSource(Source):
    """WebDataset tar shards: scanned once for counts, captions and labels; images read with ``webdataset``."""

    kind = "webdataset"

    def __init__(self, spec):
        self.spec = str(spec)
        self.shards = shard_paths(spec)
        if not self.shards:
            raise ConfigError(f"{spec} holds no {CAPTIONS} and no .tar shards: add one or the other")
        self.sizes, keys_without_caption, labels, self._captions = [], [], [], []
        for shard in self.shards:
            if not shard.is_file():
                raise ConfigError(f"cannot read shard {shard}: no such file; check the shard pattern")
            samples = _scan_shard(shard)
            for key, sample in samples:
                if _image_ext(sample) is None:
                    raise ConfigError(f"shard {shard}: sample {key} has no image "
                                      f"({', '.join('.' + e for e in IMAGE_EXTENSIONS)}); fix or remove it")
                caption, label = _fields(sample, f"{shard}:{key}")
                if caption is None:
                    keys_without_caption.append(f"{shard.name}:{key}")
                self._captions.append(caption)
                labels.append(label)
            self.sizes.append(len(samples))
        self.count = sum(self.sizes)
        self._summarise(keys_without_caption, labels)

    def identity(self):
        return {"kind": self.kind, "path": self.spec,
                "shards": [{"file": str(p), "bytes": p.stat().st_size, "samples": n}
                           for p, n in zip(self.shards, self.sizes)]}

    def items(self, start=0):
        """Items start, …, N − 1: whole shards before ``start`` are not opened."""
        import webdataset as wds

        first = 0
        for shard, size in zip(self.shards, self.sizes):
            if start >= first + size:
                first += size
                continue
            seen = 0
            stream = wds.WebDataset([str(shard)], shardshuffle=False, empty_check=False,
                                    nodesplitter=None, workersplitter=None)
            for sample in stream:
                seen += 1
                if first + seen - 1 < start:
                    continue
                where = f"{shard}:{sample['__key__']}"
                caption, label = _fields(sample, where)
                yield Item(sample["__key__"], sample[_image_ext(sample)], caption, label)
            if seen != size:
                raise ConfigError(f"shard {shard} changed while it was encoded ({seen} samples, {size} when "
                                  "scanned); encode again into a new --out")
            first += size


class DigitsSource(Source):
    """scikit-learn's digits with their labels, upsampled by nearest neighbour to R×R (``digits:R``), in memory."""

    kind = "digits"
    channels = 1

    def __init__(self, spec, resolution):
        from tract_repro.data.digits import digits_upsampled

        self.spec, self.resolution = str(spec), int(resolution)
        data = digits_upsampled(self.resolution)
        self.images = data.images.numpy().astype(np.float32)
        self.labels = data.labels.numpy()
        self.count = len(self.images)
        self._captions = [None] * self.count
        self.preprocess = (f"scikit-learn digits 8x8 in [0, 16] -> x = v / 8 - 1, nearest-neighbour upsampling to "
                           f"{self.resolution}x{self.resolution}")
        self._summarise([str(i) for i in range(self.count)], [int(v) for v in self.labels])

    def identity(self):
        import hashlib

        digest = hashlib.sha256(np.ascontiguousarray(self.images).tobytes() + self.labels.astype(np.int64).tobytes())
        return {"kind": self.kind, "path": self.spec, "resolution": self.resolution, "interpolation": "nearest",
                "sha256": digest.hexdigest()}

    def items(self, start=0):
        for i in range(start, self.count):
            yield Item(str(i), self.images[i], None, int(self.labels[i]))

    def pixels(self, item, resolution):
        if resolution != self.resolution:
            raise ConfigError(f"{self.spec} is {self.resolution}×{self.resolution}: encode it at --resolution "
                              f"{self.resolution} (or name digits:{resolution})")
        return item.image


def open_source(spec):
    """The source named by ``spec``: ``digits:R``, a folder with captions.jsonl, a folder of .tar shards, a shard
    path or pattern."""
    from tract_repro.data.digits import source_resolution

    resolution = source_resolution(spec)
    if resolution is not None:
        return DigitsSource(spec, resolution)
    path = Path(spec)
    if path.is_dir() and (path / CAPTIONS).is_file():
        return FolderSource(path, str(spec))
    if path.is_file() and path.name == CAPTIONS:
        return FolderSource(path.parent, str(spec))
    if path.is_dir() or "{" in str(spec) or str(spec).endswith((".tar", ".tar.gz", ".tgz")):
        if path.is_dir() and not shard_paths(path):
            raise ConfigError(f"no {CAPTIONS} in {path} (and no .tar shards): write one line "
                              '{"file": "0001.png", "caption": "..."} per image, or point --source at shards')
        return ShardSource(spec)
    raise ConfigError(f"source {spec} not found: give digits:R, a folder with {CAPTIONS}, a folder of .tar shards, "
                      "or a shard path or brace pattern")
