"""``shifter-gateway --config FILE``: run the image gateway (as a service user, not root)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import config
from ..errors import ShifterError

log = logging.getLogger("shifter_core.gateway")


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
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per registry request
    # The database and private images are for the gateway's eyes only; the store's public
    # files are given their modes explicitly.
    os.umask(0o077)
    try:
        cfg = config.load(args.config)
    except ShifterError as err:
        log.error("%s", err)
        return 1
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
    host, _, port = cfg.gateway.listen.rpartition(":")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(gateway),
            host=host,
            port=int(port),
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
    )
    log.info("listening on %s (config %s)", cfg.gateway.listen, cfg.source)
    try:
        server.run()
    finally:
        gateway.stop()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
