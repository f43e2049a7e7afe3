"""Docker Hub's naming rules: the one place they are written.

``ubuntu`` is ``docker.io/library/ubuntu:latest``; a first component with a dot, a colon (a
port, or an IPv6 address in brackets: ``[2001:db8::1]:5000``) or an upper-case letter, or
``localhost``, names a registry; Docker Hub's aliases are ``docker.io``. Imports nothing:
every ``srun`` applies these rules (:mod:`.slurm.submit`), and
:class:`.reference.DockerReference` applies them after its grammar has checked the text.
"""

from __future__ import annotations

DOCKER_HUB = "docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DEFAULT_TAG = "latest"


def split_name(name: str) -> tuple[str, str]:
    """``(registry, repository)`` of an image name (without tag or digest)."""
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry, repository = first, rest
    else:
        registry, repository = DOCKER_HUB, name
    if registry in DOCKER_HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in repository:
            repository = f"library/{repository}"
    return registry, repository


def canonical(text: str) -> str:
    """``REGISTRY/REPOSITORY[:TAG][@DIGEST]`` of a reference the grammar accepts, as
    ``str(DockerReference.parse(text))`` gives it (``:latest`` when neither is given).

    A tag is after the last ``:`` that follows the last ``/``, so the colons of an IPv6
    registry (``[::1]:5000/a``) never read as one."""
    name_tag, at, digest = text.partition("@")
    slash, colon = name_tag.rfind("/"), name_tag.rfind(":")
    name, tag = (name_tag[:colon], name_tag[colon + 1 :]) if colon > slash else (name_tag, "")
    registry, repository = split_name(name)
    if not tag and not at:
        tag = DEFAULT_TAG
    return f"{registry}/{repository}" + (f":{tag}" if tag else "") + (f"@{digest}" if at else "")
