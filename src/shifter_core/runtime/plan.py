"""The plan: everything a container needs, as pure data, and the one builder of it.

A :class:`RunRequest` is what a user asked for (from ``shifter``'s options, from Slurm's
``--image``/``--volume``/``--module`` or from a job's ``SHIFTER_*`` environment);
:func:`build_plan` checks it against the site configuration and the image and returns a
:class:`Plan`, which both realisations (privileged and unprivileged) carry out.

Environment precedence, lowest first: the caller's environment (dropped by ``--clearenv``),
the image's ``ENV``, ``--env-file``, ``--env``, modules (in load order), the site
(``runtime.env``); then ``SHIFTER_IMAGE``, ``SHIFTER_IMAGEREQUEST`` and ``SHIFTER_RUNTIME=1``.
"""

from __future__ import annotations

import os
from collections import namedtuple
from collections.abc import Iterable, Mapping

from ..errors import OptionError
from ..options import Volume, format_volumes, parse_modules, parse_size, parse_volumes, shown
from ._log import get_logger
from .errors import ContainerError, PrivilegeError, VolumeError
from .modules import select_modules

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time

if TYPE_CHECKING:

    from ..config import Config, EnvChanges, ModuleConfig, RuntimeConfig
    from ..image.store import ImageMetadata

log = get_logger(__name__)

ENV_IMAGE = "SHIFTER_IMAGE"
ENV_IMAGETYPE = "SHIFTER_IMAGETYPE"
ENV_IMAGEREQUEST = "SHIFTER_IMAGEREQUEST"
ENV_VOLUME = "SHIFTER_VOLUME"
ENV_MODULE = "SHIFTER_MODULE"
ENV_RUNTIME = "SHIFTER_RUNTIME"
DEFAULT_SHELL = "/bin/sh"


# Named tuples, not dataclasses: ``shifter`` imports this for every container and the
# dataclasses module (with inspect) costs more to import than the plan costs to build.
_User = namedtuple(
    "_User",
    "uid gid groups name home shell gecos group_names",
    defaults=("/", DEFAULT_SHELL, "", ()),
)


class User(_User):
    """Who the container runs as (never root): ``uid``, ``gid``, ``groups`` (the primary
    first), ``name``, ``home``, ``shell``, ``gecos``, ``group_names`` ((gid, name), ...)."""

    __slots__ = ()

    @classmethod
    def from_uid(
        cls, uid: int, gid: int | None = None, groups: Iterable[int] | None = None
    ) -> User:
        """Look a user up (name, home, shell, groups) in the host's user database."""
        import grp
        import pwd

        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            name, home, shell, gecos, primary = f"uid{uid}", "/", DEFAULT_SHELL, "", uid
        else:
            name, home, shell, gecos = entry.pw_name, entry.pw_dir, entry.pw_shell, entry.pw_gecos
            primary = entry.pw_gid
        gid = primary if gid is None else gid
        if groups is None:
            try:
                groups = os.getgrouplist(name, gid)
            except OSError:
                groups = [gid]
        ordered = [gid, *sorted({g for g in groups if g != gid})]
        names = []
        for g in ordered:
            try:
                names.append((g, grp.getgrgid(g).gr_name))
            except KeyError:
                continue
        return cls(
            uid, gid, tuple(ordered), name, home, shell or DEFAULT_SHELL, gecos, tuple(names)
        )

    @classmethod
    def current(cls) -> User:
        """The calling process's user, groups included."""
        return cls.from_uid(os.getuid(), os.getgid(), os.getgroups())


_RunRequest = namedtuple(
    "_RunRequest",
    "image volumes modules env env_files clearenv entrypoint workdir command writable_tmpfs",
    defaults=(None, (), None, (), (), False, None, None, (), False),
)


class RunRequest(_RunRequest):
    """What was asked for, unchecked: ``image`` (``--image`` text), ``volumes`` (``-V``
    values), ``modules`` (``--module`` value), ``env`` (``K=V``), ``env_files``,
    ``clearenv``, ``entrypoint`` and ``workdir`` (None: not given, "": the image's, else the
    value given), ``command``, ``writable_tmpfs``."""

    __slots__ = ()


