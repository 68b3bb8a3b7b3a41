"""The demo's set-up (the run itself is `make demo`): seeded prompts, and every config on one port."""

from __future__ import annotations

import uuid

from jobs.local.demo import ROOT, configs, seed_prompts


def test_every_demo_config_points_at_the_local_endpoint_and_overrides_apply_to_all():
    port = 7123
    cfgs = configs(port, ["limits.max_concurrency=3"])
    urls = [c.endpoint.url or c.endpoint.host or f"port {c.endpoint.port}" for c in cfgs]
    assert urls == [f"port {port}", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}"]
    assert {c.limits.max_concurrency for c in cfgs} == {3}
    assert len({c.output.table for c in cfgs}) == len(cfgs)  # each run lands in its own table


def test_the_prompts_are_seeded_from_the_repository_data(spark):
    table = f"demo_{uuid.uuid4().hex[:8]}.prompts"
    seed_prompts(spark, table, ROOT / "data" / "prompts.jsonl")
    seed_prompts(spark, table, ROOT / "data" / "prompts.jsonl")  # a second make demo: replaced, not doubled
    lines = (ROOT / "data" / "prompts.jsonl").read_text().splitlines()
    assert spark.table(table).count() == len(lines) == 50
    assert spark.table(table).where("prompt IS NULL OR id IS NULL").count() == 0
