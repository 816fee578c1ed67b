"""A teacher's FID on a short budget before a multi-day run: ``python -m tract_repro.evaluation.fid sanity``.

    python -m tract_repro.evaluation.fid sanity runs/paper/cifar10_teacher \\
        --reference runs/paper/fid_ref/cifar10_pd.npz --steps 64 1024 --samples 10000 \\
        --expect 64:3.0-6.5 1024:1.5-4.0 --out results/paper/sanity_cifar10.json

``fid.sanity_check`` samples ``samples`` images per DDIM step count (seeds 0..samples − 1), computes their FID by
the reference's protocol and extrapolates it to 50,000 samples as the official TRACT code's ``approximate_fid`` does
(FID(N) ≈ FID∞ + c/N, so 10k samples alone read high).  This module judges the numbers: each extrapolated FID
against its expected range; one line says PASS or FAIL with every number (exit status 0 or 1).
``dvc repro sanity_cifar10`` runs it on the imported PD teacher with the ranges of params.yaml (``paper.sanity``):
about an hour on one GPU, where a wrong data folder, teacher file or Inception shows as a FID far off.
"""
import re

from tract_repro.common.errors import ConfigError

EXTRAPOLATE_TO = 50_000


def parse_expectations(texts, steps):
    """{K: (lo, hi)} from ``K:LO-HI`` strings; one line on a malformed one or a step count without a range."""
    ranges = {}
    for text in texts:
        m = re.fullmatch(r"(\d+):(\d+(?:\.\d*)?)-(\d+(?:\.\d*)?)", text.strip())
        if not m or float(m.group(2)) >= float(m.group(3)):
            raise ConfigError(f"--expect {text!r}: give K:LO-HI with LO < HI, e.g. 64:3.0-6.5")
        ranges[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
    missing = [k for k in steps if k not in ranges]
    if missing:
        raise ConfigError(f"--expect has no range for {', '.join(map(str, missing))} steps: add K:LO-HI for each of "
                          f"--steps {' '.join(map(str, steps))}")
    return ranges


def verdict(metrics, ranges, samples):
    """(passed, one line, the record saved beside the metrics) for an evaluation with ``extrapolate_to``."""
    checks = []
    for row in metrics["results"]:
        lo, hi = ranges[row["steps"]]
        value = row["fid_extrapolated"][0]
        checks.append(dict(steps=row["steps"], fid=row["fid"][0], fid_extrapolated=value, expected=[lo, hi],
                           passed=bool(lo <= value <= hi)))
    passed = all(c["passed"] for c in checks)
    shown = "; ".join(f"{c['steps']} steps {c['fid_extrapolated']:.2f} {'∈' if c['passed'] else '∉'} "
                      f"[{c['expected'][0]:g}, {c['expected'][1]:g}] ({c['fid']:.2f} at {samples:,})" for c in checks)
    said = "PASS" if passed else "FAIL (check the data folder, the teacher file and the Inception weights before a long run)"
    line = (f"sanity {said}: {metrics['run']} FID ({metrics['protocol']['name']} protocol, extrapolated to "
            f"{EXTRAPOLATE_TO:,} samples): {shown}")
    return passed, line, dict(passed=passed, samples=samples, extrapolated_to=EXTRAPOLATE_TO, checks=checks)
