"""server/core/frames.py: length-prefixed frames over a Unix stream socket, written without ever blocking the
engine thread, read back whole whatever the kernel splits them into."""

from __future__ import annotations

import socket

import pytest

from adapterd.server.core.frames import HEADER, MAX_FRAME, FrameError, FrameReader, FrameWriter


def _pair(buffer: int | None = None) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if buffer is not None:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    return a, b


def _read_all(sock: socket.socket, reader: FrameReader) -> list[bytes]:
    sock.setblocking(False)
    frames = []
    while True:
        try:
            data = sock.recv(1 << 16)
        except BlockingIOError:
            return frames
        frames += reader.feed(data)


def test_a_reader_rebuilds_frames_fed_a_byte_at_a_time_or_all_at_once():
    frames = [b"", b"x", bytes(range(256)) * 40]
    stream = b"".join(HEADER.pack(len(f)) + f for f in frames)
    bytewise = FrameReader()
    got = [f for i in range(len(stream)) for f in bytewise.feed(stream[i:i + 1])]
    assert got == frames
    assert FrameReader().feed(stream) == frames


def test_a_reader_refuses_a_length_no_writer_of_ours_sends():
    with pytest.raises(FrameError, match="at most"):
        FrameReader().feed(HEADER.pack(MAX_FRAME + 1))


def test_a_writer_that_the_socket_cannot_take_keeps_its_frames_in_order_until_drained():
    """More than the socket buffer holds: nothing blocks, nothing is lost or reordered, partial writes included."""
    a, b = _pair(buffer=4096)
    writer, reader = FrameWriter(a, max_frames=1000), FrameReader()
    frames = [bytes([i % 251]) * (1000 + 37 * i) for i in range(200)]  # ~0.9 MB against a few KB of buffer
    assert all(writer.send(f) for f in frames)
    assert writer.pending() > 0
    got = []
    while len(got) < len(frames):
        got += _read_all(b, reader)
        writer.drain()
    assert got == frames and writer.pending() == 0


def test_a_writer_whose_reader_stopped_refuses_frames_beyond_its_backlog():
    a, b = _pair(buffer=4096)
    writer = FrameWriter(a, max_frames=3)
    results = [writer.send(b"y" * 4096) for _ in range(40)]
    assert results[:4] == [True] * 4 and results[-1] is False  # the socket took some, then 3 waited, then no
    assert writer.pending() == 3


def test_a_writer_whose_reader_went_away_or_that_was_closed_sends_nothing_and_raises_nothing():
    a, b = _pair()
    writer = FrameWriter(a, max_frames=3)
    b.close()
    assert writer.send(b"z")  # the kernel may take the first before EPIPE; nothing raises either way
    writer.send(b"z")
    assert writer.pending() == 0
    writer.close()
    assert writer.send(b"z") is False and writer.closed
