"""Job steps entering the job's container: the per-step fast path inside slurmstepd.

The prolog prepared ``RUN_DIR/NODE/JOB/root`` once for the job and recorded the request
(image id, volumes, modules) and the container's environment in ``request.json``. A step
whose request is the same enters that root; each task, in its own mount namespace, pivots
into it (:func:`enter_root`) before slurmstepd drops to the user and execs the command, so
tasks stay children of slurmstepd (signals, accounting, PMI keep working). A step with
another image, volumes or modules gets a root of its own, prepared once per node for the
step (:func:`prepare_step_root`) and torn down when the step ends.

This module is imported by slurmstepd for every container step: it stays light (the runtime
proper is imported only for a step that needs its own root).
"""

from __future__ import annotations

import marshal
import os
import stat

TYPE_CHECKING = False  # typing and collections.abc cost start-up time on this path
if TYPE_CHECKING:
    from collections.abc import Mapping

# What the prolog recorded for the job's steps: the request its root serves, the root, and
# the container's environment (marshal: the step path must not import json, hence re).
STEP_RECORD = "step.marshal"
ERROR_FILE = "error"
STEPS_DIR = "steps"
ENV_IMAGE = "SHIFTER_IMAGE"
ENV_IMAGEREQUEST = "SHIFTER_IMAGEREQUEST"
ENV_VOLUME = "SHIFTER_VOLUME"
ENV_MODULE = "SHIFTER_MODULE"


def step_request(environ: Mapping[str, str], prefix: str = "") -> dict[str, str]:
    """The container request of a job or step from its (``SPANK_``-prefixed) environment."""
    return {
        "image_id": environ.get(prefix + ENV_IMAGE, ""),
        "image_request": environ.get(prefix + ENV_IMAGEREQUEST, ""),
        "volume": environ.get(prefix + ENV_VOLUME, ""),
        "module": environ.get(prefix + ENV_MODULE, ""),
    }


def _trusted_record(path: str) -> dict[str, object] | None:
    """A root-owned, not group/other-writable marshal record, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        try:
            data = marshal.load(fh)
        except (EOFError, ValueError, TypeError):
            return None
    return data if isinstance(data, dict) else None


def _write_root_file(path: str, data: bytes) -> None:
    """Write a file atomically (as root, 0644): steps trust only such files."""
    partial = f"{path}.{os.getpid()}.partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(partial, path)


def write_record(directory: str, record: dict[str, object]) -> None:
    """Record (as root) what the job's root serves, for its steps."""
    _write_root_file(os.path.join(directory, STEP_RECORD), marshal.dumps(record))


def write_error(directory: str, message: str, uid: int) -> None:
    """Record (as root) why the prolog could not prepare the job's container."""
    from .errors import escape
    from .jobdirs import make_job_dir

    make_job_dir(directory, uid)
    _write_root_file(os.path.join(directory, ERROR_FILE), escape(message, 2000).encode())


def prolog_error(directory: str) -> str | None:
    """The message the prolog left when it could not prepare the job's container."""
    try:
        fd = os.open(os.path.join(directory, ERROR_FILE), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if os.fstat(fh.fileno()).st_uid != 0:
            return None
        return fh.read(4096).decode(errors="replace").strip()


def job_root_for(directory: str, request: Mapping[str, str]) -> tuple[str, list[list[str]]] | None:
    """(root, container environment) of the job's prepared root if it serves ``request``."""
    recorded = _trusted_record(os.path.join(directory, STEP_RECORD))
    if not recorded or not os.path.isdir(str(recorded.get("root", ""))):
        return None
    if any(recorded.get(k, "") != request[k] for k in ("image_id", "volume", "module")):
        return None
    env = recorded.get("env")
    return str(recorded["root"]), env if isinstance(env, list) else []


def enter_root(root: str) -> None:
    """Move this process (a task, still root) into the prepared ``root``: private mount
    namespace, pivot_root, the host's mounts detached; the working directory is kept when
    it exists in the container, else ``/``."""
    from . import syscalls

    cwd = os.getcwd()
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    os.chdir(root)
    syscalls.pivot_root(".", ".")
    syscalls.umount2(".", syscalls.MNT_DETACH)
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")


def drop_bounding_set() -> None:
    """Empty the capability bounding set (slurmstepd then drops to the user)."""
    from . import syscalls

    cap = 0
    while True:
        try:
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
        except syscalls.SyscallError:
            return
        cap += 1


def set_no_new_privs() -> None:
    from . import syscalls

    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)


def prepare_step_root(
    config_path: str | None,
    directory: str,
    step: str,
    request: Mapping[str, str],
    uid: int,
    gid: int,
) -> tuple[str, list[list[str]]]:
    """A root of the step's own (another image, volumes or modules than the job's)."""
    from .config import load
    from .container import checked_image, container_plan
    from .jobdirs import make_job_dir
    from .runtime.plan import User
    from .runtime.privileged import ensure_private_run_dir, prepare

    config = load(config_path, privileged=True)
    ensure_private_run_dir(config.runtime.run_dir)
    user = User.from_uid(uid, gid)
    image, store = checked_image(config, request, user)
    plan = container_plan(config, request, image, str(store.image_file(image.id)), user)
    step_dir = os.path.join(directory, STEPS_DIR, step)
    for attempt in range(3):  # another step's teardown may remove empty parents meanwhile
        try:
            make_job_dir(directory, uid)
            os.makedirs(step_dir, mode=0o700, exist_ok=True)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise
    prepared = prepare(plan, os.path.join(step_dir, "root"))
    return prepared.root, [list(kv) for kv in plan.env]


def teardown_step_root(directory: str, step: str) -> list[str]:
    """Remove a step's own root (the epilog does it too, if the step died first)."""
    from .runtime.privileged import teardown_tree

    problems = teardown_tree(os.path.join(directory, STEPS_DIR, step))
    # A job without --image has no prolog root: leave nothing behind (rmdir removes only
    # empty directories: the job's root or other steps keep them).
    for empty in (os.path.join(directory, STEPS_DIR), directory):
        try:
            os.rmdir(empty)
        except OSError:
            break
    return problems
