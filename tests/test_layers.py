"""The import graph keeps ARCHITECTURE's boundaries: model/ imports no Ray, DeepSpeed, pipelines/,
jobs/ or cluster/; pipelines/ imports nothing of jobs/ or cluster/; no import cycle inside jobs/.

Imports inside function bodies count: a cycle hidden in a function is still a cycle.
"""

from __future__ import annotations

import ast

from tests.conftest import ROOT

LAYERS = ("jobs", "pipelines", "model", "cluster")


def modules() -> dict[str, ast.Module]:
    out = {}
    for top in LAYERS:
        for path in sorted((ROOT / top).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = ast.parse(path.read_text(), str(path))
    return out


def imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of every absolute import, at any depth; `from a.b import c` also yields a.b.c
    (c may be a module)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def test_lower_layers_import_nothing_above_them():
    bad = []
    for name, tree in modules().items():
        layer = name.split(".")[0]
        for line, target in imports(tree):
            top = target.split(".")[0]
            if layer in ("model", "pipelines") and top in ("jobs", "cluster"):
                bad.append(f"{name}:{line} imports {target}")
            if layer == "model" and top in ("ray", "deepspeed", "pipelines"):
                bad.append(f"{name}:{line} imports {target}")
    assert bad == []


def test_no_import_cycles_in_jobs():
    mods = modules()
    edges = {m: {t for _, t in imports(tree) if t in mods and t != m and t.startswith("jobs")}
             for m, tree in mods.items() if m.startswith("jobs")}
    cycles, state = [], {}                       # state: 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert cycles == []
    assert "jobs.train.loop" in edges and "jobs.inference" in edges["jobs.train.loop"]   # the graph is really read
