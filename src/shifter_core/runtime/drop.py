"""The last steps in the container: become the user for good, run hooks, exec the command.

After :func:`drop_privileges` the process has the user's uid, gid and groups, an empty
capability bounding set, no effective, permitted, inheritable or ambient capabilities, and
``no_new_privs``: nothing it executes can gain privilege (setuid bits and file capabilities
are ignored). :func:`exec_command` then replaces the process with the command, so signals
and the exit status are the command's own.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Mapping, Sequence

from .. import syscalls
from ._log import get_logger
from .enter import drop_bounding_set, set_no_new_privs
from .errors import CommandError, ContainerError, PrivilegeError
from .plan import User

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time

if TYPE_CHECKING:
    from typing import NoReturn

log = get_logger(__name__)

FALLBACK_SHELL = "/bin/sh"


def drop_privileges(user: User, *, in_user_namespace: bool = False) -> None:
    """Become ``user`` with no capabilities at all and ``no_new_privs`` set.

    In a user namespace that maps the caller to itself (``in_user_namespace``) the uid, gid
    and supplementary groups are already the user's and stay as they are (``setgroups`` is
    denied there; in the job's pinned namespace the groups are mapped, elsewhere they show as
    the overflow gid): only the capabilities go.
    """
    if user.uid == 0 or user.gid == 0:
        raise PrivilegeError("refusing to run a container as root (uid or gid 0)")
    drop_bounding_set()
    if not in_user_namespace:
        os.setgroups(list(user.groups))
        os.setresgid(user.gid, user.gid, user.gid)
        os.setresuid(user.uid, user.uid, user.uid)
    syscalls.capset_clear()
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    set_no_new_privs()
    if os.getuid() == 0 or os.geteuid() == 0 or 0 in os.getresuid() or any(syscalls.capget()):
        raise PrivilegeError("could not drop privileges (still root or holding capabilities)")


def change_directory(workdir: str, explicit: bool) -> None:
    """cd into the working directory; a default one that is missing falls back to ``/``."""
    try:
        os.chdir(workdir)
    except OSError as err:
        if explicit:
            raise ContainerError(
                f"cannot change to the working directory {workdir}: {err.strerror}",
                hint="give a directory that exists in the container (-w DIR)",
            ) from None
        log.info("working directory %s is not in the container (%s): using /", workdir, err)
        os.chdir("/")


def run_hooks(hooks: Sequence[tuple[str, str]], env: Mapping[str, str]) -> None:
    """Run each module's user hook (as the user, in the container) and wait for it."""
    for module, hook in hooks:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                _reset_signals()
                os.execve(hook, [hook], dict(env))
            except OSError as err:
                os.write(
                    2, f"shifter: module {module}: cannot run {hook}: {err.strerror}\n".encode()
                )
            os._exit(127)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise ContainerError(f"module {module}: the user hook {hook} failed (exit {code})")


def _reset_signals() -> None:
    """Python ignores SIGPIPE and SIGXFSZ; an exec'd program must start with the defaults."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _execvpe(file: str, argv: list[str], env: dict[str, str]) -> NoReturn:
    """``execvpe`` without :func:`os.get_exec_path`, which imports :mod:`warnings`: after
    ``pivot_root`` the host's Python library is gone, so nothing may be imported here."""
    if "/" in file:
        os.execve(file, argv, env)  # raises when it does not replace this process
    last: OSError | None = None
    for directory in (env.get("PATH") or "/usr/local/bin:/usr/bin:/bin").split(":"):
        try:
            os.execve(os.path.join(directory or ".", file), argv, env)
        except (FileNotFoundError, NotADirectoryError) as err:
            last = last or err
        except OSError as err:
            last = err
    raise last or FileNotFoundError(errno.ENOENT, "No such file or directory", file)


def exec_command(
    argv: Sequence[str], env: Mapping[str, str], *, shell_fallback: bool = False
) -> NoReturn:
    """Replace this process with ``argv`` (found on the container's ``PATH``); with
    ``shell_fallback`` a shell missing from the image is replaced by ``/bin/sh``."""
    _reset_signals()
    try:
        _execvpe(argv[0], list(argv), dict(env))
    except FileNotFoundError:
        if shell_fallback and argv[0] != FALLBACK_SHELL:
            log.info("%s is not in the container: running %s", argv[0], FALLBACK_SHELL)
            exec_command([FALLBACK_SHELL], env)
        raise CommandError(
            f"{argv[0]}: command not found in the container",
            hint="check the image's PATH or give the full path",
            exit_code=127,
        ) from None
    except OSError as err:
        raise CommandError(f"cannot run {argv[0]} in the container: {err.strerror}") from None
