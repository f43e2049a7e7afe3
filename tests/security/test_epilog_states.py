"""The epilog always succeeds and leaves nothing, from every state a crashed or partial
prolog, step or earlier epilog can leave (a hypothesis state machine over real mounts).

Each rule adds to one job's directory what a real crash leaves there: a prolog
(:func:`prepare_job`) or a shared root (:func:`prepare_step_root`) killed at its N-th mount
(``os._exit`` in a forked child, so no clean-up of its own runs), an epilog killed at its
N-th unmount, a user's volume still bind-mounted, links that point out of the directory,
files root never wrote. At the end the real epilog runs: it must return no problem, leave
no directory, mount or loop device, and never touch what a link or a volume points to.
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from shifter_core import config as config_module
from shifter_core import syscalls
from shifter_core.runtime import privileged
from shifter_core.slurm import jobscript as prolog
from shifter_core.slurm import stepd as steps
from tests.integration.test_runtime_privileged import make_plan
from tests.integration.test_runtime_support import (  # noqa: F401 - fixture 'rt'
    host_mounts_with,
    loop_devices_of,
    runtime_fixture,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")

NODE = "n1"
ALICE = 1001
_jobs = itertools.count(1)


def _crash_at(function_name: str, limit: int, action) -> None:
    """Run ``action`` in a forked child that dies (no clean-up) at its ``limit``-th call of
    ``syscalls.<function_name>``, as a prolog or epilog killed by a signal would."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            real = getattr(syscalls, function_name)
            calls = itertools.count()

            def dying(*args, **kwargs):
                if next(calls) >= limit:
                    os._exit(9)
                return real(*args, **kwargs)

            setattr(syscalls, function_name, dying)
            action()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


class EpilogStates(RuleBasedStateMachine):
    """Build a job directory in any partial state; the epilog removes it all."""

    rt = None  # set by the test

    @initialize()
    def start(self) -> None:
        rt = self.rt
        self.cfg = config_module.load(str(rt.config))
        self.job = f"{next(_jobs)}{uuid.uuid4().hex[:4]}"
        self.directory = Path(self.cfg.runtime.run_dir) / NODE / self.job
        # Nothing of a job is ever mounted below the run directory before it is a private
        # mount (every root is built after ensure_private_run_dir): a volume left mounted
        # is left there afterwards, not shadowed by that bind mount.
        privileged.ensure_private_run_dir(self.cfg.runtime.run_dir)
        self.sentinel = Path(rt.base) / f"sentinel-{self.job}"
        self.sentinel.mkdir(mode=0o755)
        (self.sentinel / "precious").write_text("the user's data\n")
        os.chown(self.sentinel, ALICE, ALICE)
        _cfg, self.plan = make_plan(
            rt, rt.testimg, volumes=(f"{self.sentinel}:/data",), command=("true",)
        )
        self.request = {
            "image_id": rt.testimg,
            "image_request": f"id:{rt.testimg}",
            "volume": f"{self.sentinel}:/data",
            "module": "",
        }

    @rule(mounts=st.integers(min_value=0, max_value=24))
    def prolog_killed(self, mounts: int) -> None:
        _crash_at(
            "mount",
            mounts,
            lambda: privileged.prepare_job(self.plan, self.cfg.runtime.run_dir, NODE, self.job),
        )

    @rule(mounts=st.integers(min_value=0, max_value=24), volume=st.booleans())
    def shared_root_killed(self, mounts: int, volume: bool) -> None:
        request = {**self.request, "volume": self.request["volume"] if volume else ""}
        _crash_at(
            "mount",
            mounts,
            lambda: steps.prepare_step_root(
                str(self.rt.config), NODE, self.job, request, ALICE, ALICE
            ),
        )

    @rule(unmounts=st.integers(min_value=0, max_value=6))
    def epilog_killed(self, unmounts: int) -> None:
        _crash_at("umount2", unmounts, lambda: prolog.epilog(self.cfg, NODE, self.job))

    @rule(where=st.sampled_from(["vol", "roots/7/root/data", "root.staging/x"]))
    def volume_left_mounted(self, where: str) -> None:
        target = self.directory / where
        target.mkdir(parents=True, exist_ok=True)
        syscalls.mount(str(self.sentinel), str(target), None, syscalls.MS_BIND)

    @rule(where=st.sampled_from(["out", "roots/out", "roots/3"]))
    def link_out(self, where: str) -> None:
        link = self.directory / where
        link.parent.mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(link):
            os.symlink(self.sentinel, link)

    @rule(
        name=st.sampled_from(["state.json", "step.marshal", "error", "roots/2/junk", "x/y/z"]),
        data=st.binary(max_size=64),
        owner=st.sampled_from([0, ALICE]),
    )
    def foreign_file(self, name: str, data: bytes, owner: int) -> None:
        path = self.directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir() or path.is_symlink():
            return
        path.write_bytes(data)
        os.chown(path, owner, owner)

    @rule()
    def fifo_and_readonly_dir(self) -> None:
        base = self.directory / "odd"
        base.mkdir(parents=True, exist_ok=True)
        if not (base / "fifo").exists():
            os.mkfifo(base / "fifo")
        base.chmod(0o500)

    @invariant()
    def sentinel_untouched(self) -> None:
        assert (self.sentinel / "precious").read_text() == "the user's data\n"

    def teardown(self) -> None:
        problems = prolog.epilog(self.cfg, NODE, self.job)
        try:
            assert problems == [], problems
            assert not os.path.lexists(self.directory)
            assert host_mounts_with(str(self.directory)) == []
            assert host_mounts_with(str(self.sentinel)) == []
            # a device attached by a prolog killed before it mounted detaches on its last
            # close (autoclear), which the kernel finishes asynchronously
            deadline = time.monotonic() + 10
            while loop_devices_of(self.rt.testimg) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert loop_devices_of(self.rt.testimg) == []
            assert (self.sentinel / "precious").read_text() == "the user's data\n"
            assert stat.S_IMODE(self.sentinel.stat().st_mode) == 0o755
            # idempotent: a second epilog finds nothing and says nothing
            assert prolog.epilog(self.cfg, NODE, self.job) == []
        finally:
            shutil.rmtree(self.sentinel, ignore_errors=True)


def test_the_epilog_removes_every_partial_state(rt):
    EpilogStates.rt = rt
    run = settings(
        max_examples=int(os.environ.get("SHIFTER_EPILOG_EXAMPLES", "30")),
        stateful_step_count=6,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )(EpilogStates).TestCase
    run().runTest()
