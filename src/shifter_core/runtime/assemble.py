"""Building a container root from a plan: the steps both realisations share.

Layout while building (``staging`` is a directory only the builder uses)::

    staging/lower   the image, read-only, nosuid, nodev (kernel loop mount or squashfuse_ll)
    staging/rw      a tmpfs holding the overlay's upper/ and work/ directories
    root            overlay(lower, upper): the container's root

Mount points for volumes, site file systems and modules, and the generated ``/etc/passwd``,
``/etc/group``, ``/etc/hosts`` and ``/etc/resolv.conf``, are made in ``upper`` *before* the
overlay is mounted: every path is first resolved inside the image (symlinks never leave it),
then created with the modes (and, as root, the owners) of the image's directories, so the
upper layer is invisible except where something new had to exist. This also works without
privilege, where the image's root-owned directories could not be written through the
overlay. Then the overlay is mounted, everything else is mounted onto targets opened beneath
the root without following symlinks, and the root is made read-only.

Every mount is nosuid and nodev, except the device nodes bound into ``/dev``.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterable

from .. import syscalls
from ..image.content import MAX_IDENTITY_TEXT
from ..options import parse_volume
from ._log import get_logger
from .errors import ContainerError, ModuleError, VolumeError
from .identity import group_file, passwd_file
from .paths import fd_path, make_path, open_beneath, read_image_file, resolve_in_root, write_file
from .plan import Plan, forbidden_target, is_below, named
from .sources import open_as_user

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time

if TYPE_CHECKING:
    from typing import Any

log = get_logger(__name__)

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty", "ptmx")
DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)
HOST_FILES = ("/etc/hosts", "/etc/resolv.conf")
OVERFLOW_GID = 65534
_ATTR_SAFE = syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV
_BAD_OPTION_CHARS = (",", ":", "\\", "\n")


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
        tmpfs_mode: int = 0o755,
        inner: bool = False,
        nodev: bool = True,
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
        self.tmpfs_mode = tmpfs_mode
        self.inner = inner
        self.nodev = nodev
        self.resolved = ""


class BuildResult:
    """What a build left mounted that teardown must know about."""

    def __init__(self) -> None:
        self.loop_devices: list[str] = []


# ---- the decisions, in one place (the build below and the launcher's recipe use them) -------

IMAGE_FLAGS = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV  # the image itself
OVERLAY_FLAGS = syscalls.MS_NOSUID | syscalls.MS_NODEV  # the root (then read-only, see build)
# After every mount: /dev read-only (not recursive: /dev/pts and /dev/shm stay writable).
FINAL_ATTRS = (("/dev", syscalls.MOUNT_ATTR_RDONLY, False),)


def fuse_options(uid: int, gid: int) -> str:
    """The FUSE mount options of the image served as ``uid``, ``gid`` (``fd=N,`` first)."""
    return f"rootmode=40000,user_id={uid},group_id={gid},default_permissions"


def mount_order(specs: Iterable[MountSpec]) -> list[MountSpec]:
    """The order of the mounts: parents before what is mounted inside them."""
    return sorted(specs, key=lambda s: s.resolved.count("/"))


def bind_recursive(spec: MountSpec) -> bool:
    """A bind takes the mounts below its source (a device node has none)."""
    return spec.recursive and spec.kind != "device"


def mount_attrs(spec: MountSpec, privileged: bool) -> int | None:
    """The mount attributes of a bound mount (None: mounted fresh, its flags are
    :func:`tmpfs_options` or the mount's own): nosuid always, nodev unless the spec passes
    devices, noexec for /proc, /sys and device nodes, read-only as asked and for /sys."""
    kind = spec.kind
    if kind not in ("bind", "tree", "sys", "device") and (kind != "proc" or privileged):
        return None
    attrs = _ATTR_SAFE if spec.nodev else syscalls.MOUNT_ATTR_NOSUID
    if kind in ("sys", "proc", "device"):
        attrs |= syscalls.MOUNT_ATTR_NOEXEC
    if spec.read_only or kind == "sys":
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


def _o_path(path: str, directory: bool = False) -> int:
    flags = os.O_PATH | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    return os.open(path, flags)


def _set_attrs(root_fd: int, target: str, attr_set: int, recursive: bool) -> None:
    fd = open_beneath(root_fd, target)
    try:
        syscalls.mount_setattr("", attr_set, dirfd=fd, recursive=recursive)
    finally:
        os.close(fd)


def _mkfs_program(candidates: list[str]) -> tuple[str, list[str]]:
    import shutil

    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    for fs in candidates:
        program = shutil.which(f"mkfs.{fs}", path=search)
        if program:
            if fs == "xfs":
                return fs, [program, "-q", "-f"]
            if fs.startswith("ext"):
                return fs, [program, "-q", "-F", "-m", "0", "-E", "nodiscard"]
            return fs, [program]
    raise VolumeError(
        "perNodeCache: no mkfs program found for " + ", ".join(candidates),
        hint="install xfsprogs or e2fsprogs on the nodes (runtime.per_node_cache_fs)",
    )


class RootBuilder:
    """Builds one root; ``privileged`` selects loop mounts, fresh /proc, owners, perNodeCache."""

    def __init__(
        self,
        plan: Plan,
        root: str,
        staging: str,
        *,
        privileged: bool,
        mount_image: Callable[[str], None],
    ) -> None:
        for path in (root, staging):
            if any(c in path for c in _BAD_OPTION_CHARS):
                raise ContainerError(f"unusable directory name {path!r} (',', ':' or '\\')")
        self.plan = plan
        self.root = root
        self.staging = staging
        self.privileged = privileged
        self.mount_image = mount_image
        self.result = BuildResult()
        self.specs: list[MountSpec] = []
        self._fds: list[int] = []

    # -- sources (opened before anything is mounted) ---------------------------------------

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def collect(self) -> None:
        """Open every host source and list every mount, before mounting anything."""
        plan = self.plan
        runtime = plan.runtime
        specs = self.specs
        specs.append(MountSpec("/proc", "/proc", "proc"))
        if not self.privileged:
            specs[-1].source_fd = self._keep(_o_path("/proc", True))
        specs.append(MountSpec("/sys", "/sys", "sys", self._keep(_o_path("/sys", True))))
        specs.append(MountSpec("/dev", "/dev", "tmpfs", tmpfs_mode=0o755))
        for name in DEV_NODES:
            path = f"/dev/{name}"
            if os.path.exists(path):
                fd = self._keep(_o_path(path))
                specs.append(MountSpec(path, path, "device", fd, False, inner=True, nodev=False))
        for name in ("pts", "shm"):
            path = f"/dev/{name}"
            if os.path.isdir(path):
                fd = self._keep(_o_path(path, True))
                specs.append(MountSpec(path, path, "bind", fd, inner=True, nodev=name != "pts"))
        user_targets = {v.target for v in plan.volumes}
        if "/tmp" not in user_targets:
            if runtime.tmp == "private":
                specs.append(MountSpec("/tmp", "/tmp", "tmpfs", tmpfs_mode=0o1777))
            elif self.privileged:
                # Not recursive, as before: a root prepared for a job shows /tmp alone.
                fd = self._keep(_o_path("/tmp", True))
                specs.append(MountSpec("/tmp", "/tmp", "bind", fd, recursive=False))
            else:
                # A private root is staged on a tmpfs over /tmp, so a bind made later could
                # not be recursive; and mounts below the host's /tmp are locked in a user
                # namespace, where a non-recursive bind of /tmp fails (EINVAL). So the whole
                # tree is cloned now, detached, and attached in the root with move_mount.
                fd = self._keep(
                    syscalls.open_tree(
                        "/tmp",
                        syscalls.OPEN_TREE_CLONE
                        | syscalls.OPEN_TREE_CLOEXEC
                        | syscalls.AT_RECURSIVE,
                    )
                )
                specs.append(MountSpec("/tmp", "/tmp", "tree", fd))
        for volume in plan.site_volumes:
            what = f"site volume {named(volume)}"
            try:
                fd = self._keep(_o_path(volume.source))
            except OSError as err:
                log.warning("%s: %s: %s (skipped)", what, volume.source, err.strerror)
                continue
            specs.append(
                MountSpec(
                    volume.target,
                    what,
                    "bind",
                    fd,
                    stat.S_ISDIR(os.fstat(fd).st_mode),
                    read_only=volume.read_only,
                )
            )
        for name, module in plan.modules:
            self._collect_module(name, module)
        user = [v for v in plan.volumes if v.per_node_cache_bytes is None]
        fds = open_as_user(
            plan.user, [v.source for v in user], [f"volume {named(v)}" for v in user]
        )
        for volume, fd in zip(user, fds, strict=True):
            self._keep(fd)
            specs.append(
                MountSpec(
                    volume.target,
                    f"volume {named(volume)}",
                    "bind",
                    fd,
                    stat.S_ISDIR(os.fstat(fd).st_mode),
                    read_only=volume.read_only,
                    user_volume=True,
                )
            )
        for volume in plan.volumes:
            if volume.per_node_cache_bytes is None:
                continue
            if not self.privileged:
                raise VolumeError(
                    f"volume {named(volume)}: perNodeCache needs a root prepared by Slurm",
                    hint="use it as --volume of sbatch/salloc/srun, not of shifter",
                )
            specs.append(
                MountSpec(
                    volume.target,
                    f"volume {named(volume)}",
                    "pernode",
                    user_volume=True,
                    size=volume.per_node_cache_bytes,
                )
            )

    def _collect_module(self, name: str, module: Any) -> None:
        import glob

        if module.root_hook and not self.privileged:
            raise ModuleError(
                f"module {name!r} needs root to set it up (it has a root hook)",
                hint=f"use it in a Slurm job: --module={name} on sbatch/salloc/srun",
            )
        for pattern in module.devices:
            for path in sorted(glob.glob(pattern)):
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                    log.warning("module %s: %s is not a device node (skipped)", name, path)
                    continue
                fd = self._keep(_o_path(path))
                self.specs.append(
                    MountSpec(
                        path, f"module {name} device {path}", "device", fd, False, nodev=False
                    )
                )
        for spec in module.binds:
            volume = parse_volume(spec)
            read_only = not spec.endswith(":rw")
            try:
                fd = self._keep(_o_path(volume.source))
            except OSError as err:
                log.warning("module %s: %s: %s (skipped)", name, volume.source, err.strerror)
                continue
            self.specs.append(
                MountSpec(
                    volume.target,
                    f"module {name} bind {spec}",
                    "bind",
                    fd,
                    stat.S_ISDIR(os.fstat(fd).st_mode),
                    read_only=read_only,
                )
            )

    # -- phase A: resolve targets in the image, prepare the upper layer --------------------

    def _plan_targets(self, lower_fd: int) -> None:
        runtime = self.plan.runtime
        fresh = {"/dev"} | ({"/tmp"} if runtime.tmp == "private" else set())
        for spec in self.specs:
            if spec.target != "/dev" and any(
                is_below(spec.target, f) and spec.target != f for f in fresh
            ):
                spec.inner = True
            if spec.inner:
                spec.resolved = spec.target
                continue
            resolved = resolve_in_root(lower_fd, spec.target, spec.what)
            spec.resolved = resolved.path
            if spec.user_volume:
                prefix = forbidden_target(resolved.path, runtime)
                if prefix is not None:
                    via = (
                        "" if resolved.path == spec.target else f" (it resolves to {resolved.path})"
                    )
                    raise VolumeError(
                        f"{spec.what}: the target may not be {prefix} or below it{via}",
                        hint="choose another target, e.g. /data",
                    )
            if resolved.path == "/":
                raise VolumeError(f"{spec.what}: cannot mount over the container's root")
        placed: list[MountSpec] = []
        for spec in mount_order(self.specs):
            if spec.inner:
                continue
            for other in placed:
                if is_below(spec.resolved, other.resolved):
                    raise VolumeError(
                        f"{spec.what}: the target {spec.resolved} is inside {other.resolved} "
                        f"({other.what})",
                        hint="choose a target outside it",
                    )
            placed.append(spec)

    def _prepare_upper(self, lower_fd: int, upper_fd: int) -> None:
        mirror: dict[str, Any] = {"mirror_fd": lower_fd, "copy_owner": self.privileged}
        for spec in self.specs:
            if spec.inner:
                continue
            existing = resolve_in_root(lower_fd, spec.resolved, spec.what)
            want = (
                "dir"
                if spec.source_is_dir or spec.kind in ("proc", "sys", "tmpfs", "pernode")
                else "file"
            )
            if existing.kind is None:
                make_path(upper_fd, spec.resolved, want, **mirror)
            elif (existing.kind == "dir") != (want == "dir"):
                kind = "a directory" if existing.kind == "dir" else "a file"
                raise VolumeError(
                    f"{spec.what}: the target {spec.resolved} is {kind} in the image, "
                    f"the source is not",
                    hint="mount directories on directories and files on files",
                )
        self._identity_files(lower_fd, upper_fd)
        for name, module in self.plan.modules:
            for copy in module.copies:
                self._module_copy(name, copy, lower_fd, upper_fd)

    def _identity_files(self, lower_fd: int, upper_fd: int) -> None:
        plan = self.plan
        mirror: dict[str, Any] = {"mirror_fd": lower_fd, "copy_owner": self.privileged}
        shell = plan.user.shell
        try:
            if resolve_in_root(lower_fd, shell, "shell").kind != "file":
                shell = "/bin/sh"
        except VolumeError:
            shell = "/bin/sh"
        # One byte over the bound, so that a larger file is refused, never cut mid-line.
        limit = MAX_IDENTITY_TEXT + 1
        contents = {
            "/etc/passwd": passwd_file(
                read_image_file(lower_fd, "/etc/passwd", limit), plan.user, shell
            ),
            "/etc/group": group_file(
                read_image_file(lower_fd, "/etc/group", limit),
                plan.user,
                # In a user namespace the user's other groups show as the overflow gid.
                overflow=OVERFLOW_GID,
            ),
        }
        for host in HOST_FILES:
            try:
                with open(host, "rb") as fh:
                    contents[host] = fh.read(1 << 20).decode("utf-8", "replace")
            except OSError:
                continue
        for path, text in contents.items():
            try:
                target = resolve_in_root(lower_fd, path, path)
            except VolumeError as err:
                log.warning("not writing %s: %s", path, err)
                continue
            write_file(upper_fd, target.path, text.encode(), 0o644, **mirror)

    def _module_copy(self, name: str, spec: str, lower_fd: int, upper_fd: int) -> None:
        import glob

        source, _, target = spec.partition(":")
        matches = sorted(glob.glob(source)) if glob.has_magic(source) else [source]
        into = glob.has_magic(source) or target.endswith("/")
        if not matches or not all(os.path.lexists(m) for m in matches):
            log.warning("module %s: nothing to copy for %s", name, source)
            return
        for match in matches:
            dest = target.rstrip("/") + "/" + os.path.basename(match) if into else target
            resolved = resolve_in_root(lower_fd, dest, f"module {name} copy {spec}").path
            self._copy_tree(match, resolved, lower_fd, upper_fd)

    def _copy_tree(self, source: str, dest: str, lower_fd: int, upper_fd: int) -> None:
        mirror: dict[str, Any] = {"mirror_fd": lower_fd, "copy_owner": self.privileged}
        st = os.lstat(source)
        parent, _, base = dest.rstrip("/").rpartition("/")
        if stat.S_ISLNK(st.st_mode):
            if parent:
                make_path(upper_fd, parent, "dir", **mirror)
            dir_fd = os.open(parent.lstrip("/") or ".", os.O_PATH | os.O_DIRECTORY, dir_fd=upper_fd)
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(base, dir_fd=dir_fd)
                os.symlink(os.readlink(source), base, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        elif stat.S_ISDIR(st.st_mode):
            make_path(upper_fd, dest, "dir", **mirror)
            for entry in sorted(os.listdir(source)):
                self._copy_tree(
                    os.path.join(source, entry), f"{dest.rstrip('/')}/{entry}", lower_fd, upper_fd
                )
        elif stat.S_ISREG(st.st_mode):
            with open(source, "rb") as fh:
                data = fh.read()
            write_file(upper_fd, dest, data, stat.S_IMODE(st.st_mode) & 0o777, **mirror)

    # -- phase B: the overlay and everything mounted on it ---------------------------------

    def build(self) -> BuildResult:
        """Mount the image, prepare the upper layer, mount the overlay and every mount."""
        plan = self.plan
        lower = f"{self.staging}/lower"
        rw = f"{self.staging}/rw"
        for path in (lower, rw):
            os.makedirs(path, mode=0o700, exist_ok=True)
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        self.mount_image(lower)
        syscalls.mount("tmpfs", rw, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV, "mode=0755")
        upper, work = f"{rw}/upper", f"{rw}/work"
        os.mkdir(upper, 0o755)
        os.mkdir(work, 0o700)
        lower_fd = self._keep(_o_path(lower, True))
        try:
            os.stat(".", dir_fd=lower_fd)
        except OSError as err:
            raise ContainerError(
                f"the image {plan.image_file} cannot be read: {err.strerror}"
            ) from None
        self._mirror_root_mode(lower_fd, upper)
        upper_fd = self._keep(_o_path(upper, True))
        self._plan_targets(lower_fd)
        self._prepare_upper(lower_fd, upper_fd)
        syscalls.mount(
            "overlay",
            self.root,
            "overlay",
            OVERLAY_FLAGS,
            f"lowerdir={lower},upperdir={upper},workdir={work}",
        )
        root_fd = self._keep(_o_path(self.root, True))
        for spec in mount_order(self.specs):
            self._mount(spec, root_fd)
        for name, module in plan.modules:
            if module.root_hook:
                self._root_hook(name, module.root_hook)
        for path, attrs, recursive in FINAL_ATTRS:
            _set_attrs(root_fd, path, attrs, recursive=recursive)
        if not plan.writable:
            syscalls.mount_setattr("", syscalls.MOUNT_ATTR_RDONLY, dirfd=root_fd)
        return self.result

    def _mirror_root_mode(self, lower_fd: int, upper: str) -> None:
        st = os.stat(".", dir_fd=lower_fd)
        os.chmod(upper, stat.S_IMODE(st.st_mode))
        if self.privileged:
            os.chown(upper, st.st_uid, st.st_gid)

    def _mount(self, spec: MountSpec, root_fd: int) -> None:
        if spec.inner:
            self._make_inner(root_fd, spec)
        target_fd = open_beneath(root_fd, spec.resolved)
        try:
            target = fd_path(target_fd)
            if spec.kind == "proc":
                if self.privileged:
                    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
                    syscalls.mount("proc", target, "proc", flags)
                else:
                    self._bind(spec, target)
            elif spec.kind == "tmpfs":
                flags, data = tmpfs_options(spec)
                syscalls.mount("tmpfs", target, "tmpfs", flags, data)
                if spec.target == "/dev":
                    self._populate_dev(root_fd)
            elif spec.kind == "pernode":
                self._per_node_cache(spec, target)
            elif spec.kind == "tree":
                assert spec.source_fd is not None
                flags = syscalls.MOVE_MOUNT_F_EMPTY_PATH | syscalls.MOVE_MOUNT_T_EMPTY_PATH
                syscalls.move_mount(spec.source_fd, "", target_fd, "", flags, name=target)
            else:
                self._bind(spec, target)
        finally:
            os.close(target_fd)
        if spec.kind == "pernode":
            self._give_to_user(root_fd, spec.resolved)
        attrs = mount_attrs(spec, self.privileged)
        if attrs is not None:
            _set_attrs(root_fd, spec.resolved, attrs, recursive=spec.recursive)
        log.debug("mounted %s at %s", spec.what, spec.resolved)

    def _bind(self, spec: MountSpec, target: str) -> None:
        assert spec.source_fd is not None
        flags = syscalls.MS_BIND | (syscalls.MS_REC if bind_recursive(spec) else 0)
        syscalls.mount(fd_path(spec.source_fd), target, None, flags)

    def _make_inner(self, root_fd: int, spec: MountSpec) -> None:
        top, want = inner_mount_point(spec)
        base_fd = open_beneath(root_fd, top, directory=True)
        try:
            rel = spec.target[len(top) :]
            make_path(base_fd, rel, want)
        finally:
            os.close(base_fd)

    def _populate_dev(self, root_fd: int) -> None:
        dev_fd = open_beneath(root_fd, "/dev", directory=True)
        try:
            for name, target in DEV_LINKS:
                os.symlink(target, name, dir_fd=dev_fd)
        finally:
            os.close(dev_fd)

    def _per_node_cache(self, spec: MountSpec, target: str) -> None:
        import subprocess
        import uuid

        runtime = self.plan.runtime
        fs, mkfs = _mkfs_program(list(runtime.per_node_cache_fs))
        directory = runtime.per_node_cache_dir
        os.makedirs(directory, mode=0o755, exist_ok=True)
        path = os.path.join(directory, f".shifter-pernode-{uuid.uuid4().hex}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, spec.size or 0)
            proc = subprocess.run(
                [*mkfs, path], capture_output=True, text=True, check=False, timeout=300
            )
            if proc.returncode != 0:
                raise VolumeError(f"{spec.what}: mkfs.{fs} failed: {proc.stderr.strip()[-500:]}")
            from . import loop

            device, loop_fd = loop.attach(fd, read_only=False, name=path)
        finally:
            os.unlink(path)
            os.close(fd)
        try:
            syscalls.mount(device, target, fs, syscalls.MS_NOSUID | syscalls.MS_NODEV)
        finally:
            os.close(loop_fd)
        self.result.loop_devices.append(device)

    def _give_to_user(self, root_fd: int, path: str) -> None:
        """The root of a fresh file system (perNodeCache) becomes the user's, mode 0700."""
        fd = open_beneath(root_fd, path, directory=True)
        try:
            mounted = os.open(fd_path(fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        finally:
            os.close(fd)
        try:
            os.fchown(mounted, self.plan.user.uid, self.plan.user.gid)
            os.fchmod(mounted, 0o700)
        finally:
            os.close(mounted)

    def _root_hook(self, name: str, hook: str) -> None:
        import subprocess

        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "SHIFTER_ROOT": self.root,
            "SHIFTER_MODULE_NAME": name,
            "SHIFTER_USER": self.plan.user.name,
            "SHIFTER_UID": str(self.plan.user.uid),
            "SHIFTER_GID": str(self.plan.user.gid),
            "SHIFTER_IMAGE": self.plan.image_id,
        }
        proc = subprocess.run(
            [hook, self.root], env=env, capture_output=True, text=True, check=False, timeout=600
        )
        if proc.returncode != 0:
            raise ModuleError(
                f"module {name!r}: root hook {hook} failed (exit {proc.returncode}): "
                f"{proc.stderr.strip()[-500:]}"
            )
