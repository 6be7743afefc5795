"""The draw-a-digit page (``eval.py --serve``): the reader behind it, the server under
bad and concurrent requests, and the page itself in a real browser (Debian's Chromium,
driven by Playwright), drawing digits with the mouse."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lenet_jax import demo, pretrained
from lenet_jax.cli.evaluate import main as eval_main
from lenet_jax.predict import ImageError

from conftest import ROOT, one_line

CHROMIUM = os.environ.get("LENET_JAX_CHROMIUM", "/usr/bin/chromium")


def drawn(digit: np.ndarray, size: int = 280) -> bytes:
    """An MNIST digit as a user's drawing would reach the server: dark on white, large, PNG."""
    buffer = io.BytesIO()
    Image.fromarray(255 - digit).resize((size, size), Image.Resampling.BILINEAR).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def reader():
    params, config, _ = pretrained.load()
    return demo.DigitReader(params, config, "shipped")


def test_the_reader_answers_with_every_layer(reader, mnist):
    r = reader.read(drawn(mnist.test_images[0]))
    assert r["digit"] == mnist.test_labels[0] and r["score_kind"] == "rbf_penalties" and len(r["scores"]) == 10
    assert r["margin"] == pytest.approx(sorted(r["scores"])[1] - min(r["scores"]))
    shapes = {layer["name"]: layer["shape"] for layer in r["layers"]}
    assert shapes == {"C1": [6, 28, 28], "S2": [6, 14, 14], "C3": [16, 10, 10], "S4": [16, 5, 5], "C5": [120], "F6": [84]}
    for layer in r["layers"]:
        assert len(base64.b64decode(layer["data"])) == int(np.prod(layer["shape"]))
    seen = np.frombuffer(base64.b64decode(r["input"]), np.uint8).reshape(32, 32)
    assert seen[:2].max() == 0 and seen[2:30, 2:30].max() > 200  # the 28x28 recipe's digit in its 2-pixel border, ink high
    f6 = np.frombuffer(base64.b64decode(r["layers"][-1]["data"]), np.uint8).astype(float) / 255 * 2 - 1  # back to [-1, 1] of A
    from lenet_jax.bitmaps import RBF_CENTRES

    assert np.argmin(((f6 * 1.7159 - RBF_CENTRES) ** 2).sum(-1)) == r["digit"]  # the F6 picture is nearest the answer's bitmap


@pytest.mark.parametrize("data,message", [(b"", "not a readable image"), (b"GIF89a broken", "not a readable image"),
                                          (drawn(np.zeros((28, 28), np.uint8)), "no digit found")])
def test_the_reader_refuses_what_holds_no_digit_in_one_line(reader, data, message):
    with pytest.raises(ImageError, match=f"^the image: {message}"):
        reader.read(data)


def test_serve_without_the_demo_extra_names_the_install_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    assert "pip install -r requirements-demo.txt" in one_line(capsys, eval_main(["--serve", "--port", "0"]))


