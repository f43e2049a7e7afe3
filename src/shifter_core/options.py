"""Syntax of the user options shared by ``shifter`` and the Slurm plugin.

``--image`` is parsed by :mod:`shifter_core.reference`. This module parses
``--volume`` (``SRC:DST[:FLAG...]``, several joined by ``;`` or given repeatedly; a user's
flags are ``ro``, ``rw`` and ``perNodeCache=...``, a site volume's also Shifter's ``rec``,
``slave`` and ``private``), sizes as Shifter writes them, and ``--module`` (``a,b`` or
``none``). Only syntax and bounds are checked here; whether a
source is readable by the user or a target is allowed is decided by the runtime, as the user.

Everything here is also run by root on the nodes (the prolog re-parses what the submitting
side sent, since the user can replace that side), so every input is bounded *before* it is
split or matched, and every error shows the offending value escaped and cut short:

- ``--volume``: at most :data:`MAX_VOLUME_TEXT` characters in all, :data:`MAX_VOLUMES`
  volumes, :data:`MAX_PER_NODE_CACHE_VOLUMES` of them ``perNodeCache``; each path below
  :data:`PATH_MAX` bytes (UTF-8) with components of at most :data:`NAME_MAX` bytes. A path
  may hold any *printable* character (``str.isprintable``: letters of any script, digits,
  punctuation, the ASCII space) except ``:`` and ``;``, which separate specs. Refused: NUL,
  C0/C1 control characters and DEL, line and paragraph separators, other white space than
  the ASCII space, format characters (e.g. U+202E, which reorders text in logs) and lone
  surrogates (bytes of a name that is not UTF-8).
- ``--module``: at most :data:`MAX_MODULES` names of ASCII letters, digits, ``.``, ``_``
  and ``-``, each at most 64 characters.
- sizes: at most :data:`MAX_SIZE_TEXT` characters and :data:`MAX_SIZE` bytes.
"""

from __future__ import annotations

import posixpath
import re
from collections import namedtuple
from collections.abc import Iterable

from .errors import OptionError

VOLUME_SEPARATOR = ";"
MODULE_NONE = "none"
PATH_MAX = 4096  # bytes, with the terminating NUL (linux/limits.h)
NAME_MAX = 255  # bytes per path component
MAX_VOLUMES = 64
MAX_PER_NODE_CACHE_VOLUMES = 4
MAX_VOLUME_TEXT = 64 * 1024  # characters of all --volume values together
MAX_MODULES = 32
MAX_MODULE_TEXT = MAX_MODULES * 65
MAX_SIZE = 1 << 60  # bytes (1 EiB): far beyond any disk, small enough to stay sane
SHOWN_LENGTH = 72  # characters of an offending value shown in an error
_MODULE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)  # fullmatch
MAX_SIZE_TEXT = 32  # characters of a size; longer ones are refused before they are read
# Shifter's parseBytes (VolumeMap.c): a decimal number (strtod), then one letter of
# "bkmgtpe" in any case, each a power of 1024. Shifter ignores what follows the letter;
# here only an optional "B" or "iB" may follow it (10G, 10GB, 10GiB), anything else is a typo.
_SIZE_RE = re.compile(
    r"(?P<int>[0-9]*)(?:\.(?P<frac>[0-9]*))?(?:(?P<unit>[kmgtpe])(?:i?b)?|b)?",
    re.ASCII | re.IGNORECASE,
)  # fullmatch
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
SIZE_HINT = (
    "a number (decimals allowed) and an optional unit k, M, G, T, P or E, powers of 1024, "
    "in any case, with or without B: e.g. 512, 500KB, 1.5G, 4T; at most 1E"
)
VOLUME_FLAGS = ("ro", "rw", "perNodeCache=size=SIZE[,bs=SIZE][,method=loop][,fs=xfs|ext4]")
# Shifter's flags that only its siteFs (udiRoot.conf) may give (VolumeMap.c,
# validateVolumeMap_siteRequest): rec, a recursive bind (the mounts below the source come
# along: every bind of ours is, so it changes nothing); slave and private, the bind's mount
# propagation (slave: mounts made later below the source on the host appear in the
# container, none go back; private: none either way).
SITE_VOLUME_FLAGS = ("rec", "slave", "private")
PROPAGATIONS = ("slave", "private")
PER_NODE_CACHE_METHODS = ("loop",)
PER_NODE_CACHE_FS = ("xfs", "ext4")
PER_NODE_CACHE_BLOCK_SIZE = 1 << 20  # Shifter's default bs
_PER_NODE_CACHE_HINT = (
    "perNodeCache takes size=SIZE (required), bs=SIZE (default 1M), method=loop and "
    "fs=xfs or ext4 (default: the site's choice), e.g. perNodeCache=size=10G,fs=xfs"
)


