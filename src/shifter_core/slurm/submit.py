"""The submission side (``srun``, ``sbatch``, ``salloc``; runs as the user): check the
user's option values, resolve the image (pulling it first when the gateway does not have
it, :func:`pull_image`), export the request to the job, its prolog and its steps
(:mod:`.names`). A bad value fails the submission before any job exists.
"""

from __future__ import annotations

import os

from ..errors import ShifterError, escape
from .api import ERROR, INFO, Spank, log
from .names import (
    ENV_CONTAINER_STEP,
    ENV_IMAGE,
    ENV_IMAGEREQUEST,
    ENV_MODULE,
    ENV_VOLUME,
    INHERITED_OPTION,
    JOB_CONTROL_PREFIX,
    OPT_IMAGE,
    OPT_IMAGE_PULL,
    OPT_MODULE,
    OPT_VOLUME,
    PULL_MISSING,
    PULL_MODES,
    PULL_NEVER,
)
from .state import state

TYPE_CHECKING = False  # typing costs start-up time on this path
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any

    from ..client import GatewayClient, GatewayError
    from ..gateway.models import JobInfo

# --image-pull of this submission (None: not given, the site's slurm.pull_on_submit rules).
image_pull: str | None = None


def handle_option(val: int, optarg: str) -> None:
    """srun, sbatch, salloc: parse and check the user's value."""

    if val == OPT_IMAGE:
        state.image_values.append(optarg)
        state.image_text = optarg  # SHIFTER_IMAGEREQUEST: the text as typed
        if optarg == os.environ.get(INHERITED_OPTION + "image") and os.environ.get(
            ENV_IMAGEREQUEST
        ):
            # The job's own --image, checked when the job was submitted.
            state.image = canonical_request(optarg)
            return
        from ..reference import ImageRequest

        state.image = str(ImageRequest.parse(optarg, state.site.default_image_type))
    elif val == OPT_VOLUME:
        from ..options import parse_volumes

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
        from ..options import parse_modules

        state.modules = ",".join(parse_modules(optarg))
    elif val == OPT_IMAGE_PULL:
        global image_pull
        image_pull = _pull_mode(optarg)
    else:
        raise ShifterError(f"unknown option number {val}")


def _pull_mode(optarg: str) -> str:
    """The value of ``--image-pull``: one of :data:`.names.PULL_MODES`."""
    mode = optarg.strip().lower()
    if mode not in PULL_MODES:
        raise ShifterError(
            f"unknown value {optarg[:40]!r}",
            hint="give missing or never (never: refuse an image the gateway does not have)",
        )
    return mode


def _inherited_volumes(optarg: str) -> str | None:
    """Every volume of the enclosing job when ``optarg`` is the value Slurm replays from it."""
    if os.environ.get(INHERITED_OPTION + "volume") != optarg:
        return None
    return os.environ.get(JOB_CONTROL_PREFIX + ENV_VOLUME) or os.environ.get(ENV_VOLUME)


def canonical_request(text: str) -> str:
    """``TYPE:TAG`` of a request that was checked before (the job's own ``--image``), as
    ``str(ImageRequest.parse(text))`` gives it, without compiling its grammar (every srun
    of the job pays for that)."""
    kind, sep, rest = text.partition(":")
    if sep and kind == "id":
        return "id:" + rest.removeprefix("sha256:")
    if sep and kind == "docker":
        return text
    return f"{state.site.default_image_type}:{text}"


def _exports() -> dict[str, str]:
    exports: dict[str, str] = {}
    if state.image is not None:
        exports[ENV_IMAGEREQUEST] = state.image_text or state.image
    if state.volumes:
        from ..options import format_volumes, parse_volumes

        exports[ENV_VOLUME] = format_volumes(parse_volumes(state.volumes))
    if state.modules is not None:
        exports[ENV_MODULE] = state.modules
    return exports


def image_inherited() -> bool:
    """True when srun's only --image is the one Slurm replays from the enclosing job."""
    replayed = os.environ.get(INHERITED_OPTION + "image")
    return replayed is not None and state.image_values == [replayed]


