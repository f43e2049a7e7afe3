"""Images: from a registry (or an image file) to a squashfs in the store, and onto a node.

Shaped like Charliecloud's ``lib/``, one concept per module; dependencies point down this list
(``tests/unit/test_package_map.py`` checks it)::

    pipeline            resolve, fetch, flatten, convert, publish: one pull, end to end
    convert, nodecache  tar stream -> squashfs (tar2sqfs); verified node-local copies of images
    flatten/            layers -> one tar stream (spool, policy, tree, writer, twopass, onepass)
    registry/           Docker Registry v2 / OCI distribution: client, auth, transport,
                        settings (mirrors, endpoints), credentials (``shifterimg login``)
    layercache, store   compressed layers by digest; the image store (<id>.squashfs + .json)
    oci, errors         the OCI model (media types, digests, platforms, descriptors, config);
                        the RegistryError family
    limits, content     bounds on what a pull may cost; checks of what root reads from an image

This package imports nothing from ``runtime``, ``gateway``, ``slurm`` or ``cli``; they import it.
Importing it costs nothing: ``content`` and ``store`` are on every container's start-up path,
so this file stays empty.
"""
