#!/usr/bin/env python3
"""Shifter-in-a-box: a three-node Slurm 22.05 cluster, munge and an image registry on one host.

Run as root with the checkout's venv (made by ``tools/box/setup.sh``)::

    .venv/bin/python tools/box/box.py up       # start (a no-op for what already runs)
    .venv/bin/python tools/box/box.py status   # what runs
    .venv/bin/python tools/box/box.py down     # stop what the box started, unmount, detach
    .venv/bin/python tools/box/box.py restart-gateway   # only the image gateway

State lives in ``<checkout>/.box/``: ``etc/`` (generated slurm.conf, plugstack.conf,
cgroup.conf, shifter.yaml, registry.yml, registry-push.yml and the push credentials),
``spool/``, ``log/``, ``run/`` (pid files), ``registry/`` (registry storage), ``images/``
(the Shifter image store), ``gateway/`` (the image gateway's database and layer cache) and
``cache/``. The gateway runs as the system user
``shifter``, which owns ``images/`` and ``gateway/`` and nothing else; its log is
``log/gateway.log``.
The templates are in ``slurm_conf/box/``. ``up`` writes ``<checkout>/box.env`` to source.

A third registry, on 127.0.0.1:5002 with htpasswd auth and storage in ``artifacts/``, is
the site's artifact registry (``artifacts.registry`` in shifter.yaml): the gateway publishes
every image there as an OCI artifact with its credential (``etc/artifacts-gateway.credential``,
the service user's alone) and the nodes read it with theirs (``etc/artifacts-node.credential``,
root's alone) when ``slurm.image_source`` is ``registry``. Users have no credential for it.
A rack's pull-through mirror of it runs on 127.0.0.1:5004 (``artifacts.node_registry``
points nodes at it; it takes the nodes' credential). Distribution 2.8's proxy can
authenticate to its upstream with tokens only, so the mirror reads the artifact storage
through a token front, 127.0.0.1:5005, whose token service (``tools/box/token_service.py``,
127.0.0.1:5003) grants the nodes' credential pull and nothing else.

The registry is the box's docker.io mirror, and a mirror is trusted (it serves tags): users
only pull from it. It serves ``registry/`` read-only on 127.0.0.1:5000, to anyone; the box
writes (seeds) it through a second registry process on the same storage, on 127.0.0.1:5001,
which takes only authenticated requests (htpasswd; the credentials are root's, in ``etc/``).

Every daemon is found again through its pid file, checked against ``/proc/PID/comm`` so a
reused pid is never signalled. munged is stopped by ``down`` only if the box started it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import grp
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("box")

CHECKOUT = Path(__file__).resolve().parents[2]
TEMPLATES = CHECKOUT / "slurm_conf" / "box"
PLUGIN = CHECKOUT / "build" / "shifter_spank.so"
VENV_PYTHON = CHECKOUT / ".venv" / "bin" / "python"
BOX_ENV = CHECKOUT / "box.env"

DEFAULT_NODE_COUNT = 3
MAX_NODE_COUNT = 64
NODE_COUNT_VAR = "SHIFTER_BOX_NODES"  # make box NODES=N
_COUNT_IN_CONF = re.compile(r"^PartitionName=debug Nodes=n\[1-(\d+)\]", re.M)


def node_count(slurm_conf: Path = CHECKOUT / ".box" / "etc" / "slurm.conf") -> int:
    """How many nodes the box has: $SHIFTER_BOX_NODES when set (``make box NODES=N``), else
    as many as the box's slurm.conf was written with, else 3."""
    wanted = os.environ.get(NODE_COUNT_VAR, "").strip()
    if wanted:
        if not wanted.isdigit() or not 1 <= int(wanted) <= MAX_NODE_COUNT:
            raise SystemExit(f"[box] {NODE_COUNT_VAR}={wanted!r}: give 1 to {MAX_NODE_COUNT}")
        return int(wanted)
    return written_node_count(slurm_conf) or DEFAULT_NODE_COUNT


def written_node_count(slurm_conf: Path) -> int | None:
    """The node count a box's slurm.conf was written with, if there is one."""
    try:
        found = _COUNT_IN_CONF.search(slurm_conf.read_text())
    except OSError:
        return None
    return int(found.group(1)) if found else None


NODES = tuple(f"n{i}" for i in range(1, node_count() + 1))
# The plugin's prepared job roots (runtime.run_dir in the box's shifter.yaml). Not below the
# checkout, which may live under /tmp: every container shows the host's /tmp, and job roots
# mounted below it would show up there too.
RUN_DIR = Path("/run/shifter-box")
REGISTRY_ADDR = "127.0.0.1:5000"  # the docker.io mirror: read-only, pulls by anyone
REGISTRY_PUSH_ADDR = "127.0.0.1:5001"  # the same storage: pushes with the box's credentials
REGISTRY_PUSH_USER = "box-seed"
ARTIFACTS_ADDR = "127.0.0.1:5002"  # the artifact registry (htpasswd: the gateway, the nodes)
TOKEN_SERVICE_ADDR = "127.0.0.1:5003"  # tokens for the artifact storage's token front
ARTIFACTS_TOKEN_ADDR = "127.0.0.1:5005"  # the same storage, read with tokens (the mirror)
MIRROR_ADDR = "127.0.0.1:5004"  # a rack's pull-through mirror of the artifacts (nodes)
ARTIFACT_USERS = ("gateway", "node")
USERS = ("alice", "bob")
GROUP = "science"
SERVICE_USER = "shifter"  # the image gateway's system user: owns the store and gateway/
GATEWAY_ADDR = "127.0.0.1:7080"
GATEWAY_BIN = CHECKOUT / ".venv" / "bin" / "shifter-gateway"
# (builder name, repository in the box registry)
SEED_IMAGES = (
    ("busybox", "library/busybox"),
    ("mpi", "library/mpich-hello"),
    ("openmpi", "library/openmpi-hello"),
)

MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
MUNGE_PIDFILE = MUNGE_RUN / "munged.pid"
DAEMON_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


class BoxError(RuntimeError):
    """A step of the box failed; the message says what and where to look."""


