"""User text that reaches Slurm's log (root's) is escaped: it cannot forge log lines."""

from __future__ import annotations

import cffi

from shifter_core.slurm import api as spank


class FakeSlurm:
    """What the shim's ``lib`` offers ``spank.log``: records the lines."""

    S_CTX_LOCAL, S_CTX_ALLOCATOR, S_CTX_REMOTE = 1, 2, 3

    def __init__(self) -> None:
        self.ffi = cffi.FFI()
        self.lines: list[str] = []

    def spank_context(self) -> int:
        return self.S_CTX_REMOTE

    def _record(self, _fmt: bytes, text: object) -> None:
        self.lines.append(self.ffi.string(text).decode())

    slurm_error = slurm_info = slurm_verbose = slurm_debug = _record


def test_log_lines_escape_what_the_user_wrote(monkeypatch):
    fake = FakeSlurm()
    monkeypatch.setattr(spank, "_ffi", fake.ffi)
    monkeypatch.setattr(spank, "_lib", fake)
    spank.log(spank.INFO, "image busybox\nslurmd: error: node n1 drained\x1b[2K")
    assert len(fake.lines) == 1
    assert "\n" not in fake.lines[0] and "\x1b" not in fake.lines[0]
    assert fake.lines[0] == r"shifter: image busybox\nslurmd: error: node n1 drained\x1b[2K"
