"""The benchmark's endpoint: an aiohttp (asyncio) server with a fixed latency, in its own process.

Asyncio, not threads: one event loop holds thousands of sleeping requests for the cost of a timer
each, so at C = 128 and L = 50 ms (2,560 requests/s) the server stays far from being the bottleneck
on two cores. It answers the driver-proxy protocol (`POST /` -> a JSON string) and, for embeddings,
`llm/v1/embeddings` (`POST /serving-endpoints/<name>/invocations` {"input": [...]} -> 8-float vectors,
after L plus `--per-text-ms` per text), and counts requests in flight, keeping the peak and the span
from the first arrival to the last answer.

With `--window-limit W --window-s S` it is also rate-limited as AI Gateway and pay-per-token
endpoints are: at most W requests per fixed window of S seconds (windows counted from the first
request after a reset), past it 429 `REQUEST_LIMIT_EXCEEDED` with no `Retry-After`, at once.

With `--latency heavy|bimodal` an answer's time is fixed by its prompt and heavy-tailed, as an LLM's
(its length): the driver-proxy route sleeps that long, and `llm/v1/chat` on the invocations route
answers `usage.completion_tokens` consistent with it (50 tokens a second). `--overload-k K` makes the
chat answers' time per token double while more than K requests are in flight.

    python benchmarks/server.py --port 8123 --latency-ms 50 [--window-limit 40 --window-s 2]
    python benchmarks/server.py --port 8123 --latency heavy [--overload-k 16]
    GET /stats -> {"requests", "rows", "refused", "peak_inflight", "first", "last"};  POST /reset
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import time
from statistics import NormalDist

from aiohttp import web


# Realistic LLM latency (`--latency heavy|bimodal`): an answer's time is its length, fixed per prompt.
PER_TOKEN_S = 0.02      # 50 output tokens a second, as a mid-sized model streams
FIRST_TOKEN_S = 0.03    # time to the first token
MAX_LATENCY_S = 20.0


def unit(prompt: str, salt: str = "") -> float:
    """A number in (0, 1) fixed by the prompt: the same prompt always takes the same time."""
    h = int.from_bytes(hashlib.blake2b((salt + prompt).encode(), digest_size=8).digest(), "big")
    return (h + 0.5) / 2.0 ** 64


def base_latency(prompt: str, mode: str, fixed_s: float) -> float:
    """The unloaded latency of `prompt`'s answer.

    - `heavy`: lognormal, median 0.5 s, mean 0.86 s, p99 about 5.6 s, capped at 20 s (issue 20's);
    - `bimodal`: 60 % short classifications (median 0.15 s) and 40 % long generations (median 4 s);
    - `fixed`: `fixed_s` for every prompt.
    """
    if mode == "fixed":
        return fixed_s
    z = NormalDist().inv_cdf(unit(prompt))
    if mode == "heavy":
        x = 0.5 * math.exp(1.04 * z)
    elif unit(prompt, "mode") < 0.6:
        x = 0.15 * math.exp(0.4 * z)
    else:
        x = 4.0 * math.exp(0.5 * z)
    return min(MAX_LATENCY_S, max(FIRST_TOKEN_S + PER_TOKEN_S, x))


def output_tokens(latency_s: float) -> int:
    """The output tokens an unloaded answer of `latency_s` streams: `usage` consistent with the time."""
    return max(1, round((latency_s - FIRST_TOKEN_S) / PER_TOKEN_S))


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.rows = 0
        self.refused = 0  # requests answered 429 by the window
        self.windows: dict[int, int] = {}
        self.inflight = 0
        self.peak = 0
        self.first: float | None = None
        self.last: float | None = None
        self.done: list[float] = []  # answer times, for the throughput-over-time series
        self.served: list[float] = []  # each request's latency, in order of arrival (not of answer)
        self.tokens = 0  # output tokens answered (chat)
        self.token_s = 0.0  # time spent on answers that report tokens
        self.unavailable = 0  # 503s of an overloaded server
        self.area = 0.0  # the integral of requests in flight over time
        self.stamp: float | None = None
        self.area_by_s: dict[int, float] = {}  # that integral per wall-clock second (epoch), for timelines


def make_app(latency_s: float, per_text_s: float = 0.0, window_limit: int = 0,
             window_s: float = 1.0, mode: str = "fixed", overload_k: int = 0,
             shed_above: int = 0) -> web.Application:
    """`overload_k`: past K requests in flight the time per output token doubles (an overloaded model
    server); `shed_above`: past that many in flight it answers 503 at once (0: never)."""
    stats = Stats()

    def flow(delta: int) -> None:
        now = time.time()
        if stats.stamp is not None:
            stats.area += stats.inflight * (now - stats.stamp)
            t = stats.stamp
            while t < now:  # split at whole seconds
                edge = min(now, float(int(t) + 1))
                stats.area_by_s[int(t)] = stats.area_by_s.get(int(t), 0.0) + stats.inflight * (edge - t)
                t = edge
        stats.stamp = now
        stats.inflight += delta

    def over_limit() -> bool:
        """Counts the request in its window; True past `window_limit` (0: no limit)."""
        if not window_limit:
            return False
        now = time.time()
        stats.first = stats.first or now
        w = int((now - stats.first) // window_s)
        stats.windows[w] = stats.windows.get(w, 0) + 1
        if stats.windows[w] <= window_limit:
            return False
        stats.requests += 1
        stats.refused += 1
        return True

    async def answer(rows: int, delay_s: float, body: bytes | None = None, *, prompt: str = "",
                     chat: bool = False) -> web.Response:
        now = time.time()
        stats.first = stats.first or now
        stats.requests += 1
        stats.rows += rows
        flow(+1)
        stats.peak = max(stats.peak, stats.inflight)
        try:
            if shed_above and stats.inflight > shed_above:
                stats.unavailable += 1
                return web.json_response({"error_code": "TEMPORARILY_UNAVAILABLE",
                                          "message": "The server is overloaded"}, status=503)
            tokens = 0
            if chat:  # the time is the answer's length, and slower per token past K in flight
                base = base_latency(prompt, mode, latency_s)
                tokens = output_tokens(base)
                slow = 2.0 if overload_k and stats.inflight > overload_k else 1.0
                delay_s = FIRST_TOKEN_S + tokens * PER_TOKEN_S * slow
                body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * min(tokens, 64)},
                                                "finish_reason": "stop"}],
                                   "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": tokens,
                                             "total_tokens": len(prompt) // 4 + tokens}}).encode()
            stats.served.append(delay_s)  # at arrival: the FIFO bound replays this order
            await asyncio.sleep(delay_s)
            if tokens:
                stats.tokens += tokens
                stats.token_s += delay_s
            return web.Response(body=body, content_type="application/json")
        finally:
            flow(-1)
            stats.last = time.time()
            stats.done.append(stats.last)

    async def invoke(request: web.Request) -> web.Response:
        body = await request.json()
        if over_limit():
            return web.json_response({"error_code": "REQUEST_LIMIT_EXCEEDED",
                                      "message": "Exceeded the endpoint's rate limit"}, status=429)
        prompt = str(body.get("prompt"))
        return await answer(1, base_latency(prompt, mode, latency_s), json.dumps(f"Answer to: {prompt}").encode())

    async def embed(request: web.Request) -> web.Response:
        body = await request.json()
        if "messages" in body:  # llm/v1/chat on the same route
            return await answer(1, 0.0, prompt=str(body["messages"][-1]["content"]), chat=True)
        texts = body["input"]
        data = [{"index": i, "embedding": [((len(t) + k) % 7) / 7.0 for k in range(8)]} for i, t in enumerate(texts)]
        n = sum(len(t) for t in texts) // 4
        return await answer(len(texts), latency_s + per_text_s * len(texts),
                            json.dumps({"data": data, "usage": {"prompt_tokens": n, "total_tokens": n}}).encode())

    async def get_stats(request: web.Request) -> web.Response:
        series = []
        if stats.first is not None:  # answers per 0.5 s since the first request
            series = [0] * (int((stats.last - stats.first) / 0.5) + 1)
            for t in stats.done:
                series[int((t - stats.first) / 0.5)] += 1
        return web.json_response({"requests": stats.requests, "rows": stats.rows, "refused": stats.refused,
                                  "peak_inflight": stats.peak,
                                  "first": stats.first, "last": stats.last, "series": series,
                                  "served": stats.served, "tokens": stats.tokens, "token_s": stats.token_s,
                                  "unavailable": stats.unavailable, "inflight_area": stats.area,
                                  "inflight_by_s": sorted(stats.area_by_s.items()),
                                  "windows": sorted(stats.windows.items())})

    async def reset(request: web.Request) -> web.Response:
        stats.reset()
        return web.json_response({})

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/", invoke)
    app.router.add_post("/serving-endpoints/{name}/invocations", embed)
    async def definition(request: web.Request) -> web.Response:  # what the job reads before a run
        return web.json_response({"name": request.match_info["name"], "route_optimized": False,
                                  "state": {"ready": "READY", "config_update": "NOT_UPDATING"}})

    app.router.add_get("/stats", get_stats)
    app.router.add_get("/api/2.0/serving-endpoints/{name}", definition)
    app.router.add_post("/reset", reset)
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--per-text-ms", type=float, default=0.2)
    p.add_argument("--window-limit", type=int, default=0, help="requests per window; 0: no limit")
    p.add_argument("--window-s", type=float, default=1.0)
    p.add_argument("--latency", choices=["fixed", "heavy", "bimodal"], default="fixed",
                   help="fixed: --latency-ms for all; heavy/bimodal: per prompt, as an LLM's answers")
    p.add_argument("--overload-k", type=int, default=0, help="chat: time per token doubles past K in flight")
    p.add_argument("--shed-above", type=int, default=0, help="503 past this many in flight (0: never)")
    args = p.parse_args()
    web.run_app(make_app(args.latency_ms / 1000, args.per_text_ms / 1000, args.window_limit, args.window_s,
                         args.latency, args.overload_k, args.shed_above),
                host="127.0.0.1", port=args.port, print=None, access_log=None, backlog=4096)


if __name__ == "__main__":
    main()
