"""A malformed recipe is refused as a whole, never executed in part (issue 10, deliverable 1).

Real recipes, mutated by hypothesis (cut short, another version, an unknown operation, wrong
field counts, over-long fields, NUL bytes, huge counts, operations out of order), go through
the launcher's dry run (``SHIFTER_LAUNCH_DRY_RUN=FILE``): it prints the operations of a recipe
it accepts and nothing else, or refuses the whole recipe (exit 3, "would run the Python
runtime") before executing anything. The launcher and :func:`recipe.parse` must agree on
every input, on the verdict and on the reason.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from shifter_core.runtime import recipe
from shifter_core.runtime.recipe import VERSION, Op, RecipeError, parse, render, serialise

from .test_recipe_contract import EXIT_REFUSED, LAUNCHER

FALLBACK = "would run the Python runtime"


def _private() -> list[Op]:
    d = "/tmp/shifter-launch-1001/0123456789abcdef"
    return [
        Op("key", "shifter-launch-recipe-2\nuid=1001 gid=1001\noption 4:true\n"),
        Op("depends", "/etc/passwd", "2049:12:1234:1700000000000000000"),
        Op("expires", 1800000000),
        Op("require", "/home/alice/data", "dir", "rx"),
        Op("require", "/store/a.squashfs", "file", "r"),
        Op("require", f"{d}/upper", "dir", ""),
        Op("serve", "/store/a.squashfs"),
        Op("userns", ""),
        Op("clone", 0, "/tmp", 1, 6, "private"),
        Op("fuse", f"{d}/lower", 7, "rootmode=40000,user_id=1001,group_id=1001"),
        Op("clone", 1, "/proc", 1, 14, "private"),
        Op("clone", 2, "/dev/null", 0, 10, "private"),
        Op("clone", 3, "/home/alice/data", 1, 7, "private"),
        Op("overlay", f"{d}/root", 7, f"lowerdir={d}/upper:{d}/lower"),
        Op("attach", 1, "/proc"),
        Op("mount", "tmpfs", "/dev", "tmpfs", 10, "mode=755"),
        Op("symlink", "/proc/self/fd", "/dev/fd"),
        Op("mkfile", "/dev/null", 0o644),
        Op("attach", 2, "/dev/null"),
        Op("attach", 0, "/tmp"),
        Op("attach", 3, "/data"),
        Op("setattr", "/dev", 1, 0),
        Op("pivot"),
        Op("drop", 1001, 1001),
        Op("chdir-caller", "/"),
        Op("env-set", "SHIFTER_RUNTIME", "1"),
        Op("env-prepend", "PATH", "/opt/bin"),
        Op("env-unset", "OLD"),
        Op("exec"),
    ]


def _job() -> list[Op]:
    return [
        Op("key", "k"),
        Op("require", "/run/shifter/n1/7/root", "dir", ""),
        Op("userns", "/run/shifter/n1/7/userns"),
        Op("chroot", "/run/shifter/n1/7/root"),
        Op("drop", 1001, 1001),
        Op("chdir", "/work"),
        Op("env-clear"),
        Op("env-append", "PATH", "/x"),
        Op("exec"),
    ]


RECIPES = [serialise(_private()), serialise(_job())]
NAMES = sorted(recipe.OPERATIONS)


def verdict(data: bytes) -> tuple[int, str, str]:
    """The launcher's dry run of ``data``: (exit status, stdout, stderr)."""
    with tempfile.NamedTemporaryFile(prefix="recipe-", dir="/tmp") as fh:
        fh.write(data)
        fh.flush()
        out = subprocess.run(
            [LAUNCHER],
            env={"PATH": "/usr/bin:/bin", "SHIFTER_LAUNCH_DRY_RUN": fh.name},
            capture_output=True,
            timeout=30,
            check=False,
        )
    return out.returncode, out.stdout.decode("utf-8", "surrogateescape"), out.stderr.decode()


def assert_agree(data: bytes) -> str | None:
    """C and Python agree on ``data``; the reason it is refused (None: accepted)."""
    code, stdout, stderr = verdict(data)
    try:
        ops = parse(data)
    except RecipeError as err:
        assert code == EXIT_REFUSED, (code, stdout, stderr)
        assert stdout == ""  # nothing printed, so nothing would have been executed
        assert stderr == f"shifter: launcher: {err}: {FALLBACK}\n"
        return str(err)
    assert code == 0, stderr
    assert stdout == render(ops)
    return None


def _fields(data: bytes) -> list[bytes]:
    return data[:-1].split(b"\0")


