"""Images: from a registry (or an image file) to a squashfs in the store, and onto a node.

One concept per module; dependencies point down this list::

    pipeline            resolve, fetch, flatten, convert, publish: one pull, end to end
    convert, nodecache  tar stream -> squashfs (tar2sqfs); verified node-local copies of images
    flatten/            layers -> one tar stream
    registry/           Docker Registry v2 / OCI distribution client; per-user credentials
    layercache, store   compressed layers by digest; the image store (<id>.squashfs + .json)
    limits, content     bounds on what a pull may cost; checks of what root reads from an image

This package imports nothing from ``runtime``, ``gateway``, ``slurm`` or ``cli``; they import it.
``content`` and ``store`` are on every container's start-up path, so this file imports nothing.
"""
