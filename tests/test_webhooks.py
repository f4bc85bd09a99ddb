"""Webhook events: verified as Microsoft says (against the sandbox's real certificates served over
https), and the endpoint's answers (Starlette's TestClient on a real state file)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient
from structlog.testing import capture_logs

from referral_watch.config import WebhooksConfig
from referral_watch.config.loader import parse_config
from referral_watch.config_check import cross_problems
from referral_watch.errors import ConfigError
from referral_watch.partner_center.webhooks import certificates as webhook_certificates
from referral_watch.partner_center.webhooks import verify as webhooks
from referral_watch.partner_center.webhooks.receiver import Receiver
from referral_watch.partner_center.webhooks.verify import (
    Rejected,
    Verifier,
    parse_event,
    referral_id,
)
from referral_watch.sandbox.certificates import GOOD, ISSUER_PATH
from referral_watch.sandbox.server import Sandbox
from referral_watch.sandbox.webhooks import _event_body
from referral_watch.state.store import Store


@dataclass
class Signing:
    """The sandbox's signing side, and a Verifier configured to trust it."""

    sandbox: Sandbox
    roots: Path
    verifier: Verifier

    def headers(self, body: bytes, name: str = GOOD, host: str | None = None) -> dict[str, str]:
        certificates = self.sandbox.webhooks.certificates
        return {
            "authorization": f"Signature {certificates.sign(body, name)}",
            "x-ms-certificate-url": certificates.url(name, host),
            "x-ms-signature-algorithm": "rsa-sha256",
        }

    @property
    def fetched(self) -> list[str]:
        return list(self.sandbox.webhooks.certificates.fetched)


@pytest.fixture
def signing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Signing]:
    with Sandbox() as sandbox:
        side = sandbox.webhooks
        tls = tmp_path / "tls-roots.pem"
        tls.write_bytes(side.tls_roots_pem)
        roots = tmp_path / "signing-roots.pem"
        roots.write_bytes(side.trust_roots_pem)
        monkeypatch.setenv("SSL_CERT_FILE", str(tls))  # the download's TLS trusts the sandbox
        config = WebhooksConfig(
            certificate_hosts=[side.certificate_host],
            issuer_hosts=[side.issuer_host],
            trust_roots=roots,
        )
        yield Signing(sandbox, roots, Verifier(config))


def event(lead: str = "4f0e1c9a-0000-4000-8000-000000000001") -> bytes:
    return _event_body("referral-created", lead, None)


def rejected(signing: Signing, headers: dict[str, str], body: bytes) -> Rejected:
    with pytest.raises(Rejected) as caught:
        signing.verifier.verify(headers, body)
    return caught.value


# --- verification -------------------------------------------------------------------------


def test_a_signed_event_verifies_and_names_its_referral(signing: Signing) -> None:
    body = event()
    signing.verifier.verify(signing.headers(body), body)
    parsed = parse_event(body)
    assert parsed.name == "referral-created"
    assert parsed.lead_id == "4f0e1c9a-0000-4000-8000-000000000001"


def test_the_ms_signature_header_works_too(signing: Signing) -> None:
    body = event()
    headers = signing.headers(body)
    headers["x-ms-signature"] = headers.pop("authorization").removeprefix("Signature ")
    signing.verifier.verify(headers, body)


def test_a_body_changed_after_signing_is_a_bad_signature(signing: Signing) -> None:
    body = event()
    headers = signing.headers(body)
    tampered = body.replace(b"000000000001", b"000000000002")
    problem = rejected(signing, headers, tampered)
    assert problem.result == webhooks.BAD_SIGNATURE
    assert "does not match" in problem.reason


@pytest.mark.parametrize(
    ("drop", "why"),
    [
        ("authorization", "no signature"),
        ("x-ms-certificate-url", "no X-MS-Certificate-Url"),
    ],
)
def test_missing_headers_are_rejected_before_any_download(
    signing: Signing, drop: str, why: str
) -> None:
    body = event()
    headers = signing.headers(body)
    del headers[drop]
    assert why in rejected(signing, headers, body).reason
    assert signing.fetched == []


