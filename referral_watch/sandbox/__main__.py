"""``python -m referral_watch.sandbox``: serve the fake Partner Center."""

from referral_watch.sandbox.server import main

main()
