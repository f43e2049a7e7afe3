"""The configuration file: defaults, strict validation, privileged checks, example file."""

import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from shifter_core import config, config_file
from shifter_core.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "slurm_conf" / "shifter.yaml.example"


def test_empty_file_gives_defaults():
    cfg = config.parse("", "x.yaml")
    assert cfg.image_path == "/var/lib/shifter/images"
    assert cfg.gateway.url.startswith("http://")


def test_values_are_read():
    cfg = config.parse("image_path: /store\ngateway:\n  url: https://gw:1\n")
    assert cfg.image_path == "/store"
    assert cfg.gateway.url == "https://gw:1"


@pytest.mark.parametrize(
    "text, message",
    [
        ("imagepath: /x\n", r"f\.yaml, line 1: unknown key 'imagepath'"),
        ("gateway:\n  url: http://x\n  port: 1\n", r"line 3: unknown key 'gateway\.port'"),
        ("image_path: relative\n", r"line 1: image_path: 'relative' must be an absolute path"),
        ("image_path: 3\n", r"image_path: expected a string, got 3"),
        ("gateway: []\n", r"gateway: expected a mapping"),
        ("gateway:\n  url: ftp://x\n", r"line 2: gateway\.url: 'ftp://x' must be an http"),
        ("default_image_type: custom\n", r"is not one of 'docker', 'id'"),
        ("- a\n", r"must be a mapping"),
        ("a: [\n", r"not valid YAML"),
        ("image_path: /a\nimage_path: /b\n", r"line 2: key 'image_path' is given twice"),
    ],
)
def test_errors_name_key_file_and_line(text, message):
    with pytest.raises(ConfigError, match=message):
        config.parse(text, "f.yaml")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(str(tmp_path / "nope.yaml"))


