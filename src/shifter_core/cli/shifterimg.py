"""``shifterimg``: pull, look up, list, import and manage images through the image gateway.

Usage::

    shifterimg [-v] pull [--platform P] [-u USERS] [-g GROUPS] REF
    shifterimg lookup [--platform P] REF         # prints the image id
    shifterimg images [--json]
    shifterimg login [-u USER] [--password-stdin] [REGISTRY]
    shifterimg import FILE NAME
    shifterimg expire [--days N | ID ...]        # admins
    shifterimg rm [--platform P] REF|ID          # admins
    shifterimg status [--json] [JOB]

Every failure exits 1 with the gateway's message (2 for usage errors); ``pull`` and ``import``
exit 0 only once the image is READY.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from ..errors import ShifterError
from ..gateway.models import FINAL_STATES, ImageEntry, JobState

if TYPE_CHECKING:
    from ..client import GatewayClient
    from ..gateway.models import JobInfo

log = logging.getLogger("shifterimg")

PROG = "shifterimg"


def _out(text: str = "", stream: TextIO | None = None) -> None:
    """CLI output (the command's result) on stdout."""
    (stream or sys.stdout).write(text + "\n")
    (stream or sys.stdout).flush()


def _err(text: str) -> None:
    sys.stderr.write(f"{PROG}: {text}\n")
    sys.stderr.flush()


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _human_size(n: int) -> str:
    """``n`` bytes as ``ls -h`` shows them: powers of 1024, one decimal below 10 (``1.2M``),
    none above (``120M``); bytes as ``512B``."""
    if n < 1024:
        return f"{n}B"
    value = float(n)
    for unit in "KMGTPE":
        value /= 1024
        text = f"{value:.1f}" if value < 9.95 else f"{value:.0f}"
        if float(text) < 1024 or unit == "E":
            return text + unit
    raise AssertionError("unreachable")  # pragma: no cover


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts)) if ts else "-"


def _csv(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for value in values or []:
        out += [v.strip() for v in value.replace(";", ",").split(",") if v.strip()]
    return out


# -- configuration and client -----------------------------------------------------------------


def _client(args: argparse.Namespace) -> GatewayClient:
    from .. import config
    from ..client import GatewayClient

    site = config.load().gateway
    # Secrets are restricted to the gateway's user of the site config (root-owned), never to
    # a user that some answer from the network names.
    return GatewayClient(args.gateway or site.url, gateway_user=site.user)


# -- progress ---------------------------------------------------------------------------------


class PlainProgress:
    """Progress as plain lines: every state change, every finished layer, and the bytes
    downloaded every ``every`` seconds of a long download (batch logs show it moving)."""

    def __init__(self, stream: TextIO, every: float = 10.0) -> None:
        self.stream = stream
        self.state: JobState | None = None
        self.finished: set[str] = set()
        self.every = every
        self.last = time.monotonic()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, job: JobInfo) -> None:
        state = job.state
        if state != self.state:
            self.state = state
            detail = f": {job.message}" if job.message and state != JobState.FAILED else ""
            _out(f"{state}{detail}", self.stream)
        info = job.progress
        for layer in info.layers if info is not None else ():
            if layer.complete and layer.digest not in self.finished:
                self.finished.add(layer.digest)
                _out(f"  layer {layer.digest[:19]} {_size(layer.total)}", self.stream)
        now = time.monotonic()
        due = now - self.last >= self.every
        if state == JobState.PULLING and info is not None and info.total and due:
            self.last = now
            _out(f"  {_size(info.done)} of {_size(info.total)} ({_size(info.rate)}/s)", self.stream)


class RichProgress:
    """A progress bar on a terminal: state, bytes, rate, layers done."""

    def __init__(self, stream: TextIO, title: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[layers]}"),
            TimeElapsedColumn(),
            console=Console(file=stream),
        )
        self.task = self.progress.add_task(JobState.PENDING.value, total=None, layers=title)

    def __enter__(self) -> RichProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, job: JobInfo) -> None:
        info = job.progress
        layers = info.layers if info is not None else ()
        kwargs: dict[str, Any] = {"description": job.state.value}
        if info is not None and layers:
            done_layers = sum(1 for layer in layers if layer.complete)
            kwargs.update(
                total=info.total or None,
                completed=info.done,
                layers=f"layers {done_layers}/{len(layers)}",
            )
        if job.state in (JobState.CONVERTING, JobState.READY) and info is not None and info.total:
            kwargs["completed"] = info.total
        self.progress.update(self.task, **kwargs)


