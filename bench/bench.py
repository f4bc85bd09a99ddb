"""`make bench`: one poll cycle against the sandbox over real HTTP, at several sizes.

For each size (20,000 and 100,000 leads) a sandbox Partner Center (20 ms injected delay per
page, pages of 100) and two json:// receivers run in this process; the cycle runs as `run --once`
in a fresh subprocess (bench/worker.py), so its CPU time and peak RSS are its own (os.wait4 gives
the child's CPU time; the child reports its own peak RSS). Three cycles per size: the first
(every lead new, digests go out), a steady one (the same leads again, nothing changed), then a
churn one (1% of the leads edited, 0.1% new: what a 15-minute interval brings; no target).

Figures, per cycle:
  wall     the subprocess from spawn to exit
  exit     from the cycle's end (`run --once` returned: state and connections closed) to the
           process's exit (the interpreter's teardown: what a daemon pays once, like start)
  start    spawn until the cycle begins (interpreter, CLI module, config, and the modules a
           cycle uses: what a daemon loads once, not at every poll)
  server   time the sandbox spent answering (its own handler time, the 20 ms delays included)
  ratio    (wall - start - exit) / server: the cycle's time over the API's own time
  cpu      the subprocess's CPU time in the cycle (from ready to its end); us/lead = cpu /
           leads; cpu/server = cpu / server (a ratio against the same run's server time)
  rss      the subprocess's peak resident set size (its VmHWM: a child's ru_maxrss starts
           from the parent's size at fork, and this parent holds the sandbox's data)
  msgs     messages that reached the channels (team + managers)

Floor (SQLite runs only, once per size, after the steady cycle): bench/floor.py reads the same
pages with a bare http.client loop and the client's own msgspec decoder, and stores nothing: about
the least a Python client can spend per page here. Its ratio and CPU are what the cycles' figures
read against; the targets are judged on the cycles alone.

Per unchanged lead: the steady cycle's CPU is mostly fixed costs at 20,000 leads (the imports
the cycle makes, the HTTP client's TLS context, the state's setup); what one more unchanged lead
costs is the slope between the two sizes: (cpu at 100,000 - cpu at 20,000) / 80,000.

The children may write bytecode (__pycache__) even where PYTHONDONTWRITEBYTECODE is set, as an
installed package has it (pip and the image compile it at install time): otherwise every
cycle would compile the modules it imports from source, a cost no deployment pays.

Then the webhook row (bench/webhook_latency.py): event-to-delivered latency p50/p95 over 100
events with 20,000 leads in state, and the daemon's CPU time per event.

Then the hostile rows (issue 20): a steady poll of HOSTILE_SIZE leads, after which the
sandbox's fault injection serves a 200 MB page and then a gzip bomb; each cycle must fail its
poll with the size limit's reason, with peak RSS under the same target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from receiver import Sink
from webhook_latency import WebhookFigures, measure_webhooks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from referral_watch.sandbox import handler as sandbox_handler
from referral_watch.sandbox.records import make_referral
from referral_watch.sandbox.server import Sandbox

from pgserver import PostgresServer, find_bindir
from policies import policy

HERE = Path(__file__).resolve().parent
TOKEN_ENV = "RW_BENCH_TOKEN"
TOKEN = "bench-token"
PAGE_DELAY = 0.02
SIZES = (20_000, 100_000)
TARGET_SIZE = 20_000
LARGE_SIZE = 100_000

# Targets (at TARGET_SIZE leads; the peak RSS at LARGE_SIZE too).
STEADY_RATIO = {"sqlite": 1.05, "postgresql": 1.10}  # PostgreSQL: a server on loopback
FIRST_RATIO = {"sqlite": 1.4, "postgresql": 1.5}
STEADY_CPU_US = 10.0  # per unchanged lead, beyond the cycle's fixed costs (the slope)
RSS_MIB = {TARGET_SIZE: 110.0, LARGE_SIZE: 250.0}
HOSTILE_RSS_MIB = 150.0
MAX_DIGESTS = 10  # "a handful of messages" per channel in the first cycle
HOSTILE_SIZE = 1_000
HOSTILE_FAULTS = ("huge", "gzip_bomb")  # sandbox.Sandbox.fail(kind=...)

CONFIG = """
[partner_center]
base_url = "{base_url}"
page_size = 100
timeout = "30s"

[auth]
method = "env"
token_env = "{token_env}"

