"""The draw-a-digit server left running while its user browses (issue 26, items 1-3):
what an upload may cost, who may use it, and connections that never end.

The fast tests run the app in a thread of this process (``demo.Background``); the slow
ones send ``bench.hostile``'s clients to a real ``eval.py --serve`` process and read its
resident memory. Every request goes to this machine's loopback address and every loop is
bounded. Latencies are measured by ``python -m bench.demo --hostile`` (docs/demo.md), not
asserted here: a timed assertion breaks on a slow machine; what is asserted is what a
timing would only hint at (no pixel decoded, memory back, every valid drawing read).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import types

import numpy as np
import pytest

from bench import hostile
from lenet_jax import demo, pretrained
from lenet_jax.predict import SERVE_MAX_PIXELS, ImageError, read_picture_bytes

from conftest import ROOT


@pytest.fixture(scope="module")
def reader():
    params, config, _ = pretrained.load()
    return demo.DigitReader(params, config, "shipped")


@pytest.fixture(scope="module")
def page(reader):
    background = demo.Background(reader)
    yield background
    background.stop()


def ask(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
        host: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with the Host header ``host`` (default: the address itself)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host if host is not None else f"127.0.0.1:{port}")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- 1. what an upload may cost


@pytest.mark.parametrize("kind", ["declared-huge", "real-huge", "zero-filled-7000"])
def test_an_image_over_the_cap_is_refused_from_its_header_before_any_pixel_is_decoded(kind, mnist, monkeypatch):
    from PIL import ImageFile

    body, over_cap = hostile.hostile_uploads(hostile.drawing(mnist.test_images[0]))[kind]
    assert over_cap
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size))
    with pytest.raises(ImageError, match=f"pixels, more than the limit of {SERVE_MAX_PIXELS:,}"):
        read_picture_bytes(body, "the image", SERVE_MAX_PIXELS)
    assert decoded == []


def test_the_server_cap_is_a_few_megapixels_and_the_page_drawing_far_below_it(reader):
    assert reader.max_pixels == SERVE_MAX_PIXELS and 280 * 280 * 20 < SERVE_MAX_PIXELS <= 5_000_000


def test_an_animated_image_is_read_only_while_its_frames_stay_within_the_cap(monkeypatch):
    from PIL import ImageFile

    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.tell()) or real_load(self))
    gif = hostile.animated_gif(frames=30, side=300)  # 90,000 pixels a frame
    with pytest.raises(ImageError, match="no digit found in the first 5 of its 30 frames"):
        read_picture_bytes(gif, "the image", max_pixels=450_000)
    assert max(loads) == 4  # frames 0-4 decoded, never a sixth


def large_arrays_held(error: BaseException) -> list[tuple[str, str, tuple]]:
    """Every array of more than 28x28 values that a frame of ``error``'s tracebacks (its
    own and its context's) still holds."""
    held = []
    while error is not None:
        tb = error.__traceback__
        while tb is not None:
            for name, value in tb.tb_frame.f_locals.items():
                if isinstance(value, np.ndarray) and value.size > 28 * 28:
                    held.append((tb.tb_frame.f_code.co_name, name, value.shape))
            tb = tb.tb_next
        error = error.__context__
    return held


def test_a_refused_upload_keeps_no_pixels_alive_through_its_traceback(reader):
    body = hostile.one_colour_png(side=600)
    with pytest.raises(ImageError, match="no digit found") as caught:
        reader.read(body)
    assert large_arrays_held(caught.value) == []