def _confirmed(claimed: str, request: str, image_path: str, uid: int, gids: set[int]) -> bool:
    """Whether the store's own record of ``claimed`` confirms it for ``request``: a complete
    image whose source is the request's name (or whose id the request gives) and whose ACL
    admits the caller (:func:`shifter_core.access.visible`). Imports nothing but that rule,
    which imports nothing: every srun pays for it."""
    if len(claimed) != 64 or not all(c in "0123456789abcdef" for c in claimed):
        return False
    kind, _, text = request.partition(":")
    if kind == "id":  # the claimed id must be the one asked for (12 digits or more)
        prefix = text.removeprefix("sha256:")
        wanted = None if len(prefix) >= 12 and claimed.startswith(prefix) else ""
    else:  # what the store records as its source (a malformed text matches nothing)
        from ..hubnames import canonical

        wanted = canonical(text)
    try:
        with open(os.path.join(image_path, f"{claimed}.json"), encoding="utf-8") as fh:
            raw = fh.read(1 << 20)
        try:  # json's C parser alone: importing json compiles regexes (~15 ms a step)
            from _json import make_scanner

            class Context:
                strict = True
                object_hook = object_pairs_hook = parse_constant = None
                parse_float, parse_int = float, int

                def __init__(self) -> None:
                    self.memo: dict[str, str] = {}

            # the scanner takes any object with a JSONDecoder's attributes
            scan = make_scanner(Context())  # type: ignore[arg-type]
            record = scan(raw, 0)[0]
        except ImportError:
            import json

            record = json.loads(raw)
        from ..access import AclMembers, Viewer, visible  # imports nothing itself

        acl = record.get("acl")
        users, groups = (acl.get("users", ()), acl.get("groups", ())) if acl else ((), ())
        members = None if acl is None else AclMembers(users, groups)
        if (
            kind in ("id", "docker")
            and wanted != ""
            and record.get("id") == claimed
            and (wanted is None or record.get("source") == wanted)
            and visible(Viewer(uid, gids), members)
            and os.path.exists(os.path.join(image_path, f"{claimed}.squashfs"))
        ):
            return True
    except (OSError, ValueError, AttributeError, TypeError, StopIteration):
        pass  # not confirmed
    return False


def resolve_image(request: str) -> str:
    """The image id of ``request``, as the gateway resolves it (applying the image's ACL).

    No claim stands in for that lookup unless the store's own record of the claimed id
    (root- or service-owned) confirms it (:func:`_confirmed`). Claims come from the job (a
    step of a job made with the same ``--image`` has its ``SHIFTER_IMAGE``) or from the
    user's cache of what the gateway answered for this request less than
    ``runtime.launcher_name_ttl`` seconds ago (:mod:`shifter_core.usercache`): so the
    steps of an allocation made without ``--image`` ask the gateway once. When the gateway
    cannot be reached, the store answers (public images for all, private ones for their
    ACL), with a warning to the user. A name the gateway does not have is pulled first
    (:func:`pull_image`) where the site (``slurm.pull_on_submit``) and the user
    (``--image-pull``) allow it.
    """
    import time

    from ..usercache import claimed_id, remember

    image_path = state.site.image_path
    uid, gids = os.getuid(), {os.getgid(), *os.getgroups()}
    now = time.time()
    claims = []
    if canonical_request(os.environ.get(ENV_IMAGEREQUEST) or ":") == request:
        claims.append(os.environ.get(ENV_IMAGE, ""))
    claims.append(claimed_id(uid, gids, os.environ, request, now) or "")
    for claimed in claims:
        if _confirmed(claimed, request, image_path, uid, gids):
            return claimed
    from ..client import GatewayClient, GatewayError, GatewayUnreachable

    url = state.site.gateway.url
    try:
        with GatewayClient(url, timeout=30.0, gateway_user=state.site.gateway.user) as client:
            try:
                image_id = client.lookup(request).id
            except GatewayError as err:
                if not _pull_on_demand(request, err):
                    raise
                image_id = pull_image(client, request)
        ttl = state.site.runtime.launcher_name_ttl
        if ttl > 0:
            remember(uid, gids, os.environ, request, image_id, time.time() + ttl)
        return image_id
    except GatewayUnreachable:
        pass
    from ..reference import ImageRequest
    from ..runtime.images import _by_source

    parsed = ImageRequest.parse(request, state.site.default_image_type)
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


# -- pull on demand ------------------------------------------------------------------------


