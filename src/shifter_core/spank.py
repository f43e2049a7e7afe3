"""The Python side of the SPANK plugin: every Slurm callback lands here.

The C shim (``spank/shifter_spank.c``) registers ``--image``, ``--volume`` and
``--module``, starts Python only in processes where one of them is used (or in the
prolog/epilog of a job that used them), and forwards each callback to :func:`on_hook`
or :func:`on_option`. Where each callback runs (observed on Slurm 22.05):

- ``srun`` (local): init → options → init_post_opt → local_user_init → exit
- ``sbatch``/``salloc`` (allocator): init → options → init_post_opt → exit
- ``slurmstepd`` (remote, every step): init → options (twice) → init_post_opt →
  user_init → per task task_init_privileged → task_init; task_post_fork, task_exit, exit
- prolog/epilog (job_script): job_prolog or job_epilog alone

Submission side: values are checked, then exported so the job, its prolog and its steps
see them: ``SHIFTER_IMAGEREQUEST``, ``SHIFTER_VOLUME`` (every ``--volume`` joined by
``;``: Slurm forwards only the last value of a repeated option to slurmstepd) and
``SHIFTER_MODULE``, in the job's environment and as job-control variables
(``SPANK_SHIFTER_*`` in the prolog, ``SLURM_SPANK_SHIFTER_*`` in the job).

This module is on the start-up path of every Shifter srun and job step: it imports only
what it needs, when it needs it (no ``logging``, no YAML when the configuration cache
matches), and it never starts threads (slurmstepd forks tasks while it lives).
"""

from __future__ import annotations

import os

from .errors import ShifterError

OPT_IMAGE, OPT_VOLUME, OPT_MODULE = 0, 1, 2
OPTION_NAMES = {OPT_IMAGE: "image", OPT_VOLUME: "volume", OPT_MODULE: "module"}
ENV_IMAGEREQUEST = "SHIFTER_IMAGEREQUEST"
ENV_VOLUME = "SHIFTER_VOLUME"
ENV_MODULE = "SHIFTER_MODULE"
EXPORTED = (ENV_IMAGEREQUEST, ENV_VOLUME, ENV_MODULE)
# How Slurm shows a job's options and job-control variables to the job's own sruns.
INHERITED_OPTION = "SLURM_SPANK__SLURM_SPANK_OPTION_shifter_"
JOB_CONTROL_PREFIX = "SLURM_SPANK_"
PLUGIN_ARGS = ("config",)

_ffi: object = None
_lib: object = None


class PluginState:
    """What this process has learnt: plugin arguments, configuration, user options."""

    def __init__(self) -> None:
        self.args: dict[str, str] = {}
        self.config: dict[str, object] = {}
        self.image: str | None = None  # canonical TYPE:TAG (validated where parsed)
        self.volumes: list[str] = []  # every --volume value, each maybe ';'-joined
        self.modules: str | None = None
        self.volumes_from_job = False


state = PluginState()


# ---- logging through Slurm -------------------------------------------------------------

ERROR, INFO, DEBUG = "error", "info", "debug"


def log(level: str, message: str) -> None:
    """Write ``shifter: message`` to Slurm's log.

    In srun/sbatch ``info`` would reach the user's terminal, so it goes to ``verbose``
    there (``srun -v`` shows it); on the nodes it lands in slurmd's log file.
    """
    if _lib is None:
        return
    text = _ffi.new("char[]", ("shifter: " + message).encode(errors="replace"))
    if level == ERROR:
        _lib.slurm_error(b"%s", text)
    elif level == INFO and _lib.spank_context() in (_lib.S_CTX_LOCAL, _lib.S_CTX_ALLOCATOR):
        _lib.slurm_verbose(b"%s", text)
    elif level == INFO:
        _lib.slurm_info(b"%s", text)
    else:
        _lib.slurm_debug(b"%s", text)


def _log_exception(what: str) -> None:
    import traceback

    log(ERROR, f"internal error {what}")
    for line in traceback.format_exc().splitlines():
        log(ERROR, line)


def bind(ffi: object, lib: object) -> None:
    """Called once by the embedded init code with cffi's ``ffi`` and ``lib``."""
    global _ffi, _lib
    _ffi, _lib = ffi, lib


class Spank:
    """A thin wrapper around a ``spank_t`` handle."""

    def __init__(self, handle: object) -> None:
        self.handle = handle

    @property
    def context(self) -> str:
        value = _lib.spank_context()
        for name in ("local", "remote", "allocator", "slurmd", "job_script"):
            if value == getattr(_lib, "S_CTX_" + name.upper()):
                return name
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


def parse_plugin_args(args: list[str]) -> dict[str, str]:
    """``config=PATH`` and friends from the ``plugstack.conf`` line."""
    parsed: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in PLUGIN_ARGS:
            raise ShifterError(
                f"unknown plugin argument {arg!r} in plugstack.conf",
                hint=f"known arguments: {', '.join(k + '=...' for k in PLUGIN_ARGS)}",
            )
        parsed[key] = value
    return parsed


def on_start(args: list[str]) -> int:
    """Python just started in this process: read the plugin arguments and the config."""
    from . import config_cache

    try:
        state.args = parse_plugin_args(args)
        privileged = os.geteuid() == 0
        state.config = config_cache.load_values(state.args.get("config"), privileged=privileged)
    except ShifterError as err:
        log(ERROR, str(err))
        return -1
    except Exception:  # the plugin must report, never crash Slurm
        _log_exception("while starting")
        return -1
    return 0


