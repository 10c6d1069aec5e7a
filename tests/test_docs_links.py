"""Every relative link in README.md, docs/ and the results index points at a file that exists
(claims link to their results; a moved file must not leave a dead link)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "results" / "README.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    dead = [t for t in links if "://" not in t and not (page.parent / t).exists()]
    assert not dead, f"{page.name}: dead links {dead}"
