"""``shifter``'s command line: options as Shifter spells them, parsing stops at the command."""

from __future__ import annotations

import pytest

from shifter_core.cli.shifter import HELP, UsageError, main, parse_args


def test_every_option():
    options = parse_args(
        [
            "--image=docker:busybox",
            "-V", "/a:/b",
            "-V/c:/d:ro",
            "--volume", "/e:/f",
            "--volume=/g:/h",
            "--entrypoint",
            "-w",
            "-e", "A=1",
            "-eB=2",
            "--env=C=3",
            "--env-file", "vars",
            "--env-file=more",
            "-E",
            "-m", "gpu,mpich",
            "--writable-tmpfs",
            "-vv",
            "ls", "-l", "--image=not-an-option",
        ]
    )  # fmt: skip
    assert options.image == "docker:busybox"
    assert options.volumes == ["/a:/b", "/c:/d:ro", "/e:/f", "/g:/h"]
    assert options.entrypoint == "" and options.workdir == ""
    assert options.env == ["A=1", "B=2", "C=3"]
    assert options.env_files == ["vars", "more"]
    assert options.clearenv and options.writable_tmpfs
    assert options.modules == "gpu,mpich"
    assert options.verbose == 2
    assert options.command == ["ls", "-l", "--image=not-an-option"]


@pytest.mark.parametrize(
    "argv, entrypoint, workdir, command",
    [
        (["--entrypoint=/bin/x", "a"], "/bin/x", None, ["a"]),
        (["--workdir=/data", "pwd"], None, "/data", ["pwd"]),
        (["-w/data", "pwd"], None, "/data", ["pwd"]),
        (["-w", "/data"], None, "", ["/data"]),  # an optional value must be attached
        (["--entrypoint", "prog"], "", None, ["prog"]),
        (["-Ew", "x"], None, "", ["x"]),
        (["--", "-w"], None, None, ["-w"]),
        ([], None, None, []),
    ],
)
def test_optional_values_and_the_end_of_options(argv, entrypoint, workdir, command):
    options = parse_args(["--image", "busybox", *argv])
    assert (options.entrypoint, options.workdir, options.command) == (entrypoint, workdir, command)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bogus"], "unknown option --bogus"),
        (["-x"], "unknown option -x"),
        (["--image"], "--image needs a value"),
        (["-V"], "-V needs a value"),
        (["--clearenv=yes"], "--clearenv takes no value"),
    ],
)
def test_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


def test_help_and_usage_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out == HELP
    assert "Without COMMAND: with --entrypoint, the image's ENTRYPOINT" in out
    assert "your\nshell ($SHELL" in out
    assert main(["--nope"]) == 2
    assert "unknown option --nope" in capsys.readouterr().err


@pytest.mark.parametrize("verbose", [False, True])
def test_an_unexpected_exception_is_one_line_without_v(monkeypatch, capsys, verbose):
    """The edge of the command: never a traceback for a user unless asked with -v."""
    from shifter_core.cli import shifter

    def broken(options):
        raise PermissionError(13, "Permission denied", "/store/x.json")

    monkeypatch.setattr(shifter, "run", broken)
    argv = ["-v"] * verbose + ["--image=busybox", "true"]
    assert main(argv) == 125
    err = capsys.readouterr().err
    line = "shifter: internal error: PermissionError: [Errno 13] Permission denied: '/store/x.json'"
    if verbose:
        assert "Traceback" in err and err.rstrip().endswith(line)
    else:
        assert err == line + " (run with -v for details)\n"


def test_a_shifter_error_is_its_message_and_hint(monkeypatch, capsys):
    from shifter_core.cli import shifter
    from shifter_core.runtime import ImageError

    def missing(options):
        raise ImageError("image 'x' not found", hint="pull it first: shifterimg pull x")

    monkeypatch.setattr(shifter, "run", missing)
    assert main(["--image=x", "true"]) == 125
    assert capsys.readouterr().err == (
        "shifter: image 'x' not found; pull it first: shifterimg pull x\n"
    )


# ---- NERSC Shifter's command lines (issue 11) -----------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["-i", "docker:ubuntu:22.04", "ls"],
        ["-idocker:ubuntu:22.04", "ls"],
        ["--image=docker:ubuntu:22.04", "ls"],
        ["--image", "docker:ubuntu:22.04", "ls"],
        ["--im=docker:ubuntu:22.04", "ls"],  # getopt_long takes a unique prefix
        ["--i", "docker:ubuntu:22.04", "ls"],
        ["-n", "-i", "docker:ubuntu:22.04", "ls"],  # -n: in Shifter's getopt, does nothing
        ["-nvi", "docker:ubuntu:22.04", "ls"],
    ],
)
def test_every_form_of_the_image_option(argv):
    options = parse_args(argv)
    assert options.image == "docker:ubuntu:22.04"
    assert options.command == ["ls"]
    assert options.option_args == argv[:-1]


