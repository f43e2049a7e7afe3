"""Build ``shifter_spank.so``: the SPANK plugin in cffi embedding mode.

Run with the interpreter the plugin must embed (the one with ``shifter_core`` installed)::

    .venv/bin/python cffi_build/build_spank.py [--out build/shifter_spank.so]

The C half is ``spank/shifter_spank.c``; every callback ends in :mod:`shifter_core.slurm`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import cffi

ROOT = Path(__file__).resolve().parent.parent

# The Python side the C trampolines call (implemented in shifter_core.slurm.dispatch).
EMBEDDING_API = """
int py_spank_start(int ac, char **av);
int py_spank_hook(const char *hook, spank_t sp, int ac, char **av);
int py_spank_option(int val, const char *optarg, int remote);
"""

# The few Slurm and shim functions Python calls.
CDEF = """
typedef struct spank_handle *spank_t;
typedef int... spank_err_t;
typedef int... spank_item_t;
typedef int... spank_context_t;
spank_context_t spank_context(void);
spank_err_t spank_get_item(spank_t spank, spank_item_t item, ...);
spank_err_t spank_getenv(spank_t spank, const char *var, char *buf, int len);
spank_err_t spank_setenv(spank_t spank, const char *var, const char *val, int overwrite);
spank_err_t spank_unsetenv(spank_t spank, const char *var);
spank_err_t spank_job_control_setenv(spank_t sp, const char *name, const char *value,
                                     int overwrite);
spank_err_t spank_job_control_getenv(spank_t sp, const char *name, char *buf, int len);
void slurm_info(const char *format, ...);
void slurm_error(const char *format, ...);
void slurm_verbose(const char *format, ...);
void slurm_debug(const char *format, ...);
void slurm_spank_log(const char *format, ...);
int shifter_getopt(spank_t sp, int val, char **optarg);

#define ESPANK_SUCCESS ...
#define ESPANK_ENV_NOEXIST ...
#define ESPANK_NOSPACE ...
#define S_CTX_ERROR ...
#define S_CTX_LOCAL ...
#define S_CTX_REMOTE ...
#define S_CTX_ALLOCATOR ...
#define S_CTX_SLURMD ...
#define S_CTX_JOB_SCRIPT ...
#define S_JOB_UID ...
#define S_JOB_GID ...
#define S_JOB_ID ...
#define S_JOB_STEPID ...
#define S_JOB_NNODES ...
#define S_JOB_NODEID ...
#define S_JOB_LOCAL_TASK_COUNT ...
#define S_TASK_ID ...
#define S_TASK_GLOBAL_ID ...
#define S_TASK_PID ...
"""

INIT_CODE = """
from _shifter_spank import ffi, lib

try:
    import shifter_core.slurm.dispatch as _spank
except BaseException:
    import traceback
    for _line in traceback.format_exc().splitlines():
        lib.slurm_error(b"shifter: %s", ffi.new("char[]", _line.encode(errors="replace")))
    raise

_spank.bind(ffi, lib)

def _args(ac, av):
    return [ffi.string(av[i]).decode() for i in range(ac)]

@ffi.def_extern(error=-1)
def py_spank_start(ac, av):
    return _spank.on_start(_args(ac, av))

@ffi.def_extern(error=-1)
def py_spank_hook(hook, sp, ac, av):
    return _spank.on_hook(ffi.string(hook).decode(), sp, _args(ac, av))

@ffi.def_extern(error=-1)
def py_spank_option(val, optarg, remote):
    return _spank.on_option(val, ffi.string(optarg).decode() if optarg else "", bool(remote))
"""


def build(out: Path) -> Path:
    """Compile the plugin to ``out`` and return its path."""
    python = Path(sys.executable)
    if not python.is_absolute():
        raise SystemExit(f"cannot tell the interpreter's absolute path: {sys.executable}")
    # Keep the venv's own path (not the symlink's target): that is how it finds its packages.
    program = str(Path(os.path.abspath(python)))
    libpython = sysconfig.get_config_var("INSTSONAME")
    libdir = sysconfig.get_config_var("LIBDIR")
    # The embedded interpreter gets this sys.path and skips site.py (faster, and immune
    # to .pth files): the standard library, site-packages, and shifter_core's location.
    import shifter_core

    package_dir = str(Path(shifter_core.__file__).resolve().parent.parent)
    search_path = [p for p in sys.path[1:] if p and Path(p).exists()]
    if package_dir not in search_path:
        search_path.append(package_dir)
    if not libpython or not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        raise SystemExit(f"{program} has no shared libpython; use a Python built with it")

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.embedding_api(EMBEDDING_API)
    ffi.embedding_init_code(INIT_CODE)
    source = (ROOT / "spank" / "shifter_spank.c").read_text()
    ffi.set_source(
        "_shifter_spank",
        source,
        define_macros=[
            ("SHIFTER_PYTHON", f'"{program}"'),
            ("SHIFTER_LIBPYTHON", f'"{libpython}"'),
            ("SHIFTER_PYTHONPATH", f'"{":".join(search_path)}"'),
        ],
        libraries=[f"python{sysconfig.get_config_var('LDVERSION')}"],
        library_dirs=[libdir],
        extra_compile_args=["-Wall", "-Wno-unused-function", "-O2"],
    )
    with tempfile.TemporaryDirectory(prefix="shifter-spank-") as tmp:
        built = ffi.compile(tmpdir=tmp, target="shifter_spank.*", verbose=False)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        shutil.copyfile(built, partial)
        partial.chmod(0o755)
        partial.replace(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "shifter_spank.so")
    args = parser.parse_args()
    print(build(args.out.resolve()))


if __name__ == "__main__":
    main()
