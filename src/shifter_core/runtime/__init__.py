"""The container runtime: one plan, two ways to realise it.

- :mod:`.plan`: :class:`RunRequest` (what was asked) → :func:`build_plan` → :class:`Plan`
  (pure data: image, volumes, modules, environment, working directory, command, user);
  :func:`request_from_env` reads a job's ``SHIFTER_*`` variables; :func:`resolve_image`
  finds the image (gateway or ``id:``).
- :mod:`.privileged` (root; prolog, slurmstepd, epilog): :func:`prepare`, :func:`enter`,
  :func:`teardown`, and per job :func:`prepare_job`, :func:`teardown_job`.
- :mod:`.unprivileged` (``shifter`` as a user): :func:`run` (fast path into a prepared
  root, else a private root over squashfuse_ll).
- :mod:`.assemble` builds a root; :mod:`.paths` resolves paths inside it; :mod:`.drop`
  drops to the user and execs; :mod:`.jobs` describes prepared roots and their state file.
"""

from .errors import ContainerError, ImageError, ModuleError, PrivilegeError, VolumeError
from .images import resolve_image
from .plan import Plan, RunRequest, User, build_plan, request_from_env

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
