"""The project's import graph, read from the source (every import statement, those inside functions too).

Used by the layout tests and by ``python tests/code_graph.py STAGE...``, which prints the code a
stage module runs, as ``dvc.yaml`` lists it under the stage's ``deps``. Every function takes the
repository root, so the tests can also run the rules on a deliberately broken tree.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("abliterate", "stages")
HELPERS = {"stages.cliutil", "stages.paramfile", "stages.cli", "stages.__main__", "stages"}  # in stages/, but not stage modules


class Graph:
    """The import graph of the project at ``root``."""

    def __init__(self, root: Path = REPO):
        self.root = Path(root)
        self.files: dict[str, Path] = {}  # dotted name -> file (packages by their __init__)
        for package in PACKAGES:
            for path in sorted((self.root / package).rglob("*.py")):
                parts = path.relative_to(self.root).with_suffix("").parts
                self.files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
        self.imports = {name: self._direct(name) for name in self.files}

    def statements(self, name: str) -> list[tuple[str, list[str]]]:
        """``(module, names)`` of every import statement of a module (``names`` empty for ``import x``)."""
        out = []
        for node in ast.walk(ast.parse(self.files[name].read_text(encoding="utf-8"), str(self.files[name]))):
            if isinstance(node, ast.Import):
                out += [(alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.append((node.module, [alias.name for alias in node.names]))
        return out

    def _direct(self, name: str) -> set[str]:
        """The project modules one module imports. ``from pkg import mod`` names the submodule;
        ``from pkg import value`` names the package itself (its ``__init__``)."""
        found = set()
        for module, names in self.statements(name):
            if module.split(".")[0] not in PACKAGES:
                continue
            subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in self.files]
            found.update(subs)
            if not names or len(subs) < len(names):
                found.add(module)
        return found

    def external(self, name: str) -> set[str]:
        """The top-level names of the packages outside the project that a module imports."""
        return {module.split(".")[0] for module, _ in self.statements(name)} - set(PACKAGES)

    def closure(self, name: str) -> set[str]:
        """``name`` and every project module it imports, directly or not."""
        seen, todo = set(), [name]
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(self.imports.get(current, ()))
        return seen

    def stage_files(self, stage_module: str) -> list[str]:
        """The repository paths of the code a stage module runs, sorted (what its ``deps`` must list)."""
        return sorted(self.files[m].relative_to(self.root).as_posix() for m in self.closure(stage_module))

    def stage_modules(self) -> list[str]:
        return sorted(n for n in self.files if n.startswith("stages.") and n not in HELPERS)

    def library_modules(self) -> list[str]:
        return sorted(n for n in self.files if n.split(".")[0] == "abliterate")

    def cycles(self) -> list[list[str]]:
        """Every import cycle (strongly connected component of more than one module, or a self-import)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        found: list[list[str]] = []

        def visit(node: str) -> None:  # Tarjan's algorithm
            index[node] = low[node] = len(index)
            stack.append(node)
            for nxt in sorted(self.imports[node]):
                if nxt not in self.files:
                    continue
                if nxt not in index:
                    visit(nxt)
                    low[node] = min(low[node], low[nxt])
                elif nxt in stack:
                    low[node] = min(low[node], index[nxt])
            if low[node] == index[node]:
                part = stack[stack.index(node):]
                del stack[stack.index(node):]
                if len(part) > 1 or node in self.imports[node]:
                    found.append(sorted(part))

        for node in sorted(self.files):
            if node not in index:
                visit(node)
        return found


if __name__ == "__main__":
    graph = Graph()
    for stage in sys.argv[1:]:
        print(f"{stage}:")
        for file in graph.stage_files(f"stages.{stage}"):
            print(f"  - {file}")
