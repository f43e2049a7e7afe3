"""The site configuration: one YAML file for gateway, runtime and Slurm plugin.

The schema is a tree of frozen dataclasses; each field's ``metadata["doc"]`` documents it
(``slurm_conf/shifter.yaml.example`` shows every key). Loading is strict: an unknown key,
a wrong type or a bad value is a :class:`ConfigError` naming the key, the file and the
line. Privileged readers (prolog, slurmstepd, the gateway) refuse a file that a user
could have written.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import config_file
from .config_file import ENV_VAR, check_privileged_file, config_path
from .errors import ConfigError, ShifterError
from .logformat import LOG_FORMATS

T = TypeVar("T")


def _absolute(value: str) -> str | None:
    return None if value.startswith("/") else "must be an absolute path"


def _url(value: str) -> str | None:
    if value.startswith(("http://", "https://")):
        return None
    return "must be an http:// or https:// URL"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _non_negative(value: float) -> str | None:
    return None if value >= 0 else "must be 0 or more"


def _listen(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if sep and host and port.isdigit() and 0 < int(port) < 65536:
        return None
    return "must be HOST:PORT"


def _doc(text: str, **extra: Any) -> dict[str, Any]:
    return {"doc": text, **extra}


def _gateway_url(value: str) -> str | None:
    if value.startswith("unix:"):
        return _absolute(value[len("unix:") :]) and "must be a URL or unix:/ABSOLUTE/PATH"
    return _url(value)


def _size(value: str) -> str | None:
    from .options import parse_size

    try:
        parse_size(value)
    except ShifterError as err:
        return f"is not a size ({err.hint or 'a number with an optional k, M, G or T'})"
    return None


def _size_or_zero(value: str) -> str | None:
    return None if value == "0" else _size(value)


def _log_format(value: str) -> str | None:
    return None if value in LOG_FORMATS else f"must be one of {', '.join(LOG_FORMATS)}"


def _listen_or_socket(value: str) -> str | None:
    if value.startswith("unix:"):
        return _absolute(value[len("unix:") :]) and "must be HOST:PORT or unix:/ABSOLUTE/PATH"
    return _listen(value) and "must be HOST:PORT or unix:/ABSOLUTE/PATH"


@dataclass(frozen=True)
class GatewayLimitsConfig:
    """What one request or one pull may cost the gateway (sizes: a number with k, M, G or T;
    "0": no bound)."""

    max_request_body: str = field(
        default="1M",
        metadata=_doc(
            "largest JSON request body; larger ones are refused before they are read",
            check=_size_or_zero,
        ),
    )
    max_import_size: str = field(
        default="128G",
        metadata=_doc("largest image file an import may upload", check=_size_or_zero),
    )
    max_manifest_size: str = field(
        default="4M", metadata=_doc("largest manifest or index accepted", check=_size_or_zero)
    )
    max_layers: int = field(
        default=500, metadata=_doc("most layers an image may have", check=_non_negative)
    )
    max_layer_size: str = field(
        default="64G",
        metadata=_doc("largest compressed layer", check=_size_or_zero),
    )
    max_image_size: str = field(
        default="128G",
        metadata=_doc("largest compressed image (all layers)", check=_size_or_zero),
    )
    max_layer_unpacked: str = field(
        default="128G",
        metadata=_doc("most bytes one layer may decompress to", check=_size_or_zero),
    )
    max_image_unpacked: str = field(
        default="256G",
        metadata=_doc("most bytes all layers of an image may decompress to", check=_size_or_zero),
    )
    max_tar_entries: int = field(
        default=10_000_000,
        metadata=_doc("most tar entries all layers of an image may hold", check=_non_negative),
    )
    pull_timeout: float = field(
        default=21600.0,
        metadata=_doc(
            "seconds a pull may take, download and conversion (0: no bound)",
            check=_non_negative,
        ),
    )


@dataclass(frozen=True)
class GatewayConfig:
    """Where the image gateway is and how it runs."""

    url: str = field(
        default="http://127.0.0.1:7080",
        metadata=_doc(
            "URL clients (shifterimg, plugin) use to reach the gateway: http(s)://HOST:PORT, "
            "or unix:/PATH for a Unix socket",
            check=_gateway_url,
        ),
    )
    user: str = field(
        default="shifter",
        metadata=_doc(
            "the user the gateway runs as: registry credentials are munge-encoded so that "
            "only this user can decode them"
        ),
    )
    listen: str = field(
        default="127.0.0.1:7080",
        metadata=_doc(
            "HOST:PORT the gateway listens on, or unix:/PATH for a Unix socket",
            check=_listen_or_socket,
        ),
    )
    tls_cert: str | None = field(
        default=None,
        metadata=_doc("PEM certificate (chain): serve https on HOST:PORT", check=_absolute),
    )
    tls_key: str | None = field(
        default=None, metadata=_doc("PEM private key of tls_cert", check=_absolute)
    )
    database: str = field(
        default="/var/lib/shifter/gateway.sqlite",
        metadata=_doc("the gateway's SQLite database (WAL mode)", check=_absolute),
    )
    layer_cache: str = field(
        default="/var/lib/shifter/layers",
        metadata=_doc("compressed layers by digest, shared by pulls", check=_absolute),
    )
    workers: int = field(
        default=2, metadata=_doc("pulls and conversions that run at once", check=_positive)
    )
    log_format: str = field(
        default="text",
        metadata=_doc(
            "the gateway's log lines: text (for people), json or keyvalue (one line per "
            "event: time, level, logger, msg)",
            check=_log_format,
        ),
    )
    admins: list[str] = field(
        default_factory=lambda: ["root"],
        metadata=_doc("users who may expire and remove images (and import, see below)"),
    )
    import_users: list[str] = field(
        default_factory=list,
        metadata=_doc("users besides the admins who may import image files ('*': everyone)"),
    )
    expire_days: int = field(
        default=0,
        metadata=_doc("remove images not looked up or used for this many days (0: never)"),
    )
    layer_cache_size: str = field(
        default="500G",
        metadata=_doc(
            "cap of the layer cache; least recently used layers are evicted (0: no cap)",
            check=_size_or_zero,
        ),
    )
    limits: GatewayLimitsConfig = field(
        default_factory=GatewayLimitsConfig,
        metadata=_doc("bounds on requests and pulls"),
    )


@dataclass(frozen=True)
class RegistriesConfig:
    """How the gateway reaches container registries."""

    mirrors: dict[str, list[str]] = field(
        default_factory=dict,
        metadata=_doc("registry name -> mirror URLs tried first (docker.io: [URL, ...])"),
    )
    insecure: list[str] = field(
        default_factory=list,
        metadata=_doc("registries (HOST[:PORT]) reached over plain http; all others use https"),
    )
    timeout: float = field(
        default=30.0, metadata=_doc("seconds per network operation", check=_positive)
    )
    retries: int = field(default=3, metadata=_doc("retries after connection errors and 5xx"))
    max_parallel: int = field(
        default=4, metadata=_doc("layers downloaded at once per pull", check=_positive)
    )


def _repository(value: str) -> str | None:
    from .reference import REPOSITORY_RE

    return None if REPOSITORY_RE.fullmatch(value) else "must be a repository name (a/b, lower case)"


def _url_or_empty(value: str) -> str | None:
    return None if value == "" else _url(value)


def _absolute_or_empty(value: str) -> str | None:
    return None if value == "" else _absolute(value)


@dataclass(frozen=True)
class ArtifactsConfig:
    """The site registry that holds every image as an OCI artifact (the squashfs and its
    record), for nodes that cannot read image_path (slurm.image_source: registry)."""

    registry: str = field(
        default="",
        metadata=_doc(
            "URL of the artifact registry the gateway publishes to (empty: images are not "
            "published as artifacts)",
            check=_url_or_empty,
        ),
    )
    node_registry: str = field(
        default="",
        metadata=_doc(
            "URL nodes pull artifacts from, e.g. their rack's pull-through mirror of "
            "registry (empty: registry itself)",
            check=_url_or_empty,
        ),
    )
    repository: str = field(
        default="shifter/images",
        metadata=_doc(
            "repository of the artifacts; each is tagged with its image id", check=_repository
        ),
    )
    push_credentials: str = field(
        default="",
        metadata=_doc(
            "the gateway's credential for the registry: a file USER:PASSWORD owned by the "
            "gateway's user, mode 0600 (empty: anonymous)",
            check=_absolute_or_empty,
        ),
    )
    node_credentials: str = field(
        default="",
        metadata=_doc(
            "the nodes' read credential: a file USER:PASSWORD owned by root, mode 0600 "
            "(empty: anonymous, for a registry only nodes can reach)",
            check=_absolute_or_empty,
        ),
    )
    timeout: float = field(
        default=60.0, metadata=_doc("seconds per network operation", check=_positive)
    )


@dataclass(frozen=True)
class ConversionConfig:
    """How images are turned into squashfs files."""

    compressor: typing.Literal["zstd", "gzip", "xz", "lz4", "lzo", "lzma"] = field(
        default="zstd", metadata=_doc("squashfs compressor")
    )
    level: int | None = field(
        default=3, metadata=_doc("compression level (null: the compressor's default)")
    )
    block_size: int = field(
        default=131072, metadata=_doc("squashfs block size in bytes", check=_positive)
    )


def _absolute_list(value: list[str]) -> str | None:
    bad = [v for v in value if not v.startswith("/")]
    return f"holds {bad[0]!r}, which is not an absolute path" if bad else None


def _volume_list(value: list[str], *, site: bool = False) -> str | None:
    from .errors import OptionError
    from .options import parse_volume

    for spec in value:
        try:
            volume = parse_volume(spec, site=site)
        except OptionError as err:
            return f"holds an invalid spec: {err}"
        if volume.per_node_cache is not None:
            return f"holds {spec!r}: perNodeCache is for user volumes only"
    return None


# Trees the runtime mounts fresh (a tmpfs): targets below them are made inside that tmpfs,
# where the runtime mounts nested targets (below /tmp only when runtime.tmp is private; with
# the host's /tmp a site volume below /tmp fails at start anyway, for another reason).
_FRESH_TREES = ("/dev", "/tmp")


def _strictly_below(path: str, prefix: str) -> bool:
    return path != prefix and (prefix == "/" or path.startswith(prefix + "/"))


def _site_volume_list(value: list[str]) -> str | None:
    """Site volumes: Shifter's siteFs flags (rec, slave, private) are allowed; what would
    make every container fail at start is refused: a target given twice
    (``runtime.plan`` parses site volumes with :func:`~.options.parse_volumes`), a target
    inside another one (``runtime.assemble`` refuses a mount inside another, unless both
    are made inside a fresh /dev or /tmp), more volumes than a container may have."""
    from .errors import OptionError
    from .options import parse_volume, parse_volumes

    problem = _volume_list(value, site=True)
    if problem:
        return problem
    seen: list[tuple[str, str]] = []  # (target, spec as written)
    for spec in value:
        target = parse_volume(spec, site=True).target
        for other_target, other in seen:
            if target == other_target:
                return (
                    f"holds {other!r} and {spec!r}, both with the target {target}: every "
                    "container would fail to start; keep one of them"
                )
            for (inner, inner_spec), (outer, outer_spec) in (
                ((target, spec), (other_target, other)),
                ((other_target, other), (target, spec)),
            ):
                if _strictly_below(inner, outer) and not any(
                    _strictly_below(inner, tree) for tree in _FRESH_TREES
                ):
                    return (
                        f"holds {outer_spec!r} and {inner_spec!r}: the target {inner} is "
                        f"inside {outer}, and the runtime refuses a mount inside another "
                        "one, so every container would fail to start; bind the outer one "
                        "alone (with :rec for the mounts below its source), or choose "
                        "targets side by side"
                    )
        seen.append((target, spec))
    try:
        parse_volumes(value, site=True)  # the bounds runtime.plan applies at start
    except OptionError as err:
        return f"holds too much: {err}"  # str(err) ends with its hint
    return None


def _copy_list(value: list[str]) -> str | None:
    for spec in value:
        source, sep, target = spec.partition(":")
        if not sep or not source.startswith("/") or not target.startswith("/"):
            return f"holds {spec!r}; expected SRC:DST with absolute paths"
    return None


def _env_names(value: list[str] | dict[str, str]) -> str | None:
    bad = [k for k in value if not k or "=" in k or "\0" in k]
    return f"holds an invalid variable name {bad[0]!r}" if bad else None


def _module_names(value: dict[str, Any]) -> str | None:
    from .errors import OptionError
    from .options import MODULE_NONE, parse_modules

    for name, module in value.items():
        try:
            parse_modules(name)
        except OptionError:
            return f"holds an invalid module name {name!r}"
        if name == MODULE_NONE:
            return "holds a module named 'none' (--module=none means no modules)"
        bad = [c for c in module.conflicts if c in (name, MODULE_NONE)]
        if bad:
            return f"module {name!r} cannot conflict with {bad[0]!r}"
    return None


@dataclass(frozen=True)
class EnvChanges:
    """Changes to the container's environment, applied in the order set, prepend, append,
    unset (used by the site and by each module)."""

    set: dict[str, str] = field(
        default_factory=dict, metadata=_doc("variables set to a value", check=_env_names)
    )
    prepend: dict[str, str] = field(
        default_factory=dict,
        metadata=_doc("values put in front of a ':'-list (PATH-like) variable", check=_env_names),
    )
    append: dict[str, str] = field(
        default_factory=dict,
        metadata=_doc("values put at the end of a ':'-list variable", check=_env_names),
    )
    unset: list[str] = field(
        default_factory=list, metadata=_doc("variables removed", check=_env_names)
    )


@dataclass(frozen=True)
class ModuleConfig:
    """One module: what it adds to a container when a user asks for it (or by default)."""

    description: str = field(default="", metadata=_doc("one line shown to users"))
    default: bool = field(
        default=False, metadata=_doc("loaded unless the user gives --module=none")
    )
    devices: list[str] = field(
        default_factory=list,
        metadata=_doc("host device nodes (globs) bound at the same path", check=_absolute_list),
    )
    binds: list[str] = field(
        default_factory=list,
        metadata=_doc(
            "host paths bound in: SRC:DST[:ro|rw], read-only by default", check=_volume_list
        ),
    )
    copies: list[str] = field(
        default_factory=list,
        metadata=_doc(
            "host files copied in: SRC:DST (SRC may be a glob; DST/ is a directory)",
            check=_copy_list,
        ),
    )
    env: EnvChanges = field(default_factory=EnvChanges, metadata=_doc("environment changes"))
    user_hook: str | None = field(
        default=None,
        metadata=_doc(
            "program in the container run as the user before the command", check=_absolute
        ),
    )
    root_hook: str | None = field(
        default=None,
        metadata=_doc(
            "host program run as root with the prepared root's path (privileged setups only)",
            check=_absolute,
        ),
    )
    conflicts: list[str] = field(
        default_factory=list, metadata=_doc("modules that cannot be loaded together with this")
    )


@dataclass(frozen=True)
class RuntimeConfig:
    """How containers are built on the nodes."""

    run_dir: str = field(
        default="/run/shifter",
        metadata=_doc(
            "node-local directory for prepared job roots and their state", check=_absolute
        ),
    )
    site_volumes: list[str] = field(
        default_factory=list,
        metadata=_doc(
            "site file systems bound into every container: SRC:DST[:ro|rw][:rec]"
            "[:slave|private] (a bind always comes with the mounts below SRC, so rec changes "
            "nothing; slave: what the host mounts below SRC later shows in running "
            "containers; private, the default: it does not; nothing goes back either way)",
            check=_site_volume_list,
        ),
    )
    forbidden_targets: list[str] = field(
        default_factory=lambda: ["/", "/etc", "/var", "/proc", "/sys", "/dev", "/opt/udiImage"],
        metadata=_doc(
            "user volume targets refused (the path and everything below it)", check=_absolute_list
        ),
    )
    allowed_targets: list[str] = field(
        default_factory=lambda: ["/var/tmp"],
        metadata=_doc("exceptions to forbidden_targets (the path and below)", check=_absolute_list),
    )
    tmp: typing.Literal["host", "private"] = field(
        default="host",
        metadata=_doc("/tmp in the container: the host's /tmp or a private tmpfs"),
    )
    env: EnvChanges = field(
        default_factory=EnvChanges,
        metadata=_doc("site environment, applied last (over image, user and modules)"),
    )
    squashfuse: str = field(
        default="/usr/bin/squashfuse_ll",
        metadata=_doc("squashfuse_ll program for unprivileged mounts", check=_absolute),
    )
    launcher_name_ttl: int = field(
        default=60,
        metadata=_doc(
            "seconds shifter's C launcher and srun/sbatch/salloc may reuse what an image name "
            "resolved to (0: never; the launcher then replays only --image=id:... requests)",
            check=_non_negative,
        ),
    )
    per_node_cache_dir: str = field(
        default="/var/tmp",
        metadata=_doc("node-local directory where perNodeCache files are created", check=_absolute),
    )
    per_node_cache_max_size: str = field(
        default="64G", metadata=_doc("largest perNodeCache size a user may ask for", check=_size)
    )
    per_node_cache_fs: list[str] = field(
        default_factory=lambda: ["xfs", "ext4"],
        metadata=_doc("file systems for perNodeCache, the first with a mkfs program is used"),
    )


@dataclass(frozen=True)
class SlurmConfig:
    """How the Slurm plugin prepares containers for jobs."""

    image_source: typing.Literal["stage", "mount", "registry"] = field(
        default="stage",
        metadata=_doc(
            "where the prolog gets images: stage (copy from image_path into the node cache), "
            "mount (loop-mount straight from image_path, no copy) or registry (pull the "
            "artifact the gateway published to artifacts.registry into the node cache; "
            "nodes need no access to image_path)"
        ),
    )
    node_cache: str = field(
        default="/var/cache/shifter/%n",
        metadata=_doc("node-local image cache; %n is the node's name", check=_absolute),
    )
    node_cache_size: str = field(
        default="50G",
        metadata=_doc(
            "cap of the node cache; unused images are evicted least recently used first, "
            "also when the disk lacks space for a copy; 0: no cap but the disk's free space",
            check=_size_or_zero,
        ),
    )
    batch_step: bool = field(
        default=False,
        metadata=_doc("run batch scripts of --image jobs in the container too"),
    )
    metrics_dir: str = field(
        default="",
        metadata=_doc(
            "node_exporter's textfile collector directory: prolog and epilog runs, results "
            "and seconds per node go to shifter_NODE.prom there (empty: not written)",
            check=lambda v: None if v == "" else _absolute(v),
        ),
    )
    pull_on_submit: bool = field(
        default=True,
        metadata=_doc(
            "sbatch/salloc/srun --image of an image the gateway does not have pulls it and "
            "waits (false: refuse the submission; users opt out with --image-pull=never)"
        ),
    )


@dataclass(frozen=True)
class Config:
    """The whole file."""

    image_path: str = field(
        default="/var/lib/shifter/images",
        metadata={
            "doc": "image store: <id>.squashfs and <id>.json, read-only to users",
            "check": _absolute,
        },
    )
    default_image_type: typing.Literal["docker", "id"] = field(
        default="docker", metadata={"doc": "type assumed for --image=NAME without a TYPE: prefix"}
    )
    gateway: GatewayConfig = field(
        default_factory=GatewayConfig, metadata={"doc": "image gateway settings"}
    )
    registries: RegistriesConfig = field(
        default_factory=RegistriesConfig, metadata={"doc": "container registries"}
    )
    artifacts: ArtifactsConfig = field(
        default_factory=ArtifactsConfig,
        metadata={"doc": "images published as OCI artifacts to a site registry"},
    )
    conversion: ConversionConfig = field(
        default_factory=ConversionConfig, metadata={"doc": "squashfs conversion"}
    )
    runtime: RuntimeConfig = field(
        default_factory=RuntimeConfig, metadata={"doc": "container runtime on the nodes"}
    )
    modules: dict[str, ModuleConfig] = field(
        default_factory=dict,
        metadata={"doc": "modules users load with --module (by name)", "check": _module_names},
    )

    slurm: SlurmConfig = field(
        default_factory=SlurmConfig, metadata={"doc": "Slurm plugin: prolog, steps, epilog"}
    )

    source: str = field(default="<defaults>", metadata={"internal": True})


class _Located:
    """A value with the line it came from, for error messages."""

    def __init__(self, source: str, node: Any) -> None:
        self.source = source
        self.node = node

    def where(self, node: Any | None = None) -> str:
        mark = (node or self.node).start_mark
        return f"{self.source}, line {mark.line + 1}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a mapping"
    if is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", bool: "true or false", float: "a number"}.get(
        tp, str(tp)
    )


def _convert(node: Any, tp: Any, key: str, loc: _Located) -> Any:
    """Turn a YAML node into a value of type ``tp`` or raise a ConfigError."""
    import yaml

    def fail(problem: str) -> ConfigError:
        return ConfigError(f"{loc.where(node)}: {key}: {problem}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(node, inner, key, loc)
    if is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(node, yaml.MappingNode):
            raise fail(f"expected {_type_name(tp)}")
        return _build(tp, node, key, loc)
    if origin is dict:
        if not isinstance(node, yaml.MappingNode):
            raise fail("expected a mapping")
        _, value_tp = typing.get_args(tp)
        out = {}
        for knode, vnode in node.value:
            name = _convert(knode, str, key, loc)
            out[name] = _convert(vnode, value_tp, f"{key}.{name}", loc)
        return out
    if origin in (list, tuple):
        if not isinstance(node, yaml.SequenceNode):
            raise fail("expected a list")
        (item_tp, *_) = typing.get_args(tp)
        items = [_convert(n, item_tp, f"{key}[{i}]", loc) for i, n in enumerate(node.value)]
        return tuple(items) if origin is tuple else items
    if not isinstance(node, yaml.ScalarNode):
        raise fail(f"expected {_type_name(tp)}")
    value = yaml.SafeLoader("").construct_object(node)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise fail(f"{value!r} is not {_type_name(tp)}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise fail(f"expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type[T], node: Any, prefix: str, loc: _Located) -> T:
    # every cls here is a dataclass of the schema; T cannot say so without typeshed internals
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for knode, vnode in node.value:
        name = str(knode.value)
        key = f"{prefix}.{name}" if prefix else name
        if name not in known:
            hint = ", ".join(sorted(known))
            raise ConfigError(f"{loc.where(knode)}: unknown key {key!r}; known keys here: {hint}")
        if name in values:
            raise ConfigError(f"{loc.where(knode)}: key {key!r} is given twice")
        value = _convert(vnode, hints[name], key, loc)
        check = known[name].metadata.get("check")
        problem = check(value) if check and value is not None else None
        if problem:
            raise ConfigError(f"{loc.where(vnode)}: {key}: {value!r} {problem}")
        values[name] = value
    return cls(**values)


def parse(text: str, source: str = "<string>") -> Config:
    """Parse and validate the YAML text of a configuration file."""
    import yaml

    try:
        node = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if node is None:
        return Config(source=source)
    loc = _Located(source, node)
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{loc.where()}: the file must be a mapping of keys to values")
    config = _build(Config, node, "", loc)
    return _with_source(config, source)


def _with_source(config: Config, source: str) -> Config:
    return dataclasses.replace(config, source=source)


def load(path: str | None = None, *, privileged: bool = False) -> Config:
    """Read and validate the configuration file."""
    file = Path(config_path(path, privileged=privileged))
    if privileged:
        check_privileged_file(str(file))
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {file} does not exist",
            hint=f"create it (see slurm_conf/shifter.yaml.example) or set {ENV_VAR}",
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read the configuration {file}: {err}") from None
    config = parse(text, str(file))
    config_file.write(str(file), as_values(config))
    return config


def as_values(config: Config) -> dict[str, Any]:
    """The configuration as plain nested dicts (what the start-up cache holds)."""
    values = dataclasses.asdict(config)
    values.pop("source", None)
    return values


def documented_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, str]]:
    """Every key of the schema with its documentation (for the example file's test)."""
    out = []
    for f in fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}{f.name}"
        out.append((key, f.metadata.get("doc", "")))
        tp = typing.get_type_hints(cls)[f.name]
        if is_dataclass(tp) and isinstance(tp, type):
            out.extend(documented_keys(tp, key + "."))
    return out
