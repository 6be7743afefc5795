"""Watch LeNet-5 read: a local web page where a digit drawn by hand (or an image file) is
read by the network and every layer's feature maps are shown, as in LeCun's early-1990s
demonstrations (``eval.py --serve``).

The server is a small ASGI app (Starlette, run by uvicorn) serving one static page,
``static/demo.html``, which draws the maps itself, and one JSON endpoint that reads an
image. The reading is the project's own: the same capped, hostile-input-safe decoder and
MNIST recipe as ``eval.py --image`` (``lenet_jax.predict``), then the model's own forward
pass returning every layer (``LeNet5.read``), compiled once at start-up.

    POST /api/read      an image (PNG from the page's canvas, or any file the reader
                        takes) as the body: the answer, the ten scores, the 32x32 input
                        and every layer's outputs (bytes 0-255, base64), or 4xx with
                        ``{"error": "<one line>"}``
    GET  /api/model     the model's name, head and layer shapes, the RBF bitmaps
    GET  /api/health    ``{"ok": true}``
    GET  /              the page

The page is meant to be left open in a tab while its user browses, so the server is a
public surface and bounds what any request can cost:

- only its own page may use it: a request whose Host header is not the address it
  listens on (or a loopback name) is refused before any work (400), which stops DNS
  rebinding; a POST whose Origin names another origin is refused (403); nothing
  redirects, and no answer carries a path of this machine;
- a body is capped in bytes (``max_body``) and in time (``body_seconds``); at either cap
  the answer closes the connection; a connection that sends no complete request head
  within ``head_seconds`` is closed, and at most ``max_connections`` are open at once
  (uvicorn answers 503 beyond that);
- an image is capped in pixels from its header before any pixel is decoded (a few
  megapixels, ``SERVE_MAX_PIXELS``; a drawing is 78,400), at most ``DECODERS`` are
  decoded at once, and nothing of a refused upload outlives its request.

No name or path from the client reaches the file system; a malformed request gets a 4xx
with one line, and the server goes on.
"""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any, Sequence
from urllib.parse import urlsplit

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax.bitmaps import COLS, DIGIT_BITMAPS, ROWS
from lenet_jax.config import Config
from lenet_jax.factories import make_model
from lenet_jax.inputs import preprocess
from lenet_jax.layers import AMPLITUDE
from lenet_jax.predict import SERVE_MAX_PIXELS, ImageError, mnist_recipe, rank_scores, read_picture_bytes

MAX_BODY = 1_000_000
"""Bytes an upload may have (a 280x280 canvas PNG is 5-15 KB)."""

DRAWING_PIXELS = 500_000
"""Uploads that declare at most this many pixels (a drawing of the page is 78,400, or
313,600 on a screen of two device pixels per pixel) are decoded in a lane of their own,
so that a drawing never waits behind a large image."""

DECODERS = 2
"""Uploads decoded at once: one in the drawings' lane, one in the lane of larger images;
the others wait their turn."""

BODY_SECONDS = 10.0
"""Seconds a request body may take to arrive (1 MB in 10 s is 100 KB/s)."""

HEAD_SECONDS = 10.0
"""Seconds a new connection may take to send a complete request head."""

MAX_CONNECTIONS = 200
"""Connections open at once; beyond it, uvicorn answers 503."""

LOOPBACK = ("127.0.0.1", "localhost", "::1")

MISSING = "the demo page needs starlette and uvicorn: pip install -r requirements-demo.txt (or pip install 'lenet-jax[demo]')"


def page() -> str:
    """The page itself: one HTML file with its script, shipped in the package."""
    return resources.files("lenet_jax").joinpath("static", "demo.html").read_text(encoding="utf-8")


def _bytes(values: np.ndarray, low: float, high: float) -> str:
    """``values`` mapped linearly from [low, high] to 0-255 (clipped), as base64."""
    scaled = np.clip((np.asarray(values, np.float32) - low) * (255.0 / (high - low)), 0, 255)
    return base64.b64encode(np.round(scaled).astype(np.uint8).tobytes()).decode("ascii")


def _digit(data: bytes, max_pixels: int) -> np.ndarray:
    return mnist_recipe(read_picture_bytes(data, "the image", max_pixels).grey, "the image")


