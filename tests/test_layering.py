"""The shells reach the components only through Pipeline and ragkit's API: an import of chunk_cache,
generators, eval or readers from the CLI or the server (anywhere in the file, lazy imports included)
is a layering break this test names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHELLS = [ROOT / "ragkit" / "cli.py", ROOT / "ragkit" / "shell.py", ROOT / "ragkit" / "bench" / "commands.py",
          *sorted((ROOT / "ragkit" / "serve").glob("*.py"))]
FORBIDDEN = ("chunk_cache", "generators", "eval", "ragkit.readers", "retrievers")


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
            if node.module == "ragkit":
                names += [f"ragkit.{alias.name}" for alias in node.names]
    return names


def test_the_check_sees_lazy_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from generators.engine import AnswerEngine\n    import eval.runs\n"
                     "from ragkit import readers\n")
    assert sorted(imported_modules(probe)) == ["eval.runs", "generators.engine", "ragkit", "ragkit.readers"]


def test_cli_and_server_import_no_component():
    breaks = [f"{path.relative_to(ROOT)} imports {name}" for path in SHELLS for name in imported_modules(path)
              if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]
    assert not breaks, breaks


def test_cli_stays_thin():
    assert len((ROOT / "ragkit" / "cli.py").read_text(encoding="utf-8").splitlines()) <= 400
