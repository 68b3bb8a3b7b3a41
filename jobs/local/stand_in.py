"""A local stand-in for a real model endpoint, on 127.0.0.1, with a deterministic toy model.

It is NOT a model: it answers like one so that the job, the demo and the tests exercise real HTTP. It
speaks what the job speaks to:
- a driver-proxy app: `POST /` with `{"prompt", "stop", ...}` answering a JSON string, and
  `POST /embeddings` answering a list of floats;
- Databricks model serving: `POST /serving-endpoints/{name}/invocations` as a custom model
  (`dataframe_records` / `dataframe_split` / `inputs`), `llm/v1/completions` (`prompt`),
  `llm/v1/chat` (`messages`) and `llm/v1/embeddings` (`input`).

The toy model answers `Answer to: <prompt>`, cut at the first stop sequence and at `max_tokens`
words; embeddings are hashed bags of words, L2-normalised, so similar texts have similar vectors.
Asked for structured output (a `response_format` of type `json_schema`: at the top of the body, or
under `params` for custom models), it answers JSON that fits the schema, made from the prompt by
`fit` (deterministic rules, no understanding). Every request is recorded (`received`) and the peak of
requests in flight is tracked, for tests.

Example::

    with LocalEndpoint() as ep:          # picks a free port
        print(ep.url)                    # http://127.0.0.1:54321
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from statistics import NormalDist
from typing import Any, Callable

EMBEDDING_DIM = 16
# With an LLM-like latency per prompt, `usage.completion_tokens` says what the time says: 50 tokens/s.
SECONDS_PER_TOKEN = 0.02


def generate(prompt: str, stop: list[str] | None = None, max_tokens: int | None = None) -> str:
    text = f"Answer to: {prompt}"
    for s in stop or []:
        if s and s in text:
            text = text[: text.index(s)]
    if max_tokens is not None:
        text = " ".join(text.split(" ")[: max(0, int(max_tokens))])
    return text


def embed(text: str, dim: int = EMBEDDING_DIM) -> list[float]:
    vec = [0.0] * dim
    for word in re.findall(r"\w+", text.lower()) or [text]:
        h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
        vec[h % dim] += 1.0 if (h >> 32) & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [round(v / norm, 6) for v in vec]


def llm_latency(key: bytes, median_s: float, low_s: float | None = None, high_s: float | None = None) -> float:
    """An LLM-like answer time fixed by the request: lognormal around `median_s` (sigma 1: a few answers
    take ten times the median), kept within [`low_s`, `high_s`] (default: a tenth of the median, forty
    times it). An answer's time is its length, and lengths vary by prompt."""
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
    z = NormalDist().inv_cdf((h + 0.5) / 2.0 ** 64)
    low = median_s / 10 if low_s is None else low_s
    high = median_s * 40 if high_s is None else high_s
    return min(high, max(low, median_s * math.exp(z)))


def _tokens(text: str) -> int:
    return len(text.split())


def fit(schema: dict[str, Any], prompt: str, root: dict[str, Any] | None = None) -> Any:
    """A value of `schema` made from `prompt` by fixed rules: an enum takes the value that appears
    first in the prompt (as a word, any case), else one picked by a hash of the prompt; a string is
    the toy answer; an integer the prompt's word count; a number its mean word length; a boolean
    whether it ends with a question mark; an array of strings its capitalised words (not those that
    start a sentence or follow a colon);
    an object every property. Clamped to `minimum`/`maximum`, cut to `maxLength`/`maxItems`."""
    root = root if root is not None else schema
    if "$ref" in schema:
        target: Any = root
        for part in [p for p in schema["$ref"][1:].split("/") if p]:
            target = target[part]
        return fit(target, prompt, root)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            branch = next(b for b in schema[key] if b.get("type") != "null")
            return fit(branch, prompt, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        values = [v for v in schema["enum"] if v is not None]
        words = re.findall(r"\w+", prompt.lower())
        found = [(words.index(str(v).lower()), i) for i, v in enumerate(values) if str(v).lower() in words]
        return values[min(found)[1]] if found else values[_pick(prompt, len(values))]
    kind = schema.get("type")
    kind = next((k for k in kind if k != "null"), None) if isinstance(kind, list) else kind
    kind = kind or ("object" if "properties" in schema else "array" if "items" in schema else "string")
    if kind == "object":
        props = schema.get("properties") or {}
        if not props and isinstance(schema.get("additionalProperties"), dict):
            return {"key": fit(schema["additionalProperties"], prompt, root)}
        return {name: fit(sub, prompt, root) for name, sub in props.items()}
    if kind == "array":
        items = schema.get("items") or {}
        if items.get("type") == "string" and "enum" not in items:
            out: list[Any] = _names(prompt)
        else:
            out = [fit(items, prompt, root)]
        out = out[: schema.get("maxItems", len(out))]
        return out + [fit(items, prompt, root)] * max(0, schema.get("minItems", 0) - len(out))
    if kind == "integer":
        return _clamp(len(prompt.split()), schema)
    if kind == "number":
        words = prompt.split() or [""]
        return _clamp(round(sum(len(w) for w in words) / len(words), 2), schema)
    if kind == "boolean":
        return prompt.rstrip().endswith("?")
    return generate(prompt)[: schema.get("maxLength", None)]


def _names(prompt: str) -> list[str]:
    return [m.group() for m in re.finditer(r"\b[A-Z][\w-]*", prompt)
            if prompt[: m.start()].rstrip()[-1:] not in ("", ".", ":", "?", "!")]


def _pick(prompt: str, n: int) -> int:
    return int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=4).digest(), "big") % n