# ---- option callbacks --------------------------------------------------------------


def on_option(val: int, optarg: str, remote: bool) -> int:
    """Check one option value; a bad value fails the submission (srun/sbatch exit 1)."""
    name = OPTION_NAMES.get(val, str(val))
    try:
        if remote:
            handle_remote_option(val, optarg)
        else:
            handle_option(val, optarg)
    except ShifterError as err:
        log(ERROR, f"--{name}: {err}")
        return -1
    except Exception:  # the plugin must report, never crash srun
        _log_exception(f"while checking --{name}")
        return -1
    return 0


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


def handle_option(val: int, optarg: str) -> None:
    """srun, sbatch, salloc: parse and check the user's value."""
    from .options import parse_modules, parse_volumes
    from .reference import ImageRequest

    if val == OPT_IMAGE:
        default_type = str(state.config.get("default_image_type", "docker"))
        state.image = str(ImageRequest.parse(optarg, default_type))
    elif val == OPT_VOLUME:
        parse_volumes([optarg])
        if not state.volumes and _inherited_volumes(optarg):
            # srun inside a job: Slurm replays the job's last --volume first; the job's
            # submission exported all of them.
            state.volumes = [_inherited_volumes(optarg) or optarg]
            state.volumes_from_job = True
        elif state.volumes_from_job:
            # srun's own --volume replaces the job's, as srun options do.
            state.volumes = [optarg]
            state.volumes_from_job = False
        else:
            state.volumes.append(optarg)
    elif val == OPT_MODULE:
        state.modules = ",".join(parse_modules(optarg))
    else:
        raise ShifterError(f"unknown option number {val}")


def _inherited_volumes(optarg: str) -> str | None:
    """Every volume of the enclosing job when ``optarg`` is the value Slurm replays from it."""
    if os.environ.get(INHERITED_OPTION + "volume") != optarg:
        return None
    return os.environ.get(JOB_CONTROL_PREFIX + ENV_VOLUME) or os.environ.get(ENV_VOLUME)


# ---- hooks ---------------------------------------------------------------------------


def on_hook(hook: str, handle: object, args: list[str]) -> int:
    """Run one SPANK callback; 0 on success, -1 (with a logged reason) on failure."""
    function = HOOKS.get(hook)
    if function is None:
        return 0
    try:
        function(Spank(handle))
    except ShifterError as err:
        log(ERROR, str(err))
        return -1
    except Exception:  # report through Slurm, never crash slurmstepd
        _log_exception(f"in {hook}")
        return -1
    return 0


def _exports() -> dict[str, str]:
    from .options import format_volumes, parse_volumes

    exports: dict[str, str] = {}
    if state.image is not None:
        exports[ENV_IMAGEREQUEST] = state.image
    if state.volumes:
        exports[ENV_VOLUME] = format_volumes(parse_volumes(state.volumes))
    if state.modules is not None:
        exports[ENV_MODULE] = state.modules
    return exports


def hook_init_post_opt(spank: Spank) -> None:
    """Submission side: export the checked values to the job (environment and prolog)."""
    if spank.context not in ("local", "allocator"):
        return
    if state.image is None and (state.volumes or state.modules is not None):
        raise ShifterError("--volume and --module need --image", hint="add --image=NAME")
    exports = _exports()
    for name, value in exports.items():
        os.environ[name] = value  # carried into the job's environment
        spank.job_control_setenv(name, value)  # seen by the prolog as SPANK_<name>
    log(INFO, f"{spank.context}: " + " ".join(f"{k}={v}" for k, v in exports.items()))


def hook_user_init(spank: Spank) -> None:
    """A step starts on a node: make sure its tasks see the request, and say so."""
    if state.image is None:
        return
    for name in EXPORTED:
        # The job-control copy survives sbatch --export=NONE; the task's own wins.
        if spank.getenv(name) is None:
            value = spank.getenv(JOB_CONTROL_PREFIX + name)
            if value is not None:
                spank.setenv(name, value)
    node = spank.getenv("SLURMD_NODENAME") or os.environ.get("SLURMD_NODENAME", "?")
    log(
        INFO,
        f"user_init: job {spank.item_u32('S_JOB_ID')} step {spank.item_u32('S_JOB_STEPID')} "
        f"on node {node}: image {spank.getenv(ENV_IMAGEREQUEST) or state.image}",
    )


def _job_script(what: str) -> None:
    request = os.environ.get("SPANK_" + ENV_IMAGEREQUEST)
    if request is None:
        return
    log(
        INFO,
        f"{what}: job {os.environ.get('SLURM_JOB_ID', '?')} on node "
        f"{os.environ.get('SLURMD_NODENAME', '?')}: image {request}",
    )


def hook_job_prolog(spank: Spank) -> None:
    _job_script("prolog")


def hook_job_epilog(spank: Spank) -> None:
    _job_script("epilog")


HOOKS = {
    "init_post_opt": hook_init_post_opt,
    "user_init": hook_user_init,
    "job_prolog": hook_job_prolog,
    "job_epilog": hook_job_epilog,
}
