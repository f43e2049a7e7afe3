"""The unprivileged realisation: ``shifter`` run by a user, no setuid program anywhere.

The process maps its own uid and gid into a new user namespace (``setgroups`` denied) with a
new mount namespace, then either

- **fast path**: ``chroot``s into the root that the prolog prepared for this job on this
  node, when its state file matches the request (:mod:`.jobs`); there it joins, instead of
  making its own, the user namespace the prolog pinned for the job, in which all the user's
  gids are mapped, so the groups keep their numbers (:mod:`.userns`), or
- **private root**: mounts the image with ``squashfuse_ll`` and builds the same root as the
  privileged path (:mod:`.assemble`) in a tmpfs mounted over ``/tmp`` of its own mount
  namespace, then ``pivot_root``s into it and detaches the host's mounts,

drops every capability, sets ``no_new_privs`` and execs the command: no process of Shifter
remains. The squashfuse_ll daemon is started before the namespaces are made (so it is in
none of them), holds the FUSE connection the process mounted (``/dev/fd/N``), and exits when
the connection goes away: when the last process of the container's mount namespace ends,
the mounts are dropped and the kernel aborts the connection; a SIGKILL included.
"""

from __future__ import annotations

import errno
import os

from .. import syscalls
from ..jobroot import JobRecord, current_job, job_dir, read_record
from ..syscalls import SyscallError
from ._log import get_logger
from .drop import change_directory, drop_privileges, exec_command, run_hooks
from .enter import chroot, pivot
from .errors import ContainerError, ImageError, PrivilegeError
from .plan import Plan

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time

if TYPE_CHECKING:
    import socket
    from typing import NoReturn

    from .launch import Recorder
    from .siblings import Rendezvous

log = get_logger(__name__)

STAGING = "/tmp"  # a tmpfs is mounted over it in the private mount namespace
FUSE_DEVICE = "/dev/fuse"


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_user_namespace(uid: int, gid: int) -> None:
    """New user + mount namespaces mapping the caller to itself; mounts made slaves
    (nothing propagates out; clones then get their own propagation)."""
    try:
        syscalls.unshare(syscalls.CLONE_NEWUSER | syscalls.CLONE_NEWNS)
    except SyscallError as err:
        raise ContainerError(
            f"cannot create a user namespace: {err.strerror}",
            hint="unprivileged user namespaces must be enabled (user.max_user_namespaces)",
        ) from None
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_SLAVE)


