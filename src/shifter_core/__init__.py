"""Shifter: run Docker/OCI images as Slurm jobs, securely and at scale.

The package reads like a map of the system:

- :mod:`shifter_core.config`   the site configuration file (``shifter.yaml``)
- :mod:`shifter_core.options`  parsing of ``--image``, ``--volume`` and ``--module``
- :mod:`shifter_core.spank`    the Slurm plugin's Python side (every SPANK callback)
- :mod:`shifter_core.errors`   errors that carry a hint for the user
"""

__version__ = "0.1.0"
