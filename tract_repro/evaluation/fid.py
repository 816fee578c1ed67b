"""Image FID by a named protocol (method-spec §8; :mod:`tract_repro.evaluation.protocols`), through clean-fid's
features and statistics.

    python -m tract_repro.evaluation.fid reference cifar10 --protocol tract --out runs/paper/fid_ref/cifar10.npz
    python -m tract_repro.evaluation.fid reference imagenet64 --root data/imagenet64 --out runs/paper/fid_ref/imagenet64.npz
    python -m tract_repro.evaluation.fid evaluate runs/paper/RUN --steps 1 2 --reference runs/paper/fid_ref/cifar10.npz

**Seed ranges.** 50,000 samples for each of 3 disjoint seed ranges (0..49999, 50000..99999,
100000..149999; one seed per sample, as EDM), FID per range against the training-set reference
statistics, reported as mean ± std over the ranges (std with ddof = 1) and their minimum.  **The
protocol** (``tract``, the official TRACT code's and the default; ``clean``; ``edm``) decides the
Inception weights, the resize to 299, the 8-bit quantiser and the headline (EDM's: the best range).
The Inception network is built **once** per evaluation and reused for every batch, step count and seed range.

**Reference statistics** (:mod:`tract_repro.evaluation.references`).  CIFAR-10 uses clean-fid's
precomputed training-set statistics of the protocol's network and input path (``cifar10_<clean-fid mode>_train_32.npz``), read from clean-fid's
own stats folder and never downloaded; ImageNet 64 statistics are computed from our training-set
loader (the same variant the runs train on) with the same extractor; ``--source file --file F.npz``
imports published ones (EDM's ``fid-refs``).  Either way they are saved as an ``.npz`` (``mu``,
``sigma`` and what they were computed from) and every result records that file's sha256 and the protocol.

``--executor local|slurm`` runs the work as a job and waits for it: launch's local executor, or a
SLURM job of one task on one GPU with the ``slurm.*`` options of ``--cluster FILE.gin``
(:mod:`tract_repro.launching.slurm`).  Errors print one line and exit with status 2 (1 for a failed job).
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from tract_repro.common.cli import command
from tract_repro.common.errors import ConfigError
from tract_repro.common.files import sha256, write_atomic, write_json
from tract_repro.evaluation import frechet, protocols, sanity, sources
from tract_repro.evaluation.inception import ImageFeatures, inception_extractor
from tract_repro.evaluation.references import (cifar10_reference, dataset_reference, file_reference, latent_reference,
                                               load_reference)
from tract_repro.evaluation.runs import per_weight_outputs, sample_shape
from tract_repro.sampling import registry

FIRST_SEEDS = (0, 50_000, 100_000)
SAMPLES = 50_000
IS_SPLITS = 10  # Inception Score: each seed range split in 10, the usual protocol
STD_DDOF = 1


def seed_ranges(first_seeds=FIRST_SEEDS, samples=SAMPLES):
    """One ``range`` of ``samples`` seeds per first seed; they must not overlap."""
    if samples < 2:
        raise ConfigError(f"FID needs at least 2 samples per seed range, got {samples}")
    ranges = [range(int(s), int(s) + int(samples)) for s in first_seeds]
    if not ranges or any(r.start < 0 for r in ranges):
        raise ConfigError(f"seed ranges need non-negative first seeds, got {list(first_seeds)}")
    ordered = sorted(ranges, key=lambda r: r.start)
    for a, b in zip(ordered, ordered[1:]):
        if b.start < a.stop:
            raise ConfigError(f"seed ranges {a.start}..{a.stop - 1} and {b.start}..{b.stop - 1} overlap: "
                             f"first seeds must be at least {samples} apart")
    return ranges


# ----------------------------------------------------------------------------------------- evaluation

def evaluate_fid(run_dir, steps, reference, first_seeds=FIRST_SEEDS, samples=SAMPLES, protocol=None, batch_size=500,
                 device="cpu", sampler="ddim", inception=None, extractor_factory=None, resize=None, out=None,
                 grid_samples=100, ws=(None,), extrapolate_to=None, prompts=None, clip=None, clip_batch=64):
    """FID of a finished run's inference-EMA samples at each guidance weight w in ``ws`` (None: unguided) and
    step count K, per seed range and mean ± std.

    A run on latents (an encoded data set) samples latents unclipped and its data set's VAE decodes each batch
    before the features; the reference is of images.  A text-to-image run takes its captions from ``prompts``
    (an encoded caption set, :class:`~tract_repro.evaluation.prompts.Prompts`: seed s → caption s mod N), and
    ``clip`` (a local CLIP folder) adds the CLIP score of each seed range's samples against their captions
    (:mod:`tract_repro.evaluation.clip_score`); its grids carry the captions.

    ``protocol`` (default: the reference statistics') names the FID protocol.  ``extractor_factory(protocol=,
    path=, device=)`` builds the feature network (default: the protocol's Inception from local weights); it is
    called exactly once.  Writes ``out`` (JSON) and a PNG grid per K beside it.  ``extrapolate_to = n`` adds each
    range's FID extrapolated to n samples (:func:`frechet.extrapolated_distance`, the official code's estimate).
    """
    from tract_repro.evaluation.generate import generate_batches
    from tract_repro.evaluation.metrics import conditioned
    from tract_repro.evaluation.prompts import for_run
    from tract_repro.evaluation.runs import load_run
    from tract_repro.sampling.images import save_captioned_grid, save_grid

    ranges = seed_ranges(first_seeds, samples)
    if not steps or any(k < 1 for k in steps):
        raise ConfigError(f"FID needs step counts ≥ 1, got {list(steps)}")
    ref_stats, ref = load_reference(reference)
    made_with = protocols.of_metadata(ref)
    spec = protocols.get(protocol or (made_with.name if made_with else protocols.DEFAULT))
    if made_with is not None and made_with != spec:
        raise ConfigError(f"reference statistics {reference} are of FID protocol {made_with.name!r}, not {spec.name!r}: "
                         f"compute a reference with --protocol {spec.name}")
    if clip is not None and prompts is None:
        raise ConfigError("--clip scores samples against their captions: give the captions with --prompts FOLDER too")
    run = load_run(run_dir, with_data="encoded")
    encoded = getattr(run.data, "encoded", False)
    decode = run.data.decode if encoded else None
    shape = sample_shape(run)
    image = tuple(run.data.image_shape) if encoded else shape
    if "shape" in ref and tuple(ref["shape"]) != image:
        raise ConfigError(f"reference statistics {reference} are of {ref['dataset']} images {ref['shape']}, but "
                         f"{run.path} makes {image}: use the reference of its dataset")
    prompt_set = for_run(run, prompts)
    scorer = None
    if clip is not None:
        from tract_repro.evaluation.clip_score import ClipScorer

        scorer = ClipScorer(clip, device)  # loaded once, before any sampling
    for w in ws:  # a run that takes no w, or a w-student without one: one line before any work
        conditioned(run, w)
    device = torch.device(device)
    run.denoiser.to(device)
    grid = run.grid.to(device)
    classes = run.denoiser.net.num_classes if run.denoiser.conditional else 1
    factory = extractor_factory or inception_extractor
    extractor = factory(protocol=spec.name, path=inception, device=str(device))  # built once
    features = ImageFeatures(extractor, spec.name, device, resize)
    probabilities = getattr(extractor, "probabilities", None)  # Inception's class head, if the protocol's network has one
    per_w = per_weight_outputs(out, ws)
    single = Path(out) if out else run.path / "eval" / "fid.json"
    rows = []
    for w, k in [(w, k) for w in ws for k in steps]:
        denoiser, extra, calls = conditioned(run, w)
        name = f"{k}steps" if w is None else f"{k}steps_w{w:g}"
        out = per_w[w] if per_w else single
        fids, scores, extrapolated, clip_scores = [], [], [], []
        for r, seeds in enumerate(ranges):
            feats, cosines = [], []
            for b, x in enumerate(generate_batches(denoiser, grid, k, seeds, shape, classes, batch_size,
                                                   desc=f"{run.path.name} {name}, seeds {seeds.start}..",
                                                   sampler=sampler, device=device, extra=extra, decode=decode,
                                                   clip=run.bounded, prompts=prompt_set)):
                chunk = seeds[b * batch_size:b * batch_size + len(x)]
                if r == 0 and b == 0 and grid_samples:
                    png = out.with_name(f"{out.stem}_{name}.png")
                    if prompt_set is not None:  # captioned: a few images, at their own size
                        few = min(grid_samples, 16)
                        save_captioned_grid(x[:few], prompt_set.captions(chunk[:few]), png, ncol=4)
                    else:
                        save_grid(x[:grid_samples], png, scale=2 if image[-1] < 128 else 1)
                feats.append(features(spec.quantise(x)))
                if scorer is not None:
                    cosines.append(scorer.cosines(x, prompt_set.captions(chunk), clip_batch, progress=False))
            if cosines:
                clip_scores.append(float((100 * torch.cat(cosines).clamp(min=0)).mean()))
            feats = np.concatenate(feats)
            fids.append(frechet.frechet_distance(frechet.statistics(feats), ref_stats))
            if extrapolate_to:
                extrapolated.append(frechet.extrapolated_distance(feats, ref_stats, extrapolate_to))
            if probabilities is not None:
                scores.append(inception_score(probabilities(feats)))
        row = dict(steps=k, nfe=calls * registry.network_calls(sampler, k), sampler=sampler, ema="inference",
                   protocol=spec.name, seed_ranges=[[s.start, s.stop - 1] for s in ranges], samples_per_range=samples,
                   reference_sha256=ref["sha256"], fid=fids, fid_mean=float(np.mean(fids)),
                   fid_std=float(np.std(fids, ddof=STD_DDOF)) if len(fids) > 1 else None, fid_min=float(min(fids)),
                   fid_headline=spec.headline(fids),
                   inception_score=scores or None, is_mean=float(np.mean(scores)) if scores else None,
                   is_std=float(np.std(scores, ddof=STD_DDOF)) if len(scores) > 1 else None)
        if extrapolate_to:
            row.update(extrapolated_to=extrapolate_to, fid_extrapolated=extrapolated)
        if clip_scores:
            row.update(clip_score=clip_scores, clip_mean=float(np.mean(clip_scores)),
                       clip_std=float(np.std(clip_scores, ddof=STD_DDOF)) if len(clip_scores) > 1 else None)
        rows.append(row if w is None else dict(w=w, **row))
    weights_file = sources.inception_file(spec.name, inception)
    metrics = dict(run=str(run.path), method=run.info["method"], schedule_steps=run.info.get("schedule_steps"),
                   weights_sha256=sha256(run.weights), dataset=ref.get("dataset"),
                   sampler=registry.get(sampler).description, ema="inference",
                   protocol=dict(spec.record(), samples_per_range=samples, std_ddof=STD_DDOF,
                                 seed_ranges=[[s.start, s.stop - 1] for s in ranges]),
                   reference={k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in ref.items()},
                   inception=dict(path=str(weights_file), sha256=sha256(weights_file))
                   if weights_file.is_file() else None,
                   device=str(device), results=rows)
    if encoded:
        metrics["decoded"] = dict(decoder_sha256=run.data.decoder_digest, x_hat_clipped=run.bounded,
                                  latents=str(run.data.folder), image_shape=list(image))
    if prompt_set is not None:
        metrics["prompts"] = prompt_set.record(ranges[0])
    if scorer is not None:
        from tract_repro.evaluation.clip_score import CONVENTION

        metrics["clip"] = dict(convention=CONVENTION, model=scorer.record, per="seed range")
    if per_w:  # one file per guidance weight
        for w in ws:
            write_json(per_w[w], dict(metrics, results=[r for r in rows if r["w"] == w]), ensure_ascii=False)
    else:
        write_json(single, metrics, ensure_ascii=False)
    return metrics


def sanity_check(run_dir, reference, steps, expect, samples, out, protocol=None, batch_size=500, device="cpu",
                 inception=None, extractor_factory=None, resize=None):
    """(passed, one line): a run's FID from seeds 0..samples − 1 at each K in ``steps``, extrapolated to 50k samples,
    against ``expect`` (``K:LO-HI`` strings); the metrics and the verdict go to ``out`` (:mod:`.sanity`)."""
    ranges = sanity.parse_expectations(expect, steps)
    if samples < 2:
        raise ConfigError(f"--samples {samples}: the sanity check needs at least 2 samples (10000 is usual)")
    made_with = protocols.of_metadata(load_reference(reference)[1])
    missing = None if extractor_factory else sources.missing_inception(
        protocol or (made_with.name if made_with else protocols.DEFAULT), inception)
    if missing:
        raise ConfigError(missing)
    metrics = evaluate_fid(run_dir, steps, reference, (0,), samples, protocol, batch_size, device, inception=inception,
                           extractor_factory=extractor_factory, resize=resize, out=out,
                           extrapolate_to=sanity.EXTRAPOLATE_TO)
    passed, line, record = sanity.verdict(metrics, ranges, samples)
    write_json(out, dict(metrics, sanity=record), ensure_ascii=False)
    return passed, line


def inception_score(p, splits=IS_SPLITS):
    """IS = exp(E_x KL(p(y|x) ‖ p(y))) from class probabilities (N, C), averaged over ``splits`` equal parts of the
    samples, as Salimans et al. (2016) and StyleGAN's metric compute it (10 splits)."""
    p = np.asarray(p, dtype=np.float64)
    parts = np.array_split(p, min(splits, len(p)))
    values = []
    for part in parts:
        marginal = part.mean(0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-30, None)) - np.log(np.clip(marginal, 1e-30, None)))).sum(1)
        values.append(float(np.exp(kl.mean())))
    return float(np.mean(values))


