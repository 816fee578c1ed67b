"""A finished run's metrics at digits scale: K-step samples → digits-FD, teacher fidelity, a PNG grid.

:func:`evaluate_run` writes ``<run>/eval/metrics.json`` (a DVC metrics file) and
``<run>/eval/samples_<K>steps.png``, or ``OUT`` and ``OUT``'s stem + ``_<K>steps.png``.  Runs
evaluated in one process (a row's seeds) share the classifier, the real-set statistics and the
teacher reference.  The command is ``python -m tract_repro.evaluate``.

Guided rows (``--w``) also get, in the same classifier feature space as digits-FD, precision and recall
(:mod:`.precision_recall`, k = 3) and, for class-conditional runs, the class-conditional FD
(:func:`.frechet.class_conditional_distance`); their fidelity is to the model they distil, at the same w
(:func:`fidelity_reference`).

A run on an encoded data set (latent digits) is evaluated on its decoded samples: it samples with x̂ unclipped (its
run.json's ``bounded``), each batch of latents goes through the data set's ``decode`` before it is clipped, the real set is the data set's ``pixels()`` (the images it encoded),
the classifier reads both area-averaged to 8×8 (:func:`.classifier.at_classifier_resolution`), fidelity is the RMSE
of decoded images, and the metrics add the autoencoder's reconstruction floor (:func:`reconstruction_floor`) beside
the noise floor.
"""
import hashlib
import warnings
from pathlib import Path

import torch

from tract_repro.common.errors import ConfigError, GuidanceRangeWarning
from tract_repro.common.files import sha256, write_json
from tract_repro.evaluation import frechet, precision_recall
from tract_repro.evaluation.classifier import at_classifier_resolution, load_classifier, split
from tract_repro.evaluation.generate import generate, labels_from_seeds, rmse, teacher_reference
from tract_repro.evaluation.runs import load_run, per_weight_outputs
from tract_repro.networks.guidance import GuidedDenoiser, takes_input
from tract_repro.sampling import registry
from tract_repro.sampling.images import save_grid


def digits_fd_reference(classifier, data, seed=0):
    """Real-set statistics, and the noise floor: FD between two seeded halves of the real set."""
    real_stats, floor, feature_fn, _ = real_set(classifier, data, seed)
    return real_stats, floor, feature_fn


def real_set(classifier, data, seed=0):
    """(statistics, noise floor, feature function, features) of the real set in the classifier's feature space;
    the noise floor is the FD between two seeded halves of it."""
    feature_fn = frechet.classifier_feature_fn(classifier)
    real = frechet.custom_features(at_classifier_resolution(data.images), feature_fn)
    a, b = split(len(real), seed, 0.5)
    floor = frechet.frechet_distance(frechet.statistics(real[a.numpy()]), frechet.statistics(real[b.numpy()]))
    return frechet.statistics(real), floor, feature_fn, real


def reconstruction_floor(classifier, images, reconstructions, seed=0):
    """An autoencoder's floor under digits-FD, by the noise floor's protocol: the real set split into the same seeded
    halves A and B, FD(reconstructions of A, real B), where the noise floor is FD(real A, real B) (a perfect
    autoencoder scores the noise floor).  Reconstructions are clipped to [−1, 1] as samples are; both sets go through
    :func:`.classifier.at_classifier_resolution`.  Returns {digits_fd_reconstruction_floor, digits_fd_noise_floor,
    digits_fd_reconstructions_all (FD of all reconstructions against all real images, 0 when perfect), halves, seed}."""
    feature_fn = frechet.classifier_feature_fn(classifier)
    real = frechet.custom_features(at_classifier_resolution(images), feature_fn)
    made = frechet.custom_features(at_classifier_resolution(reconstructions.clamp(-1, 1)), feature_fn)
    a, b = (i.numpy() for i in split(len(real), seed, 0.5))
    half_b = frechet.statistics(real[b])
    return dict(digits_fd_reconstruction_floor=frechet.frechet_distance(frechet.statistics(made[a]), half_b),
                digits_fd_noise_floor=frechet.frechet_distance(frechet.statistics(real[a]), half_b),
                digits_fd_reconstructions_all=frechet.frechet_distance(frechet.statistics(made), frechet.statistics(real)),
                halves=[len(a), len(b)], seed=seed)


