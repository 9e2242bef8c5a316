"""The architecture as the imports see it: the wall between the stages, and dvc.yaml's deps.

Stage two must never import stage-one code or ``transformers`` (it trains from the store alone), and
each DVC stage must depend on every file it really imports, or a change there would not rerun it.
Imports are read from the source (top-level and inside functions), not from a running interpreter.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGE_ONE = "pipeline.extraction"
BACKBONE_LIBRARIES = ("transformers", "datasets", "sentencepiece")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path, source: str | None = None) -> set[str]:
    """Every absolute module name an import statement in this file names (with its parent packages)."""
    names: set[str] = set()
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in found:
            parts = name.split(".")
            names.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return names


def closure(start: Path) -> tuple[set[Path], set[str]]:
    """Repository files reachable from ``start`` by imports, and every external top-level module named."""
    seen: set[Path] = set()
    external: set[str] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path):
            target = module_file(name)
            if target is not None:
                todo.append(target)
            elif name.split(".")[0] not in ("pipeline", "stages"):
                external.add(name.split(".")[0])
    return seen, external


def package_modules(package: str) -> list[Path]:
    return sorted(REPO.joinpath(*package.split(".")).rglob("*.py"))


@pytest.mark.parametrize("package", ["pipeline.common", "pipeline.store", "pipeline.training"])
def test_stage_two_and_the_store_never_reach_stage_one(package):
    for path in package_modules(package):
        files, external = closure(path)
        reached = sorted(module_name(f) for f in files if module_name(f).startswith(STAGE_ONE))
        assert not reached, f"{module_name(path)} imports stage-one code: {reached}"
        heavy = sorted(external & set(BACKBONE_LIBRARIES))
        assert not heavy, f"{module_name(path)} imports {heavy}: only {STAGE_ONE} may"


def test_only_stage_one_imports_the_backbone_libraries():
    for path in package_modules("pipeline"):
        direct = {name.split(".")[0] for name in imported_names(path)}
        if direct & set(BACKBONE_LIBRARIES):
            assert module_name(path).startswith(STAGE_ONE), f"{module_name(path)} imports {direct & set(BACKBONE_LIBRARIES)}"


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", ["extract", "train", "report"])
def test_dvc_deps_cover_every_file_the_stage_imports(stage):
    spec = dvc_stages()[stage]
    spec = spec.get("do", spec)
    deps = [REPO / d for d in spec["deps"] if isinstance(d, str) and "${" not in d]
    files, _ = closure(REPO / "stages" / f"{stage}.py")

    def covered(path: Path) -> bool:
        return any(path == dep or dep in path.parents for dep in deps)

    missing = sorted(str(f.relative_to(REPO)) for f in files if not covered(f))
    assert not missing, f"dvc.yaml stage {stage!r} imports files its deps do not name: {missing}"
    stale = sorted(str(d.relative_to(REPO)) for d in deps if not d.exists() and "data" not in d.parts)
    assert not stale, f"dvc.yaml stage {stage!r} depends on paths that do not exist: {stale}"


def test_the_wall_check_sees_function_level_and_relative_imports():
    """The closure follows imports inside functions (where this project puts heavy ones) and relative ones."""
    path = REPO / "pipeline" / "training" / "trainer.py"
    source = "def f():\n    from pipeline.extraction.backbones import load_backbone\nfrom ..extraction import stage\n"
    names = imported_names(path, source)
    assert {"pipeline.extraction.backbones", "pipeline.extraction.stage"} <= names
