"""Job directory names (what slurmstepd uses to find a job's root)."""

import pytest

from shifter_core.jobroot import JobDirectoryError, job_dir


def test_job_directories_are_one_component_each():
    assert job_dir("/run/shifter", "n1", "42") == "/run/shifter/n1/42"
    for node, job in [("..", "1"), (".", "1"), ("n1", "../x"), ("a/b", "1"), ("n1", "")]:
        with pytest.raises(JobDirectoryError):
            job_dir("/run/shifter", node, job)
