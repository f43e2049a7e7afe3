"""Fixtures for tests against the running box (tools/box/box.py): Slurm, munge, registry.

The session fixture ``box`` starts the box once, with ``box.py up``, unless it already runs
with the current configuration (a cheap check through pid files, ``sinfo`` and the
registry). It never stops the box: CI tears it down with ``make box-down``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
BOX_PY = CHECKOUT / "tools" / "box" / "box.py"


def load_box_module() -> ModuleType:
    """tools/box/box.py as a module (it is a script, not a package)."""
    if "shifter_box" in sys.modules:
        return sys.modules["shifter_box"]
    spec = importlib.util.spec_from_file_location("shifter_box", BOX_PY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["shifter_box"] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Box:
    """Where the running box is, for tests."""

    checkout: Path
    root: Path
    slurm_conf: Path
    plugstack_conf: Path
    shifter_config: Path
    image_path: Path
    log_dir: Path
    registry: str  # host:port of the box registry (plain http)
    nodes: tuple[str, ...]
    users: tuple[str, ...]
    group: str
    module: ModuleType  # box.py itself, for its helpers (node_states, registry_catalog ...)

    def slurm_env(self) -> dict[str, str]:
        """An environment for Slurm client commands run as root."""
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf)}


@pytest.fixture(scope="session")
def box() -> Box:
    """The running box; started once per session if it is not up."""
    if os.geteuid() != 0:
        pytest.skip("the box needs root (it starts munge and Slurm)")
    module = load_box_module()
    paths = module.PATHS
    if not module.is_up(paths):
        proc = subprocess.run(
            [sys.executable, str(BOX_PY), "up"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if not module.is_up(paths):
            pytest.fail(
                f"box.py up exited {proc.returncode} and the box is not up:\n{proc.stderr[-6000:]}",
                pytrace=False,
            )
        if proc.returncode != 0:
            # The box runs but something optional (a test image) failed: tests that need it
            # fail on their own; say why here once.
            print(f"box.py up exited {proc.returncode}:\n{proc.stderr[-3000:]}", file=sys.stderr)
    return Box(
        checkout=CHECKOUT,
        root=paths.root,
        slurm_conf=paths.slurm_conf,
        plugstack_conf=paths.plugstack_conf,
        shifter_config=paths.shifter_yaml,
        image_path=paths.images,
        log_dir=paths.log,
        registry=module.REGISTRY_ADDR,
        nodes=tuple(module.NODES),
        users=tuple(module.USERS),
        group=module.GROUP,
        module=module,
    )


@pytest.fixture(autouse=True)
def no_job_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test on the box, cancel the jobs it left (a hang, a timeout) so that one
    failure does not take the nodes of every test after it."""
    yield
    if "box" not in request.fixturenames:
        return
    from .slurm import cancel_leftover_jobs

    left = cancel_leftover_jobs()
    if left:
        print(f"cancelled jobs left by {request.node.nodeid}: {left}", file=sys.stderr)
