"""train/ imports point one way: the config is a leaf (with its leaf helper), and there are no cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[2] / "train"


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (annotations only: no import happens at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _train_imports(path: Path) -> set[str]:
    """Modules of train/ that `path` imports when it runs (top level or inside functions)."""
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("train."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("train.")}
    return found


def test_train_package_has_no_import_cycle():
    graph = {p.stem: _train_imports(p) for p in TRAIN.glob("*.py")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_config_is_a_leaf():
    # optim: the optimizer and schedule names and the schedule check the flags are validated with
    assert _train_imports(TRAIN / "config.py") == {"sharding_config", "precision", "optim"}
    assert all(_train_imports(TRAIN / f"{m}.py") == set() for m in ("sharding_config", "precision", "optim"))
    # and importing it pulls in no backend (so validating flags never loads torch.distributed machinery)
    code = ("import sys, train.config; "
            "print(sorted(m for m in sys.modules if m.startswith('train.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=TRAIN.parent, check=True)
    assert out.stdout.strip() == "['train.config', 'train.optim', 'train.precision', 'train.sharding_config']", \
        out.stdout
