"""Fail fast when a paper-scale setup's inputs are missing: ONE line naming what to fetch and where to put it.

    python -m tract_repro.results.check cifar10_pd --data data/cifar10 --teacher ckpts/cifar_original \\
        --inception ckpts/inception --protocol tract --out runs/paper/checks/cifar10_pd

A *setup* is a dataset with a teacher: ``cifar10_pd``, ``cifar10_edm``, ``imagenet64_pd``,
``imagenet64_edm``; or, for guided distillation, a dataset whose guided teacher the pipeline trains itself
(``cifar10_guided``, ``imagenet64_guided``: no teacher file to fetch); or a latent setup (``sd15``: Stable
Diffusion 1.5's diffusers folder, image–caption WebDataset shards to train on, COCO 2014 validation captions
and images to evaluate on (``--prompts-data``) and a CLIP folder (``--clip``) for the CLIP score; or a class-conditional
latent setup (``imagenet256``: the DiT-XL/2 256×256 diffusers folder and ImageNet-1k train as WebDataset shards with
``key.cls`` labels, no captions and no CLIP).  The check looks for the training data, the teacher file, the FID
protocol's Inception weights, (CIFAR-10) clean-fid's precomputed training-set statistics of that protocol, the executor options file and
(``--executor slurm``) SLURM's sbatch, and reports everything missing at once, exit status 2.  When all is there it writes ``OUT/data.json`` (the dataset's
files and sizes) and ``OUT/teacher.json`` (the teacher's sha256): the identities that the
reference-statistics and training stages of dvc.yaml depend on.  It imports no torch, so a
missing input is reported within a second.
"""
import argparse
import re
import shutil
from pathlib import Path

from tract_repro.evaluation import sources
from tract_repro.common.cli import command
from tract_repro.common.errors import ConfigError, one_line
from tract_repro.common.files import sha256, write_json

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
IMAGENET64_URL = "https://image-net.org/download-images"

#: setup → (dataset, what the teacher is, how to fetch it to {path})
SETUPS = {
    "cifar10_pd": ("cifar10", "Google PD CIFAR-10 teacher",
                   "gsutil cp gs://gresearch/diffusion-distillation/cifar_original {path}"),
    "imagenet64_pd": ("imagenet64", "Google PD ImageNet64 teacher",
                      "gsutil cp gs://gresearch/diffusion-distillation/imagenet_original {path}"),
    "cifar10_edm": ("cifar10", "NVIDIA EDM CIFAR-10 VE teacher",
                    "download https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-ve.pkl to {path}"),
    "imagenet64_edm": ("imagenet64", "NVIDIA EDM ImageNet64 ADM teacher",
                       "download https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl to {path}"),
    # guided distillation: the class-conditional teacher with label dropout is trained by the pipeline (no public one)
    "cifar10_guided": ("cifar10", None, None),
    "imagenet64_guided": ("imagenet64", None, None),
    # latent: a diffusers folder (safetensors only) fine-tuned to v by the pipeline, then distilled
    "sd15": ("sd15", "Stable Diffusion 1.5 diffusers folder",
             "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --exclude '*.bin' '*.ckpt' "
             "'*.fp16.*' --local-dir {path}"),
    # class-conditional latent: Meng et al.'s LDM-4 has no diffusers copy; the diffusers DiT stands in (docs/paper-scale.md)
    "imagenet256": ("imagenet256", "DiT-XL/2 256×256 diffusers folder",
                    "huggingface-cli download facebook/DiT-XL-2-256 --local-dir {path}"),
}
#: latent setups: the resolution they are encoded at; a text-to-image one (``prompts``) also what its evaluation
#: prompts are and the CLIP to score with; a class-conditional one (``classes``) its number of classes, no prompts
LATENT_SETUPS = {"sd15": dict(resolution=512, prompts="COCO 2014 validation", prompts_data="coco2014_val",
                              clip="openai/clip-vit-large-patch14"),
                 "imagenet256": dict(resolution=256, classes=1000, shards="ImageNet-1k train",
                                     fetch_shards="huggingface-cli download timm/imagenet-1k-wds --repo-type dataset "
                                                  "--include '*train*.tar' --local-dir {root} (gated: accept ImageNet's "
                                                  "terms on its Hub page first; or write shards with img2dataset "
                                                  "--output_format webdataset from ImageNet's train folder)")}
COCO_URL = "http://images.cocodataset.org"
#: the components a text-to-image diffusers folder needs, and the weights file each is read from
DIFFUSERS_PARTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                   "tokenizer": None}


def latent(setup):
    return setup in LATENT_SETUPS


def text_to_image(setup):
    """Whether a latent setup is text-to-image (evaluated on captions, with the CLIP score), not class-conditional."""
    return latent(setup) and LATENT_SETUPS[setup].get("prompts") is not None


