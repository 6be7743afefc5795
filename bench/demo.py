"""How fast the draw-a-digit page answers, on whatever machine runs it.

  server_work    what the server does for one drawing, in-process: decode the PNG, the
                 MNIST recipe, the forward pass with every layer, the JSON encoding (ms)
  http           the same through the running server on loopback, one request after
                 another on one connection (ms)
  browser        with --browser: from the end of a stroke drawn by the mouse in Chromium
                 to the page showing its answer and maps (ms)

Median and 99th percentile over --requests drawings (MNIST test digits drawn dark on
white at 280x280, as the page's canvas sends them).

    python -m bench.demo [--json] [--requests 1000] [--browser]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import statistics
import time
from typing import Any

import jax
import numpy as np
from PIL import Image

from bench import common
from lenet_jax import demo, pretrained


def drawings(n: int) -> list[bytes]:
    ds = common.mnist()
    out = []
    for digit in ds.test_images[:n]:
        buffer = io.BytesIO()
        Image.fromarray(255 - digit).resize((280, 280), Image.Resampling.BILINEAR).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def summary(ms: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(ms), "p99": float(np.percentile(ms, 99)), "unit": "ms", "n": len(ms)}


def browser_latencies(url: str, strokes: int) -> list[float]:
    """Stroke end to answer shown, in Chromium (Playwright with Debian's browser)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1800, "height": 760})
        page.goto(url)
        page.wait_for_function("document.body.dataset.ready === '1'")
        box = page.locator("#pad").bounding_box()
        for k in range(strokes):
            page.click("#clear")
            x = 100 + 10 * (k % 8)
            page.mouse.move(box["x"] + x, box["y"] + 50)
            page.mouse.down()
            page.mouse.move(box["x"] + x + 30, box["y"] + 230, steps=6)
            page.mouse.up()
            page.wait_for_function(f"window.latencies.length > {k} && window.demoIdle()")
        latencies = page.evaluate("window.latencies")
        browser.close()
    return latencies


def measure(requests: int = 1000, browser: bool = False, strokes: int = 30) -> dict[str, Any]:
    params, config, _ = pretrained.load()
    reader = demo.DigitReader(params, config, "shipped")
    images = drawings(requests)
    work = []
    for data in images:
        t0 = time.perf_counter()
        json.dumps(reader.read(data))
        work.append(1000 * (time.perf_counter() - t0))
    results: dict[str, Any] = {"server_work": summary(work)}
    page = demo.Background(reader)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", page.port, timeout=60)
        loop = []
        for data in images:
            t0 = time.perf_counter()
            conn.request("POST", "/api/read", body=data)
            response = conn.getresponse()
            response.read()
            loop.append(1000 * (time.perf_counter() - t0))
            assert response.status == 200
        conn.close()
        results["http"] = summary(loop)
        if browser:
            results["browser"] = summary(browser_latencies(page.url, strokes))
    finally:
        page.stop()
    device = jax.devices()[0]
    return common.result(f"jax {jax.__version__}", jax.default_backend(), None if device.platform == "cpu" else device.device_kind,
                         {"requests": requests, "image": "280x280 PNG", "model": "shipped"}, results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--browser", action="store_true", help="also the stroke-to-answer time in Chromium (needs playwright)")
    parser.add_argument("--strokes", type=int, default=30, help="strokes drawn with --browser")
    args = parser.parse_args(argv)
    common.emit(measure(args.requests, args.browser, args.strokes), args.json)


if __name__ == "__main__":
    main()
