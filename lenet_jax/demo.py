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

No name or path from the client reaches the file system; request bodies are capped
(``max_body``); a malformed request gets a 4xx with one line, and the server goes on.
"""

from __future__ import annotations

import base64
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lenet_jax.bitmaps import COLS, DIGIT_BITMAPS, ROWS
from lenet_jax.config import Config
from lenet_jax.factories import make_model
from lenet_jax.inputs import preprocess
from lenet_jax.layers import AMPLITUDE
from lenet_jax.predict import MAX_PIXELS, ImageError, mnist_recipe, rank_scores, read_picture_bytes

MAX_BODY = 1_000_000
"""Bytes an upload may have (a 280x280 canvas PNG is 5-15 KB)."""

MISSING = "the demo page needs starlette and uvicorn: pip install -r requirements-demo.txt (or pip install 'lenet-jax[demo]')"


def page() -> str:
    """The page itself: one HTML file with its script, shipped in the package."""
    return resources.files("lenet_jax").joinpath("static", "demo.html").read_text(encoding="utf-8")


def _bytes(values: np.ndarray, low: float, high: float) -> str:
    """``values`` mapped linearly from [low, high] to 0-255 (clipped), as base64."""
    scaled = np.clip((np.asarray(values, np.float32) - low) * (255.0 / (high - low)), 0, 255)
    return base64.b64encode(np.round(scaled).astype(np.uint8).tobytes()).decode("ascii")


@dataclass
class DigitReader:
    """A model ready to read one image at a time: its parameters on the device and its
    forward pass returning every layer, compiled when the reader is made."""

    params: Any
    config: Config
    name: str
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        model = make_model(self.config, inference=True)
        self.model = model
        self.params = jax.device_put(self.params)
        self._read = jax.jit(lambda params, x: model.apply({"params": params}, preprocess(x), method="read"))
        self._lock = threading.Lock()  # one reading at a time: the device does them one after another anyway
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

    def read(self, data: bytes) -> dict[str, Any]:
        """Read the digit in the image ``data``: ImageError (one line) when it cannot."""
        digit = mnist_recipe(read_picture_bytes(data, "the image", self.max_pixels).grey, "the image")
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


def create_app(reader: DigitReader, max_body: int = MAX_BODY) -> Any:
    """The ASGI app serving ``reader`` (Starlette)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    html = page()
    info = reader.describe()

    def refuse(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def read(request: Request) -> JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return refuse(400, "a malformed Content-Length")
            if int(declared) > max_body:
                return refuse(413, f"the image is {int(declared):,} bytes, more than the limit of {max_body:,}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                return refuse(413, f"the image is more than the limit of {max_body:,} bytes")
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

    return Starlette(routes=[
        Route("/", index, methods=["GET"]),
        Route("/api/read", read, methods=["POST"]),
        Route("/api/model", model, methods=["GET"]),
        Route("/api/health", health, methods=["GET"]),
    ])


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


def server(app: Any) -> Any:
    """A uvicorn server for ``app`` that logs nothing per request."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))


def serve(reader: DigitReader, host: str = "127.0.0.1", port: int = 8000, max_body: int = MAX_BODY, say: Any = print) -> None:
    """Serve the page until interrupted, saying where it is."""
    sock = listening_socket(host, port)
    say(f"LeNet-5 reads your digits at {url(sock)} ({reader.name}; Ctrl-C stops it)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        say(f"note: bound to {host}: anyone who can reach port {sock.getsockname()[1]} there can use this page")
    server(create_app(reader, max_body)).run(sockets=[sock])


class Background:
    """The page served from a thread of this process (a notebook's kernel): ``url``, and
    ``stop()``."""

    def __init__(self, reader: DigitReader, host: str = "127.0.0.1", port: int = 0, max_body: int = MAX_BODY) -> None:
        self._sock = listening_socket(host, port)
        self.url = url(self._sock)
        self.port = self._sock.getsockname()[1]
        self._server = server(create_app(reader, max_body))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


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
