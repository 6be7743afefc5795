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
