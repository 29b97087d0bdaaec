"""Data flows one way: nothing in dpo_lightning/data imports the CLI (or a command module), and the data modules
import each other without cycles (lazy imports inside functions count too)."""

import ast
from pathlib import Path

from helpers import ROOT

DATA = ROOT / "dpo_lightning" / "data"
# what the data package may import from the rest of the package: errors, the log-prob constants, tokenizers
ALLOWED_OUTSIDE = {"dpo_lightning.errors", "dpo_lightning.logps", "dpo_lightning.tokenizer"}


def _imports(path: Path) -> set[str]:
    """Every dpo_lightning module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpo_lightning"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if (DATA / f"{a.name}.py").exists())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dpo_lightning"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {f"dpo_lightning.data.{p.stem}": p for p in DATA.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) for name, path in modules.items()}


def test_data_imports_nothing_upstream():
    for module, imports in _graph().items():
        outside = {m for m in imports if not m.startswith("dpo_lightning.data")} - ALLOWED_OUTSIDE
        assert not outside, f"{module} imports {sorted(outside)}: the data package must not reach up (CLI, model)"


def test_data_modules_import_each_other_without_cycles():
    graph = _graph()
    inside = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path[path.index(module) :], module))}"
        if module in done:
            return
        for dep in sorted(inside[module]):
            visit(dep, (*path, module))
        done.add(module)

    for module in sorted(inside):
        visit(module, ())