def enter_job_user_namespace(path: str, uid: int) -> bool:
    """Join the user namespace the prolog pinned for this job at ``path`` (owned by the
    user: the caller's uid and all its gids map to themselves, so its groups keep their
    numbers), then a new mount namespace with mounts made slaves. False, with nothing
    changed, when the namespace cannot be joined."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as err:
        log.debug("no user namespace pinned for this job (%s): making one", err)
        return False
    try:
        syscalls.setns(fd, syscalls.CLONE_NEWUSER)
    except SyscallError as err:
        log.debug("cannot join the user namespace of this job at %s (%s): making one", path, err)
        return False
    finally:
        os.close(fd)
    if os.getuid() != uid:  # there is no way back: a wrong namespace is an error
        raise ContainerError(f"the user namespace at {path} does not map uid {uid}")
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_SLAVE)
    return True


def _finish(plan: Plan) -> NoReturn:
    drop_privileges(plan.user, in_user_namespace=True)
    change_directory(plan.workdir, plan.workdir_explicit)
    env = plan.environ()
    run_hooks([(n, m.user_hook) for n, m in plan.modules if m.user_hook], env)
    exec_command(plan.argv, env, shell_fallback=plan.default_shell)


def prepared_state(plan: Plan, environ: dict[str, str] | os._Environ[str]) -> JobRecord | None:
    """The record of the root prepared for this job on this node if it serves ``plan``."""
    job = current_job(environ)
    if job is None:
        return None
    node, job_id = job
    record = read_record(job_dir(plan.runtime.run_dir, node, job_id))
    if record is None:
        log.debug("no prepared root for job %s on %s", job_id, node)
        return None
    if not record.serves(plan.root_key()):
        log.info(
            "the prepared root of job %s was made for another request or user: building a "
            "private one",
            job_id,
        )
        return None
    if not os.path.isdir(record.root):
        return None
    return record


def run(
    plan: Plan,
    environ: dict[str, str] | os._Environ[str] | None = None,
    *,
    recorder: Recorder | None = None,
    share: str | None = None,
) -> NoReturn:
    """Run the plan's command in a container as the calling user (never returns); a
    ``recorder`` leaves a recipe of what it did for the C launcher (:mod:`.launch`); with
    ``share`` (the request's launch key, as hex) a private root is shared with sibling
    processes that ask for the same (:mod:`.siblings`)."""
    if os.geteuid() == 0 or os.getuid() == 0:
        raise PrivilegeError(
            "shifter does not run as root", hint="run it as the user the container is for"
        )
    if os.getuid() != plan.user.uid:
        raise PrivilegeError("the plan is for another user")
    state = prepared_state(plan, os.environ if environ is None else environ)
    if state is not None:
        root = state.root
        log.info("entering the root prepared for this job: %s", root)
        if recorder is not None:
            recorder.record_job(state)
        pinned = state.userns
        if pinned is None:
            log.debug("the prolog pinned no user namespace for this job: making one")
        if pinned is None or not enter_job_user_namespace(pinned, plan.user.uid):
            enter_user_namespace(plan.user.uid, plan.user.gid)
        chroot(root)
        _finish(plan)
    _run_private(plan, recorder, None if plan.writable else share)


# ---- a private root -------------------------------------------------------------------------


class SquashfuseDaemon:
    """squashfuse_ll, forked before the namespaces; it gets the FUSE descriptor (which must be
    opened inside the user namespace that mounts it) over a socket once the mount exists."""

    def __init__(self, program: str, image_file: str) -> None:
        import socket

        self.program = program
        self.image_file = image_file
        self.started = False
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.errors, err_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            self._child(theirs, err_write)
        os.waitpid(pid, 0)  # the intermediate child exits at once
        theirs.close()
        os.close(err_write)

    def _child(self, sock: socket.socket, err_write: int) -> NoReturn:
        import socket

        try:
            os.setsid()  # out of the terminal's process group: ^C is for the command
            if os.fork() != 0:
                os._exit(0)
            self.sock.close()
            os.close(self.errors)
            os.chdir("/")
            _, fds, _, _ = socket.recv_fds(sock, 1, 1)
            if not fds:
                os._exit(0)  # the container was never mounted
            fuse_fd = fds[0]
            null = os.open("/dev/null", os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 1)
            os.dup2(err_write, 2)
            os.set_inheritable(fuse_fd, True)
            os.execv(self.program, [self.program, "-f", self.image_file, f"/dev/fd/{fuse_fd}"])
        except BaseException:
            pass
        os._exit(127)

    def start(self, fuse_fd: int) -> None:
        """Hand the mounted FUSE connection to the daemon."""
        import socket

        socket.send_fds(self.sock, [b"g"], [fuse_fd])
        self.close()

    def close(self) -> None:
        """Let the daemon go: it serves the mount if ``start`` was called, else exits."""
        if not self.started:
            self.started = True
            self.sock.close()

    def failure(self) -> str:
        """What the daemon said, if it said anything (non-blocking)."""
        import select

        ready, _, _ = select.select([self.errors], [], [], 0.2)
        if not ready:
            return ""
        return os.read(self.errors, 4096).decode("utf-8", "replace").strip()


def _open_fuse() -> int:
    try:
        return os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise ContainerError(
            f"cannot open {FUSE_DEVICE}: {err.strerror}",
            hint="shifter needs FUSE outside Slurm jobs: ask the administrators to make "
            "/dev/fuse mode 0666 (the default of most distributions)",
        ) from None


def _run_private(
    plan: Plan, recorder: Recorder | None = None, share: str | None = None
) -> NoReturn:
    """A private root, shared with the siblings that ask for the same (``share``)."""
    sibling = _sibling(plan, share) if share else None
    if sibling is not None:
        builder_pid = sibling.builder()
        if builder_pid is not None and sibling.join(builder_pid):
            _finish(plan)
    try:
        _build_private(plan, recorder)
    except BaseException:
        if sibling is not None:
            sibling.close()  # the next sibling builds its own
        raise
    if sibling is not None:
        sibling.offer()
    _finish(plan)


def _sibling(plan: Plan, share: str) -> Rendezvous | None:
    from ..usercache import cache_directory
    from .siblings import Rendezvous

    directory = cache_directory(plan.user.uid, os.environ, create=True)
    return None if directory is None else Rendezvous.open(directory, share)


def _build_private(plan: Plan, recorder: Recorder | None) -> None:
    """Build a private root and pivot into it (still privileged in the user namespace)."""
    from .assemble import RootBuilder  # the fast path needs none
    from .mountops import IMAGE_FLAGS, STAGING_FLAGS, fuse_options

    if not os.access(plan.image_file, os.R_OK):
        raise ImageError(
            f"cannot read the image file {plan.image_file}",
            hint="use it in a Slurm job (sbatch/srun --image), or pull it again to set its ACL",
        )
    uid, gid = plan.user.uid, plan.user.gid
    daemon = SquashfuseDaemon(plan.runtime.squashfuse, plan.image_file)

    def mount_image(target: str) -> None:
        fuse_fd = _open_fuse()  # in the user namespace: the kernel checks the opener's
        try:
            syscalls.mount(
                "squashfuse_ll",
                target,
                "fuse.squashfuse_ll",
                IMAGE_FLAGS,
                f"fd={fuse_fd},{fuse_options(uid, gid)}",
            )
            daemon.start(fuse_fd)
        finally:
            os.close(fuse_fd)

    builder = RootBuilder(
        plan, f"{STAGING}/root", f"{STAGING}/staging", privileged=False, mount_image=mount_image
    )
    try:
        if recorder is not None:  # before the staging tmpfs covers /tmp, where they may be
            recorder.open_cache(plan.image_file)
        enter_user_namespace(uid, gid)
        builder.collect()  # bind sources must be opened in the mount namespace they go to
        syscalls.mount("tmpfs", STAGING, "tmpfs", STAGING_FLAGS, "mode=0700")
        try:
            builder.build()
        except (OSError, ContainerError) as err:
            said = daemon.failure()
            if said and getattr(err, "errno", None) in (errno.ENOTCONN, errno.ECONNABORTED, None):
                raise ImageError(f"squashfuse_ll cannot serve {plan.image_file}: {said}") from None
            raise
        if recorder is not None:
            recorder.record(builder)
    finally:
        if recorder is not None:
            recorder.close()
        builder.close()
        daemon.close()
        os.close(daemon.errors)
    pivot(f"{STAGING}/root")
