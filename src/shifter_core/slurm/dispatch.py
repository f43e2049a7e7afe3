"""Where the shim's calls land: Python has started, an option was given, a callback ran.

The shim (``spank/shifter_spank.c``, through the init code of ``cffi_build/build_spank.py``)
calls :func:`bind` once, then :func:`on_start`, :func:`on_option` and :func:`on_hook`;
each sends the call to the module of its SPANK context (:data:`HOOKS`). Nothing here lets
an exception reach Slurm: a failure is logged through Slurm and returned as -1.
"""

from __future__ import annotations

import os

from ..errors import ShifterError
from .api import ERROR, Spank, bind, log, log_exception
from .names import OPTION_NAMES, PLUGIN_ARGS
from .state import state
from .stepd import handle_remote_option
from .submit import handle_option

__all__ = ["HOOKS", "bind", "on_hook", "on_option", "on_start"]

# The callbacks Python handles, by the module of their context (imported when first
# called: the prolog's modules are heavy, and every srun and step starts here); the shim
# forwards exactly these.
HOOKS: dict[str, tuple[str, str]] = {
    "init_post_opt": ("submit", "hook_init_post_opt"),
    "user_init": ("stepd", "hook_user_init"),
    "task_init_privileged": ("stepd", "hook_task_init_privileged"),
    "task_init": ("stepd", "hook_task_init"),
    "job_prolog": ("jobscript", "hook_job_prolog"),
    "job_epilog": ("jobscript", "hook_job_epilog"),
}


def parse_plugin_args(args: list[str]) -> dict[str, str]:
    """``config=PATH`` and friends from the ``plugstack.conf`` line."""
    parsed: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in PLUGIN_ARGS:
            raise ShifterError(
                f"unknown plugin argument {arg!r} in plugstack.conf",
                hint=f"known arguments: {', '.join(k + '=...' for k in PLUGIN_ARGS)}",
            )
        parsed[key] = value
    return parsed


def on_start(args: list[str]) -> int:
    """Python just started in this process: read the plugin arguments and the config."""
    from ..config_cache import load

    try:
        state.args = parse_plugin_args(args)
        state.config = load(state.args.get("config"), privileged=os.geteuid() == 0)
    except ShifterError as err:
        log(ERROR, str(err))
        return -1
    except Exception:  # the plugin must report, never crash Slurm
        log_exception("while starting")
        return -1
    return 0


def on_option(val: int, optarg: str, remote: bool) -> int:
    """Check one option value; a bad value fails the submission (srun/sbatch exit 1)."""
    name = OPTION_NAMES.get(val, str(val))
    try:
        if remote:
            handle_remote_option(val, optarg)
        else:
            handle_option(val, optarg)
    except ShifterError as err:
        log(ERROR, f"--{name}: {err}")
        return -1
    except Exception:  # the plugin must report, never crash srun
        log_exception(f"while checking --{name}")
        return -1
    return 0


def on_hook(hook: str, handle: object, args: list[str]) -> int:
    """Run one SPANK callback; 0 on success, -1 (with a logged reason) on failure."""
    where = HOOKS.get(hook)
    if where is None:
        return 0
    try:
        import importlib

        module = importlib.import_module(f".{where[0]}", __package__)
        getattr(module, where[1])(Spank(handle))
    except ShifterError as err:
        log(ERROR, str(err))
        return -1
    except Exception:  # report through Slurm, never crash slurmstepd
        log_exception(f"in {hook}")
        return -1
    return 0


