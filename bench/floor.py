"""The floor of a steady poll: the same pages read by a bare loop, nothing parsed or stored.

Started by bench.py with: floor.py BASE_URL TOKEN OUT. Reads every page of the poll's query with
the standard library's http.client on one kept-alive connection, finding each page's nextLink
with the same msgspec decoder the client uses; it digests, parses and stores nothing. That is
about as little as a Python client can do per page on this machine, so the cycles' ratios read
against it: what is left between the two is referral-watch's own work. Writes the same JSON
fields as worker.py (its ``report``).
"""

from __future__ import annotations

import http.client
import sys
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from worker import _cpu, report

from referral_watch.config import PartnerCenterConfig
from referral_watch.partner_center.client import ORDER_BY
from referral_watch.partner_center.responses import RAW_PAGE


def main() -> None:
    base, token, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    config = PartnerCenterConfig(base_url=base)
    where = urlsplit(base)
    query = {"$filter": config.filter, "$orderby": ORDER_BY, "$top": str(config.page_size)}
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    ready, ready_cpu = time.time(), _cpu()
    connection = http.client.HTTPConnection(where.hostname or "", where.port)
    target: str | None = f"{where.path}/engagements/referrals?{urlencode(query)}"
    fetched = 0
    while target:
        connection.request("GET", target, headers=headers)
        answer = connection.getresponse()
        page = RAW_PAGE.decode(answer.read())
        fetched += len(page.value)
        link = urlsplit(page.next_link) if page.next_link else None
        target = f"{link.path}?{link.query}" if link else None
    connection.close()
    report(out, ready, ready_cpu, ok=True, fetched=fetched)


if __name__ == "__main__":
    main()
