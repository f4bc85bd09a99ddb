"""Sign-in and token providers, with the real MSAL library against a fake TLS identity endpoint."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msal
import pytest
import requests
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from structlog.testing import capture_logs

from referral_watch.config import Config
from referral_watch.config.loader import parse_config
from referral_watch.errors import AuthError
from referral_watch.partner_center.auth import (
    CommandTokenProvider,
    EnvTokenProvider,
    MsalTokenProvider,
    SignedIn,
    login,
    logout,
    token_provider,
)
from referral_watch.partner_center.token_cache import check_cache_permissions

from fakeidp import DEVICE_CODE_GRANT, FakeIdP, IdpRequest

CLIENT_ID = "0c1d0c1d-0000-4000-8000-00000000c1d0"
USER_IMPERSONATION = "https://api.partner.microsoft.com/user_impersonation"


def make_config(tmp_path: Path, authority: str, **auth: Any) -> Config:
    values: dict[str, Any] = {
        "tenant_id": "contoso.onmicrosoft.com",
        "client_id": CLIENT_ID,
        "authority": authority,
        "cache_path": str(tmp_path / "msal-cache.json"),
        **auth,
    }
    auth_table = "\n".join(f"{key} = {json.dumps(value)}" for key, value in values.items())
    text = f"""
        [auth]
        {auth_table}

        [state]
        path = {json.dumps(str(tmp_path / "state.db"))}

        [[policy.tiers]]
        name = "new"
        remaining = "14d"
        notify = []
    """
    return parse_config(textwrap.dedent(text), env={})


@pytest.fixture
def idp() -> Iterator[FakeIdP]:
    with FakeIdP() as fake:
        yield fake


@pytest.fixture
def session(idp: FakeIdP) -> requests.Session:
    return idp.session()


@pytest.fixture
def config(tmp_path: Path, idp: FakeIdP) -> Config:
    return make_config(tmp_path, idp.url)


@pytest.fixture
def signed_in(config: Config, session: requests.Session, idp: FakeIdP) -> SignedIn:
    idp.pending_polls = 0  # MSAL waits a whole second after "pending": only one test needs that
    return login(config, lambda _: None, http_client=session)


def cache_state(config: Config) -> dict[str, Any]:
    data = json.loads(config.cache_path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


# --- MSAL: login ---------------------------------------------------------------------------


def test_login_shows_microsofts_message_and_stores_a_private_cache(
    config: Config, session: requests.Session, idp: FakeIdP
) -> None:
    shown: list[str] = []

    who = login(config, shown.append, http_client=session)

    assert who == SignedIn("alice@contoso.example", idp.tenant_guid, "Alice Example")
    assert len(shown) == 1
    assert f"{idp.url}/devicelogin" in shown[0] and "enter the code" in shown[0]
    # The fake answered authorization_pending once: MSAL polled again and then got tokens.
    assert len(idp.token_requests(DEVICE_CODE_GRANT)) == 2
    assert config.cache_path.stat().st_mode & 0o777 == 0o600
    accounts = cache_state(config)["Account"].values()
    assert [a["username"] for a in accounts] == ["alice@contoso.example"]


def test_a_fresh_provider_reads_the_cache_and_needs_no_network_for_a_valid_token(
    signed_in: SignedIn, config: Config, session: requests.Session, idp: FakeIdP
) -> None:
    token = MsalTokenProvider(config, http_client=session).get_token()

    assert token == idp.issued_access_tokens[-1]  # the token issued at sign-in
    assert idp.token_requests("refresh_token") == []


def test_force_refresh_redeems_the_refresh_token_for_a_new_access_token(
    signed_in: SignedIn, config: Config, session: requests.Session, idp: FakeIdP
) -> None:
    first = idp.issued_access_tokens[-1]

    token = MsalTokenProvider(config, http_client=session).get_token(force_refresh=True)

    assert token != first
    assert token == idp.issued_access_tokens[-1]
    assert len(idp.token_requests("refresh_token")) == 1
    # The new token was saved: another provider (another process) gets it from the file.
    assert MsalTokenProvider(config, http_client=session).get_token() == token
    assert len(idp.token_requests("refresh_token")) == 1


def test_an_expired_access_token_is_refreshed_silently(
    config: Config, session: requests.Session, idp: FakeIdP
) -> None:
    idp.access_token_lifetime = 60  # MSAL treats tokens with < 5 minutes left as expired
    idp.pending_polls = 0
    login(config, lambda _: None, http_client=session)
    from_login = idp.issued_access_tokens[-1]

    token = MsalTokenProvider(config, http_client=session).get_token()

    assert token != from_login
    assert token == idp.issued_access_tokens[-1]
    assert len(idp.token_requests("refresh_token")) == 1


def test_a_revoked_refresh_token_asks_the_operator_to_sign_in_again(
    signed_in: SignedIn, config: Config, session: requests.Session, idp: FakeIdP
) -> None:
    idp.revoke()

    with pytest.raises(AuthError) as caught:
        MsalTokenProvider(config, http_client=session).get_token(force_refresh=True)

    assert caught.value.needs_login
    message = str(caught.value)
    assert "expired or was revoked" in message
    assert "invalid_grant" in message
    assert "run `referral-watch login`" in message


def test_without_a_signed_in_account_get_token_asks_for_login(
    config: Config, session: requests.Session, idp: FakeIdP
) -> None:
    with pytest.raises(AuthError) as caught:
        MsalTokenProvider(config, http_client=session).get_token()

    assert caught.value.needs_login
    assert str(caught.value) == (
        "Not signed in to Microsoft: run `referral-watch login` (see README, Sign in)"
    )
    assert idp.token_requests() == []


def test_logout_removes_the_account_and_its_tokens(
    signed_in: SignedIn, config: Config, session: requests.Session, idp: FakeIdP
) -> None:
    assert logout(config) == ["alice@contoso.example"]

    state = cache_state(config)
    assert state["Account"] == {} and state["RefreshToken"] == {} and state["AccessToken"] == {}
    text = config.cache_path.read_text(encoding="utf-8")
    assert not any(token in text for token in idp.issued_refresh_tokens)
    assert config.cache_path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(AuthError) as caught:
        MsalTokenProvider(config, http_client=session).get_token()
    assert caught.value.needs_login


def test_logout_when_never_signed_in_removes_nothing(config: Config) -> None:
    assert logout(config) == []
    assert not config.cache_path.exists()


def test_logout_clears_a_damaged_cache(config: Config) -> None:
    config.cache_path.write_text('{"RefreshToken": {"x": "fake-rt-secret"', encoding="utf-8")

    assert logout(config) == []
    assert "fake-rt-secret" not in config.cache_path.read_text(encoding="utf-8")


def test_login_replaces_an_account_signed_in_before(
    signed_in: SignedIn, config: Config, session: requests.Session, idp: FakeIdP
) -> None:
    idp.username, idp.name = "bob@contoso.example", "Bob Example"
    idp.object_id = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"

    who = login(config, lambda _: None, http_client=session)

    assert who.username == "bob@contoso.example"
    accounts = cache_state(config)["Account"].values()
    assert [a["username"] for a in accounts] == ["bob@contoso.example"]


def test_login_gives_up_after_the_login_timeout(
    tmp_path: Path, session: requests.Session, idp: FakeIdP
) -> None:
    idp.device_outcome = "never"
    config = make_config(tmp_path, idp.url, login_timeout="1s")

    with pytest.raises(AuthError, match=r"not completed within 1s \(auth.login_timeout\)"):
        login(config, lambda _: None, http_client=session)
    assert not config.cache_path.exists()


def test_login_declined_in_the_browser(
    config: Config, session: requests.Session, idp: FakeIdP
) -> None:
    idp.device_outcome = "decline"

    with pytest.raises(AuthError, match="declined in the browser"):
        login(config, lambda _: None, http_client=session)


def test_an_unknown_tenant_is_reported_as_a_configuration_problem(
    tmp_path: Path, session: requests.Session, idp: FakeIdP
) -> None:
    config = make_config(tmp_path, idp.url, tenant_id="nowhere.example")

    with pytest.raises(AuthError) as caught:
        login(config, lambda _: None, http_client=session)

    assert "nowhere.example" in str(caught.value)
    assert "auth.tenant_id" in str(caught.value)
    assert not caught.value.needs_login


def test_an_unreachable_identity_endpoint_is_not_a_login_problem(
    tmp_path: Path, session: requests.Session
) -> None:
    config = make_config(tmp_path, "https://127.0.0.1:9")  # discard port: nothing listens

    with pytest.raises(AuthError) as caught:
        MsalTokenProvider(config, http_client=session).get_token()

    assert not caught.value.needs_login
    assert str(caught.value).startswith("cannot reach 127.0.0.1 (Microsoft sign-in)")


def test_an_untrusted_certificate_is_reported_as_unreachable(tmp_path: Path, idp: FakeIdP) -> None:
    config = make_config(tmp_path, idp.url)
    with requests.Session() as untrusting:
        untrusting.trust_env = False  # the system CAs only: the fake's CA is not among them
        with pytest.raises(AuthError) as caught:
            MsalTokenProvider(config, http_client=untrusting).get_token()

    assert "cannot reach 127.0.0.1" in str(caught.value)
    assert "certificate verify failed" in str(caught.value)
    assert not caught.value.needs_login


def test_a_damaged_cache_asks_for_login_and_login_replaces_it(
    config: Config, session: requests.Session, idp: FakeIdP
) -> None:
    config.cache_path.write_text("not json", encoding="utf-8")

    with pytest.raises(AuthError, match="is damaged") as caught:
        MsalTokenProvider(config, http_client=session).get_token()
    assert caught.value.needs_login

    idp.pending_polls = 0
    login(config, lambda _: None, http_client=session)
    assert MsalTokenProvider(config, http_client=session).get_token()


# --- the cache file: permissions and concurrent writers -------------------------------------


def test_check_cache_permissions(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    assert check_cache_permissions(path) is None  # not there yet
    path.write_text("{}", encoding="utf-8")
    path.chmod(0o600)
    assert check_cache_permissions(path) is None
    path.chmod(0o644)
    warning = check_cache_permissions(path)
    assert warning is not None
    assert "0644" in warning and f"chmod 600 {path}" in warning


def test_a_readable_cache_is_reported_once_and_rewritten_private(
    signed_in: SignedIn, config: Config, session: requests.Session
) -> None:
    config.cache_path.chmod(0o644)

    with capture_logs() as logs:
        provider = MsalTokenProvider(config, http_client=session)
        provider.get_token(force_refresh=True)
        provider.get_token(force_refresh=True)

    warnings = [e for e in logs if e["event"] == "auth.cache_permissions"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert config.cache_path.stat().st_mode & 0o777 == 0o600  # the save replaced it


def test_a_save_keeps_what_another_writer_saved_meanwhile(
    signed_in: SignedIn, tmp_path: Path, config: Config, session: requests.Session, idp: FakeIdP
) -> None:
    other = MsalTokenProvider(
        make_config(tmp_path, idp.url, scope=USER_IMPERSONATION), http_client=session
    )
    other_tokens: list[str] = []

    def other_writer_saves_first(request: IdpRequest) -> None:
        if request.grant_type == "refresh_token" and not other_tokens:
            other_tokens.append("(running)")
            other_tokens.append(other.get_token(force_refresh=True))

    idp.on_token_request = other_writer_saves_first
    mine = MsalTokenProvider(config, http_client=session).get_token(force_refresh=True)
    idp.on_token_request = None

    # While our refresh was in flight the other writer saved its token; ours did not undo it.
    secrets = {e["secret"] for e in cache_state(config)["AccessToken"].values()}
    assert {mine, other_tokens[-1]} <= secrets
    assert other.get_token() == other_tokens[-1]


CHILD = """
import sys, requests
from referral_watch.partner_center.auth import MsalTokenProvider
from referral_watch.config.loader import load_config
from pathlib import Path

