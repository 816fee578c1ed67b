"""The paper-scale FID protocol (method-spec §8) on tiny generated data with a fake feature function:
3 disjoint seed ranges, FID per range and mean ± std, the feature network built once, reference
statistics that say where they come from, and one-line failures when offline."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_NET
from tract_repro import config, import_teacher
from tract_repro.evaluation import fid, inception, protocols, references, sources

ROOT = Path(__file__).resolve().parents[1]


class FakeExtractor:
    """A deterministic stand-in for Inception: [0, 255] images → 5 features; counts its constructions and calls."""

    built = 0

    def __init__(self, protocol="tract", path=None, device="cpu"):
        type(self).built += 1
        self.calls = 0
        self.projection = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)).double()

    def __call__(self, x):
        self.calls += 1
        flat = x.double().flatten(1) / 255
        return (flat[:, :64] @ self.projection.T + flat.mean(1, keepdim=True)).float()


@pytest.fixture
def fake():
    FakeExtractor.built = 0
    made = []

    def factory(**kwargs):
        made.append(FakeExtractor(**kwargs))
        return made[-1]

    factory.made = made
    return factory


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished run: a randomly initialised 8×8 one-channel x-prediction UNet, imported as a teacher."""
    from tract_repro.diffusion.schedules import CosineSchedule
    from tract_repro.networks.denoiser import build_denoiser
    from tract_repro.networks.unet import UNet

    tmp = tmp_path_factory.mktemp("fid")
    config.parse(text=TINY_NET)
    torch.manual_seed(1)
    denoiser = build_denoiser(UNet(), CosineSchedule(), "x")
    with torch.no_grad():
        for p in denoiser.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(denoiser.state_dict(), tmp / "w.pt")
    (tmp / "t.gin").write_text(TINY_NET + "\ntrain.dataset = @digits\ntrain.network = @UNet\ntrain.T = 64\n"
                               f"train.parameterisation = 'x'\nimport_teacher.weights = '{tmp / 'w.pt'}'\n")
    assert import_teacher.main([str(tmp / "t.gin"), "--workdir", str(tmp / "run")]) == 0
    return tmp / "run"


