"""What the plugin's hooks import: each Slurm process that runs one pays for it (a prolog
and an epilog per node per job, a slurmstepd per step), so the heavy libraries of other
paths stay out of them."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("oras", "requests", "jsonschema", "httpx", "starlette", "uvicorn")


@pytest.mark.parametrize(
    "module",
    ["shifter_core.slurm.jobscript", "shifter_core.slurm.stepd", "shifter_core.slurm.container"],
)
def test_hooks_import_no_heavy_library(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"print(' '.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == [], f"{module} imports {loaded} (import them where they are needed)"
