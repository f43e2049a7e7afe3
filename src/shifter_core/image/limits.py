"""Bounds on what registries and image content may cost the gateway (DESIGN: "Trust boundaries").

Everything a registry sends is hostile: manifests, layer counts and sizes, how much a layer
decompresses to, how many tar entries an image holds, how long a pull takes, where a redirect
points, and the text of its error answers. :class:`PullLimits` holds the site's bounds
(``gateway.limits`` in the config); :class:`UnpackBudget` counts what one conversion has
decompressed; :func:`check_redirect` and :func:`clean_text` guard the registry client.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..errors import ShifterError

GiB = 1 << 30
MAX_ERROR_TEXT = 300  # characters of a registry's error text passed on


class LimitExceeded(ShifterError):
    """An image, a layer or a request is beyond a limit of the site."""


def human(size: int) -> str:
    """``12884901888`` -> ``12 GiB`` (for messages)."""
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.4g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class PullLimits:
    """What one pull may cost (defaults suit HPC images of tens of GB).

    Sizes are bytes; ``0`` disables a bound. ``max_*_unpacked`` bound decompressed bytes (a
    decompression bomb stops there), ``max_tar_entries`` the members of all layers together,
    ``pull_timeout`` the seconds from the first registry request to the published image.
    """

    max_manifest_bytes: int = 4 << 20
    max_layers: int = 500
    max_layer_bytes: int = 64 * GiB
    max_image_bytes: int = 128 * GiB
    max_layer_unpacked: int = 128 * GiB
    max_image_unpacked: int = 256 * GiB
    max_tar_entries: int = 10_000_000
    pull_timeout: float = 6 * 3600.0

    def check_layers(self, name: str, sizes: list[int]) -> None:
        """Refuse a manifest with too many or too large layers, before anything is fetched."""
        if self.max_layers and len(sizes) > self.max_layers:
            raise LimitExceeded(
                f"image '{name}' has {len(sizes)} layers; this site allows at most "
                f"{self.max_layers}",
                hint="squash the image (fewer layers) or ask the site to raise "
                "gateway.limits.max_layers",
            )
        for i, size in enumerate(sizes):
            if self.max_layer_bytes and size > self.max_layer_bytes:
                raise LimitExceeded(
                    f"layer {i + 1} of '{name}' is {human(size)} compressed; this site allows "
                    f"at most {human(self.max_layer_bytes)} per layer",
                    hint="ask the site to raise gateway.limits.max_layer_size",
                )
        total = sum(sizes)
        if self.max_image_bytes and total > self.max_image_bytes:
            raise LimitExceeded(
                f"image '{name}' is {human(total)} compressed; this site allows at most "
                f"{human(self.max_image_bytes)} per image",
                hint="ask the site to raise gateway.limits.max_image_size",
            )


class Deadline:
    """The end of a pull's time (``pull_timeout``); :meth:`check` raises once it is past."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.end = time.monotonic() + seconds if seconds > 0 else float("inf")

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise LimitExceeded(
                f"{self.what} took longer than {self.seconds:g} s and was stopped",
                hint="try again later; the site sets gateway.limits.pull_timeout",
            )


class UnpackBudget:
    """Decompressed bytes per layer and per image, and tar entries, of one conversion.

    Thread-safe (layers are decompressed by several threads at once); each ``add_*`` raises
    :class:`LimitExceeded` the moment a bound is crossed, so a decompression bomb costs at
    most the bound in spool space and a few chunks of time.
    """

    def __init__(self, limits: PullLimits | None = None, deadline: Deadline | None = None) -> None:
        self.limits = limits or PullLimits()
        self.deadline = deadline
        self._lock = threading.Lock()
        self.image_bytes = 0
        self.entries = 0

    def reset(self) -> None:
        """Start counting again (the same layers are read a second time)."""
        with self._lock:
            self.image_bytes = 0
            self.entries = 0

    def add_bytes(self, layer: int, layer_total: int, count: int) -> None:
        """*count* more bytes of layer number *layer* (1-based), now *layer_total* in all."""
        limits = self.limits
        with self._lock:
            self.image_bytes += count
            image_total = self.image_bytes
        if limits.max_layer_unpacked and layer_total > limits.max_layer_unpacked:
            raise LimitExceeded(
                f"layer {layer} decompresses to more than {human(limits.max_layer_unpacked)} "
                "(the site's limit per layer); the pull was stopped",
                hint="this may be a decompression bomb; if the image is genuine, ask the site "
                "to raise gateway.limits.max_layer_unpacked",
            )
        if limits.max_image_unpacked and image_total > limits.max_image_unpacked:
            raise LimitExceeded(
                f"the image decompresses to more than {human(limits.max_image_unpacked)} "
                "(the site's limit per image); the pull was stopped",
                hint="if the image is genuine, ask the site to raise "
                "gateway.limits.max_image_unpacked",
            )
        if self.deadline is not None:
            self.deadline.check()

    def add_entry(self) -> None:
        """One more tar member."""
        with self._lock:
            self.entries += 1
            entries = self.entries
        if self.deadline is not None and not entries % 1024:
            self.deadline.check()
        if self.limits.max_tar_entries and entries > self.limits.max_tar_entries:
            raise LimitExceeded(
                f"the image holds more than {self.limits.max_tar_entries} tar entries (the "
                "site's limit); the pull was stopped",
                hint="ask the site to raise gateway.limits.max_tar_entries",
            )


