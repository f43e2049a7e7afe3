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

from . import config_cache
from .config_cache import ENV_VAR, check_privileged_file, config_path
from .errors import ConfigError

T = TypeVar("T")


def _absolute(value: str) -> str | None:
    return None if value.startswith("/") else "must be an absolute path"


def _url(value: str) -> str | None:
    if value.startswith(("http://", "https://")):
        return None
    return "must be an http:// or https:// URL"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _listen(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if sep and host and port.isdigit() and 0 < int(port) < 65536:
        return None
    return "must be HOST:PORT"


def _doc(text: str, **extra: Any) -> dict[str, Any]:
    return {"doc": text, **extra}


@dataclass(frozen=True)
class GatewayConfig:
    """Where the image gateway is and how it runs."""

    url: str = field(
        default="http://127.0.0.1:7080",
        metadata=_doc("URL clients (shifterimg, plugin) use to reach the gateway", check=_url),
    )
    listen: str = field(
        default="127.0.0.1:7080", metadata=_doc("HOST:PORT the gateway listens on", check=_listen)
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
    conversion: ConversionConfig = field(
        default_factory=ConversionConfig, metadata={"doc": "squashfs conversion"}
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
    if is_dataclass(tp):
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
    config_cache.write(str(file), as_values(config))
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
        if is_dataclass(tp):
            out.extend(documented_keys(tp, key + "."))
    return out
