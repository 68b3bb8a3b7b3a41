"""The host pool (`udfs.hostpool`): tasks on one host lend each other the in-flight share they do not use,
through file locks, and the host never holds more permits than its tasks' shares.

Two `HostPool`s in one process behave as two processes do: each opens its own descriptors, and
`flock` locks belong to the open file, so they exclude each other."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from jobs.pipeline import run_job
from tests.conftest import job_config
from udfs.hostpool import HostPool, PooledLimiter, pooled_limiter
from udfs.limits import AdaptiveLimiter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def key() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def take(pool: HostPool, n: int, how: str = "own") -> int:
    got = 0
    for _ in range(n):
        got += bool(pool.take_own() if how == "own" else pool.borrow())
    return got


def test_each_task_claims_its_own_block_and_a_freed_block_is_claimed_again_not_a_new_one(tmp_path, key):
    a, b = HostPool(key, 3, tmp_path), HostPool(key, 3, tmp_path)
    assert (a.block, b.block) == (0, 1)
    assert take(a, 5) == 3 and take(b, 5) == 3  # each its share, no more of its own
    a.close()
    c = HostPool(key, 3, tmp_path)
    assert c.block == 0  # the ended task's block: the host still has two blocks, as it had two tasks
    assert sorted(p.name for p in (tmp_path / "batch-inference-pool" / key).glob("block-*")) == ["block-0", "block-1"]
    b.close()
    c.close()


def test_a_task_borrows_only_what_others_leave_free_and_never_more_than_the_host_holds(tmp_path, key):
    a, b = HostPool(key, 3, tmp_path), HostPool(key, 3, tmp_path)
    assert take(a, 3) == 3 and take(b, 1) == 1
    assert take(a, 10, "borrow") == 2  # b's two idle permits, and no more
    assert a.held + b.held == 6  # the host's two shares, all of them
    b.give_back()  # b's own request ends: a may borrow that permit too
    assert take(a, 10, "borrow") == 1 and a.held == 6 and b.held == 0
    for _ in range(a.held):
        a.give_back()
    assert take(b, 3) == 3  # all free again
    a.close()
    b.close()


def test_an_owner_waiting_for_its_own_permits_stops_new_borrowing_from_its_block(tmp_path, key):
    a, b = HostPool(key, 2, tmp_path), HostPool(key, 2, tmp_path)
    assert take(a, 1, "borrow") == 1  # b idle: a borrows one of b's
    b.want(True)  # b now waits for a permit of its own
    assert take(a, 5, "borrow") == 0  # the other one stays b's
    assert take(b, 2) == 1  # b gets its free one; the borrowed one comes back when a's request ends
    a.give_back()
    assert take(b, 1) == 1
    b.want(False)
    a.close()
    b.close()


def test_a_killed_task_frees_its_permits_and_its_block(tmp_path, key):
    """`kill -9` mid-request: the OS drops the process's locks, so no permit is lost to the host."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from udfs.hostpool import HostPool
        pool = HostPool({key!r}, 2, {str(tmp_path)!r})
        assert pool.take_own() and pool.take_own()
        print(pool.block, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "0"
        survivor = HostPool(key, 2, tmp_path)
        assert survivor.block == 1 and take(survivor, 5, "borrow") == 0  # held by the live process
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert take(survivor, 5, "borrow") == 2  # its permits are free
        survivor.close()
        again = HostPool(key, 2, tmp_path)
        assert again.block == 0  # and its block
        again.close()
    finally:
        proc.kill()


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_a_task_at_its_limit_borrows_the_idle_share_of_the_task_beside_it_and_gives_it_back(tmp_path, key):
    """Two tasks of share 2 on one host. Until the endpoint has answered, A keeps to its 2 (an endpoint
    scaling from zero must not draw a wave of borrowed requests). Then, while B has nothing to send,
    A keeps 4 in flight (its 2 and B's 2); the host never has more than 4. When B has work again, it gets its share back as A's
    borrowed requests end, and A is back to 2."""
    a = PooledLimiter(2, HostPool(key, 2, tmp_path))
    b = PooledLimiter(2, HostPool(key, 2, tmp_path))
    flight = {"a": 0, "b": 0, "host_peak": 0}

    async def request(lim: PooledLimiter, who: str, seconds: float) -> None:
        await lim.acquire()
        flight[who] += 1
        flight["host_peak"] = max(flight["host_peak"], flight["a"] + flight["b"])
        try:
            await asyncio.sleep(seconds)
        finally:
            flight[who] -= 1
            lim.release(latency=seconds)

    async def scenario() -> tuple[int, int, int]:
        early = [asyncio.create_task(request(a, "a", 0.05)) for _ in range(8)]
        await asyncio.sleep(0.02)
        before_answer = (flight["a"], a.borrowed)  # nothing answered yet: A keeps to its own share
        await asyncio.gather(*early)
        assert before_answer == (2, 0)
        first = [asyncio.create_task(request(a, "a", 0.2)) for _ in range(8)]
        await asyncio.sleep(0.05)
        alone = flight["a"]  # B idle: A has borrowed B's share
        later = [asyncio.create_task(request(b, "b", 0.2)) for _ in range(4)]
        await asyncio.sleep(0.3)  # A's first round ended: B's permits came back to it
        both = (flight["a"], flight["b"])
        await asyncio.gather(*first, *later)
        return alone, *both

    alone, a_then, b_then = run(scenario())
    assert alone == 4 and a.borrowed_peak == 2
    assert (a_then, b_then) == (2, 2)
    assert flight["host_peak"] == 4  # never more than the two shares
    a.close()
    b.close()


def test_a_cut_limit_does_not_borrow(tmp_path, key):
    """After a 429 halves A's limit, A keeps to it: borrowing is for a task at its full limit only."""
    a = PooledLimiter(4, HostPool(key, 4, tmp_path))
    b = PooledLimiter(4, HostPool(key, 4, tmp_path))

    async def scenario() -> int:
        await a.acquire()
        a.release(overloaded=True)  # a 429: the limit halves to 2
        assert a.limit == 2 and not a.may_borrow()
        held = []
        for _ in range(2):
            await a.acquire()
            held.append(1)
        waiting = asyncio.create_task(a.acquire())
        await asyncio.sleep(0.05)  # B's 4 permits are free, yet A waits for its own slot
        assert not waiting.done()
        a.release(latency=0.1)
        await waiting
        return a.inflight + a.borrowed

    assert run(scenario()) == 2
    a.close()
    b.close()


def test_a_task_whose_requests_the_governor_holds_lends_nothing(tmp_path, key):
    """A task waiting out a rate-limit pause (or paced) has work waiting, if not for a slot: its idle
    share is not lendable meanwhile. Lent, a neighbour that saw no 429 would take the window's
    requests it waits for, and draw the 429s it avoids."""
    a = PooledLimiter(2, HostPool(key, 2, tmp_path))
    b = PooledLimiter(2, HostPool(key, 2, tmp_path))
    a.answered = True
    try:
        b.held_back(1)  # B's rows wait for its governor
        assert not a.pool.borrow()
        b.held_back(-1)  # the pause is over and B has nothing left to send
        assert a.pool.borrow()
        a.pool.give_back()
    finally:
        a.close()
        b.close()


def test_a_request_held_by_a_rate_limit_pause_marks_its_task_s_share_wanted(key):
    """The caller tells its lane's pooled limiter while the governor holds a request: a neighbour
    finds the share not lendable until the request goes on."""
    from udfs.limits import OVERLOAD
    from udfs.router import Lane
    from udfs.spec import EngineSpec

    spec = EngineSpec(url=f"http://127.0.0.1:9/{key}/", name="main", task="custom", pool_key=key)
    lane, other = Lane(spec, 2), Lane(spec, 2)

    async def scenario() -> tuple[bool, bool]:
        lane.governor.failed(OVERLOAD, retry_after=30.0, reason="http_429: REQUEST_LIMIT_EXCEEDED")
        call = asyncio.create_task(lane.caller.acall(["a prompt"]))
        await asyncio.sleep(0.1)  # the request waits for the pause to end
        during = other.limiter.pool.borrow()
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        after = other.limiter.pool.borrow()
        return during, after

    try:
        during, after = run(scenario())
        assert (during, after) == (False, True)
    finally:
        other.limiter.pool.give_back()
        lane.close()
        other.close()


def test_no_pool_key_or_a_temp_dir_that_refuses_the_files_leaves_each_task_its_own_share(tmp_path, key):
    assert type(pooled_limiter(None, "main", 4)) is AdaptiveLimiter
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "batch-inference-pool").write_text("a file where the pool's directory would be")
    limiter = pooled_limiter(key, "main", 4)
    assert isinstance(limiter, PooledLimiter)
    limiter.close()
    os.environ["TMPDIR"] = str(tmp_path / "ro")
    try:
        import tempfile
        tempfile.tempdir = None  # read TMPDIR again
        assert type(pooled_limiter(key, "main", 4)) is AdaptiveLimiter
    finally:
        del os.environ["TMPDIR"]
        tempfile.tempdir = None


