"""`batch-inference-endpoint` against a loopback server speaking the serving-endpoints REST API."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.cli.serving_endpoint import main
from jobs.endpoint.serving_endpoints import SpecError, check_spec, differences, load_spec

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "dummy-test-token"


class ServingAPI:
    """A stand-in for a workspace's `/api/2.0/serving-endpoints` on 127.0.0.1; it records every call.

    Like the real service it fills in what the caller left out (served entity names, state, traffic),
    and a new config rolls out over `rollout_polls` GETs (NOT_READY or IN_PROGRESS) before it is served.
    """

    def __init__(self, rollout_polls: int = 2, never_ready: bool = False) -> None:
        self.rollout_polls, self.never_ready = rollout_polls, never_ready
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, Any]] = []
        self.auth: set[str | None] = set()
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw) if raw else None
                if self.path.startswith("/.well-known/"):  # databricks-sdk's host metadata probe
                    return self._send(200, {"oidc_endpoint": f"http://{self.headers['Host']}/oidc"})
                with api._lock:
                    api.calls.append((self.command, self.path, body))
                    api.auth.add(self.headers.get("Authorization"))
                    self._send(*api.handle(self.command, self.path.split("?")[0], body))

            def _send(self, status: int, value: Any) -> None:
                data = json.dumps(value).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        base = "/api/2.0/serving-endpoints"
        m = re.fullmatch(base + r"/([^/]+)(/config)?", path)
        if method == "POST" and path.rstrip("/") == base:
            if body["name"] in self.endpoints:
                return 409, {"error_code": "RESOURCE_ALREADY_EXISTS", "message": f"{body['name']} exists"}
            self.endpoints[body["name"]] = {"name": body["name"], "id": "e1", "creator": "ci@example.com",
                                            "tags": body.get("tags", []), "_pending": _served(body["config"]),
                                            "_polls": self.rollout_polls}
            return 200, self.view(body["name"], poll=False)
        if m and m.group(1) not in self.endpoints:
            return 404, {"error_code": "RESOURCE_DOES_NOT_EXIST",
                         "message": f"Endpoint {m.group(1)} not found"}
        if method == "GET" and m and not m.group(2):
            return 200, self.view(m.group(1), poll=True)
        if method == "PUT" and m and m.group(2):
            endpoint = self.endpoints[m.group(1)]
            if endpoint.get("_pending") is not None:
                return 409, {"error_code": "RESOURCE_CONFLICT", "message": "an update is in progress"}
            endpoint.update(_pending=_served(body), _polls=self.rollout_polls)
            return 200, self.view(m.group(1), poll=False)
        return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"no route {method} {path}"}

    def view(self, name: str, poll: bool) -> dict[str, Any]:
        e = self.endpoints[name]
        if e.get("_pending") is not None and poll and not self.never_ready:
            e["_polls"] -= 1
            if e["_polls"] < 0:
                e["config"], e["_pending"] = e["_pending"], None
        rolling = e.get("_pending") is not None
        state = {"ready": "READY" if "config" in e else "NOT_READY",
                 "config_update": "IN_PROGRESS" if rolling else "NOT_UPDATING"}
        out = {k: v for k, v in e.items() if not k.startswith("_")}
        return {**out, "state": state, **({"pending_config": e["_pending"]} if rolling else {})}

    def writes(self) -> list[tuple[str, str, Any]]:
        return [c for c in self.calls if c[0] != "GET"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _served(config: dict[str, Any]) -> dict[str, Any]:
    entities = []
    for e in config["served_entities"]:
        name = e.get("name") or (e["external_model"]["name"] if "external_model" in e
                                 else f"{e['entity_name'].split('.')[-1]}-{e['entity_version']}")
        entities.append({**e, "name": name, "creator": "ci@example.com", "creation_timestamp": 1,
                         "state": {"deployment": "DEPLOYMENT_READY"}})
    routes = [{"served_model_name": e["name"], "traffic_percentage": 100 // len(entities)} for e in entities]
    return {"served_entities": entities, "traffic_config": {"routes": routes}, "config_version": 1}


@pytest.fixture
def api(monkeypatch, tmp_path):
    server = ServingAPI()
    # Credentials for the deploy client exist only inside the test, pointed at the loopback server.
    for var in ("DATABRICKS_CONFIG_PROFILE", "DATABRICKS_CLIENT_ID", "DATABRICKS_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DATABRICKS_HOST", server.url)
    monkeypatch.setenv("DATABRICKS_TOKEN", TOKEN)
    monkeypatch.setenv("DATABRICKS_CONFIG_FILE", str(tmp_path / "no.databrickscfg"))
    yield server
    server.close()


def run(capsys, *args: str) -> tuple[int, dict[str, Any] | None]:
    rc = main([*args, "--poll-s", "0.01", "--timeout-s", "10"])
    out = capsys.readouterr().out.strip()
    return rc, json.loads(out.splitlines()[-1]) if out else None


EMBEDDINGS_ENTITY = {
    "name": "text-embedding-3-small",
    "external_model": {"name": "text-embedding-3-small", "provider": "openai", "task": "llm/v1/embeddings",
                       "openai_config": {"openai_api_key": "{{secrets/llm_keys/openai-api-key}}"}},
}


def test_creates_once_then_leaves_alone_then_updates_only_the_config(api, capsys, tmp_path):
    spec = str(ROOT / "conf" / "endpoint_openai_embeddings.yml")
    rc, out = run(capsys, "--spec", spec, "--dry-run")
    assert (rc, out["action"], api.calls) == (0, "would_create", [
        ("GET", "/api/2.0/serving-endpoints/openai-embeddings", None)])

    rc, out = run(capsys, "--spec", spec)
    assert (rc, out["action"], out["state"]) == (
        0, "created", {"ready": "READY", "config_update": "NOT_UPDATING"})
    assert api.writes() == [("POST", "/api/2.0/serving-endpoints/", {
        "name": "openai-embeddings",
        "config": {"served_entities": [EMBEDDINGS_ENTITY]},
        "tags": [{"key": "owner", "value": "batch-inference"}],
    })]
    assert api.auth == {f"Bearer {TOKEN}"}
    polls = [c for c in api.calls if c[0] == "GET"]
    assert len(polls) == 1 + 1 + 3  # dry run, existence check, two rollout polls and the ready one

    api.calls.clear()
    rc, out = run(capsys, "--spec", spec)
    assert (rc, out["action"], api.writes()) == (0, "unchanged", [])

    changed = yaml.safe_load(Path(spec).read_text())
    changed["config"]["served_entities"][0]["external_model"]["name"] = "text-embedding-3-large"
    (tmp_path / "changed.yml").write_text(yaml.safe_dump(changed))
    rc, out = run(capsys, "--spec", str(tmp_path / "changed.yml"))
    assert (rc, out["action"], out["differences"]) == (
        0, "updated", ["config.served_entities[0].external_model.name"])
    new_entity = {**EMBEDDINGS_ENTITY, "external_model": {**EMBEDDINGS_ENTITY["external_model"],
                                                          "name": "text-embedding-3-large"}}
    assert api.writes() == [("PUT", "/api/2.0/serving-endpoints/openai-embeddings/config",
                             {"served_entities": [new_entity]})]
    assert api.endpoints["openai-embeddings"]["config"]["served_entities"][0]["external_model"]["name"] == (
        "text-embedding-3-large")


def test_a_served_entity_spec_is_created_and_compared_through_server_defaults(api, capsys):
    spec = str(ROOT / "conf" / "endpoint_uc_model.yml")
    assert run(capsys, "--spec", spec)[1]["action"] == "created"
    assert api.writes()[0][2] == {"name": "bge-small-embeddings", "config": {"served_entities": [{
        "name": "bge-small-1", "entity_name": "main.models.bge_small_en", "entity_version": "1",
        "workload_size": "Small", "scale_to_zero_enabled": True}]}}
    api.calls.clear()
    assert run(capsys, "--spec", spec)[1]["action"] == "unchanged"
    assert api.writes() == []


@pytest.mark.parametrize("openai_config, key", [
    ({"openai_api_key": "sk-live-0123456789abcdefghijkl"}, "openai_config.openai_api_key"),
    ({"openai_api_key": "plain-words-key"}, "openai_config.openai_api_key"),
    ({"openai_api_key_plaintext": "plain-words-key"}, "openai_config.openai_api_key_plaintext"),
])
def test_a_literal_key_is_refused_before_any_request(api, capsys, caplog, tmp_path, openai_config, key):
    spec = {"name": "leaky", "config": {"served_entities": [{"external_model": {
        "name": "gpt-4o-mini", "provider": "openai", "task": "llm/v1/chat",
        "openai_config": openai_config}}]}}
    (tmp_path / "leaky.yml").write_text(yaml.safe_dump(spec))
    rc, out = run(capsys, "--spec", str(tmp_path / "leaky.yml"))
    assert (rc, out, api.calls) == (2, None, [])
    assert f"config.served_entities[0].external_model.{key}" in caplog.text
    assert next(iter(openai_config.values())) not in caplog.text + capsys.readouterr().err


def test_an_endpoint_that_never_gets_ready_times_out_with_its_state(monkeypatch, capsys, caplog, api):
    api.never_ready = True
    rc = main(["--spec", str(ROOT / "conf" / "endpoint_openai_chat.yml"), "--poll-s", "0.05",
               "--timeout-s", "0.3"])
    assert rc == 1
    assert ("endpoint my-chat: not ready after 0.3s (ready=NOT_READY, config_update=IN_PROGRESS)"
            in caplog.text)
    assert [c[0] for c in api.writes()] == ["POST"]


# -- the spec and the comparison, without HTTP -------------------------------------------------------

@pytest.mark.parametrize("path", sorted((ROOT / "conf").glob("endpoint_*.yml")), ids=lambda p: p.name)
def test_every_shipped_spec_is_valid(path):
    assert load_spec(path)["config"]["served_entities"]


@pytest.mark.parametrize("spec, message", [
    ({"name": "x", "config": {"served_entities": []}}, r"config.served_entities: a non-empty list"),
    ({"name": "x", "confg": {}}, r"unknown key\(s\) \['confg'\]"),
    ({"name": "bad name", "config": {"served_entities": [{}]}}, r"name must be"),
    ({"name": "x", "config": {"served_entities": [{"entity_name": "m", "external_model": {}}]}},
     r"served_entities\[0\]: give exactly one of external_model or entity_name"),
    ({"name": "x", "config": {"served_entities": [{"external_model": {"name": "m", "task": "llm/v1/chat",
                                                                      "provider": "opnai"}}]}},
     r"external_model.provider: 'opnai' is not one of"),
    ({"name": "x", "config": {"served_entities": [{"entity_name": "m", "environment_vars": {
        "HF_TOKEN": "hf_abcdefghijklmnop"}}]}},
     r"environment_vars.HF_TOKEN: a literal credential is refused"),
])
def test_bad_specs_name_the_key(spec, message):
    with pytest.raises(SpecError, match=message):
        check_spec(spec)


def test_differences_ignore_server_fields_and_entity_order_but_not_values():
    actual = {"served_entities": [{"name": "b", "workload_size": "Small", "state": {}},
                                  {"name": "a", "scale_to_zero_enabled": "true", "entity_version": 2}]}
    same = {"served_entities": [{"name": "a", "scale_to_zero_enabled": True, "entity_version": "2"},
                                {"name": "b", "workload_size": "Small"}]}
    assert differences(same, actual) == []
    assert differences({"served_entities": [{"name": "a", "entity_version": 3}, {"name": "b"}]}, actual) == [
        "config.served_entities[0].entity_version"]
    assert differences({"served_entities": [{"name": "a"}]}, actual) == ["config.served_entities"]