@dataclass(frozen=True)
class BoxPaths:
    """Where the box keeps its state (all below ``root``)."""

    root: Path

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def registry(self) -> Path:
        return self.root / "registry"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def gateway(self) -> Path:
        """The gateway's database and layer cache (owned by the service user)."""
        return self.root / "gateway"

    @property
    def slurm_conf(self) -> Path:
        return self.etc / "slurm.conf"

    @property
    def plugstack_conf(self) -> Path:
        return self.etc / "plugstack.conf"

    @property
    def shifter_yaml(self) -> Path:
        return self.etc / "shifter.yaml"

    @property
    def registry_yml(self) -> Path:
        return self.etc / "registry.yml"

    @property
    def registry_push_yml(self) -> Path:
        return self.etc / "registry-push.yml"

    @property
    def registry_htpasswd(self) -> Path:
        """The push registry's users (bcrypt), root's only."""
        return self.etc / "registry-push.htpasswd"

    @property
    def registry_authfile(self) -> Path:
        """The push credentials as a containers-auth.json (``skopeo --dest-authfile``)."""
        return self.etc / "registry-push-auth.json"

    @property
    def artifacts(self) -> Path:
        """The artifact registry's storage."""
        return self.root / "artifacts"

    @property
    def artifacts_yml(self) -> Path:
        return self.etc / "registry-artifacts.yml"

    @property
    def artifacts_htpasswd(self) -> Path:
        return self.etc / "registry-artifacts.htpasswd"

    @property
    def artifacts_token_yml(self) -> Path:
        return self.etc / "registry-artifacts-token.yml"

    @property
    def mirror_yml(self) -> Path:
        """The rack mirror's configuration: it holds the nodes' password (root's only)."""
        return self.etc / "registry-mirror.yml"

    @property
    def mirror(self) -> Path:
        """The rack mirror's cache."""
        return self.root / "mirror"

    @property
    def token_cert(self) -> Path:
        return self.etc / "token-service.crt"

    @property
    def token_key(self) -> Path:
        return self.etc / "token-service.key"

    def artifact_credential(self, user: str) -> Path:
        """USER:PASSWORD for the artifact registry (the gateway's or the nodes')."""
        return self.etc / f"artifacts-{user}.credential"

    @property
    def policy_json(self) -> Path:
        return self.etc / "policy.json"

    @property
    def munged_marker(self) -> Path:
        """Exists (holding munged's pid) while munged is running because the box started it."""
        return self.run / "munged.started-by-box"

    def dirs(self) -> list[Path]:
        return [
            self.root,
            self.etc,
            self.spool,
            self.spool / "ctld",
            self.log,
            self.run,
            self.registry,
            self.artifacts,
            self.mirror,
            self.images,
            self.cache,
            self.gateway,
        ]

    def service_dirs(self) -> dict[Path, int]:
        """Directories the gateway's service user owns, with their modes."""
        return {self.images: 0o755, self.gateway: 0o700}


PATHS = BoxPaths(CHECKOUT / ".box")


# --- processes -------------------------------------------------------------------------------


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, and raise a BoxError naming it when it fails."""
    argv = [str(a) for a in cmd]
    log.debug("$ %s", " ".join(argv))
    try:
        proc = subprocess.run(
            argv,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise BoxError(f"{argv[0]} is not installed: run tools/box/setup.sh") from None
    except subprocess.TimeoutExpired:
        raise BoxError(f"{' '.join(argv)} did not finish in {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise BoxError(f"{' '.join(argv)} exited {proc.returncode}: {detail}")
    return proc


def spawn_daemon(cmd: Sequence[str | os.PathLike[str]], env: Mapping[str, str], out: Path) -> None:
    """Run a command that daemonises itself, its early output appended to ``out``."""
    argv = [str(a) for a in cmd]
    log.debug("$ %s", " ".join(argv))
    with out.open("ab") as sink:
        proc = subprocess.run(
            argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, check=False
        )
    if proc.returncode != 0:
        raise BoxError(f"{' '.join(argv)} exited {proc.returncode}\n{tail(out)}")


def tail(path: Path, lines: int = 20) -> str:
    """The last lines of a log file, indented, for error messages."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as err:
        return f"    ({path}: {err.strerror})"
    return f"    --- last lines of {path} ---\n" + "\n".join("    " + t for t in text)


def proc_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (reaping it if it is our child)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def proc_comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


@dataclass(frozen=True)
class Daemon:
    """A daemon the box starts and finds again through its pid file."""

    name: str
    comm: str  # /proc/PID/comm of the running daemon (at most 15 characters)
    pidfile: Path
    cmd_contains: tuple[str, ...] = ()  # arguments its command line must contain

    def pid(self) -> int | None:
        """The daemon's pid if the pid file names a live process that is this daemon."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if not proc_alive(pid) or proc_comm(pid) != self.comm[:15]:
            return None
        cmdline = proc_cmdline(pid)
        if any(arg not in cmdline for arg in self.cmd_contains):
            return None
        return pid


def slurmctld_daemon(paths: BoxPaths = PATHS) -> Daemon:
    return Daemon("slurmctld", "slurmctld", paths.run / "slurmctld.pid")


def slurmd_daemon(node: str, paths: BoxPaths = PATHS) -> Daemon:
    return Daemon(f"slurmd {node}", "slurmd", paths.run / f"slurmd-{node}.pid", ("-N", node))


def registry_daemon(paths: BoxPaths = PATHS) -> Daemon:
    return Daemon("registry", "docker-registry", paths.run / "registry.pid")


def registry_push_daemon(paths: BoxPaths = PATHS) -> Daemon:
    return Daemon(
        "registry-push",
        "docker-registry",
        paths.run / "registry-push.pid",
        (str(paths.registry_push_yml),),
    )


def registry_artifacts_daemon(paths: BoxPaths = PATHS) -> Daemon:
    return Daemon(
        "registry-artifacts",
        "docker-registry",
        paths.run / "registry-artifacts.pid",
        (str(paths.artifacts_yml),),
    )


def token_service_daemon(paths: BoxPaths = PATHS) -> Daemon:
    script = str(CHECKOUT / "tools" / "box" / "token_service.py")
    return Daemon("token-service", "python", paths.run / "token-service.pid", (script,))


def registry_artifacts_token_daemon(paths: BoxPaths = PATHS) -> Daemon:
    return Daemon(
        "registry-artifacts-token",
        "docker-registry",
        paths.run / "registry-artifacts-token.pid",
        (str(paths.artifacts_token_yml),),
    )


def registry_mirror_daemon(paths: BoxPaths = PATHS) -> Daemon:
    return Daemon(
        "registry-mirror", "docker-registry", paths.run / "registry-mirror.pid",
        (str(paths.mirror_yml),),
    )  # fmt: skip


def artifact_daemons(paths: BoxPaths = PATHS) -> list[Daemon]:
    """The artifact registry, its token service and token front, and the rack mirror."""
    return [
        registry_artifacts_daemon(paths),
        token_service_daemon(paths),
        registry_artifacts_token_daemon(paths),
        registry_mirror_daemon(paths),
    ]


def gateway_daemon(paths: BoxPaths = PATHS) -> Daemon:
    return Daemon(
        "gateway",
        "shifter-gateway",
        paths.run / "gateway.pid",
        ("--config", str(paths.shifter_yaml)),
    )


def munged_daemon() -> Daemon:
    return Daemon("munged", "munged", MUNGE_PIDFILE)


def stop_pids(named: Mapping[str, int], timeout: float = 15) -> None:
    """SIGTERM every process, wait for all to exit, SIGKILL those left after ``timeout``."""
    for name, pid in named.items():
        log.info("stopping %s (pid %d)", name, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    left = dict(named)
    while left:
        left = {n: p for n, p in left.items() if proc_alive(p)}
        if not left:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for name, pid in left.items():
        log.warning("%s (pid %d) ignored SIGTERM for %.0f s: SIGKILL", name, pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(proc_alive(p) for p in left.values()):
        if time.monotonic() > deadline:
            alive = ", ".join(f"{n} ({p})" for n, p in left.items() if proc_alive(p))
            raise BoxError(f"still alive after SIGKILL: {alive}")
        time.sleep(0.1)


# --- files -----------------------------------------------------------------------------------


def write_root_file(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write ``text`` atomically as a root-owned file; True if the content changed."""
    try:
        same = path.read_text() == text
    except OSError:
        same = False
    if not same:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.chown(tmp, 0, 0)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    else:
        st = path.stat()
        if st.st_uid != 0 or st.st_gid != 0 or st.st_mode & 0o7777 != mode:
            os.chown(path, 0, 0)
            os.chmod(path, mode)
    return not same


