"""Open a page written by the toolkit in headless Chromium (Debian's ``chromium``): a screenshot, and
what the browser made of every image and of the document.

    page = open_page(out / "index.html", screenshot=tmp / "shot.png")   # skips when no chromium (not in CI)
    assert page.images and all(img.natural_width > 0 for img in page.images)
    assert page.count("table") >= 1

The page is loaded from its folder (``file://``), with every host name unresolvable, so an image
the page would fetch from the network fails to load and shows up as ``natural_width == 0``. The
probe is a copy of the page beside it with one script appended; that script waits for the load
event and writes, into the DOM, each image's ``src``, ``complete`` and ``naturalWidth`` and the
number of elements per tag; ``--dump-dom`` hands the DOM back. The page itself is not changed.

Without a ``chromium`` binary the calling test is skipped with the reason, except in CI
(``CI=true``): CI installs chromium (``.ci/run``), so a missing browser there is a failure.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["BROWSERS", "Image", "Page", "find_browser", "open_page"]

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
_PROBE_ATTR = "data-kd-probe"
_PROBE = """
<script>
window.addEventListener("load", () => {
  const tags = {};
  for (const el of document.getElementsByTagName("*")) tags[el.tagName.toLowerCase()] = (tags[el.tagName.toLowerCase()] || 0) + 1;
  const images = [...document.images].map(i => ({src: i.getAttribute("src") || "", complete: i.complete,
                                                 naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}));
  document.documentElement.setAttribute("%s", JSON.stringify({images, tags, title: document.title}));
});
</script>
""" % _PROBE_ATTR
# Root in a container has no user namespace for the sandbox; every name resolves to nothing, so
# nothing is fetched from the network; no GPU, no first-run UI.
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
          "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND")


@dataclass(frozen=True)
class Image:
    src: str  # as written in the page (relative path or data: URI, shortened)
    complete: bool
    natural_width: int
    natural_height: int


@dataclass(frozen=True)
class Page:
    images: list[Image]
    tags: dict[str, int]  # element count per tag name, as the browser parsed the page
    title: str
    dom: str  # the serialised DOM after load (probe attribute included)
    screenshot: Path | None

    def count(self, tag: str) -> int:
        return self.tags.get(tag.lower(), 0)

    @property
    def broken(self) -> list[Image]:
        """Images the browser could not decode (missing file, network URL, bad data)."""
        return [i for i in self.images if not i.complete or i.natural_width == 0]


def find_browser() -> str | None:
    """The path of a Chromium binary, or None."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def _browser_or_skip() -> str:
    found = find_browser()
    if found:
        return found
    why = f"no headless browser on PATH (looked for {', '.join(BROWSERS)}); install Debian's `chromium`"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{why}: CI must have it (.ci/run installs it)")
    pytest.skip(why)


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def open_page(page: str | os.PathLike, *, screenshot: str | os.PathLike | None = None,
              window: tuple[int, int] = (1280, 2000), budget_ms: int = 5000, timeout: float = 90.0) -> Page:
    """Load ``page`` in headless Chromium; return its images and tag counts, and save a PNG
    screenshot at ``screenshot`` (the top ``window`` pixels) when given."""
    browser = _browser_or_skip()
    page = Path(page).resolve()
    probe = page.with_name(f".probe-{page.name}")
    text = page.read_text(encoding="utf-8")
    # The probe goes before </body> (or at the end): the copy loads the same relative files.
    cut = text.lower().rfind("</body>")
    probe.write_text(text[:cut] + _PROBE + text[cut:] if cut >= 0 else text + _PROBE, encoding="utf-8")
    try:
        done = _run([browser, *_FLAGS, f"--virtual-time-budget={budget_ms}", "--dump-dom", probe.as_uri()], timeout)
    finally:
        probe.unlink(missing_ok=True)
    found = re.search(f'{_PROBE_ATTR}="([^"]*)"', done.stdout)
    if not found:
        raise AssertionError(f"{browser} did not run the probe on {page} (exit {done.returncode}); "
                             f"stderr tail:\n{done.stderr[-2000:]}")
    result = json.loads(html.unescape(found.group(1)))
    shot = None
    if screenshot is not None:
        shot = Path(screenshot).resolve()
        shot.parent.mkdir(parents=True, exist_ok=True)
        took = _run([browser, *_FLAGS, f"--virtual-time-budget={budget_ms}", f"--window-size={window[0]},{window[1]}",
                     f"--screenshot={shot}", page.as_uri()], timeout)
        if not shot.is_file() or shot.stat().st_size == 0:
            raise AssertionError(f"{browser} wrote no screenshot of {page} (exit {took.returncode}); "
                                 f"stderr tail:\n{took.stderr[-2000:]}")
    images = [Image(src=i["src"][:120], complete=bool(i["complete"]), natural_width=int(i["naturalWidth"]),
                    natural_height=int(i["naturalHeight"])) for i in result["images"]]
    return Page(images=images, tags=dict(result["tags"]), title=result.get("title", ""), dom=done.stdout,
                screenshot=shot)
