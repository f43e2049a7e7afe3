"""The Python side of the SPANK plugin: every Slurm callback lands here.

The C shim (``spank/shifter_spank.c``) registers ``--image``, ``--volume`` and
``--module`` and forwards each callback to :func:`on_hook` or :func:`on_option`. Where
each callback runs (observed on Slurm 22.05):

- ``srun`` (local): init → options → init_post_opt → local_user_init → exit
- ``sbatch``/``salloc`` (allocator): init → options → init_post_opt → exit
- ``slurmstepd`` (remote, every step): init → options (twice) → init_post_opt →
  user_init → per task task_init_privileged → task_init; task_post_fork, task_exit, exit
- prolog/epilog (job_script): job_prolog or job_epilog alone

Submission side: values are checked, then exported so the job, its prolog and its steps
see them: ``SHIFTER_IMAGEREQUEST``, ``SHIFTER_VOLUME`` (every ``--volume`` joined by
``;``: Slurm forwards only the last value of a repeated option to slurmstepd) and
``SHIFTER_MODULE``.

Nothing here starts threads: slurmstepd forks tasks while this interpreter lives.
"""

from __future__ import annotations

import logging
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from . import config as config_mod
from .errors import ShifterError
from .options import format_volumes, parse_modules, parse_volumes
from .reference import ImageRequest

log = logging.getLogger("shifter")

OPT_IMAGE, OPT_VOLUME, OPT_MODULE = 0, 1, 2
OPTION_NAMES = {OPT_IMAGE: "image", OPT_VOLUME: "volume", OPT_MODULE: "module"}
ENV_IMAGEREQUEST = "SHIFTER_IMAGEREQUEST"
ENV_VOLUME = "SHIFTER_VOLUME"
ENV_MODULE = "SHIFTER_MODULE"
# How Slurm shows a job's options and job-control variables to the job's own sruns.
INHERITED_OPTION = "SLURM_SPANK__SLURM_SPANK_OPTION_shifter_"
JOB_CONTROL_PREFIX = "SLURM_SPANK_"

_ffi: Any = None
_lib: Any = None


@dataclass
class PluginState:
    """What this process has learnt: plugin arguments, configuration, user options."""

    args: dict[str, str] = field(default_factory=dict)
    config: config_mod.Config | None = None
    image: ImageRequest | None = None
    volumes: list[str] = field(default_factory=list)
    modules: list[str] | None = None
    volumes_from_job: bool = False
    remote: bool = False


state = PluginState()


class SlurmLogHandler(logging.Handler):
    """Send log records to Slurm's log (srun's stderr, or slurmd's log file)."""

    def emit(self, record: logging.LogRecord) -> None:
        if _lib is None:
            return
        text = _ffi.new("char[]", ("shifter: " + self.format(record)).encode(errors="replace"))
        fmt = b"%s"
        if record.levelno >= logging.ERROR:
            _lib.slurm_error(fmt, text)
        elif record.levelno >= logging.WARNING:
            _lib.slurm_info(fmt, text)
        elif record.levelno >= logging.INFO:
            # In srun/sbatch info would reach the user's terminal: keep it for -v there.
            if _lib.spank_context() in (_lib.S_CTX_LOCAL, _lib.S_CTX_ALLOCATOR):
                _lib.slurm_verbose(fmt, text)
            else:
                _lib.slurm_info(fmt, text)
        else:
            _lib.slurm_debug(fmt, text)


def bind(ffi: Any, lib: Any) -> None:
    """Called once by the embedded init code with cffi's ``ffi`` and ``lib``."""
    global _ffi, _lib
    _ffi, _lib = ffi, lib
    handler = SlurmLogHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False


