"""``parley token``: access tokens for clients, and the keys that sign them.

* ``parley token create [--ttl 3600] [--sub NAME] [--agent A] [--room R] [--max-sessions N]
  [--certs DIR]`` prints one token, signed by the newest private key in ``DIR/token-keys``.
* ``parley token rotate [--certs DIR]`` adds a new key pair; it signs from now on, and the nodes
  accept tokens of every public key still in the directory (remove an old ``.pub`` once the
  tokens it signed have expired; nodes read the keys when they start).
"""

from __future__ import annotations

import argparse
import sys

from ops.certs import write_token_key
from relay.settings import ClusterSettings, SettingsError
from sessions.node.tokens import mint_token

__all__ = ["create_token", "run_token"]

#: the subject of a token made without ``--sub``
DEFAULT_SUBJECT = "parley-cli"


def create_token(
    cluster: ClusterSettings,
    *,
    subject: str = DEFAULT_SUBJECT,
    ttl: float = 3600.0,
    agent: str | None = None,
    room: str | None = None,
    max_sessions: int | None = None,
    region: str | None = None,
) -> str:
    """A token signed by the cluster's newest private token key; raises SettingsError."""
    signer = cluster.token_signer()
    if signer is None:
        raise SettingsError(
            f"no private token key in {cluster.certs_dir()}/token-keys "
            "(`parley token rotate` makes one)"
        )
    kid, key = signer
    return mint_token(
        key,
        kid,
        subject=subject,
        ttl=ttl,
        agent=agent,
        room=room,
        max_sessions=max_sessions,
        region=region,
    )


def run_token(args: argparse.Namespace, cluster: ClusterSettings) -> int:
    """The ``parley token`` command; ``cluster`` carries ``--certs`` (or the configured one)."""
    try:
        if args.token_command == "rotate":
            private, public = write_token_key(cluster.certs_dir())
            print(f"wrote {private}")
            print(f"wrote {public}")
            print("restart the nodes to accept tokens of the new key")
            return 0
        print(
            create_token(
                cluster,
                subject=args.sub,
                ttl=args.ttl,
                agent=args.agent,
                room=args.room,
                max_sessions=args.max_sessions,
                region=args.region,
            )
        )
    except (OSError, ValueError) as exc:  # SettingsError is a ValueError
        print(f"parley token: {exc}", file=sys.stderr)
        return 2
    return 0