def declared_pixels(data: bytes) -> int:
    """The pixels an image's header declares (0 when there is no readable header); reads
    the header only."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[0] * im.size[1]
    except Exception:  # anything Pillow cannot open is refused by the decoder, quickly, in the drawings' lane
        return 0


@dataclass
class DigitReader:
    """A model ready to read one image at a time: its parameters on the device and its
    forward pass returning every layer, compiled when the reader is made."""

    params: Any
    config: Config
    name: str
    max_pixels: int = SERVE_MAX_PIXELS

    def __post_init__(self) -> None:
        model = make_model(self.config, inference=True)
        self.model = model
        self.params = jax.device_put(self.params)
        self._read = jax.jit(lambda params, x: model.apply({"params": params}, preprocess(x), method="read"))
        self._lock = threading.Lock()  # one reading at a time: the device does them one after another anyway
        # Uploads are decoded by threads of their own, one a lane (DECODERS in all): drawings
        # never wait behind a large image, and the memory allocator's per-thread pools that
        # large decodes leave behind stay as few.
        self._lanes = (ThreadPoolExecutor(1, thread_name_prefix="lenet-decode-drawing"),
                       ThreadPoolExecutor(1, thread_name_prefix="lenet-decode-large"))
        jax.block_until_ready(self._read(self.params, jnp.zeros((1, 28, 28), jnp.uint8)))  # compiled now, not at the first drawing

    def describe(self) -> dict[str, Any]:
        """What the page needs before the first reading: the model, its stages, the bitmaps."""
        return {
            "model": self.name,
            "head": self.config.head,
            "stages": list(self.model.stage_names),
            "bitmaps": DIGIT_BITMAPS.astype(int).tolist() if self.config.head == "rbf" else None,
            "bitmap_shape": [ROWS, COLS],
        }

    def digit(self, data: bytes) -> np.ndarray:
        """The 28x28 digit of the image ``data``, decoded in its lane (``DRAWING_PIXELS``).
        When it cannot be had, an ImageError (one line) whose traceback holds no frame's
        pixels, so that a refused upload's arrays go with its request and do not wait for
        the garbage collector."""
        pixels = declared_pixels(data)
        try:
            if pixels > self.max_pixels:  # refused from the header, at once: it waits in no lane
                return _digit(data, self.max_pixels)
            return self._lanes[pixels > DRAWING_PIXELS].submit(_digit, data, self.max_pixels).result()
        except ImageError as e:
            message = str(e)
        raise ImageError(message)  # raised outside the handler: no context, no frame of the decoding

    def read(self, data: bytes) -> dict[str, Any]:
        """Read the digit in the image ``data``: ImageError (one line) when it cannot."""
        digit = self.digit(data)
        with self._lock:
            scores, acts = jax.device_get(self._read(self.params, jnp.asarray(digit[None])))
        answers, scores, margins, kind = rank_scores(np.asarray(scores, np.float64), self.config.head)
        bound = AMPLITUDE if self.config.activation == "scaled_tanh" else None
        layers = []
        for name, a in zip(self.model.stage_names, acts):
            a = np.asarray(a[0])
            maps = np.moveaxis(a, -1, 0) if a.ndim == 3 and a.shape[:2] != (1, 1) else a.reshape(-1)
            top = bound if bound is not None else max(float(np.abs(maps).max()), 1e-6)
            layers.append({"name": name, "shape": list(maps.shape), "data": _bytes(maps, -top, top)})
        return {
            "digit": int(answers[0]), "margin": float(margins[0]), "score_kind": kind, "scores": [float(v) for v in scores[0]],
            "input": base64.b64encode(np.pad(digit, 2).tobytes()).decode("ascii"),  # the 32x32 the network sees, ink high
            "layers": layers,
        }


def allowed_hosts(host: str) -> list[str]:
    """The names a request's Host header may give: the address served on, the loopback
    names (an IPv6 address also in brackets, as a Host header writes it) and, for a
    wildcard address (0.0.0.0, ::), this machine's own names."""
    import socket

    names = {host.lower(), *LOOPBACK}
    if host in ("0.0.0.0", "::", ""):
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return sorted(names | {f"[{n}]" for n in names if ":" in n})


