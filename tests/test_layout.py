"""The package's import rules: ``kernels`` is Pallas alone and imports nothing of jaxlin."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_kernels_import_nothing_of_jaxlin():
    found = [f"{path.relative_to(ROOT)}: {name}" for path in sorted((ROOT / "kernels").rglob("*.py"))
             for name in imported_modules(path) if name == "jaxlin" or name.startswith("jaxlin.")]
    assert not found, "kernels/ must import only jax:\n" + "\n".join(found)
