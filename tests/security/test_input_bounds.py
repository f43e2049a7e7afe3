"""Bounds on input (issue 9, deliverable 3), tried as an ordinary user against the box.

- Hostile ``--volume``, ``--module`` and ``--image`` values: a clear one-line error, no
  traceback, no drained node.
- An image whose ``/etc/passwd`` and ``/etc/group`` hold what a hostile author can put there
  (ids in superscript and Arabic-Indic digits, a 5000-digit uid, NULs, other line
  separators, a 200 kB line, an entry with alice's uid): ``shifter`` and ``srun --image``
  run it, the container's files hold the image's sane entries and alice's own, and no node
  is drained. On the old code the ``²`` uid raised ValueError (tests/unit/
  test_image_content_fuzz.py shows it), failing the prolog and draining the node.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import pwd
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.slurm import USER, run_as

HOSTILE_PASSWD = "\n".join(
    [
        "root:x:0:0:root:/root:/bin/sh",
        "evil1:x:²:0::/:/bin/sh",
        "evil2:x:" + "9" * 5000 + ":0::/:/bin/sh",
        "evil3:x:١٠٠٠:0::/:/bin/sh",
        "evil4\0:x:5:5::/:/bin/sh",
        "evil5:x:6:6::/:/bin/sh\x1cevil6:x:0:0::/:/bin/sh",
        "evil7:x:7:7:" + "g" * 200_000 + ":/:/bin/sh",
        "evil8:x:{uid}:0:not alice:/:/bin/sh",
        "+evil9::::::",
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false",
        "",
    ]
)
HOSTILE_GROUP = "\n".join(
    [
        "root:x:0:",
        "evil1:x:²:",
        "evil2:x:" + "9" * 5000 + ":",
        "evil3:x:١٠٠:",
        "evil4\0:x:101:",
        "evil5:x:102:" + ",".join(f"u{i}" for i in range(30_000)),
        "staff:x:50:",
        "",
    ]
)


def ours(stderr: str) -> list[str]:
    """Shifter's lines of stderr (srun also echoes a refused option whole, in its own line)."""
    mine = ("shifter:", "srun: error: shifter:")
    return [line for line in stderr.splitlines() if line.startswith(mine)]


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    for stream in (result.stdout, result.stderr):
        assert "Traceback" not in stream, stream
        assert 'File "' not in stream, stream


def assert_no_node_drained(box) -> None:
    states = box.module.node_states(box.module.PATHS, reasons=True)
    assert not [s for s in states.values() if "drain" in s.lower()], states


def _blob(layout: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return f"sha256:{digest}"


def _layer(files: dict[str, str]) -> tuple[bytes, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, text in files.items():
            data = text.encode("utf-8", "surrogateescape")
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(tar_bytes)
    return out.getvalue(), "sha256:" + hashlib.sha256(tar_bytes).hexdigest()


def build_layout(
    base: Path, dest: Path, files: dict[str, str], config_changes: dict[str, object]
) -> Path:
    """The box's busybox layout plus a layer of ``files``, its config's ``config`` mapping
    updated with ``config_changes``."""
    shutil.copytree(base, dest)
    index = json.loads((dest / "index.json").read_text())
    blobs = dest / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"][7:]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"][7:]).read_text())
    config["config"].update(config_changes)
    blob, diff_id = _layer(files)
    manifest["layers"].append(
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": _blob(dest, blob),
            "size": len(blob),
        }
    )
    config["rootfs"]["diff_ids"].append(diff_id)
    config_bytes = json.dumps(config).encode()
    manifest["config"] = {
        "mediaType": manifest["config"]["mediaType"],
        "digest": _blob(dest, config_bytes),
        "size": len(config_bytes),
    }
    manifest_bytes = json.dumps(manifest).encode()
    index["manifests"] = [
        {
            "mediaType": manifest["mediaType"],
            "digest": _blob(dest, manifest_bytes),
            "size": len(manifest_bytes),
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }
    ]
    (dest / "index.json").write_text(json.dumps(index))
    return dest