class PerNodeCache(
    namedtuple(
        "_PerNodeCache",
        "size block_size method fs",
        defaults=(PER_NODE_CACHE_BLOCK_SIZE, "loop", None),
    )
):
    """A ``perNodeCache=`` volume: a fresh file system on each node, as Shifter's keys
    ``size``, ``bs``, ``method`` and ``fs`` give it.

    ``size: int`` (bytes), ``block_size: int`` (bytes, Shifter's ``bs``, default 1M),
    ``method: str`` (``loop``, the only one), ``fs: str | None`` (``xfs`` or ``ext4``;
    None: the site's choice, ``runtime.per_node_cache_fs``). Immutable (a named tuple).
    """

    __slots__ = ()
    # For the type checker only (annotations without values create no attribute).
    size: int
    block_size: int
    method: str
    fs: str | None

    def __str__(self) -> str:
        """``size=N[,bs=N][,fs=FS]``: what differs from the defaults."""
        text = f"size={self.size}"
        if self.block_size != PER_NODE_CACHE_BLOCK_SIZE:
            text += f",bs={self.block_size}"
        if self.method != "loop":
            text += f",method={self.method}"
        if self.fs is not None:
            text += f",fs={self.fs}"
        return text


class Volume(
    namedtuple(
        "_Volume",
        "source target read_only per_node_cache recursive propagation",
        defaults=(False, None, False, None),
    )
):
    """One bind (or per-node cache) into the container.

    ``source`` and ``target`` (absolute, normalised), ``read_only: bool``,
    ``per_node_cache: PerNodeCache | None``; of site volumes only (``site=True``):
    ``recursive: bool`` (Shifter's ``rec`` was given) and ``propagation: str | None``
    (``slave``, ``private``, or None when neither was given). A named tuple: see
    :mod:`shifter_core.reference`.
    """

    __slots__ = ()
    source: str
    target: str
    read_only: bool
    per_node_cache: PerNodeCache | None
    recursive: bool
    propagation: str | None

    @property
    def per_node_cache_bytes(self) -> int | None:
        """The perNodeCache size in bytes, or None for a bind."""
        return None if self.per_node_cache is None else self.per_node_cache.size

    def __str__(self) -> str:
        if self.per_node_cache is not None:
            return f"{self.source}:{self.target}:perNodeCache={self.per_node_cache}"
        text = f"{self.source}:{self.target}:{'ro' if self.read_only else 'rw'}"
        if self.recursive:
            text += ":rec"
        if self.propagation:
            text += f":{self.propagation}"
        return text