def decoding(run):
    """(decode, decoder digest) of a run whose data set is encoded (latents), else (None, None)."""
    data = run.data
    if data is None or not getattr(data, "encoded", False):
        return None, None
    return data.decode, data.decoder_digest


def real_images(data):
    """The images a run's samples are compared with: an encoded data set's ``pixels()``, else the data set."""
    return data.pixels() if getattr(data, "encoded", False) else data


def precision_recall_real(real, n, seed=0):
    """The real features precision and recall compare ``n`` samples with: a seeded subset of ``n`` of them (all of
    them when there are fewer), so that both k-NN manifolds are built from sets of one size, as Kynkäänniemi et
    al. do (a k-NN radius shrinks as its set grows)."""
    if n >= len(real):
        return real
    keep = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))[:n]
    return real[keep.sort().values.numpy()]


def fidelity_reference(run, w=None):
    """(reference run, role): whose ``reference_steps``-step DDIM samples from the same seeds, at the same w, a
    run's fidelity RMSE is measured against.  ``w``: a guidance weight the run is evaluated at (None: unguided).

    - a teacher (no teacher in its run.json) → itself (role ``self``);
    - a student evaluated without w → the root teacher its run.json records (``teacher``, the teacher of its
      first phase; role ``teacher``);
    - a guided stage-2 student (BTD, TRACT, the stochastic sampler's students) → the stage-1 run it distils,
      its root teacher, sampled with w as its input (role ``stage 1``);
    - the stage-1 student → the guided teacher it distils, sampled through x̂^w = (1 + w)·x̂_c − w·x̂_∅ (role
      ``guided teacher``).
    """
    if not run.info.get("teacher"):
        return run, "self"
    teacher_dir = Path(run.info["teacher"]).parent
    if teacher_dir == run.path:
        return run, "self"
    teacher = load_run(teacher_dir)
    if w is None or not takes_input(run.denoiser, "w"):
        return teacher, "teacher"
    if takes_input(teacher.denoiser, "w"):  # a stage-2 student: the stage-1 model it distils
        return teacher, "stage 1" if teacher.info.get("method") == "GuidedDistillation" else "w-conditioned teacher"
    if teacher.info.get("p_uncond"):  # stage 1: the guided teacher it distils
        return teacher, "guided teacher"
    raise ConfigError(f"{run.path} takes a guidance weight but its teacher {teacher_dir} is neither a w-conditioned "
                      f"run nor a guided teacher (trained with label dropout): its fidelity has no reference at w")


def reference_steps_on(T, wanted):
    """The teacher's reference step count on its own grid: the largest divisor of T not above ``wanted``
    (64 on a VP grid of 1024; all 40 steps of an EDM grid of T = 40)."""
    return max(k for k in range(1, min(int(wanted), T) + 1) if T % k == 0)


