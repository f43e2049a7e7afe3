"""Pull on demand at submission (issue 11): ``submit.resolve_image`` pulls a name the gateway
does not have, where the site and the user allow it; ``--image-pull`` and its option table."""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cffi
import pytest

from shifter_core import client as client_module
from shifter_core import config
from shifter_core.errors import ShifterError
from shifter_core.gateway.errors import GatewayError
from shifter_core.gateway.models import JobInfo, JobState
from shifter_core.image.registry.credentials import CredentialStore
from shifter_core.slurm import api, submit
from shifter_core.slurm.names import OPT_IMAGE_PULL, OPTION_NAMES
from shifter_core.slurm.state import state

SHIM = Path(__file__).resolve().parents[2] / "spank" / "shifter_spank.c"
IMAGE_ID = "ab" * 32
NOT_FOUND = (
    "image 'docker:new:1' not found on the image gateway; pull it first: "
    "shifterimg pull docker:new:1"
)


class FakeSlurm:
    """The shim's ``lib`` as :mod:`.api` uses it in srun: records (function, line)."""

    S_CTX_LOCAL, S_CTX_ALLOCATOR, S_CTX_REMOTE = 1, 2, 3

    def __init__(self) -> None:
        self.ffi = cffi.FFI()
        self.lines: list[tuple[str, str]] = []

    def spank_context(self) -> int:
        return self.S_CTX_LOCAL

    def _recorder(name: str) -> Callable[[FakeSlurm, bytes, Any], None]:
        def record(self: FakeSlurm, _fmt: bytes, text: Any) -> None:
            self.lines.append((name, self.ffi.string(text).decode()))

        return record

    slurm_error = _recorder("error")
    slurm_info = _recorder("info")
    slurm_verbose = _recorder("verbose")
    slurm_debug = _recorder("debug")

    def said(self, level: str = "info") -> list[str]:
        return [text for kind, text in self.lines if kind == level]


class FakeGateway:
    """The gateway as :class:`~shifter_core.client.GatewayClient` shows it: one image it
    does not have (``lookup`` answers ``lookup_error``), a pull that goes through
    ``states``."""

    def __init__(self) -> None:
        self.lookup_error: GatewayError | None = GatewayError(NOT_FOUND, status=404)
        self.states = [JobState.PULLING, JobState.CONVERTING, JobState.READY]
        self.message = ""
        self.pulls: list[tuple[str, dict[str, str] | None]] = []
        self.users: list[object] = []

    def job(self, state: JobState) -> JobInfo:
        final = state in (JobState.READY, JobState.FAILED)
        return JobInfo(
            "job1",
            state,
            reference="docker.io/library/new:1",
            platform="linux/amd64",
            message=self.message if state == JobState.FAILED else "",
            image_id=IMAGE_ID if state == JobState.READY else None,
            finished=1.0 if final else None,
        )

    def client(self, url: str, *, timeout: float = 30.0, gateway_user: object = None) -> Any:
        gateway = self
        gateway.users.append(gateway_user)

        class Client:
            def __enter__(self) -> Client:
                return self

            def __exit__(self, *exc: object) -> None:
                pass

            def lookup(self, reference: str) -> Any:
                if gateway.lookup_error is not None:
                    raise gateway.lookup_error
                return SimpleNamespace(id=IMAGE_ID)

            def pull(self, reference: str, *, secret: dict[str, str] | None = None) -> JobInfo:
                gateway.pulls.append((reference, secret))
                return gateway.job(JobState.PENDING)

            def wait(
                self, job_id: str, on_update: Callable[[JobInfo], None], **_: object
            ) -> JobInfo:
                assert job_id == "job1"
                for job_state in gateway.states:
                    last = gateway.job(job_state)
                    on_update(last)
                return last

        return Client()


@pytest.fixture
def slurm(monkeypatch: pytest.MonkeyPatch) -> FakeSlurm:
    fake = FakeSlurm()
    monkeypatch.setattr(api, "_ffi", fake.ffi)
    monkeypatch.setattr(api, "_lib", fake)
    return fake


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch) -> FakeGateway:
    fake = FakeGateway()
    monkeypatch.setattr(client_module, "GatewayClient", fake.client)
    return fake


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """The plugin's state for one submission; call it with extra YAML for the site."""

    def configure(extra: str = "", gateway: str = "") -> None:
        text = f"image_path: {tmp_path / 'images'}\ngateway:\n  url: http://gw:1\n{gateway}{extra}"
        monkeypatch.setattr(state, "config", config.parse(text, "t.yaml"))

    (tmp_path / "images").mkdir()
    (tmp_path / "run").mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))  # the user's name cache
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "conf"))  # registry credentials
    monkeypatch.delenv("SHIFTER_IMAGEREQUEST", raising=False)
    monkeypatch.setattr(submit, "image_pull", None)
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    configure()
    yield configure


