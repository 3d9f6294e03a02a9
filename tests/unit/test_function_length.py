"""Functions short enough to read: a function in medtx/ longer than ``MAX_LINES``
(its docstring not counted) says why in its docstring ("Long because ...")."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "medtx"
MAX_LINES = 80


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from ``def`` to the function's last, less its docstring's."""
    total = (node.end_lineno or node.lineno) - node.lineno + 1
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        total -= (first.end_lineno or first.lineno) - first.lineno + 1
    return total


def long_functions(root: Path = PACKAGE) -> dict[str, tuple[int, str]]:
    """``module:function`` -> (lines, docstring) for every function over MAX_LINES."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = body_lines(node)
                if lines > MAX_LINES:
                    key = f"{path.relative_to(root).as_posix()}:{node.name}"
                    found[key] = (lines, ast.get_docstring(node) or "")
    return found


def test_every_long_function_says_why():
    unexplained = [
        f"medtx/{key} ({lines} lines)"
        for key, (lines, doc) in long_functions().items()
        if "long because" not in doc.lower()
    ]
    assert not unexplained, "over 80 lines without 'Long because' in the docstring: " + ", ".join(
        unexplained
    )


def test_the_count_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES - 1))
    (tmp_path / "m.py").write_text(f'def short():\n    """Doc."""\n{body}\n')
    assert long_functions(tmp_path) == {}  # 81 lines with the docstring, 80 without
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n    return 0\n")
    assert list(long_functions(tmp_path)) == ["m.py:long"]