# --------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server():
    """``eval.py --serve --port 0`` in a process of its own; its address."""
    proc = subprocess.Popen([sys.executable, "eval.py", "--serve", "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    line = proc.stdout.readline()
    assert line.startswith("LeNet-5 reads your digits at http://127.0.0.1:"), line + proc.stderr.read()[-2000:]
    url = line.split(" at ")[1].split()[0]
    yield url, int(url.rsplit(":", 1)[1].strip("/"))
    proc.terminate()
    proc.wait(timeout=30)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def bomb() -> bytes:
    """A PNG that declares 60,000 x 60,000 pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    raw[16:24] = (60_000).to_bytes(4, "big") * 2
    return bytes(raw)


@pytest.mark.slow
def test_the_server_survives_a_thousand_malformed_requests_and_a_hundred_concurrent_ones(server, mnist, reader):
    url, port = server
    good_png = drawn(mnist.test_images[1])
    malformed = [
        ("POST", "/api/read", b"", {}, 400), ("POST", "/api/read", b"not an image", {}, 422), ("POST", "/api/read", good_png[:200], {}, 422),
        ("POST", "/api/read", bomb(), {}, 422), ("POST", "/api/read", b"x" * 1_100_000, {}, 413),
        ("POST", "/api/read", b"x", {"Content-Length": "5000000000"}, 413), ("GET", "/api/read", None, {}, 405),
        ("DELETE", "/", None, {}, 405), ("GET", "/../../etc/passwd", None, {}, 404), ("POST", "/api/read?path=/etc/passwd", b"\x89PNG", {}, 422),
    ]
    statuses: list[tuple[int, int]] = []

    def hammer(k: int) -> None:
        for i in range(k, 1000, 8):
            method, path, body, headers, expected = malformed[i % len(malformed)]
            if headers.get("Content-Length") == "5000000000":
                status, _ = raw_declared_too_large(port)
            elif expected == 413:  # the server answers at the cap and closes: the rest of the body may meet a reset
                try:
                    status, _ = request(port, method, path, body, headers)
                except (ConnectionResetError, BrokenPipeError):
                    status = 413
            else:
                status, _ = request(port, method, path, body, headers)
            statuses.append((status, expected))

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(statuses) == 1000 and all(s == e for s, e in statuses), sorted(set(statuses))
    digits = [i for i in range(300) if reader.read(drawn(mnist.test_images[i]))["digit"] == mnist.test_labels[i]][:100]
    answers: dict[int, tuple[int, bytes]] = {}
    barrier = threading.Barrier(100)

    def one(i: int) -> None:
        barrier.wait()
        answers[i] = request(port, "POST", "/api/read", drawn(mnist.test_images[i]))

    threads = [threading.Thread(target=one, args=(i,)) for i in digits]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 100 and all(status == 200 for status, _ in answers.values())
    assert all(json.loads(body)["digit"] == mnist.test_labels[i] for i, (_, body) in answers.items())
    assert request(port, "GET", "/api/health") == (200, b'{"ok":true}')


def raw_declared_too_large(port: int) -> tuple[int, bytes]:
    """A request that declares 5 GB and sends a byte: refused from its header alone."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest("POST", "/api/read")
        conn.putheader("Content-Length", "5000000000")
        conn.endheaders()
        conn.send(b"x")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- the page in a browser

STROKES = {  # on the 280x280 pad
    1: [[(150, 45), (146, 120), (142, 235)]],
    7: [[(75, 55), (205, 55)], [(205, 55), (165, 130), (125, 235)]],
    0: [[(140 + 55 * np.sin(t), 140 - 85 * np.cos(t)) for t in np.linspace(0, 2 * np.pi, 41)]],
}
PANELS = ["input", "C1", "S2", "C3", "S4", "C5", "F6"]
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def playwright_driver():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM}: install Debian's chromium (apt-get install chromium), as .ci/run does"
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def chromium(playwright_driver):
    """One Chromium for the module's browser tests; each test opens its own page (and context)."""
    browser = playwright_driver.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
    yield browser
    browser.close()


def opened(browser, url: str, before=None, viewport=(1800, 470)):
    """A new page showing the demo, ready to read (``before(page)`` runs before it loads: routes, listeners)."""
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    if before is not None:
        before(page)
    page.goto(url)
    page.wait_for_function("document.body.dataset.ready === '1'")
    return page


def draw(page, strokes, wait: bool = True) -> None:
    box = page.locator("#pad").bounding_box()
    for stroke in strokes:
        page.mouse.move(box["x"] + stroke[0][0], box["y"] + stroke[0][1])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x, box["y"] + y, steps=4)
        page.mouse.up()
    if wait:
        settle(page)


def settle(page) -> None:
    """Wait until every reading the page asked for is shown."""
    page.wait_for_function("window.demoIdle() && document.body.dataset.readings > 0")
    page.wait_for_function("window.demoIdle()")


PIXELS = """(names) => Object.fromEntries(names.map(name => {
    const maps = [...document.querySelectorAll(`#${name} canvas`)];
    const pixels = maps.map(c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data));
    const flat = pixels.flat();
    const grey = flat.filter((v, i) => i % 4 === 0);
    return [name, {blank: Math.min(...grey) === Math.max(...grey), pixels: flat.join(',')}];
}))"""


