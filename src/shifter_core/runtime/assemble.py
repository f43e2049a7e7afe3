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
from collections.abc import Callable

from .. import syscalls
from ..image.content import MAX_IDENTITY_TEXT
from ..options import parse_volume
from ._log import get_logger
from .errors import ContainerError, ModuleError, VolumeError
from .execute import Executor
from .identity import group_file, passwd_file
from .mountops import (
    LAUNCHER_TARGET,
    OVERLAY_FLAGS,
    PER_NODE_CACHE_FLAGS,
    STAGING_FLAGS,
    MountSpec,
    clone_ops,
    final_ops,
    mount_order,
    place_ops,
)
from .paths import fd_path, make_path, open_beneath, read_image_file, resolve_in_root, write_file
from .plan import Plan, forbidden_target, is_below, named
from .recipe import Op
from .sources import open_as_user

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time

if TYPE_CHECKING:
    from typing import Any

log = get_logger(__name__)

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty", "ptmx")
HOST_FILES = ("/etc/hosts", "/etc/resolv.conf")
OVERFLOW_GID = 65534
_BAD_OPTION_CHARS = (",", ":", "\\", "\n")


class BuildResult:
    """What a build left mounted that teardown must know about."""

    def __init__(self) -> None:
        self.loop_devices: list[str] = []


def _o_path(path: str, directory: bool = False) -> int:
    flags = os.O_PATH | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    return os.open(path, flags)


def _launcher_binary() -> str | None:
    """The C launcher (``shifter``, static) beside this interpreter, if it is installed."""
    import sys

    path = os.path.join(os.path.dirname(sys.executable), "shifter")
    try:
        with open(path, "rb") as fh:
            return path if fh.read(4) == b"\x7fELF" else None
    except OSError:
        return None


XFS_MIN_SIZE = 300 << 20  # mkfs.xfs refuses smaller file systems


def _mkfs_program(candidates: list[str], size: int) -> tuple[str, list[str]]:
    """The first of ``candidates`` whose mkfs is installed and can make ``size`` bytes."""
    import shutil

    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    for fs in candidates:
        program = shutil.which(f"mkfs.{fs}", path=search)
        if not program:
            continue
        if fs == "xfs":
            if size >= XFS_MIN_SIZE:
                return fs, [program, "-q", "-f"]
            continue
        if fs.startswith("ext"):
            return fs, [program, "-q", "-F", "-m", "0", "-E", "nodiscard"]
        return fs, [program]
    raise VolumeError(
        "perNodeCache: no mkfs program found for " + ", ".join(candidates)
        + (" (xfs needs at least 300M)" if "xfs" in candidates and size < XFS_MIN_SIZE else ""),
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
        self.ops: list[Op] = []  # the container operations the build ran (mountops)
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
                # Not recursive: a root prepared for a job shows the host's /tmp alone.
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
        launcher = _launcher_binary()
        if launcher is not None:
            fd = self._keep(_o_path(launcher))
            specs.append(MountSpec(LAUNCHER_TARGET, "shifter", "bind", fd, False, read_only=True))
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
                    propagation=volume.propagation or "private",
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
            if volume.per_node_cache is None:
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
                    size=volume.per_node_cache.size,
                    fs=volume.per_node_cache.fs,
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
        syscalls.mount("tmpfs", rw, "tmpfs", STAGING_FLAGS, "mode=0755")
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
        self._fill(root_fd)
        return self.result

    def _fill(self, root_fd: int) -> None:
        """Mount everything into the root through the operations of :mod:`.mountops` (the
        launcher replays the same operations), run the modules' root hooks, then the final
        attributes. The operations run are kept in ``self.ops``."""
        ordered = mount_order(self.specs)
        slots, trees, others = clone_ops(ordered, self._source_path, self.privileged)
        detached = {self._source_path(s): s.source_fd for s in ordered if s.kind == "tree"}
        executor = Executor(root_fd, {k: v for k, v in detached.items() if v is not None})
        try:
            self._run(executor, [*trees, *others])
            made: set[str] = set()
            for spec in ordered:
                self._run(executor, place_ops(spec, slots.get(id(spec)), self.privileged, made))
                if spec.kind == "pernode":
                    mount, loop_fd = self._per_node_cache(spec)
                    try:
                        self._run(executor, [mount])
                    finally:
                        os.close(loop_fd)
                    self._give_to_user(root_fd, spec.resolved)
                log.debug("mounted %s at %s", spec.what, spec.resolved)
        finally:
            executor.close()
        for name, module in self.plan.modules:
            if module.root_hook:
                self._root_hook(name, module.root_hook)
        self._run(executor, final_ops(self.plan.writable))

    def _run(self, executor: Executor, ops: list[Op]) -> None:
        executor.run(ops)
        self.ops += ops

    def _source_path(self, spec: MountSpec) -> str:
        """The host source of a spec as a path the operations take (its open fd)."""
        assert spec.source_fd is not None, spec.what
        return fd_path(spec.source_fd)

    def _mirror_root_mode(self, lower_fd: int, upper: str) -> None:
        st = os.stat(".", dir_fd=lower_fd)
        os.chmod(upper, stat.S_IMODE(st.st_mode))
        if self.privileged:
            os.chown(upper, st.st_uid, st.st_gid)

    def _per_node_cache(self, spec: MountSpec) -> tuple[Op, int]:
        """Make a perNodeCache file system on a fresh loop device: the mount of it, and the
        device's fd, to close once mounted (an unused device clears itself)."""
        import subprocess
        import uuid

        runtime = self.plan.runtime
        allowed = list(runtime.per_node_cache_fs)
        if spec.fs is not None and spec.fs not in allowed:
            raise VolumeError(
                f"{spec.what}: perNodeCache fs={spec.fs} is not offered on this site",
                hint="use fs=" + " or fs=".join(allowed) + ", or leave fs= out",
            )
        # A sparse file: Shifter's bs= (the block size it wrote the file with) needs no use.
        fs, mkfs = _mkfs_program([spec.fs] if spec.fs else allowed, spec.size or 0)
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
        self.result.loop_devices.append(device)
        return Op("mount", device, spec.resolved, fs, PER_NODE_CACHE_FLAGS, ""), loop_fd

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
