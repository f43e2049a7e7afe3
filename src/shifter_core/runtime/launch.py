"""Recipes for the C launcher (``launcher/shifter_launch.c``): Python decides, C replays.

Starting Python costs more than a whole container start with Charliecloud, so ``shifter`` is
a small C program.  For a request it has seen before it replays a *recipe* left here by this
module; otherwise it runs the Python implementation with ``SHIFTER_LAUNCH_MISS`` set, and
after the Python runtime has built the container for that request, :class:`Recorder` writes
the recipe for next time: what the Python build decided, as explicit operations
(:mod:`.recipe`), which the launcher executes without deciding anything:

- ``upper/``: the files the build generated (``/etc/passwd``, ``/etc/group``, host files)
  and the mount points it made, a copy of the overlay's upper layer, which the recipe
  stacks over the image as a read-only overlay (``lowerdir=upper:lower``);
- the operations the build ran to mount everything (:attr:`.assemble.RootBuilder.ops`,
  emitted by :mod:`.mountops`), the same operations with the host sources named by path
  instead of the build's open files (:func:`private_root_ops`);
- the environment operations over the caller's environment (``Plan.env_ops``), and the
  working directory;
- ``depends``: the files whose change invalidates the recipe (configuration, image,
  ``/etc/passwd``, ``/etc/group``, host files copied in), with their status.

In a Slurm job whose prolog prepared the root, the recipe enters that root (``chroot``) in
the user namespace the prolog pinned; its key names the job and the node.

Only requests whose container depends on nothing else get a recipe: an explicit command
(the image given by name, the recipe expires after ``runtime.launcher_name_ttl`` seconds,
since the name may be pulled again), ``--env`` only as ``NAME=VALUE``, no ``--env-file``,
``--entrypoint``, ``--writable-tmpfs``, ``-v`` or module with devices, copies or hooks.
The cache is ``$XDG_RUNTIME_DIR/shifter-launch`` (else ``/tmp/shifter-launch-UID``): the user's own
directory, mode 0700; the launcher ignores it otherwise.  Nothing here is privileged: a
recipe can do nothing its user could not do with ``unshare``.
"""

from __future__ import annotations

import os
import time

from ..fnv import fnv1a_hex
from ..usercache import cache_directory
from ._log import get_logger
from .mountops import IMAGE_FLAGS, OVERLAY_FLAGS, fuse_options, mount_order
from .paths import fd_path
from .recipe import Op, RecipeError, command_ops, job_root_ops, request_ops, serialise

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from ..jobroot import JobRecord
    from .assemble import RootBuilder
    from .mountops import MountSpec
    from .plan import Plan

log = get_logger(__name__)

MAGIC = "shifter-launch-recipe-4"  # the key's first line (recipe.VERSION is the format's)
MAX_RECIPES = 64  # per user; the oldest go first
HOST_DEPENDENCIES = ("/etc/passwd", "/etc/group", "/etc/hosts", "/etc/resolv.conf")
_BAD_PATH_CHARS = (",", ":", "\\", "\n")


# The job and node (a root prepared for them) and the request a job passes on to its steps.
KEY_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURMD_NODENAME",
    "SHIFTER_IMAGE",
    "SHIFTER_IMAGEREQUEST",
    "SHIFTER_IMAGETYPE",
    "SHIFTER_VOLUME",
    "SHIFTER_MODULE",
)


def launch_key(
    uid: int,
    gid: int,
    groups: Sequence[int],
    environ: Mapping[str, str],
    options: Sequence[str],
) -> str:
    """What a recipe is for, exactly as the launcher writes it (see ``make_key`` there)."""
    lines = [
        MAGIC,
        f"uid={uid} gid={gid}",
        "groups=" + ",".join(str(g) for g in sorted(groups)),
        f"config={environ.get('SHIFTER_CONFIG', '')}",
    ]
    for name in KEY_VARIABLES:
        value = environ.get(name, "")
        lines.append(f"{name} {len(value.encode())}:{value}")
    lines += [f"option {len(o.encode())}:{o}" for o in options]
    return "".join(line + "\n" for line in lines)


def key_hash(key: str) -> str:
    """The recipe's directory name (the key itself is compared), as the launcher names it."""
    return fnv1a_hex(key.encode())