def shown(value: object, limit: int = SHOWN_LENGTH) -> str:
    """``value`` fit for a message or a log line: escaped (``repr``) and cut to ``limit``
    characters, with the length of what was cut."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def parse_size(text: str) -> int:
    """Bytes of a size as Shifter reads one (``512``, ``500KB``, ``1.5g``, ``4T``, ``1E``):
    units are powers of 1024, a fraction of a byte is dropped; at most :data:`MAX_SIZE`."""
    match = _SIZE_RE.fullmatch(text) if len(text) <= MAX_SIZE_TEXT else None
    size = 0
    if match and (match.group("int") or match.group("frac")):
        shift = _SIZE_SHIFT[(match.group("unit") or "").lower()]
        frac = match.group("frac") or ""
        # exact: int(number * 2**shift), without floats (1.1G is not 1181116006.4 bytes)
        size = (int(match.group("int") or "0") << shift) + (int(frac or "0") << shift) // (
            10 ** len(frac)
        )
    if size > MAX_SIZE:
        raise OptionError(
            f"invalid size {shown(text)}: larger than 1E ({MAX_SIZE} bytes)", hint=SIZE_HINT
        )
    if size <= 0:
        raise OptionError(f"invalid size {shown(text)}", hint=SIZE_HINT)
    return size


def _check_characters(what: str, text: str) -> None:
    if not text.isprintable():
        bad = next(ch for ch in text if not ch.isprintable())
        raise OptionError(
            f"invalid {what} {shown(text)}: it contains the character {bad!r}",
            hint="paths may hold printable characters only (no control characters, "
            "tabs, line breaks or invisible formatting)",
        )


def _check_path(spec: str, what: str, path: str) -> str:
    if not path:
        raise OptionError(f"invalid volume {shown(spec)}: empty {what}", hint="use SRC:DST[:ro|rw]")
    size = len(path.encode())
    if size >= PATH_MAX:
        raise OptionError(
            f"invalid volume {shown(spec)}: the {what} is {size} bytes long, longer than "
            f"{PATH_MAX - 1} bytes",
            hint="paths are limited to PATH_MAX (4096 bytes); use a shorter path or a symlink",
        )
    if not path.startswith("/"):
        raise OptionError(
            f"invalid volume {shown(spec)}: the {what} {shown(path)} is not an absolute path",
            hint="give absolute paths, e.g. -V $SCRATCH/in:/data",
        )
    components = path.split("/")
    if ".." in components:
        raise OptionError(f"invalid volume {shown(spec)}: the {what} {shown(path)} contains '..'")
    for component in components:
        if len(component) > NAME_MAX // 4 and len(component.encode()) > NAME_MAX:
            raise OptionError(
                f"invalid volume {shown(spec)}: the {what} has a component "
                f"{shown(component)} longer than {NAME_MAX} bytes",
                hint="file names are limited to NAME_MAX (255 bytes)",
            )
    # normpath keeps exactly two leading slashes (POSIX leaves "//" to the system; Linux
    # reads it as "/"): one, so that checks comparing targets as text see "/etc"
    return "/" + posixpath.normpath(path).lstrip("/")


def _parse_per_node_cache(spec: str, value: str) -> PerNodeCache:
    """``size=10G,bs=1M,method=loop,fs=xfs`` as Shifter reads it (keys and words in any
    case); unlike Shifter, an unknown or repeated key is refused, not ignored."""
    found: dict[str, str] = {}
    for item in value.split(","):
        if not item:
            continue  # Shifter reads "size=1G," too
        key, sep, text = item.partition("=")
        key = key.lower()
        if not sep:
            raise OptionError(
                f"invalid volume {shown(spec)}: perNodeCache option {shown(item)} is not KEY=VALUE",
                hint=_PER_NODE_CACHE_HINT,
            )
        if key not in ("size", "bs", "method", "fs"):
            raise OptionError(
                f"invalid volume {shown(spec)}: unknown perNodeCache key {shown(key)}",
                hint=_PER_NODE_CACHE_HINT,
            )
        if key in found:
            raise OptionError(
                f"invalid volume {shown(spec)}: perNodeCache key {key!r} is given twice",
                hint=_PER_NODE_CACHE_HINT,
            )
        if not text:
            raise OptionError(
                f"invalid volume {shown(spec)}: perNodeCache {key}= has an empty value",
                hint=_PER_NODE_CACHE_HINT,
            )
        found[key] = text
    if "size" not in found:
        raise OptionError(
            f"invalid volume {shown(spec)}: perNodeCache needs a size", hint=_PER_NODE_CACHE_HINT
        )
    method = found.get("method", "loop").lower()
    if method not in PER_NODE_CACHE_METHODS:
        raise OptionError(
            f"invalid volume {shown(spec)}: perNodeCache method {shown(method)} is not known",
            hint="the only method is loop (a file system in a file on a loop device)",
        )
    fs = found["fs"].lower() if "fs" in found else None
    if fs is not None and fs not in PER_NODE_CACHE_FS:
        raise OptionError(
            f"invalid volume {shown(spec)}: perNodeCache file system {shown(fs)} is not supported",
            hint=f"use fs={' or fs='.join(PER_NODE_CACHE_FS)}, or leave fs= out for the "
            "site's choice",
        )
    block_size = parse_size(found["bs"]) if "bs" in found else PER_NODE_CACHE_BLOCK_SIZE
    return PerNodeCache(parse_size(found["size"]), block_size, method, fs)


def _parse_flags(
    spec: str, flags: list[str], site: bool
) -> tuple[bool, PerNodeCache | None, bool, str | None]:
    """``(read_only, per_node_cache, recursive, propagation)`` of a volume's ``flags``
    (names in any case, as Shifter reads them; an empty flag is ignored, as by Shifter)."""
    read_only, recursive = False, False
    cache: PerNodeCache | None = None
    propagation: str | None = None
    seen: list[str] = []
    for flag in flags:
        if not flag:
            continue
        name, sep, value = flag.partition("=")
        name = name.lower()
        if name == "pernodecache":
            cache = _parse_per_node_cache(spec, value)
        elif name in ("ro", "rw", *SITE_VOLUME_FLAGS):
            if sep:
                raise OptionError(
                    f"invalid volume {shown(spec)}: the flag {name!r} takes no value",
                    hint=f"write :{name}",
                )
            if name in SITE_VOLUME_FLAGS and not site:
                raise OptionError(
                    f"invalid volume {shown(spec)}: the flag {name!r} is for site volumes "
                    "only (runtime.site_volumes of the site's configuration)",
                    hint=f"user volumes take the flags {', '.join(VOLUME_FLAGS)}",
                )
            if name == "ro":
                read_only = True
            elif name == "rec":
                recursive = True
            elif name in PROPAGATIONS:
                propagation = name
        else:
            flags_known = (*VOLUME_FLAGS, *SITE_VOLUME_FLAGS) if site else VOLUME_FLAGS
            raise OptionError(
                f"invalid volume {shown(spec)}: unknown flag {shown(flag)}",
                hint=f"flags are {', '.join(flags_known)}",
            )
        if name in seen:
            raise OptionError(f"invalid volume {shown(spec)}: the flag {name!r} is given twice")
        seen.append(name)
    for pair in (("ro", "rw"), PROPAGATIONS):
        if all(p in seen for p in pair):
            raise OptionError(
                f"invalid volume {shown(spec)}: both {pair[0]} and {pair[1]} are given",
                hint="keep one of them",
            )
    if "pernodecache" in seen and len(seen) > 1:
        raise OptionError(
            f"invalid volume {shown(spec)}: perNodeCache takes no other flag",
            hint="a perNodeCache volume is a fresh file system, writable by its user",
        )
    return read_only, cache, recursive, propagation


def parse_volume(spec: str, *, site: bool = False) -> Volume:
    """Parse one ``SRC:DST[:FLAG...]`` (the bounds of the module docstring apply).

    ``site``: a site volume, which may also take Shifter's siteFs flags ``rec``, ``slave``
    and ``private`` (:data:`SITE_VOLUME_FLAGS`); a user's volume takes ``ro``, ``rw`` or
    ``perNodeCache=...`` only."""
    if len(spec) > 2 * PATH_MAX + 64:
        raise OptionError(
            f"invalid volume {shown(spec)}: longer than {2 * PATH_MAX + 64} characters",
            hint="paths are limited to PATH_MAX (4096 bytes)",
        )
    _check_characters("volume", spec)
    parts = spec.split(":")
    if len(parts) < 2:
        raise OptionError(
            f"invalid volume {shown(spec)}", hint="use SRC:DST[:ro|rw|perNodeCache=size=SIZE]"
        )
    source = _check_path(spec, "source", parts[0])
    target = _check_path(spec, "target", parts[1])
    return Volume(source, target, *_parse_flags(spec, parts[2:], site))


def parse_volumes(values: Iterable[str], *, site: bool = False) -> list[Volume]:
    """Parse every ``--volume`` value given; each may hold several specs joined by ``;``.

    Bounded as the module docstring says; the total length and the number of volumes are
    checked before any spec is parsed. ``site``: as for :func:`parse_volume`.
    """
    values = list(values)
    total = sum(len(v) + 1 for v in values)
    if total > MAX_VOLUME_TEXT:
        raise OptionError(
            f"--volume {shown(values[0])}: the volume options are {total} characters long, "
            f"longer than {MAX_VOLUME_TEXT}",
            hint=f"give at most {MAX_VOLUMES} volumes; bind a common parent directory "
            "instead of many of its files",
        )
    specs = []
    for value in values:
        found = [s.strip() for s in value.split(VOLUME_SEPARATOR) if s.strip()]
        if not found:
            raise OptionError(f"empty --volume value {shown(value)}", hint="use SRC:DST[:ro|rw]")
        specs += found
    if len(specs) > MAX_VOLUMES:
        raise OptionError(
            f"{len(specs)} volumes given: more than {MAX_VOLUMES} volumes",
            hint="bind a common parent directory instead of many of its entries",
        )
    volumes = [parse_volume(s, site=site) for s in specs]
    caches = sum(v.per_node_cache is not None for v in volumes)
    if caches > MAX_PER_NODE_CACHE_VOLUMES:
        raise OptionError(
            f"{caches} perNodeCache volumes given: at most {MAX_PER_NODE_CACHE_VOLUMES} "
            "perNodeCache volumes per job",
            hint="use one larger perNodeCache volume with subdirectories",
        )
    seen: set[str] = set()
    for volume in volumes:
        if volume.target in seen:
            raise OptionError(f"volume target {shown(volume.target)} is given more than once")
        seen.add(volume.target)
    return volumes


def format_volumes(volumes: Iterable[Volume]) -> str:
    """The canonical ``;``-joined form (what ``SHIFTER_VOLUME`` carries)."""
    return VOLUME_SEPARATOR.join(str(v) for v in volumes)


def parse_modules(value: str) -> list[str]:
    """Parse ``--module``: ``a,b`` → ``['a', 'b']``; ``none`` → ``['none']``.

    At most :data:`MAX_MODULES` names of at most 64 ASCII letters, digits, ``.``, ``_``, ``-``.
    """
    if len(value) > MAX_MODULE_TEXT:
        raise OptionError(
            f"invalid --module value {shown(value)}: longer than {MAX_MODULE_TEXT} characters",
            hint=f"give at most {MAX_MODULES} module names",
        )
    if not (value.isascii() and value.isprintable()):
        raise OptionError(
            f"invalid --module value {shown(value)}: it contains a character that is not "
            "printable ASCII",
            hint="names use letters, digits, '.', '_' and '-'",
        )
    names = [n.strip() for n in value.split(",")]
    if not value.strip() or any(not n for n in names):
        raise OptionError(
            f"invalid --module value {shown(value)}", hint="use NAME[,NAME...] or none"
        )
    if len(names) > MAX_MODULES:
        raise OptionError(
            f"{len(names)} modules given: more than {MAX_MODULES} modules",
            hint="ask your site for a module that combines what you need",
        )
    for name in names:
        if not _MODULE_NAME_RE.fullmatch(name):
            raise OptionError(
                f"invalid module name {shown(name)}",
                hint="names use up to 64 ASCII letters, digits, '.', '_' and '-'",
            )
    if MODULE_NONE in names and len(names) > 1:
        raise OptionError("--module=none cannot be combined with other modules")
    if len(set(names)) != len(names):
        raise OptionError(f"module given twice in {shown(value)}")
    return names
