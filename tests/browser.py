"""Open a page in headless Chromium, as a person would, over the DevTools protocol.

Chromium talks the protocol over a pipe (`--remote-debugging-pipe`: it reads commands on file
descriptor 3 and writes replies and events on 4, each a JSON message ended by a NUL byte), so no
port, no websocket library and no download is needed: only Debian's `chromium` package. `visit`
loads a file, waits for its load event, collects console errors, uncaught exceptions and log
errors, evaluates a script in the page, and takes a full-page screenshot.

    python -m tests.browser report.html shot.png [WIDTH HEIGHT]   # a screenshot, as the README's
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
)


def chromium() -> str | None:
    """The Chromium binary, or None where it is not installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Visit:
    problems: list[str] = field(default_factory=list)  # console errors, exceptions, log errors
    value: object = None  # what the script evaluated to (JSON-serialisable)
    screenshot: bytes = b""  # PNG


class _Pipe:
    def __init__(self, write_fd: int, read_fd: int, deadline: float):
        self.write_fd, self.read_fd, self.deadline = write_fd, read_fd, deadline
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        while True:
            reply = self.receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            event = self.receive()
            if event.get("method") == method:
                return event
            self.events.append(event)

    def receive(self) -> dict:
        while b"\0" not in self.buffer:
            if time.monotonic() > self.deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)


def visit(path: Path, script: str = "null", *, width: int = 1280, height: int = 900,
          timeout: float = 60.0, full_page: bool = True) -> Visit:  # fmt: skip
    """Load `path` in headless Chromium; return what went wrong, `script`'s value, a screenshot."""
    binary = chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed")
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()
    with tempfile.TemporaryDirectory(prefix="omni-chromium-") as profile:

        def child_fds():  # the child reads commands on fd 3 and writes on fd 4
            read, write = (
                fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)
            )
            os.dup2(read, 3)
            os.dup2(write, 4)

        proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=child_fds,
            close_fds=False,  # our other descriptors are non-inheritable (PEP 446) and close anyway
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        pipe = _Pipe(to_browser_w, from_browser_r, time.monotonic() + timeout)
        try:
            return _drive(pipe, Path(path).resolve().as_uri(), script, width, height, full_page)
        finally:
            with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                pipe.send("Browser.close")
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(to_browser_w)
            os.close(from_browser_r)


def _drive(pipe: _Pipe, url: str, script: str, width: int, height: int, full_page: bool) -> Visit:
    target = pipe.send("Target.createTarget", url="about:blank")["targetId"]
    session = pipe.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
        pipe.send(f"{domain}.enable", session)
    pipe.send("Emulation.setDeviceMetricsOverride", session, width=width, height=height,
              deviceScaleFactor=1, mobile=False)  # fmt: skip
    pipe.events.clear()  # about:blank's own events
    pipe.send("Page.navigate", session, url=url)
    pipe.wait_for("Page.loadEventFired")
    result = pipe.send("Runtime.evaluate", session, expression=script, returnByValue=True)
    if "exceptionDetails" in result:
        raise RuntimeError(f"script failed: {result['exceptionDetails']}")
    shot = {"format": "png"}
    if full_page:
        size = pipe.send("Page.getLayoutMetrics", session)["cssContentSize"]
        shot["clip"] = {"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1}
        shot["captureBeyondViewport"] = True
    png = base64.b64decode(pipe.send("Page.captureScreenshot", session, **shot)["data"])
    return Visit(_problems(pipe.events), result["result"].get("value"), png)


def _problems(events: list[dict]) -> list[str]:
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            texts = [str(a.get("value", a.get("description", ""))) for a in params.get("args", [])]
            found.append("console: " + " ".join(texts))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            found.append("exception: " + str(details.get("exception", details).get("description")))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            found.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")
    return found


if __name__ == "__main__":
    page, out = Path(sys.argv[1]), Path(sys.argv[2])
    w, h = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (1200, 900)
    seen = visit(page, width=w, height=h, full_page=False)
    out.write_bytes(seen.screenshot)
    print(f"{out}: {len(seen.screenshot):,} bytes; problems: {seen.problems or 'none'}")
