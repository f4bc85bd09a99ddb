"""One `run --once` cycle in a fresh process, timed from the inside.

Started by bench.py with: worker.py CONFIG OUT. Writes a JSON object to OUT: when the process was
ready to start the cycle (after the interpreter, the CLI module, the config and the modules a
cycle uses loaded: what a daemon does once), the CPU time used up to then, and the cycle's own
result.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _peak_rss_kib() -> int | None:
    """This process's own peak RSS (VmHWM). ru_maxrss is no good here: the kernel carries the
    parent's size at fork over into the child's, and the parent holds the sandbox's data."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def main() -> None:
    config_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    from referral_watch import cli, logs
    from referral_watch.config.loader import load_config

    logs.configure("json", 0)
    # As `run --once` does before its cycle: the config checked beyond the schema (every
    # channel URL through Apprise, which loads its plugins; every template rendered).
    config = cli.checked(load_config(config_path))
    # What a daemon imports once at its start, not at each poll: part of "start" here too.
    import referral_watch.daemon
    import referral_watch.partner_center.auth
    import referral_watch.partner_center.client
    import referral_watch.state.replica
    import referral_watch.state.store  # noqa: F401

    if config.state.url is not None:  # the state in PostgreSQL: its driver, loaded at the
        import psycopg  # noqa: F401  first connection and kept (SQLite's is in the stdlib)

    ready, ready_cpu = time.time(), _cpu()
    result = cli.run_once(config)  # the same function `referral-watch run --once` calls
    report(
        out,
        ready,
        ready_cpu,
        ok=result.ok,
        fetched=result.fetched,
        new=result.new,
        queued=result.queued,
        delivered=result.delivered,
        failed=result.failed,
        error=result.error,
    )


def report(out: Path, ready: float, ready_cpu: float, **result: object) -> None:
    """Write OUT, right after the timed work ended: when it began and ended (wall and CPU),
    this process's peak RSS, and what the work reports."""
    done, done_cpu = time.time(), _cpu()
    figures = {"ready": ready, "ready_cpu": ready_cpu, "done": done, "done_cpu": done_cpu}
    out.write_text(json.dumps({**figures, "peak_rss_kib": _peak_rss_kib(), **result}))


if __name__ == "__main__":
    main()