_EnvImage = namedtuple("_EnvImage", "image request keyed")


class EnvImage(_EnvImage):
    """The image the environment names: ``image`` (``TYPE:NAME``), ``request`` (what
    ``SHIFTER_IMAGEREQUEST`` says in the container; None: ``image`` itself) and ``keyed``
    (every variable it came from is in the C launcher's cache key, so a recipe may be left)."""

    __slots__ = ()


def image_from_env(environ: Mapping[str, str]) -> EnvImage | None:
    """The image ``shifter`` runs without ``--image``, first found:

    1. ``SHIFTER_IMAGETYPE`` and ``SHIFTER_IMAGE`` together, as NERSC Shifter reads them
       (``docker`` and ``ubuntu:22.04``; ``id`` and an image id);
    2. ``SHIFTER_IMAGE`` alone: the image id a Slurm job made with ``--image`` has
       (``SHIFTER_IMAGEREQUEST`` holds what was asked for);
    3. ``SHIFTER_IMAGEREQUEST`` alone.

    A type without an image is ignored, as Shifter ignores it. OptionError names the
    variable when a value is not an image.
    """
    from ..reference import IMAGE_TYPES, ImageRequest

    value = environ.get(ENV_IMAGE, "").strip()
    image_type = environ.get(ENV_IMAGETYPE, "").strip().lower()
    if image_type and value:
        if image_type not in IMAGE_TYPES:
            raise OptionError(
                f"{ENV_IMAGETYPE}={shown(image_type)} is not an image type",
                hint=f"use one of {', '.join(IMAGE_TYPES)} "
                f"(e.g. {ENV_IMAGETYPE}=docker {ENV_IMAGE}=ubuntu:22.04), or --image",
            )
        if value.startswith(image_type + ":"):  # the type given twice, as Shifter allows
            value = value[len(image_type) + 1 :]
        text = f"{image_type}:{value}"
        try:
            request = ImageRequest.parse(text)
        except OptionError as err:
            raise OptionError(
                f"{ENV_IMAGETYPE}={image_type} {ENV_IMAGE}={shown(value)}: {err.message}",
                hint=err.hint,
            ) from None
        return EnvImage(str(request), None, request.type == "id")
    if value:
        try:
            request = ImageRequest.parse(f"id:{value}")
        except OptionError:
            raise OptionError(
                f"{ENV_IMAGE}={shown(value)} is not an image id (a job made with --image "
                "has one there)",
                hint=f"name the image with --image, or set {ENV_IMAGETYPE} too (e.g. "
                f"{ENV_IMAGETYPE}=docker {ENV_IMAGE}=ubuntu:22.04)",
            ) from None
        return EnvImage(str(request), environ.get(ENV_IMAGEREQUEST, "").strip() or None, True)
    text = environ.get(ENV_IMAGEREQUEST, "").strip()
    return EnvImage(text, None, True) if text else None


def request_from_env(environ: Mapping[str, str], base: RunRequest | None = None) -> RunRequest:
    """Fill in the image the environment names (:func:`image_from_env`) when ``base`` has
    none, with the job's volumes and modules (``SHIFTER_VOLUME``, ``SHIFTER_MODULE``) unless
    ``base`` has its own.

    An explicit ``--image`` means a different container: the job's values are then ignored.
    """
    base = base or RunRequest()
    if base.image is not None:
        return base
    found = image_from_env(environ)
    if found is None:
        return base
    volumes = base.volumes
    if not volumes and environ.get(ENV_VOLUME):
        volumes = (environ[ENV_VOLUME],)
    modules = base.modules if base.modules is not None else environ.get(ENV_MODULE) or None
    return base._replace(image=found.image, volumes=volumes, modules=modules)


_Plan = namedtuple(
    "_Plan",
    "image image_file image_request user volumes site_volumes modules env workdir "
    "workdir_explicit argv runtime writable default_shell clearenv env_ops module_request",
    defaults=(False, False, False, (), ""),
)


