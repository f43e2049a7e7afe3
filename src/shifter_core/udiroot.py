"""NERSC Shifter's ``udiRoot.conf`` turned into ``shifter.yaml`` values (pure: text in, values
and problems out; ``shifteradm import-udiroot`` writes the file).

The syntax is Shifter's (``shifter_parseConfig`` in its ``src/utility.c``): lines are split
at ``\\n``; a line whose first character is ``#`` is a comment (an indented ``#`` is not);
a line without ``=`` is ignored; otherwise the key is what precedes the first ``=`` and the
value what follows, both trimmed of C white space. A value whose last character is ``\\``
continues on the next line, which is taken whole (comment lines in between are skipped) and
joined with one space; the file ending inside a continuation drops that setting. No quotes,
no inline comments. Lists (``siteEnv``, ``imageGateway``...) are split at spaces, ``siteFs``
at ``;`` (Shifter's documentation also says spaces, which its path filter made harmless, so
both separate entries here), ``defaultModules`` at commas. A key given again replaces the
earlier value, except for ``siteFs``, the global ``siteEnv*``, ``imageGateway`` and
``perNodeCacheAllowedFsType``, which accumulate, as in Shifter's ``UdiRootConfig.c``.

What each key becomes is decided in :class:`_Converter`; every setting that is not carried
over, or is carried over with another behaviour, is a :class:`Problem` naming the line, the
key, the value, why, and what to do instead.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, OptionError, escape
from .options import (
    MAX_VOLUME_TEXT,
    MAX_VOLUMES,
    MODULE_NONE,
    parse_modules,
    parse_size,
    parse_volume,
)

MAX_TEXT = 1 << 20  # characters: NERSC's own udiRoot.conf is about 3 kB
MODULE_COPY_ROOT = "/opt/udiImage/modules"  # where Shifter put module_<name>_copyPath
_SPACE = " \t\n\v\f\r"  # C's isspace()
_PATH_FILTERED = re.compile(r"[^A-Za-z0-9_:.+/-]")  # what Shifter's userInputPathFilter drops
_C_INT = re.compile(r"[ \t\n\v\f\r]*[+-]?([0-9]+)")
_C_FLOAT = re.compile(r"[ \t\n\v\f\r]*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)")
_BYTE_UNITS = "bkmgtpe"  # Shifter's parseBytes: powers of 1024
_SHIFTER_REFUSED_TARGETS = frozenset(
    p + s
    for p in ("/", "")
    for s in ("opt", "etc", "var", "etc/passwd", "etc/group", "etc/nsswitch.conf")
)
_RUNTIME_MOUNTS = ("/proc", "/sys", "/tmp")  # mounted by the runtime itself (and /dev)
_VOLUME_FLAGS = ("ro", "rec", "slave", "private", "pernodecache")
_MODULE_LISTS = ("siteEnv", "siteEnvPrepend", "siteEnvAppend", "siteEnvUnset", "conflict")
_MODULE_KEYS = (*_MODULE_LISTS, "userhook", "roothook", "copyPath", "enabled", "siteFs")
_ENV_KINDS = {"siteEnv": "set", "siteEnvPrepend": "prepend", "siteEnvAppend": "append"}
_REMOVE = "remove it"

# Keys with no counterpart: key -> (why, what to do instead).
DROPPED: dict[str, tuple[str, str]] = {
    "udiMount": (
        "roots are built per job under runtime.run_dir",
        "nothing to do (runtime.run_dir moves them; default /run/shifter)",
    ),
    "loopMount": (
        "images are mounted inside each job's directory under runtime.run_dir",
        "nothing to do",
    ),
    "udiRootPath": ("there is no installation prefix: the runtime is a Python package", _REMOVE),
    "sitePreMountHook": (
        "there are no site-wide mount hooks",
        "use a module with root_hook (run as root after the mounts, the root's path as its "
        "argument) and default: true",
    ),
    "sitePostMountHook": (
        "there are no site-wide mount hooks",
        "use a module with root_hook (run as root after the mounts, the root's path as its "
        "argument) and default: true",
    ),
    "optUdiImage": (
        "containers get no /opt/udiImage (Shifter's sshd and helpers)",
        "bind what users need with runtime.site_volumes, away from /opt/udiImage/modules "
        "(where module copies go)",
    ),
    "etcPath": (
        "/etc/passwd and /etc/group are generated for the user and /etc/hosts and "
        "/etc/resolv.conf come from the host; other files are not copied into /etc",
        "copy other files with a default module's copies (e.g. ETCPATH/nsswitch.conf:"
        "/etc/nsswitch.conf)",
    ),
    "allowLibcPwdCalls": ("the runtime looks the user up itself", _REMOVE),
    "populateEtcDynamically": ("/etc/passwd and /etc/group are always generated", _REMOVE),
    "autoLoadKernelModule": (
        "Shifter ignores it too (deprecated); no kernel module is ever loaded",
        "load loop, squashfs and overlay at boot",
    ),
    "kmodBasePath": ("Shifter ignores it too (deprecated)", _REMOVE),
    "kmodCacheFile": ("Shifter ignores it too (deprecated)", _REMOVE),
    "optionalSshdAsRoot": ("Shifter ignores it too (deprecated); there is no sshd", _REMOVE),
    "mountUdiRootWritable": (
        "a root is an overlay the runtime sets up itself (users ask for --writable-tmpfs)",
        _REMOVE,
    ),
    "maxGroupCount": ("the generated /etc/group has no group cap", _REMOVE),
    "modprobePath": ("no kernel module is ever loaded", _REMOVE),
    "insmodPath": ("no kernel module is ever loaded", _REMOVE),
    "cpPath": ("the runtime runs no cp", _REMOVE),
    "mvPath": ("the runtime runs no mv", _REMOVE),
    "chmodPath": ("the runtime runs no chmod", _REMOVE),
    "ddPath": ("the runtime runs no dd", _REMOVE),
    "mkfsXfsPath": (
        "mkfs.FS is looked up on PATH, /usr/sbin and /sbin for runtime.per_node_cache_fs",
        "install it there",
    ),
    "rootfsType": ("a root is an overlay with a tmpfs upper layer", _REMOVE),
    "gatewayTimeout": ("there is no setting for how long clients wait for the gateway", _REMOVE),
    "batchType": ("Slurm is the only batch system", _REMOVE),
    "system": (
        "a gateway serves one image store; there are no system names",
        "run one gateway and image_path per system",
    ),
}
_SCALARS = (
    "imagePath",
    "defaultImageType",
    "perNodeCachePath",
    "perNodeCacheSizeLimit",
    "mountPropagationStyle",
    "allowLocalChroot",
    "nodeContextPrefix",
    "defaultModules",
)
_LISTS = (
    "siteFs",
    "siteEnv",
    "siteEnvPrepend",
    "siteEnvAppend",
    "siteEnvUnset",
    "imageGateway",
    "perNodeCacheAllowedFsType",
)
KNOWN_KEYS = frozenset((*DROPPED, *_SCALARS, *_LISTS))


class UdiRootError(ConfigError):
    """The text cannot be read as a udiRoot.conf at all."""


@dataclass(frozen=True)
class Setting:
    """One ``KEY=VALUE`` as Shifter assigns it (continuation lines joined by a space)."""

    key: str
    value: str
    line: int


@dataclass(frozen=True)
class Problem:
    """A setting (or one entry of it) not carried over; ``changed``: carried over, but it
    behaves differently."""

    line: int
    key: str
    value: str
    reason: str
    action: str
    changed: bool = False
    has_value: bool = True  # False: a line that is not KEY=VALUE (``key`` is the line)

    def __str__(self) -> str:
        what = "carried over, but" if self.changed else "not carried over:"
        text = f"{self.key}={self.value}" if self.has_value else self.key
        return f"line {self.line}: {escape(text, 240)}: {what} {self.reason}; {self.action}"


@dataclass
class _Volume:
    source: str
    target: str
    flags: list[str]  # ro or rw first, then rec and slave or private (site volumes only)
    origin: Setting

    def spec(self) -> str:
        return ":".join([self.source, self.target, *self.flags])


@dataclass
class _Module:
    name: str
    line: int
    scalars: dict[str, Setting] = field(default_factory=dict)
    site_fs: list[Setting] = field(default_factory=list)


def parse(text: str) -> tuple[list[Setting], list[Problem]]:
    """Shifter's reading of ``text``: its settings in order, and the lines it ignored."""
    if len(text) > MAX_TEXT:
        raise UdiRootError(
            f"the file is longer than {MAX_TEXT} characters", hint="is it a udiRoot.conf?"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UdiRootError("the file is not text (it holds a lone surrogate)") from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise UdiRootError(f"line {line} holds a NUL character", hint="is it a udiRoot.conf?")
    settings: list[Setting] = []
    ignored: list[Problem] = []
    key: str | None = None
    parts: list[str] = []
    start = 0
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # getline() reads no line after the last newline
    for number, raw in enumerate(lines, 1):
        if raw.startswith("#"):
            continue
        if key is None:
            name, sep, rest = raw.partition("=")
            if not sep:
                if raw.strip(_SPACE):
                    why = "the line has no '=' and Shifter ignored it"
                    ignored.append(
                        Problem(
                            number,
                            raw.strip(_SPACE),
                            "",
                            why,
                            "fix or remove the line",
                            has_value=False,
                        )
                    )
                continue
            key, start, piece = name.strip(_SPACE), number, rest.strip(_SPACE)
        else:
            piece = raw.strip(_SPACE)
        more = piece.endswith("\\")
        parts.append(piece[:-1].strip(_SPACE) if more else piece)
        if not more:
            settings.append(Setting(key, " ".join(parts).strip(_SPACE), start))
            key, parts = None, []
    if key is not None:
        why = "the file ends inside its continuation ('\\' ends its last line): Shifter ignored it"
        value = " ".join(parts).strip(_SPACE)
        ignored.append(Problem(start, key, value, why, "end the value without '\\'"))
    return settings, ignored


def convert(text: str) -> tuple[dict[str, Any], list[Problem]]:
    """The ``shifter.yaml`` values for a udiRoot.conf, and the problems, in line order."""
    settings, problems = parse(text)
    if not any(s.key in KNOWN_KEYS or s.key.startswith("module_") for s in settings):
        raise UdiRootError("the file holds no udiRoot.conf setting", hint="is it a udiRoot.conf?")
    converter = _Converter(problems)
    for setting in settings:
        converter.take(setting)
    values = converter.finish()
    problems.sort(key=lambda p: p.line)
    return values, problems


def render(values: dict[str, Any], source: str, problems: list[Problem]) -> str:
    """The YAML text of ``values``, headed by comments: where it came from, what was not
    carried over."""
    import yaml

    head = [f"# Converted from {escape(source)} by shifteradm import-udiroot."]
    dropped = [p for p in problems if not p.changed]
    changed = [p for p in problems if p.changed]
    for title, group in (("Not carried over", dropped), ("Carried over differently", changed)):
        if group:
            head.append(f"# {title}:")
            head += [f"#   {escape(p)}" for p in group]
    # Non-ASCII is escaped: with allow_unicode PyYAML writes NEL and U+2028 raw, and reads
    # them back as line breaks.
    body = yaml.safe_dump(values, sort_keys=False, width=100) if values else ""
    return "\n".join(head) + "\n" + body


def _c_true(value: str) -> bool:
    """``strtol(value, NULL, 10) != 0``, as Shifter reads a flag."""
    match = _C_INT.match(value)
    return match is not None and match.group(1).strip("0") != ""


def _c_bytes(value: str) -> int | None:
    """Shifter's ``parseBytes`` (a number, then b, k, m, g, t, p or e), or None."""
    match = _C_FLOAT.match(value)
    if match is None:
        return None
    unit = value[match.end() : match.end() + 1].lower() or "b"
    if unit not in _BYTE_UNITS:
        return None
    number = float(match.group(1)) * 1024 ** _BYTE_UNITS.index(unit)
    return int(number) if math.isfinite(number) and number >= 1 else None


def _size_text(size: int) -> str | None:
    """``size`` bytes as our size syntax (the largest exact unit), or None if it has none."""
    text = str(size)
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("k", 10)):
        if size % (1 << shift) == 0:
            text = f"{size >> shift}{unit}"
            break
    try:
        parse_size(text)
    except OptionError:
        return None
    return text


