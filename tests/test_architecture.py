"""The shape of the code, checked: one package per technique, no import circles, no private
names across modules, torch-free modules stay torch-free, one owner of run-folder paths.

Static (AST) checks, so they see imports inside functions too; each has a positive control
on a made-up module graph, so a broken check cannot pass silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TECHNIQUES = {"mpc", "he", "tee", "dp", "fl", "reference", "audits"}
# modules the SPU parties import from .venv-spu (numpy<2, jax, no torch) and the plan graph
TORCH_FREE = ("backends.mpc.graph", "backends.mpc.spu_party", "backends.mpc.spu_jax", "backends.mpc.codec",
              "backends.mpc.party_process")
RUN_FOLDER_NAMES = ("run.json", "results.jsonl", "predictions.parquet", "report.html",
                    "leaderboard.csv", "leaderboard.md")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _sources(package: str) -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(module: str, tree: ast.Module) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import statement, lazy ones too."""
    out = []
    package = module if module.count(".") == 0 else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out += [(base, a.name) for a in node.names]
    return out


def _graph(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    graph = {m: set() for m in trees}
    for module, tree in trees.items():
        for target, name in _imports(module, tree):
            full = f"{target}.{name}" if name and f"{target}.{name}" in trees else target
            if full in trees and full != module:
                graph[module].add(full)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def _private_imports(trees: dict[str, ast.Module]) -> list[str]:
    bad = []
    for module, tree in trees.items():
        for target, name in _imports(module, tree):
            if name and name.startswith("_") and not name.startswith("__") and target != module:
                if target.split(".")[0] in ("backends", "suite"):
                    bad.append(f"{module} imports {target}.{name}")
    return bad


def test_one_package_per_technique():
    loose = [p.name for p in (ROOT / "backends").glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules outside a technique package: {loose}"
    packages = {p.name for p in (ROOT / "backends").iterdir() if (p / "__init__.py").exists()}
    assert packages == TECHNIQUES


def test_no_import_cycles_in_backends():
    assert _cycles(_graph(_sources("backends"))) == []


def test_cycle_check_positive_control():
    trees = {"backends.a": ast.parse("def f():\n    from backends.b import x\n"),
             "backends.b": ast.parse("from backends.a import f\n")}
    assert _cycles(_graph(trees)), "the check misses a lazy import circle"


def test_no_private_names_across_modules():
    trees = {**_sources("backends"), **_sources("suite")}
    assert _private_imports(trees) == []


def test_private_name_check_positive_control():
    trees = {"backends.a": ast.parse("from backends.b import _free_port\n"),
             "backends.b": ast.parse("def _free_port(): ...\n")}
    assert _private_imports(trees) == ["backends.a imports backends.b._free_port"]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_modules_stay_torch_free(module):
    trees = _sources("backends")
    seen, todo = set(), [module]
    while todo:                             # everything they import, transitively, in the repo
        m = todo.pop()
        if m in seen or m not in trees:
            continue
        seen.add(m)
        for target, name in _imports(m, trees[m]):
            assert target.split(".")[0] not in ("torch", "torchvision", "torchxrayvision", "crypten"), \
                f"{module} reaches {target} through {m}"
            todo += [target, f"{target}.{name}" if name else target]


def test_run_folder_names_spelled_once():
    offenders = []
    for path in sorted((ROOT / "suite").rglob("*.py")):
        if path.name == "run_folder.py":
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(ROOT)}: {name}" for name in RUN_FOLDER_NAMES
                      if f'/ "{name}"' in text or f'/"{name}"' in text]    # a path joined by hand
    assert offenders == [], "use suite.run_folder.RunFolder"
