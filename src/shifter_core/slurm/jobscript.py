"""The job prolog and epilog: one container root per job per node, and nothing left after.

Prolog (root, every allocated node, ``PrologFlags=Alloc``), for jobs submitted with
``--image``: sweep what crashed jobs left on this node; stage the image into the node cache
(or use it from the store); prepare the job's root with the runtime
(``RUN_DIR/NODE/JOB/root``, see :mod:`shifter_core.jobroot`) and record the request it
was built for (``step.marshal``), so job steps can enter it without building anything.

The submission side runs as the user, who can replace it: the request is parsed again and
the image's ACL checked for the job's uid and gids before anything is staged
(:mod:`.container`). Slurm drains a node whose prolog or epilog fails, so every
error the job caused (a bad request, an image removed or not shared, a volume, the image's
content, a bug) is recorded in ``RUN_DIR/NODE/JOB/error`` and the prolog succeeds; every
container step of the job fails with that message, and the job's admin comment shows it.
Only a :class:`~shifter_core.errors.NodeFault` (no loop device, no squashfs, a run directory
root cannot write) fails the prolog.

Epilog: runs for every job (steps of a job without --image may have made roots of their
own); unmounts and removes everything of the job from whatever state a crash left, releases
its hold on the node cache, and never fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
import traceback
from collections.abc import Mapping

from ..config import Config
from ..errors import NodeFault, ShifterError, escape
from ..jobroot import job_dir, make_job_dir, valid_name, write_record
from ..runtime.plan import User
from ..runtime.privileged import teardown_job
from . import api
from .api import Spank
from .container import node_cache, prepare_container
from .names import ENV_IMAGEREQUEST, PROLOG_PREFIX, request_from
from .state import state

log = logging.getLogger(__name__)


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
    """Tear down job directories of this node whose job is gone (a crash, a lost epilog).
    Never raises: a sweep that cannot finish tries again at the next prolog."""
    base = os.path.join(config.runtime.run_dir, node)
    try:
        entries = os.listdir(base)
    except OSError:
        return
    stale = [e for e in entries if e != current_job and not e.startswith(".")]
    if not stale:
        return
    alive = running_jobs(node)
    if alive is None:
        return
    for job in stale:
        if job not in alive and valid_name(job):
            log.info("sweeping leftovers of job %s on %s", escape(job), node)
            epilog(config, node, job)


def prolog(config: Config, environ: Mapping[str, str]) -> str | None:
    """Prepare the container root of the job described by the prolog's environment; the
    job's error, if the job caused one (recorded for its steps, never a failed prolog).

    Node and job come from slurmd; everything ``SPANK_SHIFTER_*`` is the user's and checked
    again. Only a :class:`NodeFault` is raised."""
    node, job = environ["SLURMD_NODENAME"], environ["SLURM_JOB_ID"]
    sweep(config, node, job)
    with contextlib.suppress(OSError):
        node_cache(config, node).sweep()
    directory = job_dir(config.runtime.run_dir, node, job)
    uid, gid = int(environ["SLURM_JOB_UID"]), int(environ["SLURM_JOB_GID"])
    try:
        request = request_from(environ.get, PROLOG_PREFIX)
        prepare_container(config, request, User.from_uid(uid, gid), node=node, job=job)
        log.info("prolog: job %s on %s: %s ready", job, node, escape(request["image_request"]))
        return None
    except NodeFault:
        raise
    except Exception as err:  # anything else is the job's: recorded, never a drained node
        message = job_error_message(err)
        log.error("prolog: job %s on %s: %s", job, node, escape(message))
        if not isinstance(err, ShifterError):
            log.error("prolog: job %s: %s", job, escape(traceback.format_exc(), 4000))
        for problem in teardown_job(config.runtime.run_dir, node, job):
            log.error("prolog: job %s on %s: %s", job, node, escape(problem))
        node_cache(config, node).release(job)
        try:  # the job's record, with its error: its steps report it
            make_job_dir(directory, uid)
            write_record(
                directory, job_id=job, node=node, uid=uid, gid=gid, error=escape(message, 2000)
            )
        except OSError as again:  # full or out of descriptors: the steps fail on their own
            log.error("prolog: job %s: cannot record its error: %s", job, again)
        return message


def job_error_message(err: BaseException) -> str:
    """What the user reads for a failure caused by their job."""
    if isinstance(err, ShifterError):
        return str(err)
    if isinstance(err, OSError) and err.strerror:
        where = f" ({err.filename})" if err.filename else ""
        return f"the container could not be set up: {err.strerror}{where}"
    return f"the container could not be set up: internal error ({type(err).__name__})"


def epilog(config: Config, node: str, job: str) -> list[str]:
    """Remove everything of ``job`` on ``node`` from whatever state a crashed or partial
    prolog, step or earlier epilog left; the problems left (empty when all is gone).
    Never raises."""
    problems: list[str] = []
    try:
        problems += teardown_job(config.runtime.run_dir, node, job)
    except Exception as err:
        problems.append(f"tearing down: {err}")
    try:
        node_cache(config, node).release(job)
    except Exception as err:
        problems.append(f"releasing the node cache: {err}")
    for problem in problems:
        log.error("epilog: job %s on %s: %s", job, node, escape(problem))
    return problems


# ---- the SPANK hooks ---------------------------------------------------------------------


def _job_script(what: str) -> None:
    """The prolog or epilog. Slurm drains a node whose prolog or epilog fails, so only a
    fault of the node may fail them (:class:`~shifter_core.errors.NodeFault`, or a
    configuration root cannot read); the job's errors are recorded and shown to its user.
    The epilog runs for every job (steps of jobs without --image may have made roots) and
    never fails."""
    shifter_job = os.environ.get(PROLOG_PREFIX + ENV_IMAGEREQUEST) is not None
    if what == "prolog" and not shifter_job:
        return
    from ..config_cache import load

    api.route_logging()
    config = load(state.args.get("config"), privileged=True)
    node, job = os.environ.get("SLURMD_NODENAME", ""), os.environ.get("SLURM_JOB_ID", "")
    cpu_start = None  # CPU seconds (nodemetrics.cpu_seconds) when the script starts
    if config.slurm.metrics_dir:  # imported before the clocks start: not the script's cost
        from .nodemetrics import cpu_seconds, record

        cpu_start = cpu_seconds()
    start = time.monotonic()
    result = "node_fault"  # unless the script ends
    try:
        result = _run_job_script(what, config, node, job, shifter_job)
    finally:
        if config.slurm.metrics_dir and cpu_start is not None:
            seconds, cpu = time.monotonic() - start, cpu_seconds() - cpu_start
            record(config.slurm.metrics_dir, node, what, result, seconds, cpu)


def _run_job_script(what: str, config: Config, node: str, job: str, shifter_job: bool) -> str:
    """The prolog or epilog itself: "ok", or "job_error" when the job's image or request
    failed it (a NodeFault raises)."""
    if what == "epilog":
        if shifter_job or os.path.lexists(job_dir(config.runtime.run_dir, node, job)):
            api.log(api.INFO, f"epilog: job {job} on node {node}")
            epilog(config, node, job)
        else:  # the shim could not tell by itself (config_file.shim_hint)
            api.log(api.INFO, f"epilog: job {job} on node {node}: nothing of it here")
        return "ok"
    request = os.environ[PROLOG_PREFIX + ENV_IMAGEREQUEST]
    api.log(api.INFO, f"prolog: job {job} on node {node}: image {request}")
    problem = prolog(config, os.environ)
    if problem is None:
        return "ok"
    _tell_job(job, problem)
    return "job_error"


def _tell_job(job: str, problem: str) -> None:
    """Show the job's error where its user looks: the job's admin comment (``scontrol show
    job``, ``sacct``); its container steps print it too."""
    import subprocess

    text = escape(f"shifter: {problem}", 900).replace('"', "'")
    try:
        subprocess.run(
            ["scontrol", "update", f"JobId={job}", f"AdminComment={text}"],
            capture_output=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as err:
        api.log(api.ERROR, f"cannot set the admin comment of job {job}: {err}")


def hook_job_prolog(spank: Spank) -> None:
    """The job's prolog (root, once per node; ``PrologFlags=Alloc``)."""
    _job_script("prolog")


def hook_job_epilog(spank: Spank) -> None:
    """The job's epilog (root, once per node, every job): never fails."""
    try:
        _job_script("epilog")
    except Exception as err:  # the epilog always succeeds: a failed one drains the node
        api.log(api.ERROR, f"epilog: {err} (the node was not drained; fix and sweep)")