def render(template: str, **values: str) -> str:
    """Fill a template from slurm_conf/box/ (``${name}`` placeholders)."""
    text = (TEMPLATES / template).read_text()
    return string.Template(text).substitute(values)


def make_dirs(paths: BoxPaths) -> None:
    """Create the state directories, root-owned and writable by root only (those of the
    gateway's service user are only created here: ``prepare_gateway_dirs`` owns them), and
    each node's TmpFS (slurm.conf), sticky and writable by all like /tmp."""
    for node in NODES:
        tmpfs = Path(f"/tmp/slurm-box-{node}")
        tmpfs.mkdir(exist_ok=True)
        tmpfs.chmod(0o1777)
    service = paths.service_dirs()
    for d in paths.dirs():
        d.mkdir(parents=True, exist_ok=True)
        if d in service:
            continue
        st = d.stat()
        if st.st_uid != 0 or st.st_gid != 0:
            os.chown(d, 0, 0)
        if st.st_mode & 0o7777 != 0o755:
            os.chmod(d, 0o755)


def plugin_line(paths: BoxPaths, enabled: bool) -> str:
    """The plugstack.conf line of the Shifter plugin, commented out if off or not built."""
    line = f"required {PLUGIN} config={paths.shifter_yaml}"
    if not enabled:
        return f"# disabled by 'box.py up --no-plugin':\n# {line}"
    if not PLUGIN.exists():
        return f"# not built yet when box.py last ran:\n# {line}"
    return line


MODULES = CHECKOUT / "slurm_conf" / "modules"
# The shipped gpu module's device nodes, made for the box where the host has none: char
# devices with the numbers of /dev/null (reading gives nothing, writing is dropped).
TEST_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl")


def box_modules() -> dict[str, object]:
    """The shipped example modules (slurm_conf/modules) wherever this host allows them, so
    that they are tested: ``gpu`` as shipped, against test device nodes
    (:func:`ensure_test_devices`); ``mpich`` with this host's MPICH (libmpich.so.12, the
    MPICH ABI) in place of Cray's, when it is installed."""
    import glob

    import yaml  # the venv's

    def shipped(name: str) -> dict[str, object]:
        data: dict[str, dict[str, dict[str, object]]] = yaml.safe_load(
            (MODULES / f"{name}.yaml").read_text()
        )
        return data["modules"][name]

    modules = {"gpu": shipped("gpu")}
    host_mpich = sorted(glob.glob("/usr/lib/*/libmpich.so.12"))
    if host_mpich:
        mpich = shipped("mpich")
        mpich["copies"] = [f"{host_mpich[0]}*:/opt/udiImage/modules/mpich/lib64/"]
        modules["mpich"] = mpich
    return {"modules": modules}


def _yaml_dump(data: object) -> str:
    import yaml

    text: str = yaml.safe_dump(data, sort_keys=True, default_flow_style=False)
    return text


def ensure_test_devices(paths: BoxPaths) -> None:
    """Make the test device nodes that do not exist; remember them for ``down``."""
    made = paths.run / "test-devices"
    for device in TEST_DEVICES:
        if not os.path.exists(device):
            os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            os.chmod(device, 0o666)
            with made.open("a") as fh:
                fh.write(device + "\n")


def remove_test_devices(paths: BoxPaths) -> None:
    made = paths.run / "test-devices"
    with contextlib.suppress(FileNotFoundError):
        for device in made.read_text().split():
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(device)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3):
                    os.unlink(device)
        made.unlink()


def rendered_configs(paths: BoxPaths, *, plugin: bool) -> dict[str, str]:
    """File name in ``etc/`` -> the content ``up`` writes there."""
    values = {"box": str(paths.root), "host": socket.gethostname().split(".")[0]}
    count = len(NODES)
    nodes = {"nodes": f"n[1-{count}]", "ports": f"[17001-{17000 + count}]"}
    return {
        "slurm.conf": render("slurm.conf.in", **values, **nodes),
        "plugstack.conf": render("plugstack.conf.in", plugin_line=plugin_line(paths, plugin)),
        "cgroup.conf": render("cgroup.conf.in"),
        "shifter.yaml": render("shifter.yaml.in", **values)
        + "# The shipped example modules this host allows (box_modules).\n"
        + _yaml_dump(box_modules()),
        "registry.yml": render("registry.yml.in", **values),
        "registry-push.yml": render("registry-push.yml.in", **values),
        "registry-artifacts.yml": render("registry-artifacts.yml.in", **values),
        "registry-artifacts-token.yml": render("registry-artifacts-token.yml.in", **values),
        "policy.json": json.dumps({"default": [{"type": "insecureAcceptAnything"}]}) + "\n",
    }


def configs_current(paths: BoxPaths, *, plugin: bool = True) -> bool:
    """True when every file in ``etc/`` is what ``up`` would write now."""
    for name, text in rendered_configs(paths, plugin=plugin).items():
        try:
            if (paths.etc / name).read_text() != text:
                return False
        except OSError:
            return False
    return True


def write_configs(paths: BoxPaths, *, plugin: bool) -> set[str]:
    """Generate every file in ``etc/``; return the names of those whose content changed."""
    if plugin and not PLUGIN.exists():
        log.warning(
            "%s does not exist yet (make plugin): plugstack.conf has the plugin line commented "
            "out; run 'box.py up' again once it is built",
            PLUGIN,
        )
    files = rendered_configs(paths, plugin=plugin)
    changed = {name for name, text in files.items() if write_root_file(paths.etc / name, text)}
    for name in sorted(changed):
        log.info("wrote %s", paths.etc / name)
    check_shifter_config(paths.shifter_yaml)
    return changed


def check_shifter_config(path: Path) -> None:
    """Load shifter.yaml the way privileged code will (ownership and schema checks)."""
    try:
        from shifter_core import config  # only in the venv
    except ImportError:
        log.warning("shifter_core is not importable: %s not validated (run setup.sh)", path)
        return
    try:
        config.load(str(path), privileged=True)
    except Exception as err:  # ConfigError and whatever the loader raises
        raise BoxError(f"the generated {path} is refused by shifter_core: {err}") from None


def write_box_env(paths: BoxPaths) -> None:
    text = (
        "# Source me: the box's Slurm and Shifter configuration (written by tools/box/box.py)\n"
        f"export SLURM_CONF={paths.slurm_conf} SHIFTER_CONFIG={paths.shifter_yaml} "
        f"PATH={CHECKOUT / '.venv' / 'bin'}:$PATH\n"
    )
    if write_root_file(BOX_ENV, text):
        log.info("wrote %s", BOX_ENV)


# --- users -----------------------------------------------------------------------------------


def ensure_service_user() -> None:
    """The gateway's system user ``shifter`` (no home, no login shell)."""
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        log.info("useradd --system %s", SERVICE_USER)
        run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                SERVICE_USER,
            ]
        )


def ensure_users() -> None:
    """Test users alice and bob, both in the group science; only what is missing is added."""
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        log.info("groupadd %s", GROUP)
        run(["groupadd", GROUP])
    for user in USERS:
        try:
            pwd.getpwnam(user)
        except KeyError:
            log.info("useradd %s", user)
            run(
                [
                    "useradd",
                    "--create-home",
                    "--shell",
                    "/bin/sh",
                    "--user-group",
                    "--groups",
                    GROUP,
                    user,
                ]
            )
            continue
        if user not in grp.getgrnam(GROUP).gr_mem:
            log.info("adding %s to group %s", user, GROUP)
            run(["usermod", "--append", "--groups", GROUP, user])


