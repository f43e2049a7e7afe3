"""How every mount of a container is made: the one place the flags and kinds are decided.

A build (:class:`.assemble.RootBuilder`, for the prolog, a step root or ``shifter``) collects
its mounts as :class:`MountSpec`; this module turns them into recipe operations
(:class:`.recipe.Op`): ``clone`` a host source into a detached mount with its attributes,
then per mount, in :func:`mount_order`, the mount point, the ``attach`` or fresh ``mount``,
and at the end the final attributes. The Python build executes these operations
(:mod:`.execute`) and the C launcher replays the same operations from a recipe
(:func:`.launch.private_root_ops`): neither decides a flag of its own.
"""

from __future__ import annotations

from .. import syscalls
from .plan import is_below
from .recipe import Op, RecipeError

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)
IMAGE_FLAGS = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV  # the image itself
OVERLAY_FLAGS = syscalls.MS_NOSUID | syscalls.MS_NODEV  # the root (then read-only: final_ops)
STAGING_FLAGS = syscalls.MS_NOSUID | syscalls.MS_NODEV  # tmpfs a build stages in
PROC_FLAGS = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC  # a fresh /proc
PER_NODE_CACHE_FLAGS = syscalls.MS_NOSUID | syscalls.MS_NODEV  # a perNodeCache file system
# After every mount: /dev read-only (not recursive: /dev/pts and /dev/shm stay writable).
FINAL_ATTRS = (("/dev", syscalls.MOUNT_ATTR_RDONLY, False),)
_ATTR_SAFE = syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV
# `srun --image=X shifter CMD` (NERSC's job scripts) runs `shifter` inside the container:
# the launcher (static, beside the interpreter) is bound there and runs CMD in place.
LAUNCHER_TARGET = "/usr/bin/shifter"
INNER_DIR_MODE = 0o755  # mount points made inside a fresh tmpfs (/dev, a private /tmp)
INNER_FILE_MODE = 0o644


class MountSpec:
    """One mount into the container: ``target`` (as configured), ``what`` (for messages),
    ``kind`` (bind, device, proc, sys, tmpfs, pernode, or tree: ``source_fd`` is then a
    detached mount tree from ``open_tree``), the host ``source_fd`` and whether it is a
    directory, flags; ``resolved`` (the target inside the image) and ``inner`` (below /dev or
    a private /tmp: made inside that tmpfs) are filled in while building."""

    def __init__(
        self,
        target: str,
        what: str,
        kind: str,
        source_fd: int | None = None,
        source_is_dir: bool = True,
        *,
        read_only: bool = False,
        recursive: bool = True,
        user_volume: bool = False,
        size: int | None = None,
        fs: str | None = None,
        tmpfs_mode: int = 0o755,
        inner: bool = False,
        nodev: bool = True,
        propagation: str = "private",
    ) -> None:
        self.target = target
        self.what = what
        self.kind = kind
        self.source_fd = source_fd
        self.source_is_dir = source_is_dir
        self.read_only = read_only
        self.recursive = recursive
        self.user_volume = user_volume
        self.size = size
        self.fs = fs  # a perNodeCache's file system, if the user chose one
        self.tmpfs_mode = tmpfs_mode
        self.inner = inner
        self.nodev = nodev
        self.propagation = propagation  # of a clone: "private", or "slave" (a site's choice)
        self.resolved = ""


def fuse_options(uid: int, gid: int) -> str:
    """The FUSE mount options of the image served as ``uid``, ``gid`` (``fd=N,`` first)."""
    return f"rootmode=40000,user_id={uid},group_id={gid},default_permissions"


def mount_order(specs: Iterable[MountSpec]) -> list[MountSpec]:
    """The order of the mounts: parents before what is mounted inside them."""
    return sorted(specs, key=lambda s: s.resolved.count("/"))


def bind_recursive(spec: MountSpec) -> bool:
    """A bind takes the mounts below its source (a device node has none)."""
    return spec.recursive and spec.kind != "device"


def is_cloned(spec: MountSpec, privileged: bool) -> bool:
    """Whether the mount is a copy of a host source (else it is mounted fresh): a privileged
    build mounts its own /proc; tmpfs and perNodeCache are always fresh."""
    return spec.kind in ("bind", "tree", "sys", "device") or (
        spec.kind == "proc" and not privileged
    )


