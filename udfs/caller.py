"""One request for a group of rows: build the body, send it within the task's limits, retry what is
worth retrying, split a batch the endpoint refuses, and parse the answer into one `Outcome` per row.

It never raises for a row: every failure becomes an error outcome with a reason code
(`udfs.reasons`), and its message has no secret in it (`udfs.auth.scrub`). Async, in the engine's
event loop; `udfs.engine` runs many at once. With a response schema (structured output) each answer
is checked against it (`udfs.structured`); one that breaks it is asked for again, then becomes an
`invalid_output` row that keeps the raw answer.

Every request goes through the task's `Governor` (`udfs.limits`): a 429, a 503 or an endpoint that
takes no connection pauses the task until one probe is answered, and such a row is retried as long as
its `row_budget_s` lasts, not `max_attempts` times (a pause of 429s alone is not counted, up to
`max_pause_s`); when the breaker opens, the rows still waiting fail at once as `endpoint_unavailable`.
With refreshable credentials (`udfs.auth.Credentials`) a token due to expire is refreshed before it is
sent, and a 401/403 refreshes it and retries once; a new token that would inject headers (a line
break) is a fatal `invalid_header`, never sent.

Example::

    caller = Caller(spec, transport, AdaptiveLimiter(8), RateLimiter())
    outcomes = await caller.acall(["What is Delta Lake?"])
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from udfs import reasons
from udfs.auth import CredentialError, Secret, scrub
from udfs.budget import Budget, BudgetSpent, estimate_tokens
from udfs.limits import (OVERLOAD, TRANSIENT, UNAVAILABLE, AdaptiveLimiter, EndpointUnavailable, Governor,
                         OutOfTime, RateLimiter)
from udfs.outcome import MAX_ERROR_CHARS, Outcome
from udfs.prompts import CHARS_PER_TOKEN
from udfs.protocols import BadResponse, Parsed, Protocol, make_protocol
from udfs.retry import RATE_LIMITED, Failure, backoff, http_failure
from udfs.spec import EngineSpec
from udfs.structured import AnswerChecker, InvalidOutput, wire_format
from udfs.transforms import import_function
from udfs.transport import TransportError, header_problem


def governor_for(spec: EngineSpec) -> Governor:
    """The task's governor as the spec sets it: a starting rate and a ceiling, learning, the breaker,
    half-open if the endpoint was down in an earlier chunk."""
    return Governor(rate=spec.start_requests_per_s, ceiling=spec.requests_per_s, learn=spec.adaptive,
                    breaker_s=spec.retry.breaker_s, max_pause_s=spec.retry.max_pause_s, half_open=spec.endpoint_down)


# A refused token: these statuses get one retry with a fresh token when the credentials can refresh.
AUTH_STATUSES = (401, 403)


@dataclass
class _Tries:
    """One request's attempts so far. `sent` is filled by the first attempt that leaves
    (`Caller._attempt`): when (monotonic; queueing before it is not latency), the rate-limit pauses
    then, and the wall clock then (the rows' `sent_at`)."""
    attempts: int = 0
    sent: list[float] = field(default_factory=list)
    last: Failure | None = None  # the last failure
    auth_retried: bool = False  # a refused token was refreshed once

    def elapsed(self) -> float:
        return time.monotonic() - self.sent[0] if self.sent else 0.0

    def latency_ms(self) -> float:
        return round(self.elapsed() * 1000, 3)

    @property
    def sent_at(self) -> float | None:
        return self.sent[2] if self.sent else None


class Caller:
    def __init__(self, spec: EngineSpec, transport: Any, limiter: AdaptiveLimiter, rate: RateLimiter,
                 governor: Governor | None = None, budget: Budget | None = None) -> None:
        self.spec = spec
        # `run.budget`: every attempt reserves its worst case first; none is sent once it is spent.
        self.budget = budget if budget is not None else (Budget(spec.budget) if spec.budget else None)
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
        self.governor = governor or governor_for(spec)
        self._credentials = spec.credentials
        self._refreshing: asyncio.Future[None] | None = None
        self._refresh_failed: tuple[float, CredentialError] | None = None
        self._checked_generation: int | None = None  # the last token found fit to send
        self._static_secrets = [v for v in spec.headers.values() if isinstance(v, Secret)]
        max_tokens = spec.model_kwargs.get("max_tokens")
        # AI Gateway reserves max_tokens for a request before it runs; so does the token bucket.
        self._max_tokens = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 0
        # The first fatal transport error met (udfs.transport.FATAL_KINDS): not retried, and the
        # engine's pipeline sends nothing more and raises it.
        self.fatal: TransportError | None = None
        # Another endpoint takes this one's excess (`udfs.router`): a 429, a 503 or no connection
        # hands the row on (`HANDED_OFF`) instead of waiting here for the endpoint to answer again.
        self.hand_off = False
        # This endpoint's prices, for a budget shared by several endpoints.
        self._prices = (spec.budget.price_in, spec.budget.price_out) if spec.budget else None

    async def acall(self, prompts: Sequence[str]) -> list[Outcome]:
        """Send `prompts` as one request (retrying, splitting on rejection); one outcome per prompt."""
        try:
            return await self._call(prompts, self.spec.retry.invalid_output_attempts)
        except Exception as exc:  # a bug or a transform that raised: the rows fail, the batch does not
            reason = self._clean(f"{reasons.INTERNAL_ERROR}: {type(exc).__name__}: {exc}")
            return [Outcome.failed(reason) for _ in prompts]

    async def _call(self, prompts: Sequence[str], reasks: int) -> list[Outcome]:
        payload = self._payload(prompts)
        if not isinstance(payload, bytes):  # the body could not be built: the rows fail, nothing is sent
            return payload
        tries = _Tries()
        while True:
            tries.attempts += 1
            try:
                parsed = await self._attempt(payload, prompts, tries.sent)
            except BudgetSpent:  # not sent: the rows stay pending for the next run
                return [Outcome.unsent(tries.attempts - 1) for _ in prompts]
            except (EndpointUnavailable, OutOfTime) as stop:  # this attempt was never sent
                tries.attempts -= 1
                return self._stopped(stop, prompts, tries)
            except Failure as f:
                ended = await self._failed(f, prompts, reasks, tries)
                if ended is None:
                    continue
                return ended
            latency = tries.latency_ms()
            outcomes = [Outcome(response=p.text, embedding=p.embedding, http_status=200,
                                attempts=tries.attempts, latency_ms=latency, sent_at=tries.sent_at,
                                prompt_tokens=p.prompt_tokens, completion_tokens=p.completion_tokens)
                        for p in parsed]
            if self._checker is None:
                return outcomes
            return await self._checked(prompts, outcomes, reasks, tries.sent[0])

    def _payload(self, prompts: Sequence[str]) -> bytes | list[Outcome]:
        """The request's body, through the input transform; if that fails, the rows' outcomes."""
        try:
            body = self.protocol.build(prompts)
            if self._transform_in is not None:
                body = self._transform_in(body)
            return json.dumps(body, ensure_ascii=False).encode("utf-8")
        except Exception as exc:
            reason = self._clean(f"{reasons.TRANSFORM_INPUT_FAILED}: {type(exc).__name__}: {exc}")
            return [Outcome.failed(reason) for _ in prompts]

    def _stopped(self, stop: EndpointUnavailable | OutOfTime, prompts: Sequence[str],
                 tries: _Tries) -> list[Outcome]:
        """The rows' outcomes when the governor sends no more: the breaker opened, or the rows' time ran
        out while the task was paused (then the last failure is the reason)."""
        last = tries.last
        if isinstance(stop, OutOfTime) and last is not None:
            gave_up = f"(gave up after {tries.attempts} attempts, {tries.elapsed():.1f}s)"
            reason = self._clean(last.reason(), gave_up)
        else:
            reason = self._clean(f"{reasons.ENDPOINT_UNAVAILABLE}: {stop}")
        end = Outcome.handed_off if self.hand_off else Outcome.failed
        latency = tries.latency_ms() if tries.sent else None
        return [end(reason, http_status=last.status if last else None, attempts=tries.attempts,
                    latency_ms=latency, sent_at=tries.sent_at) for _ in prompts]

    async def _failed(self, f: Failure, prompts: Sequence[str], reasks: int,
                      tries: _Tries) -> list[Outcome] | None:
        """After a failed attempt: the rows' outcomes (split in two, handed off, failed), or None to send
        again (after a new token, a pause the governor holds, or a backoff)."""
        tries.last = f
        elapsed = tries.elapsed()
        if f.split and len(prompts) > 1:
            half = len(prompts) // 2
            return await self._call(prompts[:half], reasks) + await self._call(prompts[half:], reasks)
        creds = self._credentials
        if (f.status in AUTH_STATUSES and not tries.auth_retried and creds is not None and creds.refreshable
                and f.auth_generation is not None):
            tries.auth_retried = True  # one new token, one more try: a refused token is not load
            try:
                await self._refresh(f.auth_generation)
                return None
            except CredentialError as exc:
                f = tries.last = Failure(reasons.CREDENTIAL_REFUSED, f"{f.reason()}; {exc}", status=f.status)
        policy = self.spec.retry
        spent = elapsed - self._paused_since(tries.sent)  # a rate-limit pause is not the row's time
        latency = round(elapsed * 1000, 3)
        if f.governed and f.retryable and self.hand_off:  # another endpoint takes the row now
            return [Outcome.handed_off(self._clean(f.reason()), http_status=f.status, attempts=tries.attempts,
                                       latency_ms=latency, sent_at=tries.sent_at) for _ in prompts]
        if f.governed and f.retryable and policy.max_attempts > 1 and spent < policy.row_budget_s:
            return None  # the governor holds the next attempt back until the endpoint answers again
        wait = backoff(tries.attempts, f.retry_after, policy)
        if (not f.governed and f.retryable and tries.attempts < policy.max_attempts
                and spent + wait <= policy.row_budget_s):
            await asyncio.sleep(wait)  # holds no slot: other rows go meanwhile
            return None
        gave_up = (f"(gave up after {tries.attempts} attempts, {elapsed:.1f}s)"
                   if f.retryable and tries.attempts > 1 else "")
        text = f.reason()
        if f.status in AUTH_STATUSES and tries.auth_retried:
            text, gave_up = f"{reasons.CREDENTIAL_REFUSED}: {text}", "(refused again after a token refresh)"
        return [Outcome.failed(self._clean(text, gave_up), http_status=f.status, attempts=tries.attempts,
                               latency_ms=latency, sent_at=tries.sent_at) for _ in prompts]

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
            outcomes[i] = replace(kept, attempts=old.attempts + new.attempts, latency_ms=latency, sent_at=old.sent_at,
                                  prompt_tokens=_plus(old.prompt_tokens, new.prompt_tokens),
                                  completion_tokens=_plus(old.completion_tokens, new.completion_tokens))
        return outcomes

    async def _attempt(self, payload: bytes, prompts: Sequence[str], sent: list[float]) -> list[Parsed]:
        if self.fatal is not None:  # a row back from a backoff sleep: the task is failing, send nothing
            raise Failure(self.fatal.kind, self.fatal.detail)
        deadline = sent[0] + self.spec.retry.row_budget_s + self._paused_since(sent) if sent else None
        reserve = sum(len(p) for p in prompts) // CHARS_PER_TOKEN + self._max_tokens
        probe = await self._slot(deadline)
        reported = False
        overloaded, latency, work, t0 = False, None, None, None
        held, usage = None, None  # the budget's reservation; (prompt, completion) tokens once answered
        try:
            if self.fatal is not None:  # the task failed while this request waited for a slot: send nothing
                raise Failure(self.fatal.kind, self.fatal.detail)
            if self.budget is not None:
                held = await self.budget.reserve(estimate_tokens(sum(len(p) for p in prompts)),
                                                 0 if self.protocol.embeddings else (self._max_tokens or None),
                                                 prices=self._prices)
            await self.rate.acquire(reserve, self._max_tokens)
            auth, generation = await self._auth()
            t0 = time.monotonic()
            if not sent:
                sent += [t0, self.governor.rate_paused_s(), time.time()]
            try:
                usage = (0, 0)  # sent: a request that gets no answer still counts as one
                status, headers, data = await self._transport.post(payload, auth)
            except TransportError as exc:
                if exc.fatal:
                    self.fatal = self.fatal or exc
                self.governor.failed(UNAVAILABLE if exc.unreachable else TRANSIENT, probe, None,
                                     self._clean(f"{exc.kind}: {exc.detail}")[:200])
                reported = True
                self.rate.refund(reserve, self._max_tokens)
                raise Failure(exc.kind, exc.detail, retryable=not exc.fatal,
                              governed=exc.unreachable and not exc.fatal) from None
            latency = time.monotonic() - t0
            if 200 <= status < 300:
                self.governor.answered(probe)
                reported = True
                usage = (None, None)  # answered: until its usage is read, the reservation stands
                parsed = self._parse(data, prompts, reserve)
                work = self._work(parsed)
                usage = _usage(parsed)
                return parsed
            f = self._refused(status, headers, data, len(prompts), probe)
            f.auth_generation = generation
            reported = True
            overloaded = f.governed  # a 429 or a 503 (`GOVERNED_STATUSES`): AIMD halves the in-flight limit
            self.rate.refund(reserve, self._max_tokens)
            raise f
        finally:
            if held is not None and self.budget is not None:
                self.budget.settle(held, *(usage or (None, None)), sent=usage is not None, prices=self._prices)
            if probe and not reported:  # cancelled, or no token: the probe did not get an answer
                self.governor.failed(TRANSIENT, probe)
            self.limiter.release(overloaded=overloaded, latency=None if overloaded else latency, work=work,
                                 sent_at=t0)

    def _refused(self, status: int, headers: Mapping[str, str], data: bytes, rows: int, probe: bool) -> Failure:
        """A non-2xx answer as a `Failure`, told to the governor: a 429 or a 503 pauses the task, another
        5xx counts against its breaker, and a refusal of this request (a 4xx) says the endpoint is up."""
        f = http_failure(status, headers, self._text(data), rows=rows, spec=self.spec.retry)
        kind = ((OVERLOAD if status == RATE_LIMITED else UNAVAILABLE) if f.governed
                else TRANSIENT if status >= 500 else None)
        if kind is None:
            self.governor.answered(probe)  # it answered, if with a refusal of this request: it is up
        else:
            self.governor.failed(kind, probe, f.retry_after, self._clean(f.reason())[:200])
        return f

    def _work(self, parsed: list[Parsed]) -> float | None:
        """How much an answer was, for the limiter's latency per unit: the rows of an embeddings request,
        the output tokens of a completion (from `usage`); None when the answer does not say."""
        if self.protocol.embeddings:
            return float(len(parsed))
        tokens = [p.completion_tokens for p in parsed if p.completion_tokens]
        return float(sum(tokens)) if tokens else None

    def _paused_since(self, sent: list[float]) -> float:
        """Seconds of rate-limit pauses since the row was first sent (`sent`: when, and the pauses then)."""
        return self.governor.rate_paused_s() - sent[1] if len(sent) > 1 else 0.0

    async def _slot(self, deadline: float | None) -> bool:
        """Wait for the governor, then for a slot of the in-flight limit; True if the request goes as the
        probe of a pause."""
        while True:
            probe = await self._governed(deadline)
            await self.limiter.acquire()
            if probe or not (self.governor.paused or self.governor.open_reason):
                return probe
            # Let through before a pause began, then queued for a slot: the pause holds it too.
            self.limiter.release()

    async def _governed(self, deadline: float | None) -> bool:
        """`governor.acquire`, telling the limiter while the governor holds the request (a pause, pacing):
        it waits for the governor, not for a slot, and a pooled limiter must not lend its idle share
        to a neighbour meanwhile (`udfs.hostpool`)."""
        held = self.governor.ready_in() != 0
        if held:
            self.limiter.held_back(1)
        try:
            return await self.governor.acquire(deadline)
        finally:
            if held:
                self.limiter.held_back(-1)

    async def _auth(self) -> tuple[dict[str, str] | None, int | None]:
        """The Authorization header for this request, refreshed first if it is due."""
        creds = self._credentials
        if creds is None:
            return None, None
        if creds.due(time.time()):
            try:
                await self._refresh(creds.generation)
            except CredentialError as exc:
                if creds.header() is None:
                    raise Failure(reasons.CREDENTIAL_REFUSED, str(exc)) from None
                # The token held may still be good: the endpoint says if not (401), and that retries.
        value = creds.header()
        if value is not None and creds.generation != self._checked_generation:
            # A token minted during the run was never seen by the driver's check (`jobs.endpoint.resolve`): one
            # with a line break would inject headers, and fails every request alike, so it is fatal
            # here, whichever client would send it.
            problem = header_problem("Authorization", value.reveal())
            if problem:
                self.fatal = self.fatal or TransportError(reasons.INVALID_HEADER, f"{creds!r} gave a token: {problem}")
                raise Failure(self.fatal.kind, self.fatal.detail)
            self._checked_generation = creds.generation
        return ({"Authorization": value.reveal()} if value is not None else None), creds.generation

    async def _refresh(self, seen: int) -> None:
        """A new token, once for all the requests refused with (or due with) generation `seen`."""
        creds = self._credentials
        assert creds is not None
        pending = self._refreshing
        if pending is not None and not pending.done():
            await asyncio.shield(pending)
            return
        if creds.generation != seen:
            return  # another request refreshed it meanwhile
        if self._refresh_failed is not None and time.monotonic() - self._refresh_failed[0] < 5.0:
            raise self._refresh_failed[1]  # the token endpoint just failed: do not ask it once per row
        self._refreshing = asyncio.get_running_loop().run_in_executor(None, creds.refresh)
        try:
            await self._refreshing
        except CredentialError as exc:
            self._refresh_failed = (time.monotonic(), exc)
            raise

    def _parse(self, data: bytes, prompts: Sequence[str], reserve: int = 0) -> list[Parsed]:
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
        reported = [p for p in parsed if p.prompt_tokens is not None or p.completion_tokens is not None]
        self.rate.settle(reserve, sum(p.prompt_tokens or 0 for p in reported) if reported else None,
                         sum(p.completion_tokens or 0 for p in reported) if reported else None, self._max_tokens)
        return parsed

    def _clean(self, text: str, suffix: str = "") -> str:
        """Secrets out, then the cut, then `suffix`: the endpoint's message is cut, never our own note."""
        secrets = self._secrets()
        if not suffix:
            return scrub(text, secrets)[:MAX_ERROR_CHARS]
        room = MAX_ERROR_CHARS - len(suffix) - 1
        return f"{scrub(text, secrets)[:room]} {suffix}"

    def _text(self, data: bytes) -> str:
        """A failed answer's start as text, secrets removed. Only the first 16 KiB: messages are read from
        the first 4,000 characters, and a run of a secret cut at the edge is still scrubbed if it is
        8 characters or more (shorter is not a secret's worth)."""
        return scrub(data[:16384].decode("utf-8", "replace"), self._secrets())

    def _secrets(self) -> list[Secret]:
        """The headers' secrets and every token the credentials have held (they change during a run)."""
        held = self._credentials.secrets() if self._credentials is not None else []
        return self._static_secrets + held


def _usage(parsed: list[Parsed]) -> tuple[int | None, int | None]:
    """(prompt, completion) tokens an answer reports, None where it reports none."""
    reported = [p for p in parsed if p.prompt_tokens is not None or p.completion_tokens is not None]
    if not reported:
        return None, None
    return sum(p.prompt_tokens or 0 for p in reported), sum(p.completion_tokens or 0 for p in reported)


def _plus(a: int | None, b: int | None) -> int | None:
    return None if a is None and b is None else (a or 0) + (b or 0)