def panels(page) -> dict[str, str]:
    """Each panel's pixels, hashed, and whether they hold anything but one colour."""
    out = page.evaluate(PIXELS, PANELS)
    assert not any(v["blank"] for v in out.values()), [k for k, v in out.items() if v["blank"]]
    return {k: hashlib.sha256(v["pixels"].encode()).hexdigest() for k, v in out.items()}


def drawn_panels(page) -> list[str]:
    """The panels (and the RBF bitmap) that show anything: none, once the page is cleared."""
    return [k for k, v in page.evaluate(PIXELS, PANELS + ["bitmap"]).items() if not v["blank"]]


@pytest.mark.slow
def test_drawing_digits_in_a_real_browser(server, chromium, mnist, tmp_path):
    url, _ = server
    page = opened(chromium, url)
    seen = {}
    for digit, strokes in STROKES.items():
        page.click("#clear")
        draw(page, strokes)
        assert page.inner_text("#answer") == str(digit), (digit, page.inner_text("#status"))
        assert page.get_attribute(f".bar[data-digit='{digit}']", "class") == "bar win"
        seen[digit] = panels(page)
    for name in PANELS:  # every panel changed from one digit to the next
        assert len({seen[d][name] for d in STROKES}) == 3, name
    page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
    latencies = page.evaluate("window.latencies")

    upload = tmp_path / "upload.png"
    upload.write_bytes(drawn(mnist.test_images[2]))
    page.set_input_files("#file", str(upload))
    settle(page)
    assert page.inner_text("#answer") == str(mnist.test_labels[2])

    bad = tmp_path / "notes.png"
    bad.write_bytes(b"these are not pixels")
    page.set_input_files("#file", str(bad))
    settle(page)
    assert page.inner_text("#answer") == "?" and "not a readable image" in page.inner_text("#status")
    assert page.get_attribute("#status", "class") == "error"
    page.click("#clear")
    draw(page, STROKES[7])  # the page still works
    assert page.inner_text("#answer") == "7"
    page.close()
    screenshot = os.environ.get("LENET_JAX_DEMO_SCREENSHOT")
    if screenshot:  # how docs/demo.png is made: from this test's own run
        Path(screenshot).write_bytes((tmp_path / "demo.png").read_bytes())
    print(f"stroke end to answer shown: median {statistics.median(latencies):.0f} ms over {len(latencies)} strokes")


