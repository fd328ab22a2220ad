"""The run folder's names have one home (``fcl_lightning.layout``, the ground floor) and the
package's imports form no circle, not even through type-only imports."""

import ast
from pathlib import Path

import pytest
from support import REPO

SRC = REPO / "src" / "fcl_lightning"
MODULES = {
    ("fcl_lightning." + ".".join(f.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): f
    for f in SRC.rglob("*.py")
}


def imports(path: Path, type_only: bool) -> set[str]:
    """The package modules ``path`` imports at module level (with ``type_only``: also inside
    ``if TYPE_CHECKING:``); ``from pkg import name`` counts as ``pkg.name`` when that is a module."""
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                if type_only:
                    visit(node.body)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fcl_lightning"):
                for alias in node.names:
                    name = f"{node.module}.{alias.name}"
                    out.add(name if name in MODULES else node.module)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.startswith("fcl_lightning"))

    visit(ast.parse(path.read_text()).body)
    return {m for m in out if m in MODULES}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (depth-first search), or ``None``."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def walk(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := walk(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := walk(m)):
            return found
    return None


@pytest.mark.parametrize("type_only", [False, True], ids=["runtime", "with type-only imports"])
def test_no_import_circle(type_only):
    graph = {m: imports(f, type_only) - {m} for m, f in MODULES.items()}
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_cycle_finder_finds_one():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_the_layout_is_the_ground_floor():
    assert imports(MODULES["fcl_lightning.layout"], type_only=True) == set()


def test_run_folder_names_are_spelled_only_in_the_layout():
    names = ['"last.ckpt"', '"summary.json"', '"encoder_init.pt"', '"config.yaml"', '"run.lock"', 'f"round-{']
    spelled = [
        f"{f.relative_to(SRC)}: {n}"
        for f in SRC.rglob("*.py")
        if f.name != "layout.py"
        for n in names
        if n in f.read_text()
    ]
    assert spelled == []
