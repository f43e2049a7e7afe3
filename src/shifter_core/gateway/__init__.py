"""The image gateway: pulls and imports images into the store, answers lookups.

Run it with ``shifter-gateway --config /etc/shifter/shifter.yaml`` as a service user (it needs
no privilege: it writes only ``image_path``, ``gateway.database`` and ``gateway.layer_cache``).
Modules: :mod:`.models` (the API's typed requests and answers, the ``JobState`` enum; shared
with :class:`shifter_core.client.GatewayClient`), :mod:`.service` (jobs, workers), :mod:`.db`
(SQLite), :mod:`.app` (HTTP: one handler per route), :mod:`.importer` (image files),
:mod:`.login` (credential checks), :mod:`.server` (main). Who sees an image is
:func:`shifter_core.access.visible`.

Authentication
    Every request carries ``Authorization: Munge <credential>`` whose payload is the JSON
    ``{"method": "POST", "path": "/api/v1/pull", "body_sha256": "<hex>", "secret": {...}}``:
    the path includes the query string as sent, ``body_sha256`` is the sha256 of the exact
    body bytes (of the empty string for GET). The gateway refuses (401) a missing, invalid,
    expired or replayed credential and one made for another request. Registry credentials
    travel in ``secret`` (munge encrypts payloads): ``{"registry": "docker.io",
    "username": "...", "password": "..."}``; they are kept in memory for one job only.

Listening: ``gateway.listen`` is ``HOST:PORT`` (https with ``gateway.tls_cert`` and
``tls_key``) or ``unix:/PATH`` (a socket of mode 0666); clients reach it through
:func:`.transport.gateway_transport`. ``gateway.limits`` bounds bodies and pulls
(:mod:`shifter_core.image.limits`).

Endpoints (JSON; errors are ``{"error": "<message for the user>"}`` with 400, 401, 403, 404,
413 or 503)
    ``GET  /api/v1/ping`` -> ``{"user", "uid", "gids", "admin", "may_import", "version"}``
    ``POST /api/v1/pull`` ``{"reference", "platform"?, "users"?: [name|uid], "groups"?:
    [name|gid]}`` -> ``{"job": JOB}``. Idempotent: an identical request (same reference,
    platform and visibility) joins the active job or gets the job that became READY in the
    last minute. With a ``secret``, or users/groups, the image is private to the caller plus
    those users and groups.
    ``GET  /api/v1/jobs/{id}`` -> ``{"job": JOB}``; ``GET /api/v1/jobs`` -> ``{"jobs": [JOB]}``
    (the caller's visible jobs, newest first). JOB = ``{"id", "kind": "pull"|"import",
    "reference", "platform", "state": PENDING|PULLING|CONVERTING|READY|FAILED, "message",
    "image_id", "private", "requester", "attempts", "created", "updated", "finished",
    "progress"?: {"layers": [{"digest", "done", "total"}], "done", "total", "rate"}}``.
    ``GET  /api/v1/lookup?reference=R[&platform=P]`` -> ``{"image": IMAGE}`` (R may be an id:
    ``id:HEX`` or 12+ hex digits); 404 for what the caller may not see, the same answer as
    for what does not exist (a private image never makes an id prefix ambiguous for others).
    IMAGE is the store's metadata (``id, source, digest, platform, env, entrypoint, cmd,
    workdir, user, labels, layers, size, created, acl``) plus ``reference, status, private,
    pulled``.
    ``GET  /api/v1/images`` -> ``{"images": [{"status", "id", "reference", "platform",
    "pulled", "private", "size", "job"?}]}``: visible images, and pulls in progress.
    ``POST /api/v1/import?name=NAME`` body = the file (docker-archive tar, OCI layout tar or
    squashfs) -> ``{"job": JOB}``; admins and ``gateway.import_users`` (``'*'``: everyone).
    ``POST /api/v1/expire`` ``{"days": N}`` or ``{"ids": [...]}`` -> ``{"removed": [ids]}``
    (admins; without either, ``gateway.expire_days``).
    ``POST /api/v1/remove`` ``{"image": REF|ID, "platform"?}`` -> ``{"removed": [ids]}``
    (admins).
    ``POST /api/v1/login`` ``{"registry"}`` + secret -> ``{"result": "...", "verified": bool}``:
    checks the credentials against the registry itself; rejected ones are a 400 with the
    registry's reason, ``verified: false`` when the registry could not be asked.
    ``GET  /api/v1/stats`` -> layer cache counters, jobs by state.
"""