def _join(fields: list[bytes]) -> bytes:
    return b"".join(f + b"\0" for f in fields)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from(RECIPES))
    fields = _fields(data)
    kind = draw(st.sampled_from(
        ["truncate", "version", "unknown", "count", "field count", "long", "nul", "replace",
         "delete", "duplicate", "swap", "bytes"]
    ))  # fmt: skip
    index = draw(st.integers(0, len(fields) - 1))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "version":
        wrong = [b"1", b"2", b"4", b"03", b"", b"3 ", b"99999999999999999999"]
        fields[1] = draw(st.sampled_from(wrong))
    elif kind == "unknown":
        fields.insert(index, draw(st.sampled_from([b"rm", b"exec2", b"MOUNT", b"", b"mount "])))
    elif kind == "count":
        fields[2] = draw(st.sampled_from(
            [b"0", b"1", b"4097", b"18446744073709551616", b"-1", b"+3", b"1e3",
             str(int(fields[2]) + draw(st.integers(-3, 3))).encode()]
        ))  # fmt: skip
    elif kind == "field count":
        counts = [i for i in range(4, len(fields)) if fields[i - 1] in [n.encode() for n in NAMES]]
        at = draw(st.sampled_from(counts)) if counts else index
        fields[at] = draw(st.sampled_from([b"0", b"1", b"2", b"6", b"99", b"100", b"x", b""]))
    elif kind == "long":
        size = draw(st.sampled_from([4095, 4096, 4097, 131072, 131073]))
        fields[index] = b"/" + b"a" * (size - 1)
    elif kind == "nul":
        where = draw(st.integers(0, len(fields[index])))
        fields[index] = fields[index][:where] + b"\0" + fields[index][where:]
    elif kind == "replace":
        fields[index] = draw(st.binary(max_size=12) | st.sampled_from(
            [b"", b"/", b"0", b"07777", b"10000", b"recursive", b"ro,nosuid", b"ro,,nodev",
             b"nosuid,", b"rx", b"dir", b"file", b"256", b"255", b"A=B"]
        ))  # fmt: skip
    elif kind == "delete":
        del fields[index]
    elif kind == "duplicate":
        fields.insert(index, fields[index])
    elif kind == "swap":
        other = draw(st.integers(0, len(fields) - 1))
        fields[index], fields[other] = fields[other], fields[index]
    else:
        raw = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw)
    return _join(fields)


@pytest.mark.parametrize("data", RECIPES)
def test_the_real_recipes_are_accepted(data: bytes) -> None:
    assert assert_agree(data) is None


