"""FNV-1a, 64 bits: short, stable names for cache entries and directories, cheap to compute
without importing ``hashlib`` (8 ms on every container step). Never a security check: what
such a name finds is always compared in full (a key, a request, a root-owned record). The
C launcher has the same function (``fnv1a`` in ``launcher/shifter_launch.c``)."""

from __future__ import annotations


def fnv1a_hex(data: bytes) -> str:
    """The 64-bit FNV-1a hash of ``data``, as 16 hex digits."""
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{value:016x}"
