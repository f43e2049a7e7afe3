"""``shifter``: run a command in a container image, as yourself.

See :data:`HELP` for the options. Option parsing stops at the first argument that is not an
option (or after ``--``), so ``shifter --image=x ls -l`` passes ``-l`` to ``ls``.
"""

from __future__ import annotations

import os
import sys

from ..errors import ShifterError

PROG = "shifter"

HELP = f"""\
usage: {PROG} [OPTIONS] [COMMAND [ARG...]]

Run COMMAND in a container made from an image, as yourself (your uid, gid and groups, no
capabilities, no way to gain privilege). The image is read-only; /tmp and volumes are
writable where you may write. shifter needs no privilege: it uses a user namespace, in which
your groups other than the primary one still count but show as nogroup (65534), except in a
Slurm job made with --image, whose prolog maps them all.

Without COMMAND: with --entrypoint, the image's ENTRYPOINT and CMD run; otherwise your
shell ($SHELL, else your login shell) runs.

options:
  -i, --image=[TYPE:]NAME
                         the image: docker:NAME[:TAG] (or just NAME) resolved by the image
                         gateway, or id:HEX. Without it, see "image" below
  -V, --volume=SRC:DST[:ro|:rw|:perNodeCache=size=N]
                         bind SRC of the host at DST in the container (rw unless :ro);
                         repeat it or join several with ';'. SRC must be readable by you.
                         DST may not be /, /etc, /var, /proc, /sys, /dev, /opt/udiImage or
                         below them (site-configurable); missing directories are created.
                         perNodeCache (node-local scratch) works in Slurm jobs only
  --entrypoint[=PROG]    run the image's ENTRYPOINT with COMMAND as its arguments (the
                         image's CMD when no COMMAND is given; no ENTRYPOINT: the CMD);
                         =PROG runs PROG instead, with COMMAND only
  -w, --workdir[=DIR]    start in DIR; alone: the image's WORKDIR (/ if it has none). DIR
                         only attached (-wDIR, --workdir=DIR). Default: the current
                         directory if it exists in the container, else /
  -e, --env=NAME=VALUE   set a variable (NAME alone: copy it from your environment); a name
                         is letters, digits and _, not starting with a digit
  --env-file=FILE        variables from FILE, one NAME=VALUE a line (# comments), read
                         on the host
  -E, --clearenv         start from an empty environment instead of yours
  -m, --module=A[,B]     load site modules (GPU, MPI ...) besides the defaults;
                         --module=none loads none, not even the defaults
  --writable-tmpfs       let the image be written (changes vanish at exit)
  -v, --verbose          say what happens
  -h, --help             show this help
Long options may be shortened to a unique prefix (--entry, --vol); a value may follow as
the next argument except where it is optional ([=...]). -n is accepted and ignored, as
NERSC Shifter does. Options end at the first argument that is not one (or at --).

image, the first of: --image; SHIFTER_IMAGETYPE and SHIFTER_IMAGE together (e.g.
SHIFTER_IMAGETYPE=docker SHIFTER_IMAGE=ubuntu:22.04, as NERSC Shifter reads them);
SHIFTER_IMAGE alone, the image id of the Slurm job made with --image you are in
(SHIFTER_IMAGEREQUEST says what it asked for); SHIFTER_IMAGEREQUEST. An image from the
environment comes with SHIFTER_VOLUME and SHIFTER_MODULE (the job's) unless -V or -m are
given; --image does not.

environment, lowest precedence first: yours (unless -E), the image's ENV, --env-file (in
order), --env (in order), modules, the site; then SHIFTER_IMAGE (the image id),
SHIFTER_IMAGEREQUEST and SHIFTER_RUNTIME=1 are set.

exit status: COMMAND's own; 125 when shifter fails, 126 when COMMAND cannot be run, 127
when it is not found in the container; 2 for a command line shifter cannot read (an
unknown option, a missing value, no image).
"""

EXIT_FAILED = 125  # 126 and 127 come with CommandError.exit_code
MISS_VARIABLE = "SHIFTER_LAUNCH_MISS"  # the C launcher had no recipe (runtime/launch.py)


class UsageError(Exception):
    """A malformed command line."""


class Options:
    """The parsed command line."""

    def __init__(self) -> None:
        self.image: str | None = None
        self.volumes: list[str] = []
        self.modules: str | None = None
        self.env: list[str] = []
        self.env_files: list[str] = []
        self.clearenv = False
        self.entrypoint: str | None = None
        self.workdir: str | None = None
        self.writable_tmpfs = False
        self.verbose = 0
        self.help = False
        self.command: list[str] = []
        self.option_args: list[str] = []  # the options as given (the launcher's cache key)


