"""Jobs in containers on the box's cluster: submission, prolog, steps, MPI, epilog, leftovers.

Everything runs as the test users through the real plugin, gateway, munge and kernel mounts.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.registries import OCILayout, make_layer, skopeo_copy

from .conftest import load_box_module
from .slurm import (
    BOX,
    SLURM_CONF,
    jobs_named,
    run_as,
    slurmd_logs,
    unique_name,
    wait_for_idle_cluster,
)

pytestmark = pytest.mark.usefixtures("box")

RUN_DIR = Path("/run/shifter-box")  # runtime.run_dir of the box
NODE_CACHE = BOX / "cache" / "nodes"
STORE = BOX / "images"
BUSYBOX_TEXT = "shifter busybox test image"
NODES = ("n1", "n2", "n3")


def pull(image: str, user: str = "alice") -> str:
    result = run_as(["shifterimg", "pull", image], user=user, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_as(["shifterimg", "lookup", image], user=user).stdout.strip()


@pytest.fixture(scope="module", autouse=True)
def images() -> dict[str, str]:
    return {"busybox": pull("busybox"), "mpi": pull("mpich-hello")}


@pytest.fixture
def user_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="shifter-slurm-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sbatch(script: str, *options: str, output: Path, timeout: float = 300) -> str:
    """Run a batch job to its end (``--wait``); its output."""
    result = run_as(
        ["sbatch", "--wait", "-o", str(output), *options, "--wrap", script], timeout=timeout
    )
    text = output.read_text() if output.exists() else ""
    assert result.returncode == 0, result.stderr + text
    return text


def leftovers() -> list[str]:
    """Mounts, loop devices and job directories the plugin left behind."""
    found = []
    run_dir = str(RUN_DIR)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        if point.startswith(run_dir + "/"):
            found.append(f"mount {point}")
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        target = backing.read_text().strip()
        if target.startswith((str(NODE_CACHE), str(STORE))):
            found.append(f"loop {backing.parent.parent.name} -> {target}")
    found += [f"job dir {p}" for p in RUN_DIR.glob("*/*")]
    return found


def prepared_lines(job: str) -> list[str]:
    return re.findall(rf"prepared \S+/(n\d)/{job}/root ", slurmd_logs())


def test_srun_image_runs_tasks_in_the_container_on_three_nodes():
    result = run_as(["srun", "-N3", "--image=busybox", "cat", "/etc/shifter-test-image"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == [BUSYBOX_TEXT] * 3
    host = run_as(["srun", "-N3", "cat", "/etc/shifter-test-image"])
    assert host.returncode != 0 and "No such file" in host.stderr


def test_tasks_run_as_the_user_without_privilege():
    result = run_as(
        [
            "srun",
            "-N1",
            "--image=busybox",
            "sh",
            "-c",
            "id -u; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs)' /proc/self/status",
        ]
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert lines[0] == str(int(run_as(["id", "-u"]).stdout))
    status = dict(zip(lines[1::2], lines[2::2], strict=True))
    assert status == {
        "CapPrm:": "0000000000000000",
        "CapEff:": "0000000000000000",
        "CapBnd:": "0000000000000000",
        "NoNewPrivs:": "1",
    }


def test_batch_job_mounts_once_per_node_for_twenty_steps(user_tmp):
    name = unique_name("batch")
    script = (
        "for i in $(seq 20); do srun -N3 shifter cat /etc/shifter-test-image || exit 1; done\n"
        "srun -N3 --image=busybox cat /etc/shifter-test-image\n"
        "srun -N1 cat /etc/hostname\n"
    )
    output = sbatch(script, "-J", name, "-N3", "--image=busybox", output=user_tmp / "out")
    assert output.count(BUSYBOX_TEXT) == 63
    assert output.strip().endswith(os.uname().nodename)  # a plain srun stays on the host
    (job,) = jobs_named(name)
    assert sorted(prepared_lines(job)) == list(NODES)  # one root per node, for 21 steps


def test_shifter_in_a_job_shows_the_users_groups_by_their_gids(user_tmp):
    """`srun shifter` in a job made with --image (the fast path) joins the user namespace the
    prolog pinned for the job, in which all of alice's gids are mapped: her group 'science'
    keeps its gid instead of showing as the overflow gid 65534. The epilog unmounts it."""
    science = grp.getgrnam("science").gr_gid
    name = unique_name("groups")
    script = (
        "srun -N2 shifter -v --image=busybox id\n"
        f"srun -N2 sh -c 'findmnt -n -o FSTYPE {RUN_DIR}/$SLURMD_NODENAME/$SLURM_JOB_ID/userns'\n"
    )
    output = sbatch(script, "-J", name, "-N2", "--image=busybox", output=user_tmp / "out")
    assert output.count("entering the root prepared for this job") == 2, output
    ids = [line for line in output.splitlines() if line.startswith("uid=")]
    assert len(ids) == 2, output
    for line in ids:
        groups = line.partition(" groups=")[2].split(",")
        assert f"{science}(science)" in groups and not any("65534" in g for g in groups), line
    assert output.split().count("nsfs") == 2  # pinned on both nodes while the job ran
    (job,) = jobs_named(name)
    wait_for_idle_cluster()
    mounts = subprocess.run(
        ["findmnt", "-rn", "-o", "TARGET,FSTYPE"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert [m for m in mounts if m.startswith(f"{RUN_DIR}/") and f"/{job}/" in m] == []
    assert not any(str(job) in item for item in leftovers())


def test_shifter_in_a_job_is_replayed_by_the_launcher(user_tmp):
    """The second `srun shifter` of a job is the C launcher's: it enters the same prepared root
    and joins the same pinned user namespace, without Python."""
    science = grp.getgrnam("science").gr_gid
    name = unique_name("launch")
    script = (
        "export SHIFTER_LAUNCH_DEBUG=1\n"
        "for i in 1 2 3; do srun -N1 shifter sh -c 'id; cat /etc/shifter-test-image' 2>&1; done\n"
    )
    output = sbatch(script, "-J", name, "-N1", "--image=busybox", output=user_tmp / "out")
    runs = output.split("uid=")[1:]
    assert len(runs) == 3, output
    assert output.count("running the Python runtime") == 1, output  # the first one only
    assert runs[0] == runs[1] == runs[2], output
    assert f"{science}(science)" in runs[2] and "65534" not in runs[2]
    assert BUSYBOX_TEXT in runs[2]
    (job,) = jobs_named(name)
    wait_for_idle_cluster()
    assert not any(str(job) in item for item in leftovers())


def _shared_roots_prepared(job: str) -> list[tuple[str, str]]:
    """(step, node) of every step of ``job`` that prepared a shared root (slurmd's logs)."""
    pattern = rf"step {job}\.(\d+) on (n\d): prepared a root for the job's steps"
    return sorted(re.findall(pattern, slurmd_logs()))


def test_steps_with_another_image_or_volume_share_roots_of_the_job(user_tmp):
    """Steps asking for something else than the job share one root per request and node:
    the first prepares it, later steps with the same request enter it; the epilog removes
    them all."""
    (user_tmp / "data.txt").write_text("from the host\n")
    (user_tmp / "data.txt").chmod(0o644)
    name = unique_name("steps")
    script = (
        "srun -N2 --image=mpich-hello cat /etc/shifter-test-image\n"
        f"srun -N2 --image=busybox --volume={user_tmp}:/data cat /data/data.txt\n"
        "srun -N2 --image=busybox cat /etc/shifter-test-image\n"
        "srun -N2 --image=mpich-hello cat /etc/shifter-test-image\n"
        f"srun -N2 --image=busybox --volume={user_tmp}:/data cat /data/data.txt\n"
    )
    output = sbatch(script, "-J", name, "-N2", "--image=busybox", output=user_tmp / "out")
    mpi, data = ["shifter mpi test image"] * 2, ["from the host"] * 2
    assert output.splitlines() == mpi + data + [BUSYBOX_TEXT] * 2 + mpi + data
    (job,) = jobs_named(name)
    # steps 0 and 1 prepared them; 2 entered the job's root; 3 and 4 reused 0's and 1's
    assert [step for step, _ in _shared_roots_prepared(job)] == ["0", "0", "1", "1"]
    wait_for_idle_cluster()
    assert not any(str(job) in item for item in leftovers())


def test_an_allocation_without_image_prepares_each_request_once_per_node(user_tmp):
    """In an allocation made without --image, `srun --image` steps cost a root once per
    request and node; the epilog, which the job's options do not announce, removes them."""
    name = unique_name("noimage")
    script = "for i in 1 2 3 4; do srun -N3 --image=busybox cat /etc/shifter-test-image; done\n"
    output = sbatch(script, "-J", name, "-N3", output=user_tmp / "out")
    assert output.splitlines() == [BUSYBOX_TEXT] * 12
    (job,) = jobs_named(name)
    assert _shared_roots_prepared(job) == [("0", "n1"), ("0", "n2"), ("0", "n3")]
    wait_for_idle_cluster()
    assert not any(str(job) in item for item in leftovers())


def test_missing_image_fails_at_submission():
    name = unique_name()
    result = run_as(["sbatch", "-J", name, "--image=doesnotexist:1", "--wrap", "true"])
    assert result.returncode != 0
    assert "doesnotexist" in result.stderr and "not found" in result.stderr
    assert jobs_named(name) == []


def test_mpich_hello_sees_two_ranks_on_a_node():
    """MPICH (UCX shared memory) in --image tasks. One node: between the box's nodes, MPICH's
    UCX TCP transport hangs in MPI_Finalize now and then, on the bare host too
    (openucx/ucx#8738); Open MPI covers three nodes (test_mpi_pmix, test_mpi_shared)."""
    result = run_as(
        ["srun", "--mpi=pmi2", "-N1", "-n2", "--image=mpich-hello", "/usr/local/bin/mpi-hello"],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    ranks = re.findall(
        r"hello from rank (\d) of (\d) on \S+ \(SLURMD_NODENAME=(n\d)\)", result.stdout
    )
    assert sorted(int(r) for r, _, _ in ranks) == list(range(2))
    assert {size for _, size, _ in ranks} == {"2"}
    assert len({node for _, _, node in ranks}) == 1


def test_two_jobs_with_different_images_share_a_node(user_tmp):
    script = "srun --image={image} cat /etc/shifter-test-image; sleep 2"
    procs = []
    for image in ("busybox", "mpich-hello"):
        output = user_tmp / image
        procs.append(
            (
                output,
                subprocess.Popen(
                    [
                        "runuser",
                        "-u",
                        "alice",
                        "--",
                        "env",
                        f"SLURM_CONF={SLURM_CONF}",
                        "PATH=/usr/bin:/bin",
                        "sbatch",
                        "--wait",
                        "-w",
                        "n2",
                        "-o",
                        str(output),
                        f"--image={image}",
                        "--wrap",
                        script.format(image=image),
                    ],
                    cwd="/tmp",
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
        )
    for _, proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert procs[0][0].read_text().strip() == BUSYBOX_TEXT
    assert procs[1][0].read_text().strip() == "shifter mpi test image"


def test_second_job_on_a_node_uses_the_cached_copy():
    stats = NODE_CACHE / "n1" / "stats.json"
    run_as(["srun", "-w", "n1", "--image=busybox", "true"])
    before = json.loads(stats.read_text())
    result = run_as(["srun", "-w", "n1", "--image=busybox", "true"])
    assert result.returncode == 0, result.stderr
    after = json.loads(stats.read_text())
    assert after["copies"] == before["copies"]
    assert after["hits"] == before["hits"] + 1


def _private_test_image() -> str:
    """A small image of its own (busybox and a marker file), pushed to the box registry."""
    name = f"library/tmp-{uuid.uuid4().hex[:8]}"
    layout = OCILayout(Path(tempfile.mkdtemp(prefix="shifter-img-")))
    try:
        layer = make_layer(
            {
                "bin/busybox": Path("/bin/busybox").read_bytes(),
                "etc/shifter-test-image": f"{name}\n",
            },
            executable={"bin/busybox"},
        )
        layout.tag("latest", layout.add_image([layer]))
        box = load_box_module()  # the mirror is read-only: push through its authenticated end
        skopeo_copy(
            layout,
            "latest",
            f"{box.REGISTRY_PUSH_ADDR}/{name}:latest",
            creds=box.push_credentials(),
        )
    finally:
        shutil.rmtree(layout.path, ignore_errors=True)
    return name.removeprefix("library/")


def test_thirty_jobs_leave_every_node_idle_and_nothing_behind(user_tmp):
    wait_for_idle_cluster()
    gone = _private_test_image()
    gone_id = pull(gone)
    slow = "srun -N3 --image=busybox sleep 30"
    submitted = []

    def submit(*options: str, script: str = "srun -N3 --image=busybox true") -> str:
        name = unique_name("robust")
        result = run_as(
            ["sbatch", "-J", name, "-o", str(user_tmp / f"{name}.out"), *options, "--wrap", script]
        )
        assert result.returncode == 0, result.stderr
        submitted.append(name)
        return name

    for _ in range(20):
        submit("-N3", "--image=busybox")
    cancelled = [submit("-N3", "--image=busybox", script=slow) for _ in range(3)]
    for _ in range(3):  # their tasks get a SIGKILL below
        submit("-N1", "--image=busybox", script="srun --image=busybox sleep 30")
    # A job whose image disappears from the store after submission: its prolog fails.
    failing = submit(
        "-N1",
        "--begin=now+3",
        f"--image={gone}",
        script=f"srun --image={gone} /bin/busybox cat /etc/shifter-test-image",
    )
    for path in STORE.glob(f"{gone_id}.*"):
        path.unlink()
    restarted = [submit("-N3", "--image=busybox", script=slow) for _ in range(3)]

    time.sleep(4)
    subprocess.run(
        ["scancel", "-n", ",".join(cancelled)], check=True, env={"SLURM_CONF": str(SLURM_CONF)}
    )
    for _ in range(100):  # SIGKILL the tasks of the killed jobs as soon as they run
        pids = subprocess.run(
            ["pgrep", "-u", "alice", "-x", "sleep"], capture_output=True, text=True
        ).stdout.split()
        if pids:
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
            break
        time.sleep(0.2)
    # slurmd of n2 restarts while jobs run.
    pid = int((BOX / "run" / "slurmd-n2.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    time.sleep(2)
    subprocess.run(
        [
            str(BOX.parent / ".venv" / "bin" / "python"),
            str(BOX.parent / "tools" / "box" / "box.py"),
            "up",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["scancel", "-n", ",".join(restarted)], check=False, env={"SLURM_CONF": str(SLURM_CONF)}
    )
    wait_for_idle_cluster(timeout=240)
    assert len(submitted) == 30
    # Its prolog recorded why (the job's admin comment); the srun in it is refused at once,
    # since the image is in neither the store nor the gateway any more.
    failed = (user_tmp / f"{failing}.out").read_text()
    assert "not found" in failed or "could not be set up" in failed, failed
    (job,) = jobs_named(failing)
    shown = subprocess.run(
        ["scontrol", "show", "job", job],
        capture_output=True,
        text=True,
        check=True,
        env={"SLURM_CONF": str(SLURM_CONF)},
    ).stdout
    assert "no longer in the image store" in shown, shown
    assert leftovers() == []


def test_a_shifter_job_script_with_a_per_node_cache(user_tmp):
    """A NERSC Shifter job script: perNodeCache with all of Shifter's keys, xfs as asked,
    owned by the user, on every node; nothing left after the job."""
    script = user_tmp / "job.sh"
    script.write_text(
        "#!/bin/sh\n"
        "#SBATCH --image=docker:busybox\n"
        "#SBATCH --volume=/tmp:/cache:perNodeCache=size=10G,bs=1M,method=loop,fs=xfs\n"
        "srun -N2 shifter sh -c 'echo data > /cache/f && stat -f -c %T /cache && "
        "stat -c %U /cache && df -k /cache | tail -1'\n"
    )
    script.chmod(0o755)
    output = user_tmp / "out"
    result = run_as(["sbatch", "--wait", "-N2", "-o", str(output), str(script)], timeout=300)
    text = output.read_text() if output.exists() else ""
    assert result.returncode == 0, result.stderr + text
    lines = text.splitlines()
    assert lines.count("xfs") == 2 and lines.count("alice") == 2, text
    sizes = [int(line.split()[1]) for line in lines if line.startswith("/dev/loop")]
    assert len(sizes) == 2 and all(9_000_000 < s <= 10 * 1024 * 1024 for s in sizes), text
    wait_for_idle_cluster()
    assert leftovers() == []


def test_the_shipped_gpu_module_passes_its_devices():
    """slurm_conf/modules/gpu.yaml as shipped, in the box against test device nodes
    (tools/box/box.py: TEST_DEVICES): the nodes appear in the container, its env is set."""
    script = "ls -l /dev/nvidia0 /dev/nvidiactl; echo caps=$NVIDIA_DRIVER_CAPABILITIES"
    result = run_as(["srun", "-N1", "--image=busybox", "--module=gpu", "sh", "-c", script])
    assert result.returncode == 0, result.stderr
    devices = [line for line in result.stdout.splitlines() if line.startswith("crw")]
    assert len(devices) == 2 and all(" 1,   3 " in line for line in devices), result.stdout
    assert "caps=compute,utility" in result.stdout
    result = run_as(["srun", "-N1", "--image=busybox", "ls", "/dev/nvidia0"])
    assert result.returncode != 0  # only with the module


def test_the_shipped_mpich_module_injects_the_hosts_mpich():
    """slurm_conf/modules/mpich.yaml with this host's MPICH (the MPICH ABI, libmpich.so.12)
    copied in front of the image's: the program links it and two ranks run."""
    if not list(Path("/usr/lib").glob("*/libmpich.so.12")):
        pytest.skip("no host MPICH (libmpich.so.12)")
    ldd = run_as(["srun", "-N1", "--image=mpich-hello", "--module=mpich", "ldd",
                  "/usr/local/bin/mpi-hello"])  # fmt: skip
    assert ldd.returncode == 0, ldd.stderr
    assert "libmpich.so.12 => /opt/udiImage/modules/mpich/lib64/libmpich.so.12" in ldd.stdout
    hello = run_as(["srun", "--mpi=pmi2", "-N1", "-n2", "--image=mpich-hello", "--module=mpich",
                    "/usr/local/bin/mpi-hello"])  # fmt: skip
    assert hello.returncode == 0, hello.stderr
    assert sorted(re.findall(r"hello from rank (\d) of 2", hello.stdout)) == ["0", "1"]


def test_shifter_inside_the_container_runs_the_command_there():
    """`srun --image=X shifter CMD` (NERSC's job scripts): the launcher, bound into every
    container as /usr/bin/shifter, runs CMD in the container it is in; it refuses another
    image and changes to the container, and works in `shifter`'s own containers too."""
    ok = run_as(["srun", "-N2", "--image=busybox", "shifter", "--image=busybox", "-e", "X=1",
                 "sh", "-c", "echo $X; cat /etc/shifter-test-image"])  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines().count(BUSYBOX_TEXT) == 2 and ok.stdout.count("1\n") == 2
    other = run_as(["srun", "-N1", "--image=busybox", "shifter", "--image=mpich-hello", "true"])
    assert other.returncode != 0
    assert "already in the container of busybox" in other.stderr
    volume = run_as(["srun", "-N1", "--image=busybox", "shifter", "-V", "/tmp:/x", "true"])
    assert volume.returncode != 0 and "cannot change it" in volume.stderr
    nested = run_as(["shifter", "--image=busybox", "shifter", "cat", "/etc/shifter-test-image"])
    assert nested.returncode == 0 and nested.stdout.strip() == BUSYBOX_TEXT, nested.stderr


def test_shifter_imagerequest_is_the_image_as_typed(user_tmp):
    """Job scripts compare SHIFTER_IMAGEREQUEST with the --image they were given (to re-run
    themselves inside Shifter): it is the text as typed, in the job, its steps and shifter."""
    script = (
        'echo "job=$SHIFTER_IMAGEREQUEST"\n'
        "srun -N1 --image=busybox:latest sh -c 'echo \"step=$SHIFTER_IMAGEREQUEST\"'\n"
        "srun -N1 shifter sh -c 'echo \"shifter=$SHIFTER_IMAGEREQUEST\"'\n"
    )
    output = sbatch(script, "-N1", "--image=busybox", output=user_tmp / "out")
    assert output.splitlines() == ["job=busybox", "step=busybox:latest", "shifter=busybox"]
