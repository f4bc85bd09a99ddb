"""The daemon's webhook worker: handles the leads that verified events named, in batches.

A lone new lead is handled a moment after its event (once no other event followed for
``QUIET`` seconds), so its first alert goes out within seconds. A burst (a trade show import:
hundreds of new leads in a minute) would otherwise page the team once per lead; so once more
than ``digest_over`` leads were, or are about to be, alerted one by one within
``BURST_WINDOW``, the worker waits for the burst to pause (``BURST_QUIET``, at most
``BURST_MAX``) and handles the rest in one go: one digest per channel and tier, as a poll
would have sent.

The work itself lives in the state file (webhook_events): an event answered just before a
crash is handled after the restart.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import structlog

log = structlog.get_logger(__name__)

QUIET = 0.2  # seconds without a new event before a batch is handled
SETTLE_MAX = 1.0  # ... but no longer than this after the first event of the batch
BURST_WINDOW = 60.0  # seconds over which leads alerted one by one are counted
BURST_QUIET = 2.0  # a burst is over when no event came for this long
BURST_MAX = 60.0  # ... or this long after the burst began


class WebhookWorker:
    """``handle(ids)`` runs a batch (the daemon's lead cycle); ``pending()`` lists the lead
    ids of events not yet handled (from the state file)."""

    def __init__(
        self,
        handle: Callable[[Sequence[str]], object],
        pending: Callable[[], list[str]],
        *,
        digest_over: int,
        stop: threading.Event,
    ) -> None:
        self._handle = handle
        self._pending = pending
        self._digest_over = digest_over
        self._stop = stop
        self._changed = threading.Condition()
        self._woken = True  # at start: events answered before a restart may wait
        self._last_arrival = 0.0
        self._one_by_one: deque[float] = deque()  # when leads were handled outside a burst
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the batch in flight (the daemon's stop event is set by then)."""
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        """An event was stored: handle it soon."""
        with self._changed:
            self._woken = True
            self._last_arrival = time.monotonic()
            self._changed.notify_all()

    # --- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._changed:
                while not self._woken and not self._stop.is_set():
                    self._changed.wait()
                self._woken = False
            if self._stop.is_set():
                return
            try:
                self._batch()
            except Exception:  # a bug must not end the worker; polling still covers the leads
                log.exception("webhook.worker_crashed")

    def _batch(self) -> None:
        self._settle(QUIET, SETTLE_MAX)
        lead_ids = self._pending()
        if not lead_ids:
            return
        now = time.monotonic()
        while self._one_by_one and now - self._one_by_one[0] > BURST_WINDOW:
            self._one_by_one.popleft()
        if len(self._one_by_one) + len(lead_ids) > self._digest_over:
            log.info("webhook.burst", waiting=len(lead_ids))
            self._settle(BURST_QUIET, BURST_MAX)
            lead_ids = self._pending()
            # Leads arriving soon after a burst still belong to it.
            self._one_by_one.extend([time.monotonic()] * (self._digest_over + 1))
        else:
            self._one_by_one.extend([now] * len(lead_ids))
        if lead_ids and not self._stop.is_set():
            self._handle(lead_ids)

    def _settle(self, quiet: float, cap: float) -> None:
        """Wait until no event came for ``quiet`` seconds, or ``cap`` seconds have passed."""
        began = time.monotonic()
        with self._changed:
            while not self._stop.is_set():
                now = time.monotonic()
                left = min(self._last_arrival + quiet - now, began + cap - now)
                if left <= 0:
                    break
                self._changed.wait(left)
            self._woken = False  # the events that came meanwhile are in this batch
