"""Ports for throw-away fleets: held from when they are chosen, so no one else is handed one."""

from __future__ import annotations

import socket

import pytest

from deploy.local.running import PortReservations


def test_a_reserved_port_and_its_replica_siblings_are_never_handed_out_again() -> None:
    ports = PortReservations()
    try:
        chosen = [ports.take(replicas=3, stride=7) for _ in range(50)]
        taken = {p + k * 7 for p in chosen for k in range(3)}
        assert len(taken) == 3 * 50  # no two reservations share a port
        for _ in range(500):  # a chooser elsewhere (port 0) is never given a held port
            with socket.socket() as other:
                other.bind(("127.0.0.1", 0))
                assert other.getsockname()[1] not in taken
    finally:
        ports.release()


def test_a_server_still_binds_and_listens_on_its_reserved_port() -> None:
    ports = PortReservations()
    port = ports.take(replicas=1)
    with socket.socket() as plain:  # a socket without SO_REUSEADDR is refused: the port is held
        try:
            plain.bind(("127.0.0.1", port))
            held = False
        except OSError:
            held = True
    assert held
    with socket.socket() as server:  # as Nginx, Gunicorn and Redis bind
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    ports.release()


def test_a_sibling_held_elsewhere_is_refused_and_no_port_is_handed_out_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sibling (port + k x stride) another reservation holds - in this process or another - is
    refused, and these reservations never give a port out twice, even once it is released and the
    system offers it again."""
    mine, theirs = PortReservations(), PortReservations()
    try:
        held = theirs.take(replicas=1)
        assert PortReservations._hold(held) is None  # how a sibling is probed
        given = mine.take(replicas=1)
        mine.release()
        hold, offers = PortReservations._hold, [given]  # the system offers the released port first

        def offer_again(port: int) -> socket.socket | None:
            return hold(offers.pop(0) if port == 0 and offers else port)

        monkeypatch.setattr(mine, "_hold", offer_again)
        assert mine.take(replicas=1) != given and offers == []
    finally:
        mine.release()
        theirs.release()
