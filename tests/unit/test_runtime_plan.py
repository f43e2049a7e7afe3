"""The runtime's plan: environment precedence, command, working directory, volumes, modules."""

from __future__ import annotations

import pytest

from shifter_core import config
from shifter_core.errors import OptionError
from shifter_core.image.store import ImageMetadata
from shifter_core.runtime.errors import ModuleError, PrivilegeError, VolumeError
from shifter_core.runtime.modules import select_modules
from shifter_core.runtime.plan import (
    MAX_ENV_FILE,
    EnvImage,
    RunRequest,
    User,
    apply_env_changes,
    build_plan,
    check_env_options,
    image_from_env,
    request_from_env,
)

IMAGE_ID = "ab" * 32
USER = User(1001, 1002, (1002, 1001), "alice", "/home/alice", "/bin/bash", "", ((1002, "alice"),))


def image(**extra) -> ImageMetadata:
    values = {
        "id": IMAGE_ID,
        "source": "docker.io/library/busybox:latest",
        "digest": "sha256:" + "cd" * 32,
        "platform": "linux/amd64",
        "env": ("PATH=/usr/bin:/bin", "FROM_IMAGE=image"),
        "entrypoint": ("/entry", "--flag"),
        "cmd": ("default", "args"),
        "workdir": "/work",
    }
    values.update(extra)
    return ImageMetadata(**values)


def plan_for(request: RunRequest, text: str = "", meta: ImageMetadata | None = None, **kw):
    cfg = config.parse(text, "test.yaml")
    return build_plan(request, cfg, meta or image(), f"/store/{IMAGE_ID}.squashfs", USER, **kw)


# ---- environment ---------------------------------------------------------------------------

LEVELS = ("caller", "image", "env_file", "env", "module", "site")


def _setup_levels(tmp_path, levels: set[str]):
    caller = {"X": "caller"} if "caller" in levels else {}
    meta = image(env=("X=image",) if "image" in levels else ())
    env_files = ()
    if "env_file" in levels:
        path = tmp_path / "vars"
        path.write_text("# comment\n\nX=env_file\n")
        env_files = (str(path),)
    env = ("X=env",) if "env" in levels else ()
    text = "modules:\n  m:\n    default: true\n"
    text += "    env: {set: {X: module}}\n" if "module" in levels else ""
    if "site" in levels:
        text += "runtime:\n  env: {set: {X: site}}\n"
    request = RunRequest(image="busybox", env=env, env_files=env_files, command=("true",))
    return plan_for(request, text, meta, caller_env=caller)


@pytest.mark.parametrize("top", range(len(LEVELS)))
def test_environment_precedence_matrix(tmp_path, top):
    """Every level overrides all the levels below it, whichever of those are present."""
    for mask in range(1 << top):
        levels = {LEVELS[i] for i in range(top) if mask & (1 << i)} | {LEVELS[top]}
        env = _setup_levels(tmp_path, levels).environ()
        assert env["X"] == LEVELS[top], (levels, env["X"])


def test_shifter_variables_are_set_last():
    request = RunRequest(image="busybox", env=("SHIFTER_RUNTIME=0", "SHIFTER_IMAGE=x"))
    env = plan_for(request, image_request="docker:busybox").environ()
    assert env["SHIFTER_RUNTIME"] == "1"
    assert env["SHIFTER_IMAGE"] == IMAGE_ID
    assert env["SHIFTER_IMAGEREQUEST"] == "docker:busybox"


def test_clearenv_drops_the_callers_environment_only():
    request = RunRequest(image="busybox", clearenv=True, env=("KEPT=1",))
    env = plan_for(request, caller_env={"HOME": "/home/alice", "SECRET": "s"}).environ()
    assert "SECRET" not in env and "HOME" not in env
    assert env["KEPT"] == "1" and env["FROM_IMAGE"] == "image"
    env = plan_for(RunRequest(image="busybox"), caller_env={"SECRET": "s"}).environ()
    assert env["SECRET"] == "s"


