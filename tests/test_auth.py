"""Credentials that never print (`Secret`, the bearer header, scrubbing a secret out of any text), and
OAuth tokens that stay fresh, against a loopback workspace that mints and refuses them."""

from __future__ import annotations

import pickle
import time
from typing import Callable

import pytest

from tests.workspace import CLIENT_ID, CLIENT_SECRET, Workspace
from udfs.auth import CredentialError, DriverRelay, OAuthM2M, SdkCredentials, Secret, Snapshot, bearer, scrub
from udfs.engine import Engine
from udfs.spec import EngineSpec, RetrySpec
from udfs.transport import TransportError

# Not hex, so no run id or hash can contain a piece of it by chance.
TOKEN = "dapi-TEST-Zq7w-SECRET-kx9R-v4lue-0042"


def test_a_secret_prints_as_stars_everywhere_but_reveal():
    s = Secret(TOKEN)
    assert repr(s) == str(s) == f"{s}" == f"{s:>30}" == "Secret('****')"
    assert s.reveal() == TOKEN
    assert pickle.loads(pickle.dumps(s)) == s  # it travels to the executors intact
    with pytest.raises(ValueError, match="non-empty"):
        Secret("")


def test_bearer_builds_the_header_as_a_secret():
    assert bearer(Secret(TOKEN)) == {"Authorization": Secret(f"Bearer {TOKEN}")}
    assert bearer(None) == {}


def test_scrub_removes_the_header_value_and_the_bare_credential():
    header = Secret(f"Bearer {TOKEN}")
    text = f"got 'Bearer {TOKEN}' and then just {TOKEN}, twice: {TOKEN}"
    assert scrub(text, [header, None]) == "got '****' and then just ****, twice: ****"
    assert scrub("nothing here", [header]) == "nothing here"


@pytest.mark.parametrize("part", ["prefix", "suffix", "middle"])
def test_scrub_removes_any_run_of_eight_characters_of_the_token(part):
    """An endpoint that quotes only part of a token (`dapi` and 11 more characters) still leaks it."""
    run = {"prefix": TOKEN[:15], "suffix": TOKEN[-9:], "middle": TOKEN[12:20]}[part]
    assert len(run) >= 8
    text = f"token {run} rejected"
    assert scrub(text, [Secret(f"Bearer {TOKEN}")]) == "token **** rejected"
    assert scrub(text, [Secret(TOKEN)]) == "token **** rejected"
    # Seven characters are not a secret's worth: ordinary words must survive.
    assert scrub(f"token {TOKEN[:7]} rejected", [Secret(TOKEN)]) == f"token {TOKEN[:7]} rejected"


# -- credentials that change during a run: a service principal's OAuth, minted by databricks-sdk --------

def m2m(ws, secret: str = CLIENT_SECRET) -> OAuthM2M:
    return OAuthM2M(f"{ws.url}/oidc/v1/token", CLIENT_ID, Secret(secret))


def test_oauth_m2m_mints_a_token_and_is_due_a_quarter_of_its_life_before_it_expires():
    with Workspace(token_life_s=40.0) as ws:
        creds = m2m(ws)
        assert creds.due(time.time()) and creds.header() is None
        creds.refresh()
        first = creds.header()
        assert first.reveal().startswith("Bearer oauth-1-") and creds.generation == 1
        assert not creds.due(time.time()) and creds.due(creds.expires_at - 9.9)  # 40 s / 4 = 10 s ahead
        creds.refresh()
        assert creds.header() != first and first in creds.secrets()  # an old token is still scrubbed
    assert CLIENT_SECRET not in repr(creds) and "oauth-" not in repr(creds)


@pytest.mark.parametrize("life_s, margin_s", [(40.0, 10.0), (3600.0, 300.0)], ids=["a quarter", "5 minutes at most"])
def test_an_oauth_token_is_refreshed_a_quarter_of_its_life_before_it_expires_and_at_most_5_minutes(life_s, margin_s):
    """Not before, not after: a 40 s token 10 s ahead, a one-hour token at 55 minutes (not 45)."""
    with Workspace(token_life_s=life_s) as ws:
        creds = m2m(ws)
        creds.refresh()
    due_at = creds.expires_at - margin_s
    assert creds.expires_at - creds.issued_at == pytest.approx(life_s, abs=1.0)
    assert not creds.due(due_at - 0.5) and creds.due(due_at + 0.5)


