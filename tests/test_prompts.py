"""The blank-prompt rule: any Unicode whitespace, the same in Spark's precheck and in the engine."""

from __future__ import annotations

import sys

from chispa import assert_df_equality

from jobs.input.read import with_precheck
from udfs.prompts import is_blank

# Every character Python calls whitespace, from the Unicode tables, not from our own list.
WHITESPACE = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
NOT_WHITESPACE = ["\u200b", "\ufeff", "\u180e", "x", "\x00"]  # zero-width space, BOM, ... are text


def test_blank_means_any_unicode_whitespace():
    assert len(WHITESPACE) == 29
    assert all(is_blank(c * 3) for c in WHITESPACE)
    assert is_blank("\t\n \r\n") and is_blank("") and is_blank(None)
    assert not any(is_blank(c) for c in NOT_WHITESPACE)
    assert not is_blank(" a ")


def test_spark_precheck_applies_the_same_rule(spark):
    prompts = [c * 2 for c in WHITESPACE] + ["\t\n \r\n", "", None] + NOT_WHITESPACE + [" a\u3000"]
    df = spark.createDataFrame(list(enumerate(prompts)), "id int, prompt string")
    # The expectation comes from Python's str.strip(), which strips exactly str.isspace() characters.
    expected = spark.createDataFrame(
        [(i, p, "empty_prompt" if p is None or not p.strip() else None) for i, p in enumerate(prompts)],
        "id int, prompt string, precheck string")
    assert_df_equality(df.transform(with_precheck(1000)), expected, ignore_nullable=True)
