"""The daemon's Prometheus metrics (/metrics): every name starts with referral_watch_."""

from __future__ import annotations


class Metrics:
    """Prometheus metrics; every name starts with referral_watch_."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.polls = Counter(
            "referral_watch_polls", "Polls by result", ["result"], registry=self.registry
        )
        self.poll_duration = Histogram(
            "referral_watch_poll_duration_seconds",
            "Duration of a whole cycle",
            registry=self.registry,
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )
        self.watched = Gauge(
            "referral_watch_watched_leads", "Leads waiting for an answer", registry=self.registry
        )
        self.deliveries = Counter(
            "referral_watch_deliveries",
            "Messages by channel and result",
            ["channel", "result"],
            registry=self.registry,
        )
        self.claimed = Gauge(
            "referral_watch_leads_claimed",
            "Waiting leads someone has claimed, their claim still holding",
            registry=self.registry,
        )
        self.backlog = Gauge(
            "referral_watch_outbox_backlog",
            "Messages waiting in the outbox",
            registry=self.registry,
        )
        self.last_success = Gauge(
            "referral_watch_last_success_timestamp_seconds",
            "Unix time of the last successful poll",
            registry=self.registry,
        )
        self.active = Gauge(
            "referral_watch_active",
            "1 while this replica does the work (always with a SQLite state), 0 on a standby",
            registry=self.registry,
        )
        self.sign_in_needed = Gauge(
            "referral_watch_sign_in_needed",
            "1 while polls fail until someone runs `referral-watch login`, else 0",
            registry=self.registry,
        )
        self.most_urgent = Gauge(
            "referral_watch_most_urgent_remaining_seconds",
            "Time left on the most urgent watched lead (negative once past; +Inf while none)",
            registry=self.registry,
        )
        # Until a cycle says otherwise no lead waits: 0 would fire "< 6 * 3600" alert rules.
        self.most_urgent.set(float("inf"))
        self.webhook_events = Counter(
            "referral_watch_webhook_events",
            "Partner Center webhook events by event and result",
            ["event", "result"],
            registry=self.registry,
        )
        self.webhook_last_event = Gauge(
            "referral_watch_webhook_last_event_timestamp_seconds",
            "Unix time of the last verified webhook event",
            registry=self.registry,
        )

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return bytes(generate_latest(self.registry))
