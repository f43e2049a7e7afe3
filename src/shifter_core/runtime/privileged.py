"""The privileged realisation (root: the Slurm prolog, slurmstepd, the epilog).

- :func:`prepare` builds a root in a directory and leaves it mounted, in the caller's mount
  namespace: kernel loop mount of the squashfs (``LOOP_CONFIGURE``, read-only, autoclear),
  overlay with a tmpfs upper, everything from :mod:`.assemble`. Once per node per job.
- Processes enter a prepared root with :func:`shifter_core.runtime.enter.pivot_into`.
- :func:`teardown` unmounts everything below the root deepest first, waits for the loop
  devices to detach, removes the directories; idempotent, and safe after a partial prepare.

:func:`prepare_job`, :func:`shared_root` and :func:`teardown_job` do the same in the job
directories :mod:`shifter_core.jobroot` owns (a job's directory also holds the user
namespace pinned for the user's own ``shifter``, :mod:`.userns`).
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass, field

from .. import syscalls
from ..errors import NodeFault
from ..jobroot import (
    ROOT_DIR,
    USERNS_FILE,
    job_dir,
    key_fields,
    make_job_dir,
    read_record,
    remove,
    shared_root_dir,
    write_record,
)
from ..mounts import mounts_under, read_mounts, unmount_below, wait_detached_all
from ..syscalls import SyscallError
from . import loop, userns
from ._log import get_logger
from .assemble import RootBuilder
from .errors import ContainerError, ImageError, PrivilegeError
from .mountops import IMAGE_FLAGS
from .plan import Plan

log = get_logger(__name__)

STAGING_SUFFIX = ".staging"
NO_LOOP_HINT = "load the loop module and check /dev/loop-control and max_loop"


@dataclass
class PreparedRoot:
    """A root left mounted by :func:`prepare`."""

    root: str
    loop_devices: list[str] = field(default_factory=list)


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PrivilegeError(f"{what} needs root", hint="the unprivileged path is shifter itself")


def mount_image_loop(image_file: str, target: str, devices: list[str]) -> None:
    """Loop-mount a squashfs read-only, nosuid, nodev (the device detaches on unmount).

    No loop device to be had, or a kernel without squashfs, is a :class:`NodeFault`: the
    node must be fixed. A missing or unreadable image file is the job's problem."""
    try:
        device, fd = loop.attach(image_file, read_only=True)
    except FileNotFoundError as err:
        if err.filename == loop.LOOP_CONTROL:
            raise NodeFault(f"{loop.LOOP_CONTROL} is missing", hint=NO_LOOP_HINT) from None
        raise ImageError(f"image file {image_file} does not exist") from None
    except SyscallError as err:
        raise NodeFault(f"cannot attach a loop device: {err}", hint=NO_LOOP_HINT) from None
    try:
        syscalls.mount(device, target, "squashfs", IMAGE_FLAGS)
    except SyscallError as err:
        if err.errno == errno.ENODEV:
            raise NodeFault(
                "the kernel cannot mount squashfs", hint="load the squashfs module (modprobe)"
            ) from None
        raise ImageError(f"cannot mount image file {image_file}: {err}") from None
    finally:
        os.close(fd)
    devices.append(device)


def prepare(plan: Plan, root_dir: str) -> PreparedRoot:
    """Build the plan's root at ``root_dir`` (created; must not be in use) and leave it
    mounted. On failure everything done so far is undone and the error raised."""
    _require_root("preparing a container root")
    if not plan.image.visible_to(plan.user.uid, plan.user.groups):
        raise ImageError(
            f"image {plan.image_request} is private and not shared with {plan.user.name}"
        )
    root_dir = os.path.abspath(root_dir)
    if mounts_under(root_dir):
        raise ContainerError(f"{root_dir} is already in use", hint="tear it down first")
    staging = root_dir + STAGING_SUFFIX
    devices: list[str] = []
    builder = RootBuilder(
        plan,
        root_dir,
        staging,
        privileged=True,
        mount_image=lambda target: mount_image_loop(plan.image_file, target, devices),
    )
    try:
        builder.collect()
        result = builder.build()
        _drop_staging(staging)
    except BaseException:
        builder.close()
        problems = teardown(root_dir, devices)
        for problem in problems:
            log.warning("cleaning up after a failed prepare: %s", problem)
        raise
    builder.close()
    log.info("prepared %s for uid %d (image %s)", root_dir, plan.user.uid, plan.image_id)
    return PreparedRoot(root_dir, devices + result.loop_devices)


def _drop_staging(staging: str) -> None:
    """The overlay holds its own references to lower and upper: detach the staging mounts."""
    for entry in mounts_under(staging):
        syscalls.umount2(entry.target, syscalls.MNT_DETACH | syscalls.UMOUNT_NOFOLLOW)
    for name in ("lower", "rw"):
        _rmdir(os.path.join(staging, name))
    _rmdir(staging)


