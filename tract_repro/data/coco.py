"""COCO 2014 validation as an evaluation caption set: N images drawn once, one of each image's captions, written as a
``captions.jsonl`` that ``python -m tract_repro.encode_latents --source`` reads (FID-30K and the CLIP score).

    python -m tract_repro.data.coco --annotations annotations/captions_val2014.json --images val2014 \\
        --out data/coco2014_val [--samples 30000] [--seed 0]

Draw: numpy's PCG64 seeded with ``seed`` permutes the annotated image ids (sorted) and keeps the first N; each kept
image's caption is one of its annotations chosen by the same generator.  Line i is sample i, so seed i of an
evaluation gets caption i (:mod:`tract_repro.evaluation.prompts`).  The image paths are written relative to
``--out``, so the folder stays valid as long as the images stay where they are.  ``--out`` must not hold a
``captions.jsonl`` yet; nothing is overwritten.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from tract_repro.common.cli import command
from tract_repro.common.errors import ConfigError
from tract_repro.common.files import sha256, write_json, write_text

DOWNLOAD = ("download http://images.cocodataset.org/annotations/annotations_trainval2014.zip and "
            "http://images.cocodataset.org/zips/val2014.zip and unzip both")


def read_annotations(path):
    """{image id: (file name, [captions])} of a COCO captions file (captions_val2014.json), else one line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"COCO captions {path} not found: {DOWNLOAD}, then pass annotations/captions_val2014.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        images = {int(i["id"]): (str(i["file_name"]), []) for i in data["images"]}
        for a in data["annotations"]:
            images[int(a["image_id"])][1].append(" ".join(str(a["caption"]).split()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{path} is not a COCO captions file ({type(exc).__name__}: {exc}): pass "
                          f"annotations/captions_val2014.json") from None
    return {k: v for k, v in images.items() if v[1]}


def draw(images, samples, seed=0):
    """[(file name, caption)] of ``samples`` images drawn without replacement, one caption each (see module doc)."""
    if samples < 1 or samples > len(images):
        raise ConfigError(f"--samples {samples}: choose 1 to {len(images)} (the annotated images)")
    rng = np.random.default_rng(seed)
    ids = sorted(images)
    chosen = [ids[i] for i in rng.permutation(len(ids))[:samples]]
    return [(images[i][0], images[i][1][int(rng.integers(len(images[i][1])))]) for i in chosen]


def write_caption_set(annotations, images_dir, out, samples=30_000, seed=0):
    """Write ``out/captions.jsonl`` (and ``out/selection.json``, how it was drawn); returns the pairs written."""
    out, images_dir = Path(out), Path(images_dir)
    if (out / "captions.jsonl").exists():
        raise ConfigError(f"{out}/captions.jsonl exists: choose a new --out (nothing is overwritten)")
    if not images_dir.is_dir():
        raise ConfigError(f"COCO images folder {images_dir} not found: {DOWNLOAD}, then pass the val2014 folder")
    pairs = draw(read_annotations(annotations), samples, seed)
    missing = [name for name, _ in pairs if not (images_dir / name).is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} drawn images are missing from {images_dir}, e.g. {missing[0]}: unzip all of "
                          f"val2014.zip there")
    relative = Path(os.path.relpath(images_dir.absolute(), out.absolute()))
    lines = [json.dumps({"file": (relative / name).as_posix(), "caption": caption}, ensure_ascii=False)
             for name, caption in pairs]
    write_json(out / "selection.json", dict(annotations=str(annotations), annotations_sha256=sha256(annotations),
                                            images=str(images_dir), samples=samples, seed=seed,
                                            rule="PCG64(seed) permutation of the sorted image ids, first N; one "
                                                 "caption per image drawn by the same generator"))
    write_text(out / "captions.jsonl", "\n".join(lines) + "\n")
    return pairs


@command
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tract_repro.data.coco", description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", required=True, help="COCO's captions_val2014.json")
    parser.add_argument("--images", required=True, help="the val2014 image folder")
    parser.add_argument("--out", required=True, help="folder for captions.jsonl (new)")
    parser.add_argument("--samples", type=int, default=30_000, help="images drawn (30,000 for FID-30K)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pairs = write_caption_set(args.annotations, args.images, args.out, args.samples, args.seed)
    print(f"{args.out}/captions.jsonl: {len(pairs)} COCO images with one caption each (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
