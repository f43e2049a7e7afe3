"""udiRoot.conf import: Shifter's syntax, what each setting becomes, what is reported, and
the ``shifteradm import-udiroot`` command."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from shifter_core import config, udiroot
from shifter_core.cli import shifteradm
from shifter_core.udiroot import Problem, Setting, UdiRootError

CHECKOUT = Path(__file__).resolve().parents[2]
FIXTURE = CHECKOUT / "tests" / "fixtures" / "udiRoot.conf"
SHIFTERADM = CHECKOUT / ".venv" / "bin" / "shifteradm"


def convert(text: str) -> tuple[config.Config, list[Problem]]:
    """Convert, render and validate, as the command does."""
    values, problems = udiroot.convert(text)
    return config.parse(udiroot.render(values, "test", problems), "test.yaml"), problems


def reported(problems: list[Problem], changed: bool = False) -> list[tuple[str, str]]:
    return [(p.key, p.value) for p in problems if p.changed == changed]


# -- the sample file --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> tuple[config.Config, list[Problem]]:
    return convert(FIXTURE.read_text())


def test_sample_carries_store_gateway_and_per_node_cache(sample):
    cfg, _ = sample
    assert cfg.image_path == "/global/shifter/images"
    assert cfg.default_image_type == "docker"
    assert cfg.gateway.url == "https://imagegw.mycluster.example.org:5000"
    assert cfg.runtime.per_node_cache_dir == "/var/tmp"
    assert cfg.runtime.per_node_cache_max_size == "200G"
    assert cfg.runtime.per_node_cache_fs == ["xfs"]


def test_sample_carries_site_volumes_with_their_flags(sample):
    cfg, _ = sample
    assert cfg.runtime.site_volumes == [
        "/home:/home:rw",
        "/global/project:/global/project:rw:rec",
        "/global/common:/global/common:ro",
        "/var/opt/cray/alps:/var/opt/cray/alps:rw:rec:slave",
        "/etc/opt/cray/wlm_detect:/etc/opt/cray/wlm_detect:rw",
    ]


def test_sample_carries_site_environment(sample):
    env = sample[0].runtime.env
    assert env.set == {"SHIFTER_RUNTIME": "1", "NERSC_HOST": "mycluster"}
    assert env.append == {"PATH": "/opt/udiImage/bin"}
    assert env.prepend == {"PATH": "/global/common/shifter/bin"}
    assert env.unset == ["LOADEDMODULES", "_LMFILES_"]


def test_sample_carries_both_modules(sample):
    cfg, _ = sample
    assert list(cfg.modules) == ["mpich", "gpu"]  # the defaults first
    mpich, gpu = cfg.modules["mpich"], cfg.modules["gpu"]
    assert mpich.default and not gpu.default
    assert mpich.copies == ["/usr/lib/shifter/modules/mpich:/opt/udiImage/modules/mpich"]
    assert mpich.env.prepend == {"LD_LIBRARY_PATH": "/opt/udiImage/modules/mpich/lib64"}
    assert mpich.env.set == {"SHIFTER_MODULE_MPICH": "1"}
    assert mpich.user_hook == "/opt/udiImage/modules/mpich/bin/init.sh"
    assert gpu.devices == ["/dev/nvidiactl", "/dev/nvidia-uvm"]
    assert gpu.binds == ["/usr/lib64/nvidia:/opt/nvidia/lib64:ro"]
    assert gpu.env.append == {"LD_LIBRARY_PATH": "/opt/nvidia/lib64"}
    assert gpu.env.unset == ["CUDA_VISIBLE_DEVICES"]
    assert gpu.root_hook == "/etc/shifter/modules/gpu/roothook.sh"


def test_sample_reports_every_setting_not_carried_over(sample):
    _, problems = sample
    assert [k for k, _ in reported(problems)] == [
        "udiMount",
        "loopMount",
        "udiRootPath",
        "sitePreMountHook",
        "sitePostMountHook",
        "optUdiImage",
        "etcPath",
        "allowLocalChroot",
        "autoLoadKernelModule",
        "mountUdiRootWritable",
        "maxGroupCount",
        "modprobePath",
        "insmodPath",
        "cpPath",
        "mvPath",
        "chmodPath",
        "ddPath",
        "mkfsXfsPath",
        "rootfsType",
        "gatewayTimeout",
        "mountPropagationStyle",
        "imageGateway",  # the second URL
        "batchType",
        "system",
    ]
    assert ("imageGateway", "https://imagegw2.mycluster.example.org:5000") in reported(problems)
    for problem in problems:
        assert problem.reason and problem.action
        text = str(problem)
        assert text.startswith(f"line {problem.line}: {problem.key}=") and "\n" not in text


def test_sample_reports_what_behaves_differently(sample):
    _, problems = sample
    assert reported(problems, changed=True) == [
        ("imageGateway", "https://imagegw.mycluster.example.org:5000"),
        ("defaultModules", "mpich"),
        ("module_mpich_userhook", "/opt/udiImage/modules/mpich/bin/init.sh"),
        ("module_gpu_siteFs", "/dev/nvidiactl:/dev/nvidiactl"),
        ("module_gpu_siteFs", "/dev/nvidia-uvm:/dev/nvidia-uvm"),
        ("module_gpu_roothook", "/etc/shifter/modules/gpu/roothook.sh"),
    ]


def test_rendered_file_lists_the_problems_as_comments(sample):
    values, problems = udiroot.convert(FIXTURE.read_text())
    text = udiroot.render(values, "/etc/udiRoot.conf", problems)
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert comments[0] == "# Converted from /etc/udiRoot.conf by shifteradm import-udiroot."
    assert len(comments) == 3 + len(problems)
    assert yaml.safe_load(text) == values


# -- Shifter's syntax -----------------------------------------------------------------------


def test_parse_comments_continuations_and_trimming():
    text = (
        "# a comment = not a setting\n"
        "  imagePath =  /images \r\n"
        "siteEnv=A=1 \\\n"
        "# a comment inside a continuation is skipped\n"
        "   B=2\\\n"
        "C=3\n"
        "siteEnvAppend=X=1\\\n"
        "\n"
        "system=x\n"
    )
    settings_, ignored = udiroot.parse(text)
    assert settings_ == [
        Setting("imagePath", "/images", 2),
        Setting("siteEnv", "A=1 B=2 C=3", 3),
        Setting("siteEnvAppend", "X=1", 7),  # an empty line ends the continuation
        Setting("system", "x", 9),
    ]
    assert ignored == []


def test_parse_value_keeps_everything_after_the_first_equals():
    assert udiroot.parse("siteEnv=A=b=c # not a comment\n")[0] == [
        Setting("siteEnv", "A=b=c # not a comment", 1)
    ]


def test_parse_reports_lines_shifter_ignored():
    settings_, ignored = udiroot.parse("siteFs /a:/a\nimagePath=/i\nsiteEnv=A=1 \\\n")
    assert settings_ == [Setting("imagePath", "/i", 2)]
    assert [(p.line, p.key, p.has_value) for p in ignored] == [
        (1, "siteFs /a:/a", False),
        (3, "siteEnv", True),
    ]
    assert str(ignored[0]).startswith("line 1: siteFs /a:/a: not carried over: the line has no")
    assert "continuation" in ignored[1].reason


def test_indented_hash_is_a_key_as_in_shifter():
    _, problems = convert(" #imagePath=/x\nimagePath=/i\n")
    assert [(p.key, p.value) for p in problems] == [("#imagePath", "/x")]
    assert "not a udiRoot.conf setting" in problems[0].reason


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "holds no udiRoot.conf setting"),
        ("image_path: /x\nfoo: bar\n", "holds no udiRoot.conf setting"),
        ("imagePath=/a\0\n", "line 1 holds a NUL character"),
        ("imagePath=/a\ud800\n", "not text"),
        ("#" * (udiroot.MAX_TEXT + 1), "longer than"),
    ],
)
def test_text_that_is_no_udiroot_conf_is_an_error(text, message):
    with pytest.raises(UdiRootError, match=message):
        udiroot.convert(text)


# -- what each setting becomes ----------------------------------------------------------------


def test_a_scalar_given_twice_keeps_the_last_and_reports_the_first():
    cfg, problems = convert("imagePath=/a\nimagePath=/b\n")
    assert cfg.image_path == "/b"
    assert [(p.line, p.value) for p in problems] == [(1, "/a")]
    assert "given again on line 2" in problems[0].reason


def test_lists_accumulate_over_repeated_keys():
    cfg, problems = convert("siteFs=/a:/a\nsiteFs=/b:/b:ro\nsiteEnv=A=1\nsiteEnv=B=2 A=3\n")
    assert cfg.runtime.site_volumes == ["/a:/a:rw", "/b:/b:ro"]
    assert cfg.runtime.env.set == {"A": "3", "B": "2"}
    assert problems == []


@pytest.mark.parametrize(
    "entry, volume",
    [
        ("/a", "/a:/a:rw"),
        ("/a:/b", "/a:/b:rw"),
        ('"/a:/b:ro"', "/a:/b:ro"),
        ("/a:/b:RO:rec", "/a:/b:ro:rec"),
        ("/a:/b:private:rec", "/a:/b:rw:rec:private"),
        ("/a:/b::Slave", "/a:/b:rw:slave"),
        ("/a/:/b//c/", "/a:/b/c:rw"),
    ],
)
def test_site_fs_entries(entry, volume):
    cfg, problems = convert(f"siteFs={entry}\n")
    assert cfg.runtime.site_volumes == [volume]
    assert problems == []


def test_site_fs_separators_are_semicolons_and_spaces():
    cfg, _ = convert("siteFs=/a:/a; /b:/b /c:/c;;\n")
    assert cfg.runtime.site_volumes == ["/a:/a:rw", "/b:/b:rw", "/c:/c:rw"]


@pytest.mark.parametrize(
    "entry, reason",
    [
        ("/a:/b:perNodeCache=size=10G", "perNodeCache is for user volumes only"),
        ("/a:/b:bogus", "unknown or repeated flag"),
        ("/a:/b:ro:ro", "unknown or repeated flag"),
        ("/a:/b:ro=1", "takes no value"),
        ("/a:/b:slave:private", "both slave and private"),
        ("/data$1:/data", "Shifter drops all but ASCII letters"),
        ("/a:/etc", "Shifter refuses the target /etc"),
        ("/a:/var", "Shifter refuses the target /var"),
        ("a:/b", "must be absolute"),
        ("/a:/b/../c", "contains '..'"),
        ("/a:/", "the runtime mounts / itself"),
        ("/x:/tmp/x", "the runtime mounts /tmp/x itself"),
        ("/x:/proc/x", "the runtime mounts /proc/x itself"),
        ("/x:/dev", "the runtime mounts /dev itself"),
    ],
)
def test_site_fs_entries_not_carried_over(entry, reason):
    cfg, problems = convert(f"siteFs=/ok:/ok;{entry}\n")
    assert cfg.runtime.site_volumes == ["/ok:/ok:rw"]
    assert [(p.key, p.value) for p in problems] == [("siteFs", entry)]
    assert reason in problems[0].reason


def test_site_fs_targets_the_runtime_would_refuse_together():
    cfg, problems = convert("siteFs=/a:/g;/b:/g;/c:/g/sub;/d:/h\n")
    assert cfg.runtime.site_volumes == ["/a:/g:rw", "/d:/h:rw"]
    assert [p.value for p in problems] == ["/b:/g:rw", "/c:/g/sub:rw"]
    assert all("nests with" in p.reason for p in problems)


def test_site_volumes_stay_within_the_runtimes_bounds():
    many = ";".join(f"/s{i}:/t{i}" for i in range(70))
    cfg, problems = convert(f"siteFs={many}\n")
    assert len(cfg.runtime.site_volumes) == 64
    assert [p.value for p in problems] == [f"/s{i}:/t{i}:rw" for i in range(64, 70)]
    deep = "/" + "/".join(["d" * 250] * 6)  # 1507 characters
    cfg, problems = convert("siteFs=" + ";".join(f"/s{i}:{deep}{i}" for i in range(60)) + "\n")
    assert sum(len(v) + 1 for v in cfg.runtime.site_volumes) <= 64 * 1024
    assert len(cfg.runtime.site_volumes) == 64 * 1024 // 1520
    assert problems and all("or 65536 characters of them" in p.reason for p in problems)


def test_site_fs_under_dev_is_a_bind_with_a_warning():
    cfg, problems = convert("siteFs=/dev/infiniband\n")
    assert cfg.runtime.site_volumes == ["/dev/infiniband:/dev/infiniband:rw"]
    assert [(p.changed, p.value) for p in problems] == [(True, "/dev/infiniband")]
    assert "nodev" in problems[0].reason


def test_environment_entries_not_carried_over():
    cfg, problems = convert("siteEnv=A=1 NOVALUE =x\nsiteEnvUnset=B C=1\n")
    assert cfg.runtime.env.set == {"A": "1"}
    assert cfg.runtime.env.unset == ["B"]
    assert [(p.key, p.value) for p in problems] == [
        ("siteEnv", "NOVALUE"),
        ("siteEnv", "=x"),
        ("siteEnvUnset", "C=1"),
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("perNodeCacheSizeLimit=1.5g\n", "1536M"),
        ("perNodeCacheSizeLimit=1073741824\n", "1G"),
        ("perNodeCacheSizeLimit=1000\n", "1000"),
        ("perNodeCacheSizeLimit=2T\n", "2T"),
    ],
)
def test_per_node_cache_size_in_shifters_units(text, expected):
    cfg, problems = convert(text)
    assert cfg.runtime.per_node_cache_max_size == expected
    assert problems == []


@pytest.mark.parametrize(
    "line",
    [
        "perNodeCacheSizeLimit=10 G",
        "perNodeCacheSizeLimit=lots",
        "perNodeCacheSizeLimit=2000P",
        "perNodeCachePath=tmp",
        "imagePath=images",
        "defaultImageType=local",
        "mountPropagationStyle=shared",
        "imageGateway=imagegw:5000",
        "nodeContextPrefix=x",
        "allowLocalChroot=01",
        "bogusKey=1",
        "module_gpu=1",
        "module_my_mod_siteEnv=A=1",
    ],
)
def test_values_without_a_counterpart_are_reported(line):
    cfg, problems = convert(f"system=x\n{line}\n")
    assert cfg.runtime == config.RuntimeConfig()
    assert cfg.image_path == config.Config().image_path
    assert cfg.gateway.url == config.GatewayConfig().url
    assert cfg.modules == {}
    key, _, value = line.partition("=")
    assert (key, value) in [(p.key, p.value) for p in problems]


@pytest.mark.parametrize(
    "line", ["allowLocalChroot=0", "mountPropagationStyle=private", "nodeContextPrefix="]
)
def test_values_that_state_our_behaviour_are_quiet(line):
    assert convert(f"{line}\n")[1] == []


def test_module_settings():
    cfg, problems = convert(
        "module_a_siteEnv=X=1\n"
        "module_a_siteEnv=Y=2\n"  # replaces the previous line, as in Shifter
        "module_a_conflict=b c a\n"
        "module_b_enabled=1\n"
        "module_b_siteFs=/opt/b:/opt/b:ro:rec:slave\n"
        "module_b_siteFs=/dev/b0:/dev/b0;/dev/b1:/dev/other\n"
        "module_b_copyPath=/srv/b/\n"
    )
    a, b = cfg.modules["a"], cfg.modules["b"]
    assert a.env.set == {"Y": "2"}
    assert a.conflicts == ["b"]
    assert b.binds == ["/opt/b:/opt/b:ro", "/dev/b1:/dev/other:rw"]
    assert b.devices == ["/dev/b0"]
    assert b.copies == ["/srv/b:/opt/udiImage/modules/b"]
    assert [(p.key, p.value, p.changed) for p in problems] == [
        ("module_a_siteEnv", "X=1", False),
        ("module_a_conflict", "c", False),
        ("module_a_conflict", "a", False),
        ("module_b_siteFs", "/opt/b:/opt/b:ro:rec:slave", True),
        ("module_b_siteFs", "/dev/b0:/dev/b0", True),
        ("module_b_siteFs", "/dev/b1:/dev/other", True),
    ]


def test_disabled_and_misnamed_modules_are_reported_setting_by_setting():
    cfg, problems = convert(
        "module_off_enabled=0\nmodule_off_siteEnv=A=1\nmodule_none_siteEnv=A=1\n"
        "module_ok_siteEnv=A=1\ndefaultModules=off,ok\n"
    )
    assert list(cfg.modules) == ["ok"] and cfg.modules["ok"].default
    assert [(p.key, p.value, p.changed) for p in problems] == [
        ("module_off_enabled", "0", False),
        ("module_off_siteEnv", "A=1", False),
        ("module_none_siteEnv", "A=1", False),
        ("defaultModules", "off", False),
        ("defaultModules", "off,ok", True),
    ]
    assert "disabled (line 1)" in problems[0].reason


@pytest.mark.parametrize(
    "line",
    [
        "module_m_copyPath=relative",
        "module_m_copyPath=/srv/*",
        "module_m_copyPath=/a:b",
        "module_m_userhook=/bin/hook --flag",
        "module_m_roothook=hook.sh",
    ],
)
def test_module_values_not_carried_over(line):
    cfg, problems = convert(f"{line}\n")
    assert cfg.modules == {"m": config.ModuleConfig()}
    key, _, value = line.partition("=")
    assert [(p.key, p.value) for p in problems] == [(key, value)]


def test_module_binds_may_not_nest_with_site_volumes():
    cfg, problems = convert("siteFs=/global:/global\nmodule_m_siteFs=/x:/global/x\n")
    assert cfg.modules["m"].binds == []
    assert [(p.key, p.value) for p in problems] == [("module_m_siteFs", "/x:/global/x:rw")]


def test_default_modules_none_sets_no_default():
    cfg, problems = convert("module_m_siteEnv=A=1\ndefaultModules=none\n")
    assert not cfg.modules["m"].default
    assert problems == []


# -- never anything but our error -----------------------------------------------------------

_LINES = st.one_of(
    st.text(max_size=40),
    st.builds("{}={}".format, st.sampled_from(sorted(udiroot.KNOWN_KEYS)), st.text(max_size=40)),
    st.sampled_from(
        [*sorted(udiroot.KNOWN_KEYS), "module_m_siteFs", "module_m_enabled", "module_x_conflict"]
    ).flatmap(
        lambda key: st.builds(
            lambda value, more: f"{key}={value}" + (" \\" if more else ""),
            st.text(alphabet=st.sampled_from('/:;=ab.* \t"\\-_,0G'), max_size=30),
            st.booleans(),
        )
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_raises_only_our_error_on_any_text(text):
    try:
        settings_, ignored = udiroot.parse(text)
    except UdiRootError:
        return
    assert all(isinstance(s, Setting) for s in settings_)
    assert all(isinstance(p, Problem) for p in ignored)


@settings(max_examples=300, deadline=None)
@given(st.lists(_LINES, max_size=12).map("\n".join))
def test_convert_gives_a_valid_configuration_or_our_error(text):
    try:
        values, problems = udiroot.convert(text)
    except UdiRootError:
        return
    text = udiroot.render(values, "fuzz", problems)
    config.parse(text, "fuzz.yaml")
    assert (yaml.safe_load(text) or {}) == values
    assert all("\n" not in str(p) for p in problems)


@pytest.mark.parametrize("char", ["\x85", "\u2028", "\u2029", "\xe9", "\x1b"])
def test_rendered_values_read_back_unchanged(char):
    values, problems = udiroot.convert(f"siteEnv=A=x{char}y\n")
    text = udiroot.render(values, "t", problems)
    assert config.parse(text).runtime.env.set == {"A": f"x{char}y"}


# -- the command ------------------------------------------------------------------------------


def test_shifteradm_import_udiroot_writes_a_valid_file(tmp_path):
    out = tmp_path / "shifter.yaml"
    run = subprocess.run(
        [str(SHIFTERADM), "import-udiroot", str(FIXTURE), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert any(f"{FIXTURE}: line 7: udiMount=/var/udiMount: not carried over" in x for x in lines)
    assert lines[-1].startswith(f"shifteradm: wrote {out} from {FIXTURE} (24 not carried over")
    assert "Traceback" not in run.stderr
    cfg = config.parse(out.read_text(), str(out))
    assert cfg.image_path == "/global/shifter/images"
    assert list(cfg.modules) == ["mpich", "gpu"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["shifter.yaml"]  # no partial file left


def test_shifteradm_refuses_to_replace_without_force(tmp_path, capsys):
    out = tmp_path / "shifter.yaml"
    out.write_text("old\n")
    assert shifteradm.main(["import-udiroot", str(FIXTURE), "-o", str(out)]) == 1
    assert out.read_text() == "old\n"
    assert capsys.readouterr().err == (f"shifteradm: {out} exists; use --force to replace it\n")
    assert shifteradm.main(["import-udiroot", str(FIXTURE), "-o", str(out), "--force"]) == 0
    assert config.parse(out.read_text()).image_path == "/global/shifter/images"


def test_shifteradm_writes_stdout_by_default(capsys):
    assert shifteradm.main(["import-udiroot", str(FIXTURE)]) == 0
    captured = capsys.readouterr()
    assert config.parse(captured.out).gateway.url.startswith("https://imagegw.")
    assert captured.err.splitlines()[-1].startswith(f"shifteradm: converted {FIXTURE}")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"just some text\n", "holds no udiRoot.conf setting"),
        (b"imagePath=/\xff\n", "is not UTF-8 text (byte 11)"),
        (b"imagePath=/a\0\n", "line 1 holds a NUL character"),
    ],
)
def test_shifteradm_fails_with_one_line(tmp_path, capsys, content, message):
    conf = tmp_path / "udiRoot.conf"
    conf.write_bytes(content)
    out = tmp_path / "shifter.yaml"
    assert shifteradm.main(["import-udiroot", str(conf), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("shifteradm: ")
    assert not out.exists()


def test_shifteradm_errors_on_missing_file_and_bad_output(tmp_path, capsys):
    assert shifteradm.main(["import-udiroot", str(tmp_path / "nope")]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert shifteradm.main(["import-udiroot", str(FIXTURE), "-o", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err
    missing = tmp_path / "no" / "such" / "dir.yaml"
    assert shifteradm.main(["import-udiroot", str(FIXTURE), "-o", str(missing)]) == 1
    assert (
        capsys.readouterr().err.splitlines()[-1].startswith(f"shifteradm: cannot write {missing}")
    )


def test_shifteradm_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        shifteradm.main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        shifteradm.main(["import-udiroot"])
    assert exc.value.code == 2


def test_shifteradm_reads_stdin():
    run = subprocess.run(
        [str(SHIFTERADM), "import-udiroot", "-"],
        input="imagePath=/store\n",
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LC_ALL": "C"},
    )
    assert run.returncode == 0, run.stderr
    assert config.parse(run.stdout).image_path == "/store"