class Plan(_Plan):
    """A container, fully decided (realisations only carry it out): ``image`` (metadata),
    ``image_file`` (the squashfs to mount), ``image_request`` (as the user wrote it),
    ``user``, ``volumes`` and ``site_volumes`` (:class:`~shifter_core.options.Volume`),
    ``modules`` ((name, definition), ...), ``env`` ((name, value), ...), ``workdir`` and
    ``workdir_explicit``, ``argv``, ``runtime`` (the ``runtime`` settings), ``writable``
    (``--writable-tmpfs``), ``default_shell`` (argv is the user's shell: ``/bin/sh`` if the
    image lacks it), ``clearenv`` and ``env_ops`` (how ``env`` was made from the caller's
    environment: ``(op, name, value)``, see :func:`env_operations`). Change one with
    ``plan._replace(field=value)``."""

    __slots__ = ()

    @property
    def image_id(self) -> str:
        return str(self.image.id)

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.modules)

    def environ(self) -> dict[str, str]:
        return dict(self.env)

    def root_key(self) -> tuple[int, int, str, str, str, bool]:
        """What determines the mounted root (not env, workdir or command): a root prepared
        for the same key can be entered for this plan (:func:`shifter_core.jobroot.root_key`,
        the one rule)."""
        from ..jobroot import root_key

        return root_key(
            self.user.uid,
            self.user.gid,
            self.image.id,
            format_volumes(self.volumes),
            self.module_request,
            self.writable,
        )


ENV_NAME_RULE = "a name is letters, digits and _, and does not start with a digit"
MAX_ENV_FILE = 1 << 20  # bytes of one --env-file


def env_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an environment variable's name (None: it can)."""
    if not name:
        return "the name before '=' is empty"
    if not name.isascii() or not all(c.isalnum() or c == "_" for c in name):
        return f"the name {shown(name, 64)} has characters other than letters, digits and _"
    if name[0].isdigit():
        return f"the name {shown(name, 64)} starts with a digit"
    return None


def parse_env_assignment(
    text: str, where: str, caller: Mapping[str, str]
) -> tuple[str, str] | None:
    """``NAME=VALUE`` → (NAME, VALUE); a bare ``NAME`` takes the caller's value (None when it
    has none). OptionError says what is wrong with anything else."""
    name, sep, value = text.partition("=")
    problem = "it is empty" if not text else env_name_problem(name)
    if problem is None and "\0" in value:
        problem = "the value contains a NUL byte"
    if problem is not None:
        raise OptionError(
            f"invalid environment variable {shown(text, 80)} in {where}: {problem}",
            hint=ENV_NAME_RULE if name else "use NAME=VALUE (e.g. OMP_NUM_THREADS=4)",
        )
    if not sep:
        return (name, caller[name]) if name in caller else None
    return name, value


def check_env_options(texts: Iterable[str]) -> None:
    """Refuse a malformed ``--env`` (OptionError) before anything else is done."""
    for text in texts:
        parse_env_assignment(text, "--env", {})


