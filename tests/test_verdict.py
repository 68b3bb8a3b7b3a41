"""The exit decision after every row is committed: `run.max_error_share` of the rows sent, `run.fail_on_error`,
and a last line that names the main reason."""

from __future__ import annotations

import uuid

import pytest

from jobs.errors import JobFailed
from jobs.observe.summary import RunSummary
from jobs.observe.verdict import judge
from tests.conftest import job_config

ROWS = [  # id, status, error
    (1, "ok", None),
    (2, "error", "http_503: TEMPORARILY_UNAVAILABLE: down (gave up after 3 attempts, 600.0s)"),
    (3, "error", "endpoint_unavailable: nothing answered for 480s (last: http_503: down)"),
    (4, "error", "endpoint_unavailable: nothing answered for 480s (last: http_503: down)"),
    (5, "error", "empty_prompt"),
    (6, "error", "empty_prompt"),
]


def landed(spark, rows, run_id: str = "r1") -> str:
    view = f"landed_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame([(i, s, e, run_id) for i, s, e in rows], "id long, status string, error string, run_id string") \
        .createOrReplaceTempView(view)
    return view


def summary_of(rows, run_id: str = "r1") -> RunSummary:
    s = RunSummary(run_id=run_id, output_table="t")
    for _, status, _ in rows:
        s.by_status[status] = s.by_status.get(status, 0) + 1
    return s


UNSENT = ["empty_prompt", "prompt_too_long: 250001 chars > run.max_prompt_chars 200000", "null_field: product is null"]


@pytest.mark.parametrize("unsent", UNSENT, ids=lambda e: e.split(":")[0])
def test_more_than_half_of_the_rows_sent_failed_fails_the_run_naming_the_main_reason(spark, unsent):
    rows = ROWS[:4] + [(5, "error", unsent), (6, "error", unsent)]
    view = landed(spark, rows)
    cfg = job_config(output={"table": view}, run={"max_error_share": 0.5})
    with pytest.raises(JobFailed) as err:
        judge(spark, cfg, summary_of(rows))
    # Rows 5 and 6 were never sent (a blank prompt, one too long, a null template field): 3 of the 4
    # sent failed.
    assert str(err.value).startswith(
        "run r1 failed: 3 of the 4 rows it sent failed (75%, above run.max_error_share 0.5); main reason: "
        "endpoint_unavailable (2 rows), e.g. 'endpoint_unavailable: nothing answered for 480s (last: "
        "http_503: down)'; every row is written, rerun to retry the failed ones; see ")


@pytest.mark.parametrize("share, fails", [(0.75, False), (0.74, True), (1.0, False)])
def test_the_share_is_a_threshold_above_which_the_run_fails(spark, share, fails):
    view = landed(spark, ROWS)
    cfg = job_config(output={"table": view}, run={"max_error_share": share})
    if fails:
        with pytest.raises(JobFailed):
            judge(spark, cfg, summary_of(ROWS))
    else:
        by_reason = judge(spark, cfg, summary_of(ROWS))
        assert {k: n for k, (n, _) in by_reason.items()} == {"http_503": 1, "endpoint_unavailable": 2,
                                                              "empty_prompt": 2}


def test_fail_on_error_fails_on_any_error_even_an_unsent_one(spark):
    rows = [(1, "ok", None), (2, "error", "empty_prompt")]
    cfg = job_config(output={"table": landed(spark, rows)}, run={"fail_on_error": True, "max_error_share": 1.0})
    with pytest.raises(JobFailed, match=r"^1 row\(s\) failed in run r1 \(run.fail_on_error is set\); main "
                                        r"reason: empty_prompt \(1 rows\)"):
        judge(spark, cfg, summary_of(rows))


def test_a_run_without_errors_reads_nothing(spark):
    cfg = job_config(output={"table": "test.no_such_table"})
    assert judge(spark, cfg, summary_of([(1, "ok", None)])) == {}
