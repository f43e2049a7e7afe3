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