def data_files(dataset, root):
    """([(relative name, size)] of the training files, or None) and the fetch instruction when they are missing."""
    root = Path(root)
    if dataset in LATENT_SETUPS:
        shards = sorted(p for p in root.glob("*.tar")) if root.is_dir() else []
        if shards:
            return [(p.name, p.stat().st_size) for p in shards], None
        spec = LATENT_SETUPS[dataset]
        if "fetch_shards" in spec:  # class-conditional: images with their class labels
            return None, (f"{spec['shards']} WebDataset shards (*.tar directly in the folder: key.jpg with key.cls, "
                          f"the class 0..{spec['classes'] - 1}, per sample) not found in {root}/: "
                          + spec["fetch_shards"].format(root=root))
        return None, (f"image-caption WebDataset shards (*.tar) not found in {root}/: write LAION-style shards there "
                      f"(img2dataset --output_format webdataset: key.jpg with key.txt, the caption, per sample)")
    if dataset == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = [folder / f"data_batch_{i}" for i in range(1, 6)]
        if all(f.is_file() for f in files):
            return [(str(f.relative_to(root)), f.stat().st_size) for f in files], None
        return None, f"CIFAR-10 training batches not found in {folder}/: download {CIFAR10_URL} and extract it into {root}/"
    found = {int(m.group(1)): p for p in root.glob("train_data_batch_*.npz")
             if (m := re.fullmatch(r"train_data_batch_(\d+)\.npz", p.name))}
    if found and sorted(found) == list(range(1, max(found) + 1)):
        return [(found[i].name, found[i].stat().st_size) for i in sorted(found)], None
    return None, (f"ImageNet 64x64 training batches (train_data_batch_*.npz) not found in {root}/: convert ImageNet's "
                  f"train folder with `python -m tract_repro.data.imagenet64 --from-folder DIR --out {root}` (centre "
                  f"crop + box resize, as the PD teacher saw), or unzip Imagenet64_train_npz.zip from "
                  f"{IMAGENET64_URL} into {root}/")


def diffusers_folder_problem(folder, what, fetch):
    """None, or one line: what a text-to-image diffusers folder lacks (model_index.json, a component, its
    safetensors weights; a pickled ``.bin`` alone is not read), and how to fetch it."""
    folder = Path(folder) if folder else None
    if folder is None or not (folder / "model_index.json").is_file():
        return f"{what} {folder} not found (no model_index.json): {fetch.format(path=folder)}"
    for part, weights in DIFFUSERS_PARTS.items():
        if not (folder / part).is_dir():
            return f"{what} {folder} has no {part}/: {fetch.format(path=folder)}"
        if weights and not any((folder / part).glob(f"{weights}.safetensors*")) \
                and not (folder / part / f"{weights}.safetensors.index.json").is_file():
            return (f"{what} {folder}/{part} has no {weights}.safetensors (pickled weights are not loaded): "
                    f"{fetch.format(path=folder)}")
    return None


def class_folder_problem(folder, what, fetch):
    """None, or one line: what a class-conditional diffusers folder lacks (model_index.json, transformer/ or unet/ and
    vae/ with weights, scheduler/), and how to fetch it.  The loader checks the weights themselves (a pickle only if
    torch.load(weights_only=True) reads it)."""
    folder = Path(folder) if folder else None
    if folder is None or not (folder / "model_index.json").is_file():
        return f"{what} {folder} not found (no model_index.json): {fetch.format(path=folder)}"
    model = next((folder / part for part in ("transformer", "unet") if (folder / part).is_dir()), None)
    for part, directory in (("transformer/ or unet/", model), ("vae/", folder / "vae"),
                            ("scheduler/", folder / "scheduler")):
        if directory is None or not directory.is_dir():
            return f"{what} {folder} has no {part}: {fetch.format(path=folder)}"
        if part != "scheduler/" and not any(directory.glob("diffusion_pytorch_model*.safetensors*")) \
                and not any(directory.glob("diffusion_pytorch_model*.bin")):
            return (f"{what} {folder}/{directory.name} has no diffusion_pytorch_model weights: "
                    f"{fetch.format(path=folder)}")
    return None


def prompts_problem(setup, root):
    """None, or one line: the evaluation captions and images of a latent setup, and how to make them."""
    root = Path(root) if root else None
    if root is not None and ((root / "captions.jsonl").is_file() or any(root.glob("*.tar"))):
        return None
    return (f"{LATENT_SETUPS[setup]['prompts']} captions not found in {root}/: download {COCO_URL}/zips/val2014.zip and "
            f"{COCO_URL}/annotations/annotations_trainval2014.zip, unzip both, then python -m tract_repro.data.coco "
            f"--annotations annotations/captions_val2014.json --images val2014 --out {root}")


