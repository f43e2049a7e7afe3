"""The node check (``shifteradm doctor``): what a node needs to run Shifter jobs.

Each check gives :class:`Finding` lines: ``ok``, or a problem with what to do about it. An
``error`` is something a job would need (the command then exits non-zero); a ``warning`` is
worth a look but breaks no job. Checks read the node as it is and change nothing.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from .config import Config
from .errors import ShifterError

OK, WARNING, ERROR = "ok", "warning", "error"
PLUGIN_NAME = "shifter_spank"


@dataclass(frozen=True)
class Finding:
    """One line of the report: ``check`` (what was looked at), ``level`` (ok, warning or
    error), ``message``, and ``hint`` (what to do; empty when ok)."""

    check: str
    level: str
    message: str
    hint: str = ""

    def line(self) -> str:
        """The report's line for this finding."""
        text = f"{self.level.upper():7} {self.check}: {self.message}"
        return f"{text} ({self.hint})" if self.hint else text

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Node:
    """What the checks look at; tests point these at files of their own."""

    config: str | None = None  # the shifter.yaml (None: the default place)
    node: str = ""  # this node's Slurm name (for %n and the run directory)
    slurm_conf: str = "/etc/slurm/slurm.conf"
    proc: str = "/proc"
    dev: str = "/dev"


def ok(check: str, message: str) -> Finding:
    return Finding(check, OK, message)


def problem(check: str, message: str, hint: str, level: str = ERROR) -> Finding:
    return Finding(check, level, message, hint)


# ---- kernel -----------------------------------------------------------------------------------


def kernel_filesystems(node: Node) -> Iterator[Finding]:
    """squashfs (the prolog's loop mounts), overlay (the container's root) and FUSE (images
    served to users' own ``shifter``)."""
    try:
        with open(os.path.join(node.proc, "filesystems"), encoding="ascii") as fh:
            known = {line.split()[-1] for line in fh if line.strip()}
    except OSError as err:
        yield problem("kernel", f"cannot read /proc/filesystems: {err.strerror}", "is /proc there?")
        return
    for fs, module in (("squashfs", "squashfs"), ("overlay", "overlay"), ("fuse", "fuse")):
        if fs in known:
            yield ok("kernel", f"file system {fs}")
        else:
            yield problem("kernel", f"no {fs} file system", f"modprobe {module}")


def loop_devices(node: Node) -> Iterator[Finding]:
    path = os.path.join(node.dev, "loop-control")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if stat.S_ISCHR(mode):
        yield ok("kernel", "loop devices (/dev/loop-control)")
    else:
        yield problem("kernel", f"{path} is missing", "modprobe loop")


def user_namespaces(node: Node) -> Iterator[Finding]:
    """Users' own ``shifter`` runs in a user namespace."""
    sys_dir = os.path.join(node.proc, "sys")
    limit = _read_int(os.path.join(sys_dir, "user", "max_user_namespaces"))
    if limit is None or limit <= 0:
        yield problem(
            "kernel",
            "user namespaces are disabled (user.max_user_namespaces is 0)",
            "sysctl -w user.max_user_namespaces=63000",
        )
        return
    debian = _read_int(os.path.join(sys_dir, "kernel", "unprivileged_userns_clone"))
    if debian == 0:
        yield problem(
            "kernel",
            "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone=0)",
            "sysctl -w kernel.unprivileged_userns_clone=1",
        )
        return
    yield ok("kernel", f"user namespaces (at most {limit})")


def dev_fuse(node: Node) -> Iterator[Finding]:
    """Users open /dev/fuse to serve their image: it must be a character device all may
    read and write."""
    path = os.path.join(node.dev, "fuse")
    try:
        st = os.stat(path)
    except OSError:
        yield problem("fuse", f"{path} is missing", "modprobe fuse")
        return
    if not stat.S_ISCHR(st.st_mode):
        yield problem("fuse", f"{path} is not a character device", "mknod /dev/fuse c 10 229")
    elif st.st_mode & 0o666 != 0o666:
        mode = stat.S_IMODE(st.st_mode)
        yield problem(
            "fuse",
            f"{path} is mode {mode:04o}: users cannot serve images",
            f"chmod 0666 {path} (and a udev rule to keep it)",
        )
    else:
        yield ok("fuse", f"{path} is mode {stat.S_IMODE(st.st_mode):04o}")


def posix_acls(check: str, path: str, why: str) -> Finding:
    """Whether the file system of ``path`` takes POSIX ACLs."""
    try:
        os.getxattr(path, "system.posix_acl_access")
    except OSError as err:
        if err.errno == errno.ENOTSUP:
            return problem(check, f"{path} has no POSIX ACLs", why, level=WARNING)
        if err.errno != errno.ENODATA:
            return problem(check, f"cannot look at {path}: {err.strerror}", why, level=WARNING)
    return ok(check, f"{path} takes POSIX ACLs")


# ---- configuration, plugin, gateway ----------------------------------------------------------


