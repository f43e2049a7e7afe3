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