# --- munge -----------------------------------------------------------------------------------


def munge_works() -> bool:
    return run(["munge", "--no-input"], check=False, timeout=10).returncode == 0


def start_munge(paths: BoxPaths) -> None:
    """Start munged as user munge unless one already answers on the default socket."""
    daemon = munged_daemon()
    pid = daemon.pid()
    if pid and munge_works():
        log.info("munged is running (pid %d)", pid)
        return
    if pid:
        raise BoxError(f"munged (pid {pid}) runs but 'munge -n' fails: see /var/log/munge")
    munge = pwd.getpwnam("munge")
    if not MUNGE_KEY.exists():
        log.info("creating %s", MUNGE_KEY)
        run(["mungekey", "--create", "--keyfile", MUNGE_KEY])
        os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
        os.chmod(MUNGE_KEY, 0o400)
    for d, mode in (
        (MUNGE_RUN, 0o755),
        (Path("/var/lib/munge"), 0o711),
        (Path("/var/log/munge"), 0o700),
    ):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, munge.pw_uid, munge.pw_gid)
        os.chmod(d, mode)
    log.info("starting munged")
    # --force: a socket left by a munged that died would make it refuse to start.
    spawn_daemon(
        ["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"],
        {"PATH": DAEMON_PATH},
        paths.log / "munged.start.log",
    )
    deadline = time.monotonic() + 10
    while not (daemon.pid() and munge_works()):
        if time.monotonic() > deadline:
            raise BoxError(f"munged did not come up\n{tail(Path('/var/log/munge/munged.log'))}")
        time.sleep(0.1)
    pid = daemon.pid()
    paths.munged_marker.write_text(f"{pid}\n")
    log.info("munged is up (pid %s)", pid)


# --- slurm -----------------------------------------------------------------------------------


def slurm_env(paths: BoxPaths = PATHS) -> dict[str, str]:
    """A small environment for Slurm daemons and clients (no user Python settings leak in)."""
    return {"PATH": DAEMON_PATH, "LANG": "C.UTF-8", "SLURM_CONF": str(paths.slurm_conf)}


def slurm_daemons(paths: BoxPaths) -> list[Daemon]:
    return [slurmctld_daemon(paths), *(slurmd_daemon(n, paths) for n in NODES)]


def node_states(paths: BoxPaths, *, reasons: bool = False) -> dict[str, str]:
    """Node name -> long state as sinfo prints it (``idle``, ``down*``, ``drained`` ...),
    followed by ``: <reason>`` when ``reasons`` is set and the node has one."""
    proc = run(
        ["sinfo", "--noheader", "--Node", "--format", "%N|%T|%E"],
        env=slurm_env(paths),
        check=False,
        timeout=20,
    )
    if proc.returncode != 0:
        return {}
    states = {}
    for line in proc.stdout.splitlines():
        name, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        has_reason = reasons and reason.strip() not in ("", "none")
        states[name] = f"{state}: {reason.strip()}" if has_reason else state
    return states


HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# shifter-box"


def ensure_node_names() -> None:
    """The nodes' host names resolve (to 127.0.0.1): each slurmd has its node's name as its
    host name (:func:`start_slurm`) and resolves it when it starts."""
    line = f"127.0.0.1 {' '.join(NODES)} {HOSTS_MARK}"
    text = HOSTS_FILE.read_text()
    if line in text.splitlines():
        return
    kept = [ln for ln in text.splitlines() if not ln.endswith(HOSTS_MARK)]
    HOSTS_FILE.write_text("\n".join([*kept, line]) + "\n")


def remove_node_names() -> None:
    """Take the nodes' names out of /etc/hosts again."""
    text = HOSTS_FILE.read_text()
    kept = [ln for ln in text.splitlines() if not ln.endswith(HOSTS_MARK)]
    if len(kept) != len(text.splitlines()):
        HOSTS_FILE.write_text("\n".join(kept) + "\n")


def start_slurm(paths: BoxPaths, changed: set[str]) -> None:
    """Start slurmctld and the three slurmd unless they run; apply changed configuration."""
    env = slurm_env(paths)
    running = {d.name: d.pid() for d in slurm_daemons(paths)}
    if "slurm.conf" in changed and any(running.values()):
        log.info("slurm.conf changed: restarting the Slurm daemons")
        stop_pids({n: p for n, p in running.items() if p})
        running = dict.fromkeys(running)
    elif "plugstack.conf" in changed and any(running.values()):
        log.info("plugstack.conf changed: scontrol reconfigure")
        run(["scontrol", "reconfigure"], env=env, check=False)
    ctld = slurmctld_daemon(paths)
    if running[ctld.name]:
        log.info("slurmctld is running (pid %d)", running[ctld.name])
    else:
        log.info("starting slurmctld")
        spawn_daemon(["slurmctld"], env, paths.log / "slurmctld.start.log")
        wait_pid(ctld, paths.log / "slurmctld.log")
    for node in NODES:
        daemon = slurmd_daemon(node, paths)
        if running[daemon.name]:
            log.info("slurmd %s is running (pid %d)", node, running[daemon.name])
            continue
        (paths.spool / f"slurmd-{node}").mkdir(mode=0o755, exist_ok=True)
        log.info("starting slurmd -N %s (host name %s, UTS and IPC namespaces of its own)",
                 node, node)  # fmt: skip
        # One host, three "nodes": with a host name and System V IPC of its own, each node's
        # tasks are another host to MPI, as on a real cluster (Open MPI and MPICH take ranks
        # with the same host name for neighbours; UCX takes peers with the same boot id and
        # IPC namespace for ones it can reach through shared memory).
        in_namespaces = f"hostname {node} && exec slurmd -N {node}"
        spawn_daemon(
            ["unshare", "--uts", "--ipc", "--", "sh", "-c", in_namespaces],
            env,
            paths.log / f"slurmd-{node}.start.log",
        )
        wait_pid(daemon, paths.log / f"slurmd-{node}.log")