class Spank:
    """A thin, typed wrapper around a ``spank_t`` handle."""

    CONTEXTS: typing.ClassVar[dict[str, str]] = {
        "S_CTX_LOCAL": "local",
        "S_CTX_REMOTE": "remote",
        "S_CTX_ALLOCATOR": "allocator",
        "S_CTX_SLURMD": "slurmd",
        "S_CTX_JOB_SCRIPT": "job_script",
    }

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    @property
    def context(self) -> str:
        value = _lib.spank_context()
        for name, text in self.CONTEXTS.items():
            if value == getattr(_lib, name):
                return text
        return "error"

    def item_u32(self, item: str) -> int | None:
        """A ``uint32_t`` item such as ``S_JOB_ID``; None where Slurm does not give it."""
        out = _ffi.new("uint32_t *")
        if _lib.spank_get_item(self.handle, getattr(_lib, item), out) != _lib.ESPANK_SUCCESS:
            return None
        return int(out[0])

    def getenv(self, name: str) -> str | None:
        """A variable of the job's environment (remote context)."""
        size = 4096
        while size <= 1 << 20:
            buf = _ffi.new("char[]", size)
            rc = _lib.spank_getenv(self.handle, name.encode(), buf, size)
            if rc == _lib.ESPANK_SUCCESS:
                return _ffi.string(buf).decode(errors="replace")
            if rc != _lib.ESPANK_NOSPACE:
                return None
            size *= 4
        return None

    def setenv(self, name: str, value: str) -> None:
        """Set a variable in the job's environment (remote context)."""
        if _lib.spank_setenv(self.handle, name.encode(), value.encode(), 1) != _lib.ESPANK_SUCCESS:
            raise ShifterError(f"cannot set {name} in the job's environment")

    def job_control_setenv(self, name: str, value: str) -> None:
        """Set a variable that the prolog and epilog see as ``SPANK_<name>``."""
        rc = _lib.spank_job_control_setenv(self.handle, name.encode(), value.encode(), 1)
        if rc != _lib.ESPANK_SUCCESS:
            raise ShifterError(f"cannot pass {name} to the job's prolog")

    def getopt(self, val: int) -> str | None:
        """The value a user gave for one of our options (prolog/epilog context)."""
        out = _ffi.new("char **")
        if _lib.shifter_getopt(self.handle, val, out) != _lib.ESPANK_SUCCESS or out[0] == _ffi.NULL:
            return None
        return _ffi.string(out[0]).decode(errors="replace")


def parse_plugin_args(args: list[str]) -> dict[str, str]:
    """``config=PATH`` and friends from the ``plugstack.conf`` line."""
    known = {"config"}
    parsed: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in known:
            raise ShifterError(
                f"unknown plugin argument {arg!r} in plugstack.conf",
                hint=f"known arguments: {', '.join(sorted(k + '=...' for k in known))}",
            )
        parsed[key] = value
    return parsed


# ---- option callbacks --------------------------------------------------------------


def on_option(val: int, optarg: str, remote: bool) -> int:
    """Validate one option value; a bad value fails the submission (srun/sbatch exit 1)."""
    name = OPTION_NAMES.get(val, str(val))
    try:
        handle_option(val, optarg, remote)
    except ShifterError as err:
        log.error("--%s: %s", name, err)
        return -1
    except Exception:
        log.exception("internal error while checking --%s", name)
        return -1
    return 0


def handle_option(val: int, optarg: str, remote: bool) -> None:
    state.remote = remote
    if val == OPT_IMAGE:
        default_type = state.config.default_image_type if state.config else "docker"
        state.image = ImageRequest.parse(optarg, default_type)
    elif val == OPT_VOLUME:
        parse_volumes([optarg])
        if remote:
            # slurmstepd calls every option callback twice with the (last) value.
            state.volumes = [optarg]
        elif not state.volumes and _inherited_volumes(optarg):
            # srun inside a job: Slurm replays the job's last --volume first; the job's
            # submission exported all of them.
            state.volumes = [_inherited_volumes(optarg) or ""]
            state.volumes_from_job = True
        elif state.volumes_from_job:
            # srun's own --volume replaces the job's, as srun options do.
            state.volumes = [optarg]
            state.volumes_from_job = False
        else:
            state.volumes.append(optarg)
    elif val == OPT_MODULE:
        state.modules = parse_modules(optarg)
    else:
        raise ShifterError(f"unknown option number {val}")


