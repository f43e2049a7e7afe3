"""The site configuration for ``shifter``'s start-up, without parsing YAML when possible.

Every ``shifter`` run needs a handful of settings. Importing the YAML parser and the typed
schema costs more than everything else the command does, so the values root's processes
cached next to the file (:mod:`shifter_core.config_cache`, checked against the file's
identity and the schema version) are read instead, as light objects with the same
attributes as :class:`shifter_core.config.Config`. Without a valid cache the file is parsed.
"""

from __future__ import annotations

from .. import config_cache

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time

if TYPE_CHECKING:
    from typing import Any


class Section:
    """Attribute access to one mapping of cached values."""

    def __init__(self, values: dict[str, Any], **children: Any) -> None:
        self.__dict__.update(values)
        self.__dict__.update(children)

    def __repr__(self) -> str:
        return f"Section({self.__dict__!r})"


def _module(values: dict[str, Any]) -> Section:
    return Section(values, env=Section(values.get("env") or {}))


def from_values(values: dict[str, Any]) -> Any:
    """A Config-like object from the cached (``dataclasses.asdict``) values."""
    runtime = values.get("runtime") or {}
    children = {
        name: Section(values.get(name) or {})
        for name in ("gateway", "registries", "conversion", "slurm")
        if isinstance(values.get(name), dict)
    }
    return Section(
        values,
        runtime=Section(runtime, env=Section(runtime.get("env") or {})),
        modules={name: _module(m) for name, m in (values.get("modules") or {}).items()},
        **children,
    )


def load(path: str | None = None) -> Any:
    """The configuration: cached values when they match the file, else the parsed file."""
    file = config_cache.config_path(path)
    values = config_cache.read(file)
    if values is not None and isinstance(values.get("runtime"), dict):
        return from_values(values)
    from .. import config

    return config.load(file)