def test_shifters_getopt_letters_all_parse():
    """Shifter's getopt string is hnvV:i:e:Ew:m: (and --entrypoint, --env-file, long only)."""
    options = parse_args(
        ["-n", "-v", "-V/a:/b", "-ix", "-eA=1", "-E", "-w/d", "-mgpu", "--env-file=f",
         "--entrypoint", "cmd"]
    )  # fmt: skip
    assert (options.image, options.volumes, options.env, options.env_files) == (
        "x", ["/a:/b"], ["A=1"], ["f"]
    )  # fmt: skip
    assert options.clearenv and options.verbose == 1 and options.modules == "gpu"
    assert (options.workdir, options.entrypoint, options.command) == ("/d", "", ["cmd"])


@pytest.mark.parametrize(
    "argv, attribute, value",
    [
        (["--entry"], "entrypoint", ""),  # Shifter's own help spelled it --entry
        (["--entry=/bin/x"], "entrypoint", "/bin/x"),
        (["--vol", "/a:/b"], "volumes", ["/a:/b"]),
        (["--env", "A=1"], "env", ["A=1"]),  # exact beats the prefix of --env-file
        (["--env-f", "vars"], "env_files", ["vars"]),
        (["--clear"], "clearenv", True),
        (["--work=/d"], "workdir", "/d"),
        (["--verb"], "verbose", 1),
        (["--mod=gpu"], "modules", "gpu"),
        (["--writable"], "writable_tmpfs", True),
    ],
)
def test_long_options_may_be_shortened(argv, attribute, value):
    options = parse_args([*argv, "cmd"])
    assert getattr(options, attribute) == value and options.command == ["cmd"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--e=x"], "option --e is ambiguous: it could be --entrypoint, --env, --env-file"),
        (["--v"], "option --v is ambiguous: it could be --volume, --verbose"),
        (["--imagex=y"], "unknown option --imagex"),
        (["--=x"], "unknown option --"),
        (["-i"], "option -i needs a value"),
        (["--im"], "option --image needs a value"),
        (["--entry=x", "--clear=1"], "option --clearenv takes no value"),
    ],
)
def test_long_option_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


@pytest.mark.parametrize(
    "value, problem",
    [
        ("=x", "the name before '=' is empty"),
        ("=FOO=bar", "the name before '=' is empty"),  # -e=FOO=bar: getopt keeps the '='
        ("", "it is empty"),
        ("1A=x", "the name '1A' starts with a digit"),
        ("A-B=1", "the name 'A-B' has characters other than letters, digits and _"),
        ("A B=1", "the name 'A B' has characters other than"),
        ("\u00e9t\u00e9=1", "the name '\u00e9t\u00e9' has characters other than"),
        ("A\tB", "the name 'A\\tB' has characters other than"),
    ],
)
def test_a_malformed_env_is_refused_clearly(monkeypatch, capsys, value, problem):
    """Refused before the configuration or the image is looked at: one line, exit 125."""
    from shifter_core import config_cache

    def no_config() -> None:
        raise AssertionError("the configuration was read")

    monkeypatch.setattr(config_cache, "load", no_config)
    assert main(["--image=busybox", "-e", value, "true"]) == 125
    err = capsys.readouterr().err
    assert err.startswith("shifter: invalid environment variable ")
    assert f" in --env: {problem}" in err
    name = value.partition("=")[0]
    hint = "does not start with a digit" if name else "use NAME=VALUE"
    assert hint in err and "Traceback" not in err and "internal error" not in err
    assert err.count("\n") == 1


def test_help_says_how_the_image_is_chosen():
    text = " ".join(HELP.split())
    assert "-i, --image=[TYPE:]NAME" in HELP
    assert (
        "image, the first of: --image; SHIFTER_IMAGETYPE and SHIFTER_IMAGE together (e.g. "
        "SHIFTER_IMAGETYPE=docker SHIFTER_IMAGE=ubuntu:22.04, as NERSC Shifter reads them); "
        "SHIFTER_IMAGE alone, the image id of the Slurm job made with --image you are in"
    ) in text
    assert "-n is accepted and ignored" in text
    assert "--env-file (in order), --env (in order), modules, the site" in text
