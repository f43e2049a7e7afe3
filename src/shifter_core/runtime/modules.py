"""Which modules a container loads: the site's defaults, the user's ``--module``, conflicts.

``--module=a,b`` loads the defaults plus ``a`` and ``b``; ``--module=none`` loads nothing,
defaults included; no ``--module`` loads the defaults. Order: defaults in the order of the
configuration, then the requested ones in the order given (their environment changes apply
in this order).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..options import MODULE_NONE, parse_modules
from .errors import ModuleError

TYPE_CHECKING = False  # typing is not imported at run time: it costs start-up time

if TYPE_CHECKING:
    from ..config import ModuleConfig


def select_modules(
    value: str | None, available: Mapping[str, ModuleConfig]
) -> list[tuple[str, ModuleConfig]]:
    """The modules to load for a ``--module`` value (None: not given)."""
    names = parse_modules(value) if value is not None else []
    if names == [MODULE_NONE]:
        return []
    unknown = [n for n in names if n not in available]
    if unknown:
        known = ", ".join(sorted(available)) or "none are configured"
        raise ModuleError(f"unknown module {unknown[0]!r}", hint=f"available modules: {known}")
    chosen = [n for n, m in available.items() if m.default]
    chosen += [n for n in names if n not in chosen]
    for name in chosen:
        for other in available[name].conflicts:
            if other in chosen:
                raise ModuleError(
                    f"modules {name!r} and {other!r} cannot be loaded together",
                    hint="drop one of them (--module=none turns the defaults off)",
                )
    return [(n, available[n]) for n in chosen]