def _pull_on_demand(request: str, err: GatewayError) -> bool:
    """Whether the gateway's refusal ``err`` to look ``request`` up is answered with a pull:
    a name (not an id) it does not have, where the site and the user allow pulls."""
    if err.status != 404 or not request.startswith("docker:"):
        return False
    if image_pull == PULL_NEVER:
        return False
    if not state.site.slurm.pull_on_submit:
        if image_pull == PULL_MISSING:
            raise ShifterError(
                str(err), hint="this site does not pull images at submission (slurm.pull_on_submit)"
            )
        return False
    return True


def notice(message: str) -> None:
    """A line the user sees by default: Slurm's ``info`` (``srun: shifter: ...`` on stderr;
    ``-Q`` hides it), escaped like :func:`.api.log`, whose ``info`` waits for ``-v`` on the
    submission side."""
    from . import api

    lib, ffi = api._lib, api._ffi
    if lib is None:
        return
    lib.slurm_info(b"%s", ffi.new("char[]", ("shifter: " + escape(message, 4000)).encode()))


def _registry_secret(name: str) -> dict[str, str] | None:
    """The user's stored credentials for the registry of ``name`` (``shifterimg login``), as
    ``shifterimg pull`` sends them: the pulled image is then private to the user."""
    from ..image.registry.credentials import CredentialStore
    from ..reference import DockerReference

    registry = DockerReference.parse(name).registry
    creds = CredentialStore().get(registry)
    if creds is None:
        return None
    return {"registry": registry, "username": creds[0], "password": creds[1]}


class _PlainProgress:
    """Progress as plain lines (not a terminal): one per state until the result."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.state: str | None = None

    def __enter__(self) -> _PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, job: JobInfo) -> None:
        from ..gateway.models import FINAL_STATES

        if job.state != self.state and job.state not in FINAL_STATES:
            notice(f"{self.name}: {job.state}")
        self.state = job.state


class _LiveProgress:
    """Progress on a terminal (stderr): a rich bar with the state, bytes, rate and layers,
    removed when the pull ends."""

    def __init__(self, name: str, stream: Any) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn(f"{escape(name, 60)} {{task.description:<10}}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[layers]}"),
            TimeElapsedColumn(),
            console=Console(file=stream, highlight=False),
            transient=True,
        )
        self.task = self.progress.add_task("PENDING", total=None, layers="")

    def __enter__(self) -> _LiveProgress:
        self.progress.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()

    def update(self, job: JobInfo) -> None:
        from ..gateway.models import JobState

        info = job.progress
        values: dict[str, Any] = {"description": str(job.state)}
        if info is not None and info.layers:
            done = sum(1 for layer in info.layers if layer.complete)
            values.update(
                total=info.total or None,
                completed=info.done,
                layers=f"layers {done}/{len(info.layers)}",
            )
            if job.state in (JobState.CONVERTING, JobState.READY) and info.total:
                values["completed"] = info.total
        self.progress.update(self.task, **values)


def pull_image(client: GatewayClient, request: str) -> str:
    """Pull ``request`` (``docker:NAME``) through the gateway as ``shifterimg pull NAME``
    would, wait for it and return the image's id; a failed pull is a :class:`ShifterError`
    with the gateway's message. The gateway gives identical concurrent pulls one job, so
    identical submissions share it. Progress goes to the user's stderr: a live bar on a
    terminal, else a line per state."""
    import sys

    from ..gateway.models import FINAL_STATES, JobState

    name = request.removeprefix("docker:")
    job = client.pull(name, secret=_registry_secret(name))
    notice(f"{name}: pulling {job.reference} ({job.platform}), gateway job {job.id}")
    stream = sys.stderr
    tty = stream is not None and stream.isatty()
    display = _LiveProgress(name, stream) if tty else _PlainProgress(name)

    def lost(err: ShifterError) -> None:
        notice(f"{name}: {err}; retrying (the pull goes on on the gateway)")

    with display:
        display.update(job)
        if job.state not in FINAL_STATES:
            # Each status request waits at the gateway for a change: a state change shows
            # at once; a terminal's bar moves every half second.
            interval = 0.5 if tty else 10.0
            job = client.wait(job.id, display.update, interval=interval, on_disconnect=lost)
    if job.state != JobState.READY or not job.image_id:
        reason = job.message or f"gateway job {job.id} ended {job.state}"
        raise ShifterError(f"cannot pull image {name}: {reason}")
    notice(f"image {name} pulled: {job.image_id[:12]}")
    return job.image_id


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


