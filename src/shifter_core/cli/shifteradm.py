"""``shifteradm``: the administrator's tools.

Usage::

    shifteradm import-udiroot FILE [-o OUT] [--force]
    shifteradm doctor [--config FILE] [--node NAME] [--slurm-conf FILE] [--json]

``import-udiroot`` turns a legacy NERSC Shifter ``udiRoot.conf`` into ``shifter.yaml``
(:mod:`shifter_core.udiroot`): the YAML goes to OUT (written atomically; an existing file
only with ``--force``) or to stdout, and every setting not carried over, or carried over
with another behaviour, is one line on stderr. Exit status: 0 when the result validates,
1 when no valid configuration can be made (or on any other failure), 2 on a usage error.

``doctor`` checks this node (:mod:`shifter_core.doctor`): one line per finding, a problem
with what to do about it; exit 1 when something a job needs is missing, else 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from ..errors import ShifterError

PROG = "shifteradm"
MAX_INPUT = 4 << 20  # bytes read from a udiRoot.conf (the converter takes 1 Mi characters)


def _err(text: str) -> None:
    sys.stderr.write(f"{PROG}: {text}\n")
    sys.stderr.flush()


def _read_text(path: str) -> str:
    """The UTF-8 text of ``path`` (``-``: stdin), bounded."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_INPUT + 1)
        else:
            with open(path, "rb") as fh:
                data = fh.read(MAX_INPUT + 1)
    except OSError as err:
        raise ShifterError(f"cannot read {path}: {err.strerror}") from None
    if len(data) > MAX_INPUT:
        raise ShifterError(f"{path} is larger than {MAX_INPUT} bytes", hint="is it a udiRoot.conf?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ShifterError(
            f"{path} is not UTF-8 text (byte {err.start})", hint="is it a udiRoot.conf?"
        ) from None


def _check_output(path: str, force: bool) -> None:
    if os.path.isdir(path):
        raise ShifterError(f"{path} is a directory", hint="give a file name with -o")
    if os.path.lexists(path) and not force:
        raise ShifterError(f"{path} exists", hint="use --force to replace it")


def _write(path: str, text: str, force: bool) -> None:
    """Write ``text`` to ``path`` atomically (mode 0644), refusing to replace a file unless
    ``force``."""
    from ..fsutil import atomic_file

    _check_output(path, force)
    try:
        with atomic_file(path, mode=0o644, sync=True) as fh:
            fh.write(text.encode("utf-8"))
    except OSError as err:
        raise ShifterError(f"cannot write {path}: {err.strerror}") from None


def import_udiroot(args: argparse.Namespace) -> int:
    """Convert, report, validate, write."""
    from .. import config, udiroot

    output = args.output if args.output not in (None, "-") else None
    if output is not None:
        _check_output(output, args.force)
    text = _read_text(args.file)
    values, problems = udiroot.convert(text)
    for problem in problems:
        _err(f"{args.file}: {problem}")
    yaml_text = udiroot.render(values, args.file, problems)
    try:
        config.parse(yaml_text, output or "<stdout>")
    except ShifterError as err:
        raise ShifterError(f"the converted configuration does not validate: {err}") from None
    dropped = sum(not p.changed for p in problems)
    summary = f"{dropped} not carried over, {len(problems) - dropped} carried over differently"
    if output is None:
        sys.stdout.write(yaml_text)
        sys.stdout.flush()
        _err(f"converted {args.file} ({summary})")
    else:
        _write(output, yaml_text, args.force)
        _err(f"wrote {output} from {args.file} ({summary})")
    return 0


def doctor(args: argparse.Namespace) -> int:
    """Check this node; print the findings (text or JSON)."""
    import json

    from .. import doctor as node_check

    node = node_check.Node(
        config=args.config,
        node=args.node or os.environ.get("SLURMD_NODENAME", "") or os.uname().nodename,
        slurm_conf=args.slurm_conf or os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"),
    )
    findings = node_check.check(node)
    failed = any(f.level == node_check.ERROR for f in findings)
    if args.json:
        report = {"node": node.node, "ok": not failed, "findings": [f.as_dict() for f in findings]}
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        shown = [f for f in findings if args.verbose or f.level != node_check.OK]
        sys.stdout.write("".join(f.line() + "\n" for f in shown))
        problems = sum(f.level != node_check.OK for f in findings)
        verdict = "FAILED" if failed else "passed"
        sys.stdout.write(f"node {node.node}: {verdict} ({len(findings)} checks, "
                         f"{problems} problems)\n")  # fmt: skip
    sys.stdout.flush()
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Shifter administration tools.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    imp = commands.add_parser(
        "import-udiroot",
        help="convert a legacy NERSC Shifter udiRoot.conf into shifter.yaml",
        description="Convert a legacy NERSC Shifter udiRoot.conf into shifter.yaml. Every "
        "setting not carried over (or carried over with another behaviour) is reported on "
        "stderr, one line each. Exits 0 when the result validates.",
    )
    imp.add_argument("file", metavar="FILE", help="the udiRoot.conf to read (- for stdin)")
    imp.add_argument(
        "-o", "--output", metavar="OUT", help="write shifter.yaml here (default: stdout)"
    )
    imp.add_argument("--force", action="store_true", help="replace OUT if it exists")
    imp.set_defaults(func=import_udiroot)
    doc = commands.add_parser(
        "doctor",
        help="check that this node can run Shifter jobs",
        description="Check this node: kernel features, /dev/fuse, the configuration, the SPANK "
        "plugin, the gateway (through munge), the run directory, the node cache and leftovers "
        "of dead jobs. One line per problem, with what to do; exits 1 when something a job "
        "needs is missing.",
    )
    doc.add_argument("--config", metavar="FILE", help="shifter.yaml (default: the site's)")
    doc.add_argument("--node", metavar="NAME", help="this node's Slurm name (default: hostname)")
    doc.add_argument("--slurm-conf", metavar="FILE", help="slurm.conf (default: $SLURM_CONF)")
    doc.add_argument("--json", action="store_true", help="print the findings as JSON")
    doc.add_argument("-v", "--verbose", action="store_true", help="print the passed checks too")
    doc.set_defaults(func=doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ShifterError as err:
        _err(str(err))
        return 1
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except Exception as err:  # the edge: never a traceback for an administrator
        detail = str(err).splitlines()[0] if str(err) else ""
        _err(f"internal error: {type(err).__name__}" + (f": {detail}" if detail else ""))
        return 1


if __name__ == "__main__":
    sys.exit(main())
