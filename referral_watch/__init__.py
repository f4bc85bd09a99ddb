"""referral-watch: no Partner Center lead expires unanswered."""

__version__ = "0.1.0"
