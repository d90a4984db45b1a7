"""The package's layers hold: no module imports from a layer above its own, and none imports
the package face (`gatesim/__init__.py`) to reach a sibling.

Read from the source with `ast`, so imports inside functions count too. The layers, bottom
to top (README.md, "Layout"):

  core       bit formats, rounding, fused updates, checks, statistics helpers
  executor   serial / process pool / Ray cells; beneath every front-end
  optim      emulated optimizers and precision policies
  metrics    the papers' metrics
  diff       checkpoint diff (built on metrics)
  sim        the gate simulation and its claims
  tracking   live tracking of a training run
  lab        the network lab (uses diff, metrics, optim, tracking)
  cli        command-line front-ends; nothing below them imports them
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "gatesim"

LAYER_RANK = {
    "core": 0,
    "executor": 1,
    "optim": 2,
    "metrics": 2,
    "diff": 3,
    "sim": 4,
    "tracking": 4,
    "lab": 5,
    "cli": 6,
}

# Top-level modules of gatesim/ and the layer each sits in; packages map by their folder.
MODULE_LAYER = {
    "formats": "core",
    "_version": "core",
    "precision": "core",
    "_ops": "core",
    "checks": "core",
    "integrity": "core",
    "update": "core",
    "weights": "core",
    "reference": "core",
    "stats": "core",
    "testing": "core",
    "executor": "executor",
    "ray_executor": "executor",
    "optim": "optim",
    "policy": "optim",
    "claims": "sim",
    "shadow": "optim",
    "stat_layout": "core",
    "tracking": "tracking",
    "metrics": "metrics",
    "restrict": "metrics",
    "diff": "diff",
    "sim": "sim",
    "lab": "lab",
    "cli": "cli",
    "__main__": "cli",
}

def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(modname: str) -> str | None:
    parts = modname.split(".")
    if parts[0] != "gatesim" or len(parts) == 1:
        return None
    if len(parts) >= 3 and parts[2] == "cli":
        return "cli"  # gatesim.diff.cli, gatesim.lab.cli: command-line front-ends
    return MODULE_LAYER.get(parts[1])


def imports_of(path: Path, here: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node.lineno, alias.name, []))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target, [a.name for a in node.names]))
    return found


def all_modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in all_modules()
               if module_name(p) != "gatesim" and layer_of(module_name(p)) is None]
    assert not missing, f"modules without a layer in tests/test_layers.py: {missing}"


def _is_submodule(name: str) -> bool:
    return ((PKG / f"{name}.py").exists() or (PKG / name / "__init__.py").exists()
            or any(PKG.glob(f"{name}.*.so")))  # the compiled extension, gatesim._C


def layer_problems(path: Path, here: str) -> list[str]:
    """Every import in `path` (module `here`) that goes against the layers."""
    here_layer = layer_of(here)
    problems = []
    for line, target, names in imports_of(path, here):
        if target == "gatesim":
            # `import gatesim` or `from gatesim import X` reaches through the package face,
            # unless X is itself a submodule (then the import is of that module)
            face = [n for n in names if not _is_submodule(n)] if names else ["gatesim"]
            if face:
                problems.append(f"line {line}: imports {face} from the package face")
            targets = [f"gatesim.{n}" for n in names if _is_submodule(n)]
        elif target.startswith("gatesim."):
            targets = [target]
        else:
            continue
        for t in targets:
            there = layer_of(t)
            if there is None or here_layer is None:
                continue
            if there == "cli" and here_layer != "cli":
                problems.append(f"line {line}: imports the command line ({t})")
            elif LAYER_RANK[there] > LAYER_RANK[here_layer]:
                problems.append(f"line {line}: {here_layer} imports {t} ({there}, a layer above)")
            elif LAYER_RANK[there] == LAYER_RANK[here_layer] and there != here_layer:
                problems.append(f"line {line}: {here_layer} imports {t} ({there}, a sibling layer)")
    return problems


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: module_name(p))
def test_no_import_against_the_layers(path: Path):
    here = module_name(path)
    if here in ("gatesim", "gatesim.__main__"):
        return  # the package face and the entry point gather everything
    problems = layer_problems(path, here)
    assert not problems, f"{here}:\n  " + "\n  ".join(problems)


def test_layer_check_detects_a_violation(tmp_path):
    """The checker itself bites: an upward import and a package-face import are reported,
    a downward import is not."""
    planted = tmp_path / "probe.py"
    planted.write_text("from gatesim.formats import Format\n"
                       "def f():\n    from gatesim.lab import run\n    import gatesim\n")
    problems = layer_problems(planted, "gatesim.checks")
    assert len(problems) == 2, problems
    assert "a layer above" in problems[0] and "line 3" in problems[0]
    assert "package face" in problems[1] and "line 4" in problems[1]
    assert layer_problems(planted, "gatesim.lab.run") == ["line 4: imports ['gatesim'] from the package face"]
