"""Which rooms may import which, read from every file's syntax tree (imports under `if TYPE_CHECKING:` are
annotations only and do not count): cache <- scheduler <- engine; models stand alone; tools use anything but
tests; nothing that ships imports tools or tests."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"engine", "models", "scheduler", "cache", "tools", "tests"}
TEST_MODULES = {p.stem for p in (ROOT / "tests").glob("*.py")}  # importable by bare name with tests/ on sys.path
# package -> the packages of ours it may import at run time (besides itself)
ALLOWED = {
    "cache": set(),
    "scheduler": {"cache"},
    "models": set(),
    "engine": {"models", "scheduler", "cache"},
    "tools": {"engine", "models", "scheduler", "cache"},
}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(path: Path, package: str) -> set[str]:
    """The top-level packages of ours that `path` (a module of `package`) imports outside `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for sub in node.orelse:
                visit(sub)
            return
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(package if node.level else (node.module or "").split(".")[0])
        elif isinstance(node, ast.Call) and "sys.path" in ast.unparse(node.func) and \
                any(isinstance(c, ast.Constant) and "tests" in str(c.value) for c in ast.walk(node)):
            found.add("tests")  # tests/ put on sys.path, to import its modules by their bare names
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {"tests" if name in TEST_MODULES else name for name in found} & OURS


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_layers(package):
    files = _files(package)
    assert files, package
    wrong = {str(f.relative_to(ROOT)): sorted(runtime_imports(f, package) - ALLOWED[package] - {package})
             for f in files}
    assert not {f: w for f, w in wrong.items() if w}


def test_the_checker_sees_what_it_should(tmp_path):
    """The walker finds plain, dotted, relative and nested imports and skips TYPE_CHECKING-only ones."""
    src = tmp_path / "probe.py"
    src.write_text("import cache.block_pool\nfrom .policy import Full\nimport typing\n"
                   "def f():\n    from engine.llm import LLM\n"
                   "if typing.TYPE_CHECKING:\n    from tests.x import y\nelse:\n    import tools.bench\n")
    assert runtime_imports(src, "scheduler") == {"cache", "scheduler", "engine", "tools"}
    src.write_text("import sys\nsys.path.insert(0, str(ROOT / 'tests'))\n")   # how tools/gpu_check.py once did it
    assert runtime_imports(src, "tools") == {"tests"}
    src.write_text("from conftest import _one_thread\n")
    assert runtime_imports(src, "tools") == {"tests"}