def test_decoding_is_bounded_one_drawing_and_one_large_image_at_once(reader, monkeypatch, mnist):
    from PIL import Image

    inside: list[int] = []
    most = [0, 0]  # drawings, large images decoded at once
    gate = threading.Lock()
    release = threading.Event()
    real = demo.mnist_recipe

    def slow_recipe(grey, where):
        kind = int(grey.size > demo.DRAWING_PIXELS)
        with gate:
            inside.append(kind)
            most[kind] = max(most[kind], inside.count(kind))
        release.wait(timeout=10)
        with gate:
            inside.remove(kind)
        return real(grey, where)

    monkeypatch.setattr(demo, "mnist_recipe", slow_recipe)
    small = hostile.drawing(mnist.test_images[0])
    large = hostile._png(Image.open(io.BytesIO(small)).resize((1000, 1000)))
    threads = [threading.Thread(target=reader.read, args=(body,)) for body in [small, large] * 4]
    for t in threads:
        t.start()
    hostile.wait_until(lambda: len(inside) == 2, seconds=10, every=0.01)
    held = sorted(inside)
    release.set()
    for t in threads:
        t.join()
    assert held == [0, 1] and most == [1, 1] and demo.DECODERS == 2


# --------------------------------------------------------------------------- 2. only its own page


@pytest.mark.parametrize("method,path", [("GET", "/"), ("GET", "/api/model"), ("GET", "/api/health"), ("POST", "/api/read"),
                                         ("POST", "/api/read/")])
def test_a_request_naming_another_host_is_refused_before_any_work(page, mnist, method, path):
    body = hostile.drawing(mnist.test_images[0]) if method == "POST" else None
    status, headers, data = ask(page.port, method, path, body, host=f"evil.example:{page.port}")
    assert status == 400 and "location" not in headers, (status, headers, data[:200])
    assert ask(page.port, method, path, body, host="evil.example")[0] == 400


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "LOCALHOST:{port}", "127.0.0.1"])
def test_the_loopback_names_are_served(page, host):
    assert ask(page.port, "GET", "/api/health", host=host.format(port=page.port))[0] == 200


def test_a_slash_never_redirects_to_a_host_the_client_named(page, mnist):
    status, headers, _ = ask(page.port, "POST", "/api/read/", hostile.drawing(mnist.test_images[0]))
    assert status == 404 and "location" not in headers


@pytest.mark.parametrize("origin,expected", [("http://attacker.example", 403), ("null", 403), ("http://127.0.0.1:1", 403),
                                             ("http://127.0.0.1:{port}", 200), (None, 200)])
def test_a_post_from_another_origin_is_refused(page, mnist, origin, expected):
    headers = {} if origin is None else {"Origin": origin.format(port=page.port)}
    status, _, data = ask(page.port, "POST", "/api/read", hostile.drawing(mnist.test_images[0]), headers)
    assert status == expected, data[:200]
    if expected == 200:
        assert json.loads(data)["digit"] == mnist.test_labels[0]
    else:
        assert "only drawings sent from its own page" in json.loads(data)["error"]


def test_a_proxied_notebook_server_takes_the_proxy_host(reader, mnist):
    background = demo.Background(reader, proxied=True)
    try:
        status, _, data = ask(background.port, "POST", "/api/read", hostile.drawing(mnist.test_images[0]),
                              {"Origin": "https://8000-abc.prod.colab.dev"}, host="8000-abc.prod.colab.dev")
        assert status == 200 and json.loads(data)["digit"] == mnist.test_labels[0]
    finally:
        background.stop()


def test_a_wildcard_address_also_answers_to_this_machines_name():
    assert socket.gethostname().lower() in demo.allowed_hosts("0.0.0.0")
    assert "[::1]" in demo.allowed_hosts("::1") and socket.gethostname().lower() not in demo.allowed_hosts("127.0.0.1")


def test_the_model_of_a_run_is_named_by_its_folder_never_its_path(tmp_path, monkeypatch):
    from lenet_jax.cli import evaluate

    params, config, _ = pretrained.load()
    run = tmp_path / "deep" / "my-run"
    run.mkdir(parents=True)
    monkeypatch.setattr(evaluate, "load_model", lambda path, which: evaluate.LoadedModel(
        params, None, config, 20, 1200000, [], str(path)))
    served = {}
    monkeypatch.setattr(demo, "serve", lambda reader, *a, **k: served.setdefault("info", reader.describe()))
    assert evaluate.main(["--serve", "--workdir", str(run), "--port", "0"]) == 0
    assert served["info"]["model"] == "my-run, epoch 20" and str(tmp_path) not in json.dumps(served["info"])


