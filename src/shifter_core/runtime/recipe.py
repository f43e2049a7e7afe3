"""The launch recipe: the explicit operations the C launcher (``launcher/``) executes.

The Python runtime decides how a container is built (:mod:`.mountops` emits the operations
of its mounts, which :mod:`.execute` runs); this module defines the operations and their
file, and the launcher replays them, deciding nothing itself: every flag, path, mode, link
and environment change is in the recipe. A recipe is
NUL-terminated fields::

    shifter-recipe  VERSION  COUNT  ( OP  NFIELDS  FIELD * NFIELDS ) * COUNT

and nothing after the last operation. Each operation has a fixed signature
(:data:`OPERATIONS`); a recipe that breaks any rule (magic, version, count, an unknown
operation, a field count, a field too long or of the wrong form, operations out of order)
is refused as a whole, by the launcher and by :func:`parse` alike, before anything is
executed; the launcher then runs the Python runtime.

:func:`render` gives the canonical text, one operation per line, that the launcher's
dry-run mode (``SHIFTER_LAUNCH_DRY_RUN=FILE``) prints for the same recipe: the contract
tests compare the two.
"""

from __future__ import annotations

from .. import syscalls

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from .plan import Plan

MAGIC = "shifter-recipe"
VERSION = 3
MAX_BYTES = 1 << 22
MAX_OPS = 4096
MAX_STRING = 131072  # a string field, in bytes (MAX_ARG_STRLEN: no longer value can be exec'd)
MAX_PATH = 4095  # a path field, in bytes (PATH_MAX with its NUL)
MAX_WORD = 255  # a file system type
MAX_SLOTS = 256  # detached mounts held at once
MAX_DIGITS = 18  # decimal numbers stay below 10**18

# Field types of the signatures:
#   s string   p absolute path   P absolute path or ""   e environment name   w word
#   n decimal number   o octal mode   x slot   m mount(2) flags   a mount attributes
#   c "recursive" or ""   g propagation: "private" or "slave"   t "dir" or "file"
#   r access: "", "r" or "rx"
# Phases: operations come in non-decreasing phase; the launcher may still fall back to
# Python before phase 3, never after.
OPERATIONS: dict[str, tuple[str, int]] = {
    "key": ("s", 0),  # the request the recipe is for (the launcher compares its own)
    "depends": ("ps", 1),  # a file and its identity (dev:ino:size:mtime_ns)
    "expires": ("n", 1),  # epoch seconds from which the recipe no longer holds
    "require": ("ptr", 1),  # PATH exists, is a dir/file, is accessible so
    "join": ("p", 2),  # share a sibling's container, meeting in DIR (runtime/siblings.py)
    "serve": ("p", 2),  # start the image server (libsquashfuse) for this squashfs file
    "userns": ("P", 3),  # join the user namespace pinned at PATH, else make one; new mount ns
    "clone": ("xpcag", 4),  # SLOT := a detached copy of host SOURCE: attributes, propagation
    "fuse": ("pms", 4),  # mount the served image at host TARGET (DATA, plus fd=N)
    "overlay": ("pms", 4),  # mount an overlay at host TARGET: the container's root from now
    "mount": ("spwms", 5),  # mount(SOURCE, TARGET in the root, FSTYPE, FLAGS, DATA)
    "attach": ("xp", 5),  # move SLOT's mount onto TARGET in the root
    "mkdir": ("po", 5),  # a directory in the root (left as it is if it exists)
    "mkfile": ("po", 5),  # an empty file in the root (a mount point; kept if it exists)
    "symlink": ("sp", 5),  # a symbolic link with this text at PATH in the root
    "setattr": ("pac", 5),  # set mount attributes on TARGET in the root
    "pivot": ("", 6),  # pivot_root into the root; the host's mounts are detached
    "chroot": ("p", 6),  # chroot into a root prepared for the job (a host path)
    "drop": ("nn", 7),  # drop every capability, set no_new_privs; must be UID, GID (not 0)
    "chdir": ("p", 8),  # change to PATH (an error if it fails)
    "chdir-caller": ("p", 8),  # the caller's working directory, else PATH
    "env-clear": ("", 8),
    "env-set": ("es", 8),
    "env-unset": ("e", 8),
    "env-prepend": ("es", 8),  # NAME=VALUE:old (VALUE alone if unset or empty)
    "env-append": ("es", 8),  # NAME=old:VALUE (VALUE alone if unset or empty)
    "exec": ("", 9),  # the command of the command line, on the PATH of the environment
}
MOUNT_FLAGS = (
    ("ro", syscalls.MS_RDONLY),
    ("nosuid", syscalls.MS_NOSUID),
    ("nodev", syscalls.MS_NODEV),
    ("noexec", syscalls.MS_NOEXEC),
)
MOUNT_ATTRS = (
    ("ro", syscalls.MOUNT_ATTR_RDONLY),
    ("nosuid", syscalls.MOUNT_ATTR_NOSUID),
    ("nodev", syscalls.MOUNT_ATTR_NODEV),
    ("noexec", syscalls.MOUNT_ATTR_NOEXEC),
)
_FLAG_TABLES = {"m": MOUNT_FLAGS, "a": MOUNT_ATTRS}
#: A clone's mount propagation (``g`` fields) and its mount_setattr(2) value.
PROPAGATIONS = {b"private": syscalls.MS_PRIVATE, b"slave": syscalls.MS_SLAVE}
_CONTAINER_OPS = ("mount", "attach", "mkdir", "mkfile", "symlink", "setattr")


