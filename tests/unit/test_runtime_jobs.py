"""Job directories and their record (the one matching rule), the mount table, the shipped
module examples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shifter_core import config
from shifter_core.jobroot import (
    RECORD_FILE,
    JobDirectoryError,
    current_job,
    job_dir,
    read_record,
    root_key,
    write_record,
)
from shifter_core.mounts import mounts_under, read_mounts
from shifter_core.runtime.errors import ContainerError
from shifter_core.runtime.userns import MAX_EXTENTS, id_map

MODULES_DIR = Path(__file__).resolve().parents[2] / "slurm_conf" / "modules"


def test_job_dir_names_are_checked():
    assert job_dir("/run/shifter", "n1", "42") == "/run/shifter/n1/42"
    for node, job in [("..", "1"), ("n1", "../x"), ("a/b", "1"), ("n1", "")]:
        with pytest.raises(JobDirectoryError):
            job_dir("/run/shifter", node, job)


def test_current_job():
    assert current_job({"SLURMD_NODENAME": "n1", "SLURM_JOB_ID": "7"}) == ("n1", "7")
    assert current_job({"SLURM_JOB_ID": "7"}) is None
    assert current_job({"SLURMD_NODENAME": "../n", "SLURM_JOB_ID": "7"}) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="records are trusted only when root's")
def test_records_are_trusted_only_when_roots(tmp_path):
    tmp_path.chmod(0o755)
    request = {"uid": 1001, "gid": 1002, "image_id": "a" * 64, "volume": "/a:/b", "module": ""}
    path = write_record(str(tmp_path), root="/r", loop_devices=[], **request)
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    record = read_record(str(tmp_path))
    assert record is not None and record.root == "/r" and record.uid == 1001
    assert record.userns is None and record.error == ""
    # the one rule: uid, gid, image, canonical volumes and modules, --writable-tmpfs
    assert record.serves(root_key(1001, 1002, "a" * 64, "/a:/b", ""))
    for other in (
        root_key(1003, 1002, "a" * 64, "/a:/b", ""),
        root_key(1001, 1002, "b" * 64, "/a:/b", ""),
        root_key(1001, 1002, "a" * 64, "", ""),
        root_key(1001, 1002, "a" * 64, "/a:/b", "gpu"),
        root_key(1001, 1002, "a" * 64, "/a:/b", "", writable=True),
    ):
        assert not record.serves(other)
    # a record with the job's error serves nothing
    write_record(str(tmp_path), error="the image is gone", **request)
    failed = read_record(str(tmp_path))
    assert failed is not None and failed.error == "the image is gone"
    assert not failed.serves(root_key(1001, 1002, "a" * 64, "/a:/b", ""))
    os.chmod(path, 0o666)
    assert read_record(str(tmp_path)) is None
    os.chmod(path, 0o644)
    os.chown(path, 1001, 0)
    assert read_record(str(tmp_path)) is None
    os.chown(path, 0, 0)
    Path(path).write_bytes(b"not marshal")
    assert read_record(str(tmp_path)) is None
    assert read_record(str(tmp_path / "missing")) is None
    assert Path(path).name == RECORD_FILE


def test_id_map_maps_each_id_to_itself_in_merged_ranges():
    assert id_map([1002, 1001]) == "1001 1001 2\n"
    assert id_map((100, 5, 7, 6, 100, 300)) == "5 5 3\n100 100 1\n300 300 1\n"
    assert id_map(list(range(0, 2 * MAX_EXTENTS, 2))).count("\n") == MAX_EXTENTS
    with pytest.raises(ContainerError, match="at most"):
        id_map(list(range(0, 2 * MAX_EXTENTS + 2, 2)))


def test_mountinfo(tmp_path):
    sample = tmp_path / "mountinfo"
    sample.write_text(
        "22 1 0:21 / / rw - ext4 /dev/vda rw\n"
        "30 22 0:30 / /run/x\\040y rw,nosuid - tmpfs tmpfs rw\n"
        "31 30 0:31 / /run/x\\040y/root ro - overlay overlay rw,lowerdir=/a\n"
        "32 31 0:32 / /run/x\\040y/root/proc rw - proc proc rw\n"
    )
    assert [m.target for m in read_mounts(str(sample))][1] == "/run/x y"
    under = mounts_under("/run/x y/root", str(sample))
    assert [m.target for m in under] == ["/run/x y/root/proc", "/run/x y/root"]
    assert mounts_under("/run/x", str(sample)) == []
    assert read_mounts()  # this process's own table parses


@pytest.mark.parametrize("name", ["gpu", "mpich", "infiniband", "aries", "slingshot"])
def test_module_examples_are_valid(name):
    path = MODULES_DIR / f"{name}.yaml"
    cfg = config.parse(path.read_text(), str(path))
    module = cfg.modules[name]
    assert module.description
    assert module.env.prepend.get("LD_LIBRARY_PATH", "").startswith("/opt/udiImage/modules/")


def test_module_examples_combine():
    text = "modules:\n"
    for path in sorted(MODULES_DIR.glob("*.yaml")):
        body = path.read_text().split("modules:\n", 1)[1]
        text += body
    cfg = config.parse(text, "all.yaml")
    assert set(cfg.modules) == {"gpu", "mpich", "infiniband", "aries", "slingshot"}
    assert "slingshot" in cfg.modules["aries"].conflicts
