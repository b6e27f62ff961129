"""The house rules, checked on the source: imports run one way, no private pytest API, small modules.

Layers, bottom to top (a module may import its own layer and the ones below, never above):
matrix/options → probes/prediction → backends → workload → records → verdicts/search/ceiling/harness →
report → plugin/recorder.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pytest_gpucap"
MAX_LINES = 520

#: Module (or package) → layer. Helpers sit at the lowest layer that uses them.
LAYERS = {
    "matrix": 0, "budgets": 0, "options": 0, "files": 0, "promtext": 0, "hookspec": 0, "__init__": 9, "__main__": 9,
    "probes": 1, "safety": 1, "prediction": 1, "modelgen": 1, "mmprojgen": 1, "hfmodel": 1,
    "backends": 2,
    "workload": 3,
    "records": 4, "record_sections": 4, "record_calibration": 4,
    "verdicts": 5, "search": 5, "search_boot": 5, "ceiling": 5, "harness": 5,
    "report": 6, "compare": 6, "terminal": 6, "provenance": 6, "benchmarks": 6,
    "plugin": 7, "report_props": 7, "recorder": 7, "resolve": 7, "search_run": 7, "xdist_groups": 7,
    "nvml": 0,  # issue 10 (part B): the thin NVML adapter and the logic above it (stdlib only)
    "hostspec": 0,  # issue 11: services and co-tenants a profile declares
    "services": 1,  # issue 11: stop and restore production services, the state file
    "cotenants": 2,  # issue 11: co-tenants on the process core, their memory
    "host_section": 6,  # issue 11: the write-up's host-routine section
    "host_routine": 7,  # issue 11: the session's host routine (plugin object)
    "pinning": 0, "strict": 7, "predict_mode": 7,  # issue 10
    "record_depth": 4, "record_config_verdict": 4, "depth": 5, "capacity_verdict": 5,  # issue 12 (part B)
    "record_base": 4, "record_agents": 4,  # issue 12: the section mechanism; agents' per-turn cache table
    "repeat": 5,  # issue 14: --gpucap-repeat, the median run and the spread of repeated workloads
    "search_space": 0, "record_search": 4, "search_boundary": 5, "search_known": 5, "search_checks": 5,  # issue 12
    "ramp_sections": 4,  # issue 12 (part E): the ramp record's steps and the evidence for its limit
    "load_keys": 0, "record_vision": 4, "record_burst": 4, "vision": 5, "burst": 5,  # issue 12 (A): images, burst
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _top(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level pytest_gpucap module) of every import, resolving relative imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(PACKAGE).with_suffix("").parts
    package = list(rel[:-1]) if rel[-1] != "__init__" else list(rel[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts[0]] if parts else [a.name for a in node.names]
            elif node.module and node.module.startswith("pytest_gpucap"):
                parts = node.module.split(".")[1:]
                names = [parts[0]] if parts else [a.name for a in node.names]
            else:
                continue
            out += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[1]) for a in node.names
                    if a.name.startswith("pytest_gpucap.")]
    return out


def test_every_module_has_a_layer() -> None:
    assert sorted({_top(p) for p in _modules()} - set(LAYERS)) == []


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path: Path) -> None:
    mine = LAYERS[_top(path)]
    upward = [f"line {line}: imports {name} (layer {LAYERS.get(name)}) from layer {mine}"
              for line, name in _imports(path) if name in LAYERS and LAYERS[name] > mine]
    assert not upward, upward


def test_backends_know_nothing_above_them() -> None:
    bad = [f"{p.name}:{line} {name}" for p in (PACKAGE / "backends").glob("*.py")
           for line, name in _imports(p) if name in ("workload", "report", "search", "records")]
    assert not bad, bad


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_pytest_api_and_no_grab_bag(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    private = [n.lineno for n in ast.walk(tree)
               if (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("_pytest"))
               or (isinstance(n, ast.Import) and any(a.name.startswith("_pytest") for a in n.names))
               or (isinstance(n, ast.Attribute) and n.attr in ("_tmp_path_factory", "_tmppath_factory"))]
    assert not private, f"private pytest API at lines {private}"
    assert len(text.splitlines()) <= MAX_LINES, f"{len(text.splitlines())} lines"
