"""The node check's pieces against files of the test's own (the whole check runs on the box
in tests/integration/test_doctor.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shifter_core import doctor
from shifter_core.doctor import ERROR, OK, Node

CHECKOUT = Path(__file__).resolve().parents[2]


def _fake_proc(tmp_path: Path, filesystems: str, max_userns: str = "100") -> Path:
    proc = tmp_path / "proc"
    (proc / "sys" / "user").mkdir(parents=True)
    (proc / "filesystems").write_text(filesystems)
    (proc / "sys" / "user" / "max_user_namespaces").write_text(max_userns + "\n")
    return proc


def test_missing_kernel_file_systems_are_each_one_error_with_the_module(tmp_path):
    proc = _fake_proc(tmp_path, "nodev\tsysfs\nnodev\toverlay\n\text4\n")
    found = list(doctor.kernel_filesystems(Node(proc=str(proc))))
    assert [(f.level, f.message, f.hint) for f in found if f.level != OK] == [
        (ERROR, "no squashfs file system", "modprobe squashfs"),
        (ERROR, "no fuse file system", "modprobe fuse"),
    ]


def test_user_namespaces_disabled(tmp_path):
    proc = _fake_proc(tmp_path, "", max_userns="0")
    (finding,) = doctor.user_namespaces(Node(proc=str(proc)))
    assert finding.level == ERROR and "max_user_namespaces" in finding.hint


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
@pytest.mark.parametrize("mode, level", [(0o666, OK), (0o600, ERROR), (0o660, ERROR)])
def test_dev_fuse_mode(tmp_path, mode, level):
    os.mknod(tmp_path / "fuse", stat.S_IFCHR | mode, os.makedev(10, 229))
    os.chmod(tmp_path / "fuse", mode)
    (finding,) = doctor.dev_fuse(Node(dev=str(tmp_path)))
    assert finding.level == level
    if level == ERROR:
        assert f"mode {mode:04o}" in finding.message and "chmod 0666" in finding.hint


def test_plugstack_from_slurm_conf(tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\n PlugStackConfig = /etc/slurm/spank.conf # here\n")
    assert doctor.plugstack_path(str(conf)) == "/etc/slurm/spank.conf"
    conf.write_text("ClusterName=x\n#PlugStackConfig=/nowhere\n")
    assert doctor.plugstack_path(str(conf)) == str(tmp_path / "plugstack.conf")


def test_plugin_version_is_read_from_the_shim():
    shim = CHECKOUT / "build" / "shifter_spank.so"
    if not shim.exists():
        pytest.skip("the shim is not built (make plugin)")
    version = doctor.plugin_version(str(shim))
    assert version is not None and version >> 16 >= 20  # Slurm 20.x or later
    running = doctor.slurm_version()
    if running is not None:
        assert (version >> 16 & 0xFF, version >> 8 & 0xFF) == running


def test_a_plugstack_without_the_shim(tmp_path):
    (tmp_path / "slurm.conf").write_text("ClusterName=x\n")
    (tmp_path / "plugstack.conf").write_text("required /usr/lib/other.so\n")
    (finding,) = doctor.spank_plugin(Node(slurm_conf=str(tmp_path / "slurm.conf")))
    assert finding.level == ERROR and "does not list shifter_spank.so" in finding.message


def test_a_configuration_with_an_unknown_key(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the configuration must be root's")
    config = tmp_path / "shifter.yaml"
    config.write_text("image_path: /var/lib/shifter\nruntime:\n  no_such_key: 1\n")
    finding, loaded = doctor.configuration(Node(config=str(config)))
    assert loaded is None and finding.level == ERROR
    assert "no_such_key" in finding.message and str(config) in finding.message
