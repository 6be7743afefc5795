"""The documents point at what exists: every relative link and image in README.md and
docs/*.md resolves to a file of the repository (anchors within a page are not checked)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def targets(page: Path) -> list[str]:
    """The relative targets of the page's markdown links and images, code spans left out."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    found = [m.group(1) for m in LINK.finditer(text)]
    return [t for t in found if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    missing = [t for t in targets(page) if not (page.parent / t.split("#")[0]).exists()]
    assert missing == [], f"{page.relative_to(ROOT)}: {missing}"


def test_the_link_finder_finds_links_and_images(tmp_path):
    """The check itself sees a broken image and a broken link (as docs/ had before)."""
    page = tmp_path / "page.md"
    page.write_text("![curves](docs/curves.png) and [the data](data.md#sources), `[not](code.md)`, [web](https://x.org)\n")
    assert targets(page) == ["docs/curves.png", "data.md#sources"]


def ci_lines() -> list[str]:
    """The README lines .ci/run runs, extracted as .ci/run extracts them."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- ci -->\n```bash\n(.*?)```", text, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_set_up_and_both_test_tiers_and_nothing_of_its_own():
    lines = ci_lines()
    assert lines[0] == "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"
    assert ".venv/bin/pip install -r requirements-test.txt" in lines
    assert lines[-2:] == ['.venv/bin/python -m pytest -q -n auto -m "not slow"', ".venv/bin/python -m pytest -q -n auto -m slow"]
    script = (ROOT / ".ci" / "run").read_text()
    assert 'blocks = re.findall(r"<!-- ci -->\\n```bash\\n(.*?)```", text, flags=re.S)' in script
    commands = [line for line in script.splitlines() if re.search(r"\b(pip|pytest|apt-get|venv)\b", line) and not line.lstrip().startswith("#")]
    assert commands == [], commands


def test_every_package_the_test_tiers_import_is_pinned_in_a_file_the_readme_installs():
    pinned = {}
    for name in ("requirements.txt", "requirements-demo.txt", "requirements-test.txt"):
        for line in (ROOT / name).read_text().splitlines():
            if "==" in line and not line.startswith("#"):
                package, version = line.split("==")
                pinned[package.strip().lower().replace("_", "-")] = version.strip()
    for package in ("torch", "playwright", "pytest", "pytest-xdist", "hypothesis", "starlette", "uvicorn", "jax", "flax", "optax"):
        assert package in pinned, package
