"""The privileged realisation (root: the Slurm prolog, slurmstepd, the epilog).

- :func:`prepare` builds a root in a directory and leaves it mounted, in the caller's mount
  namespace: kernel loop mount of the squashfs (``LOOP_CONFIGURE``, read-only, autoclear),
  overlay with a tmpfs upper, everything from :mod:`.assemble`. Once per node per job.
- :func:`enter` moves the calling process into a prepared root (private mount namespace,
  ``pivot_root``, the host's mounts detached), then drops to the user and execs the command
  (or returns, for a caller that execs itself).
- :func:`teardown` unmounts everything below the root deepest first, waits for the loop
  devices to detach, removes the directories; idempotent, and safe after a partial prepare.

:func:`prepare_job`, :func:`teardown_job` and :func:`find_job_root` do the same for the
job directories described in :mod:`.jobs`; a job's directory also holds the user namespace
pinned for the user's own ``shifter`` (:mod:`.userns`).
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass, field

from .. import syscalls
from ..jobdirs import USERNS_FILE
from ..syscalls import SyscallError
from . import loop, userns
from ._log import get_logger
from .assemble import RootBuilder
from .drop import change_directory, drop_privileges, exec_command, run_hooks
from .errors import ContainerError, ImageError, PrivilegeError
from .jobs import ROOT_DIR, job_dir, read_state, state_data, write_state
from .mountinfo import mounts_under, read_mounts
from .plan import Plan

log = get_logger(__name__)

STAGING_SUFFIX = ".staging"


@dataclass
class PreparedRoot:
    """A root left mounted by :func:`prepare`."""

    root: str
    loop_devices: list[str] = field(default_factory=list)


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise PrivilegeError(f"{what} needs root", hint="the unprivileged path is shifter itself")


def mount_image_loop(image_file: str, target: str, devices: list[str]) -> None:
    """Loop-mount a squashfs read-only, nosuid, nodev (the device detaches on unmount)."""
    try:
        device, fd = loop.attach(image_file, read_only=True)
    except FileNotFoundError:
        raise ImageError(f"image file {image_file} does not exist") from None
    try:
        flags = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV
        syscalls.mount(device, target, "squashfs", flags)
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
    for base in (root_dir, root_dir + STAGING_SUFFIX):
        for _round in range(20):
            mounts = mounts_under(base)
            if not mounts:
                break
            for entry in mounts:
                try:
                    syscalls.umount2(entry.target, syscalls.UMOUNT_NOFOLLOW)
                except SyscallError as err:
                    if err.errno in (errno.EINVAL, errno.ENOENT):
                        continue  # already gone with its parent
                    if err.errno == errno.EBUSY:
                        log.warning("%s is busy: detaching it lazily", entry.target)
                        try:
                            syscalls.umount2(
                                entry.target, syscalls.MNT_DETACH | syscalls.UMOUNT_NOFOLLOW
                            )
                        except SyscallError as again:
                            problems.append(str(again))
                    else:
                        problems.append(str(err))
        else:
            problems.append(f"mounts remain below {base}")
    staging = root_dir + STAGING_SUFFIX
    for path in (os.path.join(staging, "lower"), os.path.join(staging, "rw"), staging, root_dir):
        problem = _rmdir(path)
        if problem:
            problems.append(problem)
    for device in loop_devices:
        if not loop.wait_detached(device, None):
            problems.append(f"{device} is still attached to {loop.backing_file(device)}")
    return problems


def enter(plan: Plan, root_dir: str, *, run: bool = True) -> None:
    """Move this process into the prepared root at ``root_dir``; with ``run`` drop to the
    user and exec the plan's command (never returns), else return still as root inside."""
    _require_root("entering a prepared root")
    if plan.user.uid == 0:
        raise PrivilegeError("refusing to run a container as root")
    root_dir = os.path.abspath(root_dir)
    if not any(m.target == root_dir for m in read_mounts()):
        raise ContainerError(f"{root_dir} is not a prepared root (nothing is mounted there)")
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    os.chdir(root_dir)
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", syscalls.MNT_DETACH)
    os.chdir("/")
    if not run:
        return None
    drop_privileges(plan.user)
    change_directory(plan.workdir, plan.workdir_explicit)
    env = plan.environ()
    run_hooks([(n, m.user_hook) for n, m in plan.modules if m.user_hook], env)
    exec_command(plan.argv, env, shell_fallback=plan.default_shell)


# ---- job directories -------------------------------------------------------------------------


def _ensure_private_run_dir(run_dir: str) -> None:
    """Make ``run_dir`` a private mount point, so mounts below it never propagate."""
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
    """Prepare the job's root at ``RUN_DIR/NODE/JOB/root`` and write its ``state.json``
    (leftovers of an earlier attempt in that directory are torn down first)."""
    _require_root("preparing a job's root")
    directory = job_dir(run_dir, node, job_id)
    _ensure_private_run_dir(run_dir)
    os.makedirs(os.path.dirname(directory), mode=0o755, exist_ok=True)
    if os.path.lexists(directory):
        for problem in teardown_job(run_dir, node, job_id):
            log.warning("stale job directory %s: %s", directory, problem)
    os.mkdir(directory, 0o755)
    prepared = prepare(plan, os.path.join(directory, ROOT_DIR))
    pinned: str | None = os.path.join(directory, USERNS_FILE)
    try:
        userns.pin(plan.user, pinned)
    except ContainerError as err:
        log.warning("%s (shifter in the job will show only the user's primary group)", err)
        pinned = None
    write_state(
        directory, state_data(plan, job_id, node, prepared.root, prepared.loop_devices, pinned)
    )
    return prepared


def teardown_job(run_dir: str, node: str, job_id: str) -> list[str]:
    """Tear the job's root down and remove its directory; the problems left (if any)."""
    _require_root("tearing down a job's root")
    directory = job_dir(run_dir, node, job_id)
    state = read_state(directory)
    devices = state.loop_devices if state else []
    problems = userns.release(os.path.join(directory, USERNS_FILE))
    problems += teardown(os.path.join(directory, ROOT_DIR), devices)
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        path = os.path.join(directory, name)
        if name.startswith("state.json") and not os.path.isdir(path):
            os.unlink(path)
    problem = _rmdir(directory)
    if problem:
        problems.append(problem)
    return problems


def find_job_root(run_dir: str, node: str, job_id: str) -> str | None:
    """The prepared root of a job on this node, if a trusted state file says there is one."""
    state = read_state(job_dir(run_dir, node, job_id))
    return state.root if state else None
