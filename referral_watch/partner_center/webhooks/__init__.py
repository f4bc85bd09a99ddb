"""Partner Center webhooks: verify events, receive them, relay them to the cycle, register."""
