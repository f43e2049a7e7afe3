"""The user's own cache for Shifter: launch recipes and what image names resolved to.

One directory per user, ``$XDG_RUNTIME_DIR/shifter-launch`` (else
``/tmp/shifter-launch-UID``), mode 0700 and the user's, else it is not used: the C launcher
keeps its recipes there (:mod:`.runtime.launch`), and ``srun``/``sbatch``/``salloc`` keep
what the gateway said an ``--image`` name means (``.names/``), for
``runtime.launcher_name_ttl`` seconds, so that the steps of an allocation made without
``--image`` do not each ask the gateway. What is kept is only a claim: the submission checks
it against the image store's own record before it uses it, and the nodes check the image's
ACL again. ``shifterimg pull`` forgets the user's claim for the name it pulls.

Kept to ``os`` and ``stat`` (and ``contextlib``): every ``srun --image`` reads it.
"""

from __future__ import annotations

import contextlib
import os
import stat

from .fnv import fnv1a_hex

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

NAMES_DIR = ".names"
_BAD_PATH_CHARS = (",", ":", "\\", "\n")


def cache_directory(uid: int, environ: Mapping[str, str], create: bool = False) -> str | None:
    """The user's cache, if it is usable (created with ``create``); the C launcher has the
    same rule (``cache_dir`` in ``launcher/shifter_launch.c``)."""
    xdg = environ.get("XDG_RUNTIME_DIR", "")
    try:
        use_xdg = xdg.startswith("/") and os.stat(xdg).st_uid == uid and os.path.isdir(xdg)
    except OSError:
        use_xdg = False
    path = f"{xdg}/shifter-launch" if use_xdg else f"/tmp/shifter-launch-{uid}"
    if any(c in path for c in _BAD_PATH_CHARS):
        return None
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError:
            return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o022:
        return None
    return path


def _name_file(directory: str, request: str, gids: Iterable[int]) -> str:
    """One file per request and set of groups (the file holds the request too, which is
    compared)."""
    name = fnv1a_hex(f"{sorted(gids)}\n{request}".encode())
    return f"{directory}/{NAMES_DIR}/{name}"


def claimed_id(uid: int, gids: Iterable[int], environ: Mapping[str, str], request: str,
               now: float) -> str | None:  # fmt: skip
    """The image id the gateway gave for ``request`` less than its time to live ago, if the
    user's cache holds it (a claim to check against the image store)."""
    directory = cache_directory(uid, environ)
    if directory is None:
        return None
    try:
        fd = os.open(_name_file(directory, request, gids), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        text = os.read(fd, 4096).decode("utf-8", "replace")
    finally:
        os.close(fd)
    image_id, _, rest = text.partition("\n")
    expires, _, cached_request = rest.partition("\n")
    try:
        if cached_request != request or float(expires) <= now:
            return None
    except ValueError:
        return None
    return image_id


def remember(uid: int, gids: Iterable[int], environ: Mapping[str, str], request: str,
             image_id: str, expires: float) -> None:  # fmt: skip
    """Keep what the gateway gave for ``request`` until ``expires`` (never fails)."""
    directory = cache_directory(uid, environ, create=True)
    if directory is None:
        return
    from .fsutil import atomic_write  # only after asking the gateway, which costs more

    path = _name_file(directory, request, gids)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        atomic_write(path, f"{image_id}\n{expires}\n{request}".encode(), mode=0o600)
    except OSError:
        pass


def forget(uid: int, environ: Mapping[str, str]) -> None:
    """Forget every name the user's cache holds (after a pull: a name may mean another
    image now)."""
    directory = cache_directory(uid, environ)
    if directory is None:
        return
    names = f"{directory}/{NAMES_DIR}"
    try:
        entries = os.listdir(names)
    except OSError:
        return
    for entry in entries:
        with contextlib.suppress(OSError):
            os.unlink(f"{names}/{entry}")
