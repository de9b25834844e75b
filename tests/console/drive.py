#!/usr/bin/env python3
"""Drives berth's web console in headless Chromium the way a person would, and saves a
screenshot after each step.

It speaks the Chrome DevTools Protocol over a pipe (--remote-debugging-pipe: JSON messages
ended by NUL on file descriptors 3 and 4), so it needs nothing beyond Python's standard library.
Clicks are mouse events at the element's centre and typing is text input, not DOM calls.

Chromium trusts the masters' certificates only by the cluster CA's public key
(--ignore-certificate-errors-spki-list): a certificate from any other issuer is still refused.

Steps: a wrong token is refused with its message; the right one logs in; the overview shows the
masters and a leader; the nodes page shows every node ready; the service is scaled from its page
and the page shows it running at the new size; a task's live log shows lines; a node is drained
(the button asks to confirm); the events page shows events. Prints one JSON line with what it saw. On a failure it saves failed-<step>.png and
the page's text, and exits 1.

usage: drive.py --url URL --token TOKEN --ca CA_PEM --service NS/NAME --replicas N --nodes N
                --masters N --out DIR [--chromium PATH] [--log-text TEXT] [--drain NODE]
"""

import argparse
import base64
import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

STEP_TIMEOUT = 60.0


def tlv(der, pos):
    """The DER element at pos: (tag, start of its content, end of its content)."""
    tag = der[pos]
    length = der[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(der[pos:pos + n], "big")
        pos += n
    return tag, pos, pos + length


def spki_sha256(pem_text):
    """Base64 SHA-256 of the first certificate's SubjectPublicKeyInfo (what Chromium pins)."""
    body = pem_text.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
    der = base64.b64decode("".join(body.split()))
    _, cert, _ = tlv(der, 0)
    _, tbs, _ = tlv(der, cert)
    pos = tbs
    tag, _, end = tlv(der, pos)
    if tag == 0xA0:  # explicit version
        pos = end
    for _ in range(5):  # serial, signature algorithm, issuer, validity, subject
        _, _, end = tlv(der, pos)
        pos = end
    _, _, end = tlv(der, pos)
    return base64.b64encode(hashlib.sha256(der[pos:end]).digest()).decode()


class Failed(Exception):
    pass


class Browser:
    def __init__(self, binary, ca_pem, profile):
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()
        args = [
            binary,
            "--headless=new",
            "--no-sandbox",  # root in CI: Chromium's sandbox refuses to run as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--user-data-dir=" + profile,
            "--ignore-certificate-errors-spki-list=" + spki_sha256(ca_pem),
            "--window-size=1366,900",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        # fd 3: what Chromium reads; fd 4: what it writes.
        shell = 'exec "$@" 3<&%d 4>&%d' % (to_chrome_r, from_chrome_w)
        self.proc = subprocess.Popen(
            ["sh", "-c", shell, "sh"] + args,
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(profile, "chromium.log"), "wb"),
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buf = b""
        self.next_id = 0
        self.session = None
        self.console = []  # the page's console messages and exceptions, for a failure report
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": 1366, "height": 900, "deviceScaleFactor": 1, "mobile": False})

    def read(self, deadline):
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed("Chromium did not answer in time")
            ready, _, _ = select.select([self.from_chrome], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.from_chrome, 1 << 20)
            if not chunk:
                raise Failed("Chromium exited (exit code %s)" % self.proc.poll())
            self.buf += chunk
        msg, _, self.buf = self.buf.partition(b"\0")
        return json.loads(msg)

    def send(self, method, params=None, timeout=30.0):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self.read(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise Failed("%s: %s" % (method, m["error"].get("message")))
                return m.get("result", {})
            if m.get("method") == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in m["params"]["args"]))
            elif m.get("method") == "Runtime.exceptionThrown":
                d = m["params"]["exceptionDetails"]
                self.console.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))

    def eval(self, expr):
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise Failed("evaluating %s: %s" % (expr, r["exceptionDetails"].get("text")))
        return r["result"].get("value")

    def wait(self, what, expr, timeout=STEP_TIMEOUT):
        """Polls expr in the page until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.eval(expr)
            if v:
                return v
            if time.monotonic() > deadline:
                raise Failed("waited %.0fs for %s" % (timeout, what))
            time.sleep(0.2)

    def box(self, selector):
        expr = """(() => { const e = document.querySelector(%s); if (!e) return null;
            e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2]; })()""" % json.dumps(selector)
        return self.wait("element " + selector, expr)

    def click(self, selector):
        x, y = self.box(selector)
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1})

    def type(self, selector, text):
        self.click(selector)
        self.eval("document.querySelector(%s).select()" % json.dumps(selector))
        self.send("Input.insertText", {"text": text})

    def shot(self, path):
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def default_chromium():
    """Debian's chromium binary itself: its /usr/bin/chromium launcher script (and the snippets
    it sources from /etc/chromium.d) leave the DevTools pipe unanswered."""
    real = "/usr/lib/chromium/chromium"
    if os.access(real, os.X_OK):
        return real
    return shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"


def testid(name, extra=""):
    return "[data-testid=%s]%s" % (name, extra)


def count(name):
    return "document.querySelectorAll(%s).length" % json.dumps(testid(name))


def text(name):
    return "((document.querySelector(%s) || {}).textContent || '')" % json.dumps(testid(name))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--ca", required=True, help="the cluster CA certificate (PEM file)")
    p.add_argument("--service", required=True, help="NAMESPACE/NAME")
    p.add_argument("--replicas", type=int, required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--masters", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--log-text", default="", help="text a line of the task's log contains")
    p.add_argument("--drain", default="", help="a node to drain from the nodes page")
    p.add_argument("--chromium", default=default_chromium())
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    ns, name = a.service.split("/", 1)
    with open(a.ca) as f:
        ca_pem = f.read()
    profile = tempfile.mkdtemp(prefix="berth-console-chromium-")
    b = Browser(a.chromium, ca_pem, profile)
    step = "start"
    seen = {"screenshots": []}

    def shot(n):
        path = os.path.join(a.out, n + ".png")
        b.shot(path)
        seen["screenshots"].append(path)

    try:
        step = "login-page"
        b.send("Page.navigate", {"url": a.url})
        b.wait("the login form", count("login-token"))
        shot("01-login")

        step = "wrong-token"
        b.type(testid("login-token"), "BERTHC-1-aaaaaaaa." + "b" * 32)
        b.click(testid("login-submit"))
        refused = b.wait("the refusal of a wrong token", text("login-error"))
        if "unknown or wrong console token" not in refused:
            raise Failed("a wrong token was refused with %r" % refused)
        seen["refused"] = refused
        shot("02-login-refused")

        step = "login"
        b.type(testid("login-token"), a.token)
        b.click(testid("login-submit"))
        b.wait("%d masters on the overview" % a.masters, "%s === %d" % (count("member-row"), a.masters))
        seen["leader"] = b.wait("a leader", "(t => t.startsWith('master ') && t)(%s)" % text("leader"))
        seen["health"] = b.wait("the cluster healthy", "(t => t === 'healthy' && t)(%s)" % text("health"))
        seen["whoami"] = b.eval(text("whoami"))
        shot("03-overview")

        step = "nodes"
        b.click("#nav a[data-view=nodes]")
        b.wait("%d nodes, every one ready" % a.nodes,
               "%s === %d && [...document.querySelectorAll('[data-testid=node-status]')]"
               ".every(e => e.textContent.startsWith('ready'))" % (count("node-row"), a.nodes))
        seen["nodes"] = b.eval(count("node-row"))
        shot("04-nodes")

        step = "service"
        b.click("#nav a[data-view=services]")
        row = "[data-testid=service-row][data-service=%s] a" % json.dumps(ns + "/" + name)
        b.click(row)
        b.wait("the service's page", "%s !== '' && %s !== '-'" % (text("svc-desired"), text("svc-desired")))
        seen["replicas_before"] = int(b.eval(text("svc-desired")))

        step = "scale"
        b.type(testid("scale-input"), str(a.replicas))
        b.click(testid("scale-submit"))
        b.wait("the page to show %d desired" % a.replicas, "%s === '%d'" % (text("svc-desired"), a.replicas))
        b.wait("%d tasks running" % a.replicas,
               "%s === '%d' && document.querySelectorAll('[data-testid=task-row]').length >= %d"
               % (text("svc-running"), a.replicas, a.replicas))
        seen["scaled_to"] = a.replicas
        shot("05-scaled")

        step = "logs"
        b.click(testid("task-logs"))
        want = json.dumps(a.log_text)
        b.wait("log lines" + (" with %r" % a.log_text if a.log_text else ""),
               "(t => t.length > 0 && t.includes(%s))(%s)" % (want, text("log-lines")))
        b.wait("the log stream live", "%s === 'live'" % text("log-status"))
        seen["log_lines"] = b.eval("(%s).split('\\n').filter(Boolean).length" % text("log-lines"))
        shot("06-logs")

        if a.drain:
            step = "drain"
            b.click("#nav a[data-view=nodes]")
            drain = "[data-testid=node-row][data-node=%s] [data-testid=node-drain]" % json.dumps(a.drain)
            b.click(drain)  # asks to confirm
            b.wait("the drain button to ask for confirmation",
                   "(document.querySelector(%s) || {}).textContent === %s" % (json.dumps(drain), json.dumps("Drain %s?" % a.drain)))
            b.click(drain)
            b.wait("%s draining" % a.drain,
                   "((document.querySelector(%s) || {}).textContent || '').startsWith('drain')"
                   % json.dumps("[data-testid=node-row][data-node=%s] [data-testid=node-availability]" % json.dumps(a.drain)))
            seen["drained"] = a.drain
            shot("07-drained")

        step = "events"
        b.click("#nav a[data-view=events]")
        b.wait("events", "%s > 0" % count("event-row"))
        seen["events"] = b.eval(count("event-row"))
        shot("08-events")
    except Failed as e:
        try:
            b.shot(os.path.join(a.out, "failed-%s.png" % step))
            page = b.eval("document.body ? document.body.innerText : ''") or ""
        except Failed:
            page = "(unreadable)"
        b.close()
        print("console test failed at step %s: %s\n--- page text ---\n%s\n--- console ---\n%s"
              % (step, e, page[:3000], "\n".join(b.console[-30:])), file=sys.stderr)
        return 1
    b.close()
    shutil.rmtree(profile, ignore_errors=True)
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
