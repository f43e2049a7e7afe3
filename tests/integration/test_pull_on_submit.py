"""Pull on demand (issue 11): ``sbatch``/``salloc``/``srun --image=NAME`` for an image the
gateway does not have pulls it, waits, then submits; ``--image-pull=never`` opts out.

Each test pushes an image of its own (busybox as ``cat`` and ``sh``, and a marker file) to the
box registry under a fresh name, so the gateway has never seen it.
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from subprocess import Popen

import pytest

from tests.fixtures.registries import OCILayout, make_layer, random_layer, skopeo_copy

from .conftest import load_box_module
from .slurm import OTHER_USER, USER, jobs_named, run_as, unique_name, user_env

pytestmark = pytest.mark.usefixtures("box")

BUSYBOX = Path("/bin/busybox")
PULLED = re.compile(r"gateway job ([0-9a-f]+)")


def push_image(*, padding: int = 0) -> tuple[str, str]:
    """A new image in the box registry: its name (docker.io/library/NAME through the box's
    mirror) and the text of its /marker; ``padding`` bytes of random data slow its pull."""
    name = f"pos-{uuid.uuid4().hex[:10]}"
    marker = f"marker of {name}"
    layout = OCILayout(Path(tempfile.mkdtemp(prefix="shifter-pos-")))
    try:
        busybox = BUSYBOX.read_bytes()
        layers = [
            make_layer(
                {
                    "bin/busybox": busybox,
                    "bin/cat": busybox,
                    "bin/sh": busybox,
                    "marker": marker + "\n",
                },
                executable={"bin/busybox", "bin/cat", "bin/sh"},
            )
        ]
        if padding:
            layers.append(random_layer(padding, seed=int(name[4:], 16)))
        layout.tag("latest", layout.add_image(layers))
        box = load_box_module()  # the mirror is read-only: push through its authenticated end
        skopeo_copy(
            layout,
            "latest",
            f"{box.REGISTRY_PUSH_ADDR}/library/{name}:latest",
            creds=box.push_credentials(),
        )
    finally:
        shutil.rmtree(layout.path, ignore_errors=True)
    return name, marker


def lookup(name: str, user: str = USER) -> subprocess.CompletedProcess[str]:
    return run_as(["shifterimg", "lookup", name], user=user)


def gateway_jobs_for(name: str) -> list[dict[str, object]]:
    """Every gateway job (of any user: root is an admin of the box's gateway) for ``name``."""
    env = {**user_env(), "HOME": "/root"}
    result = subprocess.run(
        ["shifterimg", "status", "--json"], capture_output=True, text=True, env=env, check=True
    )
    reference = f"docker.io/library/{name}:latest"
    return [j for j in json.loads(result.stdout) if j["reference"] == reference]


def test_srun_pulls_an_image_the_gateway_does_not_have_then_runs_it():
    name, marker = push_image()
    assert lookup(name).returncode != 0  # not in the store yet
    result = run_as(["srun", "-N3", f"--image={name}", "cat", "/marker"], timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [marker] * 3
    # Not a terminal: plain lines, one per state change, then the image it got.
    assert f"srun: shifter: {name}: pulling docker.io/library/{name}:latest" in result.stderr
    assert f"srun: shifter: {name}: PULLING" in result.stderr
    image_id = lookup(name).stdout.strip()
    assert f"image {name} pulled: {image_id[:12]}" in result.stderr
    assert "Traceback" not in result.stderr
    [job] = gateway_jobs_for(name)
    assert job["state"] == "READY" and job["image_id"] == image_id


def test_sbatch_pulls_before_submitting_and_the_job_uses_it():
    name, marker = push_image()
    out = Path(tempfile.mkdtemp(prefix="shifter-pos-out-"))
    out.chmod(0o777)
    try:
        result = run_as(
            [
                "sbatch",
                "--wait",
                "-o",
                str(out / "job.out"),
                f"--image={name}",
                "--wrap",
                f"srun --image={name} cat /marker",
            ],
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert f"sbatch: shifter: {name}: pulling docker.io/library/{name}:latest" in result.stderr
        assert (out / "job.out").read_text().splitlines() == [marker]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_a_failed_pull_fails_srun_with_the_gateways_message_and_no_job():
    name, job_name = f"pos-missing-{uuid.uuid4().hex[:10]}", unique_name("pos")
    result = run_as(["srun", "-J", job_name, f"--image={name}", "true"], timeout=300)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("srun: error: shifter")]
    assert errors, result.stderr
    # One line: the gateway's own reason (the mirror does not have it) for this name.
    assert f"srun: error: shifter: cannot pull image {name}: " in errors[0]
    assert f"image '{name}:latest' not found in registry docker.io" in errors[0]
    assert "Traceback" not in result.stderr
    assert jobs_named(job_name) == []
    [job] = gateway_jobs_for(name)
    assert job["state"] == "FAILED"


@pytest.mark.parametrize("command", ["srun", "sbatch"])
def test_image_pull_never_refuses_as_before_with_a_hint_to_pull(command):
    name, _ = push_image()
    job_name = unique_name("pos")
    argv = [command, "-J", job_name, "--image-pull=never", f"--image={name}"]
    result = run_as([*argv, *(["true"] if command == "srun" else ["--wrap", "true"])])
    assert result.returncode != 0
    assert f"image 'docker:{name}' not found on the image gateway" in result.stderr
    assert f"pull it first: shifterimg pull docker:{name}" in result.stderr
    assert jobs_named(job_name) == []
    assert gateway_jobs_for(name) == []  # nothing was pulled
    assert lookup(name).returncode != 0


def test_the_sruns_of_a_job_inherit_its_image_pull():
    name, _ = push_image()
    out = Path(tempfile.mkdtemp(prefix="shifter-pos-out-"))
    out.chmod(0o777)
    try:
        script = f"srun --image={name} true; echo srun exited $?"
        argv = ["sbatch", "--wait", "-o", str(out / "job.out"), "--image-pull=never"]
        result = run_as([*argv, "--wrap", script], timeout=300)
        assert result.returncode == 0, result.stderr
        text = (out / "job.out").read_text()
        assert f"pull it first: shifterimg pull docker:{name}" in text
        assert "srun exited 1" in text
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert gateway_jobs_for(name) == []


def test_image_pull_takes_missing_or_never_only():
    result = run_as(["srun", "--image-pull=sometimes", "--image=busybox", "true"])
    assert result.returncode != 0
    assert "--image-pull: unknown value 'sometimes'" in result.stderr
    assert "missing or never" in result.stderr
    ok = run_as(["srun", "-N1", "--image-pull=missing", "--image=busybox", "true"])
    assert ok.returncode == 0, ok.stderr


def test_srun_help_lists_image_pull():
    result = run_as(["srun", "--help"])
    assert "--image-pull=missing|never" in result.stdout


def start_as(user: str, argv: list[str], stderr: int = subprocess.PIPE, **env: str) -> Popen:
    """Start ``argv`` as ``user``, in a process group of its own (see :func:`finish`)."""
    environ = [f"{k}={v}" for k, v in user_env(**env).items()]
    return subprocess.Popen(
        ["runuser", "-u", user, "--", "env", "-i", *environ, *argv],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        cwd="/tmp",
        start_new_session=True,
    )


def finish(procs: list[Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each; what still runs after ``timeout`` seconds is
    ended with its group (an srun waiting for its job cancels it)."""
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
    return results


def test_concurrent_sruns_of_a_new_image_share_one_pull():
    # Two users at once (a public pull is the same pull for everyone); 16 MB of padding
    # keeps the pull going while both ask.
    name, marker = push_image(padding=16 << 20)
    argv = ["srun", "-N1", f"--image={name}", "cat", "/marker"]
    results = finish([start_as(user, argv) for user in (USER, OTHER_USER)])
    for returncode, out, err in results:
        assert returncode == 0, err
        assert out.splitlines() == [marker]
    [job] = gateway_jobs_for(name)  # one pull
    waited = [m.group(1) for _, _, err in results if (m := PULLED.search(err))]
    assert waited == [job["id"], job["id"]], [err for _, _, err in results]


def test_on_a_terminal_srun_shows_a_progress_display():
    name, marker = push_image(padding=4 << 20)
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer is gone
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        argv = ["srun", "-N1", f"--image={name}", "cat", "/marker"]
        proc = start_as(USER, argv, stderr=slave, TERM="xterm", COLUMNS="100")
        [(returncode, out, _)] = finish([proc])
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert returncode == 0, shown
    assert out.splitlines() == [marker]
    assert "\x1b[" in shown  # a live display (rich), not plain lines
    assert f"{name}: pulling docker.io/library/{name}:latest" in shown
    assert f"image {name} pulled:" in shown
