"""Imports run one way: the package's import graph has no cycle and no edge against the layers.

The graph is read from the source with `ast`, so it sees every import the interpreter may run:
module-level and function-local ones, relative ones (`from . import x`, `from ..models import y`),
`importlib.import_module("...")` / `__import__("...")` with a literal name, and the lazy
re-exports of a package's `_EXPORTS = {name: submodule}` table (rgpt4d.models, rgpt4d.data,
rgpt4d.train). `from pkg import name` counts as an import of the submodule that defines `name`
when `pkg` re-exports it through `_EXPORTS`, else of `pkg` itself.

Layers, lowest first (`LAYERS`). A module may import its own group (a cycle-free graph inside it)
and any group on a strictly lower layer; two groups on the same layer do not import each other:

    0  rgpt4d.kernels      Triton kernels; import no other part of the package
    0  rgpt4d._C           the compiled C++/CUDA extension (csrc/)
    0  rgpt4d.argtypes     argparse types the subcommands share (standard library only)
    1  rgpt4d.ops          the ops and their backends (kernels, the C++/CUDA extension)
    1  rgpt4d.data         synthetic data, R4D-Bench, evaluation: no model code, no ops
    2  rgpt4d              the package itself: re-exports rgpt4d.ops
    3  rgpt4d.models       teacher, student, P4D heads, tokenizer, configs, loaders (ops, data)
    3  rgpt4d.env          `rgpt4d env`: reports the versions and what rgpt4d.ops can run
    4  rgpt4d.infer        inference wrapper around a trained student (models, data)
    4  rgpt4d.integrations the drop-in for transformers models (models, ops)
    5  rgpt4d.train        training loops, teacher cache, evaluation, reports (models, infer, data)
    6  rgpt4d.cli, rgpt4d.demo, rgpt4d.__main__: one group, the `rgpt4d` command and the main job

Each subsystem's `cli` module (rgpt4d.data.cli, rgpt4d.train.cli) belongs to its subsystem's layer;
the `rgpt4d` command imports them.

A function-local import is kept only for an optional dependency or a start-up cost, and says which
with a `# optional: ...` or `# start-up: ...` comment on a line of its function up to the import
(test_function_local_imports_say_why).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (group, layer, module prefixes); the longest matching prefix names a module's group.
LAYERS = [
    ("kernels", 0, ("rgpt4d.kernels",)),
    ("extension", 0, ("rgpt4d._C",)),
    ("argtypes", 0, ("rgpt4d.argtypes",)),
    ("ops", 1, ("rgpt4d.ops",)),
    ("data", 1, ("rgpt4d.data",)),
    ("package", 2, ("rgpt4d",)),
    ("models", 3, ("rgpt4d.models",)),
    ("env", 3, ("rgpt4d.env",)),
    ("infer", 4, ("rgpt4d.infer",)),
    ("integrations", 4, ("rgpt4d.integrations",)),
    ("train", 5, ("rgpt4d.train",)),
    ("command", 6, ("rgpt4d.cli", "rgpt4d.demo", "rgpt4d.__main__")),
]
_PREFIX = {prefix: (group, layer) for group, layer, prefixes in LAYERS for prefix in prefixes}
# compiled modules: no source to parse, but imported by name
EXTENSIONS = {"rgpt4d._C"}


def package_modules(root: Path = ROOT) -> dict[str, Path]:
    """{module name: file} of rgpt4d/ and of kernels/ (installed as rgpt4d.kernels)."""
    found = {}
    for folder, prefix in ((root / "rgpt4d", ("rgpt4d",)), (root / "kernels", ("rgpt4d", "kernels"))):
        for path in folder.rglob("*.py"):
            parts = prefix + path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _exports(tree: ast.Module) -> dict[str, str]:
    """A package's `_EXPORTS = {"Name": "submodule", ...}` table, if it has one."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            return {k.value: v.value for k, v in zip(node.value.keys, node.value.values)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
    return {}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the package modules it imports}, read with ast (see the module docstring)."""
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules.items()}
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    exports = {name: _exports(tree) for name, tree in trees.items() if name in packages}

    def target(module: str, name: str | None = None) -> str | None:
        if name is not None:
            if f"{module}.{name}" in modules or f"{module}.{name}" in EXTENSIONS:
                return f"{module}.{name}"
            if name in exports.get(module, {}):
                return f"{module}.{exports[module][name]}"
        while module and module not in modules:  # `import rgpt4d.ops.tpe.sub` -> the deepest module there is
            module = module.rpartition(".")[0]
        return module or None

    graph: dict[str, set[str]] = {}
    for name, tree in trees.items():
        edges = graph.setdefault(name, set())
        edges.update(f"{name}.{sub}" for sub in set(exports.get(name, {}).values()))
        here = name.split(".") if name in packages else name.split(".")[:-1]
        for node in ast.walk(tree):
            found: list[str | None] = []
            if isinstance(node, ast.Import):
                found = [target(a.name) for a in node.names if a.name.split(".")[0] == "rgpt4d"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if base.split(".")[0] == "rgpt4d":
                    found = [target(base, a.name) for a in node.names]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                text = node.args[0].value
                if called in ("import_module", "__import__") and isinstance(text, str) and text.startswith("rgpt4d"):
                    found = [target(text)]
            edges.update(t for t in found if t is not None and t != name)
    return graph


def group_of(module: str) -> tuple[str, int]:
    """(group, layer) of a module: its longest prefix in LAYERS."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in _PREFIX:
            return _PREFIX[".".join(parts[:n])]
    raise KeyError(f"{module}: in no layer of LAYERS; add its package there")