def read_env_file(path: str, caller: Mapping[str, str]) -> list[tuple[str, str]]:
    """``--env-file``: ``NAME=VALUE`` lines (``export NAME=VALUE`` too); blank lines and ``#``
    comments are skipped; a bare ``NAME`` copies the caller's value. Values are taken
    literally (no quotes, no expansion). Read on the host, as the caller, at most
    :data:`MAX_ENV_FILE` bytes."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_ENV_FILE + 1)
    except OSError as err:
        raise OptionError(f"cannot read --env-file {path}: {err.strerror}") from None
    if len(data) > MAX_ENV_FILE:
        raise OptionError(f"--env-file {path} is larger than {MAX_ENV_FILE >> 20} MiB")
    try:
        lines = data.decode("utf-8").split("\n")  # not splitlines: a value may hold \f, \x1c
    except UnicodeDecodeError:
        raise OptionError(f"--env-file {path} is not UTF-8 text") from None
    out = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("export "):
            text = text[len("export ") :].lstrip()
        item = parse_env_assignment(text, f"--env-file {path}, line {number}", caller)
        if item is not None:
            out.append(item)
    return out


def apply_env_changes(env: dict[str, str], changes: EnvChanges) -> None:
    """set, prepend, append, unset, in this order (``:``-lists never get empty elements)."""
    apply_env_operations(env, env_change_operations(changes))


def env_change_operations(changes: EnvChanges) -> list[tuple[str, str, str]]:
    """A module's or the site's changes as ``(op, name, value)``: set, prepend, append,
    unset, in this order."""
    ops = [("set", name, value) for name, value in changes.set.items()]
    ops += [("prepend", name, value) for name, value in changes.prepend.items()]
    ops += [("append", name, value) for name, value in changes.append.items()]
    ops += [("unset", name, "") for name in changes.unset]
    return ops


def apply_env_operations(env: dict[str, str], ops: Iterable[tuple[str, str, str]]) -> None:
    """Apply ``(op, name, value)`` operations in order (the launcher replays the same)."""
    for op, name, value in ops:
        if op == "set":
            env[name] = value
        elif op == "unset":
            env.pop(name, None)
        elif op == "prepend":
            env[name] = f"{value}:{env[name]}" if env.get(name) else value
        else:  # append
            env[name] = f"{env[name]}:{value}" if env.get(name) else value


def env_operations(
    caller: Mapping[str, str],
    image: ImageMetadata,
    request: RunRequest,
    modules: Iterable[tuple[str, ModuleConfig]],
    site: EnvChanges,
    image_request: str,
) -> list[tuple[str, str, str]]:
    """What is done to the starting environment (the caller's, or none with ``--clearenv``),
    in the order of the module docstring's precedence, as ``(op, name, value)``."""
    ops: list[tuple[str, str, str]] = []
    for item in image.env:
        name, sep, value = item.partition("=")
        if name and sep:
            ops.append(("set", name, value))
    for path in request.env_files:
        ops += [("set", name, value) for name, value in read_env_file(path, caller)]
    for text in request.env:
        assignment = parse_env_assignment(text, "--env", caller)
        if assignment is not None:
            ops.append(("set", *assignment))
    for _, module in modules:
        ops += env_change_operations(module.env)
    ops += env_change_operations(site)
    ops += [
        ("set", ENV_IMAGE, image.id),
        ("set", ENV_IMAGEREQUEST, image_request),
        ("set", ENV_RUNTIME, "1"),
    ]
    return ops


# ---- command and working directory ---------------------------------------------------------


def build_argv(
    request: RunRequest, image: ImageMetadata, caller: Mapping[str, str], user: User
) -> tuple[str, ...]:
    """``--entrypoint``: the image's ENTRYPOINT + the command, else + the image's CMD (no
    ENTRYPOINT: the CMD alone); ``--entrypoint=PROG``: PROG + the command (never the image's
    CMD, which belongs to its ENTRYPOINT: as Shifter and Docker). Without it: the command,
    else the caller's ``$SHELL`` (then the user's login shell)."""
    if request.entrypoint is not None:
        if request.entrypoint:
            return (request.entrypoint, *request.command)
        entry = tuple(image.entrypoint or ())
        argv = entry + (request.command or tuple(image.cmd or ()))
        if not argv:
            raise ContainerError(
                f"image {image.source or image.id} has no ENTRYPOINT and no CMD",
                hint="give a command after the options",
            )
        return argv
    if request.command:
        return tuple(request.command)
    return (caller.get("SHELL") or user.shell or DEFAULT_SHELL,)


def choose_workdir(request: RunRequest, image: ImageMetadata, cwd: str | None) -> tuple[str, bool]:
    """(directory, explicit): ``-w DIR``; ``-w`` alone: the image's WORKDIR (``/`` if none);
    default: the caller's current directory (``/`` in the container if it is missing there)."""
    if request.workdir is None:
        return (cwd or "/"), False
    directory = request.workdir or image.workdir or "/"
    if not directory.startswith("/"):
        raise OptionError(f"invalid --workdir {directory!r}", hint="give an absolute path")
    return directory, True


# ---- the builder ---------------------------------------------------------------------------


def build_plan(
    request: RunRequest,
    config: Config,
    image: ImageMetadata,
    image_file: str,
    user: User,
    *,
    caller_env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    image_request: str | None = None,
) -> Plan:
    """Check a request against the configuration and the (resolved) image; pure.

    ``image``/``image_file`` come from :func:`shifter_core.runtime.images.resolve_image`;
    ``caller_env`` and ``cwd`` default to nothing (the Slurm side passes the task's).
    """
    if user.uid == 0:
        raise PrivilegeError(
            "Shifter does not run containers as root", hint="run it as an ordinary user"
        )
    caller = dict(caller_env or {})
    volumes = tuple(parse_volumes(request.volumes)) if request.volumes else ()
    check_volume_specs(volumes, config.runtime)
    site_volumes = (
        tuple(parse_volumes(config.runtime.site_volumes, site=True))
        if config.runtime.site_volumes
        else ()
    )
    site_targets = {v.target for v in site_volumes}
    for volume in volumes:
        if volume.target in site_targets:
            raise VolumeError(
                f"volume {named(volume)}: {named(volume.target)} is a site file system in every "
                "container",
                hint="choose another target",
            )
    modules = select_modules(request.modules, config.modules)
    requested = image_request or request.image or f"id:{image.id}"
    env_ops = env_operations(caller, image, request, modules, config.runtime.env, requested)
    env: dict[str, str] = {} if request.clearenv else dict(caller)
    apply_env_operations(env, env_ops)
    workdir, explicit = choose_workdir(request, image, cwd)
    argv = build_argv(request, image, caller, user)
    return Plan(
        image=image,
        image_file=image_file,
        image_request=requested,
        user=user,
        volumes=volumes,
        site_volumes=site_volumes,
        modules=tuple(modules),
        env=tuple(env.items()),
        workdir=workdir,
        workdir_explicit=explicit,
        argv=argv,
        runtime=config.runtime,
        writable=request.writable_tmpfs,
        default_shell=request.entrypoint is None and not request.command,
        clearenv=request.clearenv,
        env_ops=tuple(env_ops),
        module_request=",".join(parse_modules(request.modules)) if request.modules else "",
    )


def named(volume: Volume | str, limit: int = 160) -> str:
    """A volume (or path) as error messages show it: whole when short, else cut."""
    text = str(volume)
    return text if len(text) <= limit else shown(text, limit)


def is_below(path: str, prefix: str) -> bool:
    """``path`` is ``prefix`` or inside it (both normalised absolute paths)."""
    return path == prefix or prefix == "/" or path.startswith(prefix.rstrip("/") + "/")


def forbidden_target(path: str, runtime: RuntimeConfig) -> str | None:
    """The forbidden prefix that ``path`` falls under, or None if it is allowed."""
    if any(is_below(path, allowed) and allowed != "/" for allowed in runtime.allowed_targets):
        return None
    for prefix in runtime.forbidden_targets:
        if prefix == "/":
            if path == "/":
                return "/"
        elif is_below(path, prefix):
            return prefix
    return None


def check_volume_specs(volumes: Iterable[Volume], runtime: RuntimeConfig) -> None:
    """What can be decided before anything is mounted: forbidden targets (as written),
    nesting, perNodeCache sizes. Symlinks in the image are checked when mounting."""
    volumes = list(volumes)
    limit = parse_size(runtime.per_node_cache_max_size)
    for volume in volumes:
        prefix = forbidden_target(volume.target, runtime)
        if prefix is not None:
            where = "the container's root" if prefix == "/" else f"{prefix} or below it"
            raise VolumeError(
                f"volume {named(volume)}: the target may not be {where}",
                hint="choose another target, e.g. /data",
            )
        if volume.per_node_cache_bytes is not None and volume.per_node_cache_bytes > limit:
            raise VolumeError(
                f"volume {named(volume)}: perNodeCache size is larger than the site's limit "
                f"{runtime.per_node_cache_max_size}"
            )
        for other in volumes:
            if other is not volume and is_below(volume.target, other.target):
                raise VolumeError(
                    f"volume {named(volume)}: the target is inside the target of volume "
                    f"{named(other)}",
                    hint="volume targets may not be nested",
                )