def clip_problem(setup, clip):
    """None, or one line: the CLIP folder (config.json of model_type clip, safetensors weights) and how to fetch it."""
    folder = Path(clip) if clip else None
    if folder is not None and (folder / "config.json").is_file() and \
            (any(folder.glob("model.safetensors*")) or (folder / "model.safetensors.index.json").is_file()):
        return None
    name = LATENT_SETUPS[setup]["clip"]
    return (f"CLIP model {folder} not found (config.json and model.safetensors, for the CLIP score): huggingface-cli "
            f"download {name} --exclude '*.bin' '*.msgpack' '*.h5' --local-dir {folder}")


def check(setup, data, teacher, inception, protocol="tract", executor="inline", cluster=None, prompts=None, clip=None):
    """(problems, data identity, teacher identity) of a setup; problems is a list of one-line instructions."""
    if setup not in SETUPS:
        raise ConfigError(f"unknown setup {setup!r}: choose {', '.join(SETUPS)}")
    dataset, what, fetch = SETUPS[setup]
    files, problem = data_files(dataset, data)
    problems = [problem] if problem else []
    if text_to_image(setup):
        problems += [p for p in (diffusers_folder_problem(teacher, what, fetch), prompts_problem(setup, prompts),
                                 clip_problem(setup, clip)) if p]
    elif latent(setup):  # class-conditional: the model folder only (no captions, no CLIP)
        problems += [p for p in (class_folder_problem(teacher, what, fetch),) if p]
    elif what is not None and (teacher is None or not Path(teacher).is_file()):
        problems.append(f"{what} {teacher} not found: {fetch.format(path=teacher)}")
    for missing in (sources.missing_inception(protocol, inception),
                    sources.missing_cleanfid_stats(protocol) if dataset == "cifar10" else None):
        if missing:
            problems.append(missing)
    if cluster is not None and not Path(cluster).is_file():
        problems.append(f"the executor options file {cluster} (params.yaml paper.cluster) is missing: restore "
                        f"gin/paper/cluster.gin, or point paper.cluster at your own slurm.* options")
    if executor == "slurm" and shutil.which("sbatch") is None:
        problems.append("paper.executor is slurm but sbatch is not on PATH: run `dvc repro` on the cluster's login "
                        "node, or set paper.executor to local (this machine's GPUs) in params.yaml")
    if problems:
        return problems, None, None
    if what is None:
        return [], dict(dataset=dataset, root=str(data), files=files), dict(setup=setup, trained_by="the pipeline")
    if latent(setup):  # a folder of several GB: its model_index.json's digest and every file's size
        listing = sorted((p.relative_to(teacher).as_posix(), p.stat().st_size) for p in Path(teacher).rglob("*")
                         if p.is_file() and not p.name.startswith("."))
        return [], dict(dataset=dataset, root=str(data), files=files), \
            dict(setup=setup, path=str(teacher), sha256=sha256(Path(teacher) / "model_index.json"), files=listing)
    return [], dict(dataset=dataset, root=str(data), files=files), \
        dict(setup=setup, path=str(teacher), size=Path(teacher).stat().st_size, sha256=sha256(teacher))


@command
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tract_repro.results.check", description=__doc__.splitlines()[0])
    parser.add_argument("setup", choices=sorted(SETUPS))
    parser.add_argument("--data", required=True, help="dataset root, e.g. data/cifar10")
    parser.add_argument("--teacher", help="teacher file, e.g. ckpts/cifar_original (not for the *_guided setups), or "
                                          "a latent setup's diffusers folder")
    parser.add_argument("--prompts-data", help="latent text-to-image setups: the evaluation captions and images "
                                               "(COCO 2014 validation)")
    parser.add_argument("--clip", help="latent text-to-image setups: the CLIP folder of the CLIP score")
    parser.add_argument("--inception", required=True, help="Inception weights file or folder")
    parser.add_argument("--protocol", default="tract", help="FID protocol of the evaluations (tract, clean, edm)")
    parser.add_argument("--executor", default="inline", help="where the stages run (slurm needs sbatch on PATH)")
    parser.add_argument("--cluster", help="the executor options file the stages pass to the launcher")
    parser.add_argument("--out", required=True, help="folder for data.json and teacher.json")
    args = parser.parse_args(argv)
    try:
        problems, data, teacher = check(args.setup, args.data, args.teacher, args.inception, args.protocol, args.executor,
                                        args.cluster, args.prompts_data, args.clip)
    except (ConfigError, OSError) as exc:  # an unreadable input is one more missing input
        problems = [one_line(exc)]
    if problems:
        raise ConfigError(f"missing paper-scale inputs ({args.setup}): " + "; ".join(problems))
    write_json(Path(args.out) / "data.json", data)
    write_json(Path(args.out) / "teacher.json", teacher)
    trained = "the teacher trained by the pipeline" if "sha256" not in teacher else \
        f"teacher {args.teacher} (sha256 {teacher['sha256'][:16]}…)"
    print(f"{args.setup}: {data['dataset']} in {args.data} ({len(data['files'])} files), {trained}, Inception and "
          f"reference sources present")
    return 0


if __name__ == "__main__":
    from tract_repro.launching.process import exit_now

    exit_now(main())
