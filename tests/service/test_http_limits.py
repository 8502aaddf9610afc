"""Limits at the HTTP layer (service/http_limits.py, deps.read_body): oversized headers get 431 without the server
keeping them, a client that sends its request too slowly gets 408 and its connection closed (slowloris)."""

from __future__ import annotations

import socket
import time

import psutil
import pytest

HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5


@pytest.fixture(scope="module")
def server(start_server, tiny_checkpoint):
    server = start_server(tiny_checkpoint, env={"LOGITSERVE_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
                                                "LOGITSERVE_BODY_TIMEOUT": str(BODY_TIMEOUT)})
    yield server
    server.stop()


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    return sock


def _read_all(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    got = b""
    try:
        while len(got) < limit:
            piece = sock.recv(1 << 16)
            if not piece:
                break
            got += piece
    except (ConnectionResetError, socket.timeout):
        pass
    return got


def _rss(server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def test_a_50mb_header_is_refused_431_without_growing_the_server(server):
    before = _rss(server)
    peak = before
    for _ in range(2):
        sock = _connect(server)
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: ")
        chunk = b"a" * (1 << 20)
        sent = 0
        try:
            while sent < 50 << 20:
                sock.sendall(chunk)
                sent += len(chunk)
                peak = max(peak, _rss(server))
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed while we were still sending: what we want
        reply = _read_all(sock)
        sock.close()
        assert reply.startswith(b"HTTP/1.1 431"), reply[:200]
        assert b"headers_too_large" in reply and sent < 50 << 20
    peak = max(peak, _rss(server))
    assert peak - before < 16 << 20, (before, peak)
    with _connect(server) as sock:  # still serving
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200")


def test_slowloris_headers_get_408_and_the_connection_closed(server):
    socks = [_connect(server) for _ in range(8)]
    t0 = time.monotonic()
    for sock in socks[:4]:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n")
    for _ in range(3):  # a header line now and then, never the end of the head
        time.sleep(0.4)
        for sock in socks[:4]:
            try:
                sock.sendall(b"x-slow: 1\r\n")
            except OSError:
                pass
    replies = [_read_all(sock) for sock in socks]  # the other four never sent a byte
    elapsed = time.monotonic() - t0
    for reply in replies:
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert elapsed < HEADER_TIMEOUT + 3, elapsed
    for sock in socks:
        sock.close()


def test_a_slow_body_gets_408(server):
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/logits HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{\"input_ids\"")
        t0 = time.monotonic()
        reply = _read_all(sock, limit=4096)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"request_timeout" in reply
    assert BODY_TIMEOUT - 0.2 < time.monotonic() - t0 < BODY_TIMEOUT + 3


def test_a_normal_keep_alive_connection_is_not_cut(server):
    with _connect(server) as sock:
        for _ in range(3):
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            got = b""
            while b'{"status":"ok"}' not in got:
                piece = sock.recv(1000)
                assert piece, got
                got += piece
            assert got.startswith(b"HTTP/1.1 200")
            time.sleep(HEADER_TIMEOUT * 0.6)  # idle between requests (uvicorn's keep-alive timeout is 5 s)
