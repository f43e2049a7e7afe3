"""The two-pass flattener's tree: the image as the layers leave it, metadata only.

Directories hold their metadata and children; every other name points to an :class:`Inode`
(regular file, symlink, device or FIFO) that remembers the layer and the offset of its data.
Hardlinks add a name to the inode that their target names at that moment, so a hardlink keeps
its content when the original is later whited out or replaced, and hardlinks across layers
work. Memory is proportional to the entries of the final tree, never to file sizes. What each
member becomes is :mod:`.policy`'s decision; this module applies it.
"""

from __future__ import annotations

import logging
import tarfile

from .policy import (
    DIR,
    LINK,
    WHITEOUT_OPAQUE,
    FlattenPolicy,
    FlattenStats,
    Meta,
    below_aufs_metadata,
    hidden_name,
    is_whiteout,
    link_target,
    member_kind,
    member_path,
)

LOG = logging.getLogger(__name__)


class Inode:
    """A non-directory object; ``layer`` and ``offset`` (of its data in the uncompressed
    layer) locate its data; ``sparse`` is the member of a GNU sparse file."""

    __slots__ = ("kind", "layer", "meta", "offset", "sparse")

    def __init__(self, kind: str, meta: Meta, layer: int, member: tarfile.TarInfo) -> None:
        self.kind = kind
        self.meta = meta
        self.layer = layer
        self.offset = member.offset_data
        self.sparse = member if member.sparse is not None else None


class _Dir:
    __slots__ = ("children", "meta", "touched")

    def __init__(self, meta: Meta, touched: int) -> None:
        self.meta = meta
        self.children: dict[str, _Dir | _Name] = {}
        self.touched = touched  # the last layer that declared it or put something below it


class _Name:
    """A directory entry naming an inode."""

    __slots__ = ("inode", "seq", "touched")

    def __init__(self, inode: Inode, touched: int, seq: int) -> None:
        self.inode = inode
        self.touched = touched
        self.seq = seq  # creation order: the first surviving name carries the data


class Tree:
    """The tree the layers build, applied member by member (:meth:`apply`), lowest layer
    first."""

    def __init__(self, policy: FlattenPolicy, stats: FlattenStats) -> None:
        self.policy = policy
        self.stats = stats
        self.root = _Dir(Meta(None, False), -1)
        self.seq = 0

    # -- lookups and changes -----------------------------------------------------------------

    def lookup(self, path: str) -> _Dir | _Name | None:
        node: _Dir | _Name = self.root
        if not path:
            return node
        for part in path.split("/"):
            if not isinstance(node, _Dir):
                return None
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def parent_for(self, path: str, layer: int) -> tuple[_Dir, str]:
        """The directory that will hold ``path`` (created as needed) and the base name."""
        *parents, base = path.split("/")
        node = self.root
        for depth, part in enumerate(parents):
            child = node.children.get(part)
            if not isinstance(child, _Dir):
                if child is not None:
                    LOG.warning(
                        "layer %d: %r needs %r as a directory: replacing the non-directory there",
                        layer + 1,
                        path,
                        "/".join(parents[: depth + 1]),
                    )
                child = _Dir(Meta(None, False), layer)
                node.children[part] = child
            child.touched = layer
            node = child
        return node, base

    def remove_lower(self, parent: _Dir, name: str, layer: int) -> None:
        """Remove ``parent/name`` except what ``layer`` itself has put there."""
        stack = [(parent, name)]
        while stack:
            directory, child_name = stack.pop()
            child = directory.children[child_name]
            if child.touched != layer:
                del directory.children[child_name]
            elif isinstance(child, _Dir):
                stack.extend((child, grandchild) for grandchild in child.children)

    # -- applying one member -----------------------------------------------------------------

    def apply(self, layer: int, member: tarfile.TarInfo) -> None:
        """Apply one member of layer number *layer* (from 0)."""
        path = member_path(layer, member, self.stats)
        if path is None:
            return
        if not path:
            if member.isdir():
                self.root.meta = Meta(member, self.policy.keep_xattrs)
            else:
                self.stats.other_dropped += 1
                LOG.warning(
                    "layer %d: dropping %r: the root can only be a directory",
                    layer + 1,
                    member.name,
                )
            return
        if is_whiteout(path):
            self.whiteout(layer, path, member)
            return
        if below_aufs_metadata(path):
            return
        kind = member_kind(layer, member, self.stats)
        if kind is None:
            return
        if kind == DIR:
            parent, base = self.parent_for(path, layer)
            existing = parent.children.get(base)
            meta = Meta(member, self.policy.keep_xattrs)
            if isinstance(existing, _Dir):
                existing.meta = meta
                existing.touched = layer
            else:
                parent.children[base] = _Dir(meta, layer)
            return
        if kind == LINK:
            target = link_target(layer, member, self.stats, self.kind_at)
            if target is None:
                return
            node = self.lookup(target)
            assert isinstance(node, _Name)
            inode = node.inode
        else:
            inode = Inode(kind, Meta(member, self.policy.keep_xattrs), layer, member)
        parent, base = self.parent_for(path, layer)
        self.seq += 1
        parent.children[base] = _Name(inode, layer, self.seq)

    def kind_at(self, path: str) -> str | None:
        """The kind of what is at *path* (``DIR`` for a directory), None for nothing."""
        node = self.lookup(path)
        if node is None:
            return None
        return DIR if isinstance(node, _Dir) else node.inode.kind

    def whiteout(self, layer: int, path: str, member: tarfile.TarInfo) -> None:
        """Remove what the whiteout at *path* hides, except what *layer* itself put there."""
        name = hidden_name(layer, member, path, self.stats)
        if name is None:
            return
        directory = self.lookup(path.rpartition("/")[0])
        if not isinstance(directory, _Dir):
            return
        if name == WHITEOUT_OPAQUE:
            for child in list(directory.children):
                self.remove_lower(directory, child, layer)
        elif name in directory.children:
            self.remove_lower(directory, name, layer)

    # -- the final tree ----------------------------------------------------------------------

    def walk(
        self,
    ) -> tuple[list[tuple[str, Meta]], dict[int, list[tuple[int, str]]], dict[int, Inode]]:
        """Directories in emission order, and the surviving names of every inode."""
        dirs: list[tuple[str, Meta]] = []
        names: dict[int, list[tuple[int, str]]] = {}
        inodes: dict[int, Inode] = {}
        stack: list[tuple[str, _Dir]] = [("", self.root)]
        while stack:
            prefix, directory = stack.pop()
            for name, child in directory.children.items():
                path = prefix + name
                if isinstance(child, _Dir):
                    dirs.append((path, child.meta))
                    stack.append((path + "/", child))
                else:
                    key = id(child.inode)
                    inodes[key] = child.inode
                    names.setdefault(key, []).append((child.seq, path))
        # A parent's path is a prefix of its children's, so sorting puts parents first.
        dirs.sort(key=lambda item: item[0])
        dirs.insert(0, (".", self.root.meta))
        return dirs, names, inodes