def evaluate_run(run_dir, steps=(1,), samples=1797, first_seed=0, classifier="runs/digits_classifier",
                 reference_steps=64, cache="runs/cache", batch_size=500, out=None, threads=1, sampler="ddim",
                 shared=None, workers=1, ws=(None,)):
    """Metrics for each guidance weight w in ``ws`` and each K in ``steps``; returns the dict written to metrics.json.

    ``workers`` > 1: samples are drawn by that many forked one-thread processes (``threads`` is then 1).
    ``ws``: None (no guidance), or guidance weights for a guided teacher (x̂^w, two network calls a step)
    or a w-conditioned student (w as its input); class-conditional runs also get class accuracy and a
    digits Inception Score from the classifier.

    ``out``: the metrics file; with ``{w}`` in it, one file per guidance weight (``{w}`` replaced by w).

    ``shared``: a dict kept between calls, so that runs evaluated in one process share the classifier's
    real-set statistics and the teacher reference.
    """
    shared = {} if shared is None else shared
    torch.set_num_threads(1 if workers > 1 else threads)
    if samples < 1 or any(k < 1 for k in steps):
        raise ConfigError(f"evaluation needs at least one sample and one step, got {samples} samples, steps {list(steps)}")
    per_w = per_weight_outputs(out, ws)
    run = load_run(run_dir)
    teacher, role = fidelity_reference(run, next((w for w in ws if w is not None), None))
    seeds = range(first_seed, first_seed + samples)
    shape, classes = run.data.shape, run.data.num_classes if run.denoiser.conditional else 1
    for k in steps:  # every step count and guidance weight is checked before anything is computed or cached
        registry.get(sampler).logsnrs(run.grid, k)
    for w in ws:
        conditioned(run, w), conditioned(teacher, w)
    pixels, (decode, decoder) = real_images(run.data), decoding(run)
    key = ("real", str(classifier), data_digest(pixels))
    if key not in shared:
        model = load_classifier(classifier)
        shared[key] = (*real_set(model, pixels), model)
    real_stats, floor, feature_fn, real_features, model = shared[key]
    recon = None
    if decode is not None:  # the autoencoder's floor: decoded latents of the real set against the real set
        key = ("reconstruction", str(classifier), data_digest(pixels), decoder, str(getattr(run.data, "folder", "")))
        if key not in shared:
            z = run.data.batch(torch.arange(len(run.data)))[0]
            shared[key] = reconstruction_floor(model, pixels.images, decode(z))
        recon = shared[key]
    reference_steps = reference_steps_on(teacher.grid.T, reference_steps)
    labels = labels_from_seeds(seeds, classes) if classes > 1 else None
    guided = any(w is not None for w in ws)
    pr_real = precision_recall_real(real_features, samples) if guided else None
    class_fd = None  # the counts behind the class-conditional FD, the same at every w and K
    teacher_sha = sha256(teacher.weights)
    rows = {}
    for w in ws:
        out_w = per_w[w] if per_w else None if out is None else Path(out)
        out_dir = out_w.parent if out_w else run.path / "eval"
        denoiser, extra, calls = conditioned(run, w)
        key = ("reference", teacher_sha, role, reference_steps, first_seed, samples, w)
        if key not in shared:
            ref_denoiser, ref_extra, _ = conditioned(teacher, w)
            ref_decode, ref_decoder = decoding(teacher)
            shared[key] = teacher_reference(ref_denoiser, teacher.weights, teacher.grid, reference_steps, seeds, shape,
                                            cache, classes, batch_size, workers, extra=ref_extra, decode=ref_decode,
                                            decoder=ref_decoder, clip=teacher.bounded)
        reference = shared[key]
        for k in steps:
            own_reference = teacher is run and k == reference_steps and sampler == "ddim"
            x = reference if own_reference else generate(denoiser, run.grid, k, seeds, shape, classes, batch_size,
                                                         desc=f"{run.path.name} {k} steps", sampler=sampler,
                                                         workers=workers, extra=extra, decode=decode,
                                                         clip=run.bounded)
            features = frechet.custom_features(at_classifier_resolution(x), feature_fn)
            fd = frechet.frechet_distance(frechet.statistics(features), real_stats)
            row = dict(steps=k, nfe=calls * registry.network_calls(sampler, k), digits_fd=fd, fidelity_rmse=rmse(x, reference))
            if w is not None:
                row = dict(w=w, **row, fidelity_to=dict(run=str(teacher.path), role=role, w=w, sampler="ddim",
                                                        steps=reference_steps, weights_sha256=teacher_sha),
                           **class_metrics(model, x, labels))
                row["precision"], row["recall"] = precision_recall.precision_recall(pr_real, features)
                if labels is not None:
                    class_fd = frechet.class_conditional_distance(features, labels.numpy(), real_features,
                                                                  pixels.labels.numpy())
                    row["class_fd"], row["class_fd_per_class"] = class_fd["mean"], class_fd["per_class"]
            rows.setdefault(w, []).append(row)
            suffix = f"{k}steps" if w is None else f"{k}steps_w{w:g}"
            name = (lambda tail: out_dir / (f"{out_w.stem}_{suffix}{tail}.png" if out_w else f"samples_{suffix}{tail}.png"))
            scale = max(1, 32 // x.shape[-1])  # 8×8 digits ×4, 32×32 decoded digits ×1
            save_grid(x[:100], name(""), scale=scale)
            if w is not None and labels is not None:
                images, columns = by_class(x, labels, classes)
                save_grid(images, name("_classes"), ncol=columns, scale=scale)
    metrics = dict(run=str(run.path), method=run.info["method"], schedule_steps=run.info["schedule_steps"],
                   weights_sha256=sha256(run.weights), sampler=registry.get(sampler).description, ema="inference",
                   seeds=[first_seed, first_seed + samples - 1], samples=samples,
                   reference=dict(run=str(teacher.path), sampler="ddim", steps=reference_steps, role=role,
                                  weights_sha256=teacher_sha),
                   digits_fd_noise_floor=floor)
    if recon is not None:  # a latent run: its autoencoder's floor beside the noise floor
        metrics["digits_fd_reconstruction_floor"] = recon["digits_fd_reconstruction_floor"]
        metrics["decoded"] = dict(decoder_sha256=decoder, x_hat_clipped=run.bounded,
                                  classifier_input="decoded images area-averaged to 8x8",
                                  digits_fd_reconstructions_all=recon["digits_fd_reconstructions_all"])
    if guided:  # how the guided rows' extra metrics were computed
        metrics["precision_recall"] = dict(k=precision_recall.K, feature_space="digits classifier (as digits-FD)",
                                           real_samples=len(pr_real), generated_samples=samples)
        if class_fd is not None:
            metrics["class_fd"] = dict(feature_space="digits classifier (as digits-FD)",
                                       generated_per_class=class_fd["generated_per_class"],
                                       real_per_class=class_fd["real_per_class"])
    metrics["results"] = [r for w in ws for r in rows[w]]
    if per_w:  # one file per guidance weight
        for w in ws:
            write_json(per_w[w], dict(metrics, results=rows[w]))
    else:
        write_json(Path(out) if out else run.path / "eval" / "metrics.json", metrics)
    return metrics


def conditioned(run, w):
    """(denoiser, extra inputs, network calls per step) that sample ``run`` at guidance weight ``w`` (None: as it is).

    A guided teacher (trained with label dropout) is wrapped in the guided denoiser, two predictions a step;
    a w-conditioned student gets w as its input, with one :class:`GuidanceRangeWarning` if its run.json's
    ``w_range`` does not hold w (a run without ``w_range``, such as a guided teacher, takes any w).
    """
    if w is None:
        if takes_input(run.denoiser, "w"):
            raise ConfigError(f"{run.path} takes a guidance weight w as an input: evaluate it with --w, e.g. --w 0 1 4")
        return run.denoiser, None, 1
    if takes_input(run.denoiser, "w"):
        low, high = run.info.get("w_range") or (w, w)
        if not low <= w <= high:
            warnings.warn(GuidanceRangeWarning(f"{run.path} was trained on w in [{low:g}, {high:g}]: it never saw "
                                               f"w = {w:g}, the student was not trained there"))
        return run.denoiser, {"w": float(w)}, 1
    if run.info.get("p_uncond"):
        return GuidedDenoiser(run.denoiser), {"w": float(w)}, 2
    raise ConfigError(f"{run.path} takes no guidance weight (no w input, and not trained with label dropout): "
                      f"evaluate it without --w")


def class_metrics(classifier, x, labels):
    """Class accuracy (the classifier's class is the one asked for) and the digits Inception Score
    exp(E_x KL(p(y|x) ‖ p(y))) of class-conditional samples, with ``digits_is_perfect``, the score of samples the
    classifier names as their asked-for class with certainty: exp(H(the asked-for labels' frequencies)), 10 for
    exactly uniform labels, 9.90 for the labels of seeds 0..499."""
    if labels is None:
        return {}
    x = at_classifier_resolution(x)
    with torch.no_grad():
        logits = torch.cat([classifier(x[i:i + 500].float()) for i in range(0, len(x), 500)]).double()
    p = torch.softmax(logits, 1)
    marginal = p.mean(0, keepdim=True)
    kl = (p * (torch.log(p.clamp_min(1e-30)) - torch.log(marginal.clamp_min(1e-30)))).sum(1)
    asked = torch.bincount(labels, minlength=logits.shape[1]).double() / len(labels)
    perfect = torch.exp(-(asked[asked > 0] * asked[asked > 0].log()).sum()).item()
    return dict(class_accuracy=(logits.argmax(1) == labels).double().mean().item(), digits_is=kl.mean().exp().item(),
                digits_is_perfect=perfect)


def by_class(x, labels, classes, per_class=10):
    """(images, columns): ``per_class`` samples of each class, one row per class (the first seeds that asked for
    it; a class with fewer samples is padded with blank cells)."""
    rows = []
    for c in range(classes):
        mine = x[labels == c][:per_class]
        rows += [mine, torch.ones((per_class - len(mine), *x.shape[1:]), dtype=x.dtype)]
    return torch.cat(rows), per_class


def data_digest(data):
    """Which real set a run was trained on: a digest of its images."""
    return hashlib.sha256(data.images.contiguous().numpy().tobytes()).hexdigest()
