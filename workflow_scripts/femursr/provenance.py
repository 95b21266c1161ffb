"""Which code a rule runs, as a hash: so that editing a module reruns exactly the rules that use it.

Snakemake reruns a job when its script file changes, but not when a module of the package that
the script imports changes. Each rule therefore takes ``code=code_version(script, ...)`` in its
``params``: a hash of the script and of every ``femursr`` module it imports, transitively
(imports inside functions included, read from the source with :mod:`ast`, nothing imported).
Editing ``femursr/morphometry.py`` then changes the hash of the rules whose scripts reach it, and
Snakemake's params trigger reruns those jobs and what depends on them, nothing else.

Modules that a script reaches only by name at run time (the SR registry's ``"gan:SRGAN"``) are
passed explicitly as ``extra`` modules.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE = "femursr"


def module_file(root: Path, name: str) -> Path | None:
    """The source file of module ``name`` (dotted) under ``root``, or ``None``."""
    base = Path(root, *name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _package_of(root: Path, path: Path) -> list[str]:
    """The dotted package (as parts) that relative imports in ``path`` start from."""
    try:
        parts = list(path.relative_to(root).with_suffix("").parts)
    except ValueError:  # a rule script outside the package: no relative imports
        return []
    return parts[:-1]  # module a/b/c.py -> package a.b; a/b/__init__.py -> a.b


def import_names(node: ast.AST, package: list[str]) -> list[str]:
    """The dotted names an ``import`` or ``from ... import`` statement imports (for ``from m import
    a``: ``m`` and ``m.a``, since ``a`` may be a module), relative imports resolved against
    ``package`` (its parts); ``[]`` for any other node."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = package[: len(package) - node.level + 1]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [mod] + [f"{mod}.{a.name}" for a in node.names]  # `from pkg import module`


def imported_modules(root: Path, path: Path) -> tuple[str, ...]:
    """The ``femursr`` modules that the Python file ``path`` imports anywhere in its source
    (``import femursr.x``, ``from femursr.x import y``, ``from .x import y``, ``from . import x``),
    with the packages that contain them."""
    st = path.stat()
    return _imported_modules(root, path, st.st_mtime_ns, st.st_size)


@functools.cache
def _imported_modules(root: Path, path: Path, mtime_ns: int, size: int) -> tuple[str, ...]:
    # cached per file version (a workflow parses hundreds of rules that share modules)
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _package_of(root, path)
    found = set()
    for node in ast.walk(tree):
        for name in import_names(node, package):
            if name != PACKAGE and not name.startswith(PACKAGE + "."):
                continue
            parts = name.split(".")
            for k in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__
                prefix = ".".join(parts[:k])
                if module_file(root, prefix) is not None:
                    found.add(prefix)
    return tuple(sorted(found))


def module_closure(root, script, extra=()) -> list[Path]:
    """The script and every package module it reaches through imports (and ``extra``), sorted."""
    root = Path(root).resolve()
    files = {Path(script).resolve()}
    todo = list(imported_modules(root, Path(script).resolve()))
    for name in extra:
        if module_file(root, name) is None:
            raise ValueError(f"code_version: module {name} not found under {root}")
        todo.append(name)
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        f = module_file(root, name)
        files.add(f)
        todo.extend(imported_modules(root, f))
    return sorted(files)


def code_version(root, script, extra=()) -> str:
    """A short hash (16 hex digits) of ``script`` and the package modules it runs: the content of
    every file of :func:`module_closure`, with its path relative to ``root``'s parent."""
    root = Path(root).resolve()
    h = hashlib.sha256()
    for f in module_closure(root, script, tuple(extra)):
        try:
            rel = f.relative_to(root.parent)
        except ValueError:
            rel = Path(f.name)
        h.update(str(rel).encode() + b"\0" + hashlib.sha256(f.read_bytes()).hexdigest().encode() + b"\n")
    return h.hexdigest()[:16]
