"""An accepted channel's receive buffer: a set size where the system allows it whole,
the kernel's autotuning otherwise (a size cut down to rmem_max would be too small)."""

from __future__ import annotations

import socket

import pytest

from vfio_multifd.daemon import sockopts


def rcvbuf(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def test_a_tcp_socket_gets_the_size_when_rmem_max_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sockopts, "rmem_max", lambda: 1 << 30)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        size = min(sockopts.CHANNEL_RCVBUF, 1 << 20)
        # (as root the kernel takes any size; otherwise rmem_max caps it, hence 1 MiB here)
        assert sockopts.size_receive_buffer(sock, size) is True
        assert rcvbuf(sock) == 2 * size  # Linux doubles it for its bookkeeping


def test_autotuning_stays_where_rmem_max_would_cut_the_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sockopts, "rmem_max", lambda: 212992)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        before = rcvbuf(sock)
        assert sockopts.size_receive_buffer(sock) is False
        assert rcvbuf(sock) == before


def test_only_tcp_sockets_are_sized(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sockopts, "rmem_max", lambda: 1 << 30)
    left, right = socket.socketpair()
    with left, right:
        assert sockopts.size_receive_buffer(left) is False
    assert sockopts.size_receive_buffer(None) is False
