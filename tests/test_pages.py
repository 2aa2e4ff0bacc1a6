"""The built book as a reader's browser shows it: headless Chromium over a smoke-profile build.

Every chapter page loads with its figures, tables and rendered equations and without error
output; the results page lists every chapter; every link in the navigation resolves.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from bookrun.chapters import CHAPTERS

pytestmark = pytest.mark.slow  # real models, the smoke book or subprocesses


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium for this test")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


@pytest.fixture(scope="module")
def site(smoke_book, tmp_path_factory):
    return smoke_book / "site" / "_build" / "html", chromium(), tmp_path_factory.mktemp("chromium")


def rendered(site, page: str) -> str:
    """The page's DOM after its scripts ran (MathJax included), as Chromium serialises it."""
    html, browser, profile = site
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            (html / page).as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.nav_depth = 0
        self.nav_links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "nav":
            self.nav_depth += 1
        if tag == "a" and self.nav_depth and attrs.get("href"):
            self.nav_links.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "nav" and self.nav_depth:
            self.nav_depth -= 1


@pytest.mark.parametrize("key", list(CHAPTERS))
def test_chapter_page_shows_figures_tables_and_math_without_errors(site, key):
    dom = rendered(site, f"book/{CHAPTERS[key].stem}.html")
    assert len(re.findall(r'<img[^>]+src="[^"]*\.png"', dom)) >= 1, "no figure"
    assert "<table" in dom, "no results table"
    assert "MathJax" in dom and 'class="math' in dom, "equations not rendered"
    assert "Provenance of this page" in dom and "profile</strong> <code" in dom.replace("\n", " ")
    for sign in ("Traceback", "output stderr", "Error:", "Warning:"):
        assert sign not in dom, f"{sign!r} shown on the page"


def test_results_page_has_a_row_per_chapter_and_verdicts(site):
    dom = rendered(site, "book/results.html")
    for chapter in CHAPTERS.values():
        assert f"{chapter.stem}.html" in dom
    assert len(re.findall(r"<strong>(reproduced|not reproduced|inconclusive)</strong>", dom)) >= len(CHAPTERS)


def test_navigation_links_and_notebook_downloads_resolve(site):
    html = site[0]
    for page in ["book/intro.html", *[f"book/{c.stem}.html" for c in CHAPTERS.values()]]:
        parser = Links()
        parser.feed((html / page).read_text())
        assert parser.nav_links, f"{page} has no navigation"
        for href in parser.nav_links:
            target = href.split("#")[0]
            if not target or target.startswith(("http:", "https:", "mailto:")):
                continue
            assert ((html / page).parent / target).resolve().is_file(), f"{page}: {href} is broken"
    for chapter in CHAPTERS.values():
        assert (html / "notebooks" / f"{chapter.stem}.ipynb").is_file()
        assert f"../notebooks/{chapter.stem}.ipynb" in (html / "book" / f"{chapter.stem}.html").read_text()
