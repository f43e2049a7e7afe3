"""Build ``shifter_core._munge_cffi``: libmunge's declarations, parsed once at build time.

cffi's out-of-line ABI mode writes a small Python module that holds the parsed
declarations, so loading libmunge costs no C parser at run time (``munge.py`` would
otherwise parse them with pycparser on every start: ~70 ms of each ``shifterimg``) and needs
no compiler.  Built by ``pip install -e .`` (``cffi_modules`` in ``setup.py``) or by hand::

    .venv/bin/python cffi_build/build_munge.py     # writes src/shifter_core/_munge_cffi.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import cffi

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from shifter_core.munge import CDEF  # noqa: E402  (the one copy of the declarations)

ffibuilder = cffi.FFI()
ffibuilder.set_source("shifter_core._munge_cffi", None)
ffibuilder.cdef(CDEF)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(SRC), verbose=True)
