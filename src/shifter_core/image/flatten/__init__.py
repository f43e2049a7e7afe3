"""Flatten OCI/Docker image layers into one tar stream, without extracting anything to disk.

Modules, in the order a layer meets them: :mod:`.spool` reads a layer (decompressed once into
an anonymous spool file, headers read strictly), :mod:`.policy` decides what each member
becomes (paths, whiteouts, kinds, hardlinks, metadata and headers: the one policy of both
passes), :mod:`.tree` holds the final tree of the two passes, :mod:`.writer` writes the tar
stream (``sendfile`` for data). :func:`.twopass.flatten` serves every image;
:func:`.onepass.flatten_one_pass` writes a single-layer image while it is read, when the layer
allows it (:mod:`shifter_core.image.convert` chooses).

``flatten(layers, out)`` applies the layer tars in order, as the OCI image spec's "Applying
changesets" describes, and writes ONE PAX tar of the final tree to ``out`` (meant to be the
stdin of ``tar2sqfs``).  Layers may be gzip-, zstd- or un-compressed; the compression is
detected from the magic bytes, never from the name.

How it works (two passes; memory proportional to the number of entries in the final tree,
never to file sizes; each layer decompressed once):

1. *Plan*: every compressed layer is decompressed once (gzip with ISA-L, zstd with
   python-zstandard) into an anonymous spool file (``spool_dir``; an uncompressed layer is
   used in place), and its headers are read in order, seeking over the data.  An in-memory
   tree is updated as each member is applied: directories hold their metadata and children;
   every other name points to an *inode* (regular file, symlink, device or FIFO) that
   remembers the layer and the offset of its data.  Hardlinks add a name to the inode that
   their target names at that moment, so a hardlink keeps its content when the original is
   later whited out or replaced, and hardlinks across layers work.
2. *Emit*: the final tree is written in this order:

   a. every directory, root (``./``) first, then sorted by path, so parents come before their
      children (metadata from the last layer that declared the directory; directories no
      layer declares are emitted as mode 0755, uid/gid 0, mtime 0, as ``tar2sqfs`` does);
   b. inodes without data (symlinks, empty files, FIFOs, devices when kept), sorted by path;
   c. regular files with data, in layer order and offset order inside a layer; the kernel
      copies the data from the spool files to the output (``sendfile``) when the output is
      a pipe or a file.

   An inode with several surviving names is written once, under its first surviving name
   (the name that was created first), immediately followed by hardlinks to it for the other
   names.  The stream is therefore valid for any tar reader: directories before their
   contents, hardlink targets before the links.  ``tar2sqfs`` builds its tree in memory and
   keeps every mtime (its default; ``-k`` would drop them).  GNU tar, which restores a
   directory's mtime as soon as the archive leaves that directory, needs
   ``--delay-directory-restore`` to keep directory mtimes with this order.

Semantics (matching ``umoci unpack`` where the spec leaves room):

- ``DIR/.wh.NAME`` removes ``NAME`` and its subtree; ``DIR/.wh..wh..opq`` removes every child
  of ``DIR``.  Both affect only what lower layers put there: entries of the same layer (and
  directories that are ancestors of them) that were applied before the whiteout survive.
  Whiteouts never appear in the output; whiteouts of missing paths are no-ops; aufs metadata
  (``.wh..wh.*`` other than the opaque marker, and anything below it) is ignored.  A whiteout
  with an empty name (a member whose base name is exactly ``.wh.``) refuses the layer, as in
  umoci; ``.wh..`` and ``.wh...`` are ignored with a warning.
- A non-directory replaces whatever was at its path (a directory with its whole subtree); a
  directory replaces a non-directory; a directory entry for an existing directory only
  updates its metadata and keeps its children.  Parents that a member needs but no layer
  declared are created implicitly; a non-directory in the way of such a parent is replaced
  by a directory (like overlayfs; symlinks are never followed, so ``lib/x`` below a ``lib``
  symlink does not land in the symlink's target as it would with ``umoci``).
- Symlinks are data: targets are kept verbatim, even absolute or escaping ones.
- Names are normalised: a leading ``/`` or ``./``, ``.`` components and trailing slashes are
  dropped and ``..`` is resolved lexically, so ``/abs/path`` becomes ``abs/path`` (the image
  root is the only root a layer knows, as in Docker, containerd and umoci).  A member whose
  name still climbs above the root (``../x``, ``a/../../x``) is dropped with a warning, and so
  is a hardlink whose target does; nothing can name anything outside the tree.

Policy (DESIGN.md item 2; :class:`.policy.FlattenPolicy`): contents, types, modes, numeric
uid/gid and mtimes (including fractions of a second, in PAX records) are kept, user and group
names are not; setuid, setgid and sticky bits are kept (the runtime mounts every image
``nosuid`` and sets ``no_new_privs``); FIFOs are kept (they are not devices: written like any
other inode without data, hardlinks to them too); char and block device nodes are dropped and
counted, hardlinks to them too; every extended attribute (PAX ``SCHILY.xattr.*``, hence file
capabilities) and every other PAX record is dropped; every entry gets ``a+rX`` (read for all;
execute/search for all on directories and on files with any execute bit).

Errors: a layer that is missing, compressed otherwise (xz, bzip2, lz4), corrupt or truncated
(bad header checksum or partial header in the middle of the tar, a gzip or zstd stream cut
short or failing its checksum) raises :class:`.spool.FlattenError` naming the layer;
``tarfile`` and python-zstandard would otherwise end such a layer early without a word.  So
does a whiteout with an empty name, naming the layer (from 1) and the member, in either
strategy.
"""