# ------------------------------------------------------------------------------------------------ CLI

def _device(name):
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def run(args):
    """Do what the parsed command line asks, in this process; raise ConfigError in one line on bad input."""
    device = _device(args.device)
    if args.command == "sanity":
        passed, line = sanity_check(args.run, args.reference, args.steps, args.expect, args.samples, args.out,
                                    protocol=args.protocol, batch_size=args.batch, device=device, inception=args.inception)
        print(line)
        return 0 if passed else 1
    if args.command == "sample":
        from tract_repro.evaluation.dump import dump_samples

        arrays = dump_samples(args.run, args.steps, args.samples, args.out, args.first_seed, args.sampler, args.w,
                              args.png, args.batch, device, args.protocol, args.prompts)
        print(f"{args.out}: {len(arrays['arr_0'])} samples {tuple(arrays['arr_0'].shape[1:])} uint8 NHWC, "
              f"{args.steps} {args.sampler} steps, seeds {args.first_seed}..{args.first_seed + args.samples - 1}"
              + (f"; PNGs in {args.png}" if args.png else ""))
        return 0
    if args.command == "reference":
        if args.dataset == "latents":
            missing = sources.missing_inception(args.protocol, args.inception)
            if missing:
                raise ConfigError(missing)
            from tract_repro.data.latents import LatentArrays

            LatentArrays(args.root).source()  # the folder and its source, checked before the network is built
            features = ImageFeatures(inception_extractor(protocol=args.protocol, path=args.inception, device=device),
                                     args.protocol, device)
            path = latent_reference(args.out, args.root, features, args.batch)
        elif args.source == "file":
            path = file_reference(args.out, args.file, args.protocol, args.dataset)
        elif args.dataset == "cifar10" and args.source == "cleanfid":
            path = cifar10_reference(args.out, args.protocol)
        else:
            missing = sources.missing_inception(args.protocol, args.inception)
            if missing:
                raise ConfigError(missing)
            from tract_repro.data.cifar10 import cifar10
            from tract_repro.data.imagenet64 import imagenet64

            cached = Path(args.cache) / f"fid_ref_{_listing_key(args.dataset, args.root, args.protocol)}.npz" \
                if args.cache else None
            if cached is not None and cached.is_file():  # the same files and protocol: the same statistics
                path = write_atomic(args.out, lambda f: f.write(Path(cached).read_bytes()))
            else:
                loader = cifar10 if args.dataset == "cifar10" else imagenet64
                data = loader(root=args.root, split="train", hflip=False)
                features = ImageFeatures(inception_extractor(protocol=args.protocol, path=args.inception, device=device),
                                         args.protocol, device)  # built once for the whole training set
                path = dataset_reference(args.out, data.images, features, data.name, args.batch)
                if cached is not None:
                    write_atomic(cached, lambda f: f.write(Path(path).read_bytes()))
        _, meta = load_reference(path)
        images = f"{meta['images']} images" if meta["images"] >= 0 else "imported"
        print(f"{path}: {meta['dataset']} ({images}), FID protocol {meta['protocol']}, sha256 {meta['sha256'][:16]}…")
        return 0
    made_with = protocols.of_metadata(load_reference(args.reference)[1])  # evaluate
    missing = sources.missing_inception(args.protocol or (made_with.name if made_with else protocols.DEFAULT),
                                        args.inception)
    if missing:
        raise ConfigError(missing)
    metrics = evaluate_fid(args.run, args.steps, args.reference, args.seed_ranges, args.samples, args.protocol,
                           args.batch, device, args.sampler, args.inception, out=args.out, ws=args.w or (None,),
                           prompts=args.prompts, clip=args.clip)
    for row in metrics["results"]:
        guided = f"w {row['w']:g}  " if "w" in row else ""
        best = f", best {row['fid_min']:.3f}" if protocols.get(row["protocol"]).best_of_ranges else ""
        clip = f", CLIP score {row['clip_mean']:.2f}" if row.get("clip_mean") is not None else ""
        print(f"{args.run}: {row['steps']:>4} steps ({row['nfe']} NFE)  {guided}FID {row['fid_mean']:.3f} ± "
              f"{row['fid_std'] or 0:.3f}{best}{clip} over {len(row['fid'])} seed ranges of {row['samples_per_range']} "
              f"(protocol {row['protocol']})")
    return 0


