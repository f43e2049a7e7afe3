"""httpx, imported without its command-line tool.

``import httpx`` also imports ``httpx._main`` (rich, click and pygments: ~130 ms) whenever
those are installed, which they are here; ``shifterimg`` and the SPANK plugin never use it.
A ``None`` entry in ``sys.modules`` makes that import fail, which httpx handles by design.
"""

import sys

# typeshed types sys.modules without None, which the import system documents as "refused"
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

import httpx  # noqa: E402

__all__ = ["httpx"]
