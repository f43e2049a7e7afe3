"""The submission side (``srun``, ``sbatch``, ``salloc``; runs as the user): check the
user's option values, resolve the image, export the request to the job, its prolog and its
steps (:mod:`.names`). A bad value fails the submission before any job exists.
"""

from __future__ import annotations

import os

from ..errors import ShifterError
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
    OPT_MODULE,
    OPT_VOLUME,
)
from .state import state


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
    else:
        raise ShifterError(f"unknown option number {val}")


def _inherited_volumes(optarg: str) -> str | None:
    """Every volume of the enclosing job when ``optarg`` is the value Slurm replays from it."""
    if os.environ.get(INHERITED_OPTION + "volume") != optarg:
        return None
    return os.environ.get(JOB_CONTROL_PREFIX + ENV_VOLUME) or os.environ.get(ENV_VOLUME)


def _exports() -> dict[str, str]:
    exports: dict[str, str] = {}
    if state.image is not None:
        exports[ENV_IMAGEREQUEST] = state.image
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
    ACL), with a warning to the user.
    """
    import time

    from ..usercache import claimed_id, remember

    image_path = state.site.image_path
    uid, gids = os.getuid(), {os.getgid(), *os.getgroups()}
    now = time.time()
    claims = []
    if os.environ.get(ENV_IMAGEREQUEST) == request:
        claims.append(os.environ.get(ENV_IMAGE, ""))
    claims.append(claimed_id(uid, gids, os.environ, request, now) or "")
    for claimed in claims:
        if _confirmed(claimed, request, image_path, uid, gids):
            return claimed
    from ..client import GatewayClient, GatewayUnreachable

    url = state.site.gateway.url
    try:
        with GatewayClient(url, timeout=30.0) as client:
            image_id = client.lookup(request).id
        ttl = state.site.runtime.launcher_name_ttl
        if ttl > 0:
            remember(uid, gids, os.environ, request, image_id, now + ttl)
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