def reference(tmp_path, protocol="tract", n=96, shape=(1, 8, 8)):
    images = torch.randint(0, 256, (n, *shape), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    features = inception.ImageFeatures(FakeExtractor(), protocol, "cpu", resize=lambda a: a)
    return references.dataset_reference(tmp_path / f"ref_{protocol}.npz", images, features, "fake-train", batch_size=32)


def test_default_seed_ranges_are_three_disjoint_ranges_of_50k():
    ranges = fid.seed_ranges()
    assert [(r.start, r.stop - 1) for r in ranges] == [(0, 49_999), (50_000, 99_999), (100_000, 149_999)]
    with pytest.raises(ValueError, match="overlap"):
        fid.seed_ranges((0, 10), samples=20)


def test_feature_network_is_built_once_per_evaluation(tiny_run, tmp_path, fake):
    ref = reference(tmp_path)
    out = tmp_path / "eval" / "metrics.json"
    metrics = fid.evaluate_fid(tiny_run, steps=(1, 4), reference=ref, first_seeds=(0, 40, 80), samples=40,
                               batch_size=16, extractor_factory=fake, resize=lambda a: a, out=out)
    assert len(fake.made) == 1  # one construction for 2 step counts × 3 seed ranges × 3 batches
    assert fake.made[0].calls == 2 * 3 * 3
    assert json.loads(out.read_text()) == json.loads(json.dumps(metrics))
    assert (tmp_path / "eval" / "metrics_1steps.png").is_file()
    for row in metrics["results"]:
        assert len(row["fid"]) == 3 and all(f > 0 for f in row["fid"])
        assert row["fid_mean"] == pytest.approx(np.mean(row["fid"]))
        assert row["fid_std"] == pytest.approx(np.std(row["fid"], ddof=1))
        assert row["seed_ranges"] == [[0, 39], [40, 79], [80, 119]] and row["samples_per_range"] == 40
        assert row["protocol"] == "tract" and row["reference_sha256"] == fid.sha256(ref)
        assert row["sampler"] == "ddim" and row["ema"] == "inference" and row["nfe"] == row["steps"]
    assert metrics["reference"]["sha256"] == fid.sha256(ref) and metrics["reference"]["dataset"] == "fake-train"
    assert metrics["protocol"]["name"] == "tract" and metrics["weights_sha256"]
    assert len({tuple(r["fid"]) for r in metrics["results"]}) == 2


def test_a_seed_range_scores_the_same_wherever_it_is_evaluated(tiny_run, tmp_path, fake):
    """Samples depend on their seeds only: range 40..79 gives one FID alone or as the middle range."""
    ref = reference(tmp_path)
    together = fid.evaluate_fid(tiny_run, (2,), ref, (0, 40, 80), 40, batch_size=8, extractor_factory=fake,
                                resize=lambda a: a, out=tmp_path / "a.json")
    alone = fid.evaluate_fid(tiny_run, (2,), ref, (40,), 40, batch_size=8, extractor_factory=fake,
                             resize=lambda a: a, out=tmp_path / "b.json")
    assert alone["results"][0]["fid"] == [together["results"][0]["fid"][1]]
    assert alone["results"][0]["fid_std"] is None


def test_reference_statistics_say_what_they_come_from(tmp_path):
    path = reference(tmp_path, protocol="edm")
    (mu, sigma), meta = references.load_reference(path)
    assert mu.shape == (5,) and sigma.shape == (5, 5)
    assert meta["protocol"] == "edm" and meta["images"] == 96 and meta["dataset"] == "fake-train"
    assert meta["shape"] == [1, 8, 8] and meta["sha256"] == fid.sha256(path)


def test_protocol_and_shape_must_match_the_reference(tiny_run, tmp_path, fake):
    ref = reference(tmp_path)
    with pytest.raises(ValueError, match="protocol 'tract', not 'clean'.*--protocol clean"):
        fid.evaluate_fid(tiny_run, (1,), ref, (0,), 8, protocol="clean", extractor_factory=fake)
    other = reference(tmp_path, shape=(3, 8, 8))
    with pytest.raises(ValueError, match="use the reference of its dataset"):
        fid.evaluate_fid(tiny_run, (1,), other, (0,), 8, extractor_factory=fake)
    assert not fake.made  # refused before any network was built


def test_cifar10_reference_is_cleanfids_precomputed_file_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "cleanfid_stats_folder", lambda: tmp_path / "stats")
    with pytest.raises(references.MissingStatistics) as info:
        references.cifar10_reference(tmp_path / "ref.npz", protocol="clean")
    message = str(info.value)
    assert "\n" not in message and "cifar10_clean_train_32.npz" in message
    assert f"put it in {tmp_path / 'stats'}/" in message and "https://www.cs.cmu.edu/~clean-fid/stats/" in message
    (tmp_path / "stats").mkdir()
    np.savez(tmp_path / "stats" / "cifar10_clean_train_32.npz", mu=np.zeros(3), sigma=np.eye(3))
    path = references.cifar10_reference(tmp_path / "ref.npz", protocol="clean")
    (mu, sigma), meta = references.load_reference(path)
    assert np.array_equal(sigma, np.eye(3)) and meta["protocol"] == "clean" and meta["dataset"] == "cifar10-train"
    assert meta["source"] == "clean-fid precomputed cifar10_clean_train_32.npz" and meta["shape"] == [3, 32, 32]
    assert meta["source_sha256"] == fid.sha256(tmp_path / "stats" / "cifar10_clean_train_32.npz")


def test_the_real_cleanfid_stats_folder_is_inside_the_installed_package():
    import cleanfid

    assert sources.cleanfid_stats_folder() == Path(cleanfid.__file__).parent / "stats"