def test_signature_that_is_not_base64_or_another_algorithm_is_rejected(signing: Signing) -> None:
    body = event()
    headers = {**signing.headers(body), "authorization": "Signature not*base64"}
    assert rejected(signing, headers, body).result == webhooks.BAD_SIGNATURE
    headers = {**signing.headers(body), "x-ms-signature-algorithm": "hmac-sha1"}
    assert "unsupported signature algorithm" in rejected(signing, headers, body).reason


def test_a_certificate_host_off_the_list_is_never_contacted(signing: Signing) -> None:
    body = event()
    problem = rejected(signing, signing.headers(body, host="localhost"), body)
    assert problem.result == webhooks.UNTRUSTED_CERTIFICATE
    assert "not in webhooks.certificate_hosts" in problem.reason
    headers = signing.headers(body)
    headers["x-ms-certificate-url"] = headers["x-ms-certificate-url"].replace("https", "http")
    assert "is not https" in rejected(signing, headers, body).reason
    assert signing.fetched == []


@pytest.mark.parametrize(
    ("certificate", "why"),
    [
        ("untrusted", "does not chain to a trusted root"),
        ("expired", "is not valid now"),
        ("wrong-issuer", "not Microsoft Corporation"),
    ],
)
def test_certificates_microsoft_did_not_issue_are_rejected(
    signing: Signing, certificate: str, why: str
) -> None:
    body = event()
    problem = rejected(signing, signing.headers(body, certificate), body)
    assert problem.result == webhooks.UNTRUSTED_CERTIFICATE
    assert why in problem.reason


def test_without_trust_roots_the_system_store_decides(
    signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trust_roots unset: the system's store (here SSL_CERT_FILE, the sandbox's root, which
    holds only the root above Microsoft's issuing CA) is the anchor; the rogue CA is not in it."""
    side = signing.sandbox.webhooks
    config = WebhooksConfig(
        certificate_hosts=[side.certificate_host], issuer_hosts=[side.issuer_host]
    )
    verifier = Verifier(config)
    body = event()
    verifier.verify(signing.headers(body), body)
    with pytest.raises(Rejected, match="system's trust store"):
        verifier.verify(signing.headers(body, "untrusted"), body)


def test_the_download_itself_must_be_trusted_tls(
    signing: Signing, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other = tmp_path / "unrelated.pem"
    other.write_bytes(signing.sandbox.webhooks.certificates.other.cert_pem.bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(other))
    body = event()
    problem = rejected(signing, signing.headers(body), body)
    assert problem.result == webhooks.UNTRUSTED_CERTIFICATE
    assert "cannot download the certificate" in problem.reason


def test_each_certificate_url_is_downloaded_once_even_by_a_burst(signing: Signing) -> None:
    bodies = [event(f"4f0e1c9a-0000-4000-8000-{n:012d}") for n in range(20)]
    errors: list[BaseException] = []

    def verify(body: bytes) -> None:
        try:
            signing.verifier.verify(signing.headers(body), body)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=verify, args=(body,)) for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # the certificate, then its issuing CA from its AIA URL: each once
    assert signing.fetched == [f"/cert/{GOOD}.cer", ISSUER_PATH]


def test_a_slow_certificate_host_times_out(
    signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webhook_certificates, "CERTIFICATE_TIMEOUT", 0.5)
    body = event()
    problem = rejected(signing, signing.headers(body, "slow"), body)
    assert problem.result == webhooks.UNTRUSTED_CERTIFICATE
    assert "timed out" in problem.reason
    # a failed download is not retried for every event (at most once a minute)
    assert "timed out" in rejected(signing, signing.headers(body, "slow"), body).reason
    assert signing.fetched.count("/cert/slow.cer") == 1


def test_something_else_than_a_certificate_is_rejected(signing: Signing) -> None:
    body = event()
    headers = signing.headers(body)
    headers["x-ms-certificate-url"] = headers["x-ms-certificate-url"].replace("/cert/", "/none/")
    assert "answered 404" in rejected(signing, headers, body).reason


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("https://api.partnercenter.microsoft.com/engagements/v1/referrals/abc-123", "abc-123"),
        ("https://api.partnercenter.microsoft.com/engagements/v1/referrals/abc-123/", "abc-123"),
        ("https://x/referrals/..", None),
        ("https://x/referrals/a%2Fb", None),
        ("", None),
    ],
)
def test_referral_id_comes_from_the_resource_uri(uri: str, expected: str | None) -> None:
    assert referral_id(uri) == expected