def prompts_by_task(spark, cfg, candidates: list[str], tasks: int) -> dict[int, list[str]]:
    """Which of the executors' tasks each prompt goes to: the UDF's input is repartitioned by
    `request_hash` into `tasks` partitions (`jobs.calls.outcomes.with_outcomes`), Spark's hash
    partitioning (Murmur3, `F.hash`)."""
    from pyspark.sql import functions as F

    from jobs.input.read import read_requests

    name = f"candidates_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame(list(enumerate(candidates)), "id long, prompt string").createOrReplaceTempView(name)
    _, requests = read_requests(spark, cfg.model_copy(update={"input": cfg.input.model_copy(update={"table": name})}))
    rows = requests.select("prompt", F.pmod(F.hash("request_hash"), F.lit(tasks)).alias("task")).collect()
    out: dict[int, list[str]] = {}
    for r in rows:
        out.setdefault(r["task"], []).append(r["prompt"])
    return out


@pytest.mark.parametrize("host_pool", [True, False])
def test_in_a_real_job_a_task_borrows_the_share_its_draining_neighbour_does_not_use(spark, fresh_endpoint,
                                                                                    table_name, host_pool):
    """Executors mode, two tasks of 4 on one host (local[2], C = 8). One task has a single row, whose
    answer takes 3 s; the other has 40 rows of 0.3 s. Pooled, the second task borrows the 3 slots the
    first leaves idle, and the endpoint sees 8 in flight, never more; with `limits.host_pool: false`
    it sees 1 + 4."""
    cfg = job_config(output={"table": table_name},
                     endpoint={"name": "local", "type": "driver_proxy", "url": f"{fresh_endpoint.url}/"},
                     limits={"max_concurrency": 8, "host_pool": host_pool}, run={"calls_from": "executors"})
    tasks = prompts_by_task(spark, cfg, [f"question {i}" for i in range(200)], 2)
    slow, quick = tasks[0][0], tasks[1][:40]
    fresh_endpoint.latency_of = lambda raw: 3.0 if json.loads(raw)["prompt"] == slow else 0.3
    src = f"pool_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame(list(enumerate([slow, *quick])), "id long, prompt string").createOrReplaceTempView(src)
    summary = run_job(spark, cfg.model_copy(update={"input": cfg.input.model_copy(update={"table": src})}))

    assert summary.by_status == {"ok": 41} and summary.chunks == 1
    assert fresh_endpoint.peak_inflight == (8 if host_pool else 5)


