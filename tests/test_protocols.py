"""Wire protocols: request bodies and answer parsing, pure functions."""

from __future__ import annotations

import pytest

from udfs.protocols import BadResponse, Parsed, make_protocol


def test_custom_model_sends_records_with_stop_and_params():
    p = make_protocol("custom", model_kwargs={"max_tokens": 5})
    assert p.build(["a", "b"]) == {"dataframe_records": [{"prompt": "a", "stop": []}, {"prompt": "b", "stop": []}],
                                   "params": {"max_tokens": 5}}
    assert p.parse({"predictions": ["x", "y"]}, ["a", "b"]) == [Parsed(text="x"), Parsed(text="y")]
    assert p.parse({"predictions": "scalar"}, ["a"]) == [Parsed(text="scalar")]
    with pytest.raises(BadResponse, match="1 predictions for 2 records"):
        p.parse({"predictions": ["x"]}, ["a", "b"])


def test_completions_and_chat_bodies():
    c = make_protocol("llm/v1/completions", model_kwargs={"max_tokens": 8, "temperature": 0.1}, stop=["\n"])
    assert c.build(["hi"]) == {"prompt": "hi", "max_tokens": 8, "temperature": 0.1, "stop": ["\n"]}
    chat = make_protocol("llm/v1/chat", system_prompt="sys")
    assert chat.build(["hi"]) == {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]}
    answer = {"choices": [{"message": {"role": "assistant", "content": "yo"}}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    assert chat.parse(answer, ["hi"]) == [Parsed(text="yo", prompt_tokens=3, completion_tokens=1)]
    with pytest.raises(ValueError, match="one prompt per request"):
        c.build(["a", "b"])


@pytest.mark.parametrize("task, answer, message", [
    ("llm/v1/completions", {"choices": []}, "no 'choices' list"),
    ("llm/v1/completions", {"choices": [{"message": {}}]}, "choices\\[0\\] has no 'text'"),
    ("llm/v1/chat", {"choices": [{"text": "x"}]}, "no 'message.content'"),
    ("llm/v1/chat", {"error": "x"}, "keys: \\['error'\\]"),
    ("custom", {"outputs": 1}, "no 'predictions'"),
    ("llm/v1/embeddings", {"data": [{"embedding": [1, "x"]}]}, "not a number"),
])
def test_wrong_shapes_are_named(task, answer, message):
    with pytest.raises(BadResponse, match=message):
        make_protocol(task).parse(answer, ["p"])


def test_embeddings_are_matched_by_index_and_usage_is_shared():
    p = make_protocol("llm/v1/embeddings", model_kwargs={"dimensions": 2})
    assert p.build(["aa", "b"]) == {"input": ["aa", "b"], "dimensions": 2}
    answer = {"data": [{"index": 1, "embedding": [0, 1]}, {"index": 0, "embedding": [1, 0]}],
              "usage": {"prompt_tokens": 3}}
    assert p.parse(answer, ["aa", "b"]) == [Parsed(embedding=[1.0, 0.0], prompt_tokens=2),
                                            Parsed(embedding=[0.0, 1.0], prompt_tokens=1)]
    with pytest.raises(BadResponse, match="repeated"):
        p.parse({"data": [{"index": 0, "embedding": [1]}, {"index": 0, "embedding": [1]}]}, ["a", "b"])


def test_driver_proxy_sends_prompt_stop_and_kwargs_and_reads_a_string():
    p = make_protocol("custom", "driver_proxy", model_kwargs={"temperature": 0.3}, stop=["##"])
    assert p.build(["q"]) == {"prompt": "q", "stop": ["##"], "temperature": 0.3}
    assert p.parse("answer", ["q"]) == [Parsed(text="answer")]
    with pytest.raises(BadResponse, match="expected a string"):
        p.parse({"x": 1}, ["q"])


REVIEW = {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative"]}},
          "required": ["sentiment"]}
WIRE = {"type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW, "strict": True}}


def test_chat_and_completions_carry_response_format_as_documented():
    chat = make_protocol("llm/v1/chat", model_kwargs={"temperature": 0}, response_format=WIRE)
    assert chat.build(["hi"]) == {"messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                                  "response_format": WIRE}
    completions = make_protocol("llm/v1/completions", stop=["\n"], response_format=WIRE)
    assert completions.build(["hi"]) == {"prompt": "hi", "stop": ["\n"], "response_format": WIRE}


def test_custom_models_and_driver_proxy_apps_get_it_only_where_the_config_says():
    assert make_protocol("custom", response_format=WIRE).build(["a"]) == {
        "dataframe_records": [{"prompt": "a", "stop": []}]}
    assert make_protocol("custom", "driver_proxy", response_format=WIRE).build(["a"]) == {"prompt": "a", "stop": []}
    custom = make_protocol("custom", model_kwargs={"max_tokens": 5}, response_format=WIRE,
                           response_format_at="params.response_format")
    assert custom.build(["a"]) == {"dataframe_records": [{"prompt": "a", "stop": []}],
                                   "params": {"max_tokens": 5, "response_format": WIRE}}
    assert custom.build(["b"])["params"] == {"max_tokens": 5, "response_format": WIRE}  # model_kwargs untouched
    proxy = make_protocol("custom", "driver_proxy", response_format=WIRE, response_format_at="response_format")
    assert proxy.build(["a"]) == {"prompt": "a", "stop": [], "response_format": WIRE}
    with pytest.raises(ValueError, match="already has 'stop'"):
        make_protocol("custom", "driver_proxy", response_format=WIRE, response_format_at="stop").build(["a"])