@pytest.mark.parametrize("protocol,weights", [("tract", "pt_inception-2015-12-05-6726825d.pth"),
                                              ("clean", "inception-2015-12-05.pt"), ("edm", "inception-2015-12-05.pt")])
def test_offline_inception_stops_in_one_line_naming_file_and_folder(tiny_run, tmp_path, protocol, weights):
    ref = reference(tmp_path, protocol)  # the evaluation takes its protocol from the reference statistics
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tract_repro.evaluation.fid", "evaluate", str(tiny_run), "--steps", "1",
                           "--reference", str(ref), "--inception", str(tmp_path / "nowhere"), "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert time.perf_counter() - start < 60
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"{weights} (FID protocol {protocol})" in lines[0] and f"{tmp_path / 'nowhere'}/" in lines[0]
    assert f"fetch https://" in lines[0] and lines[0].endswith(f"/{weights} and put it there")


@pytest.mark.filterwarnings("ignore::UserWarning")  # published-npz labels (irrelevant to FID statistics)
@pytest.mark.filterwarnings("ignore::FutureWarning")  # clean-fid's Inception is TorchScript
def test_imagenet64_reference_from_our_loader_through_the_cli(tmp_path):
    """`reference imagenet64` reads the training set with our loader, runs a TorchScript stand-in for clean-fid's
    Inception (same interface, local file), writes the statistics, and reuses them from the cache."""
    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Identity()

        def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            return x.flatten(1)[:, :2048] / 255

    torch.jit.script(Stub()).save(str(tmp_path / "inception-2015-12-05.pt"))
    root = tmp_path / "imagenet64"
    root.mkdir()
    g = np.random.default_rng(0)
    np.savez(root / "train_data_batch_1.npz", data=g.integers(0, 256, (20, 12288), dtype=np.uint8),
             labels=g.integers(1, 1001, 20))
    args = ["reference", "imagenet64", "--root", str(root), "--protocol", "edm", "--inception",
            str(tmp_path), "--device", "cpu", "--batch", "8", "--cache", str(tmp_path / "cache")]
    assert fid.main(args + ["--out", str(tmp_path / "a.npz")]) == 0
    (mu, sigma), meta = references.load_reference(tmp_path / "a.npz")
    assert mu.shape == (2048,) and meta["images"] == 20 and meta["shape"] == [3, 64, 64]
    assert meta["dataset"] == "imagenet64-npz-train" and meta["protocol"] == "edm"
    assert meta["source"] == "computed from the training-set loader"
    assert fid.main(args + ["--out", str(tmp_path / "b.npz")]) == 0
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert fid.main(["reference", "imagenet64", "--out", str(tmp_path / "c.npz")]) == 2  # --root is required
    # the same command as a submitit job (the local executor of tract_repro.launch), without the cache
    job = [a for a in args if a not in ("--cache", str(tmp_path / "cache"))]
    done = subprocess.run([sys.executable, "-m", "tract_repro.evaluation.fid", *job, "--out", str(tmp_path / "jobs" / "d.npz"),
                           "--executor", "local", "--gin", "local_executor.gpus_per_node = 0"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (mu_d, sigma_d), meta_d = references.load_reference(tmp_path / "jobs" / "d.npz")
    assert np.array_equal(mu_d, mu) and np.array_equal(sigma_d, sigma) and meta_d["images"] == 20
    folder = ROOT / fid.job_folder(tmp_path / "jobs" / "d.npz")
    assert folder.is_dir() and folder.parent == ROOT / "runs" / "jobs"
    shutil.rmtree(folder)


def test_slurm_evaluations_are_one_task_on_one_gpu_with_the_clusters_options(tmp_path, monkeypatch):
    """--executor slurm keeps the cluster file's partition and time limit but asks for 1 node, 1 task, ≤ 1 GPU,
    and the job runs the same command inline."""
    from tract_repro.launching import slurm

    seen = {}
    monkeypatch.setattr(slurm, "check_available", lambda: None)
    monkeypatch.setattr(slurm, "submit_run", lambda run, folder, options, default_name: seen.update(
        run=run, folder=folder, options=options) or type("Job", (), {"job_id": "42"})())
    monkeypatch.setattr(slurm, "wait", lambda job: "done")
    cluster = tmp_path / "cluster.gin"
    cluster.write_text("slurm.partition = 'gpu'\nslurm.tasks_per_node = 8\nslurm.gpus_per_node = 8\nslurm.time_min = 90\n")
    argv = ["evaluate", "runs/x", "--steps", "1", "--reference", "ref.npz", "--out", str(tmp_path / "e" / "m.json"),
            "--executor", "slurm", "--cluster", str(cluster), "--gin", "slurm.qos = 'high'"]
    assert fid.main(argv) == 0
    options = seen["options"]
    assert (options.partition, options.time_min, options.qos) == ("gpu", 90, "high")
    assert (options.nodes, options.tasks_per_node, options.gpus_per_node) == (1, 1, 1)
    assert seen["run"].args == (["evaluate", "runs/x", "--steps", "1", "--reference", "ref.npz", "--out",
                                 str(tmp_path / "e" / "m.json"), "--executor", "inline"],)
    assert seen["folder"] == fid.job_folder(tmp_path / "e" / "m.json") and seen["folder"].parts[:2] == ("runs", "jobs")


def test_the_inception_score_equals_its_definition_and_its_bounds():
    """IS = exp(E KL(p(y|x) ‖ p(y))) per split, averaged: 1 for identical predictions, C for confident, uniform ones."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7) * 0.3, size=40)
    by_hand = np.mean([np.exp(np.mean([np.sum(q * np.log(q / part.mean(0))) for q in part]))
                       for part in np.array_split(p, 10)])
    assert fid.inception_score(p) == pytest.approx(by_hand, rel=1e-12)
    assert fid.inception_score(np.tile(p[:1], (40, 1))) == pytest.approx(1.0)
    assert fid.inception_score(np.eye(5)[np.arange(50) % 5], splits=1) == pytest.approx(5.0)


def test_the_inception_score_comes_from_the_class_head_on_the_fid_features(tmp_path, fake, tiny_run):
    """An extractor with a class head gives each row an IS per seed range; the head sees the FID features."""
    from tract_repro.evaluation.inception import class_probabilities

    weight = np.random.default_rng(1).normal(size=(11, 5))
    seen = []

    def factory(**kwargs):
        extractor = fake(**kwargs)
        head = class_probabilities(weight)
        extractor.probabilities = lambda f: seen.append(np.array(f)) or head(f)
        return extractor

    ref = reference(tmp_path)
    metrics = fid.evaluate_fid(tiny_run, (1,), ref, (0, 16), 16, batch_size=8, extractor_factory=factory,
                               resize=lambda a: a, out=tmp_path / "is.json")
    row = metrics["results"][0]
    assert len(row["inception_score"]) == 2 and row["is_mean"] == pytest.approx(np.mean(row["inception_score"]))
    logits = seen[0] @ weight.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    assert row["inception_score"][0] == pytest.approx(fid.inception_score(p / p.sum(1, keepdims=True)), rel=1e-12)
    plain = fid.evaluate_fid(tiny_run, (1,), ref, (0,), 16, batch_size=8, extractor_factory=fake,
                             resize=lambda a: a, out=tmp_path / "no_is.json")
    assert plain["results"][0]["inception_score"] is None  # no class head (pytorch-fid's weights): no IS


def test_fid_at_guidance_weights_of_a_guided_teacher(tmp_path, fake):
    """--w: a guided teacher's rows per (w, K), NFE two per step; an unguided run is refused before any work."""
    from tests.test_guidance import GUIDED_TEACHER
    from tract_repro import launch

    (tmp_path / "t.gin").write_text(GUIDED_TEACHER)
    assert launch.main([str(tmp_path / "t.gin"), "--workdir", str(tmp_path / "teacher")]) == 0
    ref = reference(tmp_path)
    metrics = fid.evaluate_fid(tmp_path / "teacher", (1, 2), ref, (0, 16), 16, batch_size=16, extractor_factory=fake,
                               resize=lambda a: a, out=tmp_path / "g.json", ws=(0.0, 2.0))
    assert [(r["w"], r["steps"], r["nfe"]) for r in metrics["results"]] == [(0, 1, 2), (0, 2, 4), (2, 1, 2), (2, 2, 4)]
    assert metrics["results"][0]["fid"] != metrics["results"][2]["fid"]  # guidance changes the samples
    assert (tmp_path / "g_2steps_w2.png").is_file()
    from tract_repro.evaluation.generate import labels_from_seeds
    assert fid.main(["sample", str(tmp_path / "teacher"), "--steps", "2", "--samples", "4", "--w", "1",
                     "--out", str(tmp_path / "guided.npz"), "--device", "cpu"]) == 0
    dump = np.load(tmp_path / "guided.npz")  # class-conditional: the labels asked for, as ADM's arr_1
    assert np.array_equal(dump["arr_1"], labels_from_seeds(range(4), 10).numpy()) and dump["arr_0"].shape[0] == 4
    made = len(fake.made)
    plain = GUIDED_TEACHER.replace("TeacherTraining.p_uncond = 0.2", "")
    (tmp_path / "p.gin").write_text(plain)
    assert launch.main([str(tmp_path / "p.gin"), "--workdir", str(tmp_path / "plain")]) == 0
    with pytest.raises(ValueError, match="takes no guidance weight"):
        fid.evaluate_fid(tmp_path / "plain", (1,), ref, (0,), 8, extractor_factory=fake, ws=(1.0,))
    assert len(fake.made) == made


def test_a_sample_dump_holds_the_evaluations_samples_for_external_evaluators(tmp_path, tiny_run, capsys):
    """`fid sample RUN --steps K --samples N --out FILE.npz --png DIR`: uint8 NHWC images (arr_0) exactly as the FID
    protocol quantises the samples of seeds first..first + N − 1, their seeds, one PNG per sample; an existing file
    or a non-empty folder is refused in one line and left as it was."""
    from PIL import Image

    from tract_repro.evaluation.generate import generate
    from tract_repro.evaluation.runs import load_run

    out, png = tmp_path / "s.npz", tmp_path / "png"
    assert fid.main(["sample", str(tiny_run), "--steps", "2", "--samples", "5", "--first-seed", "3", "--out", str(out),
                     "--png", str(png), "--device", "cpu"]) == 0
    dump = np.load(out)
    run = load_run(tiny_run, with_data=False)
    x = generate(run.denoiser, run.grid, 2, range(3, 8), (1, 8, 8))
    expected = protocols.get("tract").quantise(x).permute(0, 2, 3, 1).numpy()
    assert dump["arr_0"].dtype == np.uint8 and dump["arr_0"].shape == (5, 8, 8, 1)
    assert np.array_equal(dump["arr_0"], expected) and list(dump["seeds"]) == [3, 4, 5, 6, 7]
    assert sorted(p.name for p in png.iterdir()) == [f"{s:06d}.png" for s in range(3, 8)]
    assert np.array_equal(np.asarray(Image.open(png / "000004.png")), expected[1, :, :, 0])
    before = out.read_bytes()
    assert fid.main(["sample", str(tiny_run), "--steps", "2", "--samples", "5", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before
    assert fid.main(["sample", str(tiny_run), "--steps", "2", "--samples", "5", "--out", str(tmp_path / "t.npz"),
                     "--png", str(png)]) == 2
    assert fid.main(["sample", str(tiny_run), "--steps", "2", "--samples", "5", "--out", str(tmp_path / "t.zip")]) == 2
    assert not (tmp_path / "t.npz").exists() and not (tmp_path / "t.zip").exists()
    assert fid.main(["sample", str(tiny_run), "--steps", "2", "--samples", "5", "--first-seed", "3", "--out",
                     str(tmp_path / "edm.npz"), "--protocol", "edm", "--device", "cpu"]) == 0  # EDM's quantiser
    edm = (x.double().numpy() * 127.5 + 128).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.array_equal(np.load(tmp_path / "edm.npz")["arr_0"], edm)


def test_fid_extrapolated_to_n_samples_is_the_official_codes_estimate():
    """FD_n = FD_k + (FD_{k/2} − FD_k)·(k/n − 1), FD_{k/2} the median over 5 random halves; exact at n = k; from
    samples of the reference distribution itself it lands nearer the true 0 than the k-sample FD does."""
    from tract_repro.evaluation import frechet

    g = np.random.default_rng(1)
    feats = g.normal(size=(400, 6))
    ref = (np.zeros(6), np.eye(6))
    full = frechet.frechet_distance(frechet.statistics(feats), ref)
    assert frechet.extrapolated_distance(feats, ref, n=400) == pytest.approx(full, abs=1e-12)
    rng = np.random.default_rng(0)
    halves = [frechet.frechet_distance(frechet.statistics(feats[rng.permutation(400)[:200]]), ref) for _ in range(5)]
    expected = full + (sorted(halves)[2] - full) * (400 / 50_000 - 1)
    assert frechet.extrapolated_distance(feats, ref) == pytest.approx(expected, abs=1e-12)
    assert abs(frechet.extrapolated_distance(feats, ref)) < full


def test_the_sanity_check_says_pass_or_fail_in_one_line(tiny_run, tmp_path, fake, capsys):
    """`fid sanity RUN --steps K… --expect K:LO-HI…`: FID of seeds 0..N − 1 extrapolated to 50k, each against its
    range, PASS or FAIL in one line with every number; malformed or missing ranges are refused before any work."""
    from tract_repro.evaluation.fid import sanity_check

    ref = reference(tmp_path)
    kwargs = dict(batch_size=16, extractor_factory=fake, resize=lambda a: a)
    passed, line = sanity_check(tiny_run, ref, [2, 4], ["2:0-1000", "4:0-1000"], 32, tmp_path / "ok.json", **kwargs)
    saved = json.loads((tmp_path / "ok.json").read_text())
    checks = saved["sanity"]["checks"]
    assert passed and line.startswith("sanity PASS: ") and "\n" not in line and saved["sanity"]["passed"]
    assert [c["steps"] for c in checks] == [2, 4] and all(f"{c['fid_extrapolated']:.2f}" in line for c in checks)
    assert saved["results"][0]["seed_ranges"] == [[0, 31]] and saved["results"][0]["extrapolated_to"] == 50_000
    value = checks[0]["fid_extrapolated"]
    passed, line = sanity_check(tiny_run, ref, [2], [f"2:{value + 1:.3f}-{value + 2:.3f}"], 32, tmp_path / "bad.json",
                                **kwargs)
    assert not passed and line.startswith("sanity FAIL") and "∉" in line and "Inception" in line
    assert not json.loads((tmp_path / "bad.json").read_text())["sanity"]["passed"]
    for expect in (["2:5-1"], ["two:1-5"], ["4:1-5"]):  # LO ≥ HI, not K:LO-HI, no range for K = 2
        argv = ["sanity", str(tiny_run), "--reference", str(ref), "--steps", "2", "--samples", "8", "--expect", *expect,
                "--out", str(tmp_path / "x.json"), "--device", "cpu"]
        assert fid.main(argv) == 2 and not (tmp_path / "x.json").exists()
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    argv = ["sanity", str(tiny_run), "--reference", str(ref), "--steps", "2", "--expect", "2:1-5", "--inception",
            str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.json"), "--device", "cpu"]
    assert fid.main(argv) == 2 and "pt_inception-2015-12-05-6726825d.pth" in capsys.readouterr().err