def wait_pid(daemon: Daemon, logfile: Path, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while (pid := daemon.pid()) is None:
        if time.monotonic() > deadline:
            raise BoxError(f"{daemon.name} did not write {daemon.pidfile}\n{tail(logfile)}")
        time.sleep(0.1)
    log.info("%s is up (pid %d)", daemon.name, pid)
    return pid


def wait_nodes_idle(paths: BoxPaths, timeout: float = 60) -> None:
    """Wait until every node responds and is usable; resume nodes left down or drained."""
    env = slurm_env(paths)
    ready = ("idle", "mixed", "allocated", "completing")
    deadline = time.monotonic() + timeout
    resumed: dict[str, float] = {}
    states: dict[str, str] = {}
    while True:
        states = node_states(paths, reasons=True)
        if states and all(states.get(n, "").split(":")[0] in ready for n in NODES):
            log.info("nodes: %s", ", ".join(f"{n} {states[n]}" for n in NODES))
            return
        for node in NODES:
            state = states.get(node, "")
            bad = ("down", "drain", "fail")
            if state.startswith(bad) and time.monotonic() - resumed.get(node, 0) > 5:
                log.warning("node %s is %s; scontrol update state=resume", node, state)
                run(
                    ["scontrol", "update", f"nodename={node}", "state=resume"], env=env, check=False
                )
                resumed[node] = time.monotonic()
        if time.monotonic() > deadline:
            logs = "\n".join(
                tail(paths.log / name, 8)
                for name in ("slurmctld.log", *(f"slurmd-{n}.log" for n in NODES))
            )
            raise BoxError(
                f"nodes not idle after {timeout:.0f} s: {states or 'sinfo failed'}\n{logs}"
            )
        time.sleep(0.5)


def cancel_jobs(paths: BoxPaths, timeout: float = 30) -> None:
    """Cancel every job of the box and wait for the queue to drain."""
    env = slurm_env(paths)
    proc = run(["squeue", "--noheader", "--format", "%A"], env=env, check=False, timeout=20)
    jobs = proc.stdout.split() if proc.returncode == 0 else []
    if not jobs:
        return
    log.info("cancelling %d job(s): %s", len(jobs), " ".join(jobs))
    run(["scancel", *jobs], env=env, check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = run(["squeue", "--noheader", "--format", "%A"], env=env, check=False)
        if proc.returncode != 0 or not proc.stdout.split():
            return
        time.sleep(0.5)
    log.warning("jobs still in the queue after %.0f s: stopping the daemons anyway", timeout)


def box_stepds(paths: BoxPaths) -> dict[str, int]:
    """slurmstepd processes of this box (their environment names the box's slurm.conf)."""
    marker = f"SLURM_CONF={paths.slurm_conf}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if proc_comm(pid) != "slurmstepd":
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            found[f"slurmstepd {' '.join(proc_cmdline(pid))}"] = pid
    return found


# --- registry and images ---------------------------------------------------------------------


def http_get(
    url: str, *, method: str = "GET", headers: Mapping[str, str] | None = None, timeout: float = 5
) -> tuple[int, Mapping[str, str], bytes]:
    """A request to the loopback registry, never through a proxy; (status, headers, body)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def push_credentials(paths: BoxPaths = PATHS) -> tuple[str, str]:
    """(user, password) that may push to the box registry (REGISTRY_PUSH_ADDR); root only."""
    auth = json.loads(paths.registry_authfile.read_text())["auths"][REGISTRY_PUSH_ADDR]["auth"]
    user, _, password = base64.b64decode(auth).decode().partition(":")
    return user, password


def _write_secret(path: Path, text: str) -> None:
    """Write a root-only file (mode 0600 from its creation) atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def ensure_push_credentials(paths: BoxPaths) -> bool:
    """The push registry's password (made once, random) in the htpasswd file and in a
    containers-auth.json for skopeo, both root-only; True when they were (re)made."""
    try:
        push_credentials(paths)
        if paths.registry_htpasswd.stat().st_size > 0:
            return False
    except (OSError, ValueError, KeyError):
        pass
    password = secrets.token_urlsafe(24)
    try:
        proc = subprocess.run(
            ["htpasswd", "-i", "-B", "-n", REGISTRY_PUSH_USER],
            input=password + "\n",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except FileNotFoundError:
        raise BoxError(
            "htpasswd is not installed (apache2-utils): run tools/box/setup.sh"
        ) from None
    if proc.returncode != 0:
        raise BoxError(f"htpasswd exited {proc.returncode}: {proc.stderr.strip()}")
    token = base64.b64encode(f"{REGISTRY_PUSH_USER}:{password}".encode()).decode()
    _write_secret(paths.registry_htpasswd, proc.stdout)
    _write_secret(
        paths.registry_authfile, json.dumps({"auths": {REGISTRY_PUSH_ADDR: {"auth": token}}})
    )
    log.info("made the push credentials of the box registry (%s)", paths.registry_authfile)
    return True


def artifact_credential(paths: BoxPaths, user: str) -> tuple[str, str]:
    name, _, password = paths.artifact_credential(user).read_text().strip().partition(":")
    return name, password


def ensure_artifact_credentials(paths: BoxPaths) -> bool:
    """The artifact registry's users (random passwords, made once): the htpasswd file and
    one credential file each, the gateway's owned by the service user, the nodes' by root,
    both 0600 (what the gateway and the prolog demand); True when they were (re)made."""
    service = pwd.getpwnam(SERVICE_USER)
    owners = {"gateway": (service.pw_uid, service.pw_gid), "node": (0, 0)}
    try:
        if paths.artifacts_htpasswd.stat().st_size > 0 and all(
            artifact_credential(paths, u)[1] for u in ARTIFACT_USERS
        ):
            for user, (uid, gid) in owners.items():
                os.chown(paths.artifact_credential(user), uid, gid)
            return False
    except OSError:
        pass
    lines = []
    for user in ARTIFACT_USERS:
        password = secrets.token_urlsafe(24)
        proc = subprocess.run(
            ["htpasswd", "-i", "-B", "-n", user],
            input=password + "\n",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if proc.returncode != 0:
            raise BoxError(f"htpasswd exited {proc.returncode}: {proc.stderr.strip()}")
        lines.append(proc.stdout.strip())
        _write_secret(paths.artifact_credential(user), f"{user}:{password}\n")
        os.chown(paths.artifact_credential(user), *owners[user])
    _write_secret(paths.artifacts_htpasswd, "\n".join(lines) + "\n")
    log.info("made the artifact registry's credentials (%s)", paths.etc)
    return True


def registry_artifacts_ok(paths: BoxPaths = PATHS) -> bool:
    """The artifact registry answers, and accepts the nodes' credential."""
    try:
        user, password = artifact_credential(paths, "node")
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        url = f"http://{ARTIFACTS_ADDR}/v2/"
        return http_get(url, headers={"Authorization": f"Basic {basic}"})[0] == 200
    except (OSError, ValueError):
        return False


def ensure_token_key_pair(paths: BoxPaths) -> bool:
    """The token service's signing key (root's) and certificate (the token front trusts
    it), made once; True when they were made."""
    if paths.token_key.exists() and paths.token_cert.exists():
        return False
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
         "-subj", "/CN=shifter-box-token-service", "-keyout", str(paths.token_key),
         "-out", str(paths.token_cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    paths.token_key.chmod(0o600)
    log.info("made the token service's key pair (%s)", paths.token_cert)
    return True


def start_token_service(paths: BoxPaths, restart: bool) -> None:
    daemon = token_service_daemon(paths)
    pid = daemon.pid()
    if pid and not restart and token_front_ok(TOKEN_SERVICE_ADDR, path="/token"):
        log.info("token-service is running (pid %d)", pid)
        return
    if pid:
        stop_pids({daemon.name: pid})
    logfile = paths.log / "token-service.log"
    python = VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)
    port = TOKEN_SERVICE_ADDR.rpartition(":")[2]
    with logfile.open("ab") as sink:
        proc = subprocess.Popen(
            [str(python), str(CHECKOUT / "tools" / "box" / "token_service.py"), "--port", port,
             "--cert", str(paths.token_cert), "--key", str(paths.token_key),
             "--credential", str(paths.artifact_credential("node"))],
            stdin=subprocess.DEVNULL, stdout=sink, stderr=sink, cwd=paths.root,
            env={"PATH": DAEMON_PATH, "LANG": "C.UTF-8"}, start_new_session=True,
        )  # fmt: skip
    daemon.pidfile.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 20
    while not token_front_ok(TOKEN_SERVICE_ADDR, path="/token"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BoxError(f"the token service does not answer\n{tail(logfile)}")
        time.sleep(0.1)
    log.info("token-service is up (pid %d)", proc.pid)


def token_front_ok(addr: str, path: str = "/v2/") -> bool:
    """Something answers HTTP on ``addr`` (a 401 is an answer)."""
    try:
        http_get(f"http://{addr}{path}")
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def mirror_config(paths: BoxPaths) -> str:
    """The rack mirror: a pull-through cache of the token front, which it reads with the
    nodes' credential; it takes the artifact registry's users (htpasswd) itself."""
    user, password = artifact_credential(paths, "node")
    return _yaml_dump({
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(paths.mirror)},
                    "delete": {"enabled": True}},
        "http": {"addr": MIRROR_ADDR, "secret": "box-not-secret"},
        "auth": {"htpasswd": {"realm": "shifter-box-mirror",
                              "path": str(paths.artifacts_htpasswd)}},
        "proxy": {"remoteurl": f"http://{ARTIFACTS_TOKEN_ADDR}", "username": user,
                  "password": password},
    })  # fmt: skip


def registry_mirror_ok(paths: BoxPaths = PATHS) -> bool:
    """The rack mirror answers and takes the nodes' credential."""
    try:
        user, password = artifact_credential(paths, "node")
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        url = f"http://{MIRROR_ADDR}/v2/"
        return http_get(url, headers={"Authorization": f"Basic {basic}"})[0] == 200
    except (OSError, ValueError):
        return False


def registry_ok() -> bool:
    """The read-only mirror answers."""
    try:
        return http_get(f"http://{REGISTRY_ADDR}/v2/")[0] == 200
    except OSError:
        return False


def registry_push_ok(paths: BoxPaths = PATHS) -> bool:
    """The push registry answers, and accepts the box's credentials."""
    try:
        user, password = push_credentials(paths)
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        url = f"http://{REGISTRY_PUSH_ADDR}/v2/"
        return http_get(url, headers={"Authorization": f"Basic {basic}"})[0] == 200
    except (OSError, ValueError, KeyError):
        return False


def start_registry(paths: BoxPaths, changed: Iterable[str] = ()) -> None:
    """Serve the box registry: read-only on REGISTRY_ADDR, for pushes on REGISTRY_PUSH_ADDR
    (both on ``registry/``); each restarted when its configuration changed."""
    changed = set(changed)
    new_credentials = ensure_push_credentials(paths)
    _start_registry_daemon(
        paths,
        registry_daemon(paths),
        paths.registry_yml,
        REGISTRY_ADDR,
        registry_ok,
        restart="registry.yml" in changed,
    )
    _start_registry_daemon(
        paths,
        registry_push_daemon(paths),
        paths.registry_push_yml,
        REGISTRY_PUSH_ADDR,
        lambda: registry_push_ok(paths),
        restart="registry-push.yml" in changed or new_credentials,
    )
    new_artifact_credentials = ensure_artifact_credentials(paths)
    _start_registry_daemon(
        paths,
        registry_artifacts_daemon(paths),
        paths.artifacts_yml,
        ARTIFACTS_ADDR,
        lambda: registry_artifacts_ok(paths),
        restart="registry-artifacts.yml" in changed or new_artifact_credentials,
    )
    new_key_pair = ensure_token_key_pair(paths)
    start_token_service(paths, restart=new_key_pair or new_artifact_credentials)
    _start_registry_daemon(
        paths,
        registry_artifacts_token_daemon(paths),
        paths.artifacts_token_yml,
        ARTIFACTS_TOKEN_ADDR,
        lambda: token_front_ok(ARTIFACTS_TOKEN_ADDR),
        restart="registry-artifacts-token.yml" in changed or new_key_pair,
    )
    text = mirror_config(paths)
    try:
        mirror_changed = paths.mirror_yml.read_text() != text
    except OSError:
        mirror_changed = True
    if mirror_changed:
        _write_secret(paths.mirror_yml, text)
    _start_registry_daemon(
        paths,
        registry_mirror_daemon(paths),
        paths.mirror_yml,
        MIRROR_ADDR,
        lambda: registry_mirror_ok(paths),
        restart=mirror_changed,
    )


def _start_registry_daemon(
    paths: BoxPaths,
    daemon: Daemon,
    config: Path,
    addr: str,
    ok: Callable[[], bool],
    *,
    restart: bool,
) -> None:
    pid = daemon.pid()
    if pid and not restart and ok():
        log.info("%s is running (pid %d)", daemon.name, pid)
        return
    if pid:
        stop_pids({daemon.name: pid})
    logfile = paths.log / f"{daemon.name}.log"
    log.info("starting docker-registry on %s (%s)", addr, config.name)
    with logfile.open("ab") as sink:
        proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            cwd=paths.root,
            env={"PATH": DAEMON_PATH, "LANG": "C.UTF-8"},
            start_new_session=True,
        )
    daemon.pidfile.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 20
    while not ok():
        if proc.poll() is not None:
            raise BoxError(f"docker-registry exited {proc.returncode}\n{tail(logfile)}")
        if time.monotonic() > deadline:
            raise BoxError(f"docker-registry on {addr} does not answer GET /v2/\n{tail(logfile)}")
        time.sleep(0.1)
    log.info("%s is up (pid %d)", daemon.name, proc.pid)


def registry_digest(repo: str, tag: str) -> str | None:
    """The digest the registry serves for repo:tag, or None when it has no such tag."""
    status, headers, _ = http_get(
        f"http://{REGISTRY_ADDR}/v2/{repo}/manifests/{tag}",
        method="HEAD",
        headers={"Accept": MANIFEST_TYPES},
    )
    if status == 404:
        return None
    if status != 200:
        raise BoxError(f"registry answered {status} for {repo}:{tag}")
    return headers.get("Docker-Content-Digest")


def registry_catalog() -> list[str]:
    status, _, body = http_get(f"http://{REGISTRY_ADDR}/v2/_catalog")
    if status != 200:
        raise BoxError(f"registry answered {status} for /v2/_catalog")
    return list(json.loads(body).get("repositories") or [])


def layout_digest(layout: Path, tag: str = "latest") -> str:
    """The digest of ``tag`` in an OCI image layout directory."""
    index = json.loads((layout / "index.json").read_text())
    manifests = index.get("manifests", [])
    for m in manifests:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return str(m["digest"])
    if len(manifests) == 1:
        return str(manifests[0]["digest"])
    raise BoxError(f"{layout}/index.json has no manifest tagged {tag!r}")


def seed_images(paths: BoxPaths) -> list[str]:
    """Build the test images with tools/images/build.py and push what the registry lacks.

    Returns the names of the images that could not be built or pushed (each logged).
    """
    builder = CHECKOUT / "tools" / "images" / "build.py"
    if not builder.exists():
        log.warning("%s does not exist yet: registry not seeded", builder)
        return []
    failed = []
    for name, repo in SEED_IMAGES:
        try:
            seed_image(paths, builder, name, repo)
        except BoxError as err:
            log.error("image %s not seeded: %s", name, err)
            failed.append(name)
    return failed


def seed_image(paths: BoxPaths, builder: Path, name: str, repo: str) -> None:
    """Build one image layout (the builder caches it) and push it unless the registry has it."""
    python = VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)
    layout = paths.cache / "oci" / name
    layout.parent.mkdir(mode=0o755, exist_ok=True)
    started = time.monotonic()
    argv = [str(python), str(builder), name, "--out", str(layout)]
    log.debug("$ %s", " ".join(argv))
    # The builder's progress (stderr) goes straight to ours: a first mpi build takes a minute.
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, check=False
    )
    if proc.returncode != 0:
        raise BoxError(f"{' '.join(argv)} exited {proc.returncode} (its log is above)")
    source = layout_digest(layout)
    log.info("image %s built in %.1f s: %s", name, time.monotonic() - started, source)
    stamp = paths.cache / f"pushed-{name}.json"
    try:
        pushed = json.loads(stamp.read_text())
    except (OSError, ValueError):
        pushed = {}
    remote = registry_digest(repo, "latest")
    if remote and (remote == source or pushed == {"source": source, "pushed": remote}):
        log.info("registry has %s:latest (%s): not pushed again", repo, remote)
        return
    digestfile = paths.cache / f"pushed-{name}.digest"
    # The mirror is read-only: the box pushes through the authenticated endpoint.
    log.info("pushing %s to %s/%s:latest", layout, REGISTRY_PUSH_ADDR, repo)
    run(
        [
            "skopeo",
            "--policy",
            paths.policy_json,
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-authfile",
            paths.registry_authfile,
            "--digestfile",
            digestfile,
            f"oci:{layout}:latest",
            f"docker://{REGISTRY_PUSH_ADDR}/{repo}:latest",
        ],
        timeout=600,
    )
    digest = digestfile.read_text().strip()
    stamp.write_text(json.dumps({"source": source, "pushed": digest}) + "\n")
    log.info("pushed %s:latest as %s", repo, digest)