def push_layout(box, layout: Path, repo: str) -> None:
    """Push as the box seeds its mirror: through the authenticated endpoint, as root."""
    subprocess.run(
        [
            "skopeo", "--policy", str(box.root / "etc" / "policy.json"), "copy", "--quiet",
            "--dest-tls-verify=false", "--dest-authfile",
            str(box.module.PATHS.registry_authfile),
            f"oci:{layout}:latest", f"docker://{box.module.REGISTRY_PUSH_ADDR}/{repo}:latest",
        ],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def delete_from_registry(box, repo: str) -> None:
    digest = box.module.registry_digest(repo, "latest")
    if digest:
        user, password = box.module.push_credentials()
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        box.module.http_get(
            f"http://{box.module.REGISTRY_PUSH_ADDR}/v2/{repo}/manifests/{digest}",
            method="DELETE",
            headers={"Authorization": f"Basic {basic}"},
        )


@contextlib.contextmanager
def pushed_image(
    box, prefix: str, files: dict[str, str], config_changes: dict[str, object]
) -> Iterator[str]:
    """An image in the box's docker.io mirror; yields the name users pull it by."""
    base = box.root / "cache" / "oci" / "busybox"
    if not (base / "index.json").exists():
        pytest.skip("the box has no busybox layout (tools/images/build.py)")
    name = f"shifter-security-{prefix}-{uuid.uuid4().hex[:8]}"
    work = Path(tempfile.mkdtemp(prefix="shifter-bounds-", dir="/var/tmp"))
    try:
        # Content of its own: the same content under another name is the same image (one id,
        # one store record, whose source is the first name pulled).
        files = {**files, "etc/shifter-test-name": name}
        layout = build_layout(base, work / "layout", files, config_changes)
        push_layout(box, layout, f"library/{name}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        yield name
    finally:
        delete_from_registry(box, f"library/{name}")


@pytest.fixture(scope="module")
def hostile_image(box) -> Iterator[str]:
    """The name alice pulls (through the box's docker.io mirror) of the hostile image."""
    uid = pwd.getpwnam(USER).pw_uid
    files = {"etc/passwd": HOSTILE_PASSWD.replace("{uid}", str(uid)), "etc/group": HOSTILE_GROUP}
    with pushed_image(box, "passwd", files, {}) as name:
        pull = run_as(["shifterimg", "pull", name], timeout=600)
        no_traceback(pull)
        assert pull.returncode == 0, pull.stderr
        yield name


SHOW = "cat /etc/passwd; echo ---; cat /etc/group; echo ---; id -un; id -u"


def _check_identity(out: str) -> None:
    passwd, group, ident = out.split("---\n")
    uid = pwd.getpwnam(USER).pw_uid
    assert "evil" not in passwd and "evil" not in group
    assert passwd.startswith("root:x:0:0:root:/root:/bin/sh\n")
    assert "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n" in passwd
    assert f"\n{USER}:x:{uid}:" in passwd
    assert sum(line.split(":")[2] == str(uid) for line in passwd.splitlines()) == 1
    assert "staff:x:50:\n" in group
    assert ident.split() == [USER, str(uid)]


def test_shifter_runs_an_image_with_a_hostile_passwd(box, hostile_image):
    result = run_as(["shifter", f"--image={hostile_image}", "sh", "-c", SHOW], timeout=300)
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    _check_identity(result.stdout)


def test_srun_runs_an_image_with_a_hostile_passwd(box, hostile_image):
    result = run_as(
        ["srun", "-N1", "-t", "5", f"--image={hostile_image}", "sh", "-c", SHOW], timeout=600
    )
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    _check_identity(result.stdout)
    assert_no_node_drained(box)


HOSTILE_OPTIONS = [
    (["--volume", "/tmp:/data/" + "d" * 300], "longer than 255 bytes"),
    (["--volume", "/tmp:/" + "/".join(["d" * 200] * 25)], "longer than 4095 bytes"),
    (["--volume", ";".join(f"/tmp:/t{i}" for i in range(65))], "more than 64 volumes"),
    (["--volume", "/tmp:/data\x1b[2J"], "it contains the character"),
    (["--volume", "/tmp:/a\u202eb"], "it contains the character"),
    (
        ["--volume", ";".join(f"/tmp:/c{i}:perNodeCache=size=1G" for i in range(5))],
        "perNodeCache volumes",
    ),
    (["--volume", "/tmp:/x:perNodeCache=size=99999999999999T"], "invalid size"),
    (["--module", ",".join(f"m{i}" for i in range(40))], "more than 32 modules"),
]


@pytest.mark.parametrize("options, message", HOSTILE_OPTIONS)
def test_hostile_options_are_refused_with_a_clear_message(box, options, message):
    options = [f"{options[0]}={options[1]}"]  # srun's -V is --version
    for argv in (
        ["shifter", "--image=busybox", *options, "true"],
        ["srun", "-N1", "-t", "5", "--image=busybox", *options, "true"],
    ):
        result = run_as(argv, timeout=300)
        no_traceback(result)
        assert result.returncode != 0, (argv[0], result.stdout, result.stderr)
        assert message in result.stderr, (argv[0], result.stderr)
        # srun echoes a refused option itself; Shifter's own lines are escaped.
        assert not [line for line in ours(result.stderr) if not line.isprintable()]
        assert ours(result.stderr) and max(len(line) for line in ours(result.stderr)) < 1000
    assert_no_node_drained(box)


@pytest.mark.parametrize(
    "image, message",
    [("a" * 600, "longer than 512 characters"), ("busybox:١", "non-ASCII")],
)
def test_hostile_image_references_are_refused(box, image, message):
    for argv in (
        ["shifter", f"--image={image}", "true"],
        ["srun", "-N1", "-t", "5", f"--image={image}", "true"],
    ):
        result = run_as(argv, timeout=300)
        no_traceback(result)
        assert result.returncode != 0
        assert message in result.stderr, (argv[0], result.stderr)
        assert ours(result.stderr) and max(len(line) for line in ours(result.stderr)) < 1000
    assert_no_node_drained(box)


@pytest.mark.parametrize(
    "config_changes, message",
    [
        ({"Env": ["PATH=/bin", "EVIL=a\0b"]}, "contains a NUL character"),
        ({"WorkingDir": "/data\x1b[2J"}, "contains control or invisible characters"),
        ({"Cmd": ["x" * 200_000]}, "is longer than 131072 characters"),
    ],
)
def test_a_pull_of_a_hostile_config_fails_with_a_clear_message(box, config_changes, message):
    with pushed_image(box, "config", {"etc/hostile": "1\n"}, config_changes) as name:
        pull = run_as(["shifterimg", "pull", name], timeout=600)
        no_traceback(pull)
        assert pull.returncode != 0, pull.stdout
        assert message in pull.stderr, pull.stderr
        assert not [line for line in pull.stderr.splitlines() if not line.isprintable()]
        assert max(len(line) for line in pull.stderr.splitlines()) < 1000


def test_a_relative_workdir_is_taken_from_the_root(box):
    with pushed_image(
        box, "workdir", {"app/run/marker": "here\n"}, {"WorkingDir": "app/run"}
    ) as name:
        pull = run_as(["shifterimg", "pull", name], timeout=600)
        assert pull.returncode == 0, pull.stderr
        result = run_as(["shifter", f"--image={name}", "--workdir", "cat", "marker"])
        no_traceback(result)
        assert result.returncode == 0 and result.stdout == "here\n", result.stderr


@contextlib.contextmanager
def small_node_cache(box, node: str) -> Iterator[Path]:
    """The node's image cache replaced by an empty 2 MiB tmpfs for the duration."""
    config = box.shifter_config.read_text()
    line = next(x for x in config.splitlines() if x.strip().startswith("node_cache:"))
    cache = Path(line.split(":", 1)[1].strip().replace("%n", node))
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(cache)], check=True
    )
    try:
        yield cache
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=True)