def test_a_name_the_gateway_does_not_have_is_pulled_and_its_id_used(site, slurm, gateway):
    assert submit.resolve_image("docker:new:1") == IMAGE_ID
    assert gateway.pulls == [("new:1", None)]
    # Plain lines the user sees without -v (Slurm's info), one per state, then the result.
    assert slurm.said("info") == [
        "shifter: new:1: pulling docker.io/library/new:1 (linux/amd64), gateway job job1",
        "shifter: new:1: PENDING",
        "shifter: new:1: PULLING",
        "shifter: new:1: CONVERTING",
        f"shifter: image new:1 pulled: {IMAGE_ID[:12]}",
    ]
    assert slurm.said("error") == []
    # Once the gateway has it, a submission looks it up: no pull.
    gateway.lookup_error = None
    assert submit.resolve_image("docker:new:1") == IMAGE_ID
    assert len(gateway.pulls) == 1


def test_a_failed_pull_fails_the_submission_with_the_gateways_message(site, slurm, gateway):
    gateway.states = [JobState.PULLING, JobState.FAILED]
    gateway.message = "image 'new:1' not found in registry docker.io; check the name and the tag"
    with pytest.raises(ShifterError) as err:
        submit.resolve_image("docker:new:1")
    assert str(err.value) == f"cannot pull image new:1: {gateway.message}"
    assert not any("pulled" in line for line in slurm.said())


def test_image_pull_never_keeps_the_refusal_with_its_hint(site, slurm, gateway):
    submit.handle_option(OPT_IMAGE_PULL, "never")
    with pytest.raises(GatewayError, match="pull it first: shifterimg pull docker:new:1"):
        submit.resolve_image("docker:new:1")
    assert gateway.pulls == []


def test_the_site_can_turn_pulls_at_submission_off(site, slurm, gateway):
    site("slurm:\n  pull_on_submit: false\n")
    with pytest.raises(GatewayError, match="pull it first"):
        submit.resolve_image("docker:new:1")
    submit.handle_option(OPT_IMAGE_PULL, "missing")  # a user cannot turn them back on
    with pytest.raises(ShifterError, match=r"does not pull images .*slurm\.pull_on_submit"):
        submit.resolve_image("docker:new:1")
    assert gateway.pulls == []


@pytest.mark.parametrize(
    "request_, status",
    [("id:" + "cd" * 32, 404), ("docker:new:1", 403), ("docker:new:1", 400)],
)
def test_only_names_the_gateway_does_not_have_are_pulled(site, slurm, gateway, request_, status):
    gateway.lookup_error = GatewayError("refused", status=status)
    with pytest.raises(GatewayError, match="refused"):
        submit.resolve_image(request_)
    assert gateway.pulls == []


def test_stored_registry_credentials_go_with_the_pull_to_the_gateways_user(
    site, slurm, gateway, tmp_path
):
    CredentialStore().set("docker.io", "alice", "s3cret")
    site(gateway="  user: gwuser\n")
    assert submit.resolve_image("docker:new:1") == IMAGE_ID
    secret = {"registry": "docker.io", "username": "alice", "password": "s3cret"}
    assert gateway.pulls == [("new:1", secret)]
    assert gateway.users == ["gwuser"]


def test_on_a_terminal_progress_is_a_live_display(site, slurm, gateway, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert submit.resolve_image("docker:new:1") == IMAGE_ID
    # The state is on the display, not in lines; the pull's start and result are lines.
    assert [line.split(": ")[-1] for line in slurm.said()][1:] == [f"{IMAGE_ID[:12]}"]
    assert "new:1" in terminal.getvalue()


@pytest.mark.parametrize("value, mode", [("never", "never"), (" Missing ", "missing")])
def test_image_pull_values(site, value, mode):
    submit.handle_option(OPT_IMAGE_PULL, value)
    assert submit.image_pull == mode


def test_an_unknown_image_pull_value_is_refused(site):
    with pytest.raises(ShifterError, match=r"unknown value 'sometimes'; give missing or never"):
        submit.handle_option(OPT_IMAGE_PULL, "sometimes")


def test_the_option_numbers_are_the_shims():
    """Every option of the shim's table has the number and name of :mod:`.names`."""
    text = SHIM.read_text()
    enum = dict(re.findall(r"(OPT_[A-Z_]+) = (\d+)", text))
    table = re.findall(r'\{"([a-z-]+)", "[^"]*",[^{}]*?(OPT_[A-Z_]+),\s*option_cb\}', text)
    assert {int(enum[val]): name for name, val in table} == OPTION_NAMES
    assert [int(enum[val]) for _, val in table] == list(range(len(table)))  # val = index


def test_pulls_at_submission_are_on_by_default():
    assert config.parse("", "t.yaml").slurm.pull_on_submit is True
    text = "slurm:\n  pull_on_submit: false\n"
    assert config.parse(text, "t.yaml").slurm.pull_on_submit is False
