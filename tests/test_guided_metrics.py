"""The guided table's extra metrics: improved precision and recall (k-NN manifolds, k = 3), the class-conditional
FD, and fidelity to the model each guided row distils (stage 1 for a stage-2 student, the guided teacher for
stage 1), as evaluation computes them and results/guided.md shows them."""
import json
import math

import numpy as np
import pytest
import torch
from scipy import linalg

from tests.conftest import tiny_gin
from tests.test_guidance import GUIDED_TEACHER, stage_1
from tract_repro import launch
from tract_repro.common.files import sha256
from tract_repro.evaluation import frechet
from tract_repro.evaluation.precision_recall import inside, knn_radii, precision_recall

# ------------------------------------------------------------------------------------ precision and recall


def clusters(centres, offsets):
    """Every centre plus every offset: one cluster of len(offsets) points per centre."""
    return np.concatenate([np.asarray(c, dtype=np.float64) + offsets for c in centres])


CUBE = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64)  # side 1


def test_the_kth_nearest_other_point_on_a_line():
    """Points 0, 1, 3, 7: nearest others at 1, 1, 2, 4; third nearest (the farthest of three others) 7, 6, 4, 7."""
    line = np.array([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(line, k=1).tolist() == [1, 1, 2, 4]
    assert knn_radii(line, k=3).tolist() == [7, 6, 4, 7]
    with pytest.raises(ValueError, match="at least 4 points"):
        knn_radii(line[:3], k=3)


def test_identical_sets_have_precision_and_recall_one():
    points = np.random.default_rng(0).normal(size=(200, 16))
    assert precision_recall(points, points.copy()) == (1.0, 1.0)


def test_far_apart_clusters_have_precision_and_recall_zero():
    real = clusters([(0, 0, 0), (10, 0, 0)], CUBE)
    generated = clusters([(1000, 0, 0), (0, 1000, 0)], CUBE)
    assert precision_recall(real, generated) == (0.0, 0.0)


def test_a_generated_set_covering_half_the_real_clusters():
    """Four unit cubes' corners, 100 apart.  In a cube a corner has 3 others at distance 1, so its 3rd-nearest
    radius is 1.  Generated: the corners of cubes 0 and 1 moved by 0.01 per axis (0.017 from their real corner).
    Every generated point is 0.017 from a real corner, inside its ball of radius 1: precision 1.  The 16 real
    corners of cubes 0 and 1 are inside the generated balls (radius 1 too), the 16 of cubes 2 and 3 are ≥ 98 from
    every generated point: recall 16/32 = 0.5."""
    centres = [(0, 0, 0), (100, 0, 0), (0, 100, 0), (0, 0, 100)]
    real = clusters(centres, CUBE)
    generated = clusters(centres[:2], CUBE + 0.01)
    assert knn_radii(real).tolist() == [1.0] * 32
    assert precision_recall(real, generated) == (1.0, 0.5)
    assert precision_recall(generated, real) == (0.5, 1.0)  # the roles swap


def loop_precision_recall(real, generated, k=3):
    """The definition, one point at a time."""
    def radius(points, i):
        return sorted(np.linalg.norm(points[i] - points[j]) for j in range(len(points)) if j != i)[k - 1]

    def share(points, centres):
        radii = [radius(centres, i) for i in range(len(centres))]
        return np.mean([any(np.linalg.norm(p - c) <= r for c, r in zip(centres, radii)) for p in points])

    return share(generated, real), share(real, generated)


@pytest.mark.parametrize("k, batch_size", [(3, 512), (3, 7), (1, 16), (5, 1)])
def test_batched_precision_and_recall_match_a_loop_over_points(k, batch_size):
    g = np.random.default_rng(k * 100 + batch_size)
    real, generated = g.normal(size=(120, 5)), g.normal(size=(90, 5)) * 1.3 + 0.4
    precision, recall = precision_recall(real, generated, k=k, batch_size=batch_size)
    want = loop_precision_recall(real, generated, k)
    assert (precision, recall) == pytest.approx(want, abs=0)
    assert 0 < precision < 1 and 0 < recall < 1  # the case is not trivial


def test_inside_uses_each_centres_own_radius():
    centres = np.array([[0.0, 0.0], [10.0, 0.0]])
    points = np.array([[0.0, 1.5], [10.0, 1.5], [5.0, 0.0]])
    assert inside(points, centres, [1.0, 2.0]).tolist() == [False, True, False]


def test_two_thousand_points_a_side_take_seconds_on_one_thread():
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = np.random.default_rng(1)
        start = time.perf_counter()
        precision, recall = precision_recall(g.normal(size=(2000, 64)), g.normal(size=(2000, 64)))
        assert time.perf_counter() - start < 10 and 0 < precision < 1 and 0 < recall < 1
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ class-conditional FD

def direct_fd(a, b):
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½), from numpy and scipy alone."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(sa @ sb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * root))


def test_class_conditional_fd_is_the_mean_of_per_class_distances():
    g = np.random.default_rng(3)
    real_labels, labels = np.arange(600) % 3, g.integers(0, 3, size=300)
    real = g.normal(size=(600, 4)) + real_labels[:, None] * 2.0
    generated = g.normal(size=(300, 4)) * 1.2 + labels[:, None] * 2.0 + 0.3
    got = frechet.class_conditional_distance(generated, labels, real, real_labels)
    per_class = [direct_fd(generated[labels == c], real[real_labels == c]) for c in range(3)]
    assert got["per_class"] == pytest.approx(per_class, rel=1e-6)
    assert got["mean"] == pytest.approx(np.mean(per_class), rel=1e-6)
    assert got["generated_per_class"] == np.bincount(labels).tolist() and got["real_per_class"] == [200, 200, 200]
    # not the unconditional FD: the classes' means are far apart, so mixing them costs nothing there
    assert got["mean"] != pytest.approx(direct_fd(generated, real), rel=0.1)
    # a class with fewer than two generated samples has no covariance: left out of the mean, and said so
    few = labels.copy()
    few[few == 2] = 1
    few[0] = 2
    partial = frechet.class_conditional_distance(generated, few, real, real_labels)
    assert partial["per_class"][2] is None and partial["generated_per_class"][2] == 1
    assert partial["mean"] == pytest.approx(np.mean(partial["per_class"][:2]), rel=1e-12)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # clean-fid's root of a singular product
@pytest.mark.parametrize("n", [10, 15, 400])
def test_the_symmetric_frechet_distance_equals_clean_fids(n):
    """frechet_distance_psd (the class FD's) against clean-fid's frechet_distance (digits-FD's), with n samples of
    16 features against 200: a singular covariance for n ≤ 16."""
    g = np.random.default_rng(n)
    mix = g.normal(size=(16, 16))
    generated, real = np.tanh(g.normal(size=(n, 16)) @ mix / 4), np.tanh(g.normal(size=(200, 16)) @ mix / 4 + 0.2)
    a, b = frechet.statistics(generated), frechet.statistics(real)
    assert frechet.frechet_distance_psd(a, b) == pytest.approx(frechet.frechet_distance(a, b), rel=1e-6)
    got = frechet.class_conditional_distance(generated, np.zeros(n), real, np.zeros(200))
    assert got["mean"] == frechet.frechet_distance_psd(a, b) and got["generated_per_class"] == [n]


# ------------------------------------------------------------------------------------ guided fidelity references

@pytest.fixture(scope="module")
def guided_runs(tmp_path_factory):
    """A tiny guided teacher, its stage-1 student (lr 0: the teacher's conditional model at every w) and a
    TRACT stage-2 student of that; a tiny classifier."""
    from tract_repro.evaluation.classifier import train_classifier

    root = tmp_path_factory.mktemp("guided")
    (root / "t.gin").write_text(GUIDED_TEACHER)
    assert launch.main([str(root / "t.gin"), "--workdir", str(root / "teacher")]) == 0
    (root / "s.gin").write_text(stage_1(root / "teacher"))
    assert launch.main([str(root / "s.gin"), "--workdir", str(root / "stage1")]) == 0
    (root / "d.gin").write_text(tiny_gin(
        f"train.method = @TRACT()\nTRACT.schedule = (64, 8, 2)\nTRACT.guidance = (0, 4)\ntrain.teacher = '{root / 'stage1'}'\n"
        "inference_ema_momentum.residual = 1e-3\nUNet.num_classes = 10\nUNet.null_class = True\n"
        "UNet.extra_conditions = ('w',)", total=128))
    assert launch.main([str(root / "d.gin"), "--workdir", str(root / "stage2")]) == 0
    train_classifier(root / "clf", epochs=2, min_accuracy=0.3)
    return root


def test_the_fidelity_reference_is_stage_1_for_a_student_and_the_teacher_for_stage_1(guided_runs):
    from tract_repro.evaluation.metrics import fidelity_reference
    from tract_repro.evaluation.runs import load_run

    root = guided_runs
    student, stage1, teacher = (load_run(root / name) for name in ("stage2", "stage1", "teacher"))
    for run, w, (want, role) in ((student, 1.0, ("stage1", "stage 1")), (stage1, 1.0, ("teacher", "guided teacher")),
                                 (teacher, 1.0, ("teacher", "self")), (teacher, None, ("teacher", "self"))):
        got, got_role = fidelity_reference(run, w)
        assert (got.path, got_role) == (root / want, role)


def test_guided_evaluation_measures_fidelity_to_the_distilled_model_at_each_w(guided_runs):
    """The student's RMSE is to stage 1's 8-step samples at the same w (recomputed here), stage 1's to the guided
    teacher's x̂^w samples (equal at w = 0, where x̂^0 is the conditional model stage 1 still is), each cached per
    (weights, steps, w, seeds); every guided row records what it is against, precision, recall and class FD."""
    from tract_repro.evaluation.generate import generate, rmse
    from tract_repro.evaluation.metrics import conditioned, evaluate_run
    from tract_repro.evaluation.runs import load_run

    root = guided_runs
    common = dict(samples=40, classifier=root / "clf", reference_steps=8, cache=root / "cache", shared={})
    student = evaluate_run(root / "stage2", steps=(2,), ws=(0.0, 1.0), out=root / "e" / "student_w{w}.json", **common)
    stage1 = evaluate_run(root / "stage1", steps=(8, 2), ws=(0.0, 1.0), out=root / "e" / "stage1.json", **common)

    assert student["reference"]["run"] == str(root / "stage1") and student["reference"]["role"] == "stage 1"
    assert stage1["reference"]["run"] == str(root / "teacher") and stage1["reference"]["role"] == "guided teacher"
    for metrics, reference in ((student, "stage1"), (stage1, "teacher")):
        weights = load_run(root / reference).weights
        for row in metrics["results"]:
            assert row["fidelity_to"] == dict(run=str(root / reference), role=metrics["reference"]["role"], w=row["w"],
                                              sampler="ddim", steps=8, weights_sha256=sha256(weights))
            assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
            assert row["class_fd"] > 0 and len(row["class_fd_per_class"]) == 10
    assert sum(student["class_fd"]["generated_per_class"]) == 40 and sum(student["class_fd"]["real_per_class"]) == 1797
    assert student["precision_recall"] == dict(k=3, feature_space="digits classifier (as digits-FD)", real_samples=40,
                                               generated_samples=40)
    # the student's number, recomputed: RMSE to stage 1's 8-step DDIM samples at the same w, from the same seeds
    def samples(run, w, steps):  # seeds 0..39, labels drawn per seed, as evaluation draws them
        denoiser, extra, _ = conditioned(run, w)
        return generate(denoiser, run.grid, steps, range(40), (1, 8, 8), num_classes=10, extra=extra)

    run, reference = load_run(root / "stage2"), load_run(root / "stage1")
    for row in student["results"]:
        assert row["fidelity_rmse"] == pytest.approx(rmse(samples(run, row["w"], 2), samples(reference, row["w"], 8)),
                                                     rel=1e-9)
    on_disk = json.loads((root / "e" / "student_w1.json").read_text())
    assert [r["w"] for r in on_disk["results"]] == [1.0] and on_disk["results"][0]["fidelity_to"]["w"] == 1.0
    # stage 1 at w = 0 is the teacher's conditional model (its w branch is still zero): no distance at 8 steps
    rows = {(r["w"], r["steps"]): r for r in stage1["results"]}
    assert rows[0.0, 8]["fidelity_rmse"] < 1e-6 < rows[1.0, 8]["fidelity_rmse"]
    cached = sorted(p.name for p in (root / "cache").glob("reference_*.pt"))
    assert len(cached) == 4 and sum("_ddim8_w1_seeds0-39_n40" in name for name in cached) == 2


# ------------------------------------------------------------------------------------ results/guided.md

def test_the_guided_table_shows_the_new_metrics_and_leaves_older_evaluations_blank(tmp_path, monkeypatch):
    """Two rows: one evaluated with the new metrics, one from before them (no precision, recall, class FD,
    fidelity_to).  The old row's new cells are blank; accuracy columns where every row is ≥ 0.99 say saturated;
    the precision-recall figure is written beside guided.png."""
    from tract_repro.results import guided_table

    table = dict(table="guided", title="Guided", paper=dict(setting="s"), ordering=dict(claim="c"),
                 digits=dict(seeds=[0], w=[0, 1]),
                 rows=[dict(id="new", label="New student", digits={}), dict(id="old", label="Old student", digits={})])
    evaluations = {f"{row}@w{w:g}": dict(target=row, sampler="ddim", steps=2, w=w, seeds=[0])
                   for row in ("new", "old") for w in (0.0, 1.0)}
    monkeypatch.setattr(guided_table, "read_evaluations", lambda scale: {"guided": evaluations})
    for row in ("new", "old"):
        for w, accuracy in ((0.0, 0.95), (1.0, 1.0)):
            result = dict(w=w, steps=2, nfe=2, digits_fd=10.0 + w, fidelity_rmse=0.1 + w, class_accuracy=accuracy,
                          digits_is=9.5 if w == 0 else 9.9)
            if row == "new":
                result.update(fidelity_to=dict(run="runs/stage1", role="stage 1", w=w, sampler="ddim", steps=64),
                              precision=0.8 - 0.1 * w, recall=0.7 - 0.2 * w, class_fd=30.0 + w, digits_is_perfect=9.905)
            metrics = dict(run=row, seeds=[0, 499], samples=500, digits_fd_noise_floor=2.9,
                           reference=dict(run="runs/digits/guided_stage1", sampler="ddim", steps=64), results=[result])
            if row == "new":
                metrics["class_fd"] = dict(generated_per_class=[38, 62] + [50] * 8, real_per_class=[178] * 10)
            path = tmp_path / "eval" / row / f"s0_w{w:g}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(metrics))
    records = guided_table.scores(table, eval_dir=tmp_path / "eval")
    summary = guided_table.summarise(records)
    by = {(r.row, r.w): r for r in summary.itertuples()}
    assert by["new", 1.0].precision_mean == pytest.approx(0.7) and math.isnan(by["old", 1.0].precision_mean)
    assert by["old", 0.0].fidelity_rmse_mean == pytest.approx(0.1)
    params = dict(guided_teacher_total="1K", guided_stage1_total="1K", guided_btd_phase="1K", guided_tract_phase="1K")
    page = guided_table.render(table, summary, guided_table.claims(table, summary), params)
    section = lambda title: page.split(f"## {title}")[1].split("\n## ")[0]  # noqa: E731
    precision = section("Precision")
    new_line = next(line for line in precision.splitlines() if line.startswith("| New student"))
    old_line = next(line for line in precision.splitlines() if line.startswith("| Old student"))
    assert "0.800" in new_line and "0.700" in new_line
    assert [cell.strip() for cell in old_line.strip("|").split("|")][-2:] == ["", ""]
    assert "0.700" in section("Recall") and "0.500" in section("Recall") and "31.00" in section("Class-conditional FD")
    assert "38-62 generated samples per class" in section("Class-conditional FD")
    fidelity = section("Fidelity")
    assert "stage 1, DDIM 64 steps" in fidelity and "guided_stage1, DDIM 64 steps" in fidelity
    accuracy = section("Class accuracy")
    assert "w = 1 (saturated)" in accuracy and "w = 0 (saturated)" not in accuracy
    assert "w = 1 (saturated)" in section("Digits Inception Score")  # 9.9 is within 1% of 9.905 (and of 10)
    from tract_repro.results import guided_plots

    guided_plots.plot(table, summary, tmp_path / "guided.png")
    assert (tmp_path / "guided.png").is_file() and (tmp_path / "guided_pr.png").is_file()


def test_comparable_to_the_teacher_needs_fidelity_as_well_as_fd():
    """A student 'comparable to the teacher' has a digits-FD within the factor of the teacher's AND a fidelity RMSE
    to the model it distils no larger than the named row's (stage 1's to the teacher) at that w."""
    import pandas as pd

    from tract_repro.results import guided_table

    rows = [("teacher", 10.0, 0.0), ("stage1", 11.0, 0.10), ("close", 12.0, 0.05), ("far", 12.0, 0.20),
            ("bad_fd", 30.0, 0.05)]
    summary = pd.DataFrame([dict(row=r, w=1.0, digits_fd_mean=fd, fidelity_rmse=rmse) for r, fd, rmse in rows])
    table = dict(ordering=dict(comparable=dict(factor=1.5, fidelity="stage1",
                                               pairs=[["close", "teacher"], ["far", "teacher"], ["bad_fd", "teacher"]])))
    held = {c["better"]: c["holds"] for c in guided_table.claims(table, summary)}
    assert held == {"close": True, "far": False, "bad_fd": False}
    del table["ordering"]["comparable"]["fidelity"]  # FD alone: the far-from-stage-1 student would pass
    assert {c["better"]: c["holds"] for c in guided_table.claims(table, summary)}["far"] is True


def test_a_stochastic_students_comparability_is_judged_on_fd_alone():
    """The stochastic sampler re-noises, so its RMSE to stage 1's samples from the same seeds measures that noise."""
    import pandas as pd

    from tract_repro.results import guided_table

    summary = pd.DataFrame([dict(row="teacher", w=0.0, digits_fd_mean=10.0, fidelity_rmse=0.0, sampler="ddim"),
                            dict(row="stage1", w=0.0, digits_fd_mean=11.0, fidelity_rmse=0.1, sampler="ddim"),
                            dict(row="stochastic", w=0.0, digits_fd_mean=12.0, fidelity_rmse=0.4, sampler="stochastic")])
    table = dict(ordering=dict(comparable=dict(factor=1.5, fidelity="stage1", pairs=[["stochastic", "teacher"]])))
    check, = guided_table.claims(table, summary)
    assert check["holds"] is True and check["fd_only"] and check["fidelity"] is None
