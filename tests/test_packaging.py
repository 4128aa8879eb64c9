"""Packaging: pyproject.toml declares exactly what radfed imports, every module imports, and no import circle.

A package that arrives only through another one's dependencies (pydantic, rich and cryptography came through
flwr) breaks the day that one drops it; so the dependency lists are checked against the source, parsed with
``ast`` (imports inside functions included), not against what happens to be installed.
"""

from __future__ import annotations

import ast
import functools
import graphlib
import importlib
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_PACKAGES = ("common", "client", "server", "radfed", "deploy")  # what the wheel ships
DEV_DIRS = ("tests", "bench")  # not shipped: their extra needs go to the `test` extra


def normalise(name: str) -> str:
    """A distribution name in PEP 503 form, so 'PyYAML', 'pyyaml' and 'py_yaml' compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    """'flwr[simulation]==1.42.0' -> 'flwr' (normalised)."""
    match = re.match(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)", spec)
    assert match, f"cannot read a distribution name from requirement {spec!r}"
    return normalise(match.group(1))


def declared(extra: str | None = None) -> set[str]:
    """The runtime dependencies, or those of one extra, as normalised names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {requirement_name(spec) for spec in specs}


def python_files(root: Path, dirs: Iterable[str]) -> list[Path]:
    return sorted(path for d in dirs for path in (root / d).rglob("*.py") if "__pycache__" not in path.parts)