# long name -> (attribute, takes: "required" | "optional" | "none"); Shifter's own options and
# --writable-tmpfs. A long option may be shortened to a unique prefix, as getopt_long allows.
_LONG = {
    "image": ("image", "required"),
    "volume": ("volumes", "required"),
    "entrypoint": ("entrypoint", "optional"),
    "workdir": ("workdir", "optional"),
    "env": ("env", "required"),
    "env-file": ("env_files", "required"),
    "clearenv": ("clearenv", "none"),
    "module": ("modules", "required"),
    "writable-tmpfs": ("writable_tmpfs", "none"),
    "verbose": ("verbose", "none"),
    "help": ("help", "none"),
}
# Shifter's getopt letters (hnvV:i:e:Ew:m:); -n does nothing there and nothing here. -w's
# value is optional, so only attached (-wDIR), as the C launcher reads it too.
_SHORT = {
    "i": "image",
    "V": "volume",
    "w": "workdir",
    "e": "env",
    "E": "clearenv",
    "m": "module",
    "v": "verbose",
    "h": "help",
    "n": None,
}


def _long_name(given: str) -> str:
    """The long option ``given`` names: itself, else the one option it is a prefix of."""
    if given in _LONG:
        return given
    matches = [name for name in _LONG if given and name.startswith(given)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        listed = ", ".join(f"--{name}" for name in matches)
        raise UsageError(f"option --{given} is ambiguous: it could be {listed}")
    raise UsageError(f"unknown option --{given}")


def _store(options: Options, attribute: str, value: str | None) -> None:
    current = getattr(options, attribute)
    if isinstance(current, list):
        current.append(value)
    elif attribute == "verbose":
        options.verbose += 1
    elif isinstance(current, bool) or attribute in ("clearenv", "writable_tmpfs", "help"):
        setattr(options, attribute, True)
    elif attribute in ("entrypoint", "workdir"):
        setattr(options, attribute, value or "")
    else:
        setattr(options, attribute, value)


def parse_args(argv: list[str]) -> Options:
    """Parse options up to the first non-option; the rest is the command."""
    options = Options()
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            index += 1
            break
        if arg.startswith("--"):
            given, sep, value = arg[2:].partition("=")
            name = _long_name(given)
            attribute, takes = _LONG[name]
            if takes == "none" and sep:
                raise UsageError(f"option --{name} takes no value")
            if takes == "required" and not sep:
                index += 1
                if index >= len(argv):
                    raise UsageError(f"option --{name} needs a value")
                value = argv[index]
            _store(options, attribute, value if (sep or takes == "required") else None)
            index += 1
            continue
        if arg.startswith("-") and len(arg) > 1:
            position = 1
            while position < len(arg):
                letter = arg[position]
                if letter not in _SHORT:
                    raise UsageError(f"unknown option -{letter}")
                long_name = _SHORT[letter]
                if long_name is None:  # -n
                    position += 1
                    continue
                attribute, takes = _LONG[long_name]
                rest = arg[position + 1 :]
                if takes == "none":
                    _store(options, attribute, None)
                    position += 1
                    continue
                if takes == "optional":
                    _store(options, attribute, rest or None)
                elif rest:
                    _store(options, attribute, rest)
                else:
                    index += 1
                    if index >= len(argv):
                        raise UsageError(f"option -{letter} needs a value")
                    _store(options, attribute, argv[index])
                break
            index += 1
            continue
        break
    options.command = list(argv[index:])
    options.option_args = list(argv[:index])
    return options


def _setup_logging(verbose: int) -> None:
    """Messages as ``shifter: ...`` on stderr; warnings only unless ``-v`` (INFO) or ``-vv``.

    Without ``-v`` :mod:`logging` is only imported if there is a warning to show.
    """

    def setup() -> None:
        import logging

        level = (logging.WARNING, logging.INFO)[verbose] if verbose < 2 else logging.DEBUG
        logging.basicConfig(level=level, format=f"{PROG}: %(message)s", stream=sys.stderr)

    from ..runtime import _log

    if verbose:
        setup()
    else:
        _log.on_first_use = setup


def _say(text: str) -> None:
    sys.stderr.write(f"{PROG}: {text}\n")
    sys.stderr.flush()


def run(options: Options) -> int:
    """Build the plan and exec the command (returns only on failure)."""
    from ..config_cache import load as load_config
    from ..reference import ImageRequest
    from ..runtime import RunRequest, User, build_plan, request_from_env, resolve_image
    from ..runtime.plan import check_env_options, image_from_env
    from ..runtime.unprivileged import run as run_unprivileged

    launch_miss = os.environ.pop(MISS_VARIABLE, None)  # never into the container's environment
    for name in os.environ.pop("SHIFTER_LAUNCH_UNSET", "").split():
        os.environ.pop(name, None)  # what the launcher set only for Python itself
    check_env_options(options.env)  # before any lookup: a typo fails at once
    config = load_config()
    user = User.current()
    request = RunRequest(
        image=options.image,
        volumes=tuple(options.volumes),
        modules=options.modules,
        env=tuple(options.env),
        env_files=tuple(options.env_files),
        clearenv=options.clearenv,
        entrypoint=options.entrypoint,
        workdir=options.workdir,
        command=tuple(options.command),
        writable_tmpfs=options.writable_tmpfs,
    )
    from_env = image_from_env(os.environ) if request.image is None else None
    request = request_from_env(os.environ, request)
    if request.image is None:
        raise UsageError(
            "no image given: use --image=NAME (or SHIFTER_IMAGETYPE and SHIFTER_IMAGE, or run "
            "it in a Slurm job made with --image)"
        )
    image, image_file = resolve_image(request.image, config, user)
    asked = ImageRequest.parse(request.image, config.default_image_type)
    image_request = from_env.request if from_env is not None and from_env.request else str(asked)
    try:
        cwd: str | None = os.getcwd()
    except OSError:
        cwd = None
    plan = build_plan(
        request,
        config,
        image,
        image_file,
        user,
        caller_env=os.environ,
        cwd=cwd,
        image_request=image_request,
    )
    from ..runtime._log import get_logger

    get_logger(PROG).info(
        "image %s (%s), command %s", plan.image_id[:12], image_request, " ".join(plan.argv)
    )
    recorder = None
    if launch_miss is not None:
        from ..config_file import config_path
        from ..runtime.launch import Recorder

        reason = _not_replayable(options)
        if reason is None and from_env is not None and not from_env.keyed:
            reason = "the image comes from SHIFTER_IMAGETYPE, which the launcher's key lacks"
        if reason:
            get_logger(PROG).debug("no launch recipe: %s", reason)
        else:
            recorder = Recorder.for_request(
                plan, options.option_args, config_path(), by_id=asked.type == "id"
            )
    share = launch_miss  # the launcher's key of the request, which siblings share
    if not share:
        from ..runtime.launch import key_hash, launch_key

        share = key_hash(launch_key(user.uid, user.gid, os.getgroups(), os.environ,
                                    options.option_args))  # fmt: skip
    run_unprivileged(plan, recorder=recorder, share=share)  # execs or raises: never returns


def _not_replayable(options: Options) -> str | None:
    """Why the C launcher could not replay this command line (None: it can)."""
    if not options.command:
        return "no command given"
    if options.env_files or options.entrypoint is not None:
        return "--env-file or --entrypoint"
    if any("=" not in text for text in options.env):
        return "--env NAME copies a variable from the caller"
    if options.writable_tmpfs or options.verbose:
        return "--writable-tmpfs or -v"
    return None


def _internal_error(err: BaseException, verbose: int) -> None:
    """One line for a failure that is not the user's (the traceback only with ``-v``)."""
    if verbose:
        import traceback

        sys.stderr.write(traceback.format_exc())
    detail = str(err).splitlines()[0] if str(err) else ""
    _say(
        f"internal error: {type(err).__name__}"
        + (f": {detail}" if detail else "")
        + ("" if verbose else " (run with -v for details)")
    )


def main(argv: list[str] | None = None) -> int:
    """The ``shifter`` command: its exit status; no exception ever leaves it."""
    args = sys.argv[1:] if argv is None else argv
    verbose = 0
    try:
        try:
            options = parse_args(args)
        except UsageError as err:
            _say(f"{err}\nTry '{PROG} --help' for the options.")
            return 2
        if options.help:
            sys.stdout.write(HELP)
            return 0
        verbose = options.verbose
        _setup_logging(options.verbose)
        return run(options)
    except UsageError as err:
        _say(str(err))
        return 2
    except ShifterError as err:
        _say(str(err))
        return int(getattr(err, "exit_code", EXIT_FAILED))
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # the edge: never a traceback for a user
        _internal_error(err, verbose)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
