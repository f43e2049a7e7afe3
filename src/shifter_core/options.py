"""Syntax of the user options shared by ``shifter`` and the Slurm plugin.

``--image`` is parsed by :mod:`shifter_core.reference`. This module parses
``--volume`` (``SRC:DST[:FLAG]``, several joined by ``;`` or given repeatedly) and
``--module`` (``a,b`` or ``none``). Only syntax is checked here; whether a source is
readable by the user or a target is allowed is decided by the runtime, as the user.
"""

from __future__ import annotations

import posixpath
import re
from collections import namedtuple
from collections.abc import Iterable

from .errors import OptionError

VOLUME_SEPARATOR = ";"
MODULE_NONE = "none"
_MODULE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", re.ASCII)
_SIZE_RE = re.compile(r"^(?P<num>[1-9][0-9]{0,15})(?P<unit>[kKmMgGtT]?)$", re.ASCII)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
VOLUME_FLAGS = ("ro", "rw", "perNodeCache=size=N")


class Volume(
    namedtuple("_Volume", "source target read_only per_node_cache_bytes", defaults=(False, None))
):
    """One bind (or per-node cache) into the container.

    ``source`` and ``target`` (absolute, normalised), ``read_only: bool``,
    ``per_node_cache_bytes: int | None``. A named tuple: see :mod:`shifter_core.reference`.
    """

    __slots__ = ()

    def __str__(self) -> str:
        if self.per_node_cache_bytes is not None:
            return f"{self.source}:{self.target}:perNodeCache=size={self.per_node_cache_bytes}"
        return f"{self.source}:{self.target}:{'ro' if self.read_only else 'rw'}"


def parse_size(text: str) -> int:
    """``512``, ``10k``, ``200M``, ``1G``, ``2T`` → bytes."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise OptionError(
            f"invalid size {text!r}", hint="use a number with an optional k, M, G or T"
        )
    return int(match.group("num")) * _SIZE_UNITS[match.group("unit").lower()]


def _check_path(spec: str, what: str, path: str) -> str:
    if not path:
        raise OptionError(f"invalid volume {spec!r}: empty {what}", hint="use SRC:DST[:ro|rw]")
    if "\0" in path or "\n" in path:
        raise OptionError(f"invalid volume {spec!r}: the {what} contains a control character")
    if not path.startswith("/"):
        raise OptionError(
            f"invalid volume {spec!r}: the {what} {path!r} is not an absolute path",
            hint="give absolute paths, e.g. -V $SCRATCH/in:/data",
        )
    if ".." in path.split("/"):
        raise OptionError(f"invalid volume {spec!r}: the {what} {path!r} contains '..'")
    return posixpath.normpath(path) if path != "//" else "/"


def _parse_flag(spec: str, flag: str) -> tuple[bool, int | None]:
    if flag in ("", "rw"):
        return False, None
    if flag == "ro":
        return True, None
    name, _, value = flag.partition("=")
    if name == "perNodeCache":
        key, _, size = value.partition("=")
        if key != "size" or not size:
            raise OptionError(
                f"invalid volume {spec!r}: perNodeCache needs a size", hint="perNodeCache=size=10G"
            )
        return False, parse_size(size)
    raise OptionError(
        f"invalid volume {spec!r}: unknown flag {flag!r}",
        hint=f"flags are {', '.join(VOLUME_FLAGS)}",
    )


def parse_volume(spec: str) -> Volume:
    """Parse one ``SRC:DST[:FLAG]``."""
    parts = spec.split(":")
    if len(parts) < 2 or len(parts) > 3:
        raise OptionError(
            f"invalid volume {spec!r}", hint="use SRC:DST[:ro|rw|perNodeCache=size=N]"
        )
    source = _check_path(spec, "source", parts[0])
    target = _check_path(spec, "target", parts[1])
    read_only, cache = _parse_flag(spec, parts[2] if len(parts) == 3 else "")
    return Volume(source, target, read_only, cache)


def parse_volumes(values: Iterable[str]) -> list[Volume]:
    """Parse every ``--volume`` value given; each may hold several specs joined by ``;``."""
    volumes: list[Volume] = []
    for value in values:
        specs = [s for s in value.split(VOLUME_SEPARATOR) if s.strip()]
        if not specs:
            raise OptionError("empty --volume value", hint="use SRC:DST[:ro|rw]")
        volumes.extend(parse_volume(s.strip()) for s in specs)
    targets = [v.target for v in volumes]
    for target in targets:
        if targets.count(target) > 1:
            raise OptionError(f"volume target {target!r} is given more than once")
    return volumes


def format_volumes(volumes: Iterable[Volume]) -> str:
    """The canonical ``;``-joined form (what ``SHIFTER_VOLUME`` carries)."""
    return VOLUME_SEPARATOR.join(str(v) for v in volumes)


def parse_modules(value: str) -> list[str]:
    """Parse ``--module``: ``a,b`` → ``['a', 'b']``; ``none`` → ``['none']``."""
    names = [n.strip() for n in value.split(",")]
    if not value.strip() or any(not n for n in names):
        raise OptionError(f"invalid --module value {value!r}", hint="use NAME[,NAME...] or none")
    for name in names:
        if not _MODULE_NAME_RE.match(name):
            raise OptionError(
                f"invalid module name {name!r}",
                hint="names use letters, digits, '.', '_' and '-'",
            )
    if MODULE_NONE in names and len(names) > 1:
        raise OptionError("--module=none cannot be combined with other modules")
    if len(set(names)) != len(names):
        raise OptionError(f"module given twice in {value!r}")
    return names