class RecipeError(ValueError):
    """A recipe that the launcher would refuse (the message is the launcher's)."""


class Op:
    """One operation: its name and its fields, typed by its signature (str for text,
    int for numbers, modes, slots and flag sets, bool for the ``c`` field)."""

    __slots__ = ("args", "name")

    def __init__(self, name: str, *args: str | int) -> None:
        self.name = name
        self.args = args

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Op) and (self.name, self.args) == (other.name, other.args)

    def __hash__(self) -> int:
        return hash((self.name, self.args))

    def __repr__(self) -> str:
        return f"Op{(self.name, *self.args)!r}"


# ---- the file -------------------------------------------------------------------------------


def _encode(kind: str, value: str | int) -> str:
    if kind in _FLAG_TABLES:
        assert isinstance(value, int)
        names = [name for name, bit in _FLAG_TABLES[kind] if value & bit]
        if value & ~sum(bit for _, bit in _FLAG_TABLES[kind]):
            raise RecipeError(f"flags {value:#x} have no name")
        return ",".join(names)
    if kind == "c":
        return "recursive" if value else ""
    if kind == "o":
        assert isinstance(value, int)
        return f"{value:o}"
    return str(value)


def serialise(ops: Sequence[Op]) -> bytes:
    """The recipe's bytes; RecipeError if the launcher would refuse them."""
    fields = [MAGIC, str(VERSION), str(len(ops))]
    for op in ops:
        if op.name not in OPERATIONS:
            raise RecipeError(f"unknown operation {op.name!r}")
        signature = OPERATIONS[op.name][0]
        if len(op.args) != len(signature):
            raise RecipeError(f"{op.name}: {len(op.args)} fields, not {len(signature)}")
        fields += [op.name, str(len(signature))]
        fields += [_encode(kind, value) for kind, value in zip(signature, op.args, strict=True)]
    encoded = [f.encode("utf-8", "surrogateescape") for f in fields]
    if any(b"\0" in f for f in encoded):
        raise RecipeError("a field holds a NUL byte")
    data = b"".join(f + b"\0" for f in encoded)
    parse(data)  # the launcher's rules: never write what it would refuse
    return data


def _number(text: bytes, limit: int, what: str) -> int:
    if not text or len(text) > MAX_DIGITS or not text.isdigit() or not text.isascii():
        raise RecipeError(f"bad {what}")
    value = int(text)
    if value >= limit:
        raise RecipeError(f"bad {what}")
    return value


def _flags(text: bytes, table: tuple[tuple[str, int], ...]) -> int:
    if not text:
        return 0
    value = 0
    for token in text.split(b","):
        for name, bit in table:
            if token == name.encode():
                value |= bit
                break
        else:
            raise RecipeError("unknown flag")
    return value


def _field(kind: str, raw: bytes) -> str | int:
    """One field of type ``kind`` (see OPERATIONS), as the launcher checks it."""
    if kind in "sPpewtr":
        if len(raw) > MAX_STRING:
            raise RecipeError("field too long")
        text = raw.decode("utf-8", "surrogateescape")
        if kind == "p" or (kind == "P" and raw):
            if not raw.startswith(b"/") or len(raw) > MAX_PATH:
                raise RecipeError("bad path")
        elif kind == "e":
            if not raw or b"=" in raw:
                raise RecipeError("bad variable name")
        elif kind == "w":
            if not raw or len(raw) > MAX_WORD:
                raise RecipeError("bad word")
        elif kind == "t":
            if raw not in (b"dir", b"file"):
                raise RecipeError("bad type")
        elif kind == "r" and raw not in (b"", b"r", b"rx"):
            raise RecipeError("bad access")
        return text
    if kind == "n":
        return _number(raw, 10**MAX_DIGITS, "number")
    if kind == "x":
        return _number(raw, MAX_SLOTS, "slot")
    if kind == "o":
        if not raw or len(raw) > 5 or any(c not in b"01234567" for c in raw):
            raise RecipeError("bad mode")
        value = int(raw, 8)
        if value > 0o7777:
            raise RecipeError("bad mode")
        return value
    if kind == "c":
        if raw not in (b"", b"recursive"):
            raise RecipeError("bad clone flags")
        return int(raw == b"recursive")
    if kind == "g":
        if raw not in PROPAGATIONS:
            raise RecipeError("bad propagation")
        return raw.decode()
    return _flags(raw, _FLAG_TABLES[kind])