class Display(Protocol):
    """A way to show a job's progress."""

    def __enter__(self) -> Display: ...
    def __exit__(self, *exc: object) -> None: ...
    def update(self, job: JobInfo) -> None: ...


def _wait(client: GatewayClient, job: JobInfo, title: str) -> JobInfo:
    """Follow a job to READY or FAILED, with progress on stdout."""
    tty = sys.stdout.isatty()
    display: Display = RichProgress(sys.stdout, title) if tty else PlainProgress(sys.stdout)

    def lost(err: Exception) -> None:
        _err(f"{err}; retrying (the job continues when the gateway is back)")

    last = job
    with display:
        display.update(job)
        if job.state not in FINAL_STATES:

            def update(current: JobInfo) -> None:
                nonlocal last
                last = current
                display.update(current)

            last = client.wait(job.id, update, on_disconnect=lost)
    if tty and last.state == JobState.READY:
        _out(JobState.READY.value)
    return last


# -- commands ---------------------------------------------------------------------------------


def cmd_pull(args: argparse.Namespace) -> int:
    from ..image.registry.credentials import CredentialStore
    from ..reference import DockerReference

    reference = (
        args.reference[len("docker:") :] if args.reference.startswith("docker:") else args.reference
    )
    ref = DockerReference.parse(reference)
    secret = None
    creds = CredentialStore().get(ref.registry)
    if creds is not None:
        secret = {"registry": ref.registry, "username": creds[0], "password": creds[1]}
        log.info("using the stored credentials of %s for %s", creds[0], ref.registry)
    users = _csv(args.users)
    groups = _csv(args.groups)
    with _client(args) as client:
        job = client.pull(
            reference, platform=args.platform, users=users, groups=groups, secret=secret
        )
        _out(f"pulling {job.reference} ({job.platform}), job {job.id}")
        final = _wait(client, job, str(ref))
    if final.state == JobState.READY:  # the name may mean another image now: ask again
        from ..usercache import forget

        forget(os.getuid(), os.environ)
    return _finish(final)


def _finish(job: JobInfo) -> int:
    if job.state == JobState.READY:
        _out(f"image {job.reference} is READY: {job.image_id}")
        return 0
    _err(job.message or f"job {job.id} ended {job.state}")
    return 1


def cmd_lookup(args: argparse.Namespace) -> int:
    with _client(args) as client:
        image = client.lookup(args.reference, args.platform)
    _out(image.id)
    return 0


def _image_fields(image: ImageEntry) -> dict[str, Any]:
    """Every field of the gateway's entry, the same keys for every image (``job`` is null
    for a READY image, where the wire form leaves it out)."""
    return {**dict.fromkeys(ImageEntry._fields), **image.to_dict()}


