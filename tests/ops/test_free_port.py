"""free_port never gives the same port twice in a row, even when the kernel offers it again."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from ops import etcdserver
from ops.etcdserver import free_port


class _Offering:
    """A socket whose bind(0) lands on the next of a scripted list of ports."""

    offers: list[int] = []

    def __init__(self, *args: Any) -> None:
        self.port = 0

    def __enter__(self) -> _Offering:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def bind(self, address: tuple[str, int]) -> None:
        self.port = self.offers.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_a_port_the_kernel_offers_again_is_not_given_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What happened in CI: the etcd fixture's client and peer ports came out equal, because
    # the kernel offered the first one again once its probing socket was closed.
    monkeypatch.setattr(etcdserver, "_GIVEN", etcdserver.deque(maxlen=8))
    monkeypatch.setattr(socket, "socket", _Offering)
    _Offering.offers = [40001, 40001, 40001, 40002]
    assert free_port() == 40001
    assert free_port() == 40002
    assert _Offering.offers == []


def test_a_kernel_that_only_repeats_itself_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(etcdserver, "_GIVEN", etcdserver.deque([40001], maxlen=8))
    monkeypatch.setattr(socket, "socket", _Offering)
    _Offering.offers = [40001] * etcdserver._PORT_TRIES
    with pytest.raises(OSError, match="not just given out"):
        free_port()


def test_real_ports_come_out_different_and_bindable() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
