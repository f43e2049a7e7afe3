"""Docker Registry v2 / OCI distribution: resolve an image and download its layers.

:mod:`.client` (``RegistryClient``: manifests, platforms, blobs, parallel layer pulls) builds
on :mod:`.auth` (challenges, Basic, Bearer tokens per scope), :mod:`.transport` (redirects,
retries, rate limits, bounded reads) and :mod:`.settings` (mirrors, endpoints, registry names).
:mod:`.credentials` is the per-user file that ``shifterimg login`` writes.
"""