def test_oauth_m2m_travels_to_a_task_with_its_token_and_mints_its_own_there():
    with Workspace(token_life_s=40.0) as ws:
        creds = m2m(ws)
        creds.refresh()
        shipped = pickle.loads(pickle.dumps(creds.for_tasks()))
        assert shipped.header() == creds.header() and not shipped.due(time.time())
        shipped.refresh()
        assert shipped.header().reveal().startswith("Bearer oauth-2-")
        assert [p for m, p, _ in ws.requests if m == "POST"] == ["/oidc/v1/token"] * 2


def test_a_refused_client_secret_is_a_credential_error_that_shows_no_secret():
    with Workspace() as ws:
        with pytest.raises(CredentialError) as err:
            m2m(ws, secret="wrong-secret-Zq7wkx9R").refresh()
    assert str(err.value).startswith(f"could not get an OAuth token from {ws.url}/oidc/v1/token: ValueError: "
                                     "invalid_client: Client authentication failed")
    assert "wrong-secret" not in str(err.value)


def chat(ws, creds, **kw) -> EngineSpec:
    return EngineSpec(url=f"{ws.url}/serving-endpoints/llm/invocations", task="llm/v1/chat", credentials=creds,
                      retry=RetrySpec(backoff_base_s=0.01), **kw)


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_token_is_refreshed_once_and_the_row_goes_through(status):
    with Workspace(token_life_s=60.0) as ws:
        ws.refuse_with = status
        creds = m2m(ws)
        creds.refresh()
        ws.tokens.clear()  # the workspace forgot the token: it is refused, as an expired one would be
        with Engine(chat(ws, creds)) as engine:
            [o] = engine.call(["x"])
        calls = ws.invocations()
    assert (o.status, o.attempts) == ("ok", 2)
    assert [n for _, n in calls] == [None, 2]  # refused with the old token, answered with a new one


def test_a_token_refused_again_after_a_refresh_is_a_credential_refused_row():
    with Workspace(token_life_s=0.0) as ws:  # every token is refused
        creds = m2m(ws)
        creds.refresh()
        with Engine(chat(ws, creds)) as engine:
            [o] = engine.call(["x"])
    assert (o.status, o.attempts, o.http_status) == ("error", 2, 401)
    assert o.error == ("credential_refused: http_401: UNAUTHENTICATED: Token expired or invalid; send a fresh "
                       "OAuth token. (refused again after a token refresh)")


def test_a_static_token_refused_is_an_http_401_row_as_before():
    with Workspace() as ws:
        spec = EngineSpec(url=f"{ws.url}/serving-endpoints/llm/invocations", task="llm/v1/chat",
                          headers=bearer(Secret(TOKEN)), retry=RetrySpec(backoff_base_s=0.01))
        with Engine(spec) as engine:
            [o] = engine.call(["x"])
    assert (o.status, o.attempts, o.error) == (
        "error", 1, "http_401: UNAUTHENTICATED: Token expired or invalid; send a fresh OAuth token.")


@pytest.mark.parametrize("client", ["aiohttp", "urllib3", "requests"])
@pytest.mark.parametrize("when", ["first", "after a 401"])
def test_a_token_with_a_line_break_stops_the_task_before_it_is_sent(client, when):
    """A token endpoint that sends CR/LF in a token would inject headers: the task stops at once with a
    fatal `invalid_header` that shows no token, and no request carries it, whichever client sends."""
    with Workspace(token_life_s=60.0) as ws:
        creds = m2m(ws)
        if when == "after a 401":
            creds.refresh()
            ws.tokens.clear()  # the token held is refused: the caller refreshes it
        ws.token_suffix = "\r\nX-Injected: 1"
        with Engine(chat(ws, creds, http_client=client)) as engine:
            [o] = engine.call(["x"])
            with pytest.raises(TransportError) as err:
                list(engine.map_batches([["a", "b", "c"]]))
        calls = ws.invocations()
    assert calls == ([] if when == "first" else [("/serving-endpoints/llm/invocations", None)])
    assert (o.status, o.http_status) == ("error", None)
    assert o.error.startswith("invalid_header: ") and err.value.kind == "invalid_header" and err.value.fatal
    assert "line break" in o.error and "oauth-" not in o.error + str(err.value)
    assert o.error.startswith(f"invalid_header: OAuthM2M(client_id='{CLIENT_ID}', ")  # where the token came from


