"""A real browser for the tests: Debian's headless Chromium driven over the DevTools protocol (python3-websocket).

    with Browser() as b:
        b.open("file:///tmp/report.html")
        b.js("document.title")
        b.click("#confusion-0 td.cell")      # a mouse press and release at the element's centre
        b.screenshot("report.png")
"""
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import websocket

CHROMIUM = "/usr/bin/chromium"


def _read(path):
    """The file's text, or "" while it does not exist yet."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _group_alive(group):
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


class Browser:
    def __init__(self, width=1280, height=900, timeout=60):
        if not os.path.exists(CHROMIUM):
            raise RuntimeError(f"{CHROMIUM} is missing: scripts/setup.sh installs Debian's chromium")
        self.profile = tempfile.mkdtemp(prefix="loratune_chromium_")
        scratch = os.path.join(self.profile, "tmp")  # Chromium's own temporary files (singleton sockets) go here too
        os.mkdir(scratch)
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TMPDIR": scratch},
            start_new_session=True)  # its own process group
        self.timeout = timeout
        self.dialogs = []  # alert/confirm/prompt a page opened: a test of hostile names expects none
        self.console_errors = []
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.time() + timeout
        while not _read(port_file).strip():
            if time.time() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        port = int(_read(port_file).split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events = []
        for domain in ("Page", "Runtime"):
            self.call(domain + ".enable")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if getattr(self, "ws", None):
            self.ws.close()
        # Chromium's helper processes (zygote, renderer, GPU) write into the profile too: stop them all first.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        deadline = time.time() + 3
        while time.time() < deadline and _group_alive(self.process.pid):
            time.sleep(0.05)
        shutil.rmtree(self.profile, ignore_errors=True)

    def _event(self, message):
        method = message.get("method")
        if method == "Page.javascriptDialogOpening":
            self.dialogs.append(message["params"].get("message"))
            self.call("Page.handleJavaScriptDialog", accept=True)
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(json.dumps(message["params"]["exceptionDetails"])[:500])
        self.events.append(method)

    def call(self, method, **params):
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == my_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self._event(message)

    def wait_for(self, event):
        deadline = time.time() + self.timeout
        while event not in self.events:
            if time.time() > deadline:
                raise TimeoutError(event)
            message = json.loads(self.ws.recv())
            if "method" in message:
                self._event(message)

    def open(self, url):
        """Loads `url` and waits for its load event; returns the seconds it took."""
        self.events.clear()
        start = time.time()
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")
        return time.time() - start

    def js(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector):
        box = self.js(f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            if (!e) return null; e.scrollIntoView({{block: "center"}}); const r = e.getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2]; }})()""")
        if box is None:
            raise LookupError(selector)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def screenshot(self, path, full_page=True):
        if full_page:
            height = min(int(self.js("document.documentElement.scrollHeight")), 12000)
            self.call("Emulation.setDeviceMetricsOverride", width=1280, height=height, deviceScaleFactor=1, mobile=False)
        data = self.call("Page.captureScreenshot", format="png")["data"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
