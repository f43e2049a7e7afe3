"""``shifter-gateway --config FILE``: run the image gateway (as a service user, not root)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from .. import config, logformat
from ..errors import ConfigError, ShifterError

log = logging.getLogger("shifter_core.gateway")


MAX_CONNECTIONS = 1000  # beyond this many open connections uvicorn answers 503


def listen_options(listen: str, tls_cert: str | None, tls_key: str | None) -> dict[str, Any]:
    """uvicorn's options for ``gateway.listen`` (``HOST:PORT`` or ``unix:/PATH``) and TLS."""
    options: dict[str, Any]
    if listen.startswith("unix:"):
        path = listen[len("unix:") :]
        if tls_cert or tls_key:
            raise ConfigError("gateway.tls_cert and tls_key are for HOST:PORT, not a Unix socket")
        options = {"uds": path}
    else:
        host, _, port = listen.rpartition(":")
        options = {"host": host.strip("[]"), "port": int(port)}
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("set both gateway.tls_cert and gateway.tls_key, or neither")
    if tls_cert:
        for file in (tls_cert, tls_key):
            if not os.access(str(file), os.R_OK):
                raise ConfigError(
                    f"cannot read {file}", hint="the gateway's service user must read it"
                )
        options.update(ssl_certfile=tls_cert, ssl_keyfile=tls_key)
    return options


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shifter-gateway", description="Shifter's image gateway (HTTP JSON API, munge auth)"
    )
    parser.add_argument(
        "--config",
        help="site configuration (default: $SHIFTER_CONFIG or /etc/shifter/shifter.yaml)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format=logformat.TEXT_FORMAT, stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per registry request
    # The database and private images are for the gateway's eyes only; the store's public
    # files are given their modes explicitly.
    os.umask(0o077)
    try:
        cfg = config.load(args.config)
    except ShifterError as err:
        log.error("%s", err)
        return 1
    logformat.apply(cfg.gateway.log_format)
    if os.geteuid() == 0:
        log.warning("running as root: the gateway needs no privilege, run it as a service user")

    import uvicorn

    from .app import create_app
    from .service import Gateway

    try:
        gateway = Gateway(cfg)
        gateway.start()
    except (ShifterError, OSError) as err:
        log.error("cannot start the gateway: %s", err)
        return 1
    try:
        where = listen_options(cfg.gateway.listen, cfg.gateway.tls_cert, cfg.gateway.tls_key)
    except ShifterError as err:
        log.error("cannot start the gateway: %s", err)
        gateway.stop()
        return 1
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(gateway),
            **where,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            limit_concurrency=MAX_CONNECTIONS,
        )
    )
    log.info(
        "listening on %s%s (config %s)",
        cfg.gateway.listen,
        " with TLS" if cfg.gateway.tls_cert else "",
        cfg.source,
    )
    try:
        server.run()
    finally:
        gateway.stop()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