def test_a_redelivery_has_the_same_key_and_another_change_does_not() -> None:
    first = b'{"EventName":"referral-updated","ResourceUri":"https://x/referrals/a",'
    again = first + b'"ResourceChangeUtcDate":"2026-11-16T16:19:06.3520276+00:00"}'
    spaced = again.replace(b",", b", ")
    later = again.replace(b"16:19:06", b"16:20:00")
    assert parse_event(again).key == parse_event(spaced).key
    assert parse_event(again).key != parse_event(later).key
    with pytest.raises(Rejected):
        parse_event(b"[1, 2]")


# --- the endpoint ---------------------------------------------------------------------------


CONFIG = """
[auth]
method = "env"
[state]
path = "{state}"
[policy]
[[policy.tiers]]
name = "new"
remaining = "14d"
notify = ["team"]
[channels]
team = "json://127.0.0.1:9/hook"
[server]
listen = "127.0.0.1:0"
[webhooks]
certificate_hosts = ["{host}"]
issuer_hosts = ["{issuer}"]
trust_roots = "{roots}"
"""


@dataclass
class Endpoint:
    client: TestClient
    counted: list[tuple[str, str]]
    woken: list[bool]
    state: Path
    signing: Signing
    receiver: Receiver


@pytest.fixture
def endpoint(signing: Signing, tmp_path: Path) -> Iterator[Endpoint]:
    text = CONFIG.format(
        state=tmp_path / "state.db",
        host=signing.sandbox.webhooks.certificate_host,
        issuer=signing.sandbox.webhooks.issuer_host,
        roots=signing.roots,
    )
    config = parse_config(text)
    counted: list[tuple[str, str]] = []
    woken: list[bool] = []
    receiver = Receiver(
        config,
        wake=lambda: woken.append(True),
        count=lambda event, result: counted.append((event, result)),
    )
    app = Starlette(routes=[receiver.route()])
    with TestClient(app) as client:
        yield Endpoint(client, counted, woken, tmp_path / "state.db", signing, receiver)


def post(endpoint: Endpoint, body: bytes, headers: dict[str, str] | None = None) -> Any:
    sent = endpoint.signing.headers(body) if headers is None else headers
    return endpoint.client.post("/webhooks/partner-center", content=body, headers=sent)


def test_a_verified_event_is_stored_answered_and_wakes_the_worker(endpoint: Endpoint) -> None:
    answer = post(endpoint, event())
    assert answer.status_code == 200
    assert endpoint.counted == [("referral-created", "ok")]
    assert endpoint.woken == [True]
    with Store(endpoint.state) as store:
        assert store.pending_webhook_leads() == ["4f0e1c9a-0000-4000-8000-000000000001"]
        assert store.last_webhook_event() is not None


def test_the_same_event_twice_is_answered_but_acted_on_once(endpoint: Endpoint) -> None:
    body = event()
    assert post(endpoint, body).status_code == 200
    assert post(endpoint, body).status_code == 200
    assert endpoint.counted == [("referral-created", "ok"), ("referral-created", "duplicate")]
    assert endpoint.woken == [True]