# --- image gateway ---------------------------------------------------------------------------


def prepare_gateway_dirs(paths: BoxPaths) -> None:
    """The store and ``gateway/`` belong to the service user (it writes nothing else)."""
    user = pwd.getpwnam(SERVICE_USER)
    for d, mode in paths.service_dirs().items():
        d.mkdir(parents=True, exist_ok=True)
        st = d.stat()
        if (st.st_uid, st.st_gid) != (user.pw_uid, user.pw_gid):
            log.info("chown %s:%s %s", SERVICE_USER, SERVICE_USER, d)
            os.chown(d, user.pw_uid, user.pw_gid)
        if st.st_mode & 0o7777 != mode:
            os.chmod(d, mode)


def gateway_ok(timeout: float = 1.0) -> bool:
    """True when something accepts connections on the gateway's address."""
    host, _, port = GATEWAY_ADDR.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def start_gateway(paths: BoxPaths, changed: set[str]) -> None:
    """Run ``shifter-gateway`` as the service user (restarted when shifter.yaml changed)."""
    daemon = gateway_daemon(paths)
    pid = daemon.pid()
    if pid and "shifter.yaml" not in changed and gateway_ok():
        log.info("gateway is running (pid %d)", pid)
        return
    if pid:
        log.info("restarting the gateway (shifter.yaml changed or it does not answer)")
        stop_pids({daemon.name: pid})
    if not GATEWAY_BIN.exists():
        raise BoxError(f"{GATEWAY_BIN} is missing: run tools/box/setup.sh")
    prepare_gateway_dirs(paths)
    user = pwd.getpwnam(SERVICE_USER)
    logfile = paths.log / "gateway.log"
    log.info("starting shifter-gateway as user %s on %s", SERVICE_USER, GATEWAY_ADDR)
    with logfile.open("ab") as sink:
        proc = subprocess.Popen(
            [str(GATEWAY_BIN), "--config", str(paths.shifter_yaml)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            cwd=paths.gateway,
            env={"PATH": DAEMON_PATH, "LANG": "C.UTF-8", "HOME": str(paths.gateway)},
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            start_new_session=True,
        )
    daemon.pidfile.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 30
    while not (daemon.pid() and gateway_ok()):
        if proc.poll() is not None:
            raise BoxError(f"shifter-gateway exited {proc.returncode}\n{tail(logfile)}")
        if time.monotonic() > deadline:
            raise BoxError(f"shifter-gateway does not answer on {GATEWAY_ADDR}\n{tail(logfile)}")
        time.sleep(0.1)
    log.info("gateway is up (pid %d)", proc.pid)


def stop_gateway(paths: BoxPaths = PATHS) -> None:
    """Stop only the gateway (start it again with ``start_gateway``)."""
    require_root()
    daemon = gateway_daemon(paths)
    if pid := daemon.pid():
        stop_pids({daemon.name: pid})
    daemon.pidfile.unlink(missing_ok=True)


@contextlib.contextmanager
def gateway_stopped(paths: BoxPaths = PATHS) -> Iterator[None]:
    """The gateway stopped for the ``with`` block, and always started again after it
    (tests of a gateway outage; other users of the box see it down only meanwhile)."""
    stop_gateway(paths)
    try:
        yield
    finally:
        start_gateway(paths, set())


def restart_gateway(paths: BoxPaths = PATHS) -> None:
    """Stop and start only the gateway (after a code change; the rest keeps running)."""
    stop_gateway(paths)
    start_gateway(paths, set())


# --- mounts and loop devices -----------------------------------------------------------------


def _unescape(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space) of /proc/self/mountinfo."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def box_mounts(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest (and most recent) first."""
    prefix = str(root).rstrip("/") + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if point == str(root) or point.startswith(prefix):
            points.append(point)
    points.reverse()
    return sorted(points, key=lambda p: p.count("/"), reverse=True)


def unmount_all(root: Path) -> None:
    for _ in range(5):
        points = box_mounts(root)
        if not points:
            return
        for point in points:
            if run(["umount", point], check=False).returncode == 0:
                log.info("unmounted %s", point)
            elif run(["umount", "--lazy", point], check=False).returncode == 0:
                log.warning("%s was busy: unmounted lazily", point)
    if box_mounts(root):
        raise BoxError(f"still mounted: {', '.join(box_mounts(root))}")


def box_loop_devices(root: Path) -> dict[str, str]:
    """/dev/loopN -> backing file, for loop devices backed by files below ``root``."""
    prefix = str(root).rstrip("/") + "/"
    found = {}
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            target = backing.read_text().strip().removesuffix(" (deleted)")
        except OSError:
            continue
        if target.startswith(prefix):
            found[f"/dev/{backing.parent.parent.name}"] = target
    return found


def detach_loops(root: Path) -> None:
    for device, target in box_loop_devices(root).items():
        if run(["losetup", "--detach", device], check=False).returncode == 0:
            log.info("detached %s (%s)", device, target)
        else:
            log.warning("could not detach %s (%s)", device, target)
    left = box_loop_devices(root)
    if left:
        # A loop device still in use (a lazily unmounted file system with a process inside)
        # only autoclears when its last user is gone.
        log.warning("still attached, in use: %s (they detach when released)", ", ".join(left))


# --- commands --------------------------------------------------------------------------------


def require_root() -> None:
    if os.geteuid() != 0:
        raise BoxError("the box must be run as root (it starts Slurm, munge and mounts)")


def ensure_fuse_for_users() -> None:
    """/dev/fuse mode 0666, as most distributions ship it (these VMs have 0600): users'
    ``shifter`` mounts images with squashfuse_ll when no prepared root is there."""
    fuse = Path("/dev/fuse")
    if fuse.exists() and fuse.stat().st_mode & 0o777 != 0o666:
        fuse.chmod(0o666)
        log.info("chmod 0666 /dev/fuse (unprivileged squashfuse_ll for shifter)")


def up(paths: BoxPaths = PATHS, *, plugin: bool = True) -> None:
    """Start everything that does not run yet."""
    require_root()
    started = time.monotonic()
    running = written_node_count(paths.slurm_conf)
    if running is not None and running != len(NODES) and slurmctld_daemon(paths).pid():
        raise BoxError(
            f"the box runs {running} nodes, not {len(NODES)}: make box-down first, then "
            f"make box NODES={len(NODES)}"
        )
    make_dirs(paths)
    changed = write_configs(paths, plugin=plugin)
    ensure_users()
    ensure_service_user()
    ensure_fuse_for_users()
    start_munge(paths)
    ensure_node_names()
    ensure_test_devices(paths)
    start_slurm(paths, changed)
    start_registry(paths, changed)
    failed = seed_images(paths)
    start_gateway(paths, changed)
    wait_nodes_idle(paths)
    write_box_env(paths)
    log.info("box is up in %.1f s; source %s", time.monotonic() - started, BOX_ENV)
    if failed:
        raise BoxError(f"the box runs, but these test images are missing: {', '.join(failed)}")


def down(paths: BoxPaths = PATHS) -> None:
    """Stop what the box started, unmount what is mounted below it, detach its loops."""
    require_root()
    started = time.monotonic()
    if slurmctld_daemon(paths).pid():
        cancel_jobs(paths)
    stopped: list[int] = []
    nodes = {d.name: p for d in slurm_daemons(paths)[1:] if (p := d.pid())}
    stepds = box_stepds(paths)
    for group in (nodes, stepds):
        stop_pids(group)
        stopped += group.values()
    # Step daemons whose slurmd exited before they did (none unless a job ignored scancel).
    stray = box_stepds(paths)
    stop_pids(stray)
    stopped += stray.values()
    reg, push = registry_daemon(paths), registry_push_daemon(paths)
    artifacts = artifact_daemons(paths)
    gateway = gateway_daemon(paths)
    for daemon in (gateway, slurmctld_daemon(paths), reg, push, *artifacts):
        if pid := daemon.pid():
            stop_pids({daemon.name: pid})
            stopped.append(pid)
    stopped += stop_box_munged(paths)
    for root in (paths.root, RUN_DIR):
        unmount_all(root)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    detach_loops(paths.root)
    for d in (*slurm_daemons(paths), reg, push, *artifacts, gateway):
        d.pidfile.unlink(missing_ok=True)
    wait_reaped(stopped)
    remove_node_names()
    remove_test_devices(paths)
    # The node count lives in slurm.conf: the next box has the default size unless
    # NODES=N asks for another.
    paths.slurm_conf.unlink(missing_ok=True)
    left = leftovers(paths)
    if left:
        raise BoxError("box-down left behind: " + "; ".join(left))
    log.info(
        "box is down in %.1f s: no process, mount or loop device of it left",
        time.monotonic() - started,
    )


def leftovers(paths: BoxPaths) -> list[str]:
    """What of the box still runs or is mounted (empty when ``down`` did its job)."""
    left = [
        f"{d.name} (pid {pid})"
        for d in (
            *slurm_daemons(paths),
            registry_daemon(paths),
            registry_push_daemon(paths),
            *artifact_daemons(paths),
            gateway_daemon(paths),
        )
        if (pid := d.pid())
    ]
    left += [f"{name} (pid {pid})" for name, pid in box_stepds(paths).items()]
    left += [f"mount {point}" for root in (paths.root, RUN_DIR) for point in box_mounts(root)]
    left += [f"loop device {dev} ({file})" for dev, file in box_loop_devices(paths.root).items()]
    left += [f"{HOSTS_FILE}: {ln}" for ln in HOSTS_FILE.read_text().splitlines()
             if ln.endswith(HOSTS_MARK)]  # fmt: skip
    return left


def wait_reaped(pids: Iterable[int], timeout: float = 10) -> None:
    """Wait until the stopped daemons have left the process table.

    They are dead already (zombies count as dead), but they were re-parented to pid 1,
    which on these VMs reaps orphans only every few seconds: until it does, ``ps`` and
    ``pgrep`` still list them as ``<defunct>``.
    """
    deadline = time.monotonic() + timeout
    left = [p for p in pids if Path(f"/proc/{p}").exists()]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if Path(f"/proc/{p}").exists()]
    if left:
        log.info("%d stopped process(es) not yet reaped by pid 1: %s", len(left), left)


