"""`make bench`, the console's part: time to first byte and weight of `GET /` with many leads.

For each size a state file is filled by one real `run --once` cycle against the sandbox (the
leads of bench.py: spread over 14 days, none expired); then `referral-watch run` serves the
console (sign_in = "none" on loopback) in its own process and this one asks for `/` over a raw
socket, several times: ttfb is from sending the request to the first byte of the answer, total
to its last byte, KiB the whole response. The page shows 200 leads at a time, so its weight
stays the same however many wait; so does /api/leads's (500 leads per answer), while
/api/leads?all=1 streams every lead.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from receiver import Sink

from referral_watch.sandbox.server import Sandbox

SIZES = (2_000, 20_000)
TARGET_SIZE = 2_000
TTFB_MS = 300.0
PAGE_KIB = 1024.0
API_SIZE = 20_000  # /api/leads's first page (500 leads) is judged here
API_TOTAL_MS = 100.0
API_KB = 300.0
TRIES = 7

EXTRA = """
[schedule]
interval = "1h"
jitter = "0s"

[server]
listen = "127.0.0.1:{port}"

[console]
sign_in = "none"
"""


@dataclass
class PageFigures:
    size: int
    path: str
    ttfb_ms: float
    total_ms: float
    kib: float
    status: int


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fetch(port: int, path: str) -> tuple[float, float, bytes]:
    """(seconds to the first byte, seconds to the last, the response) for one GET."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        sent = time.perf_counter()
        sock.sendall(request.encode())
        first = sock.recv(65536)
        ttfb = time.perf_counter() - sent
        chunks = [first]
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return ttfb, time.perf_counter() - sent, b"".join(chunks)


def _wait_for(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit("the console's daemon ended early")
        try:
            _, _, answer = fetch(port, "/healthz")
            if answer.startswith(b"HTTP/1.1 200"):
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit("the console's daemon did not answer /healthz within 2 minutes")


def measure(size: int, config_text: str, base_url: str, work: Path) -> list[PageFigures]:
    port = _free_port()
    config = work / "referral-watch.toml"
    config.write_text(config_text.format(base_url=base_url) + EXTRA.format(port=port))
    env = {**os.environ}
    once = subprocess.run(
        [sys.executable, "-m", "referral_watch", "--config", str(config), "run", "--once"],
        env=env,
        capture_output=True,
        check=False,
    )
    if once.returncode != 0:
        sys.exit(f"filling the state with {size} leads failed: {once.stderr.decode()[-500:]}")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "referral_watch", "--config", str(config), "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(port, daemon)
        rows = []
        for path in ("/", "/?page=2", "/api/leads", "/api/leads?all=1"):
            fetch(port, path)  # warm: templates compiled, catalogs read
            tries = [fetch(port, path) for _ in range(TRIES)]
            answer = tries[-1][2]
            rows.append(
                PageFigures(
                    size=size,
                    path=path,
                    ttfb_ms=statistics.median(t[0] for t in tries) * 1000,
                    total_ms=statistics.median(t[1] for t in tries) * 1000,
                    kib=len(answer) / 1024,
                    status=int(answer.split(b" ", 2)[1]),
                )
            )
        return rows
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


def run(config_template: str, token_env: str, token: str, leads: object) -> list[PageFigures]:
    """Every size; ``config_template`` is bench.py's config (with {base_url}, {state}, ...)."""
    rows: list[PageFigures] = []
    os.environ[token_env] = token
    for size in SIZES:
        print(f"... console with {size:,} leads", file=sys.stderr, flush=True)
        now = datetime.now(UTC)
        with (
            tempfile.TemporaryDirectory(prefix="rw-bench-console-") as tmp,
            Sandbox(leads(size, now), token=token) as api,  # type: ignore[operator]
            Sink() as team,
            Sink() as managers,
        ):
            work = Path(tmp)
            text = (
                config_template.replace("{token_env}", token_env)
                .replace("{state}", str(work / "state.db"))
                .replace("{team}", team.url)
                .replace("{managers}", managers.url)
            )
            rows.extend(measure(size, text, api.base_url, work))
    return rows


def table(rows: list[PageFigures]) -> str:
    head = (
        f"| {'leads':>6} | {'path':<16} | {'status':>6} | {'ttfb ms':>7} "
        f"| {'total ms':>8} | {'KiB':>7} |"
    )
    rule = "|" + "|".join("-" * len(part) for part in head.split("|")[1:-1]) + "|"
    lines = [head, rule]
    for r in rows:
        lines.append(
            f"| {r.size:>6} | {r.path:<16} | {r.status:>6} | {r.ttfb_ms:>7.1f} "
            f"| {r.total_ms:>8.1f} | {r.kib:>7.1f} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[PageFigures]) -> list[tuple[bool, str]]:
    checks: list[tuple[bool, str]] = []
    index = {r.size: r for r in rows if r.path == "/"}
    if TARGET_SIZE in index:
        r = index[TARGET_SIZE]
        checks.append(
            (
                r.ttfb_ms < TTFB_MS,
                f"console / ttfb {r.ttfb_ms:.0f} ms < {TTFB_MS:.0f} ms at {TARGET_SIZE:,} leads",
            )
        )
        checks.append(
            (
                r.kib < PAGE_KIB,
                f"console / weighs {r.kib:.0f} KiB < {PAGE_KIB:.0f} KiB at {TARGET_SIZE:,} leads",
            )
        )
    if len(index) > 1:
        small, large = index[min(index)], index[max(index)]
        checks.append(
            (
                large.kib <= small.kib * 1.2,
                f"console / stays bounded: {large.kib:.0f} KiB at {large.size:,} leads "
                f"(paged), {small.kib:.0f} KiB at {small.size:,}",
            )
        )
    api = next((r for r in rows if r.path == "/api/leads" and r.size == API_SIZE), None)
    if api is not None:
        checks.append(
            (
                api.total_ms <= API_TOTAL_MS and api.kib * 1024 <= API_KB * 1000,
                f"/api/leads first page at {API_SIZE:,} leads: {api.total_ms:.0f} ms "
                f"<= {API_TOTAL_MS:.0f} ms, {api.kib * 1.024:.0f} KB <= {API_KB:.0f} KB",
            )
        )
    checks += [
        (r.status == 200, f"{r.path} at {r.size:,}: HTTP {r.status}")
        for r in rows
        if r.status != 200
    ]
    return checks
