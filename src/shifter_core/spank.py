"""The Python side of the SPANK plugin: every Slurm callback lands here.

The C shim (``spank/shifter_spank.c``) registers ``--image``, ``--volume`` and
``--module``, starts Python only in processes where one of them is used (or in the
prolog/epilog of a job that used them), and forwards each callback to :func:`on_hook`
or :func:`on_option`. Where each callback runs (observed on Slurm 22.05):

- ``srun`` (local): init → options → init_post_opt → exit
- ``sbatch``/``salloc`` (allocator): init → options → init_post_opt → exit
- ``slurmstepd`` (remote, every step): init → options (twice) → init_post_opt →
  user_init → per task task_init_privileged → task_init; exit
- prolog/epilog (job_script): job_prolog or job_epilog alone (the epilog in every job)

The shim forwards only the callbacks in :data:`HOOKS`.

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

from .errors import ShifterError, escape

OPT_IMAGE, OPT_VOLUME, OPT_MODULE = 0, 1, 2
OPTION_NAMES = {OPT_IMAGE: "image", OPT_VOLUME: "volume", OPT_MODULE: "module"}
ENV_IMAGEREQUEST = "SHIFTER_IMAGEREQUEST"
ENV_VOLUME = "SHIFTER_VOLUME"
ENV_MODULE = "SHIFTER_MODULE"
ENV_IMAGE = "SHIFTER_IMAGE"
# Set by srun for a step whose tasks run in the container (an explicit --image); sruns that
# only inherit the job's --image (e.g. `srun shifter ...` in a batch job) set it to 0.
ENV_CONTAINER_STEP = "SHIFTER_CONTAINER_STEP"
EXPORTED = (ENV_IMAGE, ENV_IMAGEREQUEST, ENV_VOLUME, ENV_MODULE, ENV_CONTAINER_STEP)
SLURM_BATCH_SCRIPT = 0xFFFFFFFB
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
        self.image_values: list[str] = []  # every --image value srun saw, replays included
        # A container step (slurmstepd): the root its tasks enter, and their environment.
        self.step_root: str | None = None
        self.step_env: list[list[str]] = []
        self.step_error: str | None = None
        self.step_own_root: tuple[str, str] | None = None  # (job directory, step) to remove


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
    # Escaped: user text (image names, volumes, paths) must not forge lines in root's logs.
    text = _ffi.new("char[]", ("shifter: " + escape(message, 4000)).encode())
    if level == ERROR:
        _lib.slurm_error(b"%s", text)
    elif level == INFO and _lib.spank_context() in (_lib.S_CTX_LOCAL, _lib.S_CTX_ALLOCATOR):
        _lib.slurm_verbose(b"%s", text)
    elif level == INFO:
        _lib.slurm_info(b"%s", text)
    else:
        _lib.slurm_debug(b"%s", text)


def _log_exception(what: str) -> None:
    """One line for the user (srun's stderr shows errors); the traceback at debug level, in
    slurmd's log with ``SlurmdDebug=debug`` (or ``srun -vv``)."""
    import sys
    import traceback

    log(ERROR, f"internal error {what}: {sys.exc_info()[1]!r}")
    for line in traceback.format_exc().splitlines():
        log(DEBUG, line)


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

    if val == OPT_IMAGE:
        state.image_values.append(optarg)
        if optarg == os.environ.get(INHERITED_OPTION + "image") and os.environ.get(
            ENV_IMAGEREQUEST
        ):
            # The job's own --image, checked when the job was submitted.
            state.image = os.environ[ENV_IMAGEREQUEST]
            return
        from .reference import ImageRequest

        default_type = str(state.config.get("default_image_type", "docker"))
        state.image = str(ImageRequest.parse(optarg, default_type))
    elif val == OPT_VOLUME:
        from .options import parse_volumes

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
        from .options import parse_modules

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
    exports: dict[str, str] = {}
    if state.image is not None:
        exports[ENV_IMAGEREQUEST] = state.image
    if state.volumes:
        from .options import format_volumes, parse_volumes

        exports[ENV_VOLUME] = format_volumes(parse_volumes(state.volumes))
    if state.modules is not None:
        exports[ENV_MODULE] = state.modules
    return exports


def image_inherited() -> bool:
    """True when srun's only --image is the one Slurm replays from the enclosing job."""
    replayed = os.environ.get(INHERITED_OPTION + "image")
    return replayed is not None and state.image_values == [replayed]


def resolve_image(request: str) -> str:
    """The image id of ``request``, as the gateway resolves it (applying the image's ACL).

    No variable of the environment stands in for that lookup. A step of a job made with
    the same ``--image`` reuses the job's ``SHIFTER_IMAGE`` only once the store's own
    record of that id (root- or service-owned) confirms it: a complete image whose source
    is ``request`` and whose ACL admits the caller. That check is kept free of imports
    (every srun pays for it); anything it cannot confirm goes to the gateway. When the
    gateway cannot be reached, the store answers (public images for all, private ones for
    their ACL), with a warning to the user.
    """
    image_path = str(state.config.get("image_path", ""))
    uid, gids = os.getuid(), {os.getgid(), *os.getgroups()}
    claimed = os.environ.get(ENV_IMAGE, "")
    if (
        os.environ.get(ENV_IMAGEREQUEST) == request
        and len(claimed) == 64
        and all(c in "0123456789abcdef" for c in claimed)
    ):
        kind, _, text = request.partition(":")
        if kind == "id":  # the claimed id must be the one asked for (12 digits or more)
            prefix = text.removeprefix("sha256:")
            wanted = None if len(prefix) >= 12 and claimed.startswith(prefix) else ""
        else:  # Docker Hub's naming rules, as DockerReference applies them
            first, slash, _ = text.partition("/")
            if not slash:
                wanted = f"docker.io/library/{text}"
            elif "." in first or ":" in first or first == "localhost":
                wanted = text
            else:
                wanted = f"docker.io/{text}"
            last = wanted.rsplit("/", 1)[-1]
            if ":" not in last and "@" not in last:
                wanted += ":latest"
        try:
            with open(os.path.join(image_path, f"{claimed}.json"), encoding="utf-8") as fh:
                raw = fh.read(1 << 20)
            try:  # json's C parser alone: importing json compiles regexes (~15 ms a step)
                from _json import make_scanner

                class Context:
                    strict, memo = True, {}
                    object_hook = object_pairs_hook = parse_constant = None
                    parse_float, parse_int = float, int

                record = make_scanner(Context())(raw, 0)[0]
            except ImportError:
                import json

                record = json.loads(raw)
            acl = record.get("acl")
            if (
                kind in ("id", "docker")
                and wanted != ""
                and record.get("id") == claimed
                and (wanted is None or record.get("source") == wanted)
                and (
                    acl is None
                    or uid in acl.get("users", ())
                    or any(g in acl.get("groups", ()) for g in gids)
                )
                and os.path.exists(os.path.join(image_path, f"{claimed}.squashfs"))
            ):
                return claimed
        except (OSError, ValueError, AttributeError, TypeError, StopIteration):
            pass  # not confirmed: ask the gateway
    from .client import GatewayClient, GatewayUnreachable

    gateway = state.config.get("gateway", {})
    url = str(gateway.get("url")) if isinstance(gateway, dict) else ""
    try:
        with GatewayClient(url, timeout=30.0) as client:
            image = client.lookup(request)
        return str(image["id"])
    except GatewayUnreachable:
        pass
    from .reference import ImageRequest
    from .runtime.images import _by_source

    parsed = ImageRequest.parse(request, str(state.config.get("default_image_type", "docker")))
    found = _by_source(image_path, parsed, uid, gids)
    if found is None:
        raise ShifterError(
            f"image {parsed.tag!r} is not in the image store, and the image gateway at {url} "
            "cannot be reached",
            hint="try again later, or tell your site's support that the gateway is down",
        )
    log(
        ERROR,
        f"warning: the image gateway at {url} cannot be reached; "
        f"using image {parsed.tag} ({found.id[:12]}) from the image store",
    )
    return str(found.id)


def hook_init_post_opt(spank: Spank) -> None:
    """Submission side: resolve the image, export everything to the job and its prolog."""
    if spank.context not in ("local", "allocator"):
        return
    if state.image is None and (state.volumes or state.modules is not None):
        raise ShifterError("--volume and --module need --image", hint="add --image=NAME")
    exports = _exports()
    if state.image is not None:
        exports[ENV_IMAGE] = resolve_image(state.image)
        if spank.context == "local":
            exports[ENV_CONTAINER_STEP] = "0" if image_inherited() else "1"
    for name, value in exports.items():
        os.environ[name] = value  # carried into the job's environment
        spank.job_control_setenv(name, value)  # seen by the prolog as SPANK_<name>
    log(INFO, f"{spank.context}: " + " ".join(f"{k}={v}" for k, v in exports.items()))


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
        slurm = state.config.get("slurm", {})
        container = isinstance(slurm, dict) and bool(slurm.get("batch_step"))
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
    from . import steps
    from .jobdirs import job_dir

    runtime = state.config.get("runtime", {})
    run_dir = str(runtime.get("run_dir", "/run/shifter")) if isinstance(runtime, dict) else ""
    request = {
        "image_id": spank.getenv(ENV_IMAGE) or "",
        "image_request": spank.getenv(ENV_IMAGEREQUEST) or state.image or "",
        "volume": spank.getenv(ENV_VOLUME) or "",
        "module": spank.getenv(ENV_MODULE) or "",
    }
    try:
        directory = job_dir(run_dir, node, job)
        found = steps.job_root_for(directory, request)
        if found is None:
            problem = steps.prolog_error(directory)
            if problem is not None and request["image_id"] == spank.getenv(
                JOB_CONTROL_PREFIX + ENV_IMAGE
            ):
                raise ShifterError(f"the container of this job could not be set up: {problem}")
            uid = spank.item_u32("S_JOB_UID")
            gid = spank.item_u32("S_JOB_GID")
            euid = os.geteuid()
            os.seteuid(0)
            state.step_own_root = (directory, step)  # removed at exit, even if it fails
            try:
                found = steps.prepare_step_root(
                    state.args.get("config"),
                    directory,
                    step,
                    request,
                    int(uid or 0),
                    int(gid or 0),
                )
            finally:
                os.seteuid(euid)
            log(INFO, f"step {job}.{step} on {node}: prepared a root of its own")
        state.step_root, state.step_env = found
        from . import syscalls  # noqa: F401 - once here, not in every forked task
    except ShifterError as err:
        state.step_error = str(err)
    except Exception as err:  # reported by every task; the details go to slurmd's log
        _log_exception(f"preparing step {job}.{step}")
        state.step_error = f"internal error: {err}"


def hook_task_init_privileged(spank: Spank) -> None:
    """In each task (root, just forked): enter the container before Slurm drops to the user."""
    if state.step_error is not None:
        raise ShifterError(state.step_error)
    if state.step_root is None:
        return
    from . import steps

    steps.enter_root(state.step_root)
    steps.drop_bounding_set()
    for name, value in state.step_env:
        spank.setenv(name, value)


def hook_task_init(spank: Spank) -> None:
    """In each task, as the user, just before exec: nothing may gain privilege any more."""
    if state.step_root is not None:
        from . import steps

        steps.set_no_new_privs()


def hook_exit(spank: Spank) -> None:
    """slurmstepd is done with the step: remove a root the step made for itself."""
    if state.step_own_root is None or spank.context != "remote":
        return
    from . import steps

    directory, step = state.step_own_root
    state.step_own_root = None
    for problem in steps.teardown_step_root(directory, step):
        log(ERROR, f"step {step}: {problem}")


class _SlurmLogHandler:
    """Route :mod:`logging` records of the prolog's modules to Slurm's log."""

    @staticmethod
    def install() -> None:
        import logging

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                level = ERROR if record.levelno >= logging.WARNING else INFO
                if record.levelno < logging.INFO:
                    level = DEBUG
                log(level, self.format(record))

        root = logging.getLogger("shifter_core")
        root.addHandler(Handler())
        root.setLevel(logging.INFO)


def _job_script(what: str) -> None:
    """The prolog or epilog. Slurm drains a node whose prolog or epilog fails, so only a
    fault of the node may fail them (:class:`~shifter_core.errors.NodeFault`, or a
    configuration root cannot read); the job's errors are recorded and shown to its user.
    The epilog runs for every job (steps of jobs without --image may have made roots) and
    never fails."""
    shifter_job = os.environ.get("SPANK_" + ENV_IMAGEREQUEST) is not None
    if what == "prolog" and not shifter_job:
        return
    from . import prolog
    from .config import load

    _SlurmLogHandler.install()
    config = load(state.args.get("config"), privileged=True)
    node, job = os.environ.get("SLURMD_NODENAME", ""), os.environ.get("SLURM_JOB_ID", "")
    if what == "epilog":
        from .jobdirs import job_dir

        if shifter_job or os.path.lexists(job_dir(config.runtime.run_dir, node, job)):
            log(INFO, f"epilog: job {job} on node {node}")
            prolog.epilog(config, node, job)
        return
    log(INFO, f"prolog: job {job} on node {node}: image {os.environ['SPANK_' + ENV_IMAGEREQUEST]}")
    problem = prolog.prolog(config, os.environ)
    if problem is not None:
        _tell_job(job, problem)


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
        log(ERROR, f"cannot set the admin comment of job {job}: {err}")


def hook_job_prolog(spank: Spank) -> None:
    _job_script("prolog")


def hook_job_epilog(spank: Spank) -> None:
    try:
        _job_script("epilog")
    except Exception as err:  # the epilog always succeeds: a failed one drains the node
        log(ERROR, f"epilog: {err} (the node was not drained; fix and sweep)")


HOOKS = {
    "init_post_opt": hook_init_post_opt,
    "user_init": hook_user_init,
    "task_init_privileged": hook_task_init_privileged,
    "task_init": hook_task_init,
    "exit": hook_exit,
    "job_prolog": hook_job_prolog,
    "job_epilog": hook_job_epilog,
}