def create_app(reader: DigitReader, max_body: int = MAX_BODY, hosts: Sequence[str] | None = tuple(allowed_hosts("127.0.0.1")),
               body_seconds: float = BODY_SECONDS) -> Any:
    """The ASGI app serving ``reader`` (Starlette): only to requests whose Host is one of
    ``hosts`` (None: any, for a server reached only through an authenticating proxy such
    as Colab's) and, for a POST, whose Origin is absent or the page's own."""
    import anyio
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    html = page()
    info = reader.describe()

    def refuse(status: int, message: str, close: bool = False) -> JSONResponse:
        """A 4xx with one line; ``close``: the connection too (the body was not read to its end)."""
        return JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"} if close else None)

    def foreign_origin(request: Request) -> str | None:
        origin = request.headers.get("origin")
        if hosts is None or origin is None:
            return None
        return None if urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower() else origin

    async def read(request: Request) -> JSONResponse:
        origin = foreign_origin(request)
        if origin is not None:
            return refuse(403, f"this server reads only drawings sent from its own page, not from {origin[:100]}", close=True)
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return refuse(400, "a malformed Content-Length", close=True)
            if int(declared) > max_body:
                return refuse(413, f"the image is {int(declared):,} bytes, more than the limit of {max_body:,}", close=True)
        body = bytearray()
        with anyio.move_on_after(body_seconds) as deadline:
            try:
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > max_body:
                        return refuse(413, f"the image is more than the limit of {max_body:,} bytes", close=True)
            except ClientDisconnect:
                return refuse(400, "the client went away before the image arrived", close=True)
        if deadline.cancelled_caught:
            return refuse(408, f"the image took more than {body_seconds:g} s to arrive", close=True)
        if not body:
            return refuse(400, "no image: send the image's bytes as the request body")
        try:
            return JSONResponse(await run_in_threadpool(reader.read, bytes(body)))
        except ImageError as e:
            return refuse(422, str(e))

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(html)

    async def model(request: Request) -> JSONResponse:
        return JSONResponse(info)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/api/read", read, methods=["POST"]),
            Route("/api/model", model, methods=["GET"]),
            Route("/api/health", health, methods=["GET"]),
        ],
        middleware=[] if hosts is None else [Middleware(TrustedHostMiddleware, allowed_hosts=list(hosts), www_redirect=False)],
    )
    app.router.redirect_slashes = False  # a redirect would name whatever host the client gave
    return app


def listening_socket(host: str, port: int) -> Any:
    """A socket bound to ``host:port`` (port 0: a free one), ready to be served."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def url(sock: Any) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def _protocol(head_seconds: float) -> Any:
    """uvicorn's HTTP/1.1 protocol (h11), closing a connection that has not sent a complete
    request head ``head_seconds`` after it opened (uvicorn itself waits for ever)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadline(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(head_seconds, self._head_late)

        def _head_late(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

    return HeadDeadline


def server(app: Any, max_connections: int = MAX_CONNECTIONS, head_seconds: float = HEAD_SECONDS) -> Any:
    """A uvicorn server for ``app`` that logs nothing per request, holds at most
    ``max_connections`` connections and closes one whose request head is late."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False, lifespan="off", http=_protocol(head_seconds),
                                         limit_concurrency=max_connections))


def serve(reader: DigitReader, host: str = "127.0.0.1", port: int = 8000, max_body: int = MAX_BODY, say: Any = print) -> None:
    """Serve the page until interrupted, saying where it is."""
    sock = listening_socket(host, port)
    say(f"LeNet-5 reads your digits at {url(sock)} ({reader.name}; Ctrl-C stops it)")
    if host not in LOOPBACK:
        say(f"note: bound to {host}: anyone who can reach port {sock.getsockname()[1]} there can use this page")
    server(create_app(reader, max_body, allowed_hosts(host))).run(sockets=[sock])


class Background:
    """The page served from a thread of this process (a notebook's kernel): ``url``, and
    ``stop()``. ``proxied``: reached only through an authenticating proxy of the kernel's
    ports (Colab's), whose Host and Origin are its own, so those checks are off."""

    def __init__(self, reader: DigitReader, host: str = "127.0.0.1", port: int = 0, max_body: int = MAX_BODY,
                 proxied: bool = False) -> None:
        self._sock = listening_socket(host, port)
        self.url = url(self._sock)
        self.port = self._sock.getsockname()[1]
        self._server = server(create_app(reader, max_body, None if proxied else allowed_hosts(host)))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def on_colab() -> bool:
    """Whether this kernel runs on Colab (whose browser reaches the kernel only through its proxy)."""
    try:
        import google.colab  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


def show_inline(port: int, height: int = 720) -> Any:
    """Show the page served on this kernel's ``port`` in the notebook: through Colab's
    proxy of kernel ports on Colab, as an IFrame of the local address in Jupyter."""
    try:
        from google.colab import output  # type: ignore[import-not-found]
    except ImportError:
        from IPython.display import IFrame, display

        display(IFrame(f"http://127.0.0.1:{port}/", width="100%", height=height))
        return None
    output.serve_kernel_port_as_iframe(port, height=height)
    return None
