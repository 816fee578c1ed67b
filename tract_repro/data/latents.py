"""A latent data set: the shards ``python -m tract_repro.encode_latents`` wrote, memory-mapped.

The interface of :class:`~tract_repro.data.arrays.ImageArrays` (``len``, ``shape``, ``num_classes``,
``name``, ``batch``), except that ``batch`` returns ``(x, cond)``: x the latents z (float64), cond a
:class:`~tract_repro.common.conditioning.Cond` with ``labels`` (B,) int64 (the class labels of a
class-conditional encoding, zeros otherwise) and, for a text-conditioned one, ``extra["text"]`` (B, L, D)
float32 caption embeddings.  ``decode(z)`` turns latents back into images, x = D(z / scaling_factor (+ shift_factor))
with D the decoder of the VAE the manifest names (checked against the digests recorded when it encoded), and
``pixels()`` is the image data set that was encoded (the real set evaluation compares samples with).
"""
import json
from pathlib import Path

import gin
import numpy as np
import torch

from tract_repro.common.conditioning import Cond
from tract_repro.common.errors import ConfigError
from tract_repro.data import latent_store as store

ENCODE = "python -m tract_repro.encode_latents --model MODEL --source SRC --out {folder}"


class LatentArrays:
    """Encoded latents, labels and caption embeddings read from memory-mapped ``.npy`` shards."""

    hflip = False  # a latent is not flipped: the flip of z is not the latent of the flipped image
    encoded = True  # samples are latents: decode() makes them images, pixels() is the set that was encoded
    decode_batch = 256
    bounded = False  # z is not confined to [−1, 1]: samplers leave x̂ unclipped (run.json "bounded")

    def __init__(self, folder):
        self.folder = Path(folder)
        manifest = store.read_manifest(self.folder)
        if manifest is None:
            raise ConfigError(f"no latents in {self.folder} ({store.MANIFEST} missing): encode them first with "
                              + ENCODE.format(folder=self.folder))
        total = store.num_shards(manifest["count"], manifest["shard_size"])
        done = store.complete_shards(self.folder, manifest)
        if done < total:
            raise ConfigError(f"the encoding in {self.folder} is incomplete ({done} of {total} shards): run the "
                              "same python -m tract_repro.encode_latents command again to finish it")
        self.manifest = manifest
        self.num_classes = int(manifest["num_classes"])
        self.scaling_factor = float(manifest["scaling_factor"])
        self.shift_factor = manifest.get("shift_factor")
        self.text = manifest["text"] is not None
        self.name = f"latents-{self.folder.name}"
        self._maps = {}

    def __len__(self):
        return int(self.manifest["count"])

    @property
    def shape(self):
        return tuple(self.manifest["latent_shape"])

    def __getstate__(self):  # memory maps and the VAE are reopened, not pickled, in another process
        return {k: v for k, v in self.__dict__.items() if k not in ("_maps", "_vae", "_pixels", "_source")}

    def __setstate__(self, state):
        self.__dict__.update(state, _maps={})

    @property
    def model(self):
        """The diffusers folder whose VAE encoded these latents (as the manifest names it)."""
        return Path(self.manifest["model"])

    @property
    def decoder_digest(self):
        """sha256 of the VAE files (config and weights) recorded when the latents were encoded: which decoder
        ``decode`` is (a cache of decoded samples keys on it)."""
        import hashlib

        vae = sorted((k, v) for k, v in self.manifest["files_sha256"].items() if k.startswith("vae/"))
        return hashlib.sha256(json.dumps(vae).encode()).hexdigest()

    def _decoder(self):
        """The encoding's VAE, loaded once, after its files are checked against the manifest's digests."""
        if getattr(self, "_vae", None) is None:
            from tract_repro.data.latent_models import check_model_folder, component_digests, load_vae

            model = self.model
            check_model_folder(model)
            recorded = {k: v for k, v in self.manifest["files_sha256"].items() if k.startswith("vae/")}
            now = {k: v for k, v in component_digests(model, False).items() if k.startswith("vae/")}
            if now != recorded:
                changed = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
                raise ConfigError(f"the VAE in {model} is not the one that encoded {self.folder} ({changed[0]} "
                                  f"differs): restore it, or encode again with " + ENCODE.format(folder=self.folder))
            self._vae = load_vae(model)
        return self._vae

    def decode(self, z):
        """Images x = D(z / scaling_factor (+ shift_factor)) of latents z (N, C, h, w), decoded in batches of
        ``decode_batch`` in float32 on z's device: (N, C_image, H, W) in z's dtype, unclipped."""
        from tract_repro.data.latent_models import decode_latents

        vae = self._decoder()
        if next(vae.parameters()).device != z.device:
            vae.to(z.device)
        return decode_latents(vae, z, self.scaling_factor, self.shift_factor, self.decode_batch).to(z.dtype)

    @property
    def image_shape(self):
        """(C, H, W) of the decoded images: the VAE's output channels at the encoded resolution."""
        config = json.loads((self.model / "vae" / "config.json").read_text())
        resolution = int(self.manifest["resolution"])
        return (int(config.get("out_channels", 3)), resolution, resolution)

    def source(self):
        """The source these latents were encoded from, opened once; one line if it has changed since."""
        if getattr(self, "_source", None) is None:
            from tract_repro.data.latent_sources import open_source

            source = open_source(self.manifest["source"]["path"])
            if source.identity() != self.manifest["source"]:
                raise ConfigError(f"the source {source.spec} has changed since it was encoded into {self.folder}: "
                                  "encode it again with " + ENCODE.format(folder=self.folder))
            self._source = source
        return self._source

    def captions(self, idx):
        """The caption strings of samples ``idx`` (as the source gives them), for a text-conditioned encoding."""
        if not self.text:
            raise ConfigError(f"{self.folder} holds no caption embeddings (encoded without text): encode a "
                              "text-conditioned model's captions with " + ENCODE.format(folder=self.folder))
        captions = self.source().captions()
        return [captions[i] for i in self._indices(idx)]

    def image_batches(self, batch=256):
        """The encoded images, in order, ``batch`` at a time: (B, C, R, R) float32 in [−1, 1], read from the source
        as the encoder read them (a reference set too large to hold in memory streams through this)."""
        source, resolution, chunk = self.source(), int(self.manifest["resolution"]), []
        for item in source.items():
            chunk.append(source.pixels(item, resolution))
            if len(chunk) == batch:
                yield torch.from_numpy(np.stack(chunk))
                chunk = []
        if chunk:
            yield torch.from_numpy(np.stack(chunk))

    def pixels(self):
        """The images that were encoded, with their labels, as an :class:`ImageArrays` in the encoder's input space
        (sample i is latent i's image); one line if the source has changed since it was encoded."""
        if getattr(self, "_pixels", None) is None:
            from tract_repro.data.arrays import ImageArrays

            source = self.source()
            resolution = int(self.manifest["resolution"])
            images = np.stack([source.pixels(item, resolution) for item in source.items()])
            labels = torch.from_numpy(self._rows("labels", np.arange(len(self))).astype(np.int64))
            self._pixels = ImageArrays(torch.from_numpy(images), labels, self.num_classes, name=source.spec)
        return self._pixels

    def _shard(self, kind, k):
        """Shard k's ``kind`` array, memory-mapped (opened once)."""
        if (kind, k) not in self._maps:
            array = np.load(self.folder / store.shard_file(kind, k), mmap_mode="r", allow_pickle=False)
            first, stop = store.shard_rows(self.manifest, k)
            if array.shape[0] != stop - first:
                raise ConfigError(f"{self.folder / store.shard_file(kind, k)} has {array.shape[0]} rows, not "
                                  f"{stop - first}: encode {self.folder} again")
            self._maps[kind, k] = array
        return self._maps[kind, k]

    def _rows(self, kind, idx):
        """Rows ``idx`` (int64 array) of every shard's ``kind`` array, gathered per shard: (len(idx), …)."""
        size = self.manifest["shard_size"]
        shard, offset = np.divmod(idx, size)
        template = self._shard(kind, 0)
        out = np.empty((len(idx), *template.shape[1:]), dtype=template.dtype)
        for k in np.unique(shard):
            where = shard == k
            out[where] = self._shard(kind, int(k))[offset[where]]
        return out

    def _indices(self, idx):
        idx = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for {n} latents: {idx.min()}..{idx.max()}")
        return np.where(idx < 0, idx + n, idx)

    def cond(self, idx):
        """The :class:`Cond` of samples ``idx``: labels (zeros unless class-conditional) and caption embeddings."""
        idx = self._indices(idx)
        if self.manifest["conditioning"] == "class":
            labels = torch.from_numpy(self._rows("labels", idx).astype(np.int64))
        else:
            labels = torch.zeros(len(idx), dtype=torch.long)
        extra = {}
        if self.text:
            extra["text"] = torch.from_numpy(self._rows("text", idx).astype(np.float32))
        return Cond(labels, extra)

    def batch(self, idx, generator=None):
        """(z float64 (B, C, h, w), cond) for data set indices ``idx``; ``generator`` is unused (no augmentation)."""
        idx = self._indices(idx)
        x = torch.from_numpy(self._rows("latents", idx).astype(np.float64))
        return x, self.cond(idx)

    def null_text(self):
        """The empty prompt's embedding ∅ (L, D) float32, or None for an encoding without text."""
        if not self.text:
            return None
        return torch.from_numpy(np.load(self.folder / store.NULL_TEXT, allow_pickle=False).astype(np.float32))

    def grid_cond(self, n):
        """The :class:`Cond` of samples 0, 1, …, n − 1 (cycling past N): training-time sample grids."""
        return self.cond(np.arange(n) % len(self))


@gin.configurable
def latents(folder="data/latents"):
    """The latent data set encoded into ``folder`` (see :class:`LatentArrays`)."""
    return LatentArrays(folder)