[state]
path = "{state}"

{policy}
[channels]
team = "{team}"
managers = "{managers}"
""".replace("{policy}", policy())  # tests/policies.py: the tests' usual policy


# --- the server's own time ----------------------------------------------------------------


class ServerClock:
    """Adds up the time the sandbox's handler threads spend answering requests."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.requests = 0
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self.seconds += seconds
            self.requests += 1

    def reading(self) -> tuple[float, int]:
        with self._lock:
            return self.seconds, self.requests


SERVER = ServerClock()


def _instrument() -> None:
    handler: Any = sandbox_handler._Handler
    original = handler.do_GET

    def timed(self: Any) -> None:
        began = time.perf_counter()
        try:
            original(self)
        finally:
            SERVER.add(time.perf_counter() - began)

    handler.do_GET = timed


# --- data ----------------------------------------------------------------------------------


# Ages at which a lead reaches a tier (reminder, urgent, final and its 4-hourly repeats).
_STEPS = tuple(
    timedelta(hours=h) for h in (7 * 24, 12 * 24, 13 * 24 + 12, 13 * 24 + 16, 13 * 24 + 20)
)
_CLEAR = timedelta(minutes=15)


def _age(n: int, count: int) -> timedelta:
    """Ages spread evenly over 14 days, but none within 15 minutes of a tier step: nothing is
    due in the steady cycle (the churn cycle adds what a real 15-minute interval brings)."""
    age = (timedelta(days=14) - timedelta(hours=1)) * (n / count) + timedelta(minutes=1)
    for step in _STEPS:
        if abs(age - step) < _CLEAR:
            age = step - _CLEAR if age < step else step + _CLEAR
    return age


def leads(count: int, now: datetime, first: int = 0) -> Iterator[dict[str, Any]]:
    """Waiting incoming leads created over the last 14 days (none expired yet); with
    ``first`` > 0, leads that arrived in the last few minutes."""
    customers = ("Fabrikam", "Northwind Traders", "Contoso Pharma", "Adventure Works", "Tailspin")
    for n in range(first, first + count):
        age = _age(n, count) if not first else timedelta(minutes=1 + n % 10)
        team = [{"email": f"seller{n % 40}@example.com", "firstName": "Sam", "lastName": "Seller"}]
        yield make_referral(
            id=f"00000000-0000-4000-8000-{n:012d}",
            customer=f"{customers[n % len(customers)]} #{n}",
            created=now - age,
            country=("US", "NL", "BE", "DE", "GB")[n % 5],
            deal_value=1000 * (1 + n % 97),
            team=team if n % 3 == 0 else None,
        )


# --- one cycle -----------------------------------------------------------------------------


@dataclass
class Figures:
    backend: str
    size: int
    cycle: str
    wall: float
    start: float
    exit: float
    server: float
    pages: int
    cpu: float
    rss_mib: float
    messages: dict[str, int]
    fetched: int
    ok: bool
    error: str | None = None

    @property
    def ratio(self) -> float:
        return self.cycle_s / self.server if self.server else float("inf")

    @property
    def cycle_s(self) -> float:
        """The cycle's own time: from ready to `run --once` returning."""
        return self.wall - self.start - self.exit

    @property
    def cpu_us_per_lead(self) -> float:
        return self.cpu / self.size * 1e6

    @property
    def cpu_ratio(self) -> float:
        return self.cpu / self.server if self.server else float("inf")


