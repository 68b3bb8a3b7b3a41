"""Prompts built from several columns (`input.template`) and input columns carried to the output
(`input.keep_columns`), end to end on local Spark with the local endpoint."""

from __future__ import annotations

import uuid

import pytest
from chispa import assert_df_equality

from jobs.errors import InputError
from jobs.pipeline import run_job
from tests.conftest import job_config
from tests.test_pipeline import proxy, view

REVIEWS = [(1, "Kettle", "It leaks.", "FR", 4.5), (2, "Mug", "Lovely {colour}", "DE", None),
           (3, None, "No product named.", "FR", 1.0), (4, "Mug", "Lovely {colour}", "IT", 2.0)]
SCHEMA = "id long, product string, body string, country string, score double"
TEMPLATE = "Classify this review of {product} ({score}): {body} {{json}}"


def test_a_template_fills_from_several_columns_and_kept_columns_land_beside_the_outcome(spark, fresh_endpoint,
                                                                                         table_name):
    src = view(spark, REVIEWS, SCHEMA)
    cfg = job_config(input={"table": src, "template": TEMPLATE, "keep_columns": ["country", "product"]},
                     output={"table": table_name}, endpoint=proxy(fresh_endpoint))
    run_job(spark, cfg)

    kettle = "Classify this review of Kettle (4.5): It leaks. {json}"
    expected = spark.createDataFrame([
        (1, "FR", "Kettle", kettle, f"Answer to: {kettle}", "ok", None),
        (2, "DE", "Mug", None, None, "error", "null_field: score is null"),
        (3, "FR", None, None, None, "error", "null_field: product is null"),
        (4, "IT", "Mug", "Classify this review of Mug (2.0): Lovely {colour} {json}",
         "Answer to: Classify this review of Mug (2.0): Lovely {colour} {json}", "ok", None),
    ], "id long, country string, product string, prompt string, response string, status string, error string")
    assert_df_equality(spark.table(table_name).select(*expected.columns), expected, ignore_row_order=True,
                       ignore_nullable=True)
    # The kept columns sit after the id, in the order given; the rendered prompt is what was sent.
    assert spark.table(table_name).columns[:4] == ["id", "country", "product", "prompt"]
    assert sorted(r.body["prompt"] for r in fresh_endpoint.received) == [
        kettle, "Classify this review of Mug (2.0): Lovely {colour} {json}"]


def test_null_fields_empty_sends_the_row_and_a_null_in_several_columns_is_named(spark, fresh_endpoint, table_name):
    src = view(spark, [(1, None, None, "FR", 1.0)], SCHEMA)
    errors = job_config(input={"table": src, "template": TEMPLATE}, output={"table": table_name},
                        endpoint=proxy(fresh_endpoint))
    run_job(spark, errors)
    assert spark.table(table_name).select("error").first()[0] == "null_field: product, body are null"
    assert fresh_endpoint.received == []

    other = f"test.t_{uuid.uuid4().hex[:10]}"
    empty = job_config(input={"table": src, "template": TEMPLATE, "null_fields": "empty"}, output={"table": other},
                       endpoint=proxy(fresh_endpoint))
    run_job(spark, empty)
    [req] = fresh_endpoint.received
    assert req.body["prompt"] == "Classify this review of  (1.0):  {json}"


def test_a_missing_template_or_kept_column_is_refused_before_any_spark_job_or_call(spark, fresh_endpoint,
                                                                                     table_name):
    src = view(spark, REVIEWS, SCHEMA)
    cfg = job_config(input={"table": src, "template": "Review of {product}: {text}", "keep_columns": ["region"]},
                     output={"table": table_name}, endpoint=proxy(fresh_endpoint))
    group = f"refused-{uuid.uuid4().hex[:8]}"
    spark.sparkContext.setJobGroup(group, "a config naming missing columns")
    try:
        with pytest.raises(InputError, match=r"^input.template: column 'text'; input.keep_columns: column 'region' "
                                             r"not found in input.table \w+ \(columns: \['id', 'product', 'body', "
                                             r"'country', 'score'\]\)$"):
            run_job(spark, cfg)
        assert list(spark.sparkContext.statusTracker().getJobIdsForGroup(group)) == []
        spark.range(1).count()  # the tracker does see this group's jobs: the check above is not vacuous
        assert len(spark.sparkContext.statusTracker().getJobIdsForGroup(group)) >= 1
    finally:
        spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)
    assert fresh_endpoint.received == []
    assert not spark.catalog.tableExists(table_name)