# --------------------------------------------------------------------------- 3. connections that never end, against a real server


@pytest.fixture(scope="module")
def server():
    """``eval.py --serve --port 0`` in a process of its own: its port and process id."""
    proc = subprocess.Popen([sys.executable, "eval.py", "--serve", "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    line = proc.stdout.readline()
    assert line.startswith("LeNet-5 reads your digits at http://127.0.0.1:"), line + proc.stderr.read()[-2000:]
    yield types.SimpleNamespace(port=int(line.split(" at ")[1].split()[0].rsplit(":", 1)[1].strip("/")), pid=proc.pid, proc=proc)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_two_hundred_uploads_of_each_hostile_kind_leave_the_server_as_it_was(server, mnist):
    valid = [hostile.drawing(d) for d in mnist.test_images[:20]]
    r = hostile.upload_attack(server.port, server.pid, valid, per_kind=200)
    messages = {"declared-huge": "1x49000000 pixels, more than the limit", "real-huge": "7000x7000 pixels, more than the limit",
                "zero-filled-7000": "7000x7000 pixels, more than the limit", "all-one-colour": "no digit found",
                "truncated": "not a readable image", "animated": "no digit found in the first 4 of its 60 frames"}
    for kind, seen in r["kinds"].items():
        assert seen["n"] == 200 and seen["statuses"] == [422] and messages[kind] in seen["message"], (kind, seen)
    assert r["rss_after_mb"] - r["rss_before_mb"] < 150, r
    assert r["drawings"]["n"] > 0 and r["drawings"]["statuses"] == [200], r["drawings"]
    print(json.dumps(r))


@pytest.mark.slow
def test_an_endless_body_is_answered_and_its_connection_closed_at_the_cap(server):
    r = hostile.endless_body(server.port, seconds=30)
    assert r["status"] == 413 and r["closed"] and r["sent_bytes"] < 32 * demo.MAX_BODY, r


@pytest.mark.slow
def test_slow_bodies_are_cut_at_the_deadline_while_drawings_are_still_read(server, mnist):
    valid = [hostile.drawing(d) for d in mnist.test_images[:20]]
    endless: dict = {}
    flood = threading.Thread(target=lambda: endless.update(hostile.endless_body(server.port, seconds=20)))
    slow = hostile.SlowBodies(server.port, n=150, gap=1.0, seconds=4 * demo.BODY_SECONDS)
    try:
        with hostile.Drawer(server.port, valid) as drawer:
            flood.start()
            assert hostile.wait_until(lambda: slow.open_count() == 0, seconds=3 * demo.BODY_SECONDS), slow.open_count()
            flood.join(timeout=60)
    finally:
        slow.close()
    assert endless["closed"] and endless["sent_bytes"] < 32 * demo.MAX_BODY, endless
    assert drawer.ms and drawer.statuses == [200] * len(drawer.statuses)


def closed_by_peer(sock) -> bool:
    """Whether the other end has closed ``sock`` (it reads as end of file), without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


@pytest.mark.slow
def test_connections_are_bounded_and_one_that_sends_no_request_is_closed(server):
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(demo.MAX_CONNECTIONS)]
    try:
        assert hostile.wait_until(lambda: ask(server.port, "GET", "/api/health")[0] == 503, seconds=10)
        assert hostile.wait_until(lambda: all(map(closed_by_peer, idle)), seconds=3 * demo.HEAD_SECONDS)
        assert ask(server.port, "GET", "/api/health")[0] == 200
    finally:
        for s in idle:
            s.close()