def test_while_a_poll_holds_the_state_file_events_are_answered_and_stored_later(
    endpoint: Endpoint,
) -> None:
    body = event()
    assert post(endpoint, event("warm-up")).status_code == 200  # the state file exists
    poll = sqlite3.connect(endpoint.state, isolation_level=None)
    poll.execute("BEGIN IMMEDIATE")  # what a running poll holds
    try:
        assert post(endpoint, body).status_code == 200
        assert post(endpoint, body).status_code == 200  # a redelivery meanwhile
        assert endpoint.receiver.parked == 2
    finally:
        poll.execute("ROLLBACK")
        poll.close()
    with Store(endpoint.state) as store:
        endpoint.receiver.flush(store)
        assert "4f0e1c9a-0000-4000-8000-000000000001" in store.pending_webhook_leads()
    assert endpoint.receiver.parked == 0
    assert endpoint.counted[1:] == [("referral-created", "ok"), ("referral-created", "duplicate")]


def test_a_forged_event_gets_401_and_is_not_stored(
    endpoint: Endpoint, capsys: pytest.CaptureFixture[str]
) -> None:
    body = event()
    headers = endpoint.signing.headers(body)
    answer = post(endpoint, body.replace(b"referral-created", b"referral-updated"), headers)
    assert answer.status_code == 401
    assert endpoint.counted == [("unverified", "bad_signature")]
    assert endpoint.woken == []
    with Store(endpoint.state) as store:
        assert store.last_webhook_event() is None
    logged = capsys.readouterr()
    assert "webhook.rejected" in logged.out + logged.err
    assert "000000000001" not in logged.out + logged.err  # nothing from the body is logged


def test_a_body_over_64_kib_gets_413_without_a_signature_check(endpoint: Endpoint) -> None:
    big = b'{"EventName":"referral-created","x":"' + b"x" * (64 * 1024) + b'"}'
    assert post(endpoint, big, {}).status_code == 413
    assert endpoint.signing.fetched == []


def test_test_events_are_answered_and_other_events_ignored(endpoint: Endpoint) -> None:
    test_body = _event_body("test-created", None, "c0ffee00-0000-4000-8000-000000000000")
    assert post(endpoint, test_body).status_code == 200
    other = b'{"EventName":"subscription-updated","ResourceUri":"https://x/s/1"}'
    assert post(endpoint, other).status_code == 200
    assert endpoint.counted == [("test-created", "ok"), ("other", "ignored")]
    assert endpoint.woken == []


def test_a_signed_body_that_is_no_event_gets_400(endpoint: Endpoint) -> None:
    assert post(endpoint, b"not json").status_code == 400
    assert endpoint.counted == [("unverified", "ignored")]


def test_only_post_is_accepted(endpoint: Endpoint) -> None:
    assert endpoint.client.get("/webhooks/partner-center").status_code == 405


# --- config -----------------------------------------------------------------------------------


