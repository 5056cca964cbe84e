"""A stage's code version, computed from the import graph of its build function (never listed by hand).

The code that shapes a stage's output is its build function in `pipeline.stages`, the helpers there it
calls, and every project module those import, transitively. `code_identity(build)` finds them by
reading source (Python's `ast`; nothing is executed):

- inside `pipeline.stages`, at function precision: the build function's own source, the module-level
  functions it calls (recursively), and the modules named by its `import` statements; a module-level
  name it reads is followed to the module that defines it (a class or function), or enters by value
  (a constant such as `DEMO = "demo"`), so that a build which only reads a constant of `pipeline.config`
  does not depend on every module the config schema imports;
- beyond `pipeline.stages`, at module precision: every `import` anywhere in a module (top level or in a
  function body, lazily imported ones included) of a project module, and the `__init__` of every package
  on the way, as Python runs them.

Project modules are those whose source lies in this repository (`lease`, `pipeline`, `flows`). Third-party
packages imported along the way enter by version when they shape numbers (`NUMERIC_PACKAGES`); the others
(logging, progress bars, Prefect) do not. The record of each artifact stores the modules with their
digests and the package versions, so a reader can see why a key changed.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import inspect
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
# Import name -> distribution: the libraries whose version can change a stage's numbers or bytes.
NUMERIC_PACKAGES = {
    "torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "PIL": "pillow", "timm": "timm",
    "transformers": "transformers", "taming": "taming-transformers-rom1504", "faiss": "faiss-cpu",
    "webdataset": "webdataset", "safetensors": "safetensors", "pyarrow": "pyarrow", "scipy": "scipy",
    "torch_fidelity": "torch-fidelity",
}
DIGEST_LENGTH = 20


def read_source(path: Path) -> bytes:
    """A module's source bytes (one place, so that tests can stand in an edited file)."""
    return path.read_bytes()


# --------------------------------------------------------------------------------- module graph


@functools.lru_cache(maxsize=None)
def module_path(module: str) -> Path | None:
    """The source file of a project module (a package of this repository), or None for any other.

    Found on disk, not by importing: parsing the graph must not run the code it describes.
    """
    parts = module.split(".")
    if not (REPO / parts[0] / "__init__.py").is_file():
        return None
    base = REPO.joinpath(*parts)
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imported_names(tree: ast.AST, package: str) -> set[str]:
    """Every module an `import` statement in `tree` can load, parents included (`a.b.c` → a, a.b, a.b.c).

    `from a.b import c` names `a.b.c` too: `c` may be a submodule (it is dropped later if it is not).
    """
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module or "", node.level, package)
            found = [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
        else:
            continue
        for name in found:
            parts = name.split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


def _absolute(module: str, level: int, package: str) -> str:
    if level == 0:
        return module
    base = package.rsplit(".", level - 1)[0] if level > 1 else package
    return f"{base}.{module}" if module else base


@functools.lru_cache(maxsize=None)
def _parsed(module: str) -> ast.Module:
    path = module_path(module)
    assert path is not None
    return ast.parse(read_source(path), filename=str(path))


def _package_of(module: str) -> str:
    path = module_path(module)
    return module if path is not None and path.name == "__init__.py" else module.rpartition(".")[0]


def module_imports(module: str) -> tuple[set[str], set[str]]:
    """(project modules, third-party top-level names) that `module`'s import statements name."""
    names = _imported_names(_parsed(module), _package_of(module))
    return _split(names)


def _split(names: set[str]) -> tuple[set[str], set[str]]:
    project = {name for name in names if module_path(name) is not None}
    third = {name.split(".")[0] for name in names - project
             if name.split(".")[0] not in sys.stdlib_module_names and module_path(name.split(".")[0]) is None}
    return project, third


def module_closure(modules: set[str]) -> tuple[set[str], set[str]]:
    """Project modules reachable from `modules` through imports, and the third-party names on the way."""
    seen, third, todo = set(), set(), list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        project, outside = module_imports(module)
        third |= outside
        todo.extend(project - seen)
    return seen, third


# ---------------------------------------------------------------------- the build function's part


def _function_body(fn: Callable) -> list[ast.stmt]:
    """The statements of `fn`'s body: its annotations (types, not code that runs) are left out."""
    definition = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    assert isinstance(definition, (ast.FunctionDef, ast.AsyncFunctionDef))
    return definition.body


def function_dependencies(fn: Callable) -> tuple[dict[str, str], set[str], dict[str, str]]:
    """What `fn` (a function of `pipeline.stages`) runs: (its and its same-module helpers' sources by
    qualified name, the project or third-party modules they import or read names from, constants read
    by value)."""
    home = fn.__module__
    sources: dict[str, str] = {}
    modules: set[str] = set()
    constants: dict[str, str] = {}
    todo = [fn]
    while todo:
        current = todo.pop()
        name = f"{home}.{current.__name__}"
        if name in sources:
            continue
        sources[name] = inspect.getsource(current)
        body = ast.Module(body=_function_body(current), type_ignores=[])
        modules |= _imported_names(body, home.rpartition(".")[0])
        for node in ast.walk(body):
            if not (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)):
                continue
            value = current.__globals__.get(node.id)
            if value is None:
                continue
            if inspect.isfunction(value) and value.__module__ == home:
                todo.append(value)
            elif inspect.isfunction(value) or inspect.isclass(value):
                modules.add(value.__module__)
            elif inspect.ismodule(value):
                modules.add(value.__name__)
            elif isinstance(value, (str, int, float, bool, tuple, frozenset)):
                constants[f"{home}.{node.id}"] = repr(value)
    return sources, modules, constants


@functools.lru_cache(maxsize=None)
def code_identity(fn: Callable) -> dict[str, Any]:
    """{"functions": source digests of the build function and its helpers, "modules": digest of every
    project module it imports, transitively, "constants", "packages": versions of the numeric
    libraries on the way}. Its digest is the stage's code version."""
    sources, named, constants = function_dependencies(fn)
    project, third = _split(named)
    modules, more_third = module_closure(project)
    packages = {name: _version(NUMERIC_PACKAGES[name]) for name in sorted((third | more_third) & set(NUMERIC_PACKAGES))}
    return {"functions": {name: _sha(text.encode()) for name, text in sorted(sources.items())},
            "modules": {name: _sha(read_source(module_path(name))) for name in sorted(modules)},
            "constants": dict(sorted(constants.items())), "packages": packages}


def combined_identity(fns: tuple[Callable, ...]) -> dict[str, Any]:
    """`code_identity` of several functions that build one artifact, as one."""
    parts = [code_identity(fn) for fn in fns]
    return {section: dict(sorted(kv for part in parts for kv in part[section].items()))
            for section in ("functions", "modules", "constants", "packages")}


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:DIGEST_LENGTH]


def clear_caches() -> None:
    """Forget parsed sources and identities (after source files changed in this process)."""
    for cached in (module_path, _parsed, code_identity):
        cached.cache_clear()