def test_image_path_wins_over_the_callers():
    env = plan_for(RunRequest(image="b"), caller_env={"PATH": "/host/bin"}).environ()
    assert env["PATH"] == "/usr/bin:/bin"


def test_bare_names_copy_the_callers_value(tmp_path):
    path = tmp_path / "vars"
    path.write_text("FROM_FILE\nexport Y=2\nMISSING\n")
    request = RunRequest(image="b", clearenv=True, env=("TERM",), env_files=(str(path),))
    env = plan_for(request, caller_env={"TERM": "xterm", "FROM_FILE": "f"}).environ()
    assert env["TERM"] == "xterm" and env["FROM_FILE"] == "f" and env["Y"] == "2"
    assert "MISSING" not in env


@pytest.mark.parametrize("bad", ["=x", "A B=1", ""])
def test_bad_env_assignments_are_refused(bad):
    with pytest.raises(OptionError, match="invalid environment variable"):
        plan_for(RunRequest(image="b", env=(bad,)))


def test_unreadable_env_file(tmp_path):
    with pytest.raises(OptionError, match="cannot read --env-file"):
        plan_for(RunRequest(image="b", env_files=(str(tmp_path / "nope"),)))


def test_prepend_append_unset_never_leave_empty_elements():
    env = {"PATH": "/bin", "EMPTY": ""}
    changes = config.EnvChanges(
        prepend={"PATH": "/a", "LD_LIBRARY_PATH": "/lib", "EMPTY": "/e"},
        append={"PATH": "/z", "MANPATH": "/m"},
        unset=["GONE"],
    )
    env["GONE"] = "x"
    apply_env_changes(env, changes)
    assert env == {"PATH": "/a:/bin:/z", "LD_LIBRARY_PATH": "/lib", "EMPTY": "/e", "MANPATH": "/m"}


def test_module_environment_applies_in_load_order():
    text = (
        "modules:\n"
        "  a: {default: true, env: {prepend: {LD_LIBRARY_PATH: /a}}}\n"
        "  b: {env: {prepend: {LD_LIBRARY_PATH: /b}, unset: [DROP]}}\n"
    )
    request = RunRequest(image="b", modules="b", env=("DROP=1",))
    plan = plan_for(request, text, caller_env={"LD_LIBRARY_PATH": "/host"})
    assert plan.module_names == ("a", "b")
    env = plan.environ()
    assert env["LD_LIBRARY_PATH"] == "/b:/a:/host"
    assert "DROP" not in env


# ---- how --env-file, --env and -E combine (issue 11) ---------------------------------------


