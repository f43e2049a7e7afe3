"""The configuration, read one way: :func:`load` gives the typed ``Config``, from the
validated cache (:mod:`.config_file`) when it matches the file, else from the file parsed
(:mod:`.config`). A cached configuration is a :class:`Section` tree with the attributes of
the schema's classes, so callers cannot tell the two apart.

This module imports nothing heavy: it is on the start-up path of the Slurm plugin.
"""

from __future__ import annotations

from .config_file import check_privileged_file, config_path, read

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time
if TYPE_CHECKING:
    from .config import Config


class Section:
    """Attribute access to one section of cached values (the fields of a schema class)."""

    def __init__(self, values: dict[str, object], **children: object) -> None:
        self.__dict__.update(values)
        self.__dict__.update(children)

    def __repr__(self) -> str:
        return f"Section({self.__dict__!r})"


def _env_section(values: object) -> Section:
    section = values if isinstance(values, dict) else {}
    return Section(section, env=Section(section.get("env") or {}))


def view(values: dict[str, object]) -> Config:
    """The cached values as the typed configuration: every attribute of
    :class:`~shifter_core.config.Config` is there, with the value root validated (the
    cache holds every field, defaults included: none is restated here)."""
    children: dict[str, object] = {
        name: Section(section)
        for name in ("gateway", "registries", "conversion", "artifacts", "slurm")
        if isinstance(section := values.get(name), dict)
    }
    gateway = values.get("gateway")
    if isinstance(gateway, dict) and isinstance(gateway.get("limits"), dict):
        children["gateway"] = Section(gateway, limits=Section(gateway["limits"]))
    modules = values.get("modules")
    config = Section(
        values,
        runtime=_env_section(values.get("runtime")),
        modules={
            n: _env_section(m) for n, m in (modules if isinstance(modules, dict) else {}).items()
        },
        **children,
    )
    return config  # type: ignore[return-value]  # a structural stand-in for Config


def load(path: str | None = None, *, privileged: bool = False) -> Config:
    """The site configuration, typed: the validated cache when it matches the file (no YAML,
    no schema imported: the plugin's and ``shifter``'s fast path), else the file parsed.
    The one way every component reads the configuration."""
    file = config_path(path, privileged=privileged)
    if privileged:
        check_privileged_file(file)
    values = read(file)
    if values is not None and isinstance(values.get("runtime"), dict):
        return view(values)
    from .config import load as parse

    return parse(file, privileged=privileged)