def run_cycle(
    size: int,
    name: str,
    config: Path,
    work: Path,
    sinks: dict[str, Sink],
    floor_of: str | None = None,
) -> Figures:
    """One cycle in a fresh process (worker.py); with ``floor_of`` (the API's base URL), the
    floor's bare reading of the same pages instead (floor.py)."""
    out = work / f"{name}.json"
    log = work / f"{name}.log"
    if floor_of is None:
        argv = [str(HERE / "worker.py"), str(config), str(out)]
    else:
        argv = [str(HERE / "floor.py"), floor_of, TOKEN, str(out)]
    before_server, before_requests = SERVER.reading()
    before_msgs = {channel: sink.count() for channel, sink in sinks.items()}
    env = {**os.environ, TOKEN_ENV: TOKEN}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: bytecode compiled once (above)
    began = time.time()
    with log.open("wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, *argv],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        _, status, usage = os.wait4(child.pid, 0)
    ended = time.time()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.exit(f"the {name} cycle at {size} leads failed; see {log}")
    time.sleep(0.05)  # let the receivers finish counting the last message
    report = json.loads(out.read_text())
    server, requests = SERVER.reading()
    backend = "postgresql" if "\n[state]\nurl = " in config.read_text() else "sqlite"
    return Figures(
        backend="none" if floor_of else backend,
        size=size,
        cycle=name,
        wall=ended - began,
        start=report["ready"] - began,
        exit=ended - report["done"],
        server=server - before_server,
        pages=requests - before_requests,
        cpu=report["done_cpu"] - report["ready_cpu"],
        rss_mib=(report["peak_rss_kib"] or usage.ru_maxrss) / 1024,
        messages={ch: sink.count() - before_msgs[ch] for ch, sink in sinks.items()},
        fetched=int(report["fetched"]),
        ok=bool(report["ok"]),
        error=report.get("error"),
    )


def measure(size: int, database: str | None = None) -> list[Figures]:
    """The three cycles at `size` leads, on a SQLite file or (a URL) in PostgreSQL."""
    now = datetime.now(UTC)
    with (
        tempfile.TemporaryDirectory(prefix="rw-bench-") as tmp,
        Sandbox(leads(size, now), token=TOKEN, page_delay=PAGE_DELAY) as api,
        Sink() as team,
        Sink() as managers,
    ):
        work = Path(tmp)
        config = work / "referral-watch.toml"
        text = CONFIG.format(
            base_url=api.base_url,
            token_env=TOKEN_ENV,
            state=work / "state.db",
            team=team.url,
            managers=managers.url,
        )
        if database is not None:  # the state in PostgreSQL instead of the file
            text = text.replace(f'path = "{work / "state.db"}"', f"url = {json.dumps(database)}")
        config.write_text(text)
        sinks = {"team": team, "managers": managers}
        rows = [run_cycle(size, name, config, work, sinks) for name in ("first", "steady")]
        if database is None:  # the same pages read bare, once per size
            rows.append(run_cycle(size, "floor", config, work, sinks, floor_of=api.base_url))
        _churn(api, size, now)
        rows.append(run_cycle(size, "churn", config, work, sinks))
        return rows


def measure_postgresql(sizes: list[int]) -> list[Figures]:
    """The same cycles with the state in a PostgreSQL server started here (as the tests do)."""
    bindir = find_bindir()
    if bindir is None:
        print("(PostgreSQL skipped: no /usr/lib/postgresql/*/bin/initdb here)", file=sys.stderr)
        return []
    server = PostgresServer(bindir, durable=True)
    try:
        server.start()
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"(PostgreSQL skipped: the server did not start: {exc})", file=sys.stderr)
        server.stop()
        return []
    try:
        rows: list[Figures] = []
        for size in sizes:
            print(f"... {size:,} leads, state in PostgreSQL", file=sys.stderr, flush=True)
            rows.extend(measure(size, server.create_database()))
        return rows
    finally:
        server.stop()


def measure_hostile() -> list[Figures]:
    """A poll, then each hostile answer in turn: the poll fails, memory stays bounded."""
    now = datetime.now(UTC)
    with (
        tempfile.TemporaryDirectory(prefix="rw-bench-") as tmp,
        Sandbox(leads(HOSTILE_SIZE, now), token=TOKEN) as api,
        Sink() as team,
        Sink() as managers,
    ):
        work = Path(tmp)
        config = work / "referral-watch.toml"
        config.write_text(
            CONFIG.format(
                base_url=api.base_url,
                token_env=TOKEN_ENV,
                state=work / "state.db",
                team=team.url,
                managers=managers.url,
            )
        )
        sinks = {"team": team, "managers": managers}
        rows = [run_cycle(HOSTILE_SIZE, "first", config, work, sinks)]
        for kind in HOSTILE_FAULTS:
            api.fail(0, kind=kind, size=200 * 1024 * 1024, times=10)
            rows.append(run_cycle(HOSTILE_SIZE, kind, config, work, sinks))
            api.clear_faults()
        return rows


def hostile_verdicts(rows: list[Figures]) -> list[tuple[bool, str]]:
    checks = []
    for r in rows:
        if r.cycle not in HOSTILE_FAULTS:
            continue
        what = "a 200 MB page" if r.cycle == "huge" else "a gzip bomb"
        refused = not r.ok and "over 16 MiB" in (r.error or "")
        checks.append((refused, f"{what} fails the poll: {r.error}"))
        checks.append(
            (
                r.rss_mib <= HOSTILE_RSS_MIB,
                f"{what}: peak RSS {r.rss_mib:.1f} MiB <= {HOSTILE_RSS_MIB:.0f}",
            )
        )
    return checks


