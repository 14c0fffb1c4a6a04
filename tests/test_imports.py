"""No import cycle among resnet_lab's modules, module-level or deferred (imports inside functions).

A cycle hidden in a function body works until someone imports in the other order; the fix
is a module both sides can import at the top. The imports are read from the source with
``ast``, so nothing is imported to check them.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "resnet_lab"


def module_names(root: Path) -> dict[str, Path]:
    """``{"resnet_lab.train": path, "resnet_lab": .../__init__.py, ...}`` for a package folder."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The known modules ``module`` imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != module}
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (depth-first search, grey/black marking)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph(root: Path) -> dict[str, set[str]]:
    known = module_names(root)
    return {m: imported(m, p, known) for m, p in known.items()}


def test_resnet_lab_has_no_import_cycle() -> None:
    graph = import_graph(PACKAGE)
    assert {"resnet_lab.train", "resnet_lab.study", "resnet_lab.launch"} <= set(graph)
    assert "resnet_lab.train" in graph["resnet_lab.launch"]  # edges are read at all
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_a_deferred_import_cycle_is_found(tmp_path: Path) -> None:
    """The check itself: a cycle closed only by an import inside a function is still a cycle."""
    pkg = tmp_path / "resnet_lab"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")
    (pkg / "c.py").write_text("import resnet_lab.a\n")
    graph = import_graph(pkg)
    assert graph["resnet_lab.c"] == {"resnet_lab.a"}
    assert find_cycle(graph) == ["resnet_lab.a", "resnet_lab.sub.b", "resnet_lab.a"]
    (pkg / "sub" / "b.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(pkg)) is None


def test_resnet_lab_never_imports_analysis() -> None:
    """Packages in one direction: ``analysis`` reads what the library logs, the library never imports
    ``analysis`` (anywhere in a file: top level, in a function, under TYPE_CHECKING). The command that
    writes reports is registered from above, in ``resnet_lab_command``."""
    offenders = {}
    for module, path in module_names(PACKAGE).items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets.add(node.module)
        if hits := sorted(t for t in targets if t.split(".")[0] == "analysis"):
            offenders[module] = hits
    assert not offenders, f"resnet_lab imports analysis: {offenders}"
    from resnet_lab_command import make_parser  # the console script: report is registered from above

    assert make_parser().parse_args(["report", "some_study"]).study == "some_study"

