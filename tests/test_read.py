"""Reading: prompts rendered, ids checked, requests hashed, final rows set aside, the limit taken on what
is pending."""

from __future__ import annotations

import uuid

import pytest
from chispa import assert_df_equality
from pyspark.sql import functions as F

from jobs.config import InputConfig
from jobs.errors import InputError
from jobs.input.read import check_ids, read_input, with_limit, with_precheck, with_request_hash, without_final


def test_null_ids_stop_the_run_and_say_how_many(spark):
    df = spark.createDataFrame([(1, "a"), (None, "b"), (None, "c")], "id long, prompt string")
    with pytest.raises(InputError, match=r"^2 input row\(s\) have a null id; every row needs an id$"):
        check_ids(df)


def test_duplicate_ids_are_named_most_repeated_first(spark):
    df = spark.createDataFrame([(1, "a"), (1, "b"), (2, "c"), (3, "d"), (3, "e"), (3, "f")], "id long, prompt string")
    with pytest.raises(InputError, match=r"duplicate ids in the input, e.g. 3 \(x3\), 1 \(x2\); ids must be unique"):
        check_ids(df)


def test_unique_ids_pass(spark):
    check_ids(spark.createDataFrame([(1, "a"), (2, None)], "id long, prompt string"))


def test_the_request_hash_covers_prompt_and_parameters_and_tells_null_from_text(spark):
    df = spark.createDataFrame([(1, "a"), (2, "a"), (3, None), (4, "\u0001null")], "id long, prompt string")
    one = {r["id"]: r["request_hash"] for r in df.transform(with_request_hash("params-1")).collect()}
    two = {r["id"]: r["request_hash"] for r in df.transform(with_request_hash("params-2")).collect()}
    assert one[1] == one[2] != two[1]  # same prompt, same request; other parameters, another request
    assert len({one[1], one[3], one[4]}) == 3


def prior_table(spark):
    return spark.createDataFrame([
        (1, "h1", "ok"), (2, "h2", "error"), (3, "old", "ok"),
    ], "id long, request_hash string, status string")


@pytest.mark.parametrize("retry_errors, expected_ids", [(True, [2, 3, 4]), (False, [3, 4])])
def test_final_rows_are_set_aside_and_the_rest_marked_new_or_existing(spark, retry_errors, expected_ids):
    requests = spark.createDataFrame([(1, "h1"), (2, "h2"), (3, "new"), (4, "h4")], "id long, request_hash string")
    pending = requests.transform(without_final(prior_table(spark), retry_errors))
    # 1: ok with the same request -> final. 2: an error, final only without retry_errors.
    # 3: ok, but another request now (changed prompt or parameters) -> pending again, and in the table.
    # 4: never seen -> pending, appended.
    expected = spark.createDataFrame([(i, h, i != 4) for i, h in [(2, "h2"), (3, "new"), (4, "h4")] if i in expected_ids],
                                     "id long, request_hash string, _exists boolean")
    assert_df_equality(pending, expected, ignore_row_order=True, ignore_nullable=True)


def test_without_an_output_table_everything_is_new(spark):
    requests = spark.createDataFrame([(1, "h1")], "id long, request_hash string")
    expected = spark.createDataFrame([(1, "h1", False)], "id long, request_hash string, _exists boolean")
    assert_df_equality(requests.transform(without_final(None, True)), expected, ignore_nullable=True)


def test_the_limit_takes_the_lowest_ids(spark):
    df = spark.createDataFrame([(i,) for i in (9, 3, 7, 1, 5)], "id long")
    assert [r["id"] for r in df.transform(with_limit(3)).orderBy("id").collect()] == [1, 3, 5]
    assert df.transform(with_limit(None)).count() == 5
    assert df.transform(with_limit(3)).agg(F.max("id")).first()[0] == 5


def test_a_template_renders_from_several_columns_beside_the_kept_ones(spark):
    name = f"reviews_{uuid.uuid4().hex[:8]}"
    spark.createDataFrame([(1, "Kettle", "It leaks.", 2, "FR"), (2, None, "Nice.", 5, "DE"), (3, "Mug", None, None, "IT")],
                          "id long, product string, body string, stars int, country string").createOrReplaceTempView(name)
    errors = InputConfig(table=name, template="{product} ({stars}/5): {body} {{x}}", keep_columns=["country"])
    out = read_input(spark, errors).transform(with_precheck(100)).select("id", "country", "prompt", "precheck")
    expected = spark.createDataFrame([
        (1, "FR", "Kettle (2/5): It leaks. {x}", None),
        (2, "DE", None, "null_field: product is null"),
        (3, "IT", None, "null_field: stars, body are null"),
    ], "id long, country string, prompt string, precheck string")
    assert_df_equality(out, expected, ignore_row_order=True, ignore_nullable=True)

    empty = errors.model_copy(update={"null_fields": "empty"})
    out = read_input(spark, empty).transform(with_precheck(100)).select("id", "prompt", "precheck")
    expected = spark.createDataFrame([(1, "Kettle (2/5): It leaks. {x}", None), (2, " (5/5): Nice. {x}", None),
                                      (3, "Mug (/5):  {x}", None)], "id long, prompt string, precheck string")
    assert_df_equality(out, expected, ignore_row_order=True, ignore_nullable=True)