def test_chunks_run_side_by_side_so_a_chunk_s_drain_does_not_idle_the_endpoint(spark, fresh_endpoint, table_name):
    """Executors mode, C = 8 on local[2]: two chunks, the first of 256 rows (0.05 s each) ending with
    a 2.5 s answer in each half of its rows (each of the two tasks it would have on every slot).
    With a chunk on every slot, both its tasks would wait for those answers holding both slots, with
    2 of 8 in flight and the second chunk unable to start. Side by side, each chunk runs on one slot
    and the second borrows what the first's drain leaves idle: while the job still has requests to
    send, the endpoint sees close to 8 in flight, never more."""
    from pyspark.sql import functions as F

    from jobs.calls.chunking import FIRST_CHUNK_REQUESTS_PER_SLOT, ChunkPlanner
    from jobs.input.read import read_requests
    from jobs.input.stage import bucket_of

    cfg = job_config(output={"table": table_name},
                     endpoint={"name": "local", "type": "driver_proxy", "url": f"{fresh_endpoint.url}/"},
                     limits={"max_concurrency": 8}, run={"calls_from": "executors", "chunk_rows": None})
    src = f"side_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame([(i, f"question {i}") for i in range(656)], "id long, prompt string") \
        .createOrReplaceTempView(src)
    cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"table": src})})
    _, requests = read_requests(spark, cfg)
    rows = requests.select("prompt", "request_hash", bucket_of().alias("bucket"),
                           F.pmod(F.hash("request_hash"), F.lit(2)).alias("half")).collect()
    histogram: dict[int, int] = {}
    for r in rows:
        histogram[r["bucket"]] = histogram.get(r["bucket"], 0) + 1
    first = ChunkPlanner(histogram, fixed_rows=None, first_rows=FIRST_CHUNK_REQUESTS_PER_SLOT * 8).next()
    in_first = [r for r in rows if first.lo <= r["bucket"] <= first.hi]
    # The last request of each half of the first chunk (a task sends its rows in request_hash order).
    slow = {max((r for r in in_first if r["half"] == h), key=lambda r: r["request_hash"])["prompt"] for h in (0, 1)}
    assert len(slow) == 2 and first.rows < len(rows)
    fresh_endpoint.latency_of = lambda raw: 2.5 if json.loads(raw)["prompt"] in slow else 0.05

    summary = run_job(spark, cfg)

    assert summary.by_status == {"ok": 656} and summary.chunks == 2
    assert fresh_endpoint.peak_inflight == 8
    assert fresh_endpoint.mean_inflight_while_sending() >= 0.85 * 8, fresh_endpoint.mean_inflight_while_sending()


