"""The package's layering: what each part of diffvision may import, and what importing it costs."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffvision"

# Each part and the parts of diffvision it may import. attention/ is the base; models/ (timm), diffusion/
# (diffusers) and metrics/ are peers that share only the attention and the top-level helpers.
ALLOWED = {
    "attention": {"choices"},
    "models": {"attention", "checkpoints", "choices"},
    "diffusion": {"attention", "checkpoints", "choices"},
    "metrics": {"checkpoints", "choices"},
    "data": {"choices"},
}


def imported_parts(path: Path) -> set[str]:
    """The top-level parts of diffvision that ``path`` imports (absolute or relative imports)."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                # ``__init__`` counts as a module part, so one rule resolves packages and plain modules
                target = list(module[:-node.level]) + (node.module.split(".") if node.module else [])
                names = [target + [alias.name] for alias in node.names] if len(target) == 1 else [target]
            elif node.module and node.module.split(".")[0] == "diffvision":
                target = node.module.split(".")
                names = [target + [alias.name] for alias in node.names] if len(target) == 1 else [target]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names if a.name.split(".")[0] == "diffvision"]
        else:
            continue
        parts.update(n[1] for n in names if len(n) > 1 and n[0] == "diffvision")
    return parts


@pytest.mark.parametrize("part", list(ALLOWED))
def test_each_part_imports_only_what_it_may(part):
    offences = {}
    for path in sorted((PACKAGE / part).rglob("*.py")) if (PACKAGE / part).is_dir() else [PACKAGE / f"{part}.py"]:
        extra = imported_parts(path) - ALLOWED[part] - {part}
        if extra:
            offences[str(path.relative_to(PACKAGE))] = sorted(extra)
    assert not offences, f"imports beyond {sorted(ALLOWED[part])}: {offences}"


def test_the_import_check_sees_relative_and_absolute_imports():
    assert {"attention", "checkpoints"} <= imported_parts(PACKAGE / "models" / "diff_vit.py")  # from ..x import
    assert "checkpoints" in imported_parts(PACKAGE / "diffusion" / "transformer_diff_dit.py")  # from diffvision.x
    assert "models" in imported_parts(PACKAGE / "__init__.py")  # from . import models


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_importing_the_attention_imports_neither_diffusers_nor_lightning():
    out = run_python("import sys, diffvision.attention as a; a.differential_attention; "
                     "print(sorted(m for m in ('diffusers', 'lightning') if m in sys.modules))")
    assert out == "[]"


def test_import_diffvision_registers_timm_models_and_loads_diffusers_on_first_use():
    out = run_python("import sys, timm, diffvision; print('diffusers' in sys.modules, "
                     "timm.is_model('diff_vit_tiny_patch4_32')); diffvision.DiffDiTPipeline; "
                     "print('diffusers' in sys.modules)")
    assert out.split() == ["False", "True", "True"]
    with pytest.raises(subprocess.CalledProcessError) as err:
        run_python("import diffvision; diffvision.DiffDiTPipelin")
    assert "has no attribute 'DiffDiTPipelin'" in err.value.stderr


def test_the_command_and_the_classifier_start_without_diffusers():
    # diffusers costs ~0.7 s of every `diffvision` call; DiffusionModule (and with it diffusers) loads when named
    out = run_python("import sys, diffvision.cli, diffvision.lightning as L; print('diffusers' in sys.modules); "
                     "L.DiffusionModule; print('diffusers' in sys.modules)")
    assert out.split() == ["False", "True"]
