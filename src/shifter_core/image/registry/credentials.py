"""Registry credentials: a small per-user JSON file written by ``shifterimg login``.

The file (``~/.config/shifter/credentials.json`` by default, or under ``$XDG_CONFIG_HOME``)
uses Docker's ``config.json`` layout so that it is familiar and interchangeable::

    {"auths": {"docker.io": {"auth": "<base64 of USER:PASSWORD>"}}}

Entries with explicit ``username``/``password`` keys are accepted as well. The file is created
mode 0600 in a directory of mode 0700, written atomically, and refused when group or others
can read it: a password file that others can read has already leaked.

Registry names are normalised: ``docker.io``, ``index.docker.io``, ``registry-1.docker.io`` and
Docker's legacy key ``https://index.docker.io/v1/`` all mean Docker Hub.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import logging
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from ...errors import ShifterError
from ...fsutil import atomic_write
from .settings import registry_host

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700


class CredentialError(ShifterError):
    """The credentials file is unsafe, unreadable or malformed."""


class CredentialSource(Protocol):
    """Anything that maps a registry name to ``(username, password)``."""

    def get(self, registry: str) -> tuple[str, str] | None:
        """The credentials for *registry*, or None for anonymous access."""
        ...


def default_path() -> Path:
    """``$XDG_CONFIG_HOME/shifter/credentials.json``, else ``~/.config/shifter/...``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "shifter" / "credentials.json"


def normalize_registry(name: str) -> str:
    """The canonical key for a registry: :func:`~.settings.registry_host` of *name*, which
    may not be blank.

    ``https://index.docker.io/v1/`` -> ``docker.io``; ``http://127.0.0.1:5000/`` ->
    ``127.0.0.1:5000``; host names are case-insensitive and lower-cased.
    """
    host = registry_host(name)
    if not host:
        raise CredentialError(f"invalid registry name {name!r}", hint="e.g. docker.io or host:5000")
    return host


class StaticCredentials:
    """Credentials held in memory (e.g. passed to the gateway with one pull request)."""

    def __init__(self, entries: Mapping[str, tuple[str, str]] | None = None) -> None:
        self._entries = {normalize_registry(k): v for k, v in (entries or {}).items()}

    def get(self, registry: str) -> tuple[str, str] | None:
        """The credentials for *registry*, or None."""
        return self._entries.get(normalize_registry(registry))

    def set(self, registry: str, username: str, password: str) -> None:
        """Remember credentials for *registry*."""
        self._entries[normalize_registry(registry)] = (username, password)


class CredentialStore:
    """A per-user credentials file: ``get``/``set``/``remove`` by registry name.

    Every call reads the file afresh (it is tiny), so a long-lived process sees a later
    ``shifterimg login``. Writes take an exclusive ``flock`` on a sibling lock file and replace
    the file atomically, so concurrent logins cannot corrupt it.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()

    # -- reading -------------------------------------------------------------------------------

    def _check_safe(self, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise CredentialError(f"credentials file {self.path} is not a regular file")
        if st.st_mode & 0o077:
            raise CredentialError(
                f"credentials file {self.path} is readable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it",
                hint=f"run: chmod 600 {self.path}",
            )
        if st.st_uid not in (os.geteuid(), 0):
            raise CredentialError(
                f"credentials file {self.path} belongs to uid {st.st_uid}, not to you "
                f"(uid {os.geteuid()}); refusing to use it",
                hint="remove it and log in again with shifterimg login",
            )

    def _load(self) -> dict[str, Any]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise CredentialError(f"cannot read credentials file {self.path}: {exc}") from exc
        with os.fdopen(fd, "rb") as fh:
            self._check_safe(os.fstat(fh.fileno()))
            raw = fh.read()
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise CredentialError(
                f"credentials file {self.path} is not valid JSON: {exc}",
                hint="remove it and log in again with shifterimg login",
            ) from exc
        if not isinstance(data, dict) or not isinstance(data.get("auths", {}), dict):
            raise CredentialError(
                f'credentials file {self.path} has no "auths" object',
                hint="remove it and log in again with shifterimg login",
            )
        return data

    def _entry(self, key: str, entry: Any) -> tuple[str, str] | None:
        if not isinstance(entry, dict):
            raise CredentialError(f"credentials file {self.path}: entry {key!r} is not an object")
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return entry["username"], entry["password"]
        auth = entry.get("auth")
        if not auth:
            return None
        try:
            decoded = base64.b64decode(str(auth), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise CredentialError(
                f"credentials file {self.path}: entry {key!r} has an invalid 'auth' value",
                hint="log in again with shifterimg login",
            ) from exc
        user, sep, password = decoded.partition(":")
        if not sep:
            raise CredentialError(
                f"credentials file {self.path}: entry {key!r} has an invalid 'auth' value",
                hint="log in again with shifterimg login",
            )
        return user, password

    def get(self, registry: str) -> tuple[str, str] | None:
        """``(username, password)`` stored for *registry*, or None."""
        want = normalize_registry(registry)
        auths: dict[str, Any] = self._load().get("auths", {})
        for key, entry in auths.items():
            try:
                name = normalize_registry(key)
            except CredentialError:
                continue
            if name == want:
                return self._entry(key, entry)
        return None

    def registries(self) -> list[str]:
        """The registries with stored credentials (normalised names, sorted)."""
        names = set()
        for key in self._load().get("auths", {}):
            with contextlib.suppress(CredentialError):
                names.add(normalize_registry(key))
        return sorted(names)

    # -- writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        directory = self.path.parent
        created = not directory.exists()
        directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        # Tighten our own directory (new, or the default ~/.config/shifter) but never chmod
        # some other existing directory a custom path points into (it could be /tmp).
        own_default = directory == default_path().parent and directory.stat().st_uid == os.geteuid()
        if created or own_default:
            os.chmod(directory, DIR_MODE)
        lock_path = directory / (self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, data: dict[str, Any]) -> None:
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        atomic_write(self.path, text, mode=FILE_MODE, sync=True)

    def set(self, registry: str, username: str, password: str) -> None:
        """Store credentials for *registry* (replacing any earlier entry for it)."""
        if ":" in username:
            raise CredentialError(f"invalid user name {username!r}: it contains ':'")
        name = normalize_registry(registry)
        with self._locked():
            data = self._load()
            auths = {k: v for k, v in data.get("auths", {}).items() if _safe_norm(k) != name}
            token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            auths[name] = {"auth": token}
            data["auths"] = auths
            self._write(data)
        log.info("stored credentials for %s (user %s) in %s", name, username, self.path)

    def remove(self, registry: str) -> bool:
        """Forget the credentials for *registry*; True when there were any."""
        name = normalize_registry(registry)
        with self._locked():
            data = self._load()
            auths = data.get("auths", {})
            kept = {k: v for k, v in auths.items() if _safe_norm(k) != name}
            if len(kept) == len(auths):
                return False
            data["auths"] = kept
            self._write(data)
        log.info("removed credentials for %s from %s", name, self.path)
        return True


def _safe_norm(key: str) -> str | None:
    try:
        return normalize_registry(key)
    except CredentialError:
        return None