def configuration(node: Node) -> tuple[Finding, Config | None]:
    """The configuration as the prolog reads it: root's alone, valid (nothing is written:
    not even the start-up cache that loading it leaves)."""
    from . import config, config_file

    path = config_file.config_path(node.config, privileged=True)
    try:
        config_file.check_privileged_file(path)
        with open(path, encoding="utf-8") as fh:
            loaded = config.parse(fh.read(), path)
    except ShifterError as err:
        return problem("config", err.message, err.hint or "fix the configuration file"), None
    except (OSError, UnicodeDecodeError) as err:
        return problem("config", f"cannot read {path}: {err}", "is it there, UTF-8?"), None
    return ok("config", f"{path} is valid and root's alone"), loaded


def slurm_version() -> tuple[int, int] | None:
    """The (major, minor) of this node's slurmd, from ``slurmd -V``."""
    slurmd = shutil.which("slurmd") or shutil.which("slurmd", path="/usr/sbin:/sbin")
    if slurmd is None:
        return None
    try:
        out = subprocess.run([slurmd, "-V"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"(\d+)\.(\d+)\.\d+", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def plugin_version(path: str) -> int | None:
    """The ``plugin_version`` a SPANK plugin was built with (SLURM_VERSION_NUMBER), read from
    its ELF file through ``readelf`` (loading it would need slurmstepd's symbols)."""
    readelf = shutil.which("readelf")
    if readelf is None:
        return None
    try:
        symbols = subprocess.run([readelf, "-Ws", path], capture_output=True, text=True,
                                 timeout=10).stdout  # fmt: skip
        sections = subprocess.run([readelf, "-WS", path], capture_output=True, text=True,
                                  timeout=10).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    symbol = re.search(r"^\s*\d+:\s+([0-9a-f]+)\s+4\s+OBJECT\s+\S+\s+\S+\s+(\d+)\s+plugin_version$",
                       symbols, re.M)  # fmt: skip
    if symbol is None:
        return None
    address, index = int(symbol.group(1), 16), symbol.group(2)
    section = re.search(rf"^\s*\[\s*{index}\]\s+\S+\s+\S+\s+([0-9a-f]+)\s+([0-9a-f]+)\s", sections,
                        re.M)  # fmt: skip
    if section is None:
        return None
    offset = address - int(section.group(1), 16) + int(section.group(2), 16)
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return int.from_bytes(fh.read(4), "little")
    except OSError:
        return None


def plugstack_path(slurm_conf: str) -> str:
    """Where slurm.conf says the SPANK configuration is (PlugStackConfig), else beside it."""
    try:
        with open(slurm_conf, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.split("#", 1)[0].partition("=")
                if key.strip().lower() == "plugstackconfig" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return os.path.join(os.path.dirname(slurm_conf), "plugstack.conf")


def spank_plugin(node: Node) -> Iterator[Finding]:
    """The shim is listed in plugstack.conf, is there, is root's, and was built for the
    Slurm on this node."""
    stack = plugstack_path(node.slurm_conf)
    try:
        with open(stack, encoding="utf-8", errors="replace") as fh:
            lines = [line.split("#", 1)[0].split() for line in fh]
    except OSError as err:
        yield problem("plugin", f"cannot read {stack}: {err.strerror}",
                      f"add 'required /PATH/{PLUGIN_NAME}.so' to it")  # fmt: skip
        return
    entries = [w for w in lines if len(w) >= 2 and PLUGIN_NAME in os.path.basename(w[1])]
    if not entries:
        yield problem("plugin", f"{stack} does not list {PLUGIN_NAME}.so",
                      f"add 'required /PATH/{PLUGIN_NAME}.so config=/etc/shifter/shifter.yaml'")
        return  # fmt: skip
    path = entries[0][1]
    try:
        st = os.stat(path)
    except OSError as err:
        yield problem("plugin", f"{path} (in {stack}): {err.strerror}", "make plugin; install it")
        return
    if st.st_uid != 0 or st.st_mode & 0o022:
        yield problem("plugin", f"{path} is not root's alone (others may change it)",
                      f"chown root {path}; chmod go-w {path}")  # fmt: skip
    built = plugin_version(path)
    running = slurm_version()
    if built is None or running is None:
        yield problem("plugin", f"cannot tell which Slurm {path} was built for",
                      "is binutils (readelf) installed, and slurmd?", level=WARNING)  # fmt: skip
        return
    major, minor = built >> 16 & 0xFF, built >> 8 & 0xFF
    if (major, minor) != running:
        yield problem(
            "plugin",
            f"{path} was built for Slurm {major}.{minor:02d}, this node runs "
            f"{running[0]}.{running[1]:02d}",
            "rebuild it against this Slurm's headers (make plugin)",
        )
    else:
        yield ok("plugin", f"{path} is listed in {stack}, built for Slurm {major}.{minor:02d}")


def gateway(loaded: Config) -> Finding:
    """The gateway answers a munge-authenticated call."""
    from .client import GatewayClient

    site = loaded.gateway
    try:
        with GatewayClient(site.url, timeout=10, gateway_user=site.user) as client:
            client.ping()
    except ShifterError as err:
        hint = err.hint or "is shifter-gateway running?"
        return problem("gateway", f"{site.url}: {err.message}", hint)
    except Exception as err:  # an unreachable address, refused connection...
        return problem("gateway", f"{site.url}: {err}", "is shifter-gateway running?")
    return ok("gateway", f"{site.url} answers, munge works")


def artifact_registry(loaded: Config) -> Finding:
    """In registry mode: the node's credential is root's alone and the registry takes it."""
    from .errors import NodeFault
    from .slurm.container import node_artifacts

    try:
        registry = node_artifacts(loaded)
        registry.metadata("0" * 64)  # any answer but 401/403 proves the credential
    except NodeFault as err:
        return problem("artifacts", err.message, err.hint or "see artifacts in shifter.yaml")
    except ShifterError as err:
        return problem("artifacts", err.message, err.hint or "is the artifact registry up?")
    return ok("artifacts", f"{registry.url} answers and takes the node's credential")


# ---- node directories -------------------------------------------------------------------------


def run_dir(loaded: Config, node: Node) -> Iterator[Finding]:
    """The run directory is root's and nobody else may write in it; job directories of jobs
    no longer on this node are leftovers."""
    path = loaded.runtime.run_dir
    try:
        st = os.stat(path)
    except FileNotFoundError:
        yield ok("run_dir", f"{path} does not exist yet (the first job makes it)")
        return
    except OSError as err:
        yield problem("run_dir", f"{path}: {err.strerror}", "check the file system")
        return
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
        yield problem("run_dir", f"{path} is not a directory of root's that only root writes",
                      f"rm -rf {path} (no job running) or chown root; chmod 755 {path}")
        return  # fmt: skip
    yield ok("run_dir", f"{path} is root's, mode {stat.S_IMODE(st.st_mode):04o}")
    yield posix_acls("run_dir", path, "users' shifter in jobs builds private roots instead")
    yield from leftovers(os.path.join(path, node.node) if node.node else "", node)


def running_jobs(node: Node) -> set[str] | None:
    """Ids of the jobs Slurm has on this node (None: Slurm cannot be asked)."""
    squeue = shutil.which("squeue")
    if squeue is None or not node.node:
        return None
    env = {**os.environ, "SLURM_CONF": node.slurm_conf}
    try:
        proc = subprocess.run([squeue, "-h", "-w", node.node, "-t", "R,CG,S,CF", "-o", "%i"],
                              capture_output=True, text=True, timeout=20, env=env)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(proc.stdout.split()) if proc.returncode == 0 else None


def leftovers(node_dir: str, node: Node) -> Iterator[Finding]:
    """Job directories whose job Slurm no longer has on this node (its epilog did not run)."""
    if not node_dir or not os.path.isdir(node_dir):
        return
    jobs = running_jobs(node)
    if jobs is None:
        yield problem("leftovers", "cannot ask Slurm which jobs run here", "is squeue there?",
                      level=WARNING)  # fmt: skip
        return
    dead = sorted(j for j in os.listdir(node_dir) if j.isdigit() and j not in jobs)
    for job in dead:
        yield problem(
            "leftovers",
            f"{os.path.join(node_dir, job)}: job {job} is no longer on this node",
            "its epilog did not run: drain the node, umount -R and remove the directory",
            level=WARNING,
        )
    if not dead:
        yield ok("leftovers", f"no directory of a dead job in {node_dir}")


def node_cache(loaded: Config, node: Node) -> Iterator[Finding]:
    """The node's image cache can be made or written, with room for its size."""
    from .options import parse_size

    slurm = loaded.slurm
    path = slurm.node_cache.replace("%n", node.node or os.uname().nodename)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        yield problem("node_cache", f"{existing} is not writable (for {path})",
                      "run the check as root; give the cache a local disk")  # fmt: skip
        return
    free = shutil.disk_usage(existing).free
    size = 0 if slurm.node_cache_size == "0" else parse_size(slurm.node_cache_size)
    if size and free < size:
        yield problem(
            "node_cache",
            f"{path}: {free >> 20} MiB free, the cache may take {size >> 20} MiB",
            "free space or lower slurm.node_cache_size",
            level=WARNING,
        )
    else:
        yield ok("node_cache", f"{path} ({free >> 20} MiB free)")


# ---- the whole check --------------------------------------------------------------------------


def check(node: Node) -> list[Finding]:
    """Every check, in the report's order."""
    findings: list[Finding] = []
    steps: list[Callable[[Node], Iterator[Finding]]] = [
        kernel_filesystems,
        loop_devices,
        user_namespaces,
        dev_fuse,
    ]
    for step in steps:
        findings.extend(step(node))
    found, loaded = configuration(node)
    findings.append(found)
    findings.extend(spank_plugin(node))
    if loaded is not None:
        if loaded.slurm.image_source == "registry":
            findings.append(artifact_registry(loaded))
        else:
            why = "private images need them"
            findings.append(posix_acls("store", loaded.image_path, why))
        findings.append(gateway(loaded))
        findings.extend(run_dir(loaded, node))
        findings.extend(node_cache(loaded, node))
    return findings


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None
