"""The job prolog and epilog: one container root per job per node, and nothing left after.

Prolog (root, every allocated node, ``PrologFlags=Alloc``), for jobs submitted with
``--image``: sweep what crashed jobs left on this node; stage the image into the node cache
(or use it from the store); prepare the job's root with the runtime
(``RUN_DIR/NODE/JOB/root``, see :mod:`shifter_core.runtime.jobs`) and record the request it
was built for (``step.marshal``), so job steps can enter it without building anything.

A problem the user caused (an image removed or not shared with them, a bad volume) must not
drain the node: the prolog then records the message in ``RUN_DIR/NODE/JOB/error`` and
succeeds; every container step of the job fails with that message instead.

Epilog: unmount and remove everything of the job (its root, per-step roots), release its
hold on the node cache; idempotent, also after a failed or partial prolog.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Mapping

from .config import Config
from .errors import ShifterError
from .nodecache import NodeCache
from .options import parse_size
from .runtime.jobs import job_dir
from .runtime.plan import RunRequest, User, build_plan
from .runtime.privileged import prepare_job, teardown_job
from .steps import (
    ERROR_FILE,
    STEP_RECORD,
    STEPS_DIR,
    step_request,
    teardown_step_root,
    write_error,
    write_record,
)
from .store import ImageStore

log = logging.getLogger(__name__)


def node_cache(config: Config, node: str) -> NodeCache:
    """This node's image cache."""
    size = config.slurm.node_cache_size
    return NodeCache(
        config.slurm.node_cache.replace("%n", node), 0 if size == "0" else parse_size(size)
    )


def running_jobs(node: str) -> set[str] | None:
    """Jobs slurmctld has on ``node`` (None if it cannot be asked)."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-w", node, "-o", "%A", "-t", "CF,R,CG,S"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("cannot list the jobs of %s (%s): no sweep this time", node, err)
        return None
    return set(out.split())


def sweep(config: Config, node: str, current_job: str) -> None:
    """Tear down job directories of this node whose job is gone (a crash, a lost epilog)."""
    base = os.path.join(config.runtime.run_dir, node)
    try:
        entries = os.listdir(base)
    except FileNotFoundError:
        return
    stale = [e for e in entries if e != current_job and not e.startswith(".")]
    if not stale:
        return
    alive = running_jobs(node)
    if alive is None:
        return
    for job in stale:
        if job not in alive:
            log.info("sweeping leftovers of job %s on %s", job, node)
            epilog(config, node, job)


def prolog(config: Config, environ: Mapping[str, str]) -> None:
    """Prepare the container root of the job described by the prolog's environment."""
    node, job = environ["SLURMD_NODENAME"], environ["SLURM_JOB_ID"]
    sweep(config, node, job)
    node_cache(config, node).sweep()
    directory = job_dir(config.runtime.run_dir, node, job)
    try:
        request = step_request(environ, prefix="SPANK_")
        image_id = request["image_id"]
        store = ImageStore(config.image_path)
        image = store.get(image_id) if image_id else None
        if image is None:
            raise ShifterError(
                f"image {request['image_request']} ({image_id or 'no id'}) is no longer in the "
                f"image store",
                hint="pull it again with shifterimg pull, then resubmit",
            )
        image_file = str(store.image_file(image_id))
        if config.slurm.stage_images:
            image_file = str(
                node_cache(config, node).stage(
                    image_id, store.image_file(image_id), image.sha256, job
                )
            )
        user = User.from_uid(int(environ["SLURM_JOB_UID"]), int(environ["SLURM_JOB_GID"]))
        run = RunRequest(
            image=f"id:{image_id}",
            volumes=(request["volume"],) if request["volume"] else (),
            modules=request["module"] or None,
        )
        plan = build_plan(
            run, config, image, image_file, user, image_request=request["image_request"]
        )
        prepared = prepare_job(plan, config.runtime.run_dir, node, job)
        write_record(
            directory, {**request, "root": prepared.root, "env": [list(kv) for kv in plan.env]}
        )
        log.info("prolog: job %s on %s: %s ready", job, node, request["image_request"])
    except ShifterError as err:
        write_error(directory, str(err))
        log.error("prolog: job %s on %s: %s", job, node, err)


def epilog(config: Config, node: str, job: str) -> list[str]:
    """Remove everything of ``job`` on ``node``; the problems left (empty when all is gone)."""
    directory = job_dir(config.runtime.run_dir, node, job)
    problems: list[str] = []
    steps = os.path.join(directory, STEPS_DIR)
    if os.path.isdir(steps):
        for step in os.listdir(steps):
            problems += teardown_step_root(directory, step)
        os.rmdir(steps)
    for name in (STEP_RECORD, ERROR_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    if os.path.isdir(directory):
        problems += teardown_job(config.runtime.run_dir, node, job)
    node_cache(config, node).release(job)
    for problem in problems:
        log.error("epilog: job %s on %s: %s", job, node, problem)
    return problems
