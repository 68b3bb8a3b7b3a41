"""The local stand-in endpoint's structured answers: JSON that fits the requested schema, from the prompt."""

from __future__ import annotations

import json

from jobs.local.stand_in import fit
from tests.test_structured import REVIEW
from udfs.structured import AnswerChecker


def test_the_stand_in_answers_json_that_fits_the_schema_deterministically():
    prompt = "Classify this review of Kettle Pro: I want a refund, it leaks. Is it negative?"
    schema = {**REVIEW, "properties": {**REVIEW["properties"], "words": {"type": "integer", "maximum": 10},
                                      "names": {"type": "array", "items": {"type": "string"}}}}
    value = fit(schema, prompt)
    assert value == fit(schema, prompt)
    assert value["sentiment"] == "negative" and value["refund_requested"] is True  # word found; ends with "?"
    assert (value["words"], value["names"]) == (10, ["Kettle", "Pro"])
    AnswerChecker(schema).check(json.dumps(value))
