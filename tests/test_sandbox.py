"""The fake Partner Center: record shape, the $filter subset, paging, auth and injected faults."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from referral_watch.model import parse_referral
from referral_watch.partner_center.odata import FilterError, compile_filter
from referral_watch.sandbox.records import make_referral
from referral_watch.sandbox.server import Sandbox

NOW = datetime(2024, 5, 6, 12, 0, tzinfo=UTC)
AUTH = {"Authorization": "Bearer sandbox-token"}


def lead(n: int, **fields: Any) -> dict[str, Any]:
    return make_referral(id=f"lead-{n}", created=NOW - timedelta(hours=n), **fields)


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as running:
        yield running


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(headers=AUTH, timeout=5) as client:
        yield client


def list_url(sandbox: Sandbox) -> str:
    return f"{sandbox.base_url}/engagements/referrals"


def read_all(http: httpx.Client, sandbox: Sandbox, **params: Any) -> list[httpx.Response]:
    responses = [http.get(list_url(sandbox), params=params)]
    while "@odata.nextLink" in responses[-1].json():
        responses.append(http.get(responses[-1].json()["@odata.nextLink"]))
    return responses


def ids_of(responses: list[httpx.Response]) -> list[str]:
    return [r["id"] for response in responses for r in response.json()["value"]]


# --- make_referral -----------------------------------------------------------------------------


def test_make_referral_has_the_documented_shape_and_parses() -> None:
    record = make_referral(
        id="abc",
        customer="Northwind Traders",
        created=datetime(2020, 11, 2, 9, 15, 27, 123456, tzinfo=UTC),
        expiration=datetime(2020, 11, 16, tzinfo=UTC),
        deal_value="250000",
        currency="EUR",
        country="NL",
        type="Shared",
        invited_by="msft",
        team=[{"firstName": "Jan", "lastName": "Bakker", "email": "jan@contoso.example"}],
        eTag="W/1",
    )
    assert record["createdDateTime"] == "2020-11-02T09:15:27.1234560Z"
    assert record["expirationDateTime"] == "2020-11-16T00:00:00.0000000Z"
    assert record["eTag"] == "W/1"
    assert record["inviteContext"]["invitedBy"]["organizationName"] == "Microsoft"
    referral = parse_referral(json.loads(json.dumps(record)))
    assert referral.customer == "Northwind Traders"
    assert referral.created == datetime(2020, 11, 2, 9, 15, 27, 123456, tzinfo=UTC)
    assert referral.expiration == datetime(2020, 11, 16, tzinfo=UTC)
    assert str(referral.deal_value) == "250000"
    assert referral.country == "NL"
    assert referral.kind == "co-sell"
    assert referral.team_emails == ("jan@contoso.example",)
    assert referral.is_pending


def test_make_referral_defaults_are_a_pending_incoming_lead_without_expiration() -> None:
    record = make_referral(created=NOW)
    assert (record["direction"], record["substatus"], record["status"]) == (
        "Incoming",
        "Pending",
        "New",
    )
    assert record["expirationDateTime"] is None
    assert make_referral(created=NOW)["id"] != record["id"]


# --- the $filter subset ------------------------------------------------------------------------

RECORDS = [
    make_referral(
        id="a",
        created=NOW,
        country="US",
        deal_value=10000,
        team=[{"email": "ann@contoso.example"}, {"email": "bob@contoso.example"}],
    ),
    make_referral(
        id="b",
        created=NOW,
        country="NL",
        direction="Outgoing",
        deal_value=None,
        team=[{"email": "bob@contoso.example"}],
    ),
    make_referral(id="c", created=NOW, country="BE", substatus="Accepted", status="Active"),
    make_referral(id="d", created=NOW, customer="O'Brien & Sons", consent_flag=True),
]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("", "abcd"),
        ("direction eq 'Incoming'", "acd"),
        ("direction eq 'incoming'", ""),  # values are case-sensitive
        ("direction ne 'Incoming'", "b"),
        ("direction eq 'Incoming' and substatus eq 'Pending'", "ad"),
        ("direction eq 'Outgoing' or substatus eq 'Accepted'", "bc"),
        ("not (direction eq 'Incoming')", "b"),
        ("not direction eq 'Incoming' or id eq 'c'", "bc"),
        ("(id eq 'a' or id eq 'b') and direction eq 'Incoming'", "a"),
        ("id eq 'a' or id eq 'b' and direction eq 'Incoming'", "a"),  # and binds tighter
        ("customerProfile/address/country eq 'NL'", "b"),
        ("customerProfile/address/nowhere/deeper eq null", "abcd"),
        ("details/dealValue eq 10000", "a"),
        ("details/dealValue eq 10000.0", "a"),
        ("details/dealValue eq null", "b"),
        ("details/dealValue ne null", "acd"),
        ("details/dealValue eq '10000'", ""),  # a string is not a number
        ("consent_flag eq true", "d"),
        ("consent_flag eq 1", ""),  # true is not 1
        ("customerProfile/name eq 'O''Brien & Sons'", "d"),
        ("team/any(t:t/email eq 'bob@contoso.example')", "ab"),
        ("team/any(t: t/email eq 'ann@contoso.example')", "a"),
        ("team/all(t:t/email eq 'bob@contoso.example')", "bcd"),  # all() of nothing is true
        ("team/any()", "ab"),
        ("not team/any()", "cd"),
        ("team/any(t:t/email eq 'bob@contoso.example' and id eq 'b')", "b"),
        ("  direction   eq   'Incoming'  and(id eq 'a')  ", "a"),
    ],
)
def test_filter_selects(expression: str, expected: str) -> None:
    predicate = compile_filter(expression)
    assert "".join(r["id"] for r in RECORDS if predicate(r)) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "direction eq 'Incoming",  # unterminated string
        "direction eq",
        "direction 'Incoming'",
        "direction gt 'A'",  # range operators are not documented
        "direction eq 'Incoming' and",
        "(direction eq 'Incoming'",
        "direction eq 'Incoming')",
        "direction eq 'Incoming' xor id eq 'a'",
        "team/any(t t/email eq 'x')",
        "team/any(t:t/email eq 'x'",
        "team/any(t:t/email eq 'x') eq true",
        "customerProfile/ eq 'x'",
        'id eq "a"',
        "id eq 'a' ; drop",
    ],
)
def test_filter_rejects(expression: str) -> None:
    with pytest.raises(FilterError, match="position"):
        compile_filter(expression)


def test_an_unparseable_filter_is_answered_with_400_invalid_request(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    response = http.get(list_url(sandbox), params={"$filter": "direction eq 'Incoming"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalidRequest"
    assert "filter" in error["message"]
    assert response.headers["Request-ID"]


# --- listing and paging ------------------------------------------------------------------------


def test_pages_follow_the_documented_odd_next_link(sandbox: Sandbox, http: httpx.Client) -> None:
    sandbox.add(*(lead(n) for n in range(250)))
    responses = read_all(http, sandbox, **{"$top": 100, "$orderby": "createdDateTime desc"})
    assert [len(r.json()["value"]) for r in responses] == [100, 100, 50]
    assert ids_of(responses) == [f"lead-{n}" for n in range(250)]  # newest first
    link = urlsplit(responses[0].json()["@odata.nextLink"])
    assert (link.scheme, link.path) == ("http", "/v1.0/referrals")
    assert list(parse_qs(link.query)) == ["$skiptoken"]
    assert "@odata.nextLink" not in responses[-1].json()
    assert responses[0].json()["@odata.context"].endswith("$metadata#Referrals")
    assert all(r.headers["Content-Type"].startswith("application/json") for r in responses)


def test_the_skiptoken_carries_filter_order_and_page_size(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    sandbox.add(*(lead(n, direction="Outgoing" if n % 2 else "Incoming") for n in range(30)))
    responses = read_all(
        http,
        sandbox,
        **{"$filter": "direction eq 'Incoming'", "$orderby": "createdDateTime asc", "$top": 4},
    )
    assert [len(r.json()["value"]) for r in responses] == [4, 4, 4, 3]
    assert ids_of(responses) == [f"lead-{n}" for n in range(28, -1, -2)]  # oldest first


def test_default_page_size_is_100_and_max_page_size_caps_top(http: httpx.Client) -> None:
    with Sandbox([lead(n) for n in range(120)], max_page_size=50) as capped:
        responses = read_all(http, capped, **{"$top": 1000})
        assert [len(r.json()["value"]) for r in responses] == [50, 50, 20]
    with Sandbox([lead(n) for n in range(120)]) as default:
        responses = read_all(http, default)
        assert [len(r.json()["value"]) for r in responses] == [100, 20]


def test_order_by_updated_date(sandbox: Sandbox, http: httpx.Client) -> None:
    sandbox.add(lead(1, updatedDateTime="2024-01-03T00:00:00.0000000Z"))
    sandbox.add(lead(2, updatedDateTime="2024-01-01T00:00:00.0000000Z"))
    sandbox.add(lead(3, updatedDateTime="2024-01-02T00:00:00.0000000Z"))
    desc = read_all(http, sandbox, **{"$orderby": "updatedDateTime desc"})
    assert ids_of(desc) == ["lead-1", "lead-3", "lead-2"]
    asc = read_all(http, sandbox, **{"$orderby": "updatedDateTime"})
    assert ids_of(asc) == ["lead-2", "lead-3", "lead-1"]


@pytest.mark.parametrize(
    "params",
    [
        {"$orderby": "name desc"},
        {"$orderby": "createdDateTime sideways"},
        {"$top": "0"},
        {"$top": "ten"},
        {"$skiptoken": "not-a-token"},
    ],
)
def test_bad_query_options_are_answered_with_400(
    sandbox: Sandbox, http: httpx.Client, params: dict[str, str]
) -> None:
    response = http.get(list_url(sandbox), params=params)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalidRequest"


def test_changes_show_in_the_next_listing(sandbox: Sandbox, http: httpx.Client) -> None:
    sandbox.add(lead(1), lead(2), lead(3))
    pending = {"$filter": "substatus eq 'Pending'"}
    assert sorted(ids_of(read_all(http, sandbox, **pending))) == ["lead-1", "lead-2", "lead-3"]
    sandbox.update("lead-2", substatus="Accepted", status="Active")
    sandbox.remove("lead-3")
    assert ids_of(read_all(http, sandbox, **pending)) == ["lead-1"]
    assert ids_of(read_all(http, sandbox)) == ["lead-1", "lead-2"]


def test_malformed_records_are_served_as_given(sandbox: Sandbox, http: httpx.Client) -> None:
    sandbox.add({"name": "no id at all"}, {"id": "x", "createdDateTime": "yesterday"}, lead(1))
    body = read_all(http, sandbox, **{"$orderby": "createdDateTime desc"})[0].json()
    assert [r.get("id") for r in body["value"]] == ["x", "lead-1", None]


def test_next_link_base_overrides_the_link_prefix(sandbox: Sandbox, http: httpx.Client) -> None:
    sandbox.add(lead(1), lead(2))
    sandbox.next_link_base = "http://evil.example:1/v1.0"
    body = http.get(list_url(sandbox), params={"$top": 1}).json()
    assert body["@odata.nextLink"].startswith("http://evil.example:1/v1.0/referrals?$skiptoken=")


# --- single records and auth -----------------------------------------------------------------


def test_get_by_id_answers_any_status_and_404_once_removed(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    sandbox.add(lead(1, substatus="Declined", status="Closed"))
    response = http.get(f"{list_url(sandbox)}/lead-1")
    assert response.status_code == 200
    assert response.json()["substatus"] == "Declined"
    sandbox.remove("lead-1")
    gone = http.get(f"{list_url(sandbox)}/lead-1")
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "itemNotFound"
    assert gone.headers["Request-ID"]


def test_bearer_token_is_checked_on_every_request(sandbox: Sandbox) -> None:
    sandbox.add(lead(1))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sandbox-token"}):
        for url in (list_url(sandbox), f"{list_url(sandbox)}/lead-1"):
            response = httpx.get(url, headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "unauthenticated"
    sandbox.token = "rotated"
    assert httpx.get(list_url(sandbox), headers=AUTH).status_code == 401
    assert httpx.get(list_url(sandbox), headers={"Authorization": "Bearer rotated"}).is_success
    sandbox.token = None  # accept anything
    assert httpx.get(list_url(sandbox)).is_success


def test_requests_are_recorded_with_case_insensitive_headers(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    http.get(list_url(sandbox), params={"$top": 5}, headers={"MS-RequestId": "r-1"})
    (recorded,) = sandbox.requests
    assert (recorded.method, recorded.path, recorded.query) == (
        "GET",
        "/v1.0/engagements/referrals",
        {"$top": "5"},
    )
    assert recorded.headers["authorization"] == "Bearer sandbox-token"
    assert recorded.headers["Ms-RequestId"] == "r-1"
    assert "MS-REQUESTID" in recorded.headers
    assert recorded.headers.get("X-Missing") is None


def test_unknown_paths_answer_404(sandbox: Sandbox, http: httpx.Client) -> None:
    response = http.get(f"{sandbox.base_url}/engagements/leads")
    assert response.status_code == 404
    assert response.json()["error"]["code"]


# --- faults --------------------------------------------------------------------------------------


def test_a_fault_is_served_the_given_number_of_times_with_retry_after(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    sandbox.add(lead(1))
    sandbox.fail(503, times=2, retry_after=7)
    first, second, third = (http.get(list_url(sandbox)) for _ in range(3))
    for failed in (first, second):
        assert failed.status_code == 503
        assert failed.headers["Retry-After"] == "7"
        assert failed.json()["error"]["code"] == "serviceNotAvailable"
        assert failed.headers["Request-ID"]
    assert third.status_code == 200
    assert ids_of([third]) == ["lead-1"]


def test_a_fault_can_target_one_page_or_the_item_endpoint(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    sandbox.add(*(lead(n) for n in range(3)))
    sandbox.fail(500, page=1)
    sandbox.fail(404, on="item", body=b'{"error": {"code": "itemNotFound", "message": "x"}}')
    first = http.get(list_url(sandbox), params={"$top": 1})
    assert first.status_code == 200  # page 0 is untouched
    assert http.get(first.json()["@odata.nextLink"]).status_code == 500
    assert http.get(f"{list_url(sandbox)}/lead-1").status_code == 404
    assert http.get(f"{list_url(sandbox)}/lead-1").status_code == 200


def test_status_zero_serves_a_malformed_200(sandbox: Sandbox, http: httpx.Client) -> None:
    sandbox.fail(0, body=b'{"value": [{"id": ')
    response = http.get(list_url(sandbox))
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_a_fault_can_wait_before_answering(sandbox: Sandbox, http: httpx.Client) -> None:
    sandbox.fail(503, delay=0.05)
    assert http.get(list_url(sandbox)).status_code == 503


def test_truncate_sends_less_than_it_promised(sandbox: Sandbox, http: httpx.Client) -> None:
    sandbox.fail(200, truncate=True, body=b'{"value": []}')
    with pytest.raises(httpx.RemoteProtocolError):
        http.get(list_url(sandbox))
    assert http.get(list_url(sandbox)).status_code == 200  # a fresh connection works again


def test_hang_never_answers_and_stop_still_returns() -> None:
    sandbox = Sandbox().start()
    sandbox.fail(503, hang=True)
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(list_url(sandbox), headers=AUTH, timeout=0.3)
    sandbox.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(list_url(sandbox), headers=AUTH, timeout=1)


def test_fail_rejects_an_unknown_target(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError, match="list"):
        sandbox.fail(503, on="page")


# --- standalone ----------------------------------------------------------------------------------


def test_python_m_sandbox_serves_generated_leads() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "referral_watch.sandbox", "--port", "0", "--leads", "30"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        found = re.search(r"http://\S+/v1\.0", first)
        assert found, "the sandbox should print its base URL"
        assert "with 30 waiting referrals (a poll gets these) and 4 it skips" in first
        url = found.group(0)
        body = httpx.get(
            f"{url}/engagements/referrals",
            params={"$filter": "direction eq 'Incoming'"},
            headers=AUTH,
        ).json()
        assert len(body["value"]) == 31  # the 30 waiting ones and one already accepted
        assert all(r["direction"] == "Incoming" for r in body["value"])
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