def cmd_images(args: argparse.Namespace) -> int:
    """The images the caller may use (and pulls in progress): a table, or ``--json``."""
    with _client(args) as client:
        images = client.images()
    if args.json:
        _out(json.dumps([_image_fields(i) for i in images], indent=2, sort_keys=True))
        return 0
    rows = [("STATUS", "ID", "PULLED", "SIZE", "PRIVATE", "PLATFORM", "REFERENCE")]
    for image in images:
        rows.append(
            (
                image.status.value,
                (image.id or "-")[:12],
                _when(image.pulled),
                _human_size(image.size) if image.size else "-",  # a pull in progress: none yet
                "yes" if image.private else "no",
                image.platform or "-",
                image.reference,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    size = rows[0].index("SIZE")
    for row in rows:
        cells = [
            c.rjust(w) if i == size else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=False))
        ]
        _out("  ".join(cells) + "  " + row[-1])
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from ..client import GatewayUnreachable
    from ..image.registry.credentials import CredentialStore, normalize_registry

    registry = normalize_registry(args.registry)
    username = args.username
    if not username:
        sys.stderr.write(f"Username for {registry}: ")
        sys.stderr.flush()
        username = sys.stdin.readline().strip()
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {username}@{registry}: ")
    if not username or not password:
        _err("a username and a password are needed")
        return 1
    try:
        with _client(args) as client:
            result = client.login(registry, username, password)
        if result.verified:
            _out(result.result)
        else:
            _err(f"warning: {result.result}; storing the credentials unverified")
    except GatewayUnreachable as err:
        _err(f"warning: {err}; storing the credentials unverified")
    store = CredentialStore()
    store.set(registry, username, password)
    _out(f"credentials for {registry} stored in {store.path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _out(f"uploading {args.file} as {args.name}")
        job = client.import_file(args.file, args.name)
        _out(f"importing {job.reference}, job {job.id}")
        final = _wait(client, job, args.name)
    return _finish(final)


def cmd_expire(args: argparse.Namespace) -> int:
    if args.days is not None and args.ids:
        _err("give either --days or image ids, not both")
        return 2
    with _client(args) as client:
        removed = client.expire(days=args.days, ids=args.ids)
    for image_id in removed:
        _out(f"removed {image_id}")
    if not removed:
        _out("no image expired")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        removed = client.remove(args.image, args.platform)
    for image_id in removed:
        _out(f"removed {image_id}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.job:
            job = client.job(args.job)
            if args.json:
                _out(json.dumps(job.to_dict(), indent=2, sort_keys=True))
            else:
                fields = job.to_dict()
                for key in ("id", "kind", "reference", "platform", "state", "message", "image_id"):
                    _out(f"{key + ':':<11}{fields[key] if fields[key] is not None else ''}")
                _out(f"{'private:':<11}{'yes' if job.private else 'no'}")
                _out(f"{'requester:':<11}{job.requester}")
                _out(f"{'created:':<11}{_when(job.created)}")
                _out(f"{'finished:':<11}{_when(job.finished)}")
            return 1 if job.state == JobState.FAILED else 0
        jobs = client.jobs()
    if args.json:
        _out(json.dumps([j.to_dict() for j in jobs], indent=2, sort_keys=True))
        return 0
    for job in jobs:
        message = job.message.splitlines()[0] if job.message else ""
        _out(
            f"{job.id}  {job.state.value:<10}  {_when(job.created)}  "
            f"{job.reference}  {message[:80]}"
        )
    return 0


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Pull and manage Shifter images through the image gateway."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    parser.add_argument("--gateway", help="gateway URL (default: gateway.url of the site config)")
    # Shifter's placement: shifterimg -u USERS -g GROUPS pull REF
    parser.add_argument("-u", "--user", dest="users", action="append", help=argparse.SUPPRESS)
    parser.add_argument("-g", "--group", dest="groups", action="append", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], text: str) -> Any:
        p = sub.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        return p

    p = add("pull", cmd_pull, "pull an image into the image store and wait until it is READY")
    p.add_argument("--platform", help="OS/ARCH[/VARIANT] (default: the gateway's)")
    p.add_argument(
        "-u",
        "--user",
        dest="users",
        action="append",
        default=argparse.SUPPRESS,
        help="make the image private to these users too (comma-separated; repeatable)",
    )
    p.add_argument(
        "-g",
        "--group",
        dest="groups",
        action="append",
        default=argparse.SUPPRESS,
        help="make the image private to these groups too (comma-separated; repeatable)",
    )
    p.add_argument("reference", metavar="REF", help="image reference, e.g. ubuntu:22.04")
    p = add("lookup", cmd_lookup, "print the id of an image in the store")
    p.add_argument("--platform")
    p.add_argument("reference", metavar="REF")
    p = add("images", cmd_images, "list the images you can use")
    p.add_argument("--json", action="store_true", help="everything, as JSON")
    p = add("login", cmd_login, "store registry credentials for your pulls (checked first)")
    p.add_argument("-u", "--username", help="user name (prompted for otherwise)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("registry", metavar="REGISTRY", nargs="?", default="docker.io")
    p = add("import", cmd_import, "import a docker-archive, OCI layout tar or squashfs file")
    p.add_argument("file", metavar="FILE")
    p.add_argument("name", metavar="NAME", help="the name to use it by, e.g. myimage:1.0")
    p = add("expire", cmd_expire, "remove images unused for N days, or given ids (admins)")
    p.add_argument("--days", type=float)
    p.add_argument("ids", metavar="ID", nargs="*")
    p = add("rm", cmd_rm, "remove an image (admins)")
    p.add_argument("--platform")
    p.add_argument("image", metavar="REF|ID")
    p = add("status", cmd_status, "show your recent jobs, or one job")
    p.add_argument("--json", action="store_true")
    p.add_argument("job", metavar="JOB", nargs="?")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format=f"{PROG}: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except ShifterError as err:
        _err(str(err))
        return 1
    except KeyboardInterrupt:
        _err("interrupted (a pull goes on on the gateway: see shifterimg status)")
        return 130
    except OSError as err:
        _err(str(err))
        return 1
    except Exception as err:  # the edge: never a traceback for a user
        if args.verbose:
            import traceback

            sys.stderr.write(traceback.format_exc())
        detail = str(err).splitlines()[0] if str(err) else ""
        _err(
            f"internal error: {type(err).__name__}"
            + (f": {detail}" if detail else "")
            + ("" if args.verbose else " (run with -v for details)")
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
