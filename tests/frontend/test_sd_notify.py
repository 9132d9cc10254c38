"""sd_notify: one datagram to $NOTIFY_SOCKET, a path or an abstract (@) address."""

from __future__ import annotations

import os
import socket

import pytest

from frontend.sd_notify import sd_notify


@pytest.fixture
def notify_socket(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(5)
        yield sock


def test_sends_the_state_to_the_socket_path(notify_socket, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.getsockname())
    assert sd_notify("READY=1\nSTATUS=serving m")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving m"


def test_abstract_address(monkeypatch):
    name = f"furiosa-llm-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sd_notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_without_systemd_nothing_is_sent(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sd_notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not sd_notify("READY=1")  # logged, never raised: serving goes on