def test_env_files_then_env_options_each_in_order(tmp_path):
    """Files in the order given, then every --env in the order given: the last one wins."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_text("A=first\nB=first\nC=first\n")
    second.write_text("B=second\nC=second\n")
    request = RunRequest(
        image="b", env_files=(str(first), str(second)), env=("C=env1", "C=env2", "D=")
    )
    env = plan_for(request).environ()
    assert (env["A"], env["B"], env["C"], env["D"]) == ("first", "second", "env2", "")


def test_clearenv_keeps_image_files_options_modules_and_site(tmp_path):
    path = tmp_path / "vars"
    path.write_text("FILE=1\n")
    text = (
        "modules:\n  m: {default: true, env: {set: {MOD: '1'}}}\nruntime:\n  env: {set: {S: '1'}}\n"
    )
    request = RunRequest(image="b", clearenv=True, env_files=(str(path),), env=("OPT=1", "HOME"))
    env = plan_for(request, text, caller_env={"HOME": "/home/alice", "OTHER": "x"}).environ()
    assert env == {
        "PATH": "/usr/bin:/bin", "FROM_IMAGE": "image", "FILE": "1", "OPT": "1",
        "HOME": "/home/alice", "MOD": "1", "S": "1", "SHIFTER_IMAGE": IMAGE_ID,
        "SHIFTER_IMAGEREQUEST": "b", "SHIFTER_RUNTIME": "1",
    }  # fmt: skip


def test_env_values_are_literal(tmp_path):
    path = tmp_path / "vars"
    path.write_text('Q="quoted"\nS=a b  \nE=$HOME\nEQ=a=b\n  export   X=1\n')
    env = plan_for(RunRequest(image="b", env_files=(str(path),)), caller_env={}).environ()
    assert (env["Q"], env["S"], env["E"], env["EQ"], env["X"]) == (
        '"quoted"',
        "a b",
        "$HOME",
        "a=b",
        "1",
    )


def test_env_file_lines_end_only_at_newlines(tmp_path):
    path = tmp_path / "vars"
    path.write_bytes("A=x\fy\x1cz\u2028w\r\nB=2".encode())
    env = plan_for(RunRequest(image="b", env_files=(str(path),))).environ()
    assert (env["A"], env["B"]) == ("x\fy\x1cz\u2028w", "2")


@pytest.mark.parametrize(
    "line, problem",
    [
        ("=x", "the name before '=' is empty"),
        ("9LIVES=1", "the name '9LIVES' starts with a digit"),
        ("MY-VAR=1", "the name 'MY-VAR' has characters other than letters, digits and _"),
        ("A=b\0c", "the value contains a NUL byte"),
        ("A\0=1", "the name 'A\\x00' has characters other than"),
    ],
)
def test_a_bad_env_file_line_names_the_file_and_line(tmp_path, line, problem):
    path = tmp_path / "vars"
    path.write_text(f"# vars\nGOOD=1\n{line}\n")
    with pytest.raises(OptionError) as caught:
        plan_for(RunRequest(image="b", env_files=(str(path),)))
    assert f"in --env-file {path}, line 3: {problem}" in str(caught.value)


def test_env_file_limits(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"A=" + b"x" * MAX_ENV_FILE)
    with pytest.raises(OptionError, match="is larger than 1 MiB"):
        plan_for(RunRequest(image="b", env_files=(str(big),)))
    binary = tmp_path / "binary"
    binary.write_bytes(b"A=\xff\n")
    with pytest.raises(OptionError, match="is not UTF-8 text"):
        plan_for(RunRequest(image="b", env_files=(str(binary),)))
    with pytest.raises(OptionError, match=r"cannot read --env-file .*: Is a directory"):
        plan_for(RunRequest(image="b", env_files=(str(tmp_path),)))


@pytest.mark.parametrize("good", ["A=1", "_=x", "a_b9=", "LONG_NAME_1=a=b", "HOME", "x=\n"])
def test_good_env_options_pass_the_early_check(good):
    check_env_options([good])


@pytest.mark.parametrize("bad", ["=x", "", "1A=x", "A-B=1", "A.B=1", "A B=1", "\u00c4=1"])
def test_bad_env_options_fail_the_early_check(bad):
    with pytest.raises(OptionError, match=r"invalid environment variable .* in --env: "):
        check_env_options(["OK=1", bad])


# ---- command and working directory ---------------------------------------------------------


@pytest.mark.parametrize(
    "entrypoint, command, expected",
    [
        (None, ("ls", "-l"), ("ls", "-l")),
        (None, (), ("/bin/zsh",)),  # the caller's $SHELL
        ("", (), ("/entry", "--flag", "default", "args")),
        ("", ("x",), ("/entry", "--flag", "x")),
        ("/other", (), ("/other",)),  # the image's CMD is its ENTRYPOINT's, not PROG's
        ("/other", ("y",), ("/other", "y")),
    ],
)
def test_entrypoint_and_command(entrypoint, command, expected):
    request = RunRequest(image="b", entrypoint=entrypoint, command=command)
    assert plan_for(request, caller_env={"SHELL": "/bin/zsh"}).argv == expected


def test_without_shell_variable_the_login_shell_runs():
    assert plan_for(RunRequest(image="b")).argv == ("/bin/bash",)


def test_entrypoint_of_an_image_without_one_uses_cmd_or_fails():
    meta = image(entrypoint=None)
    assert plan_for(RunRequest(image="b", entrypoint=""), meta=meta).argv == ("default", "args")
    meta = image(entrypoint=None, cmd=None)
    with pytest.raises(Exception, match="no ENTRYPOINT and no CMD"):
        plan_for(RunRequest(image="b", entrypoint=""), meta=meta)


@pytest.mark.parametrize(
    "workdir, image_workdir, expected",
    [
        (None, "/work", ("/home/alice/run", False)),
        ("", "/work", ("/work", True)),
        ("", "", ("/", True)),
        ("/data", "/work", ("/data", True)),
    ],
)
def test_working_directory(workdir, image_workdir, expected):
    request = RunRequest(image="b", workdir=workdir, command=("pwd",))
    plan = plan_for(request, meta=image(workdir=image_workdir), cwd="/home/alice/run")
    assert (plan.workdir, plan.workdir_explicit) == expected


def test_relative_workdir_is_refused():
    with pytest.raises(OptionError, match="invalid --workdir"):
        plan_for(RunRequest(image="b", workdir="rel"))


def test_root_is_refused():
    root = User(0, 0, (0,), "root")
    cfg = config.parse("", "t.yaml")
    with pytest.raises(PrivilegeError, match="as root"):
        build_plan(RunRequest(image="b"), cfg, image(), "/f", root)


# ---- volumes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/a:/", "may not be the container's root"),
        ("/a:/etc", r"may not be /etc or below"),
        ("/a:/etc/x", r"may not be /etc or below"),
        ("/a:/var/lib/x", r"may not be /var or below"),
        ("/a:/proc/x", r"/proc"),
        ("/a:/dev/shm", r"/dev"),
        ("/a:/opt/udiImage/x", r"/opt/udiImage"),
    ],
)
def test_forbidden_targets(spec, message):
    with pytest.raises(VolumeError, match=message) as info:
        plan_for(RunRequest(image="b", volumes=(spec,)))
    assert spec.split(":")[0] in str(info.value)  # the message names the spec


def test_volume_errors_are_cut_to_a_sane_length():
    long = "/" + "/".join(["d" * 250] * 16)  # 4017 bytes: a valid path
    for spec, message in [
        (f"{long}:/etc{long[:3000]}", "may not be /etc or below"),
        (f"{long}:/data;/b:/data{long[:3000]}", "inside the target of volume"),
    ]:
        with pytest.raises(VolumeError, match=message) as info:
            plan_for(RunRequest(image="b", volumes=(spec,)))
        assert len(str(info.value)) < 600


def test_site_exceptions_and_site_lists():
    plan = plan_for(RunRequest(image="b", volumes=("/a:/var/tmp/x",)))
    assert plan.volumes[0].target == "/var/tmp/x"
    text = "runtime:\n  forbidden_targets: [/, /data]\n  allowed_targets: [/data/ok]\n"
    assert plan_for(RunRequest(image="b", volumes=("/a:/etc/x",)), text).volumes
    assert plan_for(RunRequest(image="b", volumes=("/a:/data/ok/y",)), text).volumes
    with pytest.raises(VolumeError):
        plan_for(RunRequest(image="b", volumes=("/a:/data/no",)), text)


def test_nested_and_site_targets_are_refused():
    with pytest.raises(VolumeError, match="inside the target of volume"):
        plan_for(RunRequest(image="b", volumes=("/a:/data;/b:/data/sub",)))
    text = "runtime:\n  site_volumes: [/home:/home]\n"
    with pytest.raises(VolumeError, match="site file system"):
        plan_for(RunRequest(image="b", volumes=("/a:/home",)), text)


def test_per_node_cache_size_limit():
    text = "runtime:\n  per_node_cache_max_size: 1G\n"
    plan = plan_for(RunRequest(image="b", volumes=("/x:/scratch:perNodeCache=size=1G",)), text)
    assert plan.volumes[0].per_node_cache_bytes == 1 << 30
    with pytest.raises(VolumeError, match="larger than the site's limit 1G"):
        plan_for(RunRequest(image="b", volumes=("/x:/scratch:perNodeCache=size=2G",)), text)


def test_bad_volume_spec_names_it():
    with pytest.raises(OptionError, match="'nocolon'"):
        plan_for(RunRequest(image="b", volumes=("nocolon",)))


# ---- modules -------------------------------------------------------------------------------

MODULES = config.parse(
    "modules:\n"
    "  base: {default: true}\n"
    "  gpu: {}\n"
    "  mpich: {conflicts: [openmpi]}\n"
    "  openmpi: {}\n",
    "m.yaml",
).modules


def test_module_selection():
    assert [n for n, _ in select_modules(None, MODULES)] == ["base"]
    assert [n for n, _ in select_modules("gpu", MODULES)] == ["base", "gpu"]
    assert [n for n, _ in select_modules("mpich,gpu", MODULES)] == ["base", "mpich", "gpu"]
    assert select_modules("none", MODULES) == []


def test_module_errors():
    with pytest.raises(ModuleError, match=r"unknown module 'cuda'.*available modules: base"):
        select_modules("cuda", MODULES)
    with pytest.raises(ModuleError, match="'mpich' and 'openmpi' cannot be loaded together"):
        select_modules("mpich,openmpi", MODULES)
    with pytest.raises(OptionError):
        select_modules("none,gpu", MODULES)


# ---- the job's environment -----------------------------------------------------------------


def test_request_from_job_environment():
    environ = {
        "SHIFTER_IMAGE": IMAGE_ID,
        "SHIFTER_IMAGEREQUEST": "docker:busybox",
        "SHIFTER_VOLUME": "/a:/b:rw;/c:/d:ro",
        "SHIFTER_MODULE": "gpu",
    }
    request = request_from_env(environ, RunRequest(command=("true",)))
    assert request.image == f"id:{IMAGE_ID}"
    assert request.volumes == ("/a:/b:rw;/c:/d:ro",)
    assert request.modules == "gpu"
    assert request.command == ("true",)
    # Own options win; an explicit image ignores the job's values.
    own = request_from_env(environ, RunRequest(volumes=("/x:/y",), modules="none"))
    assert own.volumes == ("/x:/y",) and own.modules == "none"
    other = request_from_env(environ, RunRequest(image="ubuntu"))
    assert other.image == "ubuntu" and other.volumes == () and other.modules is None
    only_request = request_from_env({"SHIFTER_IMAGEREQUEST": "docker:busybox"})
    assert only_request.image == "docker:busybox"
    assert request_from_env({}).image is None


# ---- the image from the environment (issue 11) ---------------------------------------------


@pytest.mark.parametrize(
    "environ, expected",
    [
        # NERSC Shifter's pair
        ({"SHIFTER_IMAGETYPE": "docker", "SHIFTER_IMAGE": "ubuntu:22.04"},
         EnvImage("docker:ubuntu:22.04", None, False)),
        ({"SHIFTER_IMAGETYPE": "Docker ", "SHIFTER_IMAGE": " docker:ubuntu:22.04"},
         EnvImage("docker:ubuntu:22.04", None, False)),
        ({"SHIFTER_IMAGETYPE": "id", "SHIFTER_IMAGE": IMAGE_ID},
         EnvImage(f"id:{IMAGE_ID}", None, True)),
        # the pair wins over a job's request (NERSC's plugin exports the pair in jobs)
        ({"SHIFTER_IMAGETYPE": "docker", "SHIFTER_IMAGE": "centos:7",
          "SHIFTER_IMAGEREQUEST": "docker:busybox:latest"},
         EnvImage("docker:centos:7", None, False)),
        # a Slurm job made with --image: the id, and what was asked for
        ({"SHIFTER_IMAGE": IMAGE_ID, "SHIFTER_IMAGEREQUEST": "docker:busybox:latest"},
         EnvImage(f"id:{IMAGE_ID}", "docker:busybox:latest", True)),
        ({"SHIFTER_IMAGE": f"sha256:{IMAGE_ID}"}, EnvImage(f"id:{IMAGE_ID}", None, True)),
        ({"SHIFTER_IMAGEREQUEST": "docker:busybox"}, EnvImage("docker:busybox", None, True)),
        # a type without an image is ignored, as Shifter ignores it
        ({"SHIFTER_IMAGETYPE": "docker", "SHIFTER_IMAGEREQUEST": "docker:busybox"},
         EnvImage("docker:busybox", None, True)),
        ({"SHIFTER_IMAGETYPE": "docker", "SHIFTER_IMAGE": " "}, None),
        ({"SHIFTER_IMAGETYPE": "", "SHIFTER_IMAGE": ""}, None),
        ({}, None),
    ],
)  # fmt: skip
def test_image_from_the_environment(environ, expected):
    assert image_from_env(environ) == expected


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"SHIFTER_IMAGETYPE": "custom", "SHIFTER_IMAGE": "x"},
         "SHIFTER_IMAGETYPE='custom' is not an image type; use one of docker, id"),
        ({"SHIFTER_IMAGETYPE": "id", "SHIFTER_IMAGE": "ubuntu"},
         "SHIFTER_IMAGETYPE=id SHIFTER_IMAGE='ubuntu': invalid image id 'ubuntu'"),
        ({"SHIFTER_IMAGETYPE": "docker", "SHIFTER_IMAGE": "Bad Name"},
         "SHIFTER_IMAGETYPE=docker SHIFTER_IMAGE='Bad Name': invalid image reference"),
        ({"SHIFTER_IMAGE": "ubuntu:22.04"},
         "SHIFTER_IMAGE='ubuntu:22.04' is not an image id (a job made with --image has one "
         "there); name the image with --image, or set SHIFTER_IMAGETYPE too"),
    ],
)  # fmt: skip
def test_a_bad_image_in_the_environment_names_the_variables(environ, message):
    with pytest.raises(OptionError) as caught:
        image_from_env(environ)
    assert message in str(caught.value)


def test_an_image_from_the_environment_comes_with_the_jobs_volumes_and_modules():
    environ = {
        "SHIFTER_IMAGETYPE": "docker",
        "SHIFTER_IMAGE": "ubuntu:22.04",
        "SHIFTER_VOLUME": "/a:/b",
        "SHIFTER_MODULE": "gpu",
    }
    request = request_from_env(environ, RunRequest(command=("true",)))
    assert (request.image, request.volumes, request.modules) == (
        "docker:ubuntu:22.04", ("/a:/b",), "gpu"
    )  # fmt: skip
    own = request_from_env(environ, RunRequest(volumes=("/x:/y",), modules="none"))
    assert (own.image, own.volumes, own.modules) == ("docker:ubuntu:22.04", ("/x:/y",), "none")
    explicit = request_from_env(environ, RunRequest(image="centos:7"))
    assert (explicit.image, explicit.volumes, explicit.modules) == ("centos:7", (), None)


def test_root_key_ignores_environment_and_command():
    a = plan_for(RunRequest(image="b", command=("a",), env=("X=1",)))
    b = plan_for(RunRequest(image="b", command=("b",), workdir=""))
    assert a.root_key() == b.root_key()
    c = plan_for(RunRequest(image="b", volumes=("/a:/data",)))
    assert c.root_key() != a.root_key()
    d = plan_for(RunRequest(image="b", writable_tmpfs=True))
    assert d.root_key() != a.root_key()


def test_cached_configuration_gives_the_same_plan():
    """shifter reads root's cached values; the prolog parses the file: the same root."""
    from shifter_core import config_cache

    text = (
        "runtime:\n  site_volumes: [/home:/home]\n  env: {set: {S: s}}\n"
        "modules:\n  gpu: {default: true, devices: [/dev/nvidia*], env: {prepend: {P: /x}}}\n"
    )
    parsed = config.parse(text, "t.yaml")
    cached = config_cache.view(config.as_values(parsed))
    request = RunRequest(image="b", volumes=("/a:/data",), command=("env",))
    plans = [
        build_plan(request, cfg, image(), "/f", USER, caller_env={}) for cfg in (parsed, cached)
    ]
    assert plans[0].root_key() == plans[1].root_key()
    assert plans[0].environ() == plans[1].environ()
    assert plans[1].site_volumes[0].target == "/home"
