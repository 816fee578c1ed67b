"""The package's architecture holds: no import cycles, and no import from a lower layer to a higher one.

The import graph is built from the sources (module-level and function-level imports alike), so a
lazy import inside a function counts as much as one at the top of a module.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tract_repro"

#: The layers, lowest first.  A module may import from its own layer and the layers below it.
LAYERS = [
    ["common"],      # errors and the command-line boundary, atomic files, sample counts, per-sample random draws
    ["diffusion"],   # the maths: schedules, grids, parameterisations, weightings, DDIM, EDM
    ["data"],        # datasets as image arrays, their order, safe unpickling
    ["networks"],    # UNets, denoisers (the one D(x_t, λ, cond) contract), conditioning, foreign checkpoints
    ["sampling"],    # samplers and teacher steps with one signature, their registry, image grids
    ["methods"],     # target functions: teacher training, BTD, TRACT; EMAs and phase schedules
    ["training"],    # the run options, the one loop, its state, phases, run directory, devices, data parallelism
    ["config"],      # gin: parsing, the catalogue of configurables, executor options, runs rebuilt from config.gin
    ["launching"],   # jobs: forked seeds, submitit local and SLURM executors, warm starts, process exit
    ["evaluation"],  # samples → digits-FD, FID, teacher fidelity
    ["results"],     # experiments → DVC pipeline → results tables
    ["exporting"],   # finished runs → safetensors, model cards, diffusers pipelines
    ["launch", "evaluate", "warm", "import_teacher", "export", "encode_latents", "train_vae", "edit"],  # the commands users type: thin mains
]


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules():
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name, path, known):
    """The tract_repro modules ``name`` imports anywhere in its source (resolved to known modules)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target != "tract_repro":
                found.add(target)
    return found


def graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def layer_of(name):
    top = name.split(".")[1] if "." in name else None
    if top is None:
        return -1  # the package root itself
    for i, members in enumerate(LAYERS):
        if top in members:
            return i
    raise AssertionError(f"{name} belongs to no layer: add its folder to LAYERS in this test")


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_import_goes_up_a_layer():
    upward = [f"{a} (layer {LAYERS[layer_of(a)][0]}) imports {b} (layer {LAYERS[layer_of(b)][0]})"
              for a, deps in graph().items() for b in deps if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges, cycles, state = graph(), [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                cycles.append(" → ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_check_sees_function_level_imports(tmp_path):
    """A lazy import inside a function is an edge of the graph (so the checks above cannot be dodged)."""
    known = {"tract_repro.common.x": None, "tract_repro.results.y": None}
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from tract_repro.results import y\n    return y\n")
    assert imports_of("tract_repro.common.x", source, known) == {"tract_repro.results.y"}


def test_top_level_modules_are_only_the_commands():
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == set(LAYERS[-1])