def _churn(api: Sandbox, size: int, now: datetime) -> None:
    """What a 15-minute interval brings: 1% of the leads edited, 0.1% new ones."""
    for n in range(0, size, 100):
        lead_id = f"00000000-0000-4000-8000-{n:012d}"
        record = api.get_record(lead_id)
        if record is not None:
            details = {**record["details"], "notes": f"Edited during the benchmark ({n})."}
            api.update(lead_id, details=details)
    api.add(*leads(size // 1000, now, first=size))


# --- report --------------------------------------------------------------------------------


def table(rows: list[Figures]) -> str:
    head = (
        f"| {'state':<10} | {'leads':>6} | {'cycle':<9} | {'wall s':>6} | {'start s':>7} "
        f"| {'exit s':>6} "
        f"| {'server s':>8} "
        f"| {'ratio':>5} | {'cpu s':>5} | {'cpu/server':>10} | {'cpu us/lead':>11} "
        f"| {'peak RSS MiB':>12} "
        f"| {'msgs (team+mgrs)':>16} |"
    )
    rule = "|" + "|".join("-" * (len(part)) for part in head.split("|")[1:-1]) + "|"
    lines = [head, rule]
    for r in rows:
        msgs = f"{r.messages.get('team', 0)}+{r.messages.get('managers', 0)}"
        lines.append(
            f"| {r.backend:<10} | {r.size:>6} | {r.cycle:<9} | {r.wall:>6.2f} | {r.start:>7.2f} "
            f"| {r.exit:>6.2f} "
            f"| {r.server:>8.2f} "
            f"| {r.ratio:>5.2f} | {r.cpu:>5.2f} | {r.cpu_ratio:>10.2f} "
            f"| {r.cpu_us_per_lead:>11.1f} "
            f"| {r.rss_mib:>12.1f} | {msgs:>16} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[Figures]) -> list[tuple[bool, str]]:
    checks: list[tuple[bool, str]] = []
    for backend in ("sqlite", "postgresql"):
        mine = [r for r in rows if r.backend == backend]
        if mine:
            checks += _targets(mine, backend)
    return checks


def _targets(rows: list[Figures], backend: str) -> list[tuple[bool, str]]:
    by = {(r.size, r.cycle): r for r in rows}
    first, steady = by.get((TARGET_SIZE, "first")), by.get((TARGET_SIZE, "steady"))
    checks: list[tuple[bool, str]] = []
    on = "" if backend == "sqlite" else " (PostgreSQL)"
    n = f"{TARGET_SIZE:,}"
    if first and steady:
        checks += [
            (
                steady.ratio <= STEADY_RATIO[backend],
                f"steady ratio{on} {steady.ratio:.2f} <= {STEADY_RATIO[backend]} at {n}",
            ),
            (
                first.ratio <= FIRST_RATIO[backend],
                f"first cycle ratio{on} {first.ratio:.2f} <= {FIRST_RATIO[backend]} at {n}",
            ),
        ]
        digests = first.messages
        checks.append(
            (
                all(0 < count <= MAX_DIGESTS for count in digests.values()),
                f"first cycle's {n} alerts reach each channel as digests: "
                + ", ".join(f"{ch} {count} messages" for ch, count in digests.items()),
            )
        )
    slope = steady_slope(rows)
    if slope is not None:
        us, low, high = slope
        checks.append(
            (
                us <= STEADY_CPU_US or backend != "sqlite",
                f"steady CPU{on} per unchanged lead {us:.1f} us "
                f"(the slope {low:,} -> {high:,} leads)"
                + (f" <= {STEADY_CPU_US:.0f}" if backend == "sqlite" else " (no target)"),
            )
        )
    for size, limit in RSS_MIB.items():
        peak = max((r.rss_mib for r in rows if r.size == size), default=None)
        if peak is not None:
            checks.append(
                (peak <= limit, f"peak RSS{on} {peak:.1f} MiB <= {limit:.0f} at {size:,}")
            )
    checks += _linear(rows)
    for r in rows:
        if not r.ok or r.fetched < r.size:
            checks.append((False, f"{r.size} {r.cycle}: fetched {r.fetched}, ok={r.ok}"))
    return checks


def steady_slope(rows: list[Figures]) -> tuple[float, int, int] | None:
    """(CPU microseconds per unchanged lead, from the smallest to the largest size): the steady
    cycle's CPU growth per lead, with every fixed cost of a cycle left out."""
    steady = {r.size: r for r in rows if r.cycle == "steady"}
    if len(steady) < 2:
        return None
    low, high = min(steady), max(steady)
    return (steady[high].cpu - steady[low].cpu) / (high - low) * 1e6, low, high


def _linear(rows: list[Figures]) -> list[tuple[bool, str]]:
    """Peak RSS grows no faster than linearly: the per-lead cost of the step from the middle
    size to the largest is at most the one from the smallest to the middle (plus noise)."""
    peak: dict[int, float] = {}
    for r in rows:
        peak[r.size] = max(peak.get(r.size, 0.0), r.rss_mib)
    sizes = sorted(peak)
    if len(sizes) < 3:
        return []
    low, mid, high = sizes[0], sizes[len(sizes) // 2], sizes[-1]
    before = (peak[mid] - peak[low]) / (mid - low) * 1024  # KiB per lead
    after = (peak[high] - peak[mid]) / (high - mid) * 1024
    ok = after <= max(before * 1.5, before + 0.5)  # 0.5 KiB/lead of slack for noise
    return [
        (
            ok,
            f"RSS grows linearly or slower: {before:.2f} KiB/lead ({low:,}->{mid:,}), "
            f"{after:.2f} KiB/lead ({mid:,}->{high:,})",
        )
    ]


PARTS = ("cycles", "console", "webhooks", "hostile")


def main(argv: list[str] | None = None) -> int:
    import console_bench

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES), help="[]: none")
    parser.add_argument(
        "--pg-sizes", type=int, nargs="*", default=list(SIZES), help="[] skips PostgreSQL"
    )
    parser.add_argument("--only", nargs="+", choices=PARTS, default=PARTS, help="Parts to run.")
    parser.add_argument("--console-only", action="store_true", help="Same as --only console.")
    parser.add_argument("--webhooks-only", action="store_true", help="Same as --only webhooks.")
    args = parser.parse_args(argv)
    parts = set(args.only)
    if args.console_only or args.webhooks_only:
        parts = {"console"} if args.console_only else {"webhooks"}
    _instrument()
    rows: list[Figures] = []
    checks: list[tuple[bool, str]] = []
    for size in sorted(args.sizes) if "cycles" in parts else []:
        print(f"... {size:,} leads", file=sys.stderr, flush=True)
        rows.extend(measure(size))
    if args.pg_sizes and "cycles" in parts:
        rows.extend(measure_postgresql(sorted(args.pg_sizes)))
    if rows:
        print(table(rows))
        print()
        for backend in ("sqlite", "postgresql"):
            slope = steady_slope([r for r in rows if r.backend == backend])
            if slope is not None:
                print(
                    f"{backend}: steady CPU per unchanged lead {slope[0]:.1f} us "
                    f"(the slope {slope[1]:,} -> {slope[2]:,} leads)"
                )
        print()
        checks = verdicts(rows)
    if "console" in parts:
        pages = console_bench.run(CONFIG, TOKEN_ENV, TOKEN, leads)
        print(console_bench.table(pages))
        print()
        checks += console_bench.verdicts(pages)
    if "webhooks" in parts:
        print(f"... webhooks, {TARGET_SIZE:,} leads in state", file=sys.stderr, flush=True)
        state = list(leads(TARGET_SIZE, datetime.now(UTC)))
        hooks = measure_webhooks(CONFIG, TOKEN_ENV, TOKEN, state)
        print(WebhookFigures.head())
        print(hooks.row())
        print()
        checks.append(hooks.verdict())
    if "hostile" in parts:
        print("... hostile answers", file=sys.stderr, flush=True)
        hostile = measure_hostile()
        print(table(hostile))
        print()
        checks += hostile_verdicts(hostile)
    if TARGET_SIZE not in [*args.sizes, *(args.pg_sizes or [])] and "cycles" in parts:
        print(f"(the targets are judged at {TARGET_SIZE:,} leads)")
    for ok, text in checks:
        print(f"{'met   ' if ok else 'MISSED'} {text}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
