"""Everything that touches cffi's ``ffi`` and ``lib`` (the shim): Slurm's log, the SPANK
handle, and a :mod:`logging` handler that writes to Slurm's log.

``lib`` and ``ffi`` come from the embedded init code (:func:`bind`); they are typed as
``Any`` because cffi generates them at build time.
"""

from __future__ import annotations

from ..errors import ShifterError, escape

TYPE_CHECKING = False  # typing costs start-up time on this path
if TYPE_CHECKING:
    from typing import Any

_ffi: Any = None
_lib: Any = None


def bind(ffi: Any, lib: Any) -> None:
    """Called once by the embedded init code with cffi's ``ffi`` and ``lib``."""
    global _ffi, _lib
    _ffi, _lib = ffi, lib


# ---- logging through Slurm -------------------------------------------------------------

ERROR, INFO, DEBUG = "error", "info", "debug"


def log(level: str, message: str) -> None:
    """Write ``shifter: message`` to Slurm's log.

    In srun/sbatch ``info`` would reach the user's terminal, so it goes to ``verbose``
    there (``srun -v`` shows it); on the nodes it lands in slurmd's log file.
    """
    if _lib is None:
        return
    # Escaped: user text (image names, volumes, paths) must not forge lines in root's logs.
    text = _ffi.new("char[]", ("shifter: " + escape(message, 4000)).encode())
    if level == ERROR:
        _lib.slurm_error(b"%s", text)
    elif level == INFO and _lib.spank_context() in (_lib.S_CTX_LOCAL, _lib.S_CTX_ALLOCATOR):
        _lib.slurm_verbose(b"%s", text)
    elif level == INFO:
        _lib.slurm_info(b"%s", text)
    else:
        _lib.slurm_debug(b"%s", text)


def log_exception(what: str) -> None:
    """One line for the user (srun's stderr shows errors); the traceback at debug level, in
    slurmd's log with ``SlurmdDebug=debug`` (or ``srun -vv``)."""
    import sys
    import traceback

    log(ERROR, f"internal error {what}: {sys.exc_info()[1]!r}")
    for line in traceback.format_exc().splitlines():
        log(DEBUG, line)


class Spank:
    """A thin wrapper around a ``spank_t`` handle."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    @property
    def context(self) -> str:
        value = _lib.spank_context()
        for name in ("local", "remote", "allocator", "slurmd", "job_script"):
            if value == getattr(_lib, "S_CTX_" + name.upper()):
                return name
        return "error"

    def item_u32(self, item: str) -> int | None:
        """A ``uint32_t`` item such as ``S_JOB_ID``; None where Slurm does not give it."""
        out = _ffi.new("uint32_t *")
        if _lib.spank_get_item(self.handle, getattr(_lib, item), out) != _lib.ESPANK_SUCCESS:
            return None
        return int(out[0])

    def getenv(self, name: str) -> str | None:
        """A variable of the job's environment (remote context)."""
        size = 4096
        while size <= 1 << 20:
            buf = _ffi.new("char[]", size)
            rc = _lib.spank_getenv(self.handle, name.encode(), buf, size)
            if rc == _lib.ESPANK_SUCCESS:
                return str(_ffi.string(buf).decode(errors="replace"))
            if rc != _lib.ESPANK_NOSPACE:
                return None
            size *= 4
        return None

    def setenv(self, name: str, value: str) -> None:
        """Set a variable in the job's environment (remote context)."""
        if _lib.spank_setenv(self.handle, name.encode(), value.encode(), 1) != _lib.ESPANK_SUCCESS:
            raise ShifterError(f"cannot set {name} in the job's environment")

    def job_control_setenv(self, name: str, value: str) -> None:
        """Set a variable that the prolog and epilog see as ``SPANK_<name>``."""
        rc = _lib.spank_job_control_setenv(self.handle, name.encode(), value.encode(), 1)
        if rc != _lib.ESPANK_SUCCESS:
            raise ShifterError(f"cannot pass {name} to the job's prolog")


def route_logging() -> None:
    """Send :mod:`logging` records of ``shifter_core`` to Slurm's log (prolog, epilog)."""
    import logging

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            level = ERROR if record.levelno >= logging.WARNING else INFO
            if record.levelno < logging.INFO:
                level = DEBUG
            log(level, self.format(record))

    root = logging.getLogger("shifter_core")
    root.addHandler(Handler())
    root.setLevel(logging.INFO)
