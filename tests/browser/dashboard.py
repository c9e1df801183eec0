#!/usr/bin/env python3
"""Loads the controller's web dashboard in real headless Chromium (Debian's `chromium`, driven
by Playwright for Python) and checks what a person would see: the topology graph shows every
expected edge caller->callee with traffic on it, the services table, the proxies with their
certificate expiry, and recent traces. Saves a screenshot.

Run by tests/tests/dashboard.rs against a `ferrule dev up` mesh with traffic:

    python3 tests/browser/dashboard.py --url http://127.0.0.1:9990/ \
        --edge gateway:order --edge order:user --edge order:payment \
        --screenshot target/test-artifacts/dashboard.png

Exit status 0 when everything was seen, 1 when something was not (the reason on stderr), 2
when Chromium or Playwright is missing (`make deps` installs both).
"""

import argparse
import json
import os
import re
import sys
import tempfile

CHROMIUM = os.environ.get("FERRULE_CHROMIUM", "/usr/bin/chromium")
# Flags that keep Chromium off the network and out of the way of a shared machine.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the dashboard, e.g. http://127.0.0.1:9990/")
    parser.add_argument("--edge", action="append", default=[], metavar="CALLER:CALLEE",
                        help="an edge the graph must show with traffic (repeatable)")
    parser.add_argument("--screenshot", required=True, help="where to save the PNG")
    parser.add_argument("--expect-certificates", action="store_true",
                        help="the proxies have identity: their certificate expiry must show")
    parser.add_argument("--timeout", type=float, default=40.0,
                        help="seconds to wait for the page to show everything")
    args = parser.parse_args()

    try:
        from playwright.sync_api import sync_playwright, Error as PlaywrightError
    except ImportError:
        print("the Python package playwright is missing: `make deps` installs it "
              "(pip install playwright)", file=sys.stderr)
        return 2
    if not os.access(CHROMIUM, os.X_OK):
        print(f"{CHROMIUM} is missing: `make deps` installs Debian's chromium", file=sys.stderr)
        return 2

    edges = [tuple(e.split(":", 1)) for e in args.edge]
    timeout_ms = args.timeout * 1000
    with tempfile.TemporaryDirectory(prefix="ferrule-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        page = None
        try:
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(args.url, wait_until="load", timeout=timeout_ms)
            # Every expected edge drawn with traffic measured on it (the rates need two
            # scrapes, so the first draw may show the edge at 0 rps).
            page.wait_for_function(
                """edges => edges.every(([caller, callee]) => {
                    const g = document.querySelector(
                        `#topology g.edge[data-caller="${caller}"][data-callee="${callee}"]`);
                    return g && Number(g.dataset.rps) > 0 && g.dataset.successRate !== "";
                })""",
                arg=edges,
                timeout=timeout_ms,
                polling=250,
            )
            # Traces arrive in batches; the list fills in within a poll or two.
            page.wait_for_selector("#traces tbody tr[data-trace]", timeout=timeout_ms)
            seen = page.evaluate("""() => ({
                edges: [...document.querySelectorAll('#topology g.edge')].map(g => ({
                    caller: g.dataset.caller, callee: g.dataset.callee,
                    rps: Number(g.dataset.rps), success_rate: Number(g.dataset.successRate),
                    label: g.querySelector('text').textContent })),
                nodes: [...document.querySelectorAll('#topology g.node')].map(g => g.dataset.service),
                services: [...document.querySelectorAll('#services tbody tr')].map(r => r.dataset.service),
                proxies: [...document.querySelectorAll('#proxies tbody tr')].map(r =>
                    [...r.cells].map(c => c.textContent)),
                traces: document.querySelectorAll('#traces tbody tr').length,
                config: document.getElementById('config-version').textContent,
            })""")
            # Click the newest trace: its waterfall is drawn.
            page.click("#traces tbody tr[data-trace]")
            page.wait_for_selector("#waterfall .bar span", timeout=timeout_ms)
            os.makedirs(os.path.dirname(os.path.abspath(args.screenshot)), exist_ok=True)
            page.screenshot(path=args.screenshot, full_page=True)
        except PlaywrightError as e:
            if page is not None:
                try:
                    page.screenshot(path=args.screenshot, full_page=True)
                    print(f"screenshot of the failure: {args.screenshot}", file=sys.stderr)
                except PlaywrightError:
                    pass
            print(f"the dashboard did not show what was expected: {e}", file=sys.stderr)
            return 1
        finally:
            context.close()

    problems = []
    for caller, callee in edges:
        if not any(e["caller"] == caller and e["callee"] == callee for e in seen["edges"]):
            problems.append(f"no edge {caller} -> {callee}")
    for service in {s for edge in edges for s in edge}:
        if service not in seen["nodes"]:
            problems.append(f"no node {service}")
    if not seen["proxies"]:
        problems.append("no proxy listed")
    # The certificate column: "23h 59m" (or "59m") for a proxy with identity.
    if args.expect_certificates and not any(
            re.fullmatch(r"(\d+h )?\d+m", row[-1]) for row in seen["proxies"]):
        problems.append(f"no proxy shows its certificate expiry: {seen['proxies']}")
    if errors:
        problems.append(f"JavaScript errors: {errors}")
    print(json.dumps({"seen": seen, "screenshot": os.path.abspath(args.screenshot)}))
    if problems:
        print("; ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
