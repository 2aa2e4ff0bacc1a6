"""Which of the library's code a chapter's run can execute, definition by definition.

A reference record is stale when code it ran has changed. Hashing each `kdlib` module whole
would call a record stale whenever anything is added to a shared module (a new function in
`kdlib/stats.py` for another chapter), so a library module contributes only what the chapter
reaches: its top-level functions, classes and assignments named, directly or through other
definitions, from the chapter's code cells or its experiment modules, followed through plain
names, `module.attribute` and imports (anywhere in a module), plus the module's top-level
statements that are neither definitions nor imports. A definition reached only through a
string (`getattr(module, "name")`) is not seen; the project has none.

The chapter's own files (its text, its experiment modules, its reference profile) are hashed
whole: anything in them may decide its numbers.
"""

from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

LIBRARY = "kdlib"
CODE_CELL = re.compile(r"^```\{code-cell\}[^\n]*\n(.*?)^```", re.M | re.S)


@dataclass
class Module:
    """One parsed module: its definitions by name, its other statements, its imported names."""

    name: str
    source: str
    definitions: dict[str, list[ast.stmt]] = field(default_factory=dict)
    rest: list[ast.stmt] = field(default_factory=list)
    aliases: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    """local name -> (module, attribute); attribute None when the name is the module itself."""

    @classmethod
    def parse(cls, name: str, source: str, known: set[str]) -> Module:
        module = cls(name, source)
        tree = ast.parse(source)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                module.definitions.setdefault(node.name, []).append(node)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and _targets(node):
                for target in _targets(node):
                    module.definitions.setdefault(target, []).append(node)
            elif not isinstance(node, (ast.Import, ast.ImportFrom)) and not _is_docstring(node):
                module.rest.append(node)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    target = (full, None) if full in known else (node.module, a.name)
                    module.aliases[a.asname or a.name] = target
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        module.aliases[a.asname] = (a.name, None)
        return module

    def segment(self, node: ast.stmt) -> str:
        return ast.get_source_segment(self.source, node) or ast.dump(node)


def _targets(node: ast.Assign | ast.AnnAssign) -> list[str]:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _is_docstring(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def code_cells(markdown: str) -> str:
    """A MyST notebook's code cells as one Python source (cell options and magics dropped)."""
    cells = []
    for body in CODE_CELL.findall(markdown):
        lines = body.splitlines()
        if lines and lines[0].strip() == "---":  # a YAML options block ends at the next ---
            lines = lines[lines.index("---", 1) + 1 :] if "---" in lines[1:] else lines
        while lines and re.match(r"^:\w[\w-]*:", lines[0]):  # short options, `:tags: [parameters]`
            lines = lines[1:]
        cells.append("\n".join(line for line in lines if not line.lstrip().startswith(("%", "!"))))
    return "\n\n".join(cells)


def library_modules(root: Path) -> dict[str, Path]:
    """Every `kdlib` module under `root`, by dotted name."""
    base = root / LIBRARY
    found = {}
    for path in sorted(base.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _referenced(nodes: list[ast.stmt]) -> tuple[set[str], set[tuple[str, str]]]:
    """(plain names, (name, attribute) pairs) read anywhere in `nodes`."""
    names, attributes = set(), set()
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                names.add(sub.id)
            elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name):
                attributes.add((sub.value.id, sub.attr))
    return names, attributes


def reached(roots: list[tuple[str, str]], root: Path) -> tuple[dict[str, set[str]], dict[str, Module]]:
    """(library module -> the names of its definitions the roots reach, every parsed module).

    `roots` are (module name, source) pairs whose every name counts as used: the chapter's code
    cells and its experiment modules.
    """
    paths = library_modules(root)
    known = set(paths)
    parsed = {name: Module.parse(name, path.read_text(), known) for name, path in paths.items()}
    found: dict[str, set[str]] = {}
    todo: list[tuple[Module, list[ast.stmt]]] = [
        (Module.parse(name, source, known), list(ast.parse(source).body)) for name, source in roots
    ]
    while todo:
        module, nodes = todo.pop()
        names, attributes = _referenced(nodes)
        targets: set[tuple[str, str]] = set()
        for local in names:
            if local in module.definitions and module.name in parsed:
                targets.add((module.name, local))
            elif local in module.aliases and module.aliases[local][1] is not None:
                targets.add(module.aliases[local])  # type: ignore[arg-type]
        for local, attribute in attributes:
            target_module, attr = module.aliases.get(local, (None, ""))
            if target_module is not None and attr is None:
                targets.add((target_module, attribute))
        for target_module, name in targets:
            if target_module not in parsed:
                continue
            library = parsed[target_module]
            if target_module not in found:
                found[target_module] = set()
                todo.append((library, library.rest))
            if name in found[target_module]:
                continue
            found[target_module].add(name)
            if name in library.definitions:
                todo.append((library, library.definitions[name]))
            elif name in library.aliases:  # re-exported from another module
                todo.append((library, [ast.Expr(ast.Name(name))]))
    return found, parsed


def reached_digests(roots: list[tuple[str, str]], root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of what `roots` reach in each library module they use (`reached`):
    its reached definitions in file order, and its top-level statements that are neither
    definitions nor imports."""
    found, parsed = reached(roots, root)
    paths = library_modules(root)
    digests = {}
    for name, names in sorted(found.items()):
        library = parsed[name]
        nodes = library.rest + [n for d in names for n in library.definitions.get(d, [])]
        text = "\n\x00".join(library.segment(n) for n in sorted(set(nodes), key=lambda n: n.lineno))
        digests[str(paths[name].relative_to(root))] = hashlib.sha256(text.encode()).hexdigest()
    return digests
