"""Job directory names and Slurm host lists (what slurmstepd uses to find a job's root)."""

import pytest

from shifter_core.jobdirs import JobDirectoryError, expand_hostlist, job_dir


@pytest.mark.parametrize(
    "text, names",
    [
        ("n1", ["n1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("n[2-3],gpu07", ["n2", "n3", "gpu07"]),
        ("nid[001-003,010]", ["nid001", "nid002", "nid003", "nid010"]),
        ("a[8-10]", ["a8", "a9", "a10"]),
        ("", []),
    ],
)
def test_host_lists_expand_like_slurm(text, names):
    assert expand_hostlist(text) == names


def test_job_directories_are_one_component_each():
    assert job_dir("/run/shifter", "n1", "42") == "/run/shifter/n1/42"
    for node, job in [("..", "1"), (".", "1"), ("n1", "../x"), ("a/b", "1"), ("n1", "")]:
        with pytest.raises(JobDirectoryError):
            job_dir("/run/shifter", node, job)
