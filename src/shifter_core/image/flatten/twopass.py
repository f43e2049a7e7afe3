"""Flatten any number of layers in two passes: plan the final tree, then write it.

Pass 1 applies the headers of every layer, in order, to a :class:`~.tree.Tree` while the layers
decompress into their spools (all at once, as many at a time as there are CPUs). Pass 2 writes
the final tree: directories (the root first, then by path), inodes without data (by path), then
files with data in layer and offset order; an inode with several names is written once,
followed by hardlinks for its other names. The package's docstring
(:mod:`shifter_core.image.flatten`) says why this order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tarfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ..limits import UnpackBudget
from .policy import FIFO, REG, SYM, FlattenPolicy, FlattenStats, header, link_header
from .spool import LayerSource
from .tree import Inode, Tree
from .writer import TarWriter

LOG = logging.getLogger(__name__)

def flatten(
    layers: Sequence[Path],
    out: BinaryIO,
    *,
    policy: FlattenPolicy | None = None,
    spool_dir: Path | None = None,
    budget: UnpackBudget | None = None,
) -> FlattenStats:
    """Apply ``layers`` (lowest first) and write the final tree to ``out`` as a PAX tar stream.

    Compressed layers are decompressed once each into anonymous files in ``spool_dir``
    (default: the temporary directory), which need the image's uncompressed size while the
    call runs.  ``out`` is only written sequentially (a pipe is fine) and is flushed, not
    closed.  Raises ``FlattenError`` when a layer cannot be read or is not a tar archive;
    errors writing to ``out`` (``BrokenPipeError`` when the converter died) propagate
    unchanged.  After any error the output is incomplete (no end-of-archive blocks) and must
    be discarded.  *budget* bounds decompressed bytes and entries (``LimitExceeded``).
    """
    policy = policy or FlattenPolicy()
    stats = FlattenStats(layers=len(layers))
    tree = Tree(policy, stats)
    with contextlib.ExitStack() as stack:
        sources: list[LayerSource] = []
        # Pass 1: each layer decompressed once, its headers applied to the tree.
        # Every layer starts decompressing at once (as many at a time as there are CPUs) ...
        slots = threading.Semaphore(os.cpu_count() or 1)
        for index, path in enumerate(layers):
            source = LayerSource(Path(path), index, spool_dir, slots, budget)
            stack.callback(source.close)
            sources.append(source)
        # ... while pass 1 reads their headers in order and applies them to the tree.
        for index, source in enumerate(sources):
            for member in source.members():
                tree.apply(index, member)
            source.size()  # the whole layer decompressed: a bad checksum at its end fails here
        _emit(tree, sources, TarWriter(out), policy, stats)
    LOG.debug("flattened %d layers: %s", len(layers), stats)
    return stats


def _emit(
    tree: Tree,
    sources: list[LayerSource],
    writer: TarWriter,
    policy: FlattenPolicy,
    stats: FlattenStats,
) -> None:
    """Pass 2: write the final tree (see the module's docstring for the order)."""
    dirs, names, inodes = tree.walk()
    no_data: list[tuple[str, Inode, list[str]]] = []
    with_data: list[tuple[int, int, Inode, list[str]]] = []
    for key, inode in inodes.items():
        inode_names = [path for _, path in sorted(names[key])]
        if not policy.keeps(inode.kind):
            stats.devices_dropped += len(inode_names)
            continue
        if inode.kind == REG and inode.meta.size > 0:
            with_data.append((inode.layer, inode.offset, inode, inode_names))
        else:
            no_data.append((inode_names[0], inode, inode_names))
    no_data.sort(key=lambda item: item[0])
    with_data.sort(key=lambda item: item[:2])  # layer by layer, each read front to back

    def write_names(inode: Inode, inode_names: list[str]) -> None:
        primary = header(inode_names[0], inode.meta, policy)
        if inode.kind == REG:
            primary.type = tarfile.REGTYPE
            stats.files += 1
            stats.bytes += primary.size
            source = sources[inode.layer]
            if inode.sparse is not None:
                writer.add_stream(primary, source.sparse_data(inode.sparse))
            elif primary.size:
                writer.add_data(primary, source, inode.offset)
            else:
                writer.add(primary)
        elif inode.kind == SYM:
            stats.symlinks += 1
            writer.add(primary)
        elif inode.kind == FIFO:
            stats.fifos += 1
            writer.add(primary)
        else:
            stats.devices += 1
            writer.add(primary)
        for other in inode_names[1:]:
            writer.add(link_header(other, inode_names[0], primary))
            stats.hardlinks += 1

    for path, meta in dirs:
        writer.add(header(path, meta, policy))
        stats.dirs += 1
    for _, inode, inode_names in no_data:
        write_names(inode, inode_names)
    for layer, _, inode, inode_names in with_data:
        if layer not in stats.layers_with_data:
            stats.layers_with_data.append(layer)
        write_names(inode, inode_names)
    writer.close()
