"""One request for a group of rows: build the body, send it within the task's limits, retry what is
worth retrying, split a batch the endpoint refuses, and parse the answer into one `Outcome` per row.

It never raises for a row: every failure becomes an error outcome with a reason code
(`udfs.reasons`), and its message has no secret in it (`udfs.auth.scrub`). Async, in the engine's
event loop; `udfs.engine` runs many at once. With a response schema (structured output) each answer
is checked against it (`udfs.structured`); one that breaks it is asked for again, then becomes an
`invalid_output` row that keeps the raw answer.

Example::

    caller = Caller(spec, transport, AdaptiveLimiter(8), RateLimiter())
    outcomes = await caller.acall(["What is Delta Lake?"])
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any, Sequence

from udfs import reasons
from udfs.auth import scrub
from udfs.limits import AdaptiveLimiter, RateLimiter
from udfs.outcome import MAX_ERROR_CHARS, Outcome
from udfs.protocols import BadResponse, Parsed, Protocol, make_protocol
from udfs.retry import Failure, backoff, http_failure
from udfs.spec import EngineSpec
from udfs.structured import AnswerChecker, InvalidOutput, wire_format
from udfs.transforms import import_function
from udfs.transport import TransportError


class Caller:
    def __init__(self, spec: EngineSpec, transport: Any, limiter: AdaptiveLimiter, rate: RateLimiter) -> None:
        self.spec = spec
        schema = spec.response_schema
        self.protocol: Protocol = make_protocol(
            spec.task, spec.endpoint_type, model_kwargs=spec.model_kwargs, stop=spec.stop,
            system_prompt=spec.system_prompt, response_format_at=spec.response_format_at,
            response_format=None if schema is None else wire_format(schema, spec.response_format_name,
                                                                     spec.response_format_strict))
        self._checker = AnswerChecker(schema) if schema is not None else None
        self.batch = max(1, min(spec.rows_per_request, self.protocol.max_batch))
        self._transform_in = import_function(spec.transform_input) if spec.transform_input else None
        self._transform_out = import_function(spec.transform_output) if spec.transform_output else None
        self._transport = transport
        self.limiter = limiter
        self.rate = rate
        self._secrets = spec.secrets()
        # The first fatal transport error met (udfs.transport.FATAL_KINDS): not retried, and the
        # engine's pipeline sends nothing more and raises it.
        self.fatal: TransportError | None = None

    async def acall(self, prompts: Sequence[str]) -> list[Outcome]:
        """Send `prompts` as one request (retrying, splitting on rejection); one outcome per prompt."""
        try:
            return await self._call(prompts, self.spec.retry.invalid_output_attempts)
        except Exception as exc:  # a bug or a transform that raised: the rows fail, the batch does not
            reason = self._clean(f"{reasons.INTERNAL_ERROR}: {type(exc).__name__}: {exc}")
            return [Outcome.failed(reason) for _ in prompts]

    async def _call(self, prompts: Sequence[str], reasks: int) -> list[Outcome]:
        try:
            body = self.protocol.build(prompts)
            if self._transform_in is not None:
                body = self._transform_in(body)
            payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        except Exception as exc:
            reason = self._clean(f"{reasons.TRANSFORM_INPUT_FAILED}: {type(exc).__name__}: {exc}")
            return [Outcome.failed(reason) for _ in prompts]
        sent: list[float] = []  # when the first attempt left: queueing before it is not latency
        attempts = 0
        policy = self.spec.retry
        while True:
            attempts += 1
            try:
                parsed = await self._attempt(payload, prompts, sent)
            except Failure as f:
                elapsed = time.monotonic() - sent[0] if sent else 0.0
                if f.split and len(prompts) > 1:
                    half = len(prompts) // 2
                    return await self._call(prompts[:half], reasks) + await self._call(prompts[half:], reasks)
                wait = backoff(attempts, f.retry_after, policy)
                if f.retryable and attempts < policy.max_attempts and elapsed + wait <= policy.row_budget_s:
                    await asyncio.sleep(wait)  # holds no slot: other rows go meanwhile
                    continue
                gave_up = f"(gave up after {attempts} attempts, {elapsed:.1f}s)" if f.retryable and attempts > 1 else ""
                latency = round(elapsed * 1000, 3)
                reason = self._clean(f.reason(), gave_up)
                return [Outcome.failed(reason, http_status=f.status, attempts=attempts, latency_ms=latency)
                        for _ in prompts]
            latency = round((time.monotonic() - sent[0]) * 1000, 3)
            outcomes = [Outcome(response=p.text, embedding=p.embedding, http_status=200, attempts=attempts,
                                latency_ms=latency, prompt_tokens=p.prompt_tokens,
                                completion_tokens=p.completion_tokens) for p in parsed]
            if self._checker is None:
                return outcomes
            return await self._checked(prompts, outcomes, reasks, sent[0])

    async def _checked(self, prompts: Sequence[str], outcomes: list[Outcome], reasks: int,
                       first_sent: float) -> list[Outcome]:
        """Each answer against the response schema: a valid one gets its canonical JSON, an invalid one
        becomes `invalid_output` keeping its raw text, and is asked for again while `reasks` remain
        (the invalid rows of a request together, as a request of their own)."""
        checker = self._checker
        assert checker is not None
        bad = []
        for i, o in enumerate(outcomes):
            try:
                o.parsed_json = checker.check(o.response)
            except InvalidOutput as exc:
                o.status, o.error = "error", self._clean(f"{reasons.INVALID_OUTPUT}: {exc}")
                bad.append(i)
        if not bad or reasks <= 0:
            return outcomes
        again = await self._call([prompts[i] for i in bad], reasks - 1)
        latency = round((time.monotonic() - first_sent) * 1000, 3)
        for i, new in zip(bad, again):
            old = outcomes[i]
            # A re-ask that failed otherwise (a timeout) keeps the first answer: it says more about the row.
            kept = new if new.status == "ok" or (new.error or "").startswith(reasons.INVALID_OUTPUT) else old
            # Every attempt was paid for: attempts and tokens add up, latency runs from the first send.
            outcomes[i] = replace(kept, attempts=old.attempts + new.attempts, latency_ms=latency,
                                  prompt_tokens=_plus(old.prompt_tokens, new.prompt_tokens),
                                  completion_tokens=_plus(old.completion_tokens, new.completion_tokens))
        return outcomes

    async def _attempt(self, payload: bytes, prompts: Sequence[str], sent: list[float]) -> list[Parsed]:
        if self.fatal is not None:  # a row back from a backoff sleep: the task is failing, send nothing
            raise Failure(self.fatal.kind, self.fatal.detail)
        await self.limiter.acquire()
        overloaded, latency = False, None
        try:
            await self.rate.acquire()
            t0 = time.monotonic()
            if not sent:
                sent.append(t0)
            try:
                status, headers, data = await self._transport.post(payload)
            except TransportError as exc:
                if exc.fatal:
                    self.fatal = self.fatal or exc
                raise Failure(exc.kind, exc.detail, retryable=not exc.fatal) from None
            latency = time.monotonic() - t0
            if 200 <= status < 300:
                return self._parse(data, prompts)
            overloaded = status in (429, 503)
            raise http_failure(status, headers, self._text(data), rows=len(prompts), spec=self.spec.retry)
        finally:
            self.limiter.release(overloaded=overloaded, latency=None if overloaded else latency)

    def _parse(self, data: bytes, prompts: Sequence[str]) -> list[Parsed]:
        try:
            answer = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            snippet = self._text(data)[:80].replace("\n", " ")
            raise Failure(reasons.BAD_RESPONSE, f"answer is not JSON: {snippet!r}", status=200) from None
        if self._transform_out is not None:
            try:
                answer = self._transform_out(answer)
            except Exception as exc:
                raise Failure(reasons.TRANSFORM_OUTPUT_FAILED, f"{type(exc).__name__}: {exc}", status=200) from None
            if isinstance(answer, str) and len(prompts) == 1:
                return [Parsed(text=answer)]
            if isinstance(answer, list) and len(answer) == len(prompts) and all(isinstance(a, str) for a in answer):
                return [Parsed(text=a) for a in answer]
        try:
            parsed = self.protocol.parse(answer, prompts)
        except BadResponse as exc:
            raise Failure(reasons.BAD_RESPONSE, str(exc), status=200) from None
        usage = sum((p.prompt_tokens or 0) + (p.completion_tokens or 0) for p in parsed)
        self.rate.charge_tokens(usage)
        return parsed

    def _clean(self, text: str, suffix: str = "") -> str:
        """Secrets out, then the cut, then `suffix`: the endpoint's message is cut, never our own note."""
        if not suffix:
            return scrub(text, self._secrets)[:MAX_ERROR_CHARS]
        room = MAX_ERROR_CHARS - len(suffix) - 1
        return f"{scrub(text, self._secrets)[:room]} {suffix}"

    def _text(self, data: bytes) -> str:
        """A failed answer's start as text, secrets removed. Only the first 16 KiB: messages are read from
        the first 4,000 characters, and a run of a secret cut at the edge is still scrubbed if it is
        8 characters or more (shorter is not a secret's worth)."""
        return scrub(data[:16384].decode("utf-8", "replace"), self._secrets)


def _plus(a: int | None, b: int | None) -> int | None:
    return None if a is None and b is None else (a or 0) + (b or 0)