def driver_credentials(header: Callable[[], str]) -> SdkCredentials:
    """databricks-sdk's unified auth as a job's own token (`runtime`): `header()` each time it is asked."""
    from databricks.sdk.config import Config

    class Refreshing:
        def auth_type(self) -> str:
            return "runtime"

        def __call__(self, cfg):
            return lambda: {"Authorization": header()}

    # Nothing listens on port 9: host-metadata discovery must give up at once, not after 300 s of retries.
    return SdkCredentials(Config(host="http://127.0.0.1:9", credentials_strategy=Refreshing(),
                                 retry_timeout_seconds=1, http_timeout_seconds=1))


def test_the_driver_s_relay_hands_its_current_token_to_tasks_that_hold_its_key_only():
    """`jobs.endpoint.token_relay`: tasks (a pickled `SdkCredentials` becomes a `DriverRelay`) ask the driver for
    its current token; a request without the run's key is refused; no secret in any repr."""
    from jobs.endpoint.token_relay import relay_for

    minted = iter(range(1, 100))
    creds = driver_credentials(lambda: f"Bearer job-token-{next(minted)}-Zq7wkx9R")
    spec = EngineSpec(url="http://127.0.0.1:9/", credentials=creds)
    with relay_for(spec, None):
        task = pickle.loads(pickle.dumps(creds))
        assert isinstance(task, DriverRelay) and task.header() == creds.header()
        task.refresh()
        assert task.header().reveal() == creds.header().reveal() != "Bearer job-token-1-Zq7wkx9R"
        assert task.generation == 1
        thief = DriverRelay(task.url, Secret("not-the-key"), header=None, expires_at=None)
        with pytest.raises(CredentialError, match=r"HTTP 403$"):
            thief.refresh()
    assert "Zq7wkx9R" not in repr(task) + repr(creds) and "X-Relay" not in repr(task)
    assert isinstance(pickle.loads(pickle.dumps(creds)), Snapshot)  # no relay: a snapshot, as before


@pytest.mark.parametrize("expires_in_s, sent", [(59.0, True), (61.0, False)], ids=["within", "outside"])
def test_a_told_expiry_is_due_a_minute_before_it(expires_in_s, sent):
    """`KNOWN_EXPIRY_MARGIN_S`: a header whose expiry the driver told is refreshed a minute ahead; an
    expiry not told is never due (the endpoint's 401 says when)."""
    now = time.time()
    key = Secret("relay-key-Zq7wkx9R")
    relay = DriverRelay("http://127.0.0.1:9/token", key, header=Secret(f"Bearer {TOKEN}"),
                        expires_at=now + expires_in_s)
    assert relay.due(now) is sent
    assert not DriverRelay(relay.url, key, header=None, expires_at=None).due(now)


@pytest.mark.parametrize("expires_in_s, token", [(30.0, 2), (120.0, 1)], ids=["within", "outside"])
def test_a_task_refreshes_a_token_within_the_margin_before_sending_not_one_outside(expires_in_s, token):
    """A task's `DriverRelay` holds the driver's token 1; the driver says it expires in `expires_in_s`.
    Within the minute's margin the task asks the relay first and sends token 2; outside it, it sends
    token 1 and asks nothing."""
    from jobs.endpoint.token_relay import relay_for

    with Workspace() as ws:
        creds = driver_credentials(lambda: f"Bearer {ws.issue()['access_token']}")  # each a token of `ws`
        with relay_for(EngineSpec(url="http://127.0.0.1:9/", credentials=creds), None):
            task = pickle.loads(pickle.dumps(creds))
            assert isinstance(task, DriverRelay) and task.header() == creds.header()
            task.expires_at = time.time() + expires_in_s
            with Engine(chat(ws, task)) as engine:
                [o] = engine.call(["x"])
        calls = ws.invocations()
    assert o.status == "ok" and calls == [("/serving-endpoints/llm/invocations", token)]
    assert task.generation == token - 1


def test_tasks_refused_at_once_make_the_driver_refresh_its_token_once():
    """`REFRESH_AT_MOST_EVERY_S`: five tasks asking the relay within a second get one new token, not five
    (the driver's token source is not asked once per task)."""
    from jobs.endpoint.token_relay import relay_for

    minted = iter(range(1, 100))
    creds = driver_credentials(lambda: f"Bearer job-token-{next(minted)}-Zq7wkx9R")
    with relay_for(EngineSpec(url="http://127.0.0.1:9/", credentials=creds), None):
        tasks = [pickle.loads(pickle.dumps(creds)) for _ in range(5)]
        for task in tasks:
            task.refresh()
    assert {t.header().reveal() for t in tasks} == {creds.header().reveal()} == {"Bearer job-token-2-Zq7wkx9R"}
