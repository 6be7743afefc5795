"""Hostile clients of the draw-a-digit page (``eval.py --serve``), for ``python -m
bench.demo --hostile`` and the tests: uploads built to cost the server memory or time,
endless and slow request bodies, and forged Host and Origin headers.

Every request goes to a server on this machine's loopback address; every loop here is
bounded in count and in time, and stops by itself.
"""

from __future__ import annotations

import http.client
import io
import socket
import statistics
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def declared_huge_png(width: int = 1, height: int = 49_000_000) -> bytes:
    """A PNG of about 80 bytes that declares ``width`` x ``height`` grey pixels and holds one
    small IDAT: whatever decodes it believes the header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" + b"\x00" * width, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def _png(im: Image.Image) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format="PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def real_huge_png(side: int = 7000) -> bytes:
    """A real ``side`` x ``side`` drawing of a 7 (black strokes on white): every pixel is
    there, and it compresses to under the body limit."""
    im = Image.new("L", (side, side), 255)
    pen = ImageDraw.Draw(im)
    w = side // 40
    pen.line([(side * 0.25, side * 0.2), (side * 0.75, side * 0.2), (side * 0.45, side * 0.85)], fill=0, width=w)
    return _png(im)


def zero_png(side: int = 7000) -> bytes:
    """A ``side`` x ``side`` all-zero grey PNG (47 KB at 7000)."""
    return _png(Image.new("L", (side, side), 0))


def one_colour_png(side: int = 1900) -> bytes:
    """A mid-grey RGB image under the server's default pixel cap: decoded, then no digit."""
    return _png(Image.new("RGB", (side, side), (128, 128, 128)))


def animated_gif(frames: int = 60, side: int = 900) -> bytes:
    """An animated GIF of ``frames`` blank frames, each under the pixel cap, together far over it."""
    images = [Image.new("L", (side, side), 255 - (k % 2)) for k in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=10, loop=0)
    return buffer.getvalue()


def drawing(digit: np.ndarray, size: int = 280) -> bytes:
    """An MNIST digit as the page's canvas sends it: dark on white, ``size`` square, PNG."""
    return _png(Image.fromarray(255 - digit).resize((size, size), Image.Resampling.BILINEAR))


def hostile_uploads(valid: bytes) -> dict[str, tuple[bytes, bool]]:
    """Each hostile kind's body and whether it is over the server's default pixel cap."""
    return {
        "declared-huge": (declared_huge_png(), True),
        "real-huge": (real_huge_png(), True),
        "all-one-colour": (one_colour_png(), False),
        "zero-filled-7000": (zero_png(), True),
        "truncated": (valid[: len(valid) // 2], False),
        "animated": (animated_gif(), False),
    }


def post(port: int, path: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, bytes, float]:
    """One request on a new connection: status, body and milliseconds."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request("POST", path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, data, 1000 * (time.perf_counter() - t0)
    finally:
        conn.close()


def rss_mb(pid: int) -> float:
    """The resident memory of process ``pid`` in MB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Drawer:
    """Valid drawings sent one after another from a thread until stopped: their latencies
    (ms) and statuses."""

    def __init__(self, port: int, drawings: list[bytes]) -> None:
        self.port, self.drawings = port, drawings
        self.ms: list[float] = []
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        k = 0
        while not self._stop.is_set() and k < 100_000:
            status, _, ms = post(self.port, "/api/read", self.drawings[k % len(self.drawings)])
            self.statuses.append(status)
            self.ms.append(ms)
            k += 1
            self._stop.wait(0.02)

    def __enter__(self) -> "Drawer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def upload_attack(port: int, pid: int, valid: list[bytes], per_kind: int = 200, threads: int = 4) -> dict[str, Any]:
    """``per_kind`` uploads of each hostile kind from ``threads`` threads while valid
    drawings are sent: per kind its statuses and slowest answer, the server's resident
    memory before and after, and the drawings' latencies."""
    uploads = hostile_uploads(valid[0])
    for data in valid[:5]:  # warm: the first readings allocate the server's steady buffers
        post(port, "/api/read", data)
    before = rss_mb(pid)
    kinds: dict[str, Any] = {}
    with Drawer(port, valid) as drawer:
        for name, (body, over_cap) in uploads.items():
            results: list[tuple[int, bytes, float]] = []

            def send(k: int) -> None:
                for _ in range(k, per_kind, threads):
                    results.append(post(port, "/api/read", body))

            workers = [threading.Thread(target=send, args=(k,)) for k in range(threads)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            kinds[name] = {
                "bytes": len(body), "over_cap": over_cap, "n": len(results),
                "statuses": sorted({s for s, _, _ in results}),
                "max_ms": max(ms for _, _, ms in results), "median_ms": statistics.median(ms for _, _, ms in results),
                "message": results[0][1].decode("utf-8", "replace")[:160],
                "rss_mb": rss_mb(pid),
            }
    after = rss_mb(pid)
    return {"rss_before_mb": before, "rss_after_mb": after, "kinds": kinds,
            "drawings": {"n": len(drawer.ms), "statuses": sorted(set(drawer.statuses)),
                         "median_ms": statistics.median(drawer.ms) if drawer.ms else None,
                         "p99_ms": float(np.percentile(drawer.ms, 99)) if drawer.ms else None}}


def endless_body(port: int, seconds: float = 20.0, piece: int = 64 * 1024) -> dict[str, Any]:
    """A chunked body that never ends: how many bytes the server took before it closed the
    connection, the status it answered, and whether it closed within ``seconds``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=seconds)
    sock.sendall(b"POST /api/read HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = f"{piece:x}\r\n".encode() + b"x" * piece + b"\r\n"
    sent, closed, answer = 0, False, b""
    deadline = time.monotonic() + seconds
    sock.setblocking(False)
    try:
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
                if data == b"":
                    closed = True
                    break
                answer += data
            except BlockingIOError:
                pass
            except ConnectionResetError:  # closed while our bytes were in flight: the answer may be lost with them
                closed = True
                break
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return {"sent_bytes": sent, "closed": closed, "status": status}


class SlowBodies:
    """``n`` connections that each declare a body and send it one byte every ``gap``
    seconds, for at most ``seconds``: how many the server has closed when asked."""

    def __init__(self, port: int, n: int = 150, gap: float = 1.0, seconds: float = 60.0, declared: int = 5000) -> None:
        self.socks = []
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(f"POST /api/read HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {declared}\r\n\r\n".encode())
            self.socks.append(s)
        self.closed = [False] * n
        self.gap, self.seconds = gap, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            for k, s in enumerate(self.socks):
                if self.closed[k]:
                    continue
                try:
                    s.sendall(b"x")
                except OSError:
                    self.closed[k] = True
            self._stop.wait(self.gap)

    def open_count(self) -> int:
        """Connections the server still holds: a closed one reads as end of file."""
        for k, s in enumerate(self.socks):
            if self.closed[k]:
                continue
            s.setblocking(False)
            try:
                if s.recv(65536, socket.MSG_PEEK) == b"" or self._answered(s):
                    self.closed[k] = True
            except BlockingIOError:
                pass
            except OSError:
                self.closed[k] = True
            s.setblocking(True)
        return self.closed.count(False)

    @staticmethod
    def _answered(s: socket.socket) -> bool:
        data = s.recv(65536, socket.MSG_PEEK)
        return data.startswith(b"HTTP/1.1 ") and b"connection: close" in data.lower()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for s in self.socks:
            s.close()


def wait_until(condition: Callable[[], bool], seconds: float, every: float = 0.25) -> bool:
    """Whether ``condition`` held within ``seconds`` (checked every ``every`` seconds)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return condition()