def clean_text(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """*text* from a remote party, safe for users and logs: control characters escaped (as
    ``\\xNN``/``\\uNNNN``), at most *limit* characters (with ``...`` when cut)."""
    out = []
    length = 0
    for char in text:
        if char.isprintable() or char == " ":
            piece = char
        else:
            piece = repr(char)[1:-1]
            if piece == char:  # repr kept it (e.g. a non-printable letter): escape it
                piece = f"\\u{ord(char):04x}"
        if length + len(piece) > limit:
            out.append("...")
            break
        out.append(piece)
        length += len(piece)
    return "".join(out)


class RedirectRefused(ShifterError):
    """A registry redirected somewhere it may not send the gateway."""


def _addresses(host: str, port: int | None) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port or 443, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []  # the request itself will fail with a clear connection error
    found = []
    for info in infos:
        try:
            found.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
        except ValueError:
            continue
    return found


def _kinds(addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> set[str]:
    """Which internal kinds of address (loopback, link-local, unspecified) are among these."""
    kinds = set()
    for a in addresses:
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
            a = a.ipv4_mapped
        if a.is_loopback:
            kinds.add("loopback")
        if a.is_link_local:
            kinds.add("link-local")
        if a.is_unspecified:
            kinds.add("unspecified")
    return kinds


def check_redirect(target: str, registry_url: str, registry: str, insecure: bool) -> None:
    """Refuse a redirect (or token realm) *target* of the registry at *registry_url*.

    Only http(s); plain http only when the registry is configured insecure (or is itself
    reached over http); never a loopback, link-local or unspecified address unless the
    registry itself is on one.
    """
    parts = urlsplit(target)
    shown = clean_text(target, 200)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise RedirectRefused(
            f"registry {registry} redirected to {shown}: only http(s) URLs are followed",
            hint="the registry (or something in between) is misconfigured or hostile",
        )
    if scheme == "http" and not insecure and urlsplit(registry_url).scheme != "http":
        raise RedirectRefused(
            f"registry {registry} redirected to plain http ({shown}); refusing it",
            hint=f"list {registry} under registries.insecure if that is intended",
        )
    host = parts.hostname or ""
    if not host:
        raise RedirectRefused(f"registry {registry} redirected to {shown}, which names no host")
    home = urlsplit(registry_url)
    if host == (home.hostname or ""):
        return
    refused = _kinds(_addresses(host, parts.port)) - _kinds(
        _addresses(home.hostname or "", home.port)
    )
    if refused:
        raise RedirectRefused(
            f"registry {registry} redirected to {shown}, a {'/'.join(sorted(refused))} "
            "address; refusing it",
            hint="a registry may send the gateway only where it is itself, or to public hosts",
        )


@dataclass(frozen=True)
class GatewayLimits:
    """All of the gateway's bounds (``gateway.limits`` and ``gateway.layer_cache_size``)."""

    max_request_body: int = 1 << 20
    max_import_size: int = 128 * GiB
    layer_cache_size: int = 500 * GiB
    pull: PullLimits = PullLimits()

    @classmethod
    def from_config(cls, gateway: Any) -> GatewayLimits:
        """From the ``gateway`` section of the site config (a GatewayConfig)."""
        from ..options import parse_size

        def size(text: str) -> int:
            return 0 if str(text).strip() == "0" else parse_size(str(text))

        lim = gateway.limits
        return cls(
            max_request_body=size(lim.max_request_body),
            max_import_size=size(lim.max_import_size),
            layer_cache_size=size(gateway.layer_cache_size),
            pull=PullLimits(
                max_manifest_bytes=size(lim.max_manifest_size),
                max_layers=lim.max_layers,
                max_layer_bytes=size(lim.max_layer_size),
                max_image_bytes=size(lim.max_image_size),
                max_layer_unpacked=size(lim.max_layer_unpacked),
                max_image_unpacked=size(lim.max_image_unpacked),
                max_tar_entries=lim.max_tar_entries,
                pull_timeout=float(lim.pull_timeout),
            ),
        )
