"""The local service's ports come from below the kernel's ephemeral range, which Ray's own binds to port 0 draw
from while ``mosaic serve`` starts, before its gRPC server binds its picked port."""

from __future__ import annotations

import socket
from pathlib import Path

from services.local_service import PICKED_PORTS, free_port


def test_picked_ports_are_free_and_outside_the_ephemeral_range():
    low, _ = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert PICKED_PORTS.stop <= low
    for _ in range(8):
        port = free_port()
        assert port in PICKED_PORTS
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when given