def mount_attrs(spec: MountSpec) -> int:
    """The mount attributes of a cloned mount: nosuid always, nodev unless the spec passes
    devices, noexec for /proc, /sys and device nodes, read-only as asked and for /sys."""
    attrs = _ATTR_SAFE if spec.nodev else syscalls.MOUNT_ATTR_NOSUID
    if spec.kind in ("sys", "proc", "device"):
        attrs |= syscalls.MOUNT_ATTR_NOEXEC
    if spec.read_only or spec.kind == "sys":
        attrs |= syscalls.MOUNT_ATTR_RDONLY
    return attrs


def tmpfs_options(spec: MountSpec) -> tuple[int, str]:
    """The flags and data of a tmpfs: /dev is noexec, a private /tmp nodev; both nosuid."""
    flags = syscalls.MS_NOSUID
    flags |= syscalls.MS_NOEXEC if spec.target == "/dev" else syscalls.MS_NODEV
    return flags, f"mode={spec.tmpfs_mode:o}"


def inner_mount_point(spec: MountSpec) -> tuple[str, str]:
    """For a mount inside a fresh tmpfs (``spec.inner``): that tmpfs (/dev or /tmp) and what
    its mount point is ("dir" or "file")."""
    top = "/dev" if is_below(spec.target, "/dev") else "/tmp"
    return top, "dir" if spec.source_is_dir and spec.kind != "device" else "file"


# ---- the operations -------------------------------------------------------------------------


def clone_ops(
    ordered: Sequence[MountSpec], source_of: Callable[[MountSpec], str], privileged: bool
) -> tuple[dict[int, int], list[Op], list[Op]]:
    """The ``clone`` of every host source: the slot of each spec (by ``id``), the clones of
    whole trees (taken before anything is mounted: they must not hold the container's
    mounts) and the others. ``source_of`` names a spec's host source."""
    cloned = [s for s in ordered if is_cloned(s, privileged)]
    cloned.sort(key=lambda s: s.kind != "tree")  # stable: trees first, each in mount order
    slots: dict[int, int] = {}
    trees: list[Op] = []
    others: list[Op] = []
    for spec in cloned:
        slot = slots[id(spec)] = len(slots)
        recursive = int(bind_recursive(spec))
        op = Op("clone", slot, source_of(spec), recursive, mount_attrs(spec), spec.propagation)
        (trees if spec.kind == "tree" else others).append(op)
    return slots, trees, others


def place_ops(spec: MountSpec, slot: int | None, privileged: bool, made: set[str]) -> list[Op]:
    """The operations that put ``spec`` in the root: its mount point when it lies in a fresh
    tmpfs (``made`` holds what earlier operations made), then the mount or the attach of its
    ``slot``. A perNodeCache gets its mount point only: its file system is made by the build.
    """
    ops: list[Op] = []
    if spec.inner:
        top, final = inner_mount_point(spec)
        parts = [p for p in spec.target[len(top) :].split("/") if p]
        for index in range(len(parts)):
            path = "/".join([top, *parts[: index + 1]])
            last = index == len(parts) - 1
            if path in made and not last:
                continue
            made.add(path)
            if last and final == "file":
                ops.append(Op("mkfile", path, INNER_FILE_MODE))
            else:
                ops.append(Op("mkdir", path, INNER_DIR_MODE))
    if spec.kind == "tmpfs":
        flags, data = tmpfs_options(spec)
        ops.append(Op("mount", "tmpfs", spec.resolved, "tmpfs", flags, data))
        if spec.target == "/dev":
            ops += [Op("symlink", text, f"/dev/{name}") for name, text in DEV_LINKS]
    elif spec.kind == "proc" and privileged:
        ops.append(Op("mount", "proc", spec.resolved, "proc", PROC_FLAGS, ""))
    elif spec.kind == "pernode":
        pass
    elif slot is not None:
        ops.append(Op("attach", slot, spec.resolved))
    else:
        raise RecipeError(f"{spec.what}: no source to mount")
    return ops


def final_ops(writable: bool) -> list[Op]:
    """After every mount: :data:`FINAL_ATTRS`, and the root read-only unless ``writable``."""
    ops = [Op("setattr", path, attrs, int(rec)) for path, attrs, rec in FINAL_ATTRS]
    if not writable:
        ops.append(Op("setattr", "/", syscalls.MOUNT_ATTR_RDONLY, 0))
    return ops