def test_a_full_node_cache_fails_the_staging_not_the_node(box):
    """ENOSPC in the node cache: the prolog records the job's error with the reason (the
    job then fails with it, or runs from a root of its own, as the steps decide), the node
    stays up and the cache holds no partial copy afterwards."""
    pull = run_as(["shifterimg", "pull", "mpich-hello"], timeout=600)
    assert pull.returncode == 0, pull.stderr  # 46 MB: far more than the cache can hold
    node = box.nodes[-1]
    log = box.log_dir / f"slurmd-{node}.log"
    with small_node_cache(box, node) as cache:
        srun = ["srun", "-w", node, "-N1", "-t", "5", "--image=mpich-hello"]
        result = run_as([*srun, "sh", "-c", "echo job=$SLURM_JOB_ID"], timeout=300)
        no_traceback(result)
        if result.returncode == 0:
            job = result.stdout.split("job=")[1].split()[0]
            lines = [x for x in log.read_text().splitlines() if f"job {job} on {node}" in x]
            assert any("not enough space" in x for x in lines), lines
        else:
            assert "not enough space" in result.stderr, result.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any((cache / "holds").glob("*/*")):
            time.sleep(0.5)
        left = sorted(p.name for p in cache.rglob("*") if p.is_file())
        assert left in ([".lock"], [".lock", "stats.json"]), left
        assert list((cache / "holds").glob("*/*")) == []
    assert_no_node_drained(box)
