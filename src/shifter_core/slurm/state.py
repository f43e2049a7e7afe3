"""What this process has learnt: plugin arguments, configuration, the user's options, and
for a container step the root its tasks enter. One instance per process (:data:`state`)."""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs start-up time on this path
if TYPE_CHECKING:
    from ..config import Config


class PluginState:
    """See the module docstring; filled in by :mod:`.dispatch`, :mod:`.submit`, :mod:`.stepd`."""

    def __init__(self) -> None:
        self.args: dict[str, str] = {}
        self.config: Config | None = None
        self.image: str | None = None  # canonical TYPE:TAG (validated where parsed)
        self.image_text: str | None = None  # the --image value as the user typed it
        self.volumes: list[str] = []  # every --volume value, each maybe ';'-joined
        self.modules: str | None = None
        self.volumes_from_job = False
        self.image_values: list[str] = []  # every --image value srun saw, replays included
        # A container step (slurmstepd): the root its tasks enter, and their environment.
        self.step_root: str | None = None
        self.step_env: list[list[str]] = []
        self.step_error: str | None = None

    @property
    def site(self) -> Config:
        """The site configuration (read when Python started in this process)."""
        if self.config is None:
            raise RuntimeError("the plugin's configuration was not loaded")
        return self.config


state = PluginState()