class _Order:
    """The order rules (``check_order`` in the launcher)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.phase = 0
        self.seen: set[str] = set()
        self.slots: dict[int, str] = {}

    def check(self, index: int, op: Op) -> None:
        name = op.name
        phase = OPERATIONS[name][1]
        seen = self.seen
        if (index == 0) != (name == "key"):
            raise RecipeError("the recipe must start with its key")
        if phase < self.phase:
            raise RecipeError("operations out of order")
        if name in ("userns", "serve", "fuse", "overlay", "drop", "join") and name in seen:
            raise RecipeError("an operation repeated")
        if name == "join" and "serve" in seen:
            raise RecipeError("join after serve")
        if name == "chroot" and "join" in seen:
            raise RecipeError("join with a prepared root")
        if phase >= 4 and "userns" not in seen:
            raise RecipeError("no namespaces")
        if name == "fuse" and "serve" not in seen:
            raise RecipeError("nothing serves the image")
        if (name in _CONTAINER_OPS or name == "pivot") and "overlay" not in seen:
            raise RecipeError("no root")
        if name in ("pivot", "chroot") and (
            "pivot" in seen or "chroot" in seen or (name == "chroot" and "overlay" in seen)
        ):
            raise RecipeError("the root is entered twice")
        if name == "drop" and "pivot" not in seen and "chroot" not in seen:
            raise RecipeError("no root entered")
        if phase >= 8 and "drop" not in seen:
            raise RecipeError("privileges not dropped")
        if (name == "exec") != (index == self.count - 1):
            raise RecipeError("the recipe must end with exec")
        if name == "clone":
            if op.args[0] in self.slots:
                raise RecipeError("a slot used twice")
            self.slots[int(op.args[0])] = "cloned"
        elif name == "attach":
            if self.slots.get(int(op.args[0])) != "cloned":
                raise RecipeError("a slot not cloned")
            self.slots[int(op.args[0])] = "attached"
        seen.add(name)
        self.phase = phase


def parse(data: bytes) -> list[Op]:
    """The operations of a recipe, checked as the launcher checks them (RecipeError)."""
    if len(data) > MAX_BYTES:
        raise RecipeError("recipe too large")
    if not data or not data.endswith(b"\0"):
        raise RecipeError("recipe cut short")
    fields = data[:-1].split(b"\0")
    position = 0

    def take() -> bytes:
        nonlocal position
        if position == len(fields):
            raise RecipeError("recipe cut short")
        position += 1
        return fields[position - 1]

    if take() != MAGIC.encode():
        raise RecipeError("not a recipe")
    if take() != str(VERSION).encode():
        raise RecipeError(f"not a version {VERSION} recipe")
    count = _number(take(), MAX_OPS + 1, "operation count")
    if count == 0:
        raise RecipeError("bad operation count")
    order = _Order(count)
    ops: list[Op] = []
    for index in range(count):
        name = take().decode("utf-8", "surrogateescape")
        if name not in OPERATIONS:
            raise RecipeError("unknown operation")
        signature = OPERATIONS[name][0]
        if _number(take(), 100, "field count") != len(signature):
            raise RecipeError("wrong field count")
        op = Op(name, *(_field(kind, take()) for kind in signature))
        order.check(index, op)
        ops.append(op)
    if position != len(fields):
        raise RecipeError("data after the last operation")
    return ops


def _escape(text: str) -> str:
    raw = text.encode("utf-8", "surrogateescape")
    if not raw:
        return '""'
    return "".join(
        chr(b) if 0x20 < b < 0x7F and b not in (0x22, 0x5C) else f"\\x{b:02x}" for b in raw
    )


def render(ops: Iterable[Op]) -> str:
    """The canonical text of the operations, as the launcher's dry-run prints them."""
    lines = []
    for op in ops:
        signature = OPERATIONS[op.name][0]
        words = [op.name]
        for kind, value in zip(signature, op.args, strict=True):
            if kind in "nx":
                words.append(str(value))
            else:
                words.append(_escape(_encode(kind, value)))
        lines.append(" ".join(words) + "\n")
    return "".join(lines)


# ---- building a recipe from the runtime's decisions ----------------------------------------


def request_ops(key: str, depends: Iterable[tuple[str, str]], expires: int | None) -> list[Op]:
    """What the recipe is for and what must not have changed since it was written."""
    ops = [Op("key", key)]
    ops += [Op("depends", path, identity) for path, identity in depends]
    if expires is not None:
        ops.append(Op("expires", expires))
    return ops


def job_root_ops(root: str, userns: str | None) -> list[Op]:
    """Enter the root the prolog prepared for the job, in the user namespace it pinned."""
    return [Op("require", root, "dir", ""), Op("userns", userns or ""), Op("chroot", root)]


def command_ops(plan: Plan) -> list[Op]:
    """The last steps in the container: no privileges, working directory, environment,
    exec (as :func:`.drop.drop_privileges`, :func:`.drop.change_directory` and
    :func:`.plan.apply_env_operations` do them)."""
    ops = [Op("drop", plan.user.uid, plan.user.gid)]
    if plan.workdir_explicit:
        ops.append(Op("chdir", plan.workdir))
    else:
        ops.append(Op("chdir-caller", "/"))
    if plan.clearenv:
        ops.append(Op("env-clear"))
    ops += [Op(f"env-{op}", name, *([] if op == "unset" else [value]))
            for op, name, value in plan.env_ops]
    ops.append(Op("exec"))
    return ops
