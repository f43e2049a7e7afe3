"""slurmstepd (remote context, every step): the root a container step's tasks enter.

The prolog prepared ``RUN_DIR/NODE/JOB/root`` once for the job and recorded what it serves
(:mod:`shifter_core.jobroot`). A step whose request has the same key enters that root; each
task, in its own mount namespace, pivots into it before slurmstepd drops to the user and
execs the command, so tasks stay children of slurmstepd (signals, accounting and PMI keep
working). A step with another image, volumes or modules enters one of the job's shared
roots (``RUN_DIR/NODE/JOB/roots/KEY``): the first step on the node that asks for it prepares
it (:func:`prepare_step_root`), the later ones find it by the same key, and the job's epilog
removes it. That holds in allocations made without ``--image`` too.

The request comes from the job's environment, which the user's srun sent: it decides only
which root to look for; a root of the step's own is built from a request checked again as
root (:mod:`.container`). This module is imported by slurmstepd for every container step:
the runtime proper is imported only for a step that needs its own root.
"""

from __future__ import annotations

import os

from ..errors import ShifterError
from .api import INFO, Spank, log, log_exception
from .names import (
    ENV_CONTAINER_STEP,
    ENV_IMAGE,
    ENV_IMAGEREQUEST,
    EXPORTED,
    JOB_CONTROL_PREFIX,
    OPT_IMAGE,
    OPT_MODULE,
    OPT_VOLUME,
    SLURM_BATCH_SCRIPT,
    request_from,
)
from .state import state

TYPE_CHECKING = False  # typing costs start-up time on this path
if TYPE_CHECKING:
    from collections.abc import Mapping


def handle_remote_option(val: int, optarg: str) -> None:
    """slurmstepd replays the job's options (twice, last value only).

    Values are kept as given: the submission side checked them, and the step only passes
    them on; code that acts on them as root parses them again.
    """
    if val == OPT_IMAGE:
        state.image = optarg
    elif val == OPT_VOLUME:
        state.volumes = [optarg]
    elif val == OPT_MODULE:
        state.modules = optarg


def hook_user_init(spank: Spank) -> None:
    """A step starts on a node: its tasks see the request; a container step finds its root."""
    if state.image is None:
        return
    for name in EXPORTED:
        # The job-control copy survives sbatch --export=NONE; the task's own wins.
        if spank.getenv(name) is None:
            value = spank.getenv(JOB_CONTROL_PREFIX + name)
            if value is not None:
                spank.setenv(name, value)
    job, step = spank.item_u32("S_JOB_ID"), spank.item_u32("S_JOB_STEPID")
    node = _node_name()
    container = spank.getenv(ENV_CONTAINER_STEP) == "1"
    if step == SLURM_BATCH_SCRIPT:
        container = state.site.slurm.batch_step
    log(
        INFO,
        f"user_init: job {job} step {step} on node {node}: image "
        f"{spank.getenv(ENV_IMAGEREQUEST) or state.image}"
        + (" (tasks in the container)" if container else ""),
    )
    if container:
        _find_step_root(spank, str(job), str(step), node)


def _node_name() -> str:
    """This node's name, as the prolog knew it: slurmstepd's own ``SLURMD_NODENAME``, which
    slurmd sets (the job's environment and node lists come from the user's srun: an srun
    in a batch script even passes on the batch node's ``SLURMD_NODENAME``)."""
    return os.environ.get("SLURMD_NODENAME", "")


def _find_step_root(spank: Spank, job: str, step: str, node: str) -> None:
    """Decide the root this step's tasks enter (errors are kept for the tasks to report:
    an error in user_init would leave srun's exit code 0)."""
    from .. import jobroot

    request = request_from(spank.getenv)
    request["image_request"] = request["image_request"] or state.image or ""
    uid = int(spank.item_u32("S_JOB_UID") or 0)
    gid = int(spank.item_u32("S_JOB_GID") or 0)
    try:
        directory = jobroot.job_dir(state.site.runtime.run_dir, node, job)
        record = jobroot.read_record(directory)
        key = jobroot.root_key(
            uid, gid, request["image_id"], request["volume"], request["module"]
        )
        if record is not None and record.serves(key) and os.path.isdir(record.root):
            found = (record.root, record.env)
        elif (
            record is not None
            and record.error
            and request["image_id"] == spank.getenv(JOB_CONTROL_PREFIX + ENV_IMAGE)
        ):
            raise ShifterError(f"the container of this job could not be set up: {record.error}")
        else:
            euid = os.geteuid()
            os.seteuid(0)  # the shared roots are root's alone (0700)
            try:
                shared = jobroot.read_record(jobroot.shared_root_dir(directory, key))
                if shared is not None and shared.serves(key) and os.path.isdir(shared.root):
                    found = (shared.root, shared.env)
                else:
                    found = prepare_step_root(
                        state.args.get("config"), node, job, request, uid, gid
                    )
                    log(INFO, f"step {job}.{step} on {node}: prepared a root for the job's steps")
            finally:
                os.seteuid(euid)
        state.step_root, state.step_env = found
        from ..runtime import enter  # noqa: F401 - once here, not in every forked task
    except ShifterError as err:
        state.step_error = str(err)
    except Exception as err:  # reported by every task; the details go to slurmd's log
        log_exception(f"preparing step {job}.{step}")
        state.step_error = f"internal error: {err}"


def hook_task_init_privileged(spank: Spank) -> None:
    """In each task (root, just forked): enter the container before Slurm drops to the user."""
    if state.step_error is not None:
        raise ShifterError(state.step_error)
    if state.step_root is None:
        return
    from ..runtime.enter import drop_bounding_set, pivot_into

    pivot_into(state.step_root)
    drop_bounding_set()
    for name, value in state.step_env:
        if name == ENV_IMAGEREQUEST and spank.getenv(name):
            continue  # the step's own --image, as its user typed it
        spank.setenv(name, value)


def hook_task_init(spank: Spank) -> None:
    """In each task, as the user, just before exec: nothing may gain privilege any more."""
    if state.step_root is not None:
        from ..runtime.enter import set_no_new_privs

        set_no_new_privs()


def prepare_step_root(
    config_path: str | None,
    node: str,
    job: str,
    request: Mapping[str, str],
    uid: int,
    gid: int,
) -> tuple[str, list[list[str]]]:
    """The job's shared root for a request other than the job's (another image, volumes or
    modules), prepared by the first step on this node that asks for it and kept for the
    later ones until the epilog; (root, container environment)."""
    from ..config_cache import load
    from ..runtime.plan import User
    from .container import prepare_container

    config = load(config_path, privileged=True)
    user = User.from_uid(uid, gid)
    return prepare_container(config, request, user, node=node, job=job, shared=True)
