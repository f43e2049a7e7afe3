"""The gateway's work, independent of HTTP: jobs, workers, visibility, expiry, imports.

A pull request becomes a job (``PENDING``) in the database and a job id in a queue; one of
``gateway.workers`` threads takes it through ``PULLING`` (resolve, download layers into the
layer cache) and ``CONVERTING`` (flatten into tar2sqfs) to ``READY``, or to ``FAILED`` with
the error's user-facing message. Each state change is one log line.

Sharing: requests with the same (reference, platform, visibility) share the active job, and a
job that became READY less than :data:`REPULL_AFTER` seconds ago is returned as it is (the
registry is not asked again), like Shifter's pull-update timeout.

Restarts: at start the store's partial files are swept; interrupted public pulls are queued
again (finished layers are in the cache, so they resume) up to :data:`MAX_ATTEMPTS` starts;
pulls that used registry credentials (kept in memory only, never in the database) and imports
(whose upload was a partial file) are failed with a message saying to try again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pwd
import queue
import re
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from ..access import Viewer, visible
from ..config import Config
from ..errors import ShifterError
from ..image.convert import SquashfsOptions
from ..image.errors import RegistryUnavailable
from ..image.layercache import LayerCache
from ..image.limits import Deadline, GatewayLimits, UnpackBudget, clean_text
from ..image.oci import Platform
from ..image.pipeline import Progress, build_image
from ..image.registry.client import RegistryClient, ResolvedImage
from ..image.registry.credentials import CredentialError, StaticCredentials, normalize_registry
from ..image.registry.settings import RegistrySettings
from ..image.store import IMAGE_ID_RE, Acl, ImageMetadata, ImageStore
from ..reference import DockerReference
from . import login
from .artifacts import Publisher, artifact_registry
from .callers import Caller, identify, resolve_names
from .changes import StateChanges
from .db import Database, Job, acl_to_json
from .errors import BadRequest, Forbidden, NotFound
from .importer import import_file
from .metrics import GatewayMetrics
from .models import (
    ACTIVE_STATES,
    GatewayStats,
    ImageEntry,
    ImageInfo,
    JobInfo,
    JobState,
    LayerCacheStats,
    LoginResult,
)
from .progress import JobProgress

log = logging.getLogger(__name__)

REPULL_AFTER = 60.0  # seconds a READY pull is reused for an identical request
MAX_ATTEMPTS = 3  # starts of one job (gateway restarts in between) before it is failed
EXPIRE_INTERVAL = 3600.0  # seconds between automatic expiry runs (gateway.expire_days > 0)
KEEP_JOBS_DAYS = 30  # finished jobs are forgotten after this many days
MAX_MESSAGE = 2000  # characters of a failed job's message (kept, shown, logged)
_ID_PREFIX_RE = re.compile(r"^(?:id:)?(?:sha256:)?([0-9a-f]{12,64})$")
def platform_name(platform: Platform) -> str:
    """``os/arch[/variant]`` with the default variant filled in (``linux/arm64/v8``)."""
    return platform.full_name()


class Gateway:
    """The image gateway: owns the store, the layer cache, the database and the workers."""

    def __init__(
        self,
        config: Config,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.config = config
        gw = config.gateway
        self.limits = GatewayLimits.from_config(gw)
        self.store = ImageStore(config.image_path)
        self.artifacts = Publisher(artifact_registry(config), self.store)
        self.cache = LayerCache(gw.layer_cache, max_bytes=self.limits.layer_cache_size)
        self.db = Database(gw.database)
        self.metrics = GatewayMetrics(self.stats)
        reg = config.registries
        self.settings = RegistrySettings(
            mirrors=reg.mirrors,
            insecure=frozenset(reg.insecure),
            timeout=reg.timeout,
            retries=reg.retries,
            max_parallel=reg.max_parallel,
            limits=self.limits.pull,
        )
        conv = config.conversion
        self.squashfs = SquashfsOptions(conv.compressor, conv.level, conv.block_size)
        self._transport = transport
        self._client = RegistryClient(self.settings, transport=transport)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._secrets: dict[str, StaticCredentials] = {}
        self._uploads: dict[str, tuple[Path, str]] = {}
        self._progress: dict[str, JobProgress] = {}
        self.changes = StateChanges()  # wakes status requests that wait
        self._lock = threading.Lock()
        self._image_locks: dict[str, threading.Lock] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.host_platform = platform_name(Platform.host())

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Clean up after a crash, re-queue interrupted work, start the workers."""
        self.store.create()
        swept = self.store.sweep()
        cleaned = self.cache.clean_temporary()
        if swept or cleaned:
            log.info("removed %d partial file(s) from the store, %d from the cache", swept, cleaned)
        pruned = self.db.prune_jobs(time.time() - KEEP_JOBS_DAYS * 86400)
        if pruned:
            log.info("forgot %d job(s) finished more than %d days ago", pruned, KEEP_JOBS_DAYS)
        self.recover()
        self.artifacts.start_reconciling()
        for i in range(self.config.gateway.workers):
            thread = threading.Thread(target=self._worker, name=f"gateway-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.config.gateway.expire_days > 0:
            thread = threading.Thread(target=self._expiry_loop, name="gateway-expiry", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "gateway started: store %s, database %s, %d worker(s)",
            self.store.path,
            self.db.path,
            self.config.gateway.workers,
        )

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; running ones are left to the next start's recovery."""
        self._stopping.set()
        for _ in self._threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._client.close()

    def recover(self) -> None:
        """Jobs a killed gateway left active: queue them again or fail them with a reason."""
        for job in self.db.jobs(states=ACTIVE_STATES, limit=1_000_000, oldest_first=True):
            if job.kind == "import":
                reason = "interrupted by a gateway restart; import the file again"
            elif job.credentialed:
                reason = (
                    "interrupted by a gateway restart; the registry credentials it used are "
                    "not kept, pull again"
                )
            elif job.attempts >= MAX_ATTEMPTS:
                reason = (
                    f"interrupted by gateway restarts {job.attempts} times; giving up, pull again"
                )
            else:
                self._set_state(job, JobState.PENDING, "re-queued after a gateway restart")
                self._progress[job.id] = JobProgress()
                self._queue.put(job.id)
                continue
            self._set_state(job, JobState.FAILED, reason, finished=time.time())

    # -- callers -------------------------------------------------------------------------------

    def caller(self, uid: int, gid: int, secret: dict[str, Any] | None = None) -> Caller:
        """The caller a munge credential names, with groups and rights from the config."""
        gw = self.config.gateway
        return identify(uid, gid, secret, admins=gw.admins, import_users=gw.import_users)

    # -- views ---------------------------------------------------------------------------------

    def job_view(self, job: Job) -> JobInfo:
        """The job as callers see it (with its downloads while it runs)."""
        try:
            requester = pwd.getpwuid(job.requester).pw_name
        except KeyError:
            requester = str(job.requester)
        progress = self._progress.get(job.id)
        return JobInfo(
            id=job.id,
            state=job.state,
            kind=job.kind,
            reference=job.reference,
            platform=job.platform,
            message=job.message,
            image_id=job.image_id,
            private=job.acl is not None,
            requester=requester,
            attempts=job.attempts,
            created=job.created,
            updated=job.updated,
            finished=job.finished,
            progress=progress.snapshot() if progress is not None and job.active else None,
        )

    # -- parsing -------------------------------------------------------------------------------

    @staticmethod
    def _reference(text: Any) -> DockerReference:
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("no image reference given", hint="e.g. shifterimg pull ubuntu:22.04")
        value = text.strip()
        if value.startswith("docker:"):
            value = value[len("docker:") :]
        return DockerReference.parse(value)

    def _platform(self, text: Any) -> tuple[str, bool]:
        if text in (None, ""):
            return self.host_platform, False
        if not isinstance(text, str):
            raise BadRequest("platform must be a string such as linux/amd64")
        return platform_name(Platform.parse(text)), True

    def _find_image_id(self, text: str, caller: Caller | None = None) -> str | None:
        """An image id from ``id:HEX``, a full id, or a unique prefix of 12+ digits.

        With *caller*, only images the caller may see count: a private image never makes a
        prefix ambiguous for someone outside its ACL.
        """
        match = _ID_PREFIX_RE.match(text.strip().lower())
        if match is None:
            return None
        prefix = match.group(1)
        if IMAGE_ID_RE.match(prefix):
            return prefix
        found = {
            m.id
            for m in self.store
            if m.id.startswith(prefix) and (caller is None or visible(caller, m.acl))
        }
        if len(found) > 1:
            raise BadRequest(f"image id prefix {prefix} is ambiguous", hint="give more digits")
        return found.pop() if found else None

    # -- pull ----------------------------------------------------------------------------------

    def submit_pull(
        self,
        caller: Caller,
        reference: Any,
        platform: Any = None,
        users: Sequence[object] | None = None,
        groups: Sequence[object] | None = None,
    ) -> JobInfo:
        """Start (or join) the pull of *reference*; returns the job."""
        ref = self._reference(reference)
        plat, explicit = self._platform(platform)
        creds = self._credentials(caller.secret, ref)
        acl: Acl | None = None
        extra_users = resolve_names(list(users or []), "user")
        extra_groups = resolve_names(list(groups or []), "group")
        if creds is not None or extra_users or extra_groups:
            acl = Acl(tuple(sorted({caller.uid, *extra_users})), extra_groups)
        key = json.dumps(["pull", str(ref), plat, acl_to_json(acl), creds is not None])
        now = time.time()
        with self.db.transaction() as conn:
            last = self.db.latest_job(conn, key)
            if last is not None and last.active:
                log.info("job %s: joined by %s", last.id, caller.name)
                return self.job_view(last)
            recent = (
                last is not None
                and last.state == JobState.READY
                and last.finished is not None
                and now - last.finished < REPULL_AFTER
                and last.image_id is not None
                and self.store.get(last.image_id) is not None
            )
            if recent and last is not None:
                return self.job_view(last)
            job = Job(
                id=uuid.uuid4().hex[:16],
                kind="pull",
                key=key,
                reference=str(ref),
                platform=plat,
                platform_explicit=explicit,
                requester=caller.uid,
                acl=acl,
                credentialed=creds is not None,
                state=JobState.PENDING,
                message="",
                image_id=None,
                attempts=0,
                created=now,
                updated=now,
                finished=None,
            )
            self.db.insert_job(conn, job)
        if creds is not None:
            self._secrets[job.id] = creds
        self._progress[job.id] = JobProgress()
        log.info(
            "job %s PENDING: pull %s (%s) for %s%s",
            job.id,
            job.reference,
            plat,
            caller.name,
            ", private" if acl else "",
        )
        self._queue.put(job.id)
        return self.job_view(job)

    @staticmethod
    def _credentials(
        secret: dict[str, Any] | None, ref: DockerReference
    ) -> StaticCredentials | None:
        if not secret:
            return None
        registry, user, password = (secret.get(k) for k in ("registry", "username", "password"))
        if not all(isinstance(v, str) and v for v in (registry, user, password)):
            raise BadRequest("the registry credentials sent need registry, username and password")
        try:
            name = normalize_registry(str(registry))
        except CredentialError as err:
            raise BadRequest(str(err)) from None
        if name != ref.registry:
            raise BadRequest(
                f"credentials for registry {name} were sent to pull from {ref.registry}"
            )
        return StaticCredentials({name: (str(user), str(password))})

    def job(self, caller: Caller, job_id: str) -> JobInfo:
        job = self.db.job(job_id)
        if job is None or not visible(caller, job.acl):
            raise NotFound(f"no job {job_id!r}")
        return self.job_view(job)

    def jobs(self, caller: Caller, limit: int = 50) -> list[JobInfo]:
        """The caller's own recent jobs (an admin's: everyone's), newest first."""
        jobs = [j for j in self.db.jobs(limit=1000) if caller.admin or j.requester == caller.uid]
        return [self.job_view(j) for j in jobs[:limit]]

    # -- workers -------------------------------------------------------------------------------

    def _set_state(self, job: Job, state: JobState, message: str = "", **values: Any) -> None:
        self.db.update_job(job.id, state=state, message=message, **values)
        self.metrics.job_state(job.id, job.kind, state.lower(), job.created)
        self.changes.notify()
        detail = f": {message}" if message else ""
        log.info("job %s %s: %s %s%s", job.id, state, job.kind, job.reference, detail)

    @contextmanager
    def _image_lock(self, image_id: str) -> Iterator[None]:
        with self._lock:
            lock = self._image_locks.setdefault(image_id, threading.Lock())
        with lock:
            yield

    def _worker(self) -> None:
        while True:
            job_id = self._queue.get()
            if job_id is None or self._stopping.is_set():
                return
            job = self.db.job(job_id)
            if job is None or not job.active:
                continue
            try:
                if job.kind == "import":
                    self._run_import(job)
                else:
                    self._run_pull(job)
            except ShifterError as err:
                # Registry and image content may have put anything in the text: bound it.
                message = clean_text(str(err), MAX_MESSAGE)
                self._set_state(job, JobState.FAILED, message, finished=time.time())
            except Exception as err:
                log.exception("job %s failed unexpectedly", job.id)
                self._set_state(
                    job,
                    JobState.FAILED,
                    f"internal error of the gateway: {err}",
                    finished=time.time(),
                )
            finally:
                self._secrets.pop(job.id, None)
                self._progress.pop(job.id, None)
                upload = self._uploads.pop(job.id, None)
                if upload is not None:
                    self.store.discard(upload[0])

    def _run_pull(self, job: Job) -> None:
        creds = self._secrets.get(job.id)
        if job.credentialed and creds is None:
            raise ShifterError("the registry credentials of this pull are gone; pull again")
        progress = self._progress.setdefault(job.id, JobProgress())
        self.db.update_job(job.id, attempts=job.attempts + 1)
        self._set_state(job, JobState.PULLING)
        client = (
            RegistryClient(self.settings, creds, transport=self._transport)
            if creds is not None
            else self._client
        )
        state = [JobState.PULLING]

        def report(event: Progress) -> None:
            if event.layer is not None:
                progress.update(event.layer, event.done, event.total)
            elif event.state == JobState.CONVERTING and state[0] != JobState.CONVERTING:
                state[0] = JobState.CONVERTING
                self._set_state(job, JobState.CONVERTING)

        deadline = Deadline(self.limits.pull.pull_timeout, f"the pull of {job.reference}")
        try:
            resolved = client.resolve(
                job.reference, job.platform if job.platform_explicit else None, deadline
            )
            progress.expect({d.digest: d.size for d in resolved.layers})
            with self._image_lock(resolved.id):
                existing = self.store.get(resolved.id)
                if existing is not None:
                    self._prove_access(existing, resolved, client, job, deadline)
                    meta = self._merge_visibility(existing, job.acl)
                else:
                    meta = build_image(
                        resolved,
                        client=client,
                        cache=self.cache,
                        store=self.store,
                        squashfs=self.squashfs,
                        acl=job.acl,
                        progress=report,
                        limits=self.limits.pull,
                        deadline=deadline,
                    )
                self.artifacts.publish(meta)  # under the lock: the latest ACL wins
        finally:
            if client is not self._client:
                client.close()
        self.db.set_tag(job.reference, job.platform, meta.id, job.acl)
        self.db.touch_image(meta.id)
        self.metrics.image_made(meta.size)
        self._set_state(job, JobState.READY, image_id=meta.id, finished=time.time())

    def _prove_access(
        self,
        existing: ImageMetadata,
        resolved: ResolvedImage,
        client: RegistryClient,
        job: Job,
        deadline: Deadline,
    ) -> None:
        """A private image found again is shared with this pull's users only when this
        pull's own registry requests prove access to each of its layers (the registry could
        otherwise serve a copy of someone's private manifest and be given the image)."""
        if existing.acl is None:
            return
        if (
            job.acl is not None
            and all(visible(Viewer(u), existing.acl) for u in job.acl.users)
            and (set(job.acl.groups) <= set(existing.acl.groups))
        ):
            return  # nobody new would see it
        origin = DockerReference.parse(existing.source).registry if existing.source else "?"
        for layer in resolved.layers:
            client.prove_access(resolved, layer, origin, deadline)

    def _merge_visibility(self, existing: ImageMetadata, acl: Acl | None) -> ImageMetadata:
        """An image pulled again: publicly makes it public, privately widens its ACL."""
        if existing.acl is None:
            return existing
        if acl is None:
            updated = dataclasses.replace(existing, acl=None)
        else:
            merged = Acl(
                tuple(sorted({*existing.acl.users, *acl.users})),
                tuple(sorted({*existing.acl.groups, *acl.groups})),
            )
            if merged == existing.acl:
                # Files published before the store had ACLs get them now (idempotent).
                self.store.set_access(existing, rewrite=False)
                return existing
            updated = dataclasses.replace(existing, acl=merged)
        self.store.set_access(updated)
        log.info("image %s is now %s", updated.id, "private" if updated.private else "public")
        return updated

    # -- lookup and list -----------------------------------------------------------------------

    def lookup(self, caller: Caller, reference: Any, platform: Any = None) -> ImageInfo:
        """The image *reference* (or an id) names for the caller; NotFound for what they may not
        see."""
        text = str(reference or "").strip()
        image_id = self._find_image_id(text, caller) if text else None
        if image_id is not None:
            meta = self.store.get(image_id)
            if meta is not None and visible(caller, meta.acl):
                self.db.touch_image(meta.id)
                return ImageInfo(meta, meta.source)
        else:
            ref = self._reference(reference)
            plat, _ = self._platform(platform)
            for tag in self.db.tags(str(ref), plat):
                if not visible(caller, tag.acl):
                    continue
                meta = self.store.get(tag.image_id)
                if meta is None or not visible(caller, meta.acl):
                    continue
                self.db.touch_image(meta.id)
                return ImageInfo(meta, tag.reference, pulled=tag.updated)
            if ref.digest is not None and ref.digest.startswith("sha256:"):
                # By digest: the digest of a platform manifest is the image id.
                meta = self.store.get(ref.digest.split(":", 1)[1])
                if meta is not None and visible(caller, meta.acl):
                    self.db.touch_image(meta.id)
                    return ImageInfo(meta, str(ref))
        raise NotFound(
            f"image {text!r} not found on the image gateway",
            hint=f"pull it first: shifterimg pull {text}" if image_id is None else None,
        )

    def images(self, caller: Caller) -> list[ImageEntry]:
        """Images (and pulls in progress) the caller may see."""
        out: list[ImageEntry] = []
        metas: dict[str, ImageMetadata | None] = {}
        for tag in self.db.tags():
            if not visible(caller, tag.acl):
                continue
            if tag.image_id not in metas:
                metas[tag.image_id] = self.store.get(tag.image_id)
            meta = metas[tag.image_id]
            if meta is None or not visible(caller, meta.acl):
                continue
            private = tag.acl is not None or meta.private
            out.append(
                ImageEntry(
                    status=JobState.READY,
                    id=meta.id,
                    reference=tag.reference,
                    platform=tag.platform,
                    pulled=tag.updated,
                    private=private,
                    size=meta.size,
                    record=dataclasses.asdict(meta),
                )
            )
        for job in self.db.jobs(states=ACTIVE_STATES, limit=1000):
            if visible(caller, job.acl):
                out.append(
                    ImageEntry(
                        status=job.state,
                        id=None,
                        reference=job.reference,
                        platform=job.platform,
                        pulled=job.created,
                        private=job.acl is not None,
                        job=job.id,
                    )
                )
        out.sort(key=lambda e: (e.reference, e.platform))
        return out

    # -- import --------------------------------------------------------------------------------

    def check_import(self, caller: Caller, name: Any) -> str:
        """The normalised name of an import the caller may do (Forbidden/BadRequest otherwise)."""
        if not caller.may_import:
            raise Forbidden(
                f"user {caller.name} may not import images",
                hint="the site allows gateway.admins and gateway.import_users to",
            )
        return str(self._reference(name))

    def new_upload(self) -> Path:
        """A hidden partial file in the store for an upload (swept after a crash)."""
        return self.store.new_upload()

    def discard_upload(self, upload: Path) -> None:
        """Remove an upload that no job took."""
        self.store.discard(upload)

    def submit_import(self, caller: Caller, name: str, upload: Path, sha256: str) -> JobInfo:
        now = time.time()
        job_id = uuid.uuid4().hex[:16]
        job = Job(
            id=job_id,
            kind="import",
            key=f"import:{job_id}",
            reference=name,
            platform=self.host_platform,
            platform_explicit=False,
            requester=caller.uid,
            acl=None,
            credentialed=False,
            state=JobState.PENDING,
            message="",
            image_id=None,
            attempts=0,
            created=now,
            updated=now,
            finished=None,
        )
        with self.db.transaction() as conn:
            self.db.insert_job(conn, job)
        self._uploads[job.id] = (upload, sha256)
        log.info("job %s PENDING: import %s for %s", job.id, name, caller.name)
        self._queue.put(job.id)
        return self.job_view(job)

    def _run_import(self, job: Job) -> None:
        upload = self._uploads.get(job.id)
        if upload is None or not upload[0].exists():
            raise ShifterError("the uploaded file is gone; import it again")
        self.db.update_job(job.id, attempts=job.attempts + 1)
        self._set_state(job, JobState.PULLING, "reading the uploaded file")
        meta = import_file(
            upload[0],
            job.reference,
            file_sha256=upload[1],
            store=self.store,
            cache=self.cache,
            squashfs=self.squashfs,
            on_converting=lambda: self._set_state(job, JobState.CONVERTING),
            budget=UnpackBudget(
                self.limits.pull,
                Deadline(self.limits.pull.pull_timeout, f"the import of {job.reference}"),
            ),
        )
        with self._image_lock(meta.id):
            if meta.private:
                meta = self._merge_visibility(meta, None)
            self.artifacts.publish(meta)
        plat = platform_name(Platform.parse(meta.platform)) if meta.platform else self.host_platform
        self.db.set_tag(job.reference, plat, meta.id, None)
        self.db.touch_image(meta.id)
        self.db.update_job(job.id, platform=plat)
        self.metrics.image_made(meta.size)
        self._set_state(job, JobState.READY, image_id=meta.id, finished=time.time())

    # -- administration ------------------------------------------------------------------------

    def _require_admin(self, caller: Caller, what: str) -> None:
        if not caller.admin:
            raise Forbidden(
                f"only image gateway admins may {what}; user {caller.name} is not one",
                hint="admins are listed under gateway.admins in the site config",
            )

    def _remove_image(self, image_id: str, why: str) -> None:
        with self._image_lock(image_id):
            self.store.remove(image_id)
            self.db.delete_image(image_id)
            self.artifacts.withdraw(image_id)
        log.info("removed image %s (%s)", image_id, why)

    def remove(self, caller: Caller, target: Any, platform: Any = None) -> list[str]:
        """Remove the image *target* names (an id, or every image a reference points at)."""
        self._require_admin(caller, "remove images")
        text = str(target or "").strip()
        if not text:
            raise BadRequest("no image given", hint="give an image id or reference")
        image_id = self._find_image_id(text)
        if image_id is not None and self.store.get(image_id) is not None:
            ids = [image_id]
        else:
            ref = self._reference(text)
            plat = self._platform(platform)[0] if platform else None
            ids = sorted({t.image_id for t in self.db.tags(str(ref), plat)})
            ids = [i for i in ids if self.store.get(i) is not None]
        if not ids:
            raise NotFound(f"image {text!r} not found on the image gateway")
        for i in ids:
            self._remove_image(i, f"removed by {caller.name}")
        return ids

    def expire(
        self, caller: Caller, days: Any = None, ids: Sequence[object] | None = None
    ) -> list[str]:
        """Remove the given images, or those unused for *days* (default gateway.expire_days)."""
        self._require_admin(caller, "expire images")
        if ids:
            found = []
            for text in ids:
                image_id = self._find_image_id(str(text))
                if image_id is None or self.store.get(image_id) is None:
                    raise NotFound(f"no image with id {text!r}")
                found.append(image_id)
            for image_id in found:
                self._remove_image(image_id, f"expired by {caller.name}")
            return found
        if days is None:
            days = self.config.gateway.expire_days
        if not isinstance(days, int | float) or isinstance(days, bool) or days <= 0:
            raise BadRequest(
                "give a number of days greater than 0 or image ids",
                hint="gateway.expire_days in the site config is 0 (never)" if not days else None,
            )
        return self._expire_older_than(float(days), caller.name)

    def _expire_older_than(self, days: float, who: str) -> list[str]:
        cutoff = time.time() - days * 86400
        last_used = self.db.last_used()
        busy = {j.image_id for j in self.db.jobs(states=ACTIVE_STATES) if j.image_id}
        removed = []
        for meta in list(self.store):
            used = last_used.get(meta.id, meta.created)
            if used < cutoff and meta.id not in busy:
                self._remove_image(meta.id, f"unused for {days:g} days, expired by {who}")
                removed.append(meta.id)
        return removed

    def _expiry_loop(self) -> None:
        days = float(self.config.gateway.expire_days)
        while not self._stopping.wait(EXPIRE_INTERVAL):
            try:
                self._expire_older_than(days, "the gateway")
            except Exception:
                log.exception("automatic expiry failed")

    # -- other ---------------------------------------------------------------------------------

    def check_login(self, caller: Caller, registry: Any) -> LoginResult:
        """Check the registry credentials the caller sent (in the munge payload).

        ``verified`` is False when the registry could not be asked (the answer says why);
        credentials the registry rejects raise AuthenticationError.
        """
        secret = caller.secret or {}
        user, password = secret.get("username"), secret.get("password")
        if not isinstance(registry, str) or not registry:
            raise BadRequest("no registry given")
        if not isinstance(user, str) or not isinstance(password, str) or not user:
            raise BadRequest("no username and password were sent")
        try:
            name = normalize_registry(registry)
        except CredentialError as err:
            raise BadRequest(str(err)) from None
        try:
            result = login.check_login(self.settings, name, user, password)
        except RegistryUnavailable as err:
            log.info("login check for %s at %s by %s: %s", user, name, caller.name, err)
            return LoginResult(f"could not verify the credentials: {err}", verified=False)
        log.info("login check for %s at %s by %s: %s", user, name, caller.name, result)
        return LoginResult(result, verified=True)

    def stats(self) -> GatewayStats:
        stats = self.cache.stats
        cache = LayerCacheStats(
            downloads=stats.downloads,
            hits=stats.hits,
            waited=stats.waited,
            bytes_written=stats.bytes_written,
            bytes=self.cache.size(),
            max_bytes=self.cache.max_bytes,
        )
        return GatewayStats(
            cache, self.db.count_jobs(), self.config.gateway.workers, self._queue.qsize()
        )
