#!/usr/bin/env python
"""Open every page of the built site in headless Chromium and check it, with nothing but the stdlib.

    python scripts/check_site.py site/                        # check every *.html page
    python scripts/check_site.py site/ --screenshot shot.png  # also save a screenshot of the first notebook page

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: commands on
fd 3, replies on fd 4, each message JSON terminated by a NUL byte), so no websocket library, driver or
browser download is needed; Debian's ``chromium`` package is enough. For each page it records

* uncaught exceptions (``Runtime.exceptionThrown``), ``console.error`` calls and browser log errors
  (e.g. a script that failed to load);
* every network request whose URL is not ``file:``/``data:``/``blob:``/``about:`` — an offline site makes none;
* how many plotly figure divs (``.lorax-plotly``) exist and how many were drawn (``.js-plotly-plot`` with a
  ``.main-svg`` inside), after waiting for the drawing to finish;
* how many MathML ``<math>`` elements have a non-zero rendered size.

Exit status 1 if any page has an error, a network request or an undrawn figure.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
LAUNCH_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--hide-scrollbars",
)
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome-error:")

# Evaluated in the page: figure and math counts.
PROBE_JS = """(() => {
  const figs = Array.from(document.querySelectorAll('.lorax-plotly'));
  const drawn = figs.filter(d => d.classList.contains('js-plotly-plot') && d.querySelector('.main-svg')
                                 && d._fullLayout && Array.isArray(d.data) && d.data.length > 0);
  const maths = Array.from(document.querySelectorAll('math'));
  const shown = maths.filter(m => { const r = m.getBoundingClientRect(); return r.width > 0 && r.height > 0; });
  return JSON.stringify({figures: figs.length, drawn: drawn.length,
                         main_svg: document.querySelectorAll('.js-plotly-plot .main-svg').length,
                         math: maths.length, math_shown: shown.length,
                         plotly: typeof window.Plotly === 'object' ? window.Plotly.version : null,
                         title: document.title, ready: document.readyState});
})()"""


def find_chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    env = os.environ.get("CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageResult:
    url: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # non-local requests
    figures: int = 0
    drawn: int = 0
    main_svg: int = 0
    math: int = 0
    math_shown: int = 0
    plotly: str | None = None
    title: str = ""

    @property
    def ok(self) -> bool:
        return not self.errors and not self.requests and self.drawn == self.figures


class Chromium:
    """A headless Chromium driven over ``--remote-debugging-pipe``."""

    def __init__(self, binary: str | None = None, width: int = 1200, height: int = 900, timeout: float = 60.0):
        self.binary = binary or find_chromium()
        if not self.binary:
            raise FileNotFoundError("no chromium binary found (apt-get install chromium)")
        self.timeout = timeout
        self.width, self.height = width, height
        self._next_id = 0
        self._buffer = b""
        self._events: list[dict] = []
        self._profile = tempfile.mkdtemp(prefix="lorax-chromium-")
        cmd_r, self._cmd_w = os.pipe()  # we write commands, chromium reads them on fd 3
        self._resp_r, resp_w = os.pipe()  # chromium writes replies on fd 4, we read them

        def _child_fds():  # runs in the child between fork and exec
            a, b = os.dup(cmd_r), os.dup(resp_w)  # move out of the way of 3 and 4 first
            os.dup2(a, 3)  # dup2 makes 3 and 4 inheritable; every other fd of ours is close-on-exec (PEP 446)
            os.dup2(b, 4)

        args = [self.binary, *LAUNCH_FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-pipe",
                f"--window-size={width},{height}", "about:blank"]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            close_fds=False, preexec_fn=_child_fds,  # close_fds would close 3 and 4 after preexec_fn
        )
        os.close(cmd_r)
        os.close(resp_w)
        self.session = self._attach()

    # -- protocol ------------------------------------------------------------------------------

    def _send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        return self._next_id

    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self._resp_r], [], [], left)
            if ready:
                chunk = os.read(self._resp_r, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace")[-2000:] if self.proc.poll() is not None else ""
                    raise RuntimeError(f"chromium closed the debugging pipe. {err}")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float | None = None) -> dict:
        """Send a command and wait for its reply; events that arrive meanwhile are queued."""
        msg_id = self._send(method, params, session)
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            msg = self._read_message(deadline)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self._events.append(msg)

    def wait_event(self, method: str, timeout: float | None = None) -> dict:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, ev in enumerate(self._events):
                if ev["method"] == method:
                    return self._events.pop(i)
            msg = self._read_message(deadline)
            if "method" in msg:
                self._events.append(msg)

    def _attach(self) -> str:
        targets = self.call("Target.getTargets")["targetInfos"]
        pages = [t for t in targets if t["type"] == "page"]
        target = pages[0]["targetId"] if pages else self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=session)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        return session

    # -- pages ---------------------------------------------------------------------------------

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=self.session)
        if "exceptionDetails" in res:
            raise RuntimeError(f"probe failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def check(self, path: Path, settle: float = 10.0) -> PageResult:
        """Load ``path``, wait for its figures, and report what happened."""
        self._events.clear()
        url = path.resolve().as_uri()
        self.call("Page.navigate", {"url": url}, session=self.session)
        self.wait_event("Page.loadEventFired")
        deadline = time.monotonic() + settle
        while True:  # plotly draws asynchronously: wait until every figure is drawn (or time runs out)
            probe = json.loads(self.evaluate(PROBE_JS))
            if probe["drawn"] >= probe["figures"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.call("Runtime.evaluate", {"expression": "0"}, session=self.session)  # flush pending events
        result = PageResult(url=url, **{k: probe[k] for k in ("figures", "drawn", "main_svg", "math", "math_shown", "plotly", "title")})
        for ev in self._events:
            method, params = ev["method"], ev.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text", "")
                result.errors.append(f"exception: {text.splitlines()[0] if text else details}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                result.errors.append(f"console.{params['type']}: {args}")
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                result.errors.append(f"log: {entry.get('text', '')} {entry.get('url', '')}".strip())
            elif method == "Network.requestWillBeSent":
                req_url = params.get("request", {}).get("url", "")
                if not req_url.startswith(LOCAL_SCHEMES):
                    result.requests.append(req_url)
        return result

    def screenshot(self, path: Path, target: Path) -> None:
        """Load ``path`` and save a PNG of the viewport to ``target``."""
        self.check(path)
        data = self.call("Page.captureScreenshot", {"format": "png"}, session=self.session)["data"]
        target.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self._send("Browser.close")
            self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - best effort, then kill our own process
            self.proc.kill()
            self.proc.wait()
        finally:
            for fd in (self._cmd_w, self._resp_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            if self.proc.stderr:
                self.proc.stderr.close()
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="folder with the built site")
    parser.add_argument("--screenshot", type=Path, help="save a PNG of the first notebook page here")
    parser.add_argument("--page", help="page to screenshot (default: the first notebook page)")
    args = parser.parse_args(argv)
    pages = sorted(args.site.glob("*.html"))
    if not pages:
        print(f"no pages in {args.site}", file=sys.stderr)
        return 1
    failed = 0
    with Chromium() as browser:
        for page in pages:
            res = browser.check(page)
            status = "ok " if res.ok else "BAD"
            failed += not res.ok
            print(f"{status} {page.name}: figures {res.drawn}/{res.figures} drawn, math {res.math_shown}/{res.math} shown, "
                  f"{len(res.errors)} errors, {len(res.requests)} network requests")
            for line in res.errors + [f"request: {u}" for u in res.requests]:
                print(f"      {line}")
        if args.screenshot:
            shot = args.site / args.page if args.page else next(p for p in pages if p.name != "index.html")
            browser.screenshot(shot, args.screenshot)
            print(f"screenshot of {shot.name} -> {args.screenshot}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
