"""``shifterimg`` argument handling, output and exit codes, with a fake gateway client."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from shifter_core.cli import shifterimg
from shifter_core.client import GatewayError, GatewayUnreachable
from shifter_core.gateway.models import ImageEntry, ImageInfo, JobInfo, LoginResult
from shifter_core.image.store import ImageMetadata

IMAGE_ID = "ab" * 32


class FakeClient:
    def __init__(self, final_state: str = "READY", message: str = "") -> None:
        self.calls: list[tuple[str, Any]] = []
        self.final_state, self.message = final_state, message
        self.login_result: Any = {"result": "logged in to reg.test (basic authentication)"}

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def pull(self, reference: str, **kwargs: Any) -> JobInfo:
        self.calls.append(("pull", (reference, kwargs)))
        return JobInfo.from_dict(
            {
                "id": "j1",
                "reference": f"docker.io/library/{reference}",
                "platform": "linux/amd64",
                "state": "PENDING",
                "message": "",
            }
        )

    def wait(self, job_id: str, on_update: Any, **kwargs: Any) -> JobInfo:
        progress = {
            "layers": [{"digest": "sha256:" + "1" * 64, "done": 2000, "total": 2000}],
            "done": 2000,
            "total": 2000,
            "rate": 1000.0,
        }
        on_update(JobInfo.from_dict({"id": job_id, "state": "PULLING", "progress": progress}))
        final = JobInfo.from_dict(
            {
                "id": job_id,
                "state": self.final_state,
                "message": self.message,
                "reference": "docker.io/library/busybox:latest",
                "image_id": IMAGE_ID,
            }
        )
        on_update(final)
        return final

    def images(self) -> list[ImageEntry]:
        listed = [
            {
                "status": "READY",
                "id": IMAGE_ID,
                "pulled": 0,
                "private": True,
                "platform": "linux/amd64",
                "reference": "docker.io/library/busybox:latest",
                "size": 1_258_291,  # 1.2 MiB
            },
            {
                "status": "READY",
                "id": "cd" * 32,
                "pulled": 0,
                "private": False,
                "platform": "linux/amd64",
                "reference": "docker.io/library/ubuntu:22.04",
                "size": 1_181_116_006,  # 1.1 GiB
            },
            {
                "status": "PULLING",
                "id": None,
                "pulled": 0,
                "private": False,
                "platform": "linux/arm64/v8",
                "reference": "docker.io/library/debian:12",
                "job": "j7",
            },
        ]
        return [ImageEntry.from_dict(i) for i in listed]

    def lookup(self, reference: str, platform: str | None = None) -> ImageInfo:
        if reference == "missing":
            raise GatewayError("image 'missing' not found on the image gateway", status=404)
        source = "docker.io/library/busybox:latest"
        meta = ImageMetadata(IMAGE_ID, source, f"sha256:{IMAGE_ID}", "linux/amd64")
        return ImageInfo(meta, source)

    def login(self, registry: str, username: str, password: str) -> LoginResult:
        self.calls.append(("login", (registry, username, password)))
        if isinstance(self.login_result, Exception):
            raise self.login_result
        return LoginResult.from_dict(self.login_result)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeClient:
    client = FakeClient()
    monkeypatch.setattr(shifterimg, "_client", lambda args: client)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return client


def test_pull_prints_plain_progress_and_exits_0_when_ready(fake, capsys) -> None:
    assert shifterimg.main(["pull", "-u", "bob,carol", "-g", "science", "busybox"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "pulling docker.io/library/busybox (linux/amd64), job j1",
        "PENDING",
        "PULLING",
        "  layer sha256:111111111111 2.0 kB",
        "READY",
        f"image docker.io/library/busybox:latest is READY: {IMAGE_ID}",
    ]
    reference, kwargs = fake.calls[0][1]
    assert reference == "busybox" and kwargs["users"] == ["bob", "carol"]
    assert kwargs["groups"] == ["science"] and kwargs["secret"] is None


def test_plain_progress_reports_bytes_of_long_downloads() -> None:
    out = io.StringIO()
    display = shifterimg.PlainProgress(out, every=0.0)
    layers = [{"digest": "sha256:" + "2" * 64, "done": 1_500_000, "total": 3_000_000}]
    info = {"layers": layers, "done": 1_500_000, "total": 3_000_000, "rate": 500_000}
    display.update(JobInfo.from_dict({"id": "j", "state": "PULLING", "progress": info}))
    assert out.getvalue().splitlines() == ["PULLING", "  1.5 MB of 3.0 MB (500.0 kB/s)"]


def test_shifter_style_options_before_the_command(fake) -> None:
    assert shifterimg.main(["-u", "bob", "-g", "g1", "pull", "busybox"]) == 0
    _, kwargs = fake.calls[0][1]
    assert kwargs["users"] == ["bob"] and kwargs["groups"] == ["g1"]


def test_a_failed_pull_exits_1_with_the_gateways_message(fake, capsys) -> None:
    fake.final_state, fake.message = "FAILED", "blob sha256:x of 'a' is corrupt"
    assert shifterimg.main(["pull", "busybox"]) == 1
    assert capsys.readouterr().err == "shifterimg: blob sha256:x of 'a' is corrupt\n"


def test_errors_exit_1(fake, capsys, monkeypatch) -> None:
    assert shifterimg.main(["lookup", "missing"]) == 1
    assert "image 'missing' not found" in capsys.readouterr().err

    def down(args: Any) -> Any:
        raise GatewayUnreachable("cannot reach the image gateway at http://x: refused")

    monkeypatch.setattr(shifterimg, "_client", down)
    assert shifterimg.main(["images"]) == 1
    assert capsys.readouterr().err.startswith("shifterimg: cannot reach the image gateway")
    assert shifterimg.main(["pull", "Not Valid"]) == 1
    assert "invalid image reference" in capsys.readouterr().err


def test_images_table_has_a_size_column(fake, capsys) -> None:
    assert shifterimg.main(["images"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = ["STATUS", "ID", "PULLED", "SIZE", "PRIVATE", "PLATFORM", "REFERENCE"]
    assert lines[0].split() == header
    assert lines[1].split()[:2] == ["READY", IMAGE_ID[:12]]
    busybox = ["1.2M", "yes", "linux/amd64", "docker.io/library/busybox:latest"]
    assert lines[1].split()[3:] == busybox
    assert lines[2].split()[3] == "1.1G"
    assert lines[3].split()[:2] == ["PULLING", "-"]
    assert lines[3].split()[3] == "-"  # a pull in progress has no size yet
    # The SIZE column is right-aligned, under its header.
    end = lines[0].index("SIZE") + len("SIZE")
    assert [line[:end].rstrip()[-4:] for line in lines[1:]] == ["1.2M", "1.1G", "   -"]


def test_images_json_carries_every_field_of_the_gateways_entries(fake, capsys) -> None:
    assert shifterimg.main(["images", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [ImageEntry.from_dict(item) for item in listed] == fake.images()
    for item in listed:  # the same keys for every image, none left out
        assert set(item) == set(ImageEntry._fields)
    assert listed[0]["size"] == 1_258_291 and listed[0]["job"] is None
    assert listed[2]["job"] == "j7" and listed[2]["size"] == 0


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0B"),
        (1023, "1023B"),
        (1024, "1.0K"),
        (1_258_291, "1.2M"),
        (10 * 1024**2 - 1, "10M"),
        (120 * 1024**2, "120M"),
        (1024**3 - 1, "1.0G"),
        (1_181_116_006, "1.1G"),
        (3 * 1024**4, "3.0T"),
    ],
)
def test_human_sizes(size: int, text: str) -> None:
    assert shifterimg._human_size(size) == text


def test_lookup_prints_the_id(fake, capsys) -> None:
    assert shifterimg.main(["lookup", "busybox"]) == 0
    assert capsys.readouterr().out == IMAGE_ID + "\n"


def test_login_stores_checked_credentials_and_pull_sends_them(fake, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("pw-1\n"))
    assert shifterimg.main(["login", "-u", "carol", "--password-stdin", "reg.test:5000"]) == 0
    assert fake.calls[-1] == ("login", ("reg.test:5000", "carol", "pw-1"))
    stored = tmp_path / "config" / "shifter" / "credentials.json"
    assert stored.stat().st_mode & 0o777 == 0o600
    assert shifterimg.main(["pull", "reg.test:5000/team/app:1"]) == 0
    _, kwargs = fake.calls[-1][1]
    assert kwargs["secret"] == {
        "registry": "reg.test:5000",
        "username": "carol",
        "password": "pw-1",
    }


def test_login_with_rejected_credentials_stores_nothing(fake, monkeypatch, tmp_path) -> None:
    fake.login_result = GatewayError("registry reg.test rejected the username or password")
    monkeypatch.setattr("sys.stdin", io.StringIO("carol\nbad\n"))
    assert shifterimg.main(["login", "--password-stdin", "reg.test"]) == 1
    assert not (tmp_path / "config" / "shifter" / "credentials.json").exists()


def test_login_stores_unverified_credentials_when_the_registry_cannot_be_asked(
    fake, monkeypatch, capsys, tmp_path
) -> None:
    fake.login_result = {"result": "cannot reach registry reg.test", "verified": False}
    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    assert shifterimg.main(["login", "-u", "c", "--password-stdin", "reg.test"]) == 0
    assert "storing the credentials unverified" in capsys.readouterr().err
    assert (tmp_path / "config" / "shifter" / "credentials.json").exists()


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        shifterimg.main(["frobnicate"])
    assert exit_.value.code == 2


def test_rich_progress_renders(capsys) -> None:
    out = io.StringIO()
    display = shifterimg.RichProgress(out, "busybox")
    with display:
        for state, done in (("PULLING", 5), ("CONVERTING", 10)):
            layers = [{"digest": "sha256:1", "done": done, "total": 10}]
            progress = {"layers": layers, "done": done, "total": 10}
            display.update(JobInfo.from_dict({"id": "j", "state": state, "progress": progress}))
    assert "CONVERTING" in out.getvalue()


@pytest.mark.parametrize("verbose", [False, True])
def test_an_unexpected_exception_is_one_line_without_v(monkeypatch, capsys, verbose):
    def broken(args: Any) -> Any:
        raise KeyError("boom")

    monkeypatch.setattr(shifterimg, "_client", broken)
    assert shifterimg.main(["-v"] * verbose + ["images"]) == 1
    err = capsys.readouterr().err
    if verbose:
        assert "Traceback" in err and err.rstrip().endswith("internal error: KeyError: 'boom'")
    else:
        assert err == "shifterimg: internal error: KeyError: 'boom' (run with -v for details)\n"


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_proxy_without_its_gateway_counts_as_unreachable(status):
    """A gateway behind a reverse proxy that is down: images in the store keep working."""
    from shifter_core._httpx import httpx
    from shifter_core.client import GatewayClient

    def proxy(request):
        return httpx.Response(status, text="<html>Bad Gateway</html>")

    transport = httpx.MockTransport(proxy)
    client = GatewayClient("http://gw.test", encoder=lambda p: "x", transport=transport)
    with client, pytest.raises(GatewayUnreachable, match=f"HTTP {status} from a proxy"):
        client.lookup("busybox")
