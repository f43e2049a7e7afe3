"""The start-up cache of the configuration: used only when it exactly matches the file."""

import os

import pytest

from shifter_core import config, config_cache, config_file
from shifter_core.errors import ConfigError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the cache is written by root only")


@pytest.fixture
def conf(tmp_path):
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "shifter.yaml"
    path.write_text("image_path: /cached\n")
    path.chmod(0o644)
    return path


def test_loading_as_root_writes_a_cache_that_matches(conf):
    config.load(str(conf))
    cache = conf.with_name(".shifter.yaml.cache")
    assert cache.stat().st_uid == 0
    assert cache.stat().st_mode & 0o777 == 0o644
    assert config_file.read(str(conf))["image_path"] == "/cached"
    cached = config_cache.load(str(conf))
    assert isinstance(cached, config_cache.Section)  # the view, not the parsed schema
    assert cached.gateway.url.startswith("http") and cached.image_path == "/cached"
    # every attribute of the typed configuration, with the same values
    parsed = config.load(str(conf))
    assert cached.runtime.run_dir == parsed.runtime.run_dir
    assert cached.slurm.batch_step == parsed.slurm.batch_step
    assert cached.gateway.limits.max_layers == parsed.gateway.limits.max_layers


def test_an_edited_file_is_parsed_again_and_its_errors_reported(conf):
    config.load(str(conf))
    conf.write_text("image_path: /cached\nimage_pth: /typo\n")
    assert config_file.read(str(conf)) is None
    with pytest.raises(ConfigError, match="unknown key 'image_pth'"):
        config_cache.load(str(conf))


def test_a_cache_not_owned_by_root_or_writable_by_others_is_ignored(conf):
    config.load(str(conf))
    cache = conf.with_name(".shifter.yaml.cache")
    cache.chmod(0o666)
    assert config_file.read(str(conf)) is None
    cache.chmod(0o644)
    os.chown(cache, 65534, 0)
    assert config_file.read(str(conf)) is None


def test_a_forged_cache_for_another_file_is_ignored(conf, tmp_path):
    config.load(str(conf))
    other = tmp_path / "other.yaml"
    other.write_text("image_path: /other\n")
    os.replace(conf.with_name(".shifter.yaml.cache"), tmp_path / ".other.yaml.cache")
    assert config_file.read(str(other)) is None
    assert config_cache.load(str(other)).image_path == "/other"


def _same(cached: object, parsed: object, where: str) -> None:
    """Every field of the schema object ``parsed`` is in ``cached``, with the same value,
    sections as sections (attribute access), all the way down."""
    import dataclasses

    for field in dataclasses.fields(parsed):  # type: ignore[arg-type]
        value = getattr(parsed, field.name)
        if field.metadata.get("internal"):
            continue
        assert hasattr(cached, field.name), f"{where}.{field.name} is missing from the view"
        mirror = getattr(cached, field.name)
        if dataclasses.is_dataclass(value):
            assert not isinstance(mirror, dict), f"{where}.{field.name} is a dict in the view"
            _same(mirror, value, f"{where}.{field.name}")
        elif isinstance(value, tuple | list):
            assert list(mirror) == list(value), f"{where}.{field.name}"
        elif not isinstance(value, dict):
            assert mirror == value, f"{where}.{field.name}"


def test_the_view_has_every_section_and_field_of_the_schema(conf):
    """A new section of the schema must reach the view (a missing one was a dict there)."""
    parsed = config.load(str(conf))
    _same(config_cache.load(str(conf)), parsed, "config")
