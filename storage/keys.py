"""The cluster's etcd keyspace, in one place.

Everything Parley stores lives under one prefix (default ``/parley``), so several clusters can
share an etcd and ``etcdctl get --prefix /parley`` shows the whole state of one.
"""

from __future__ import annotations

import re
from typing import final

import attrs

# Names become etcd key segments: keep them printable, short and free of the separator.
_NAME = re.compile(r"[A-Za-z0-9._~-]{1,128}")


def check_name(kind: str, name: str) -> str:
    """Validate a node, relay or session id; raises ValueError with a clear message."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid {kind} id {name!r}: use 1-128 of A-Z a-z 0-9 . _ ~ -")
    return name


@final
@attrs.frozen
class Keyspace:
    prefix: str = "/parley"

    @property
    def nodes_prefix(self) -> str:
        return f"{self.prefix}/nodes/"

    @property
    def relays_prefix(self) -> str:
        return f"{self.prefix}/relays/"

    @property
    def owners_prefix(self) -> str:
        return f"{self.prefix}/owners/"

    @property
    def stats_prefix(self) -> str:
        return f"{self.prefix}/stats/"

    @property
    def checkpoints_prefix(self) -> str:
        return f"{self.prefix}/checkpoints/"

    @property
    def moves_prefix(self) -> str:
        return f"{self.prefix}/moves/"

    def move(self, session: str) -> str:
        return self.moves_prefix + check_name("session", session)

    def session_of_move_key(self, key: bytes) -> str | None:
        return self._tail(self.moves_prefix, key)

    @property
    def ends_prefix(self) -> str:
        return f"{self.prefix}/ends/"

    def end(self, session: str) -> str:
        return self.ends_prefix + check_name("session", session)

    def session_of_end_key(self, key: bytes) -> str | None:
        return self._tail(self.ends_prefix, key)

    @property
    def drains_prefix(self) -> str:
        return f"{self.prefix}/drains/"

    def drain(self, node_id: str) -> str:
        return self.drains_prefix + check_name("node", node_id)

    def stats(self, node_id: str) -> str:
        return self.stats_prefix + check_name("node", node_id)

    def node(self, node_id: str) -> str:
        return self.nodes_prefix + check_name("node", node_id)

    def relay(self, relay_id: str) -> str:
        return self.relays_prefix + check_name("relay", relay_id)

    def owner(self, session: str) -> str:
        return self.owners_prefix + check_name("session", session)

    def checkpoint(self, session: str) -> str:
        return self.checkpoints_prefix + check_name("session", session)

    def _tail(self, prefix: str, key: bytes) -> str | None:
        raw = prefix.encode()
        if not key.startswith(raw):
            return None
        try:
            name = key[len(raw) :].decode()
        except UnicodeDecodeError:
            return None
        return name if _NAME.fullmatch(name) else None

    def session_of_owner_key(self, key: bytes) -> str | None:
        return self._tail(self.owners_prefix, key)

    def node_of_key(self, key: bytes) -> str | None:
        return self._tail(self.nodes_prefix, key)

    def relay_of_key(self, key: bytes) -> str | None:
        return self._tail(self.relays_prefix, key)