def all_imports(path: Path) -> set[str]:
    """Top-level names of every absolute import anywhere in the file, inside functions and try blocks too."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


@functools.cache
def distributions_of() -> dict[str, list[str]]:
    """Import name -> the installed distributions providing it."""
    return importlib.metadata.packages_distributions()


def undeclared_imports(files: Iterable[Path], first_party: set[str], allowed: set[str]) -> dict[str, list[str]]:
    """Third-party import names none of whose distributions is in ``allowed`` -> the files importing them."""
    found: dict[str, list[str]] = {}
    for path in files:
        for name in all_imports(path):
            if name in sys.stdlib_module_names or name in first_party or name == "__future__":
                continue
            dists = {normalise(d) for d in distributions_of().get(name, [])}
            if not dists & allowed:
                found.setdefault(f"{name} (from {', '.join(sorted(dists)) or 'no installed distribution'})",
                                 []).append(str(path.relative_to(ROOT)))
    return found


def test_runtime_imports_are_declared() -> None:
    """Every third-party package common/ client/ server/ radfed/ deploy/ import is in [project.dependencies]."""
    missing = undeclared_imports(python_files(ROOT, RUNTIME_PACKAGES), set(RUNTIME_PACKAGES), declared())
    assert not missing, f"imported by radfed but not declared in [project.dependencies]: {missing}"


def test_every_runtime_dependency_is_imported() -> None:
    """[project.dependencies] holds nothing the runtime packages do not import (test-only packages such as
    scikit-learn belong in the `test` extra, not in every site's install)."""
    imported = set().union(*(all_imports(p) for p in python_files(ROOT, RUNTIME_PACKAGES)))
    provided = {normalise(dist) for name in imported for dist in distributions_of().get(name, [])}
    unused = declared() - provided
    assert not unused, f"declared in [project.dependencies] but imported by no runtime module: {sorted(unused)}"


def test_tests_and_bench_imports_are_declared() -> None:
    """tests/ and bench/ need nothing beyond the runtime dependencies and the `test` extra."""
    files = python_files(ROOT, DEV_DIRS)
    # tests import each other by file name (pytest puts tests/ on sys.path)
    first_party = set(RUNTIME_PACKAGES) | set(DEV_DIRS) | {p.stem for p in files}
    missing = undeclared_imports(files, first_party, declared() | declared("test"))
    assert not missing, f"imported by tests/ or bench/ but declared nowhere: {missing}"


def test_import_scan_sees_imports_in_functions_and_try_blocks(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("import os.path\nfrom . import sibling\n"
                      "try:\n    import alpha.sub\nexcept ImportError:\n    pass\n"
                      "def f():\n    from beta.x import y\n    return y\n", encoding="utf-8")
    assert all_imports(source) == {"os", "alpha", "beta"}  # the relative import is first-party


def test_requirement_names_are_normalised() -> None:
    assert requirement_name("flwr[simulation]==1.42.0") == "flwr"
    assert requirement_name("PyYAML>=6.0") == requirement_name("pyyaml") == "pyyaml"
    assert requirement_name("pyradiomics_bhklab==3.1.4") == "pyradiomics-bhklab"
    assert "scikit-learn" not in declared() and "scikit-learn" in declared("test")


def module_names(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages."""
    modules = {}
    for path in python_files(root, packages):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _executed_imports(nodes: Iterable[ast.AST]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports that run when the module is imported: not those in function bodies (they run when the
    function is called) nor under ``if TYPE_CHECKING:``; class bodies and try/if blocks do run."""
    for node in nodes:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        elif isinstance(node, ast.If) and _type_checking(node.test):
            yield from _executed_imports(node.orelse)
        else:
            yield from _executed_imports(child for child in ast.iter_child_nodes(node)
                                         if isinstance(child, ast.stmt | ast.excepthandler | ast.match_case))


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports at module level."""
    modules = module_names(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _executed_imports(ast.parse(path.read_text(encoding="utf-8"), str(path)).body):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            if node.level:  # relative: from the importing module's package, one level up per extra dot
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return list(reversed(exc.args[1]))  # graphlib lists it against the import direction
    return None


def test_first_party_imports_have_no_cycle() -> None:
    """A circle works only as long as nobody reorders an import; client.site <-> client.importers was one."""
    graph = import_graph(ROOT, (*RUNTIME_PACKAGES, "bench"))
    assert "client.cases" in graph["client.importers"] and "client.importers" in graph["client.site"]
    cycle = import_cycle(graph)
    assert cycle is None, f"import circle among radfed's modules: {' -> '.join(cycle)}"


def test_cycle_check_names_a_circle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "a.py").write_text("from pkg.b import x\n", encoding="utf-8")
    (pkg / "b.py").write_text("from . import c\nx = 1\n", encoding="utf-8")
    (pkg / "c.py").write_text("import pkg.a\n", encoding="utf-8")
    (pkg / "d.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.e\n"
                              "def f():\n    import pkg.e\n", encoding="utf-8")
    (pkg / "e.py").write_text("import pkg.d\n", encoding="utf-8")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.d"] == set()  # function-level and TYPE_CHECKING imports do not count
    cycle = import_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"pkg.a", "pkg.b", "pkg.c"}
    for importer, imported in zip(cycle, cycle[1:], strict=False):
        assert imported in graph[importer]


def test_site_reexports_the_case_types() -> None:
    """The rest of radfed imports Case, CaseProblem, SiteError and DIAGNOSES from client.site."""
    import client.cases
    import client.site

    for name in ("Case", "CaseProblem", "SiteError", "DIAGNOSES"):
        assert getattr(client.site, name) is getattr(client.cases, name)


# `python -m deploy` modules run their program when imported
RUNTIME_MODULES = sorted(name for name in module_names(ROOT, RUNTIME_PACKAGES) if not name.endswith("__main__"))


@pytest.mark.parametrize("module", RUNTIME_MODULES)
def test_runtime_module_imports(module: str) -> None:
    assert importlib.import_module(module).__name__ == module


def test_the_app_bundle_holds_the_app_only_whatever_lies_beside_it() -> None:
    """A coordinator who keeps site folders, caches or runs inside the project folder still sends a bundle of the
    app's code and profiles only (pyproject [tool.flwr.app] fab-include), well under Flower's 10 MiB limit."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_files

    files: dict[str, Path | bytes] = {"pyproject.toml": ROOT / "pyproject.toml"}
    for part in ("common", "client", "server", "radfed", "deploy", "tests", "bench", "docs"):
        for path in (ROOT / part).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                files[path.relative_to(ROOT).as_posix()] = path
    noise = b"[" + b"0.5," * 3_000_000 + b"0]"  # 12 MB of a cached feature table: alone above the limit
    files |= {"data/hospital-a/site.yaml": b"name: hospital-a\n", "data/hospital-a/.radfed/cache/a.json": noise,
              "runs/20260101-run1/metrics.json": b"{}", "data/hospital-a/manifest.csv": b"case_id\n"}
    fab, _ = build_fab_from_files(files)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert len(fab) < 2_000_000
    top = {n.split("/")[0] for n in names}
    assert top == {".info", "pyproject.toml", "common", "client", "server"}, top
    assert "server/app.py" in names and "client/app.py" in names and "common/profiles/default.yaml" in names
    code = {p.relative_to(ROOT).as_posix() for part in ("common", "client", "server")
            for p in (ROOT / part).rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts}
    assert code <= set(names)  # everything the plan's code hash covers travels

def test_the_staged_app_bundles_the_same_fab_without_its_virtualenv(tmp_path: Path) -> None:
    """radfed.launch runs `flwr run` from a copy of the app holding only what Flower bundles: the FAB is byte for
    byte the one Flower builds from the app folder itself, and the copy has no .venv for Flower to walk."""
    from flwr.cli.build import build_fab_from_disk

    from radfed.launch import staged_app

    app = tmp_path / "radfed"
    (app / "client" / "__pycache__").mkdir(parents=True)
    (app / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text(encoding="utf-8"), encoding="utf-8")
    (app / "client" / "app.py").write_text("x = 1\n")
    (app / "client" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\0")
    (app / "client" / "profile.yaml").write_text("a: 1\n")
    (app / "common" / "profiles").mkdir(parents=True)  # one file for each of the app's fab-include patterns
    (app / "common" / "plan.py").write_text("z = 3\n")
    (app / "common" / "profiles" / "default.yaml").write_text("b: 2\n")
    (app / "server").mkdir()
    (app / "server" / "app.py").write_text("w = 4\n")
    (app / "docs").mkdir()
    (app / "docs" / "notes.md").write_text("# notes\n")
    (app / "docs" / "scan.nii.gz").write_bytes(b"\x1f\x8b")  # data: never bundled
    (app / "docs" / "link.py").symlink_to(app / "client" / "app.py")  # Flower skips symlinks
    (app / "LICENSE").write_text("Apache-2.0\n")
    for i in range(50):  # a virtualenv inside the app folder: Flower walks it and bundles none of it
        (app / ".venv" / "lib" / f"pkg{i}").mkdir(parents=True)
        (app / ".venv" / "lib" / f"pkg{i}" / "mod.py").write_text("y = 2\n")
    staged = staged_app(app, tmp_path / "stage")
    assert not (staged / ".venv").exists() and not (staged / "docs" / "scan.nii.gz").exists()
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)
