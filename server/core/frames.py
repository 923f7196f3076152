"""Length-prefixed frames over a Unix stream socket: the engine thread's outputs straight to a front end.

zmq hands every message to an I/O thread of its own on each side (~0.1 ms a hand-off on an idle machine, twice
per message: 0.23-0.34 ms from a thread's send to an asyncio receiver on the 2-core CPU machine, against
0.06-0.10 ms for a Unix socket written by the sender's thread and read by the receiving event loop's own
selector). A token's way back to its client is the time to first token's largest part after gRPC, so the
front end listens on a Unix socket of its own (``Submit.outputs``) and the engine core connects to it: the
engine thread writes each step's ``Outputs`` frame with one non-blocking ``send``, and the front end's event loop
reads it in ``data_received`` (asyncio's own protocol machinery).

A frame is a 4-byte little-endian length, then that many bytes (a msgpack ``Outputs``). The writer never
blocks the engine: what the kernel's socket buffer cannot take waits in a backlog of its own (as zmq's queue
did), sent first at the next write or ``drain``; a backlog of ``max_frames`` frames means the front end has
stopped reading, and the next frame is refused (the caller cancels its requests: ``EngineCore._lose``).
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import deque

HEADER = struct.Struct("<I")
MAX_FRAME = 64 << 20  # bytes; a frame of 256 rows' events is ~10 KB, so anything near this is not ours


class FrameError(ValueError):
    """A length prefix no writer of ours would send."""


class FrameReader:
    """Splits a byte stream into frames: ``feed`` what arrived, get the frames it completed."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            if size > MAX_FRAME:
                raise FrameError(f"a frame of {size} bytes (at most {MAX_FRAME})")
            end = HEADER.size + size
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[HEADER.size:end]))
            del self._buffer[:end]
        return frames


class FrameWriter:
    """One front end's connected socket, written by any thread of the core (the engine thread each step, a call
    thread ending a request whose adapter failed to load), one frame at a time, never blocking."""

    def __init__(self, sock: socket.socket, max_frames: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.max_frames = max_frames
        self.closed = False
        self._lock = threading.Lock()
        self._backlog: deque[memoryview] = deque()  # unsent frames; the first may be partly sent

    def send(self, frame: bytes) -> bool:
        """Write ``frame`` (or queue it behind what the socket could not take). False: not sent, and never will
        be: the backlog is full (the reader stopped reading) or the socket is closed."""
        with self._lock:
            if self.closed or len(self._backlog) >= self.max_frames:
                return False
            self._backlog.append(memoryview(HEADER.pack(len(frame)) + frame))
            self._write()
            return True

    def drain(self) -> None:
        """Send what the backlog holds, as far as the socket takes it (the reader may have caught up)."""
        with self._lock:
            if self._backlog and not self.closed:
                self._write()

    def pending(self) -> int:
        return len(self._backlog)

    def close(self) -> None:
        """Close the socket; later sends return False. (Under the lock: no write can hit a reused descriptor.)"""
        with self._lock:
            self.closed = True
            self._backlog.clear()
            self.sock.close()

    def _write(self) -> None:
        while self._backlog:
            head = self._backlog[0]
            try:
                sent = self.sock.send(head)
            except BlockingIOError:
                return
            except OSError:  # the reader is gone (EPIPE, ECONNRESET): the core's I/O thread sees it too
                self._backlog.clear()
                return
            if sent < len(head):
                self._backlog[0] = head[sent:]
                return
            self._backlog.popleft()
