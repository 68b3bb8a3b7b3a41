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

    python benchmarks/server.py --port 8123 --latency-ms 50 [--window-limit 40 --window-s 2]
    GET /stats -> {"requests", "rows", "refused", "peak_inflight", "first", "last"};  POST /reset
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web


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


def make_app(latency_s: float, per_text_s: float = 0.0, window_limit: int = 0,
             window_s: float = 1.0) -> web.Application:
    stats = Stats()

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

    async def answer(rows: int, delay_s: float, body: bytes) -> web.Response:
        now = time.time()
        stats.first = stats.first or now
        stats.requests += 1
        stats.rows += rows
        stats.inflight += 1
        stats.peak = max(stats.peak, stats.inflight)
        try:
            await asyncio.sleep(delay_s)
            return web.Response(body=body, content_type="application/json")
        finally:
            stats.inflight -= 1
            stats.last = time.time()
            stats.done.append(stats.last)

    async def invoke(request: web.Request) -> web.Response:
        body = await request.json()
        if over_limit():
            return web.json_response({"error_code": "REQUEST_LIMIT_EXCEEDED",
                                      "message": "Exceeded the endpoint's rate limit"}, status=429)
        return await answer(1, latency_s, json.dumps(f"Answer to: {body.get('prompt')}").encode())

    async def embed(request: web.Request) -> web.Response:
        texts = (await request.json())["input"]
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
                                  "first": stats.first, "last": stats.last, "series": series})

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
    args = p.parse_args()
    web.run_app(make_app(args.latency_ms / 1000, args.per_text_ms / 1000, args.window_limit, args.window_s), host="127.0.0.1", port=args.port, print=None,
                access_log=None, backlog=4096)


if __name__ == "__main__":
    main()