def file_identity(path: str) -> str:
    """``dev:ino:size:mtime_ns`` (``missing`` when it does not exist), as the launcher has it."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def why_not_recordable(plan: Plan, option_args: Sequence[str], by_id: bool) -> str | None:
    """Why the launcher could not replay this plan (None: it can); ``by_id``: the image was
    named by its id. (Which command lines it can replay at all, ``shifter`` decides.)"""
    if not by_id and plan.runtime.launcher_name_ttl <= 0:
        return "the image is given by name (runtime.launcher_name_ttl is 0)"
    for name, module in plan.modules:
        if module.devices or module.copies or module.user_hook or module.root_hook:
            return f"module {name} has devices, copies or hooks"
    if len(option_args) > 64:
        return "too many options"
    return None


def private_root_ops(
    specs: Sequence[MountSpec],
    ran: Sequence[Op],
    source_of: Callable[[MountSpec], str],
    *,
    image: str,
    directory: str,
    uid: int,
    gid: int,
    rendezvous: str | None = None,
) -> list[Op]:
    """The recipe of a private root: the container operations the Python build ran for
    ``specs`` (``ran``, :attr:`.assemble.RootBuilder.ops`), each host source named by
    ``source_of`` instead of the build's open file, staged as the launcher stages a root:
    the image served at ``directory/lower``, under the copy of the build's upper layer
    (``directory/upper``), as the overlay ``directory/root``; with ``rendezvous`` (a
    directory) shared with the siblings that ask for the same (:mod:`.siblings`).
    RecipeError when an operation cannot be replayed without privilege (a fresh /proc, a
    perNodeCache)."""
    upper, lower, root = (f"{directory}/{name}" for name in ("upper", "lower", "root"))
    by_source = {fd_path(s.source_fd): s for s in specs if s.source_fd is not None}
    ops: list[Op] = []
    for spec in mount_order(specs):  # checked while the launcher can still leave it to Python
        if spec.source_fd is not None:
            access = ("rx" if spec.source_is_dir else "r") if spec.user_volume else ""
            kind = "dir" if spec.source_is_dir else "file"
            ops.append(Op("require", source_of(spec), kind, access))
    ops.append(Op("require", image, "file", "r"))
    ops += [Op("require", path, "dir", "") for path in (upper, lower, root)]
    if rendezvous is not None:
        ops.append(Op("join", rendezvous))
    ops += [Op("serve", image), Op("userns", "")]
    trees: list[Op] = []
    others: list[Op] = []
    rest: list[Op] = []
    for op in ran:
        if op.name == "clone":
            spec = by_source[str(op.args[1])]
            clone = Op("clone", op.args[0], source_of(spec), *op.args[2:])
            (trees if spec.kind == "tree" else others).append(clone)
        elif op.name == "mount" and op.args[2] != "tmpfs":
            raise RecipeError(f"a mount of {op.args[2]} needs privilege")
        else:
            rest.append(op)
    # A tree is taken before anything is mounted: it must not hold the container's mounts;
    # the other sources while the image server starts.
    ops += trees
    ops.append(Op("fuse", lower, IMAGE_FLAGS, fuse_options(uid, gid)))
    ops += others
    ops.append(Op("overlay", root, OVERLAY_FLAGS, f"lowerdir={upper}:{lower}"))
    ops += rest
    ops.append(Op("pivot"))
    return ops


class Recorder:
    """Writes the recipe for one request of the Python runtime, after its build succeeded."""

    def __init__(self, plan: Plan, key: str, config_file: str, by_id: bool = True) -> None:
        self.plan = plan
        self.key = key
        self.config_file = config_file
        self.by_id = by_id  # the image was given as id:, not by a name that may move
        self.cache_fd: int | None = None
        self.cache_path = ""
        self.depends: list[tuple[str, str]] = []  # (path, file_identity) taken by open_cache

    @classmethod
    def for_request(
        cls, plan: Plan, option_args: Sequence[str], config_file: str, *, by_id: bool
    ) -> Recorder | None:
        """A recorder when the launcher could replay the request (it asked for one)."""
        reason = why_not_recordable(plan, option_args, by_id)
        if reason:
            log.debug("no launch recipe: %s", reason)
            return None
        key = launch_key(plan.user.uid, plan.user.gid, os.getgroups(), os.environ, option_args)
        return cls(plan, key, config_file, by_id=by_id)

    def open_cache(self, *depends: str) -> None:
        """Open the cache and take the status of the files the recipe depends on, before the
        build covers /tmp (where they, and the cache, may be) with its staging tmpfs."""
        path = cache_directory(self.plan.user.uid, os.environ, create=True)
        if path is None:
            return
        self.cache_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.cache_path = path
        paths = (self.config_file, *depends, *HOST_DEPENDENCIES)
        self.depends = [(p, file_identity(p)) for p in paths]

    def close(self) -> None:
        if self.cache_fd is not None:
            os.close(self.cache_fd)
            self.cache_fd = None

    def record(self, builder: RootBuilder) -> None:
        """Write the recipe (never fails the run: a problem only means no recipe)."""
        if self.cache_fd is None:
            return
        try:
            ops = self._private_ops(builder)
            if ops is not None:
                self._write(ops, f"{builder.staging}/rw/upper")
        except (OSError, RecipeError) as err:
            log.debug("no launch recipe: %s", err)
        finally:
            self.close()

    def record_job(self, state: JobRecord) -> None:
        """Write the recipe of entering the root the prolog prepared for this job."""
        self.open_cache(state.path)
        if self.cache_fd is None:
            return
        try:
            ops = [*self._head(), *job_root_ops(state.root, state.userns), *self._tail()]
            self._write(ops, None)
        except (OSError, RecipeError) as err:
            log.debug("no launch recipe: %s", err)
        finally:
            self.close()

    def _head(self) -> list[Op]:
        expires = None
        if not self.by_id:  # what the name resolved to may change: only for a while
            expires = int(time.time()) + int(self.plan.runtime.launcher_name_ttl)
        return request_ops(self.key, self.depends, expires)

    def _tail(self) -> list[Op]:
        return command_ops(self.plan)

    def _private_ops(self, builder: RootBuilder) -> list[Op] | None:
        plan = self.plan
        if any(spec.kind == "pernode" for spec in builder.specs):
            log.debug("no launch recipe: perNodeCache")
            return None
        sources: dict[int, str] = {}
        for spec in builder.specs:
            if spec.kind == "tree":
                sources[id(spec)] = spec.target  # a copy of the host's tree at the target
            elif spec.source_fd is not None:
                source = os.readlink(f"/proc/self/fd/{spec.source_fd}")
                if source.endswith(" (deleted)") or not source.startswith("/"):
                    return None
                sources[id(spec)] = source
        directory = f"{self.cache_path}/{key_hash(self.key)}"
        ops = private_root_ops(
            builder.specs,
            builder.ops,
            lambda spec: sources[id(spec)],
            image=plan.image_file,
            directory=directory,
            uid=plan.user.uid,
            gid=plan.user.gid,
            rendezvous=None if plan.writable else self.cache_path,
        )
        return [*self._head(), *ops, *self._tail()]

    def _write(self, ops: list[Op], upper: str | None) -> None:
        """The recipe directory: ``recipe``, and for a private root ``upper`` (a copy of the
        build's upper layer) and the mount points ``lower`` and ``root``."""
        import secrets
        import shutil

        assert self.cache_fd is not None
        data = serialise(ops)  # RecipeError if the launcher would refuse it
        cache = f"/proc/self/fd/{self.cache_fd}"
        name = key_hash(self.key)
        temporary = f".new-{secrets.token_hex(8)}"
        os.mkdir(temporary, 0o700, dir_fd=self.cache_fd)
        try:
            if upper is not None:
                shutil.copytree(
                    upper, f"{cache}/{temporary}/upper", symlinks=True, dirs_exist_ok=True
                )
                for directory in ("lower", "root"):
                    os.mkdir(f"{temporary}/{directory}", 0o700, dir_fd=self.cache_fd)
            fd = os.open(
                f"{temporary}/recipe",
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                0o600,
                dir_fd=self.cache_fd,
            )
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            _replace_dir(self.cache_fd, temporary, name)
        except BaseException:
            shutil.rmtree(f"{cache}/{temporary}", ignore_errors=True)
            raise
        log.debug("launch recipe written: %s", name)
        _prune(self.cache_fd)


def _replace_dir(dir_fd: int, new: str, name: str) -> None:
    """Put ``new`` in place as ``name``; an old one is moved aside (containers may still
    use it as their mount points) and removed by a later prune."""
    import secrets

    try:
        os.rename(new, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    except OSError:
        pass
    os.rename(name, f".old-{secrets.token_hex(8)}", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.rename(new, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _prune(dir_fd: int) -> None:
    """Keep the newest MAX_RECIPES recipes; remove what was moved aside over a day ago."""
    import shutil
    import time

    entries = []
    for name in os.listdir(dir_fd):
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue
        entries.append((st.st_mtime, name))
    recipes = sorted((e for e in entries if not e[1].startswith(".")), reverse=True)
    old = [name for _, name in recipes[MAX_RECIPES:]]
    old += [n for m, n in entries if n.startswith((".old-", ".new-")) and m < time.time() - 86400]
    for name in old:
        shutil.rmtree(f"/proc/self/fd/{dir_fd}/{name}", ignore_errors=True)
