"""Shifter: run Docker/OCI images as Slurm jobs, securely and at scale.

The package reads like a map of the system (docs/architecture.md has the whole of it);
dependencies point down this list:

- :mod:`.cli`       ``shifter``, ``shifterimg``: arguments and printing only
- :mod:`.slurm`     the SPANK plugin's Python side, one module per Slurm context
- :mod:`.gateway`   the image gateway service (HTTP API, jobs, munge authentication)
- :mod:`.runtime`   plan -> root (privileged | unprivileged); entering and dropping
- :mod:`.jobroot`   a job's directory on a node: paths, its record, matching, removal
- :mod:`.image`     OCI model, registries, flattening, conversion, the image store
- :mod:`.config`, :mod:`.config_cache`, :mod:`.options`, :mod:`.reference`,
  :mod:`.mounts`, :mod:`.syscalls`, :mod:`.fsutil`, :mod:`.errors`: the ground floor
"""

__version__ = "0.1.0"
