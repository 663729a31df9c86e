"""Look at a report page the way a reader does: headless Chromium loads it, and the test reads
back what the browser saw (each image's natural size, the tables) and a screenshot.

No driver or extra package: a copy of the page, beside it so relative image paths resolve,
gets a script that writes what it finds into the DOM once the page has loaded, and
``--dump-dom`` prints that DOM.
"""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    return {src: img.getAttribute("src"), complete: img.complete,
            width: img.naturalWidth, height: img.naturalHeight};
  });
  var tables = Array.prototype.map.call(document.querySelectorAll("table"), function (t) {
    return {id: t.id, rows: t.rows.length};
  });
  var out = document.createElement("pre");
  out.id = "browser-probe";
  out.textContent = JSON.stringify({title: document.title, images: images, tables: tables});
  document.body.appendChild(out);
});
</script>"""
_RESULT = re.compile(r'<pre id="browser-probe">(.*?)</pre>', re.S)


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


def _run(browser: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    # --no-sandbox: CI and this machine run the tests as root, where Chromium's sandbox refuses
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--allow-file-access-from-files", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=timeout)


def render(page: Path, screenshot: Path | None = None, timeout: float = 120) -> dict:
    """What Chromium saw on ``page``: {"title", "images": [{src, complete, width, height}],
    "tables": [{id, rows}]}; with ``screenshot``, also a full-width PNG of the page."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no Chromium on the PATH")
    page = Path(page).resolve()
    probe = page.with_name(f".{page.stem}.probe.html")
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    try:
        result = _run(browser, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri(),
                      timeout=timeout)
    finally:
        probe.unlink()
    found = _RESULT.search(result.stdout)
    if found is None:
        raise AssertionError(f"Chromium did not run the probe on {page} (exit {result.returncode}):\n"
                             f"{result.stderr[-2000:]}")
    if screenshot is not None:
        _run(browser, f"--screenshot={screenshot}", "--window-size=1400,2400",
             "--virtual-time-budget=10000", page.as_uri(), timeout=timeout)
    return json.loads(html.unescape(found.group(1)))