@settings(
    max_examples=int(os.environ.get("SHIFTER_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(mutated())
@example(b"")
@example(RECIPES[0][:-1])
@example(RECIPES[0] + b"exec\0")
def test_mutated_recipes_are_refused_whole_or_read_alike(data: bytes) -> None:
    reason = assert_agree(data)
    event(f"refused: {reason}" if reason else "accepted")


# Each kind of damage, on its own: refused, with the reason C and Python give alike.
def _ops_with(change) -> bytes:
    fields = _fields(RECIPES[0])
    change(fields)
    return _join(fields)


def _swap_ops(ops: list[Op], a: int, b: int) -> list[Op]:
    ops = list(ops)
    ops[a], ops[b] = ops[b], ops[a]
    return ops


def _unchecked(ops: list[Op]) -> bytes:
    """Serialised without the check that serialise makes (so it may be refused)."""
    fields = [b"shifter-recipe", str(VERSION).encode(), str(len(ops)).encode()]
    for op in ops:
        signature = recipe.OPERATIONS[op.name][0]
        fields += [op.name.encode(), str(len(signature)).encode()]
        fields += [recipe._encode(k, v).encode() for k, v in zip(signature, op.args, strict=True)]
    return _join(fields)


CASES = {
    "truncated": (RECIPES[0][: len(RECIPES[0]) // 2], "recipe cut short"),
    "no final NUL": (RECIPES[0][:-1], "recipe cut short"),
    "wrong version": (
        _ops_with(lambda f: f.__setitem__(1, b"1")),
        f"not a version {VERSION} recipe",
    ),
    "not a recipe": (b"shifter-launch-recipe-1\0", "not a recipe"),
    "unknown op": (
        _ops_with(lambda f: f.__setitem__(f.index(b"pivot"), b"reboot")),
        "unknown operation",
    ),
    "bad field count": (
        _ops_with(lambda f: f.__setitem__(f.index(b"pivot") + 1, b"1")),
        "wrong field count",
    ),
    "over-long field": (
        _ops_with(lambda f: f.__setitem__(f.index(b"serve") + 2, b"/" + b"x" * 4095)),
        "bad path",
    ),
    "over-long string": (
        _ops_with(lambda f: f.__setitem__(f.index(b"env-set") + 3, b"x" * 131073)),
        "field too long",
    ),
    "NUL in a field": (
        _ops_with(lambda f: f.__setitem__(f.index(b"serve") + 2, b"/store\0/a.squashfs")),
        "unknown operation",
    ),
    "huge count": (_ops_with(lambda f: f.__setitem__(2, b"9" * 40)), "bad operation count"),
    "count too big": (_ops_with(lambda f: f.__setitem__(2, b"4097")), "bad operation count"),
    "count one more": (
        _ops_with(lambda f: f.__setitem__(2, str(int(f[2]) + 1).encode())),
        "the recipe must end with exec",
    ),
    "count one less": (
        _ops_with(lambda f: f.__setitem__(2, str(int(f[2]) - 1).encode())),
        "the recipe must end with exec",
    ),
    "trailing data": (RECIPES[0] + b"exec\0" + b"0\0", "data after the last operation"),
    "unknown flag": (
        _ops_with(lambda f: f.__setitem__(f.index(b"fuse") + 3, b"ro,suid")),
        "unknown flag",
    ),
    "exec before drop": (_unchecked([*_job()[:4], Op("exec")]), "privileges not dropped"),
    "no drop": (_unchecked([*_job()[:4], *_job()[5:]]), "privileges not dropped"),
    "mount before the root": (
        _unchecked(_swap_ops(_private(), 13, 15)),
        "no root",
    ),
    "attach of nothing": (
        _unchecked([*_private()[:14], Op("attach", 9, "/x"), *_private()[14:]]),
        "a slot not cloned",
    ),
    "no key first": (_unchecked(_swap_ops(_job(), 0, 1)), "the recipe must start with its key"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damage_is_refused_before_anything_runs(case: str) -> None:
    data, reason = CASES[case]
    assert assert_agree(data) == reason


def _as_user(uid: int):
    """preexec_fn: become ``uid`` (with no other groups) when the tests run as root."""

    def become() -> None:
        if os.getuid() == 0:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return become


@pytest.mark.parametrize("damage", ["truncated", "wrong version", "unknown op", "huge count"])
def test_a_refused_recipe_falls_back_to_python(damage: str) -> None:
    """Outside the dry run, a refused recipe in the user's launch cache hands the command
    line to Python, marked as a miss so that Python writes a good recipe; nothing of the
    recipe runs (no image server is started)."""
    from shifter_core.runtime.launch import key_hash, launch_key

    uid = os.getuid() or 65534  # root runs nothing from a cache: test as nobody
    gid = os.getgid() if os.getuid() else 65534
    groups = os.getgroups() if os.getuid() else []
    top = Path(tempfile.mkdtemp(prefix="shifter-fuzz-", dir="/tmp"))
    try:
        top.chmod(0o755)
        xdg = top / "xdg"
        xdg.mkdir(mode=0o700)
        config = top / "missing.yaml"
        env = {"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(xdg),
               "SHIFTER_CONFIG": str(config), "SHIFTER_LAUNCH_DEBUG": "1"}  # fmt: skip
        options = [f"--image=id:{'ab' * 32}"]
        key = launch_key(uid, gid, groups, env, options)
        directory = xdg / "shifter-launch" / key_hash(key)
        directory.mkdir(parents=True, mode=0o700)
        fields = _fields(RECIPES[0])
        fields[fields.index(b"key") + 2] = key.encode()
        good = _join(fields)
        data = {
            "truncated": good[: len(good) // 2],
            "wrong version": good.replace(
                b"shifter-recipe\0" + str(VERSION).encode(), b"shifter-recipe\0" + b"1"
            ),
            "unknown op": good.replace(b"pivot\0", b"reboot\0"),
            "huge count": (
                f"shifter-recipe\0{VERSION}\0".encode() + b"9" * 40 + good[good.index(b"\0key") :]
            ),
        }[damage]
        (directory / "recipe").write_bytes(data)
        for path in (xdg, *xdg.rglob("*")):
            os.chown(path, uid, gid)
        result = subprocess.run(
            [LAUNCHER, *options, "true"], env=env, capture_output=True, text=True,
            timeout=60, check=False, cwd="/", preexec_fn=_as_user(uid),
        )  # fmt: skip
        reason = parse_reason(data)
        assert f"shifter: launcher: recipe refused ({reason}): running the Python runtime" in (
            result.stderr
        ), result.stderr
        assert result.returncode != 0  # Python says the configuration is missing
        assert str(config) in result.stderr
    finally:
        import shutil

        shutil.rmtree(top, ignore_errors=True)


def parse_reason(data: bytes) -> str:
    try:
        parse(data)
    except RecipeError as err:
        return str(err)
    raise AssertionError("the recipe was accepted")