def pump_until(page, condition, what: str, seconds: float = 60) -> None:
    """Let Playwright deliver its events (route handlers) until ``condition()``."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        page.wait_for_timeout(10)


WATCH_ANSWERS = """() => {  // every answer shown from now on
    const answer = document.getElementById('answer');
    window.shownAfterClear = [answer.textContent];
    new MutationObserver(() => window.shownAfterClear.push(answer.textContent)).observe(answer, {childList: true, characterData: true, subtree: true});
}"""


def assert_cleared(page) -> None:
    shown = page.evaluate("window.shownAfterClear")
    assert set(shown) == {"?"}, f"a reading asked for before Clear was shown after it: {shown}"
    assert page.inner_text("#status") == "Draw a digit." and page.get_attribute("#status", "class") == ""
    assert page.inner_text("#margin") == "" and page.locator("#scores .bar").count() == 0
    assert drawn_panels(page) == []


@pytest.mark.slow
def test_clear_drops_a_reading_in_flight_in_a_browser(server, chromium):
    """A reading asked for before Clear is never shown after it. A stroke on a 7 is read again;
    the test holds that request until Clear has been pressed, then lets it through: it is dropped,
    and the answer and panels stay cleared. Then the same with the stroke's PNG held while it is
    being encoded: it is never even sent."""
    url, _ = server
    page = opened(chromium, url)
    held, sent, holding = [], [], [False]

    def hold(route) -> None:
        sent.append(route.request.url)
        if holding[0]:
            held.append(route)  # answered below, after Clear
        else:
            route.continue_()

    page.route("**/api/read", hold)
    draw(page, STROKES[7])
    assert page.inner_text("#answer") == "7"
    readings = page.evaluate("document.body.dataset.readings")

    holding[0] = True
    draw(page, [[(95, 55), (185, 55)]], wait=False)  # over the 7's own bar: the pad still shows a 7, and is read again
    pump_until(page, lambda: held, "the page to ask for a reading")
    page.click("#clear")
    page.evaluate(WATCH_ANSWERS)
    holding[0] = False
    held[0].continue_()  # the old reading comes back now, after Clear
    page.wait_for_function("window.demoIdle()")
    assert_cleared(page)
    assert len(held) == 1 and page.evaluate("document.body.dataset.dropped") == "1"
    assert page.evaluate("document.body.dataset.readings") == readings  # nothing shown since

    draw(page, STROKES[7])
    assert page.inner_text("#answer") == "7"
    page.evaluate("""() => {  // the pad's PNGs handed over only when the test says
        const toBlob = HTMLCanvasElement.prototype.toBlob;
        window.heldBlobs = [];
        HTMLCanvasElement.prototype.toBlob = function (done, ...rest) { toBlob.call(this, b => window.heldBlobs.push(() => done(b)), ...rest); };
    }""")
    draw(page, [[(95, 55), (185, 55)]], wait=False)
    page.wait_for_function("window.heldBlobs.length > 0")
    page.click("#clear")
    page.evaluate(WATCH_ANSWERS)
    sent.clear()
    page.evaluate("window.heldBlobs.forEach(done => done())")
    page.wait_for_function("window.demoIdle()")
    assert sent == [], "a drawing from before Clear was sent after it"
    assert_cleared(page)

    page.evaluate("window.heldBlobs = {push: done => done()}")  # PNGs as usual again
    draw(page, STROKES[1])  # and the next drawing is read as usual
    assert page.inner_text("#answer") == "1" and len(drawn_panels(page)) == len(PANELS) + 1
    page.close()


def with_head(head: str, stages: list[str]):
    """A ``before`` for ``opened``: GET /api/model answered as the server's own answer with another head."""

    def before(page) -> None:
        def answer(route) -> None:
            response = route.fetch()
            info = dict(response.json(), head=head, bitmaps=None, stages=stages)
            route.fulfill(response=response, json=info)

        page.route("**/api/model", answer)

    return before


def texts(page) -> dict[str, str]:
    return {k: page.inner_text(f"#{k}") for k in ("last-title", "pair-note", "scores-title", "scores-note")}


@pytest.mark.slow
def test_each_head_says_what_it_does_in_a_browser(server, chromium):
    """The last two panels describe the head served: the RBF head's bitmaps and squared distances
    (the real model), the softmax head's logits and probabilities, the squashed head's ten outputs
    and no F6 (the model's description rewritten in flight)."""
    url, _ = server
    page = opened(chromium, url)
    t = texts(page)
    assert t["last-title"] == "F6 84" and t["scores-title"] == "output: RBF penalties"
    assert "squared distance from F6 to that digit's bitmap" in t["pair-note"] and "nearest bitmap wins" in t["pair-note"]
    assert t["scores-note"].startswith("lower is better") and page.is_visible("#bitmap")
    page.close()

    page = opened(chromium, url, before=with_head("softmax", ["C1", "S2", "C3", "S4", "C5", "F6"]))
    t = texts(page)
    assert t["last-title"] == "F6 84" and t["scores-title"] == "output: softmax probabilities"
    assert "10 logits" in t["pair-note"] and "softmax turns the logits into probabilities" in t["pair-note"]
    assert t["scores-note"].startswith("higher is better")
    assert page.is_hidden("#bitmap") and page.evaluate("[...document.querySelectorAll('#F6 canvas')].map(c => [c.width, c.height])") == [[7, 12]]
    body = page.inner_text("body")
    assert "RBF" not in body and "bitmap" not in body and "distance" not in body, body
    page.close()

    page = opened(chromium, url, before=with_head("squashed", ["C1", "S2", "C3", "S4", "C5", "output"]))
    t = texts(page)
    assert t["last-title"] == "output: 10 squashed units" and t["scores-title"] == "output: squashed units"
    assert "No F6: C5 feeds the ten squashed output units directly" in t["pair-note"] and "Lush" in t["pair-note"]
    assert t["scores-note"].startswith("higher is better")
    assert page.is_hidden("#bitmap") and page.evaluate("[...document.querySelectorAll('#F6 canvas')].map(c => [c.width, c.height])") == [[10, 1]]
    body = page.inner_text("body")
    assert "RBF" not in body and "bitmap" not in body and "F6 84" not in body, body
    page.close()