session = requests.Session()
session.trust_env = False
session.verify = sys.argv[2]
provider = MsalTokenProvider(load_config(Path(sys.argv[1]), env={}), http_client=session)
for _ in range(int(sys.argv[3])):
    provider.get_token(force_refresh=True)
print(provider.get_token())
"""


def test_processes_refreshing_at_once_leave_a_valid_cache(
    signed_in: SignedIn, tmp_path: Path, config: Config, idp: FakeIdP
) -> None:
    cache = str(config.cache_path)
    scopes = ["https://api.partner.microsoft.com/.default", USER_IMPERSONATION]
    children = []
    for n, scope in enumerate(scopes):
        path = tmp_path / f"child{n}.toml"
        path.write_text(
            f"[auth]\ntenant_id = 'contoso.onmicrosoft.com'\nclient_id = '{CLIENT_ID}'\n"
            f"authority = '{idp.url}'\ncache_path = '{cache}'\nscope = '{scope}'\n"
            f"[[policy.tiers]]\nname = 'new'\nremaining = '14d'\nnotify = []\n",
            encoding="utf-8",
        )
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, str(path), str(idp.ca_path), "5"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    finals = []
    for child in children:
        out, err = child.communicate(timeout=45)
        assert child.returncode == 0, err
        finals.append(out.strip().splitlines()[-1])  # after structlog's default output

    state = cache_state(config)  # valid JSON
    loaded = msal.SerializableTokenCache()
    loaded.deserialize(json.dumps(state))
    assert [a["username"] for a in loaded.search(msal.TokenCache.CredentialType.ACCOUNT)] == [
        "alice@contoso.example"
    ]
    secrets = {e["secret"] for e in state["AccessToken"].values()}
    assert set(finals) <= secrets  # both processes' last tokens survived the other's saves
    assert not list(tmp_path.glob(".msal-cache.json.*.tmp"))  # no temp file left behind
    assert len(idp.token_requests("refresh_token")) == 10


# --- secrets stay out of logs and messages --------------------------------------------------


def test_no_token_reaches_the_logs_or_an_error_message(
    config: Config, session: requests.Session, idp: FakeIdP, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # MSAL, urllib3 and filelock at their most talkative
    messages = []
    with capture_logs() as logs:
        login(config, messages.append, http_client=session)
        provider = MsalTokenProvider(config, http_client=session)
        provider.get_token()
        provider.get_token(force_refresh=True)
        idp.revoke()
        with pytest.raises(AuthError) as caught:
            provider.get_token(force_refresh=True)
        messages.append(str(caught.value))

    assert [e["event"] for e in logs if e["event"] == "auth.login"] == ["auth.login"]
    written = repr(logs) + caplog.text + "\n".join(messages)
    tokens = idp.issued_access_tokens + idp.issued_refresh_tokens
    assert len(tokens) == 4
    assert not [t for t in tokens if t in written]


# --- confidential clients -------------------------------------------------------------------


def test_a_confidential_client_refreshes_with_its_secret_but_cannot_log_in(
    signed_in: SignedIn, tmp_path: Path, session: requests.Session, idp: FakeIdP
) -> None:
    config = make_config(tmp_path, idp.url, client_secret="s3cret-value")

    with capture_logs() as logs:
        token = MsalTokenProvider(config, http_client=session).get_token(force_refresh=True)

    assert token == idp.issued_access_tokens[-1]
    refresh = idp.token_requests("refresh_token")[-1]
    assert refresh.form.get("client_secret") == "s3cret-value"  # MSAL sends it in the body
    assert "s3cret-value" not in repr(logs)
    with pytest.raises(AuthError, match="public clients only") as caught:
        login(config, lambda _: None, http_client=session)
    assert "s3cret-value" not in str(caught.value)


def test_a_confidential_client_can_use_a_certificate(
    signed_in: SignedIn, tmp_path: Path, session: requests.Session, idp: FakeIdP
) -> None:
    leaf = trustme.CA().issue_cert("referral-watch.example", key_type=trustme.KeyType.RSA)
    pem = tmp_path / "client.pem"
    pem.write_bytes(leaf.private_key_pem.bytes() + leaf.cert_chain_pems[0].bytes())
    der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(Encoding.DER)
    config = make_config(
        tmp_path,
        idp.url,
        client_certificate=str(pem),
        client_certificate_thumbprint=hashlib.sha1(der).hexdigest(),
    )

    token = MsalTokenProvider(config, http_client=session).get_token(force_refresh=True)

    assert token == idp.issued_access_tokens[-1]
    refresh = idp.token_requests("refresh_token")[-1]
    assert refresh.form["client_assertion_type"].endswith(":jwt-bearer")
    assert refresh.form["client_assertion"].count(".") == 2


# --- choosing a provider; msal stays unimported until needed --------------------------------


def test_token_provider_follows_auth_method(tmp_path: Path) -> None:
    msal_config = make_config(tmp_path, "https://login.microsoftonline.com")
    env_config = make_config(tmp_path, "https://x.example", method="env", token_env="PC_TOKEN")
    command_config = make_config(
        tmp_path, "https://x.example", method="command", command=["az", "x"], command_timeout="5s"
    )

    assert isinstance(token_provider(msal_config), MsalTokenProvider)
    env = token_provider(env_config)
    assert isinstance(env, EnvTokenProvider) and env.variable == "PC_TOKEN"
    command = token_provider(command_config)
    assert isinstance(command, CommandTokenProvider)
    assert command.command == ["az", "x"] and command.timeout == 5.0


def test_importing_auth_does_not_import_msal() -> None:
    code = "import sys, referral_watch.partner_center.auth; print('msal' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert result.stdout.strip() == "False"


# --- env -------------------------------------------------------------------------------------


def test_env_provider_reads_the_variable_at_each_call() -> None:
    environ = {"PC_TOKEN": "Bearer abc.def.ghi\n"}
    provider = EnvTokenProvider("PC_TOKEN", environ)

    assert provider.get_token() == "abc.def.ghi"
    environ["PC_TOKEN"] = "jkl"
    assert provider.get_token(force_refresh=True) == "jkl"


@pytest.mark.parametrize("environ", [{}, {"PC_TOKEN": "  "}])
def test_env_provider_names_a_missing_variable(environ: dict[str, str]) -> None:
    with pytest.raises(AuthError, match="environment variable PC_TOKEN is not set") as caught:
        EnvTokenProvider("PC_TOKEN", environ).get_token()
    assert not caught.value.needs_login


# --- command ---------------------------------------------------------------------------------


def python_command(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_command_provider_reuses_its_token_until_forced(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    command = python_command(
        f"""
        from pathlib import Path
        runs = Path({str(runs)!r})
        n = len(runs.read_text()) if runs.exists() else 0
        runs.write_text("x" * (n + 1))
        print(f"token-{{n + 1}}")
        """
    )
    provider = CommandTokenProvider(command, timeout=20)

    assert provider.get_token() == "token-1"
    assert provider.get_token() == "token-1"  # reused: the program ran once
    assert provider.get_token(force_refresh=True) == "token-2"
    assert runs.read_text() == "xx"


def test_command_provider_accepts_az_json_output() -> None:
    command = python_command(
        """
        import json
        print(json.dumps({"accessToken": "eyJ0eXAi.abc.def", "tokenType": "Bearer"}, indent=2))
        """
    )
    assert CommandTokenProvider(command, timeout=20).get_token() == "eyJ0eXAi.abc.def"


def test_command_failure_shows_the_program_and_the_end_of_its_stderr() -> None:
    command = python_command(
        """
        import sys
        for n in range(1, 9):
            print(f"problem line {n}", file=sys.stderr)
        sys.exit(3)
        """
    )

    with pytest.raises(AuthError) as caught:
        CommandTokenProvider(command, timeout=20).get_token()

    message = str(caught.value)
    assert message.startswith(f"{sys.executable} (auth.command) failed with exit status 3: ")
    assert "problem line 8" in message and "problem line 4" in message
    assert "problem line 3" not in message  # only the last lines


def test_command_that_prints_nothing_is_an_error() -> None:
    command = python_command("print('   ')")
    with pytest.raises(AuthError, match="printed no token"):
        CommandTokenProvider(command, timeout=20).get_token()


def test_command_that_prints_several_lines_is_refused_without_echoing_them() -> None:
    command = python_command("print('WARNING: something'); print('secret-token-value')")
    with pytest.raises(AuthError, match="printed more than a token") as caught:
        CommandTokenProvider(command, timeout=20).get_token()
    assert "secret-token-value" not in str(caught.value)


def test_command_that_hangs_is_stopped_at_the_timeout() -> None:
    command = python_command("import time; time.sleep(30)")

    with pytest.raises(AuthError, match=r"did not finish within 0.5s"):
        CommandTokenProvider(command, timeout=0.5).get_token()


def test_command_that_does_not_exist(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-az")
    with pytest.raises(AuthError, match="program not found") as caught:
        CommandTokenProvider([missing, "account"], timeout=5).get_token()
    assert missing in str(caught.value)


def test_command_runs_without_a_shell() -> None:
    command = [*python_command("import sys; print(sys.argv[1])"), "$HOME|tok"]
    assert CommandTokenProvider(command, timeout=20).get_token() == "$HOME|tok"
