"""The configuration file: where it is, whether root may trust it, and its validated cache.

Beside the cache, root also writes the SPANK shim's hint (``.<name>.shim``): the one value
the C shim reads without starting Python (the run directory, to tell whether a job left
anything on a node), with the file's identity, so a changed file voids it.

Parsing YAML and building the typed schema costs tens of milliseconds, too much for every
``srun --image`` and every job step. Root processes that have validated the file write
its values next to it (``.<name>.cache``, marshal format, root-owned, 0644) keyed by the
file's identity (device, inode, size, mtime, ctime) and the schema's version; any process
that finds a matching cache uses its values without parsing. Anything that does not
match exactly (an edited file, a new schema, a cache not owned by root) is ignored and
the file is parsed in full, so a bad key still fails every command.

This module imports nothing heavy: it is on the start-up path of the Slurm plugin. The
typed view of the cached values is :mod:`.config_cache`; the schema is :mod:`.config`.
"""

from __future__ import annotations

import marshal
import os
import stat

from .errors import ConfigError

_FORMAT = 1
DEFAULT_PATH = "/etc/shifter/shifter.yaml"
ENV_VAR = "SHIFTER_CONFIG"


def config_path(explicit: str | None = None, *, privileged: bool = False) -> str:
    """The file to read: an explicit path, else ``$SHIFTER_CONFIG`` (never for privileged
    readers, whose environment a user may control), else ``/etc/shifter/shifter.yaml``."""
    if explicit:
        return explicit
    if not privileged and os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    return DEFAULT_PATH


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _schema_version() -> tuple[object, ...]:
    from . import __version__

    schema = os.stat(os.path.join(os.path.dirname(__file__), "config.py"))
    return (_FORMAT, __version__, schema.st_size, schema.st_mtime_ns)


def cache_path(path: str) -> str:
    """Where the cache of configuration file ``path`` lives."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.cache")


def shim_hint_path(path: str) -> str:
    """Where the SPANK shim finds what it needs of configuration ``path`` without Python."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.shim")


def shim_hint(path: str, run_dir: str) -> bytes:
    """The shim's hint: the file's identity (as the shim computes it: device, inode, size,
    mtime in ns, ctime in ns) and the run directory; one ``NAME VALUE`` per line."""
    identity = ":".join(str(n) for n in _identity(os.stat(path)))
    return f"identity {identity}\nrun_dir {run_dir}\n".encode()


def check_privileged_file(path: str) -> None:
    """Refuse a file (or a directory above it) that a non-root user could have changed.

    Directories with the sticky bit (``/tmp``) are accepted: others cannot replace what
    root put there.
    """
    current = os.path.abspath(path)
    while True:
        try:
            st = os.stat(current)
        except OSError as err:
            raise ConfigError(f"cannot read the configuration {path}: {err.strerror}") from None
        if st.st_uid != 0:
            raise ConfigError(
                f"refusing the configuration {path}: {current} is not owned by root",
                hint="chown root it",
            )
        is_file = current == os.path.abspath(path)
        group_writable = st.st_mode & stat.S_IWGRP and st.st_gid != 0
        other_writable = st.st_mode & stat.S_IWOTH and (is_file or not st.st_mode & stat.S_ISVTX)
        if group_writable or other_writable:
            raise ConfigError(
                f"refusing the configuration {path}: {current} is writable by other users",
                hint="chmod go-w it",
            )
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def read(path: str) -> dict[str, object] | None:
    """The cached values of ``path`` if the cache is root's and matches the file, else None."""
    try:
        file_identity = _identity(os.stat(path))
        fd = os.open(cache_path(path), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            cached = marshal.load(fh)
    except (OSError, EOFError, ValueError, TypeError):
        return None
    finally:
        os.close(fd)
    if not isinstance(cached, dict) or cached.get("identity") != file_identity:
        return None
    if cached.get("schema") != _schema_version():
        return None
    values = cached.get("values")
    return values if isinstance(values, dict) else None


def write(path: str, values: dict[str, object]) -> None:
    """Record validated values for ``path`` (root only; failures are harmless)."""
    if os.geteuid() != 0:
        return
    from .fsutil import atomic_write  # only root's writers need it, not the fast path

    try:
        data = marshal.dumps(
            {"identity": _identity(os.stat(path)), "schema": _schema_version(), "values": values}
        )
        atomic_write(cache_path(path), data, mode=0o644)
        runtime = values.get("runtime")
        if isinstance(runtime, dict) and isinstance(runtime.get("run_dir"), str):
            atomic_write(shim_hint_path(path), shim_hint(path, runtime["run_dir"]), mode=0o644)
    except (OSError, ValueError):
        pass  # the partial file is gone; the next reader parses the file itself