def _rmdir(path: str) -> str | None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        return f"cannot remove {path}: {err.strerror}"
    return None


def teardown(root_dir: str, loop_devices: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Unmount everything at and below ``root_dir`` (and its staging directory), wait for the
    loop devices to detach, remove the directories. Returns the problems left (empty when
    everything is gone); never raises for what is already gone."""
    _require_root("tearing down a container root")
    root_dir = os.path.abspath(root_dir)
    problems: list[str] = []
    devices = list(loop_devices)
    for base in (root_dir, root_dir + STAGING_SUFFIX):
        devices += unmount_below(base, problems)
    staging = root_dir + STAGING_SUFFIX
    for path in (os.path.join(staging, "lower"), os.path.join(staging, "rw"), staging, root_dir):
        problem = _rmdir(path)
        if problem:
            problems.append(problem)
    wait_detached_all(devices, problems)
    return problems


# ---- job directories -------------------------------------------------------------------------


def ensure_private_run_dir(run_dir: str) -> None:
    """Make ``run_dir`` a private mount point, so mounts below it never propagate (to other
    mount namespaces, where they would keep images mounted after a teardown here). Called
    before every root is built below it."""
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    lock = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        real = os.path.realpath(run_dir)
        if not any(m.target == real for m in read_mounts()):
            syscalls.mount(real, real, None, syscalls.MS_BIND)
        syscalls.mount(None, real, None, syscalls.MS_PRIVATE)
    finally:
        os.close(lock)


def prepare_job(plan: Plan, run_dir: str, node: str, job_id: str) -> PreparedRoot:
    """Prepare the job's root at ``RUN_DIR/NODE/JOB/root`` and write the job's record
    (:mod:`shifter_core.jobroot`; leftovers of an earlier attempt in that directory are torn
    down first). The job's directory is reachable by the job's user alone."""
    _require_root("preparing a job's root")
    directory = job_dir(run_dir, node, job_id)
    ensure_private_run_dir(run_dir)
    if os.path.lexists(directory):
        for problem in remove(directory):
            log.warning("stale job directory %s: %s", directory, problem)
    if not make_job_dir(directory, plan.user.uid):
        log.warning("%s has no POSIX ACLs: shifter in jobs builds private roots", run_dir)
    prepared = prepare(plan, os.path.join(directory, ROOT_DIR))
    pinned: str | None = os.path.join(directory, USERNS_FILE)
    try:
        userns.pin(plan.user, os.path.join(directory, USERNS_FILE))
    except ContainerError as err:
        log.warning("%s (shifter in the job will show only the user's primary group)", err)
        pinned = None
    write_record(
        directory,
        job_id=job_id,
        node=node,
        **key_fields(plan.root_key()),
        image_request=plan.image_request,
        root=prepared.root,
        env=[list(kv) for kv in plan.env],
        loop_devices=prepared.loop_devices,
        userns=pinned or "",
    )
    return prepared


def shared_root(plan: Plan, run_dir: str, node: str, job_id: str) -> tuple[str, list[list[str]]]:
    """The root serving ``plan``'s request among the job's shared roots
    (``RUN_DIR/NODE/JOB/roots/KEY``, :func:`shifter_core.jobroot.shared_root_dir`): the one a
    step made earlier, else prepared now and recorded for the job's later steps (the
    epilog removes it). Steps that start together wait for one another (a lock on the
    root's directory); what a crashed step left there is torn down first.
    (root, container environment)."""
    _require_root("preparing a job's shared root")
    ensure_private_run_dir(run_dir)
    directory = job_dir(run_dir, node, job_id)
    make_job_dir(directory, plan.user.uid)
    key = plan.root_key()
    shared = shared_root_dir(directory, key)
    os.makedirs(shared, mode=0o700, exist_ok=True)
    lock = os.open(shared, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = read_record(shared)
        if record is not None and record.serves(key) and os.path.isdir(record.root):
            return record.root, record.env
        for problem in teardown(os.path.join(shared, ROOT_DIR)):
            log.warning("stale shared root in %s: %s", shared, problem)
        prepared = prepare(plan, os.path.join(shared, ROOT_DIR))
        env = [list(kv) for kv in plan.env]
        write_record(shared, **key_fields(key), image_request=plan.image_request,
                     root=prepared.root, env=env, loop_devices=prepared.loop_devices)  # fmt: skip
        return prepared.root, env
    finally:
        os.close(lock)


def teardown_job(run_dir: str, node: str, job_id: str) -> list[str]:
    """Tear the job's root down and remove its directory; the problems left (if any)."""
    _require_root("tearing down a job's root")
    return remove(job_dir(run_dir, node, job_id))