def stop_box_munged(paths: BoxPaths) -> list[int]:
    """Stop munged if the box started it; return the pids stopped."""
    try:
        recorded = int(paths.munged_marker.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        recorded = None
    pid = munged_daemon().pid()
    paths.munged_marker.unlink(missing_ok=True)
    if recorded is not None and pid == recorded:
        stop_pids({"munged": pid})
        return [pid]
    if pid:
        log.info("munged (pid %d) was not started by the box: left running", pid)
    return []


def is_up(paths: BoxPaths = PATHS) -> bool:
    """A cheap check that every service of the box runs with the current configuration
    (plugin enabled if built) and the nodes are usable: when True, ``up`` has nothing to do."""
    daemons = [
        *slurm_daemons(paths),
        registry_daemon(paths),
        registry_push_daemon(paths),
        *artifact_daemons(paths),
        munged_daemon(),
        gateway_daemon(paths),
    ]
    if not all(d.pid() for d in daemons) or not configs_current(paths):
        return False
    if not registry_ok() or not registry_push_ok(paths) or not registry_artifacts_ok(paths):
        return False
    if not registry_mirror_ok(paths):
        return False
    if not gateway_ok():
        return False
    states = node_states(paths)
    return all(states.get(n) in ("idle", "mixed", "allocated", "completing") for n in NODES)


def status(paths: BoxPaths = PATHS) -> int:
    """Print what runs; 0 when everything does."""
    daemons = [
        munged_daemon(),
        *slurm_daemons(paths),
        registry_daemon(paths),
        registry_push_daemon(paths),
        *artifact_daemons(paths),
        gateway_daemon(paths),
    ]
    ok = True
    print(f"box: {paths.root}")
    for d in daemons:
        pid = d.pid()
        ok &= pid is not None
        extra = ""
        if d.name == "munged" and pid:
            by_box = paths.munged_marker.exists()
            extra = " (started by the box)" if by_box else " (not started by the box: kept)"
        print(f"  {d.name:<12} {'running, pid ' + str(pid) if pid else 'stopped'}{extra}")
    if slurmctld_daemon(paths).pid():
        states = node_states(paths, reasons=True)
        print("  nodes:       " + (", ".join(f"{n} {s}" for n, s in states.items()) or "?"))
    if registry_ok():
        print("  registry:    " + (", ".join(registry_catalog()) or "(empty)"))
    plugstack = paths.plugstack_conf
    if plugstack.exists():
        active = [ln for ln in plugstack.read_text().splitlines() if ln.startswith("required")]
        print("  plugin:      " + ("enabled" if active else "disabled (see plugstack.conf)"))
    mounts, loops = box_mounts(paths.root), box_loop_devices(paths.root)
    if mounts or loops:
        print(f"  mounts:      {len(mounts)} below the box, {len(loops)} loop device(s)")
    return 0 if ok else 1


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the box (no-op for what runs)")
    p_up.add_argument(
        "--no-plugin",
        action="store_true",
        help="write plugstack.conf with the Shifter plugin commented out",
    )
    sub.add_parser("down", help="stop the box")
    sub.add_parser("status", help="print what runs")
    sub.add_parser("restart-gateway", help="restart only the image gateway")
    args = parser.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="[box] %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "up":
            up(plugin=not args.no_plugin)
        elif args.command == "down":
            down()
        elif args.command == "restart-gateway":
            restart_gateway()
        else:
            return status()
    except BoxError as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
