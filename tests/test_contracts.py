"""The contracts a newcomer builds on, exercised as docs/architecture.md tells them to use them.

A new method (a module of your own, imported by your gin file) trains through ``python -m
tract_repro.launch`` and is evaluated by ``python -m tract_repro.evaluate``; one that misses part of
the Method contract stops in one line.  A new sampler is one registry entry.  The loop reads nothing
of a method that the contract does not declare; gin is read only at the edges; the options of a
run have one list of defaults, which training, evaluation and export all follow; every command's
``main`` runs inside the one error boundary.
"""
import ast
import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_gin
from tract_repro.common import cli
from tract_repro.methods.base import Method

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tract_repro"

# The recipe of docs/architecture.md, "A method": a Method subclass with steps(T) and __call__, registered with gin.
TOY_METHOD = '''
import gin
import torch

from tract_repro.methods.base import Method, Target, noise_at, randint


@gin.configurable
class DenoiseFromGridPoints(Method):
    """A toy teacher-training method: x_t at a uniform grid index i ∈ {1..T}, target x, unit weight."""

    needs_teacher = False

    def steps(self, T):
        return (T, 8)  # one phase; its grids and evaluation sample 8 DDIM steps

    def __call__(self, x, cond, phase, nets, grid, generator):
        t = randint(1, grid.T, x.shape[0], generator).to(x.device)
        x_t, logsnr, _, _ = noise_at(x, t, grid, generator)
        return Target(x_t, logsnr, x, torch.ones_like(logsnr), cond)
'''
INCOMPLETE_METHOD = '''
import gin

from tract_repro.methods.base import Method


@gin.configurable
class NoTarget(Method):
    needs_teacher = False

    def steps(self, T):
        return (T, 8)
'''


