#!/usr/bin/env python3
"""The box's token service (``docker-registry``'s ``auth: token``) for the read-only token
front of the artifact registry, which the rack mirror pulls through.

Why a token front: distribution 2.8's pull-through proxy can authenticate to its upstream
with tokens only (it looks basic credentials up by each request's URL instead of the
realm), so the mirror reads the artifact storage through a second registry process that
asks for tokens, as the box's read-only docker.io mirror reads the storage its
authenticated end writes. The users are those of the credential files given; every one of
them may pull ``shifter/images`` and nothing else. Run by ``tools/box/box.py`` (root)::

    token_service.py --port 5003 --cert C --key K --credential FILE [--credential FILE ...]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(CHECKOUT))

from tests.fixtures.registries import TokenServer  # noqa: E402

REPOSITORY = "shifter/images"
SERVICE = "shifter-box-artifacts"
ISSUER = "shifter-box-token-service"


def pull_only(user: str | None, repository: str, actions: list[str]) -> list[str]:
    """Known users may pull the artifacts; nobody may do anything else."""
    return ["pull"] if user is not None and repository == REPOSITORY and "pull" in actions else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--credential", type=Path, action="append", default=[])
    args = parser.parse_args()
    users = {}
    for path in args.credential:
        name, _, password = path.read_text().strip().partition(":")
        users[name] = password
    server = TokenServer(
        args.cert.parent, users=users, policy=pull_only, service=SERVICE, issuer=ISSUER,
        port=args.port, key_pair=(args.cert, args.key),
    ).start()  # fmt: skip
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"token service on 127.0.0.1:{args.port} for {sorted(users)}", flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
