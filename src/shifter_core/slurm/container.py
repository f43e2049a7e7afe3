"""What a job or a step asks for, checked as root, planned and built:
:func:`prepare_container`, the one path the prolog's job roots and the steps' own roots share.

The request (image id and name, volumes, modules) comes from the submission side, which
runs as the user, who can replace it: every value is parsed again here, and the image must
be visible to the job's uid and gids before anything is staged, copied or mounted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..config import Config
from ..errors import NodeFault, ShifterError
from ..image.nodecache import NodeCache
from ..image.store import ImageMetadata, ImageStore, check_image_id
from ..options import parse_modules, parse_size, parse_volumes
from ..reference import ImageRequest
from ..runtime.plan import Plan, RunRequest, User, build_plan
from ..runtime.privileged import prepare_job, shared_root

TYPE_CHECKING = False  # typing is not imported at run time: the prolog's start-up path
if TYPE_CHECKING:
    from ..image.artifact import ArtifactRegistry


def node_cache(config: Config, node: str) -> NodeCache:
    """This node's image cache."""
    size = config.slurm.node_cache_size
    return NodeCache(
        config.slurm.node_cache.replace("%n", node), 0 if size == "0" else parse_size(size)
    )


def prepare_container(
    config: Config,
    request: Mapping[str, str],
    user: User,
    *,
    node: str,
    job: str,
    shared: bool = False,
) -> tuple[str, list[list[str]]]:
    """Build the container ``request`` asks for, for the prolog (the job's root) or, with
    ``shared``, for steps that ask for something else than the job: the request parsed
    again as root, its image found and visible to ``user`` before anything is staged or
    mounted, staged into the node cache from the store or the artifact registry, or mounted
    from the store (``slurm.image_source``), planned,
    built and recorded (:func:`.privileged.prepare_job`, :func:`.privileged.shared_root`).
    (root, container environment). Errors are the job's, except a
    :class:`~shifter_core.errors.NodeFault`."""
    check_request(request, config.default_image_type)
    source = config.slurm.image_source
    if source == "registry":
        artifacts = node_artifacts(config)
        image = visible_image(artifacts.metadata(request["image_id"]), request, user)
        staged = node_cache(config, node).stage(image.id, artifacts.squashfs(image),
                                                image.sha256, job)  # fmt: skip
        image_file = str(staged)
    else:
        image, store = find_image(config, request, user)
        image_file = str(store.image_file(image.id))
        if source == "stage":
            staged = node_cache(config, node).stage(image.id, store.image_file(image.id),
                                                    image.sha256, job)  # fmt: skip
            image_file = str(staged)
    plan = container_plan(config, request, image, image_file, user)
    run_dir = config.runtime.run_dir
    if shared:
        return shared_root(plan, run_dir, node, job)
    prepared = prepare_job(plan, run_dir, node, job)
    return prepared.root, [list(kv) for kv in plan.env]


def check_request(request: Mapping[str, str], default_type: str) -> None:
    """Parse again, as root, what the submission side sent: the user may have replaced it."""
    image_id, text = request["image_id"], request["image_request"]
    try:
        check_image_id(image_id)
    except ShifterError:
        raise ShifterError(f"the job carries no valid image id for {text!r}") from None
    ImageRequest.parse(text, default_type)
    if request["volume"]:
        parse_volumes([request["volume"]])
    if request["module"]:
        parse_modules(request["module"])


def node_artifacts(config: Config) -> ArtifactRegistry:
    """The artifact registry as this node reads it (``artifacts.node_registry``, else
    ``artifacts.registry``), with the node's credential, which must be root's alone."""
    # Imported here: oras and requests cost the prolog of other modes 0.1 s of CPU.
    from ..image.artifact import ArtifactRegistry, CredentialError, read_credential

    settings = config.artifacts
    url = settings.node_registry or settings.registry
    if not url:
        raise NodeFault(
            "slurm.image_source is registry, but artifacts.registry is not set",
            hint="set artifacts.registry in shifter.yaml (see shifteradm doctor)",
        )
    credential = None
    if settings.node_credentials:
        try:
            credential = read_credential(settings.node_credentials, owner=os.geteuid())
        except CredentialError as err:
            raise NodeFault(err.message, hint=err.hint) from None
    return ArtifactRegistry(url, settings.repository, credential, settings.timeout)


def find_image(
    config: Config, request: Mapping[str, str], user: User
) -> tuple[ImageMetadata, ImageStore]:
    """The image the job asked for, if ``user`` may use it: checked before anything is
    staged or copied."""
    store = ImageStore(config.image_path)
    return visible_image(store.get(request["image_id"]), request, user), store


def visible_image(
    image: ImageMetadata | None, request: Mapping[str, str], user: User
) -> ImageMetadata:
    """``image`` (the record of the job's image id, None if gone) if ``user`` may use it,
    else the job's error."""
    text = request["image_request"]
    # Not compared with the name: the same content pulled under a second name keeps the
    # first name's record, and the name grants nothing the id and the ACL do not.
    if image is None or not image.visible_to(user.uid, user.groups):
        raise ShifterError(
            f"image {text} is no longer in the image store (or not shared with {user.name})",
            hint="pull it again with shifterimg pull, then resubmit",
        )
    return image


def container_plan(
    config: Config, request: Mapping[str, str], image: ImageMetadata, image_file: str, user: User
) -> Plan:
    """The plan of the container a checked request asks for."""
    run = RunRequest(
        image=f"id:{image.id}",
        volumes=(request["volume"],) if request["volume"] else (),
        modules=request["module"] or None,
    )
    return build_plan(run, config, image, image_file, user, image_request=request["image_request"])
