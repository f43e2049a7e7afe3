"""The names the Slurm side shares with the job, its prolog and its steps: defined once.

The submission side exports ``SHIFTER_IMAGE`` (the image id), ``SHIFTER_IMAGEREQUEST``,
``SHIFTER_VOLUME`` (every ``--volume``, canonical, joined by ``;``: Slurm forwards only the
last value of a repeated option to slurmstepd) and ``SHIFTER_MODULE``, in the job's
environment and as job-control variables (``SPANK_SHIFTER_*`` in the prolog,
``SLURM_SPANK_SHIFTER_*`` in the job). All of them come from the user's process.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing and collections.abc cost start-up time on this path
if TYPE_CHECKING:
    from collections.abc import Callable

# Option numbers, as the shim declares them (spank/shifter_spank.c: shifter_options).
OPT_IMAGE, OPT_VOLUME, OPT_MODULE, OPT_IMAGE_PULL = 0, 1, 2, 3
OPTION_NAMES = {
    OPT_IMAGE: "image",
    OPT_VOLUME: "volume",
    OPT_MODULE: "module",
    OPT_IMAGE_PULL: "image-pull",
}
# --image-pull: pull an image the gateway does not know at submission (where the site's
# slurm.pull_on_submit allows it), or never (refuse it, as without pulls on demand).
PULL_MISSING, PULL_NEVER = "missing", "never"
PULL_MODES = (PULL_MISSING, PULL_NEVER)
PLUGIN_ARGS = ("config",)

ENV_IMAGE = "SHIFTER_IMAGE"
ENV_IMAGEREQUEST = "SHIFTER_IMAGEREQUEST"
ENV_VOLUME = "SHIFTER_VOLUME"
ENV_MODULE = "SHIFTER_MODULE"
# Set by srun for a step whose tasks run in the container (an explicit --image); sruns that
# only inherit the job's --image (e.g. `srun shifter ...` in a batch job) set it to 0.
ENV_CONTAINER_STEP = "SHIFTER_CONTAINER_STEP"
EXPORTED = (ENV_IMAGE, ENV_IMAGEREQUEST, ENV_VOLUME, ENV_MODULE, ENV_CONTAINER_STEP)

# How Slurm shows a job's options and job-control variables to the job's own sruns, and
# the job-control variables to its prolog and epilog.
INHERITED_OPTION = "SLURM_SPANK__SLURM_SPANK_OPTION_shifter_"
JOB_CONTROL_PREFIX = "SLURM_SPANK_"
PROLOG_PREFIX = "SPANK_"
SLURM_BATCH_SCRIPT = 0xFFFFFFFB  # the batch step's step id


def request_from(get: Callable[[str], str | None], prefix: str = "") -> dict[str, str]:
    """The container request of a job or step, read with ``get`` (``environ.get``, or
    ``getenv`` of a SPANK handle) under ``prefix``; values as the user's process sent them:
    check them before use (:mod:`.container`)."""
    return {
        "image_id": get(prefix + ENV_IMAGE) or "",
        "image_request": get(prefix + ENV_IMAGEREQUEST) or "",
        "volume": get(prefix + ENV_VOLUME) or "",
        "module": get(prefix + ENV_MODULE) or "",
    }