def _env_values(env: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The non-empty parts of collected environment changes (``unset`` as a list)."""
    return {k: list(v) if k == "unset" else v for k, v in env.items() if v}


def _below(path: str, prefix: str) -> bool:
    return path == prefix or prefix == "/" or path.startswith(prefix.rstrip("/") + "/")


def _nested(a: str, b: str) -> bool:
    """Whether the runtime refuses mounts at ``a`` and ``b`` together: the same target, or
    one inside the other (below /dev, only the same target: those are made in its tmpfs)."""
    if a == b:
        return True
    if _below(a, "/dev") or _below(b, "/dev"):
        return False
    return _below(a, b) or _below(b, a)


class _Converter:
    """The settings of one file, taken in order, and the values they become."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        self.scalars: dict[str, Setting] = {}
        self.modules: dict[str, _Module] = {}
        self.site_volumes: list[_Volume] = []
        self.env: dict[str, dict[str, Any]] = {"set": {}, "prepend": {}, "append": {}, "unset": {}}
        self.gateways: list[Setting] = []
        self.fs_types: list[str] = []
        self.runtime: dict[str, Any] = {}
        self.values: dict[str, Any] = {}

    def report(self, s: Setting, reason: str, action: str, value: str | None = None) -> None:
        self.problems.append(
            Problem(s.line, s.key, s.value if value is None else value, reason, action)
        )

    def note(self, s: Setting, reason: str, action: str, value: str | None = None) -> None:
        self.problems.append(
            Problem(
                s.line, s.key, s.value if value is None else value, reason, action, changed=True
            )
        )

    def replaced(self, old: Setting, new: Setting) -> None:
        self.report(
            old, f"given again on line {new.line}, and Shifter used the last value", "keep one"
        )

    # -- taking the settings in order ----------------------------------------------------

    def take(self, s: Setting) -> None:
        """Take one setting: lists now, the last value of a scalar at the end."""
        if s.key in DROPPED:
            self.report(s, *DROPPED[s.key])
        elif s.key in _SCALARS:
            if s.key in self.scalars:
                self.replaced(self.scalars[s.key], s)
            self.scalars[s.key] = s
        elif s.key == "siteFs":
            self.site_volumes += self.volumes(s, "runtime.site_volumes", module=None)
        elif s.key in _ENV_KINDS or s.key == "siteEnvUnset":
            self.env_tokens(s, self.env, s.key)
        elif s.key == "imageGateway":
            self.gateways.append(s)
        elif s.key == "perNodeCacheAllowedFsType":
            self.fs_types += s.value.split()
        elif s.key.startswith("module_"):
            self.take_module(s)
        else:
            self.report(
                s,
                "it is not a udiRoot.conf setting (Shifter refuses the file)",
                "check its spelling",
            )

    def take_module(self, s: Setting) -> None:
        words = [w for w in s.key.split("_") if w]
        if len(words) < 3 or words[2] not in _MODULE_KEYS:
            self.report(
                s,
                "it is not a module setting Shifter knows (module_NAME_SETTING; "
                "a NAME holds no '_')",
                "check its spelling",
            )
            return
        name, sub = words[1], words[2]
        module = self.modules.setdefault(name, _Module(name, s.line))
        if sub == "siteFs":
            module.site_fs.append(s)
            return
        if sub in module.scalars:
            self.replaced(module.scalars[sub], s)
        module.scalars[sub] = s

    def env_tokens(self, s: Setting, env: dict[str, dict[str, Any]], kind: str) -> None:
        """Add the space-separated ``NAME=VALUE`` (or NAME, to unset) entries of ``s``."""
        for token in s.value.split(" "):
            if not token:
                continue
            name, sep, value = token.partition("=")
            if kind == "siteEnvUnset":
                if sep or not name:
                    self.report(
                        s, "an entry to unset is a variable's NAME", "give the names alone", token
                    )
                else:
                    env["unset"][name] = None
            elif not sep or not name:
                self.report(s, "the entry is not NAME=VALUE", "write NAME=VALUE", token)
            else:
                env[_ENV_KINDS[kind]][name] = value

    # -- volumes ------------------------------------------------------------------------------

    def volumes(self, s: Setting, into: str, module: str | None) -> list[_Volume]:
        """The entries of a ``siteFs`` (``FROM[:TO][:FLAG...]``, ``;``-separated) that carry
        over; the others reported. In a module, ``/dev/X:/dev/X`` becomes a device."""
        out: list[_Volume] = []
        for entry in (e for part in s.value.split(";") for e in part.split()):
            volume = self.volume(s, entry, into, module)
            if volume is not None:
                out.append(volume)
        return out

    def volume(self, s: Setting, entry: str, into: str, module: str | None) -> _Volume | None:
        def drop(reason: str, action: str = f"give it in {into} yourself") -> _Volume | None:
            self.report(s, reason, action, entry)
            return None

        text = entry[1:-1] if len(entry) > 1 and entry[0] == entry[-1] == '"' else entry
        parts = text.split(":")
        paths = [parts[0], parts[1] if len(parts) > 1 else parts[0]]
        flags: list[str] = []
        for flag in (f for f in parts[2:] if f):
            name, _, args = flag.partition("=")
            name = name.lower()
            if name not in _VOLUME_FLAGS or name in flags:
                return drop(f"{flag!r} is an unknown or repeated flag (Shifter refuses the file)")
            if args and name != "pernodecache":
                return drop(f"the flag {name} takes no value (Shifter refuses the file)")
            flags.append(name)
        if "pernodecache" in flags:
            return drop("perNodeCache is for user volumes only", "users ask for it with --volume")
        if "slave" in flags and "private" in flags:
            return drop("it has both slave and private (Shifter refuses the file)")
        filtered = [_PATH_FILTERED.sub("", p) for p in paths]
        if filtered != paths:
            return drop(
                "Shifter drops all but ASCII letters, digits and '_.+-/' from these paths "
                f"(it bound {filtered[0]}:{filtered[1]})",
                f"give the path you mean in {into}",
            )
        if paths[1] in _SHIFTER_REFUSED_TARGETS:
            return drop(f"Shifter refuses the target {paths[1]} (and the file)")
        if not all(p.startswith("/") for p in paths):
            return drop("its paths must be absolute")
        # Site volumes keep Shifter's rec, slave and private; module binds take ro or rw only.
        kept = ["ro" if "ro" in flags else "rw"]
        if module is None:
            kept += [f for f in ("rec", "slave", "private") if f in flags]
        try:
            parsed = parse_volume(":".join([*paths, *kept]), site=module is None)
        except OptionError as err:
            return drop(str(err))
        source, target = parsed.source, parsed.target
        if target in ("/", "/dev") or any(_below(target, m) for m in _RUNTIME_MOUNTS):
            return drop(
                f"the runtime mounts {target} itself and refuses a mount there or inside it",
                "choose another target",
            )
        if module is not None and "slave" in flags:
            self.note(
                s,
                "a module's bind has private mount propagation: mounts made on the host "
                "later do not appear in containers",
                "bind it in runtime.site_volumes with :slave if every container needs it",
                entry,
            )
        if _below(source, "/dev") and module is not None and source == target:
            self.note(
                s,
                "as a device node (a module passes device nodes, not directories)",
                f"if it is a directory, list {source}/* in modules.{module}.devices",
                entry,
            )
        elif _below(source, "/dev"):
            self.note(
                s,
                "binds are nodev: device nodes in it do not work",
                "list device nodes in a module's devices (bound at their own path)",
                entry,
            )
        return _Volume(source, target, kept, s)

    def unique(self, volumes: list[_Volume], taken: list[_Volume]) -> list[_Volume]:
        """``volumes`` without those the runtime would refuse next to ``taken`` and each
        other: the same target twice, a target inside another, more than MAX_VOLUMES (or
        MAX_VOLUME_TEXT characters)."""
        kept: list[_Volume] = []
        size = sum(len(v.spec()) + 1 for v in taken)
        for volume in volumes:
            other = next((v for v in (*taken, *kept) if _nested(volume.target, v.target)), None)
            if other is not None:
                self.report(
                    volume.origin,
                    f"its target {volume.target} is, or nests with, {other.target} "
                    f"(line {other.origin.line}): the runtime refuses nested mounts",
                    "keep one of them",
                    volume.spec(),
                )
            elif len(taken) + len(kept) >= MAX_VOLUMES or (
                size + len(volume.spec()) + 1 > MAX_VOLUME_TEXT
            ):
                self.report(
                    volume.origin,
                    f"more than {MAX_VOLUMES} volumes or {MAX_VOLUME_TEXT} characters of them",
                    "bind a common parent directory",
                    volume.spec(),
                )
            else:
                kept.append(volume)
                size += len(volume.spec()) + 1
        return kept

    # -- the end: scalars, modules, values ------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """The values of everything taken."""
        handlers = {
            "imagePath": self.image_path,
            "defaultImageType": self.default_image_type,
            "perNodeCachePath": self.per_node_cache_dir,
            "perNodeCacheSizeLimit": self.per_node_cache_max_size,
            "mountPropagationStyle": self.propagation,
            "allowLocalChroot": self.local_chroot,
            "nodeContextPrefix": self.node_context_prefix,
        }
        for key, s in self.scalars.items():
            if key in handlers:
                handlers[key](s)
        self.gateway()
        site = self.unique(self.site_volumes, [])
        if site:
            self.runtime["site_volumes"] = [v.spec() for v in site]
        env = _env_values(self.env)
        if env:
            self.runtime["env"] = env
        if self.fs_types:
            self.runtime["per_node_cache_fs"] = list(dict.fromkeys(self.fs_types))
        if self.runtime:
            self.values["runtime"] = self.runtime
        modules = self.build_modules(site)
        if modules:
            self.values["modules"] = modules
        order = ("image_path", "default_image_type", "gateway", "runtime", "modules")
        return {k: self.values[k] for k in order if k in self.values}

    def image_path(self, s: Setting) -> None:
        if s.value.startswith("/"):
            self.values["image_path"] = s.value
        else:
            self.report(s, "it must be an absolute path", "set image_path")

    def default_image_type(self, s: Setting) -> None:
        if s.value in ("docker", "id"):
            self.values["default_image_type"] = s.value
        else:
            self.report(s, "the only image types are docker and id", "users give TYPE:NAME")

    def per_node_cache_dir(self, s: Setting) -> None:
        if s.value.startswith("/"):
            self.runtime["per_node_cache_dir"] = s.value
        else:
            self.report(s, "it must be an absolute path", "set runtime.per_node_cache_dir")

    def per_node_cache_max_size(self, s: Setting) -> None:
        size = _c_bytes(s.value)
        text = _size_text(size) if size is not None else None
        if text is None:
            self.report(
                s,
                "it is not a size (a number with an optional k, M, G or T, at most 1 EiB)",
                "set runtime.per_node_cache_max_size (e.g. 64G)",
            )
        else:
            self.runtime["per_node_cache_max_size"] = text

    def propagation(self, s: Setting) -> None:
        if s.value == "slave":
            self.report(
                s,
                "there is no mount propagation for a whole container: each site volume "
                "takes :slave or :private",
                "add :slave to the runtime.site_volumes that need it",
            )
        elif s.value != "private":
            self.report(s, "it is neither private nor slave (Shifter refuses the file)", _REMOVE)

    def local_chroot(self, s: Setting) -> None:
        if _c_true(s.value):
            self.report(
                s,
                "there is no local: image type (a container from a host directory)",
                "users run images from the gateway",
            )

    def node_context_prefix(self, s: Setting) -> None:
        if s.value:
            self.report(s, "Shifter ignores it too (defunct)", _REMOVE)

    def gateway(self) -> None:
        urls = [(s, u) for s in self.gateways for u in s.value.split(" ") if u]
        chosen = False
        for s, url in urls:
            if chosen:
                self.report(
                    s,
                    "there is one gateway URL (Shifter tried each in turn)",
                    "serve one gateway at gateway.url",
                    url,
                )
            elif not url.startswith(("http://", "https://")):
                self.report(s, "it is not an http:// or https:// URL", "set gateway.url", url)
            else:
                chosen = True
                self.values["gateway"] = {"url": url}
                self.note(
                    s,
                    "clients reach shifter-gateway at this URL, not the legacy imagegw",
                    "run shifter-gateway there (gateway.listen; TLS or a "
                    "Unix socket beyond loopback)",
                    url,
                )

    def build_modules(self, site: list[_Volume]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for legacy in self.modules.values():
            built = self.build_module(legacy, site)
            if built is not None:
                out[legacy.name] = built
        for name, module in out.items():
            wanted = dict.fromkeys(module.pop("conflicts", []))
            found = [c for c in wanted if c in out and c != name]
            if found:
                module["conflicts"] = found
            origin = self.modules[name].scalars.get("conflict")
            for other in (c for c in wanted if c not in out or c == name):
                assert origin is not None
                self.report(
                    origin,
                    "no such module carried over (or the module itself)",
                    "name modules defined here",
                    other,
                )
        return self.defaults(out)

    def build_module(self, m: _Module, site: list[_Volume]) -> dict[str, Any] | None:
        settings = [*m.scalars.values(), *m.site_fs]
        try:
            parse_modules(m.name)
            bad = m.name == MODULE_NONE
        except OptionError:
            bad = True
        enabled = m.scalars.get("enabled")
        why = f"{m.name!r} is not a module name here (letters, digits, '.', '_', '-'; not none)"
        if not bad and enabled is not None and not _c_true(enabled.value):
            why, bad = f"module {m.name} is disabled (line {enabled.line})", True
        if bad:
            for s in settings:
                self.report(s, why, "define the module in modules yourself")
            return None
        out: dict[str, Any] = {}
        devices: list[str] = []
        binds: list[_Volume] = []
        for s in m.site_fs:
            for volume in self.volumes(s, f"modules.{m.name}.binds", module=m.name):
                if _below(volume.source, "/dev") and volume.source == volume.target:
                    devices.append(volume.source)
                else:
                    binds.append(volume)
        if devices:
            out["devices"] = list(dict.fromkeys(devices))
        kept = self.unique(binds, site)
        if kept:
            out["binds"] = [v.spec() for v in kept]
        self.module_scalars(m, out)
        return out

    def module_scalars(self, m: _Module, out: dict[str, Any]) -> None:
        env: dict[str, dict[str, Any]] = {"set": {}, "prepend": {}, "append": {}, "unset": {}}
        for sub, s in m.scalars.items():
            if sub in _ENV_KINDS or sub == "siteEnvUnset":
                self.env_tokens(s, env, sub)
            elif sub == "conflict":
                out["conflicts"] = [c for c in s.value.split(" ") if c]
            elif sub == "copyPath":
                self.copy_path(m.name, s, out)
            elif sub in ("userhook", "roothook"):
                self.hook(m.name, sub, s, out)
        values = _env_values(env)
        if values:
            out["env"] = values

    def copy_path(self, name: str, s: Setting, out: dict[str, Any]) -> None:
        path = s.value.rstrip("/") or "/"
        if not path.startswith("/") or ":" in path or any(c in path for c in "*?["):
            self.report(
                s,
                "it must be an absolute path without ':' or glob characters",
                f"set modules.{name}.copies",
            )
        else:
            out["copies"] = [f"{path}:{MODULE_COPY_ROOT}/{name}"]

    def hook(self, name: str, sub: str, s: Setting, out: dict[str, Any]) -> None:
        key = "user_hook" if sub == "userhook" else "root_hook"
        if not s.value.startswith("/") or any(c in s.value for c in _SPACE):
            self.report(
                s, "a hook is one absolute path, run without arguments", f"set modules.{name}.{key}"
            )
            return
        out[key] = s.value
        if sub == "userhook":
            self.note(
                s,
                "the hook is executed itself, not read by /bin/sh",
                "make it executable with a #! line",
            )
        else:
            self.note(
                s,
                "the hook is executed itself (not by /bin/sh) with the root's path as "
                "its argument and in SHIFTER_ROOT, not in the root as its directory",
                "make it executable with a #! line and use that path",
            )

    def defaults(self, modules: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """``defaultModules`` applied: those modules default, first, in its order."""
        s = self.scalars.get("defaultModules")
        if s is None or s.value.lower() == "none":
            return modules
        names = list(dict.fromkeys(n.strip(_SPACE) for n in s.value.split(",") if n.strip(_SPACE)))
        for name in names:
            if name not in modules:
                self.report(s, "no such module carried over", "name modules defined here", name)
        chosen = {n: None for n in names if n in modules}
        if chosen:
            self.note(
                s,
                "--module=NAME adds to the default modules instead of replacing them",
                "make a module default only if every container should load it "
                "(--module=none turns all of them off)",
            )
        for name in chosen:
            modules[name] = {"default": True, **modules[name]}
        return {n: modules[n] for n in [*chosen, *(n for n in modules if n not in chosen)]}