def test_env_var_is_used_but_not_by_privileged_readers(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text("image_path: /from/env\n")
    monkeypatch.setenv("SHIFTER_CONFIG", str(path))
    assert config.load().image_path == "/from/env"
    assert config.config_path(privileged=True) == config_file.DEFAULT_PATH


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make root-owned files")
def test_privileged_readers_refuse_files_users_could_change(tmp_path):
    directory = tmp_path / "etc"
    directory.mkdir(mode=0o755)
    os.chmod(tmp_path, 0o755)
    path = directory / "shifter.yaml"
    path.write_text("image_path: /x\n")
    path.chmod(0o644)
    # tmp_path's ancestors include /tmp (sticky, world-writable): allowed for directories.
    assert config.load(str(path), privileged=True).image_path == "/x"
    path.chmod(0o646)
    with pytest.raises(ConfigError, match="writable by other users"):
        config.load(str(path), privileged=True)
    path.chmod(0o644)
    os.chown(path, 65534, 0)
    with pytest.raises(ConfigError, match="not owned by root"):
        config.load(str(path), privileged=True)
    os.chown(path, 0, 0)
    directory.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by other users"):
        config.load(str(path), privileged=True)


def test_example_file_documents_every_key_and_is_valid():
    text = EXAMPLE.read_text()
    config.parse(text, str(EXAMPLE))
    for key, doc in config.documented_keys():
        assert doc, f"{key} has no documentation in the schema"
        leaf = key.rsplit(".", 1)[-1]
        match = re.search(rf"^(?P<comment>(?:\s*#.*\n)+)\s*{leaf}:", text, re.M)
        assert match, f"{key} is missing from {EXAMPLE.name} or has no comment above it"


_keys = st.from_regex(r"[a-z_]{1,12}", fullmatch=True)


@given(
    st.dictionaries(_keys, st.one_of(st.integers(), st.text(max_size=5), st.booleans()), max_size=4)
)
def test_random_documents_parse_or_fail_cleanly(document):
    text = yaml.safe_dump(document)
    try:
        cfg = config.parse(text, "h.yaml")
    except ConfigError as err:
        assert str(err).startswith("h.yaml")
    else:
        assert set(document) <= {k for k, _ in config.documented_keys()}
        assert cfg.source == "h.yaml"


# -- site volumes (issue 11) ----------------------------------------------------------------


def test_site_volumes_take_shifters_site_flags():
    from shifter_core.options import parse_volumes

    cfg = config.parse(
        "runtime:\n  site_volumes: ['/global:/global:rec:slave', '/scratch:/scratch:ro:private']\n"
    )
    volumes = parse_volumes(cfg.runtime.site_volumes, site=True)
    assert [(v.recursive, v.propagation, v.read_only) for v in volumes] == [
        (True, "slave", False),
        (False, "private", True),
    ]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/a:/b:slave:private", "both slave and private"),
        ("/a:/b:shared", "unknown flag"),
        ("/a:/b:perNodeCache=size=1G", "perNodeCache is for user volumes only"),
    ],
)
def test_bad_site_volume_flags_are_refused_at_load(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        config.parse(f"runtime:\n  site_volumes: ['{spec}']\n", "s.yaml")
    assert "s.yaml, line 2: runtime.site_volumes" in str(info.value)


def test_module_binds_keep_the_user_flags():
    # the runtime parses module binds as user volumes (runtime.assemble)
    with pytest.raises(ConfigError, match="site volumes only"):
        config.parse("modules:\n  m:\n    binds: ['/a:/b:rec']\n")


def _site(*specs: str) -> str:
    return "runtime:\n  site_volumes:\n" + "".join(f"    - '{s}'\n" for s in specs)


@pytest.mark.parametrize(
    "specs",
    [("/a:/x", "/b:/x"), ("/a:/x", "/c:/y", "/b:/x/:ro"), ("/a:/x:rec", "/b://x:slave")],
)
def test_a_duplicate_site_volume_target_is_refused_at_load_naming_both(specs):
    # runtime.plan parses site volumes with parse_volumes, which refuses a target given
    # twice: every container would fail at start
    with pytest.raises(ConfigError, match="both with the target /x") as info:
        config.parse(_site(*specs), "d.yaml")
    message = str(info.value)
    assert "d.yaml, line 3: runtime.site_volumes" in message  # where the list starts
    first, *_, last = [s for s in specs if s.split(":")[1].rstrip("/").lstrip("/") == "x"]
    assert repr(first) in message and repr(last) in message


@pytest.mark.parametrize(
    "specs, inner, outer",
    [
        (("/g:/global", "/h:/global/homes"), "/global/homes", "/global"),
        (("/h:/global/homes", "/g:/global"), "/global/homes", "/global"),
        (("/a:/a", "/b:/b", "/c:/a/b/c:ro"), "/a/b/c", "/a"),
    ],
)
def test_a_site_volume_inside_another_is_refused_at_load(specs, inner, outer):
    # runtime.assemble._plan_targets refuses a mount inside another (as resolved in the
    # image), so with an image without a symlink there, every container fails at start
    with pytest.raises(ConfigError, match=f"the target {inner} is inside {outer}") as info:
        config.parse(_site(*specs), "n.yaml")
    message = str(info.value)
    assert all(repr(s) in message for s in specs if s.split(":")[1] in (inner, outer))


@pytest.mark.parametrize(
    "specs",
    [
        ("/a:/a", "/ab:/ab", "/a2:/b/a"),  # a common prefix is not nesting
        ("/d:/dev/infiniband", "/e:/dev/infiniband/uverbs0"),  # made inside the fresh /dev
        ("/t:/tmp/a", "/u:/tmp/a/b"),  # inside a private /tmp (else /tmp fails anyway)
    ],
)
def test_site_volumes_the_runtime_can_mount_still_load(specs):
    cfg = config.parse(_site(*specs))
    assert cfg.runtime.site_volumes == list(specs)


def test_site_volumes_are_bounded_at_load_as_at_start():
    from shifter_core.options import MAX_VOLUMES

    specs = [f"/s{i}:/t{i}" for i in range(MAX_VOLUMES + 1)]
    with pytest.raises(ConfigError, match=f"more than {MAX_VOLUMES} volumes"):
        config.parse(_site(*specs))
    assert len(config.parse(_site(*specs[:-1])).runtime.site_volumes) == MAX_VOLUMES