def _inherited_volumes(optarg: str) -> str | None:
    """Every volume of the enclosing job when ``optarg`` is the value Slurm replays from it."""
    if os.environ.get(INHERITED_OPTION + "volume") != optarg:
        return None
    return os.environ.get(JOB_CONTROL_PREFIX + ENV_VOLUME) or os.environ.get(ENV_VOLUME)


# ---- hooks ---------------------------------------------------------------------------


def on_hook(hook: str, handle: Any, args: list[str]) -> int:
    """Run one SPANK callback; 0 on success, -1 (with a logged reason) on failure."""
    spank = Spank(handle)
    try:
        function = HOOKS.get(hook)
        if function is not None:
            function(spank, args)
    except ShifterError as err:
        log.error("%s", err)
        return -1
    except Exception:
        log.exception("internal error in %s", hook)
        return -1
    return 0


def _load_config(spank: Spank, args: list[str]) -> None:
    state.args = parse_plugin_args(args)
    privileged = spank.context in ("remote", "job_script") and os.geteuid() == 0
    state.config = config_mod.load(state.args.get("config"), privileged=privileged)


def hook_init(spank: Spank, args: list[str]) -> None:
    _load_config(spank, args)
    log.debug("init in %s context (pid %d)", spank.context, os.getpid())


def _exports() -> dict[str, str]:
    exports: dict[str, str] = {}
    if state.image is not None:
        exports[ENV_IMAGEREQUEST] = str(state.image)
    if state.volumes:
        exports[ENV_VOLUME] = format_volumes(parse_volumes(state.volumes))
    if state.modules is not None:
        exports[ENV_MODULE] = ",".join(state.modules)
    return exports


def hook_init_post_opt(spank: Spank, args: list[str]) -> None:
    if spank.context not in ("local", "allocator"):
        return
    if state.image is None and (state.volumes or state.modules is not None):
        raise ShifterError("--volume and --module need --image", hint="add --image=NAME")
    exports = _exports()
    for name, value in exports.items():
        os.environ[name] = value  # carried into the job's environment
        spank.job_control_setenv(name, value)  # seen by the prolog as SPANK_<name>
    if exports:
        log.info("%s: %s", spank.context, " ".join(f"{k}={v}" for k, v in exports.items()))


def hook_user_init(spank: Spank, args: list[str]) -> None:
    if state.image is None:
        return
    exports = _exports()
    # The submitting side exported every --volume; the option here holds only the last.
    volume = spank.getenv(ENV_VOLUME)
    if volume:
        exports[ENV_VOLUME] = format_volumes(parse_volumes([volume]))
    for name, value in exports.items():
        spank.setenv(name, value)
    node = spank.getenv("SLURMD_NODENAME") or os.environ.get("SLURMD_NODENAME", "?")
    log.info(
        "user_init: job %s step %s on node %s: image %s",
        spank.item_u32("S_JOB_ID"),
        spank.item_u32("S_JOB_STEPID"),
        node,
        state.image,
    )


def _job_script(spank: Spank, args: list[str], what: str) -> None:
    # Jobs without --image are none of Shifter's business: a broken Shifter configuration
    # must not fail (and drain nodes for) jobs that do not use it.
    request = os.environ.get("SPANK_" + ENV_IMAGEREQUEST)
    if request is None:
        return
    _load_config(spank, args)
    log.info(
        "%s: job %s on node %s: image %s",
        what,
        os.environ.get("SLURM_JOB_ID", "?"),
        os.environ.get("SLURMD_NODENAME", "?"),
        request,
    )


def hook_job_prolog(spank: Spank, args: list[str]) -> None:
    _job_script(spank, args, "prolog")


def hook_job_epilog(spank: Spank, args: list[str]) -> None:
    _job_script(spank, args, "epilog")


HOOKS = {
    "init": hook_init,
    "init_post_opt": hook_init_post_opt,
    "user_init": hook_user_init,
    "job_prolog": hook_job_prolog,
    "job_epilog": hook_job_epilog,
}
