"""The layout's rules, checked on the source: no import cycles, one owner of the money path.

- No module of ``gateway`` imports, at run time, a module that imports it back (imports under
  ``if TYPE_CHECKING:`` are for annotations only and do not count).
- Settling a budget hold, writing a ledger record and pricing a request happen only in the
  request's ticket (``gateway/pipeline/ticket.py``) and in the stores and arithmetic it calls.
- Every module opens with a docstring saying what it owns.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "gateway"


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def runtime_imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(n) for child in node.body for n in ast.walk(child))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in known else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def test_no_import_cycles() -> None:
    known = modules()
    graph = {name: runtime_imports(name, path, known) for name, path in known.items()}
    # a module importing one of its own package's submodules also runs the package's __init__: count it
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


MONEY_CALLS = {
    r"\.settle\(": "settles a budget hold",
    r"state\.record\(": "writes a ledger record",
    r"\baccount\(": "prices a request",
}
# where the money path may appear: the ticket, and the stores and arithmetic it calls
OWNERS = ("pipeline/ticket.py", "state/", "savings/accounting.py")


def test_only_the_ticket_prices_settles_and_records() -> None:
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(OWNERS):
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, what in MONEY_CALLS.items():
                if re.search(pattern, code):
                    offenders.append(f"{rel}:{lineno} {what}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_every_module_says_what_it_owns() -> None:
    missing = [str(path.relative_to(ROOT)) for path in ROOT.rglob("*.py")
               if path.stat().st_size and not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, missing
