"""The package map of DESIGN.md ("Package map (target)"), checked on the source.

Layers of ``shifter_core``, top to bottom; a module may import its own layer and those below::

    cli; slurm; gateway; runtime; jobroot; api; image; base

Adjusted to the code as it is: ``api`` is the gateway's protocol, shared by its server and
its client (``client``, ``gateway.models``, ``gateway.errors``, ``gateway.transport``):
``runtime``, ``slurm`` and ``cli`` reach the gateway through it, and its models read image
records, so it sits between ``jobroot`` and ``image``. ``base`` is the package's ``__init__``
(its version), ``config``, ``config_file``, ``config_cache``, ``syscalls``, ``errors``,
``fsutil``, ``options``, ``reference``, ``hubnames``, ``usercache``, ``fnv``, ``munge``,
``access`` (the visibility rule), ``mounts`` (the mount table), ``udiroot`` and the
compiled helpers. A module belongs to the layer of its
longest matching prefix. Every import counts: at module level, in a function, or under
``TYPE_CHECKING``. Inside ``image`` the dependencies point one way too (:data:`IMAGE_RANKS`).

The checks are strict and have no exceptions.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "shifter_core"
MAX_LINES = 800

# Top to bottom. A prefix names a package (or module) and everything below it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cli", ("shifter_core.cli", "shifter_core.doctor")),
    ("slurm", ("shifter_core.slurm",)),
    ("gateway", ("shifter_core.gateway",)),
    ("runtime", ("shifter_core.runtime",)),
    ("jobroot", ("shifter_core.jobroot",)),
    (
        "api",
        (
            "shifter_core.client",
            "shifter_core.gateway.models",
            "shifter_core.gateway.errors",
            "shifter_core.gateway.transport",
        ),
    ),
    ("image", ("shifter_core.image",)),
    (
        "base",
        (
            "shifter_core.config",
            "shifter_core.config_cache",
            "shifter_core.config_file",
            "shifter_core.syscalls",
            "shifter_core._syscalls",
            "shifter_core.errors",
            "shifter_core.fsutil",
            "shifter_core.options",
            "shifter_core.reference",
            "shifter_core.hubnames",
            "shifter_core.usercache",
            "shifter_core.fnv",
            "shifter_core.munge",
            "shifter_core._munge_cffi",
            "shifter_core._httpx",
            "shifter_core.access",
            "shifter_core.mounts",
            "shifter_core.udiroot",
            "shifter_core.logformat",
        ),
    ),
)
BASE_PACKAGE = "shifter_core"  # its __init__ holds only the version: part of base

# Inside image, higher ranks may import lower (and equal) ranks, never the other way.
IMAGE_RANKS: dict[str, int] = {
    "shifter_core.image.pipeline": 4,
    "shifter_core.image.convert": 3,
    "shifter_core.image.nodecache": 3,
    "shifter_core.image.artifact": 3,
    "shifter_core.image.flatten": 2,
    "shifter_core.image.registry": 2,
    "shifter_core.image.layercache": 1,
    "shifter_core.image.store": 1,
    "shifter_core.image.oci": 0,
    "shifter_core.image.errors": 0,
    "shifter_core.image.limits": 0,
    "shifter_core.image.content": 0,
}



def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imported(module: str, path: Path) -> Iterator[str]:
    """Every shifter_core module that *module* imports, wherever the import is."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + is_package]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            # ``from X import name``: the submodule X.name if there is one, else X itself
            names = [
                f"{origin}.{a.name}" if f"{origin}.{a.name}" in MODULES else origin
                for a in node.names
            ]
        else:
            continue
        for name in names:
            while name not in MODULES and "." in name:
                name = name.rsplit(".", 1)[0]
            # a module's own packages are imported with it: not an edge of the map
            if name in MODULES and name != module and not module.startswith(name + "."):
                yield name


def _graph() -> dict[str, set[str]]:
    return {m: set(_imported(m, p)) for m, p in MODULES.items()}


GRAPH = _graph()


def _layer(module: str) -> int | None:
    """The layer of *module*: that of its longest matching prefix."""
    if module == BASE_PACKAGE:
        return len(LAYERS) - 1
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[0]
            ):
                best = (len(prefix), rank)
    return None if best is None else best[1]


def _image_rank(module: str) -> int | None:
    """The rank in :data:`IMAGE_RANKS` of *module* or of its package; None when unranked."""
    while module not in IMAGE_RANKS and "." in module:
        module = module.rsplit(".", 1)[0]
    return IMAGE_RANKS.get(module)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_module_is_on_the_map() -> None:
    unmapped = sorted(m for m in MODULES if _layer(m) is None)
    assert not unmapped, f"add these modules to a layer of LAYERS (and DESIGN.md): {unmapped}"
    unranked = sorted(
        m for m in MODULES if m.startswith("shifter_core.image.") and _image_rank(m) is None
    )
    assert not unranked, f"add these modules to IMAGE_RANKS: {unranked}"


def test_no_import_cycles() -> None:
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_upward_imports() -> None:
    upward = []
    for module, targets in GRAPH.items():
        layer = _layer(module)
        for target in sorted(targets):
            target_layer = _layer(target)
            if layer is not None and target_layer is not None and target_layer < layer:
                upward.append(
                    f"{module} ({LAYERS[layer][0]}) imports {target} ({LAYERS[target_layer][0]})"
                )
    assert not upward, "imports of a layer above: " + "; ".join(upward)


def test_image_dependencies_point_one_way() -> None:
    wrong = []
    for module, targets in GRAPH.items():
        rank = _image_rank(module) if module.startswith("shifter_core.image") else None
        for target in sorted(targets):
            target_rank = _image_rank(target) if target.startswith("shifter_core.image") else None
            if rank is not None and target_rank is not None and target_rank > rank:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "image modules importing a higher rank of IMAGE_RANKS: " + "; ".join(wrong)


def test_no_module_over_800_lines() -> None:
    large = []
    for module, path in MODULES.items():
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            large.append(f"{module}: {lines} lines")
    assert not large, f"modules over {MAX_LINES} lines: {large}"