@pytest.mark.slow
def test_keyboard_reaches_the_pad_and_the_upload_in_a_browser(server, chromium, mnist, tmp_path):
    """Tab from the top reaches the pad and the file upload; the upload works from the keyboard
    alone; the answer and the status are live regions a screen reader announces."""
    url, _ = server
    choosers = []  # listened for from the start: the subscription is set up asynchronously, before the key press
    page = opened(chromium, url, before=lambda page: page.on("filechooser", lambda chooser: choosers.append(chooser)))
    for selector in ("#answer", "#status"):
        assert page.get_attribute(selector, "aria-live") == "polite" and page.get_attribute(selector, "role") == "status", selector
    assert page.get_attribute("#pad", "role") == "img" and "draw a digit" in page.get_attribute("#pad", "aria-label")
    assert page.get_attribute("#file", "aria-label")

    reached = []
    for _ in range(8):  # from the top of the page: the pad, Clear, the stroke width, the upload
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
        if reached[-1] == "file":
            break
    assert "pad" in reached and reached[-1] == "file" and reached.index("pad") < reached.index("file"), reached

    upload = tmp_path / "upload.png"
    upload.write_bytes(drawn(mnist.test_images[3]))
    page.keyboard.press("Enter")  # on the focused upload
    pump_until(page, lambda: choosers, "the file chooser")
    choosers[0].set_files(str(upload))
    settle(page)
    assert page.inner_text("#answer") == str(mnist.test_labels[3]), page.inner_text("#status")
    page.close()


def net_log_requests(path: Path) -> list[tuple[str, int | None]]:
    """Every request in a Chromium net log (``--log-net-log``) with its HTTP status: the browser's own
    requests too (the favicon), which Playwright's request events do not see."""
    log = json.loads(path.read_text())
    kinds = {number: name for name, number in log["constants"]["logEventTypes"].items()}
    urls: dict[int, str] = {}
    statuses: dict[int, int] = {}
    for event in log["events"]:
        kind, source, params = kinds.get(event["type"]), event["source"]["id"], event.get("params") or {}
        if kind == "URL_REQUEST_START_JOB" and "url" in params:
            urls[source] = params["url"]
        elif kind == "HTTP_TRANSACTION_READ_RESPONSE_HEADERS":
            statuses[source] = int(params["headers"][0].split()[1])
    return [(u, statuses.get(source)) for source, u in urls.items()]


@pytest.mark.slow
def test_loading_the_page_requests_no_favicon_in_a_browser(server, playwright_driver, tmp_path):
    """The page carries its own icon: loading it asks the server for nothing but the page and the
    model, and nothing gets a 404 (Chromium's net log, which sees the browser's favicon request)."""
    url, _ = server
    log = tmp_path / "net.json"
    browser = playwright_driver.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS + [f"--log-net-log={log}"])
    seen, answered = [], []

    def listen(page) -> None:
        page.on("request", lambda r: seen.append(r.url))
        page.on("response", lambda r: answered.append((r.url, r.status)))

    page = opened(browser, url, before=listen)
    page.wait_for_load_state("networkidle")
    browser.close()  # writes the net log
    assert seen == [url, url + "api/model"] and all(status == 200 for _, status in answered), (seen, answered)
    requests = [(u, status) for u, status in net_log_requests(log) if u.startswith(url)]
    assert (url + "api/model", 200) in requests, requests  # the log does see the page's requests
    assert not [u for u, _ in requests if u.endswith("/favicon.ico")], requests
    assert all(status == 200 for _, status in requests), requests
