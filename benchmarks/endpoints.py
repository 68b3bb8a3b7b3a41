"""Several endpoints in one engine (`udfs.router`): does overflow keep every endpoint at its limit?

Engine only, no Spark (the router lives in the engine; the job around it is `throughput.py`'s): each
scenario sends N prompts through one `Engine` against `benchmarks/server.py` endpoints with a fixed
latency L, and reports rows/s against the bound (the sum of the endpoints' limits over L, or what the
endpoints admit), each endpoint's share of the rows, and each server's peak in flight.

- `one`: a single endpoint at C = 64, the baseline in the same process;
- `overflow`: a primary at 16 and an overflow at 48: the bound is the same 64 / L;
- `overflow-shed`: the same, but the primary's server answers 503 past 8 in flight (its limit is
  smaller than configured): rows it refuses go to the overflow at once; bound (8 + 48) / L;
- `split`: 50/50 between two endpoints at 32 each.

    .venv/bin/python benchmarks/endpoints.py [--rows 4000] [--latency-ms 50] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import Server  # noqa: E402
from udfs.engine import Engine  # noqa: E402
from udfs.spec import EngineSpec, RetrySpec  # noqa: E402


def spec(server: Server, name: str, c: int, role: str = "primary") -> EngineSpec:
    return EngineSpec(url=server.url + "/", name=name, role=role, task="custom", endpoint_type="driver_proxy",
                      max_concurrency=c, retry=RetrySpec(backoff_base_s=0.01, backoff_max_s=0.05))


def run(specs: list[EngineSpec], prompts: list[str], lanes: list[int] | None = None) -> tuple[float, dict, int]:
    """(seconds, rows per endpoint, error rows) for one pass of `prompts`."""
    t0 = time.monotonic()
    with Engine(specs) as engine:
        batch = (prompts, lanes) if lanes is not None else prompts
        [outcomes] = list(engine.map_batches([batch]))
    took = time.monotonic() - t0
    by: dict[str, int] = {}
    for o in outcomes:
        by[o.endpoint or "?"] = by.get(o.endpoint or "?", 0) + 1
    return took, by, sum(o.status != "ok" for o in outcomes)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    L = a.latency_ms / 1000
    servers = {"a": Server(a.latency_ms), "b": Server(a.latency_ms),
               "shed": Server(a.latency_ms, 0.2, "--shed-above", "8")}
    try:
        scenarios = {
            "one": ([spec(servers["a"], "a", 64)], None, 64),
            "overflow": ([spec(servers["a"], "a", 16), spec(servers["b"], "b", 48, "overflow")], None, 64),
            "overflow-shed": ([spec(servers["shed"], "shed", 16), spec(servers["b"], "b", 48, "overflow")], None, 56),
            "split": ([spec(servers["a"], "a", 32), spec(servers["b"], "b", 32)], "split", 64),
        }
        rows: dict[str, list] = {k: [] for k in scenarios}
        for r in range(a.rounds):
            order = list(scenarios) if r % 2 == 0 else list(reversed(scenarios))
            for name in order:
                specs, kind, bound_c = scenarios[name]
                prompts = [f"round {r} prompt {i}" for i in range(a.rows)]
                lanes = [i % 2 for i in range(a.rows)] if kind == "split" else None
                for s in servers.values():
                    s.reset()
                took, by, errors = run(specs, prompts, lanes)
                peaks = {k: s.stats()["peak_inflight"] for k, s in servers.items() if s.stats()["requests"]}
                refused = servers["shed"].stats().get("unavailable", 0) if name == "overflow-shed" else 0
                rows[name].append((a.rows / took / (bound_c / L), by, peaks, errors, refused))
        print(f"N = {a.rows}, L = {a.latency_ms:g} ms, {a.rounds} rounds (order reversed each round); "
              "ratio = rows/s over (sum of admitted limits) / L")
        print(f"{'scenario':<15}{'bound C':>8}{'ratio (each round)':>22}  {'rows by endpoint':<26}{'peak in flight':<28}errors  503s")
        for name, results in rows.items():
            ratios = " ".join(f"{x[0]:.2f}" for x in results)
            by, peaks, errors, refused = results[-1][1:]
            print(f"{name:<15}{scenarios[name][2]:>8}{ratios:>22}  {str(by):<26}{str(peaks):<28}{errors:>6}{refused:>6}")
        best = {k: max(x[0] for x in v) for k, v in rows.items()}
        print("summary: " + " ".join(f"{k.replace('-', '_')}_ratio={v:.2f}" for k, v in best.items())
              + f" overflow_vs_one={best['overflow'] / best['one']:.2f}")
    finally:
        for s in servers.values():
            s.stop()


if __name__ == "__main__":
    main()