def _clamp(value: Any, schema: dict[str, Any]) -> Any:
    low, high = schema.get("minimum"), schema.get("maximum")
    value = max(value, low) if low is not None else value
    return min(value, high) if high is not None else value


def _json_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The schema a request asks its answer to fit, if any (`response_format` of type json_schema)."""
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    rf = body.get("response_format") or params.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        return (rf.get("json_schema") or {}).get("schema")
    return None


def _say(prompt: str, schema: dict[str, Any] | None, stop: Any, max_tokens: Any) -> str:
    """The toy model's text: JSON fitting `schema` when one is asked for (never cut: it must parse)."""
    if schema is not None:
        return json.dumps(fit(schema, prompt))
    return generate(prompt, stop, max_tokens)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    arrived: float = field(default_factory=time.monotonic)  # for tests that check waits between retries


# A fault hook sees each request and may answer instead of the model: (status, headers, raw body),
# or a callable that takes over the raw connection (a stall, a reset mid-body) and answers itself.
RawReply = Callable[[BaseHTTPRequestHandler], None]
Fault = Callable[[Request], "tuple[int, dict[str, str], bytes] | RawReply | None"]


def answer(path: str, body: Any) -> tuple[int, Any]:
    """The toy model's answer for a request, as (status, JSON value)."""
    if not isinstance(body, dict):
        return 400, {"error_code": "BAD_REQUEST", "message": "body must be a JSON object"}
    schema = _json_schema(body)
    if path.rstrip("/") == "":
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return 400, {"error_code": "BAD_REQUEST", "message": "missing 'prompt'"}
        return 200, _say(prompt, schema, body.get("stop"), body.get("max_tokens"))
    if path.rstrip("/") == "/embeddings":
        return 200, embed(str(body.get("prompt", "")), int(body.get("dimensions", EMBEDDING_DIM)))
    if not re.fullmatch(r"/serving-endpoints/[^/]+/invocations", path):
        return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"no route {path}"}
    params = body.get("params") or {}
    if "dataframe_records" in body or "dataframe_split" in body:
        records = body.get("dataframe_records")
        if records is None:
            split = body["dataframe_split"]
            records = [dict(zip(split["columns"], row)) for row in split["data"]]
        missing = [k for k in ("prompt", "stop") if any(k not in r for r in records)]
        if missing:
            return 400, {"error_code": "BAD_REQUEST", "message": f"Model is missing inputs {missing}."}
        return 200, {"predictions": [_say(r["prompt"], schema, r["stop"], params.get("max_tokens"))
                                     for r in records]}
    if "inputs" in body:
        return 200, {"predictions": [embed(str(t)) for t in body["inputs"]]}
    if "messages" in body:
        user = [m.get("content", "") for m in body["messages"] if m.get("role") == "user"]
        text = _say(user[-1] if user else "", schema, body.get("stop"), body.get("max_tokens"))
        usage = {"prompt_tokens": sum(_tokens(m.get("content", "")) for m in body["messages"]),
                 "completion_tokens": _tokens(text)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return 200, {"id": "local", "object": "chat.completion", "model": "local-toy",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}], "usage": usage}
    if "input" in body:
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dim = int(body.get("dimensions", EMBEDDING_DIM))
        data = [{"object": "embedding", "index": i, "embedding": embed(str(t), dim)} for i, t in enumerate(texts)]
        n = sum(_tokens(str(t)) for t in texts)
        return 200, {"object": "list", "model": "local-toy", "data": data,
                     "usage": {"prompt_tokens": n, "total_tokens": n}}
    if "prompt" in body:
        text = _say(str(body["prompt"]), schema, body.get("stop"), body.get("max_tokens"))
        usage = {"prompt_tokens": _tokens(str(body["prompt"])), "completion_tokens": _tokens(text)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return 200, {"id": "local", "object": "text_completion", "model": "local-toy",
                     "choices": [{"index": 0, "text": text, "finish_reason": "stop"}], "usage": usage}
    return 400, {"error_code": "BAD_REQUEST", "message": f"unrecognised body with keys {sorted(body)}"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without TCP_NODELAY, Nagle plus delayed ACK adds 40 ms.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, *args: Any) -> None:  # quiet: the job's log is what matters
        pass

    def do_GET(self) -> None:
        definition = re.fullmatch(r"/api/2\.0/serving-endpoints/([^/?]+)", self.path)
        if self.path == "/health":
            self._send(200, {}, b'"ok"')
        elif definition:
            # The serving endpoint's definition, as the workspace gives it: ready, no AI Gateway limits
            # (this stand-in has none), not route-optimized.
            self._send(200, {}, json.dumps({"name": definition.group(1), "route_optimized": False,
                                            "state": {"ready": "READY", "config_update": "NOT_UPDATING"}}).encode())
        else:
            self._send(404, {}, b'{"message": "not found"}')

    def do_POST(self) -> None:
        ep = self.server.endpoint
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        req = Request("POST", self.path, dict(self.headers.items()), body)
        ep._enter(req)
        left = False
        try:
            delay = ep.latency_s + (ep.latency_of(raw) if ep.latency_of else 0.0)
            if delay:
                time.sleep(delay)
            reply = ep.fault(req) if ep.fault else None
            if callable(reply):
                self.close_connection = True  # the raw reply owns the socket; nothing may follow it
                reply(self)
                return
            if reply is None:
                status, value = answer(self.path, body)
                if ep.latency_of and isinstance(value, dict) and "completion_tokens" in value.get("usage", {}):
                    # As an LLM's: the answer's length is its time (50 tokens a second).
                    value["usage"]["completion_tokens"] = max(1, round(delay / SECONDS_PER_TOKEN))
                reply = (status, {}, json.dumps(value).encode())
            # Answered: counted out before the bytes go, since the client may send its next request
            # the moment they arrive (counted after, that request could be counted beside this one).
            ep._leave()
            left = True
            self._send(*reply)
        finally:
            if not left:
                ep._leave()

    def _send(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    endpoint: LocalEndpoint


class LocalEndpoint:
    """The stand-in endpoint on 127.0.0.1, in a background thread."""

    def __init__(self, port: int = 0, *, latency_s: float = 0.0, fault: Fault | None = None,
                 host: str = "127.0.0.1", latency_of: Callable[[bytes], float] | None = None) -> None:
        self.latency_s = latency_s
        # Per request (its raw body), on top of `latency_s`: e.g. `lambda raw: llm_latency(raw, 0.3)`.
        self.latency_of = latency_of
        self.fault = fault
        self.received: list[Request] = []
        self.inflight = 0
        self.peak_inflight = 0
        self.flows: list[tuple[float, int]] = []  # (time, requests in flight from then on)
        self._lock = threading.Lock()
        self._server = _Server((host, port), _Handler)
        self._server.endpoint = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _enter(self, req: Request) -> None:
        with self._lock:
            self.received.append(req)
            self._flow(+1)
            self.peak_inflight = max(self.peak_inflight, self.inflight)

    def _leave(self) -> None:
        with self._lock:
            self._flow(-1)

    def _flow(self, delta: int) -> None:
        self.inflight += delta
        self.flows.append((time.monotonic(), self.inflight))

    def _area(self, end: float | None = None) -> tuple[float, float]:
        """Requests in flight integrated over time from the first request to `end` (None: the last
        answer), and that span."""
        with self._lock:
            flows = list(self.flows)
        if not flows:
            return 0.0, 0.0
        end = flows[-1][0] if end is None else end
        area = sum(n * (min(t1, end) - t0) for (t0, n), (t1, _) in zip(flows, flows[1:]) if t0 < end)
        return area, max(0.0, end - flows[0][0])

    @property
    def inflight_area(self) -> float:
        """Requests in flight integrated over time, from the first request to the last answer."""
        return self._area()[0]

    def mean_inflight(self) -> float:
        """Requests in flight on average (weighted by time) from the first request to the last answer."""
        area, span = self._area()
        return area / span if span > 0 else 0.0

    def mean_inflight_while_sending(self) -> float:
        """Requests in flight on average from the first request to the last one's arrival: the job had
        requests still to send all along, so anything under the limit there is the job's, not the
        tail's (the last answers arrive as they will)."""
        with self._lock:
            end = self.received[-1].arrived if self.received else None
        if end is None:
            return 0.0
        area, span = self._area(end)
        return area / span if span > 0 else 0.0

    def reset(self) -> None:
        with self._lock:
            self.received.clear()
            self.flows.clear()
            self.peak_inflight = self.inflight
        self.fault = None

    def start(self) -> LocalEndpoint:
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-endpoint", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LocalEndpoint:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the local stand-in endpoint (not a real model).")
    parser.add_argument("--port", type=int, default=7777)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="every answer takes this long")
    parser.add_argument("--llm-latency-ms", type=float, default=0.0,
                        help="answers take about this long (the median), varying per prompt as an LLM's do")
    args = parser.parse_args(argv)
    median = args.llm_latency_ms / 1000
    ep = LocalEndpoint(args.port, latency_s=args.latency_ms / 1000, host=args.host,
                       latency_of=(lambda raw: llm_latency(raw, median)) if median else None)
    print(f"local endpoint (a stand-in, not a model) on http://{args.host}:{ep.port}", flush=True)
    try:
        ep._server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
