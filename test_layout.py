"""Tests of the repository's shape: which file may import which, and that nothing points outside it.

Run: python -m pytest -q test_layout.py

Library modules are imported; scripts are run. A script imports only library modules (never another
script), the library has no import cycle, and router_triton.py (the fused kernel) and router_cpu.py (the C++
kernel's binding) import nothing from the project, so that each can be read, tested and replaced on its own.
"""
import ast
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBRARY = {"model", "router", "router_triton", "router_cpu", "data", "flow", "checkpoint", "plot", "study_tables"}
SCRIPTS = {"train", "sample", "fid", "diagnose", "bench", "study", "distill"}


def project_imports(path):
    """The project modules a file imports (at any depth: module level or inside functions)."""
    own = {p.stem for p in HERE.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & own


def test_every_file_is_a_library_module_a_script_or_a_test():
    stems = {p.stem for p in HERE.glob("*.py")}
    unknown = {s for s in stems if s not in LIBRARY | SCRIPTS and not s.startswith("test_") and s != "conftest"}
    assert not unknown, f"classify these as library or script in test_layout.py: {sorted(unknown)}"


def test_scripts_import_only_library_modules():
    for script in sorted(SCRIPTS):
        path = HERE / f"{script}.py"
        if path.exists():
            assert project_imports(path) <= LIBRARY, f"{script}.py imports {sorted(project_imports(path) - LIBRARY)}"


def test_library_has_no_import_cycle_and_the_kernel_stands_alone():
    graph = {name: project_imports(HERE / f"{name}.py") for name in LIBRARY}
    assert all(deps <= LIBRARY for deps in graph.values()), graph
    assert graph["router_triton"] == graph["router_cpu"] == set()

    def reaches(start, target, seen=()):
        return any(dep == target or (dep not in seen and reaches(dep, target, seen + (dep,))) for dep in graph[start])
    cycles = [name for name in LIBRARY if reaches(name, name)]
    assert not cycles, f"import cycle through {sorted(cycles)}: {graph}"


def tracked_text_files():
    return [p for p in HERE.rglob("*") if p.suffix in {".py", ".md"} and not {".git", "results"} & set(p.parts)
            and p.name != "test_layout.py"]


def test_nothing_points_outside_the_repository():
    """The method is described in docs/method.md; no file refers to the team's notes, its issue tracker or
    throwaway files outside the repository."""
    outside = re.compile(r"\bSPEC\b|shared/|\bissue \d+|/tmp/")
    offenders = {str(p.relative_to(HERE)): outside.findall(p.read_text()) for p in tracked_text_files()}
    assert not {k: v for k, v in offenders.items() if v}, "these files point outside the repository"


def test_every_relative_markdown_link_resolves():
    broken = []
    for page in (p for p in tracked_text_files() if p.suffix == ".md"):
        for target in re.findall(r"\]\(([^)#\s]+)[^)]*\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(HERE)} -> {target}")
    assert not broken, broken