def direction_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports of another group on the same or a higher layer than the importer's."""
    bad = []
    for src, targets in sorted(graph.items()):
        g, layer = group_of(src)
        for dst in sorted(targets):
            h, other = group_of(dst)
            if h != g and other >= layer:
                bad.append(f"{src} (layer {layer}) imports {dst} (layer {other})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


REASONS = ("# optional:", "# start-up:")


def unexplained_local_imports(modules: dict[str, Path]) -> list[str]:
    """`module:line` of every function-local import without a REASONS comment in its function up to it."""
    bad = []
    for name, path in sorted(modules.items()):
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines), str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                span = lines[fn.lineno - 1:node.end_lineno]
                if not any(reason in line for line in span for reason in REASONS):
                    bad.append(f"{name}:{node.lineno}")
    return sorted(set(bad))


@pytest.fixture(scope="module")
def graph():
    return import_graph(package_modules())


def test_every_module_has_a_layer(graph):
    for module in graph:
        group_of(module)


def test_imports_run_one_way(graph):
    bad = direction_violations(graph)
    assert not bad, "imports against the layers (tests/test_imports.py docstring):\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_function_local_imports_say_why():
    bad = unexplained_local_imports(package_modules())
    assert not bad, ("function-local imports without a `# optional:` / `# start-up:` reason (move them to the "
                     "module top otherwise):\n" + "\n".join(bad))


def test_the_command_parser_does_not_import_the_model_stack():
    """What the `# start-up: the model stack` imports are for: `rgpt4d --help` and `rgpt4d data make`
    build the parser without importing transformers' model classes or the rgpt4d model modules."""
    code = ("import sys, rgpt4d.cli; rgpt4d.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.startswith(('transformers.models.', 'rgpt4d.models.student', "
            "'rgpt4d.models.teacher', 'rgpt4d.train.student', 'rgpt4d.infer'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_checks_catch_a_violating_graph():
    graph = {
        "rgpt4d.data.dataset": {"rgpt4d.models.student"},      # data importing model code
        "rgpt4d.models.student": {"rgpt4d.train.loop", "rgpt4d.ops"},  # models importing train
        "rgpt4d.models.configs": {"rgpt4d.models.tokenizer"},
        "rgpt4d.models.tokenizer": {"rgpt4d.models.configs"},  # a cycle inside one group
        "rgpt4d.train.loop": {"rgpt4d.models.student"},
        "rgpt4d.ops": set(),
        "rgpt4d.env": {"rgpt4d.models.configs"},                # same layer, another group
    }
    assert direction_violations(graph) == [
        "rgpt4d.data.dataset (layer 1) imports rgpt4d.models.student (layer 3)",
        "rgpt4d.env (layer 3) imports rgpt4d.models.configs (layer 3)",
        "rgpt4d.models.student (layer 3) imports rgpt4d.train.loop (layer 5)",
    ]
    assert cycles(graph) == [["rgpt4d.models.configs", "rgpt4d.models.tokenizer"],
                             ["rgpt4d.models.student", "rgpt4d.train.loop"]]
    with pytest.raises(KeyError, match="rgpt4d_extra.x: in no layer"):
        group_of("rgpt4d_extra.x")


def test_the_parser_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "rgpt4d"
    (pkg / "models").mkdir(parents=True)
    (pkg / "data").mkdir()
    (tmp_path / "kernels").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text('_EXPORTS = {"Thing": "things"}\n')
    (pkg / "data" / "things.py").write_text("def f():\n    from ..models import student\n")  # function-local
    (pkg / "data" / "other.py").write_text("from . import things\nfrom rgpt4d.data import Thing\n\n\n"
                                           "def h():\n    # optional: av\n    import av\n")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "student.py").write_text("import importlib\nimportlib.import_module('rgpt4d.train')\n")
    (pkg / "train.py").write_text("def g():\n    __import__('rgpt4d.models.student')\n")
    graph = import_graph(package_modules(tmp_path))
    assert unexplained_local_imports(package_modules(tmp_path)) == ["rgpt4d.data.things:2"]  # other.h says why
    assert graph["rgpt4d.data"] == {"rgpt4d.data.things"}
    assert graph["rgpt4d.data.things"] == {"rgpt4d.models.student"}
    assert graph["rgpt4d.data.other"] == {"rgpt4d.data.things"}
    assert graph["rgpt4d.models.student"] == {"rgpt4d.train"}
    assert graph["rgpt4d.train"] == {"rgpt4d.models.student"}
    assert cycles(graph) == [["rgpt4d.models.student", "rgpt4d.train"]]
    assert direction_violations(graph) == [
        "rgpt4d.data.things (layer 1) imports rgpt4d.models.student (layer 3)",
        "rgpt4d.models.student (layer 3) imports rgpt4d.train (layer 5)",
    ]