def run_command(module, args, tmp_path):
    """``python -m module args`` from the project root, with tmp_path (the user's own modules) on PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_new_method_trains_through_launch_and_is_evaluated(tmp_path):
    from tract_repro.evaluation.classifier import train_classifier

    (tmp_path / "toy_methods.py").write_text(TOY_METHOD)
    (tmp_path / "toy.gin").write_text("import toy_methods\n" + tiny_gin(
        "train.method = @DenoiseFromGridPoints()\ninference_ema_momentum.momentum = 0.9", total=128))
    done = run_command("tract_repro.launch", [str(tmp_path / "toy.gin"), "--workdir", str(tmp_path / "run")], tmp_path)
    assert done.returncode == 0, done.stderr
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["method"], info["status"], info["samples"]) == ("DenoiseFromGridPoints", "complete", 128)
    train_classifier(tmp_path / "clf", epochs=3, min_accuracy=0.5)
    done = run_command("tract_repro.evaluate", [str(tmp_path / "run"), "--steps", "2", "--samples", "32",
                                                "--classifier", str(tmp_path / "clf"), "--reference-steps", "8",
                                                "--cache", str(tmp_path / "cache")], tmp_path)
    assert done.returncode == 0, done.stderr
    result, = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["results"]
    assert result["steps"] == 2 and result["digits_fd"] > 0


def test_a_method_missing_part_of_the_contract_stops_in_one_line(tmp_path):
    (tmp_path / "toy_methods.py").write_text(INCOMPLETE_METHOD)
    (tmp_path / "toy.gin").write_text("import toy_methods\n" + tiny_gin(
        "train.method = @NoTarget()\ninference_ema_momentum.momentum = 0.9", total=128))
    done = run_command("tract_repro.launch", [str(tmp_path / "toy.gin"), "--workdir", str(tmp_path / "run")], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "NoTarget does not implement __call__" in done.stderr and "docs/architecture.md" in done.stderr
    assert not (tmp_path / "run").exists()


def test_the_method_contract_is_enforced_at_construction():
    class NoSteps(Method):
        def __call__(self, x, cond, phase, nets, grid, generator):
            return None

    with pytest.raises(Exception, match="NoSteps does not implement steps"):
        NoSteps()
    assert Method.__abstractmethods__ == frozenset({"steps", "__call__"})


def _package_trees():
    for path in sorted(PACKAGE.rglob("*.py")):
        if "shipped" not in path.parts:  # files copied into exports, not part of the package's layers
            yield path, ast.parse(path.read_text(), str(path))


def test_the_loop_reads_only_what_the_method_contract_declares():
    """Every ``<x>.method.<attr>`` read in the package is declared on Method, and no method attribute is read
    through getattr with a default."""
    declared = set(dir(Method))
    for path, tree in _package_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "method":
                if node.attr not in declared:
                    pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} reads method.{node.attr}, which Method does "
                                f"not declare")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and node.args:
                if "method" in ast.unparse(node.args[0]):
                    pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)} reads a method "
                                f"attribute outside the contract")


# The layers below the edges receive resolved objects: these calls read gin bindings.
READS_GIN = {"get_bindings", "query_parameter", "query", "build", "parse", "bind_parameter"}
BELOW_THE_EDGES = ("common", "diffusion", "data", "networks", "sampling", "methods", "training", "evaluation",
                   "exporting")
# Commands that live in a layer parse their own command-line configuration (executor options, classifier options).
COMMAND_FUNCTIONS = {("evaluation", "classifier.py", "main"), ("evaluation", "fid.py", "_submit")}


def _calls_by_function(tree):
    """(innermost enclosing function name or '<module>', call node) for every call in a module."""
    def visit(node, name):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else name
            if isinstance(child, ast.Call):
                yield name, child
            yield from visit(child, inner)
    yield from visit(tree, "<module>")


def test_gin_is_read_only_at_the_edges():
    for path, tree in _package_trees():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] not in BELOW_THE_EDGES:
            continue
        for name, node in _calls_by_function(tree):
            if not isinstance(node.func, ast.Attribute):
                continue
            owner = ast.unparse(node.func.value)
            if owner in ("gin", "config") and node.func.attr in READS_GIN:
                if (rel.parts[0], rel.name, name) not in COMMAND_FUNCTIONS:
                    pytest.fail(f"tract_repro/{rel}:{node.lineno} ({name}) reads gin: {ast.unparse(node)}; "
                                f"take the resolved object (tract_repro.config.runs) instead")


def test_every_command_runs_inside_the_error_boundary():
    bounded = cli.command(lambda argv=None: 0).__code__
    commands = []
    for path, tree in _package_trees():
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            commands.append(module)
            assert importlib.import_module(module).main.__code__ is bounded, f"{module}.main is not @command"
    assert {"tract_repro.launch", "tract_repro.results.run_stages", "tract_repro.data.imagenet64",
            "tract_repro.launching.warm"} <= set(commands)


def _with_defaults(monkeypatch, **defaults):
    """Change defaults of the one list of run options (training.options.Options), as an edit of it would."""
    from tract_repro.training.options import Options

    init = Options.__init__.__wrapped__ if hasattr(Options.__init__, "__wrapped__") else Options.__init__
    names = [f.name for f in dataclasses.fields(Options)][-len(init.__defaults__):]
    values = dict(zip(names, init.__defaults__))
    assert set(defaults) <= set(values)
    monkeypatch.setattr(init, "__defaults__", tuple({**values, **defaults}[n] for n in names))


def test_a_changed_default_is_followed_by_training_evaluation_and_export(tmp_path, monkeypatch):
    """A scratch config that leaves train.T and train.parameterisation unbound: change their defaults, and the
    trained run, its evaluation (load_run) and its export (load_exported) all have the new ones."""
    pytest.importorskip("safetensors")
    from tract_repro import config
    from tract_repro.evaluation.runs import load_run
    from tract_repro.exporting.bundle import export_run, load_exported
    from tract_repro.launching.jobs import run_job

    _with_defaults(monkeypatch, T=32, parameterisation="eps")
    text = "\n".join(line for line in tiny_gin("train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 8\n"
                                               "inference_ema_momentum.momentum = 0.9", total=64).splitlines()
                     if not line.startswith(("train.T", "train.parameterisation")))
    run_job(config.parse(bindings=[line for line in text.splitlines() if line.strip()]), tmp_path / "run")
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["T"], info["parameterisation"]) == (32, "eps")
    run = load_run(tmp_path / "run", with_data=False)
    assert (run.grid.T, run.denoiser.parameterisation, run.options.T) == (32, "eps", 32)
    export_run(tmp_path / "run", "safetensors", tmp_path / "export")
    exported = load_exported(tmp_path / "export")
    assert (exported.grid.T, exported.denoiser.parameterisation) == (32, "eps")
    for name, value in run.denoiser.state_dict().items():
        assert torch.equal(value, exported.denoiser.state_dict()[name])


# Inside a folder that common.files.atomic_folder renames into place as a whole.
IN_ATOMIC_FOLDERS = {"exporting/bundle.py", "exporting/diffusers_format.py"}


def test_files_are_written_through_the_one_atomic_writer():
    """No user-facing file is written in place: every write goes through common.files (write_atomic and what
    builds on it), or fills a folder that atomic_folder renames into place."""
    for path, tree in _package_trees():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "common/files.py" or rel in IN_ATOMIC_FOLDERS:
            continue
        for name, node in _calls_by_function(tree):
            if not isinstance(node.func, ast.Attribute):
                continue
            method, call = node.func.attr, ast.unparse(node)
            writes_path = method in ("write_text", "write_bytes") or (
                method in ("savefig", "to_csv", "savez") and node.args and not ast.unparse(node.args[0]) in ("f", "out"))
            if method == "to_csv" and not node.args:
                writes_path = False  # to a string
            if writes_path and "buffer" not in call:
                pytest.fail(f"tract_repro/{rel}:{node.lineno} ({name}) writes in place: {call}; use "
                            f"tract_repro.common.files.write_atomic")


def test_a_new_sampler_is_one_registry_entry(tmp_path, monkeypatch):
    """docs/architecture.md, "A sampler": one entry in sampling.registry.SAMPLERS, and evaluate can name it."""
    from tract_repro import config
    from tract_repro.evaluate import main as evaluate_main
    from tract_repro.evaluation.classifier import train_classifier
    from tract_repro.launching.jobs import run_job
    from tract_repro.sampling import registry
    from tract_repro.sampling.samplers import ddim, grid_logsnrs

    calls = []

    def unclipped_ddim(denoiser, x, logsnrs, alpha_sigma, cond=None):
        """DDIM without clipping x̂: the toy sampler of the recipe."""
        calls.append(len(logsnrs) - 1)
        return ddim(denoiser, x, logsnrs, alpha_sigma, cond, clip=False)

    monkeypatch.setitem(registry.SAMPLERS, "ddim_unclipped",
                        registry.Sampler("ddim_unclipped", unclipped_ddim, grid_logsnrs, lambda k: k, "ddim (x̂ unclipped)"))
    text = tiny_gin("train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 8\n"
                    "inference_ema_momentum.momentum = 0.9", total=64)
    run_job(config.parse(bindings=[line for line in text.splitlines() if line.strip()]), tmp_path / "run")
    train_classifier(tmp_path / "clf", epochs=3, min_accuracy=0.5)
    common = [str(tmp_path / "run"), "--steps", "2", "--samples", "16", "--classifier", str(tmp_path / "clf"),
              "--reference-steps", "8", "--cache", str(tmp_path / "cache")]
    assert evaluate_main([*common, "--sampler", "ddim_unclipped", "--out", str(tmp_path / "new.json")]) == 0
    drawn = len(calls)
    assert drawn > 0 and set(calls) == {2}  # the new entry drew the 2-step samples
    assert evaluate_main([*common, "--out", str(tmp_path / "ddim.json")]) == 0
    assert len(calls) == drawn  # the default sampler is another entry
    new, old = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("new", "ddim"))
    assert (new["sampler"], old["sampler"]) == ("ddim (x̂ unclipped)", "ddim (clipped x̂)")
