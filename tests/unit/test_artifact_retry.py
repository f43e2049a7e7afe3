"""A registry's passing 5xx is asked again, a few times; nothing else is (image/artifact)."""

from __future__ import annotations

import pytest

from shifter_core.image import artifact


class FakeResponse:
    def __init__(self, status: int) -> None:
        self.status_code = status
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    ("statuses", "calls", "final"),
    [
        ([200], 1, 200),
        ([404], 1, 404),
        ([401], 1, 401),
        ([500, 502, 200], 3, 200),
        ([500] * 10, 1 + len(artifact.RETRY_PAUSES), 500),
    ],
)
def test_again_on_5xx(monkeypatch: pytest.MonkeyPatch, statuses: list[int], calls: int, final: int):
    monkeypatch.setattr(artifact, "RETRY_PAUSES", tuple(0.0 for _ in artifact.RETRY_PAUSES))
    made: list[FakeResponse] = []

    def request() -> FakeResponse:
        made.append(FakeResponse(statuses[len(made)]))
        return made[-1]

    response = artifact._again_on_5xx(request)  # type: ignore[arg-type]
    assert len(made) == calls and response.status_code == final
    assert all(r.closed for r in made[:-1]) and not made[-1].closed