def test_webhooks_config_problems_name_their_keys(tmp_path: Path) -> None:
    text = CONFIG.format(
        state=tmp_path / "s.db", host="https://x/", issuer="http://www.microsoft.com", roots=""
    )
    text = text.replace(
        "[webhooks]\n",
        '[webhooks]\npath = "no-slash"\nregistration_url = "ftp://x"\n'
        'forward_to = ["crm.example.com/hook"]\n',
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    problems = "\n".join(caught.value.problems)
    assert "webhooks.path" in problems
    assert "webhooks.certificate_hosts" in problems
    assert "webhooks.registration_url" in problems
    assert "webhooks.issuer_hosts" in problems
    assert "webhooks.forward_to" in problems


def test_webhooks_need_a_server(tmp_path: Path) -> None:
    text = CONFIG.format(state=tmp_path / "s.db", host="h", issuer="h", roots="").replace(
        '[server]\nlisten = "127.0.0.1:0"\n', ""
    )
    problems = cross_problems(parse_config(text))  # what check-config and the daemon's start add
    assert any("[webhooks] needs [server]" in problem for problem in problems)


def test_trust_roots_are_relative_to_the_config_file(tmp_path: Path) -> None:
    text = CONFIG.format(state=tmp_path / "s.db", host="h", issuer="h", roots="roots.pem")
    config = parse_config(text, source=tmp_path / "referral-watch.toml")
    assert config.webhooks is not None
    assert config.webhooks.trust_roots == tmp_path / "roots.pem"


def test_failed_downloads_are_remembered_only_up_to_a_bound(
    signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forger naming endless paths on an allowed host cannot grow the memory of failures:
    beyond the bound the oldest is forgotten (and would be tried again)."""
    monkeypatch.setattr(webhook_certificates, "FAILURES_KEPT", 1)
    body = event()

    def on_path(path: str) -> dict[str, str]:
        headers = signing.headers(body)
        headers["x-ms-certificate-url"] = headers["x-ms-certificate-url"].replace("/cert/", path)
        return headers

    for path in ("/a/", "/b/", "/a/"):
        assert "answered 404" in rejected(signing, on_path(path), body).reason
    assert [p.split("/")[1] for p in signing.fetched] == ["a", "b", "a"]


# --- signature headers, the chain through AIA, bounded downloads (issues 24, 25.5) ----------


@pytest.mark.parametrize(
    "form",
    ["authorization", "x-ms-signature with scheme", "x-ms-signature bare"],
)
def test_each_signature_header_form_verifies(signing: Signing, form: str) -> None:
    body = event()
    headers = signing.headers(body)
    value = headers.pop("authorization").removeprefix("Signature ")
    if form == "authorization":
        headers["authorization"] = f"Signature {value}"
    elif form == "x-ms-signature with scheme":
        headers["x-ms-signature"] = f"Signature {value}"
    else:
        headers["x-ms-signature"] = value
    signing.verifier.verify(headers, body)


def test_an_event_without_the_algorithm_header_is_refused(endpoint: Endpoint) -> None:
    body = event()
    headers = endpoint.signing.headers(body)
    del headers["x-ms-signature-algorithm"]
    assert post(endpoint, body, headers).status_code == 401
    assert endpoint.counted == [("unverified", webhooks.BAD_SIGNATURE)]
    assert endpoint.signing.fetched == []  # refused before anything was fetched


def test_an_issuer_host_off_the_list_is_never_contacted(signing: Signing) -> None:
    side = signing.sandbox.webhooks
    verifier = Verifier(
        WebhooksConfig(
            certificate_hosts=[side.certificate_host],
            issuer_hosts=["www.microsoft.com"],  # the defaults: not the sandbox's issuer host
            trust_roots=signing.roots,
        )
    )
    body = event()
    with pytest.raises(Rejected) as caught:
        verifier.verify(signing.headers(body), body)
    assert "not in webhooks.issuer_hosts" in caught.value.reason
    assert signing.fetched == [f"/cert/{GOOD}.cer"]  # the issuer's URL was never asked for


def test_issuing_cas_from_the_intermediates_file_need_no_fetch(
    signing: Signing, tmp_path: Path
) -> None:
    side = signing.sandbox.webhooks
    intermediates = tmp_path / "intermediates.pem"
    intermediates.write_bytes(side.certificates.microsoft.cert_pem.bytes())
    verifier = Verifier(
        WebhooksConfig(
            certificate_hosts=[side.certificate_host],
            issuer_hosts=[],
            intermediates=intermediates,
            trust_roots=signing.roots,
        )
    )
    body = event()
    verifier.verify(signing.headers(body), body)
    assert signing.fetched == [f"/cert/{GOOD}.cer"]


def test_300_new_certificate_urls_cause_a_bounded_number_of_downloads(
    endpoint: Endpoint,
) -> None:
    """Forged events each naming a new certificate URL on an allowed host: a few are fetched,
    the rest refused (401) without fetching, and the refusal is logged once."""
    body = event()
    with capture_logs() as logs:
        for n in range(300):
            headers = endpoint.signing.headers(body)
            url = headers["x-ms-certificate-url"].replace(GOOD, f"forged-{n}")
            headers["x-ms-certificate-url"] = url
            assert post(endpoint, body, headers).status_code == 401
    downloads = [path for path in endpoint.signing.fetched if path.startswith("/cert/")]
    assert 0 < len(downloads) <= webhook_certificates.NEW_URLS_PER_MINUTE
    assert [line["event"] for line in logs].count("webhook.fetch_limited") == 1
    assert endpoint.receiver.verifier.budget.refused == 300 - len(downloads)
