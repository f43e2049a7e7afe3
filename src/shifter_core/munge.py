"""MUNGE credentials through libmunge (cffi ABI mode: no compiler needed at install time).

The declarations (``CDEF``) are parsed at build time into ``_munge_cffi``
(``cffi_build/build_munge.py``); without that module they are parsed at run time.

``encode(payload)`` asks the local munged for a credential carrying ``payload`` (encrypted
and authenticated by the site's shared key); ``decode(credential)`` asks munged to verify one
and returns who made it. munged itself refuses expired credentials (older than their TTL,
300 s by default) and replayed ones (each credential decodes once), which is what makes a
credential usable for exactly one request.

The gateway protocol built on it (see :mod:`shifter_core.gateway`) binds each credential to
its request with :func:`request_payload`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any, NamedTuple

from .errors import ShifterError

CDEF = """
typedef unsigned int uid_t;
typedef unsigned int gid_t;
typedef struct munge_ctx * munge_ctx_t;
typedef int munge_err_t;
munge_err_t munge_encode (char **cred, munge_ctx_t ctx, const void *buf, int len);
munge_err_t munge_decode (const char *cred, munge_ctx_t ctx, void **buf, int *len,
                          uid_t *uid, gid_t *gid);
const char * munge_strerror (munge_err_t e);
munge_ctx_t munge_ctx_create (void);
void munge_ctx_destroy (munge_ctx_t ctx);
munge_err_t munge_ctx_set (munge_ctx_t ctx, int opt, ...);
munge_err_t munge_ctx_get (munge_ctx_t ctx, int opt, ...);
void free (void *ptr);
"""

LIBRARY = "libmunge.so.2"

# munge_err_t values (munge.h)
EMUNGE_SUCCESS = 0
EMUNGE_SOCKET = 6
EMUNGE_CRED_EXPIRED = 15
EMUNGE_CRED_REWOUND = 16
EMUNGE_CRED_REPLAYED = 17
MUNGE_OPT_TTL = 4
MUNGE_OPT_SOCKET = 8
MUNGE_OPT_UID_RESTRICTION = 9
MUNGE_UID_ANY = 0xFFFFFFFF  # (uid_t) -1: no restriction


class MungeError(ShifterError):
    """munged could not encode a credential (not running, socket unreachable, ...)."""

    def __init__(self, message: str, hint: str | None = None, *, code: int = 0) -> None:
        super().__init__(message, hint)
        self.code = code


class MungeAuthError(MungeError):
    """A credential that does not authenticate anyone: invalid, expired, replayed, ..."""


class Credential(NamedTuple):
    """A decoded credential: who encoded it and what it carries (``uid, gid, payload``),
    and the only uid that may decode it (``uid_restriction``; None: anyone)."""

    uid: int
    gid: int
    payload: bytes
    uid_restriction: int | None = None


_lock = threading.Lock()
_lib: Any = None
_libc: Any = None
_ffi: Any = None


def _load() -> tuple[Any, Any, Any]:
    global _lib, _libc, _ffi
    with _lock:
        if _lib is None:
            try:
                from ._munge_cffi import ffi  # parsed at build time
            except ImportError:
                import cffi

                ffi = cffi.FFI()  # type: ignore[assignment]  # the same API, parsed now
                ffi.cdef(CDEF)  # type: ignore[attr-defined]  # cffi.FFI has cdef
            try:
                lib = ffi.dlopen(LIBRARY)
            except OSError as err:
                raise MungeError(
                    f"cannot load {LIBRARY}: {err}", hint="install the munge package (libmunge2)"
                ) from None
            _libc, _ffi, _lib = ffi.dlopen(None), ffi, lib
    return _lib, _libc, _ffi


def _message(lib: Any, ffi: Any, code: int) -> str:
    return str(ffi.string(lib.munge_strerror(code)).decode("utf-8", "replace"))


def _context(
    lib: Any,
    ffi: Any,
    ttl: int | None,
    socket: str | None,
    uid_restriction: int | None = None,
    *,
    always: bool = False,
) -> Any:
    if ttl is None and socket is None and uid_restriction is None and not always:
        return ffi.NULL
    ctx = lib.munge_ctx_create()
    if ctx == ffi.NULL:
        raise MungeError("munge_ctx_create failed (out of memory)")
    keep = []
    if ttl is not None:
        lib.munge_ctx_set(ctx, MUNGE_OPT_TTL, ffi.cast("int", ttl))
    if socket is not None:
        path = ffi.new("char[]", socket.encode())
        keep.append(path)
        lib.munge_ctx_set(ctx, MUNGE_OPT_SOCKET, path)
    if uid_restriction is not None:
        code = lib.munge_ctx_set(
            ctx, MUNGE_OPT_UID_RESTRICTION, ffi.cast("unsigned int", uid_restriction)
        )
        if code != EMUNGE_SUCCESS:
            lib.munge_ctx_destroy(ctx)
            raise MungeError(
                f"cannot restrict a munge credential to uid {uid_restriction}: "
                f"{_message(lib, ffi, code)}",
                code=code,
            )
    return ffi.gc(ctx, lib.munge_ctx_destroy)


def encode(
    payload: bytes = b"",
    *,
    ttl: int | None = None,
    socket: str | None = None,
    uid_restriction: int | None = None,
) -> str:
    """A credential for the calling process's uid and gid carrying ``payload``.

    ``ttl`` (seconds) overrides munged's default time-to-live. ``uid_restriction``: only
    processes of that uid may decode the credential (munged refuses everyone else, so a
    payload carrying a secret reaches that uid only).
    """
    lib, libc, ffi = _load()
    ctx = _context(lib, ffi, ttl, socket, uid_restriction)
    out = ffi.new("char **")
    buf = ffi.from_buffer(payload) if payload else ffi.NULL
    code = lib.munge_encode(out, ctx, buf, len(payload))
    try:
        if code != EMUNGE_SUCCESS:
            raise MungeError(
                f"cannot create a munge credential: {_message(lib, ffi, code)}",
                hint="is munged running on this host?",
                code=code,
            )
        return str(ffi.string(out[0]).decode("ascii"))
    finally:
        if out[0] != ffi.NULL:
            libc.free(out[0])


def _uid_restriction(lib: Any, ffi: Any, ctx: Any) -> int | None:
    """The uid restriction of the credential just decoded with ``ctx`` (None: none)."""
    out = ffi.new("uid_t *")
    try:
        code = lib.munge_ctx_get(ctx, MUNGE_OPT_UID_RESTRICTION, out)
    except AttributeError:  # a _munge_cffi built before munge_ctx_get was declared
        return None
    if code != EMUNGE_SUCCESS or out[0] == MUNGE_UID_ANY:
        return None
    return int(out[0])


def decode(credential: str, *, socket: str | None = None) -> Credential:
    """Verify a credential with munged; raise :class:`MungeAuthError` unless it is valid.

    Expired, rewound (from the future) and replayed credentials are refused, as is anything
    munged does not accept. A munged that cannot be reached raises :class:`MungeError`.
    """
    lib, libc, ffi = _load()
    try:
        raw = credential.encode("ascii")
    except UnicodeEncodeError:
        raise MungeAuthError("invalid munge credential (not ASCII)") from None
    ctx = _context(lib, ffi, None, socket, always=True)
    buf = ffi.new("void **")
    length = ffi.new("int *")
    uid = ffi.new("uid_t *")
    gid = ffi.new("gid_t *")
    code = lib.munge_decode(raw, ctx, buf, length, uid, gid)
    try:
        data = bytes(ffi.buffer(buf[0], length[0])) if buf[0] != ffi.NULL else b""
    finally:
        if buf[0] != ffi.NULL:
            libc.free(buf[0])
    if code == EMUNGE_SUCCESS:
        return Credential(int(uid[0]), int(gid[0]), data, _uid_restriction(lib, ffi, ctx))
    reason = _message(lib, ffi, code)
    if code == EMUNGE_SOCKET:
        raise MungeError(f"cannot verify the munge credential: {reason}", code=code)
    what = {
        EMUNGE_CRED_EXPIRED: "expired munge credential",
        EMUNGE_CRED_REPLAYED: "replayed munge credential",
        EMUNGE_CRED_REWOUND: "munge credential from the future (clock skew?)",
    }.get(code, "invalid munge credential")
    raise MungeAuthError(f"{what}: {reason}", code=code)


# -- the gateway's request binding ------------------------------------------------------------


def body_digest(body: bytes) -> str:
    """Hex sha256 of a request body (what the payload's ``body_sha256`` holds)."""
    return hashlib.sha256(body).hexdigest()


def request_payload(
    method: str, path: str, body_sha256: str, secret: dict[str, Any] | None = None
) -> bytes:
    """The payload binding a credential to one request: method, path (with query), body hash.

    ``secret`` (registry credentials) travels inside the credential, which munge encrypts.
    """
    doc: dict[str, Any] = {"method": method.upper(), "path": path, "body_sha256": body_sha256}
    if secret is not None:
        doc["secret"] = secret
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def parse_payload(payload: bytes) -> dict[str, Any]:
    """The payload of a gateway credential; :class:`MungeAuthError` when it is not one."""
    try:
        doc = json.loads(payload)
    except ValueError:
        doc = None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("method"), str)
        or not isinstance(doc.get("path"), str)
        or not isinstance(doc.get("body_sha256"), str)
    ):
        raise MungeAuthError("the munge credential does not carry a gateway request payload")
    return doc
