"""The cycle as stages: intake (pages -> parsed, set aside, stored; by-id lookups), decide,
delivery (plan -> send -> record) and operations; ``runner.Cycle`` puts them in order.

`run --once`, the daemon, webhook batches and the demo all run the same stages; only the clock
and the loop differ (the daemon's ``new_cycle`` is the one place a Cycle is built)."""
