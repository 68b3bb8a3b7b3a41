"""Endpoint wire protocols: a request body from prompts, a result per prompt from the answer.

Pure code: no HTTP, no Spark. Each protocol knows how many prompts one request may carry, how to build
the JSON body and how to read the answer back into one `Parsed` per prompt, or raise `BadResponse`
naming what was wrong with the answer.

Example::

    p = make_protocol("llm/v1/chat", model_kwargs={"max_tokens": 64}, system_prompt="Be brief.")
    body = p.build(["What is Delta Lake?"])
    [parsed] = p.parse({"choices": [{"message": {"content": "A table format."}}]}, n=1)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

# Tasks whose rows answer a vector: OpenAI-style `llm/v1/embeddings` (foundation and external models,
# driver-proxy apps answering a list of floats) and `custom/embeddings` (a pyfunc model's predictions).
EMBEDDING_TASKS = ("llm/v1/embeddings", "custom/embeddings")


def is_embeddings_task(task: str) -> bool:
    return task in EMBEDDING_TASKS


class BadResponse(ValueError):
    """The endpoint answered 2xx but the body is not what the protocol expects."""


@dataclass(frozen=True)
class Parsed:
    text: str | None = None
    embedding: list[float] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def _usage(answer: Any) -> tuple[int | None, int | None]:
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return None, None

    def num(key: str) -> int | None:
        v = usage.get(key)
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    return num("prompt_tokens"), num("completion_tokens")


def _split_tokens(total: int | None, weights: Sequence[int]) -> list[int | None]:
    """Share a request's token count among its rows by prompt length; the parts sum to the total."""
    if total is None:
        return [None] * len(weights)
    if len(weights) == 1:
        return [total]
    w = [max(1, x) for x in weights]
    exact = [total * x / sum(w) for x in w]
    parts = [int(e) for e in exact]
    for i in sorted(range(len(w)), key=lambda i: exact[i] - parts[i], reverse=True)[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _as_text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        # MLflow pyfunc models with dict outputs: take the one obvious text field.
        for key in ("text", "content", "response", "output", "generated_text", "prediction"):
            if isinstance(value.get(key), str):
                return value[key]
    raise BadResponse(f"{what} is {type(value).__name__}, expected a string")


def _as_vector(value: Any, what: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise BadResponse(f"{what} is not a non-empty list of numbers")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise BadResponse(f"{what} holds a value that is not a number")
    return [float(x) for x in value]


class Protocol:
    """Base: subclasses set `max_batch`, and implement `_body` and `parse`.

    A `response_format` (structured output, `udfs.structured.wire_format`) goes where the protocol
    takes it: `response_format_at` (a dotted key, `params.response_format`), else the protocol's own
    place, `format_at`, which only chat and completions have; elsewhere nothing is added.
    """

    max_batch = 1
    embeddings = False
    format_at: str | None = None

    def __init__(self, model_kwargs: dict[str, Any] | None = None, stop: Sequence[str] = (),
                 system_prompt: str | None = None, response_format: dict[str, Any] | None = None,
                 response_format_at: str | None = None) -> None:
        self.model_kwargs = dict(model_kwargs or {})
        self.stop = list(stop)
        self.system_prompt = system_prompt
        self.response_format = response_format
        self.response_format_at = response_format_at or self.format_at

    def build(self, prompts: Sequence[str]) -> dict[str, Any]:
        body = self._body(prompts)
        if self.response_format is not None and self.response_format_at:
            _put(body, self.response_format_at, self.response_format)
        return body

    def _body(self, prompts: Sequence[str]) -> dict[str, Any]:
        raise NotImplementedError

    def parse(self, answer: Any, prompts: Sequence[str]) -> list[Parsed]:
        raise NotImplementedError

    def _one(self, prompts: Sequence[str]) -> str:
        if len(prompts) != 1:
            raise ValueError(f"{type(self).__name__} sends one prompt per request, got {len(prompts)}")
        return prompts[0]


class CustomModel(Protocol):
    """MLflow pyfunc on a serving endpoint: `dataframe_records` in, `predictions` out, in order."""

    max_batch = 1024

    def _body(self, prompts: Sequence[str]) -> dict[str, Any]:
        # The scoring server refuses a record lacking a signature input, so `stop` is always sent.
        body: dict[str, Any] = {"dataframe_records": [{"prompt": p, "stop": self.stop} for p in prompts]}
        if self.model_kwargs:
            body["params"] = self.model_kwargs
        return body

    def parse(self, answer: Any, prompts: Sequence[str]) -> list[Parsed]:
        if isinstance(answer, dict) and "predictions" in answer:
            preds = answer["predictions"]
        elif isinstance(answer, list):
            preds = answer
        else:
            raise BadResponse(_shape("no 'predictions' in the answer", answer))
        if not isinstance(preds, list):
            preds = [preds]  # a scalar prediction for a one-record request
        if len(preds) != len(prompts):
            raise BadResponse(f"{len(preds)} predictions for {len(prompts)} records")
        return [Parsed(text=_as_text(p, f"predictions[{i}]")) for i, p in enumerate(preds)]


class CustomEmbeddings(CustomModel):
    """A pyfunc embedding model (task `custom/embeddings`): `{"inputs": [...]}` -> `{"predictions": [[...]]}`.

    `inputs` rather than `dataframe_records`: an embedding model's signature is a bare list of strings,
    and MLflow's scoring server hands `inputs` to the model as that list.
    """

    embeddings = True

    def _body(self, prompts: Sequence[str]) -> dict[str, Any]:
        body: dict[str, Any] = {"inputs": list(prompts)}
        if self.model_kwargs:
            body["params"] = self.model_kwargs
        return body

    def parse(self, answer: Any, prompts: Sequence[str]) -> list[Parsed]:
        preds = answer.get("predictions") if isinstance(answer, dict) else answer
        if not isinstance(preds, list):
            raise BadResponse(_shape("no 'predictions' list in the answer", answer))
        if len(prompts) == 1 and preds and not isinstance(preds[0], list):
            preds = [preds]
        if len(preds) != len(prompts):
            raise BadResponse(f"{len(preds)} vectors for {len(prompts)} inputs")
        return [Parsed(embedding=_as_vector(v, f"predictions[{i}]")) for i, v in enumerate(preds)]


class Completions(Protocol):
    """`llm/v1/completions`: `{prompt, max_tokens, temperature, stop}` -> `choices[0].text`."""

    format_at = "response_format"

    def _body(self, prompts: Sequence[str]) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": self._one(prompts), **self.model_kwargs}
        if self.stop:
            body["stop"] = self.stop
        return body

    def parse(self, answer: Any, prompts: Sequence[str]) -> list[Parsed]:
        choice = _first_choice(answer)
        if "text" not in choice:
            raise BadResponse(_shape("choices[0] has no 'text'", answer))
        pt, ct = _usage(answer)
        return [Parsed(text=_as_text(choice["text"], "choices[0].text"), prompt_tokens=pt, completion_tokens=ct)]


class Chat(Protocol):
    """`llm/v1/chat`: `{messages: [system?, user]}` -> `choices[0].message.content`."""

    format_at = "response_format"

    def _body(self, prompts: Sequence[str]) -> dict[str, Any]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": self._one(prompts)})
        body: dict[str, Any] = {"messages": messages, **self.model_kwargs}
        if self.stop:
            body["stop"] = self.stop
        return body

    def parse(self, answer: Any, prompts: Sequence[str]) -> list[Parsed]:
        message = _first_choice(answer).get("message")
        if not isinstance(message, dict) or "content" not in message:
            raise BadResponse(_shape("choices[0] has no 'message.content'", answer))
        content = message["content"]
        if isinstance(content, list):  # content parts: keep the text ones, in order
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        pt, ct = _usage(answer)
        return [Parsed(text=_as_text(content, "choices[0].message.content"), prompt_tokens=pt,
                       completion_tokens=ct)]


class Embeddings(Protocol):
    """`llm/v1/embeddings`: `{input: [...]}` -> `data[i].embedding`, matched by `data[i].index`.

    Servers may answer out of order (OpenAI documents `index` for this); without `index` the position
    in `data` is the input's position. The request's `usage.prompt_tokens` is shared among the inputs
    by length, so the rows of a request sum to what the endpoint reported.
    """

    max_batch = 2048
    embeddings = True

    def _body(self, prompts: Sequence[str]) -> dict[str, Any]:
        return {"input": list(prompts), **self.model_kwargs}

    def parse(self, answer: Any, prompts: Sequence[str]) -> list[Parsed]:
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            raise BadResponse(_shape("no 'data' list in the answer", answer))
        if len(data) != len(prompts):
            raise BadResponse(f"{len(data)} embeddings for {len(prompts)} inputs")
        vectors: list[list[float] | None] = [None] * len(prompts)
        for pos, item in enumerate(data):
            if not isinstance(item, dict) or "embedding" not in item:
                raise BadResponse(f"data[{pos}] has no 'embedding'")
            idx = item.get("index", pos)
            if not isinstance(idx, int) or not 0 <= idx < len(prompts) or vectors[idx] is not None:
                raise BadResponse(f"data[{pos}].index {idx!r} is out of range or repeated")
            vectors[idx] = _as_vector(item["embedding"], f"data[{pos}].embedding")
        pt, _ = _usage(answer)
        tokens = _split_tokens(pt, [len(p) for p in prompts])
        return [Parsed(embedding=v, prompt_tokens=t) for v, t in zip(vectors, tokens)]


class DriverProxy(Protocol):
    """A driver-proxy app: `POST /` with `{prompt, stop, **model_kwargs}`, answering a JSON string."""

    def _body(self, prompts: Sequence[str]) -> dict[str, Any]:
        return {"prompt": self._one(prompts), "stop": self.stop, **self.model_kwargs}

    def parse(self, answer: Any, prompts: Sequence[str]) -> list[Parsed]:
        return [Parsed(text=_as_text(answer, "the answer"))]


class DriverProxyEmbeddings(DriverProxy):
    """A driver-proxy app that answers a list of floats for one prompt."""

    embeddings = True

    def parse(self, answer: Any, prompts: Sequence[str]) -> list[Parsed]:
        return [Parsed(embedding=_as_vector(answer, "the answer"))]


def _put(body: dict[str, Any], at: str, value: Any) -> None:
    """`body["params"]["response_format"] = value` for `at = "params.response_format"`, making the dicts
    on the way; a key the body already holds is never overwritten (the request would change meaning)."""
    *parents, last = at.split(".")
    node = body
    for key in parents:
        child = node.get(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"{at}: the request body's {key!r} is not an object")
        # A copy: the body's dicts may be the protocol's own (`params` is model_kwargs), reused per request.
        node[key] = node = dict(child)
    if last in node:
        raise ValueError(f"{at}: the request body already has {last!r} (from model_kwargs or the protocol)")
    node[last] = value


def _first_choice(answer: Any) -> dict[str, Any]:
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadResponse(_shape("no 'choices' list in the answer", answer))
    return choices[0]


def _shape(problem: str, answer: Any) -> str:
    if isinstance(answer, dict):
        return f"{problem} (keys: {sorted(answer)[:8]})"
    return f"{problem} (got {type(answer).__name__})"


def make_protocol(task: str, endpoint_type: str = "serving", **kwargs: Any) -> Protocol:
    kinds: dict[tuple[str, str], Callable[..., Protocol]] = {
        ("serving", "custom"): CustomModel,
        ("serving", "llm/v1/completions"): Completions,
        ("serving", "llm/v1/chat"): Chat,
        ("serving", "llm/v1/embeddings"): Embeddings,
        ("serving", "custom/embeddings"): CustomEmbeddings,
        ("driver_proxy", "custom"): DriverProxy,
        ("driver_proxy", "llm/v1/embeddings"): DriverProxyEmbeddings,
    }
    try:
        return kinds[(endpoint_type, task)](**kwargs)
    except KeyError:
        raise ValueError(f"no protocol for a {endpoint_type} endpoint with task {task!r}") from None
