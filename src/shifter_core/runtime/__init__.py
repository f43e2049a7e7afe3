"""The container runtime: one plan, two ways to realise it.

- :mod:`.plan`: :class:`RunRequest` (what was asked) → :func:`build_plan` → :class:`Plan`
  (pure data: image, volumes, modules, environment, working directory, command, user);
  :func:`request_from_env` reads a job's ``SHIFTER_*`` variables; :func:`resolve_image`
  finds the image (gateway or ``id:``).
- :mod:`.privileged` (root; prolog, slurmstepd, epilog): :func:`prepare`, :func:`teardown`,
  and per job :func:`prepare_job`, :func:`teardown_job`.
- :mod:`.unprivileged` (``shifter`` as a user): :func:`run` (fast path into a prepared
  root, else a private root over squashfuse_ll).
- :mod:`.assemble` builds a root; :mod:`.paths` resolves paths inside it; :mod:`.enter`
  pivots into a prepared root and sheds capabilities; :mod:`.drop` drops to the user and
  execs. Prepared roots of jobs and their record: :mod:`shifter_core.jobroot`.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .errors import ContainerError, ImageError, ModuleError, PrivilegeError, VolumeError
    from .images import resolve_image
    from .plan import Plan, RunRequest, User, build_plan, request_from_env

# Loaded on first use: slurmstepd imports .enter on every container task's path, and the plan
# and image modules would cost each task their import time.
_LAZY = {
    "ContainerError": "errors",
    "ImageError": "errors",
    "ModuleError": "errors",
    "PrivilegeError": "errors",
    "VolumeError": "errors",
    "resolve_image": "images",
    "Plan": "plan",
    "RunRequest": "plan",
    "User": "plan",
    "build_plan": "plan",
    "request_from_env": "plan",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "ContainerError",
    "ImageError",
    "ModuleError",
    "Plan",
    "PrivilegeError",
    "RunRequest",
    "User",
    "VolumeError",
    "build_plan",
    "request_from_env",
    "resolve_image",
]