def _listing_key(dataset, root, protocol):
    """A digest of a dataset folder's file names and sizes and the protocol: the identity of its statistics."""
    files = sorted((str(p.relative_to(root)), p.stat().st_size) for p in Path(root).rglob("*") if p.is_file())
    return hashlib.sha256(json.dumps([dataset, protocol, files]).encode()).hexdigest()[:16]


def _job(argv):
    """The body of a submitted job: the same command, inline."""
    return run(_parser().parse_args(argv))


def _submit(argv, kind, cluster, gin_bindings, folder):
    """Run this command as a job and wait for it (:func:`tract_repro.launching.commands.submit`)."""
    from tract_repro.evaluation.fid import _job as job_body  # by its module name, also when run as __main__
    from tract_repro.launching import commands

    return commands.submit(job_body, argv, kind, cluster, gin_bindings, folder, "tract-fid")


def _parser():
    parser = argparse.ArgumentParser(prog="python -m tract_repro.evaluation.fid", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("evaluate", "reference", "sample", "sanity"):
        p = sub.add_parser(name)
        if name == "sanity":  # a teacher's FID from 10k samples against expected ranges, before a long run
            p.add_argument("run", help="a finished (e.g. imported teacher) run directory")
            p.add_argument("--reference", required=True, help="reference statistics .npz (the `reference` command)")
            p.add_argument("--steps", type=int, nargs="+", default=[64, 1024], help="DDIM step counts")
            p.add_argument("--samples", type=int, default=10_000, help="samples, seeds 0..samples − 1")
            p.add_argument("--expect", nargs="+", required=True, metavar="K:LO-HI",
                           help="expected FID range per step count (extrapolated to 50k samples), e.g. 64:3.0-6.5")
            p.add_argument("--out", required=True, help="the check's metrics JSON")
            p.add_argument("--protocol", choices=list(protocols.PROTOCOLS), help="default: the reference statistics'")
        elif name == "sample":  # a dump for external evaluators (ADM's evaluator, EDM's fid.py, clean-fid)
            p.add_argument("run", help="a finished run directory")
            p.add_argument("--steps", type=int, required=True, help="sampler step count K")
            p.add_argument("--samples", type=int, required=True, help="number of samples, seeds first-seed, first-seed + 1, …")
            p.add_argument("--first-seed", type=int, default=0)
            p.add_argument("--out", required=True, help="FILE.npz: uint8 NHWC images (arr_0), labels (arr_1), seeds")
            p.add_argument("--png", metavar="DIR", help="also one PNG per sample in this new folder")
            p.add_argument("--sampler", choices=list(registry.SAMPLERS), default="ddim")
            p.add_argument("--w", type=float, help="guidance weight (s = 1 + w elsewhere)")
            p.add_argument("--protocol", choices=list(protocols.PROTOCOLS), default=protocols.DEFAULT,
                           help="whose 8-bit quantiser (tract: round(127.5·(x + 1)); edm: ⌊127.5·x + 128⌋)")
            p.add_argument("--prompts", metavar="FOLDER", help="text-to-image runs: an encoded caption set (seed s → "
                                                               "caption s mod N); the captions go into the .npz")
        elif name == "evaluate":
            p.add_argument("run", help="a finished run directory (ema.pt, config.gin, run.json)")
            p.add_argument("--steps", type=int, nargs="+", required=True, help="sampler step counts K")
            p.add_argument("--reference", required=True, help="reference statistics .npz (the `reference` command)")
            p.add_argument("--out", help="metrics JSON (default RUN/eval/fid.json)")
            p.add_argument("--sampler", choices=list(registry.SAMPLERS), default="ddim")
            p.add_argument("--w", type=float, nargs="+", metavar="W",
                           help="guidance weights (a guided teacher or a w-conditioned student); s = 1 + w elsewhere")
            p.add_argument("--samples", type=int, default=SAMPLES, help="samples per seed range")
            p.add_argument("--seed-ranges", type=int, nargs="+", default=list(FIRST_SEEDS), help="first seed of each range")
            p.add_argument("--protocol", choices=list(protocols.PROTOCOLS),
                           help="FID protocol: tract (the official TRACT code's), clean (clean-fid's) or edm (EDM's); "
                                "default: the reference statistics'")
            p.add_argument("--prompts", metavar="FOLDER",
                           help="text-to-image runs: an encoded caption set (COCO 2014 validation for FID-30K); seed s "
                                "→ caption s mod N")
            p.add_argument("--clip", metavar="DIR", help="a local CLIP folder: add the CLIP score (100·max(cos, 0)) of "
                                                         "the samples against their captions (needs --prompts)")
        else:
            p.add_argument("dataset", choices=["cifar10", "imagenet64", "latents"],
                           help="latents: the images an encoded folder (--root) was encoded from, e.g. COCO 2014 "
                                "validation for a text-to-image run's FID-30K")
            p.add_argument("--out", required=True, help="where to write the .npz")
            p.add_argument("--protocol", choices=list(protocols.PROTOCOLS), default=protocols.DEFAULT,
                           help="FID protocol whose network computes the statistics")
            p.add_argument("--root", help="dataset root (data/cifar10, data/imagenet64) for statistics from our loader")
            p.add_argument("--source", choices=["cleanfid", "loader", "file"], default="cleanfid",
                           help="cifar10: clean-fid's precomputed statistics (default) or our loader; any dataset: "
                                "published statistics from --file")
            p.add_argument("--file", help="with --source file: an .npz with mu and sigma (e.g. EDM's fid-refs)")
            p.add_argument("--cache", help="folder keeping loader statistics by dataset files and protocol, so that "
                                           "two references of the same data compute once")
        p.add_argument("--batch", type=int, default=500, help="images per network call")
        p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:N'")
        p.add_argument("--inception", help="Inception weights file or folder (default: where clean-fid keeps them)")
        p.add_argument("--executor", choices=["inline", "local", "slurm"], default="inline")
        p.add_argument("--cluster", metavar="FILE.gin", help="executor options (slurm.*), e.g. gin/paper/cluster.gin")
        p.add_argument("--gin", action="append", default=[], metavar="'name = value'", help="executor bindings")
    return parser


def job_folder(out):
    """Where the job computing ``out`` logs: under runs/jobs/, named after ``out`` (results/ keeps only results)."""
    from tract_repro.launching.commands import job_folder as folder_of

    return folder_of(out)


@command
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.command == "reference" and args.source == "file" and not args.file:
        raise ConfigError("reference --source file needs --file F.npz (statistics with mu and sigma)")
    if args.command == "reference" and args.dataset == "latents" and not args.root:
        raise ConfigError("reference latents needs --root, the encoded folder (e.g. data/coco2014_val_latents)")
    if args.command == "reference" and args.source != "file" and (args.dataset == "imagenet64" or args.source == "loader") \
            and not args.root:
        raise ConfigError(f"reference {args.dataset} from the loader needs --root (e.g. data/{args.dataset})")
    if args.executor == "inline":
        return run(args)
    _submit(argv, args.executor, args.cluster, args.gin, job_folder(args.out))
    return 0


if __name__ == "__main__":
    from tract_repro.launching.process import exit_now

    exit_now(main())
