"""Opens the built documentation site in headless Chromium and checks what a reader sees.

`.ci/run` installs Debian's chromium; the screenshots land in test-artifacts/ (a CI artefact).
"""

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "test-artifacts")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)"),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        ["mkdocs", "build", "--strict", "-q", "-f", "website/mkdocs.yml", "-d", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _chromium(args, tmp_path):
    profile = tmp_path / "profile"
    result = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _open(page, tmp_path, screenshot_name):
    url = page.as_uri()
    dom = _chromium(["--dump-dom", url], tmp_path)
    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, screenshot_name)
    _chromium([f"--screenshot={shot}", "--window-size=1280,900", url], tmp_path)
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", "the screenshot is not a PNG"
    return dom


def test_front_page_title_and_navigation(site, tmp_path):
    dom = _open(site / "index.html", tmp_path, "website-front.png")
    assert re.search(r"<title>\s*opacus\s*</title>", dom)
    nav = re.findall(r'class="nav-link[^"]*"[^>]*>\s*([^<]+?)\s*<', dom)
    for item in ("Home", "Getting started", "Guides", "FAQ", "Changelog", "API reference"):
        assert item in nav, (item, nav)


def test_api_page_renders_its_anchors(site, tmp_path):
    page = site / "api" / "opacus.privacy_engine" / "index.html"
    dom = _open(page, tmp_path, "website-api-privacy-engine.png")
    ids = set(re.findall(r'id="([^"]+)"', dom))
    assert "class-privacyengine" in ids, sorted(ids)[:40]
    assert "make_private" in dom and "make_private_with_epsilon" in dom
    assert re.search(r"<title>[^<]*privacy_engine[^<]*</title>", dom)