def test_the_chunk_that_ends_first_lands_first_and_the_next_starts_beside_a_slow_older_one(spark, fresh_endpoint,
                                                                                           table_name):
    """Executors mode, chunks side by side on local[2] (C = 8), chunks of about 12 rows. The first
    chunk's first request takes 6 s, every other one 0.05 s. Spark starts the chunk jobs in the order
    their queries reach it, not the order the chunks were submitted, so the first chunk may even be
    the last of three to start: the chunks that end meanwhile land, and later chunks run beside it.
    A request of the fourth chunk or a later one arrives while the slow answer is still out; landing
    chunks oldest first, none could start before the first chunk had landed. All rows land, once
    each: chunks that land out of order commit in lanes of their own (Delta skips a lane's chunk
    older than one it committed)."""
    from jobs.calls.chunking import ChunkPlanner
    from jobs.input.read import read_requests
    from jobs.input.stage import bucket_of

    cfg = job_config(output={"table": table_name},
                     endpoint={"name": "local", "type": "driver_proxy", "url": f"{fresh_endpoint.url}/"},
                     limits={"max_concurrency": 8}, run={"calls_from": "executors", "chunk_rows": 12})
    src = f"lanes_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame([(i, f"question {i}") for i in range(96)], "id long, prompt string") \
        .createOrReplaceTempView(src)
    cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"table": src})})
    _, requests = read_requests(spark, cfg)
    rows = requests.select("id", "prompt", "request_hash", bucket_of().alias("bucket")).collect()
    histogram: dict[int, int] = {}
    for r in rows:
        histogram[r["bucket"]] = histogram.get(r["bucket"], 0) + 1
    planner, chunks = ChunkPlanner(histogram, fixed_rows=12, first_rows=12), []
    while (c := planner.next()) is not None:
        chunks.append(c)
    chunk_of = {r["prompt"]: next(c.index for c in chunks if c.lo <= r["bucket"] <= c.hi) for r in rows}
    # The first chunk's first request (a task sends its rows in request_hash order).
    slow = min((r for r in rows if chunk_of[r["prompt"]] == 0), key=lambda r: r["request_hash"])["prompt"]
    fresh_endpoint.latency_of = lambda raw: 6.0 if json.loads(raw)["prompt"] == slow else 0.05

    summary = run_job(spark, cfg)

    assert len(chunks) >= 6 and summary.chunks == len(chunks)
    assert summary.by_status == {"ok": 96}
    got = spark.table(table_name).groupBy("id").count()
    assert got.count() == 96 and got.where("count > 1").count() == 0
    received = {r.body["prompt"]: r.arrived for r in fresh_endpoint.received}
    start = received[slow]
    beside = sorted(chunk_of[p] for p, t in received.items() if start < t < start + 6.0)
    assert beside and max(beside) >= 3, beside
