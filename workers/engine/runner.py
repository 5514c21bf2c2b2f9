"""The stage runner: one path for a single delivery and for a claimed batch.

For each delivery: ledger check -> hooks before -> stage call -> hooks after -> fan-out ->
ledger. Order matters for at-least-once delivery with exactly-once accounting:
1. an item already terminal in the ledger is a duplicate delivery (an old loop iteration is
   stale): skip it before any vendor call;
2. run the stage function (or take what a hook served);
3. register and publish its children, or advance its loop;
4. only then write its records to the sink and move it to its terminal state (Lua), which may
   finish the run; a batch does both in one sink commit and one ledger round trip.
A worker killed anywhere before 4 leaves the item pending; its message comes back and steps
2-3 are repeated, which is harmless: registration and the sink are idempotent.

The items of an ``async def`` stage take the same path, but together: a batch's async items
run as tasks on the process's event loop (``workers/event_loop.py``), each with a turn of its
in-flight bound, while the worker thread waits for all of them; step 4 is then done once for
the whole batch, as for sync items. A sync stage's items run one after another, as before.

Each error in its bucket: a stage (or a hook's ``before``) that raises fails its item, tried
again when a hook asks (``Hook.retry``; the stage's retry policy is the last hook), logged and
recorded with its traceback once final; a raising ``after`` or ``on_failure`` is logged and
changes nothing (``hooks.HookCalls``); records the sink refuses (``SinkDataError``) fail the
items that gave them, found by writing item by item, while the others of the batch are
written; a sink that is down (``SinkDown``) holds the batch at the process's sink gate
(``sinks/gate.py``) until it is back, and only after the gate's longest wait do its messages
go back, as on a Redis error (``INFRA_ERRORS``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import inspect
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from kombu.exceptions import OperationalError

from workers import http
from workers.api import Pipeline, Stage, find_stage, get_pipeline
from workers.context import StageContext
from workers.engine import batch_maps
from workers.engine.batch_record import Batch, CopyOf, failure_of, format_traceback, record
from workers.engine.services import Services
from workers.engine.stage_hooks import hooks_for
from workers.event_loop import max_in_flight, process_loop
from workers.fair_gate import FairGate
from workers.hooks import Decision, Defer, Hook, HookCalls, Serve, Skip, StageResult
from workers.ids import RawJSON, canonical_json, item_id, loop_parent
from workers.ledger import Finish
from workers.looping import Loop, LoopLimitExceeded, LoopState
from workers.message import BadMessage, Delivery, decode_redis
from workers.outcome import Outcome
from workers.sinks import Record, SinkDown
from workers.throttle import Throttled

log = logging.getLogger("fanout")

#: Errors of fanout's own infrastructure: the item did not fail, its message goes back.
INFRA_ERRORS = (redis.RedisError, OperationalError, SinkDown)


def is_async(stage: Stage) -> bool:
    """Whether the stage is an ``async def`` (its items run on the process's event loop)."""
    return inspect.iscoroutinefunction(stage.fn)


def publish_children(
    services: Services, stage: Stage, run_id: str, parent_id: str, items: Sequence[Any]
) -> int:
    """Register children in the ledger, then publish them in bulk. Returns how many. A parent
    run again after its worker died (at-least-once) publishes nothing when its fan-out was
    published already: a second copy of a child still on its queue would run beside the
    first (and call the vendor twice); a child lost since is the reaper's to publish."""
    texts = [RawJSON(canonical_json(item)) for item in items]
    deliveries = [
        Delivery(stage.task_name, run_id, item_id(stage.name, parent_id, i, text), text)
        for i, text in enumerate(texts)
    ]
    if deliveries:
        items_ledger = services.ledger.items
        fan_out = fan_out_digest(parent_id, deliveries)
        entries = [(d.item_id, d.payload) for d in deliveries]
        if items_ledger.register(run_id, stage.name, entries, fan_out) is not None:
            services.transport.publish(deliveries)
            items_ledger.published(run_id, fan_out)
    return len(deliveries)


def fan_out_digest(parent_id: str, deliveries: Sequence[Delivery]) -> str:
    """Names one fan-out: its parent and the ids of its children (deterministic, so a parent
    run again makes the same one, and a second ``ctx.map`` of other items another)."""
    digest = hashlib.blake2b(parent_id.encode(), digest_size=12)
    for d in deliveries:
        digest.update(b"\0" + d.item_id.encode())
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ItemReport:
    """What happened to one delivery: for the task's result and per-item task events."""

    delivery: Delivery
    outcome: Outcome
    runtime_s: float
    exception: BaseException | None = None  # what its try raised (Throttled: held back)

    @property
    def error(self) -> str:
        """``ErrorType: message`` of what it raised, or ""."""
        exc = self.exception
        return "" if exc is None else f"{type(exc).__name__}: {str(exc)[:300]}"

    @property
    def traceback(self) -> str:
        """The traceback of what it raised, its last TRACEBACK_CHARS characters, or ""."""
        return "" if self.exception is None else format_traceback(self.exception)


#: This process's threads running a task now (``StageRunner.run_claimed``): a busy thread
#: competes for no claim.
_busy = [0]
_busy_lock = threading.Lock()


class StageRunner:
    def __init__(self, services: Services, claim_share: int = 1) -> None:
        self.services = services
        self.claim_share = claim_share  # the threads of this worker a claim competes with
        self.in_flight_bound = max_in_flight()  # the items of async stages it may run at once
        self._params: dict[str, dict[str, Any]] = {}
        self._weights: dict[str, int] = {}
        self._stage_hooks: dict[str, tuple[Hook, ...]] = {}
        self._params_lock = threading.Lock()

    # -- entry points ---------------------------------------------------------------------

    def run_claimed(self, first: Delivery, stage: Stage) -> list[ItemReport]:
        """Run ``first`` and, for a ``claim_batch`` stage, up to N-1 more messages claimed
        from its queue. For a sync stage, no more than this thread's fair share of what
        waits among the process's idle threads, so a short queue is spread over the threads
        that could run it (its items run one after another). An async stage's items run
        together, so its thread claims its share of the process's in-flight bound instead,
        whatever waits. A claimed message that does not decode is dead-lettered; the rest of
        the batch goes on. Claims are released once their items are recorded, or given back
        at once when they cannot be."""
        with _busy_lock:  # every stage's runner: the threads are the process's
            idle = self.claim_share - _busy[0]  # this thread and those with nothing to run
            _busy[0] += 1
        try:
            return self._run_claimed(first, stage, max(1, idle))
        finally:
            with _busy_lock:
                _busy[0] -= 1

    def _run_claimed(self, first: Delivery, stage: Stage, idle: int) -> list[ItemReport]:
        transport = self.services.transport
        # A sync stage's claim is shared with this process's idle threads only: beside
        # threads busy on long tasks (a backfill's batches) it takes what waits at once,
        # where spreading it would leave each item to a Celery delivery of its own.
        size, share = stage.claim_batch, idle
        if is_async(stage):
            size, share = min(size, -(-self.in_flight_bound // self.claim_share)), 1
        claimed = transport.claim(stage.queue, size - 1, share) if size > 1 else []
        work = [(first, stage)]
        runnable: list[str] = []
        for raw in claimed:
            decoded = self._decode_claimed(raw, stage)
            if decoded is not None:
                work.append(decoded)
                runnable.append(raw)
        try:
            reports = self.run(work)
        except BaseException:  # an infrastructure error, or anything unforeseen
            self._give_back(stage.queue, claimed, runnable)
            raise
        transport.release(stage.queue, claimed)
        return reports

    def _give_back(self, queue: str, claimed: Sequence[str], runnable: Sequence[str]) -> None:
        """The batch could not be recorded (the sink or Redis failed): its runnable claimed
        messages go back on their queue now, and the dead-lettered ones are released (the
        task's own message goes back through Celery). With Redis itself down the transport
        keeps what it owes and settles it at a heartbeat once Redis is back
        (``RedisTransport.settle``); should this worker die first, the reaper puts its claims
        back."""
        transport = self.services.transport
        try:
            transport.give_back(queue, runnable)
            # Only the dead-lettered ones: a message given back may be claimed again already.
            kept = set(runnable)
            transport.release(queue, [raw for raw in claimed if raw not in kept])
        except INFRA_ERRORS as exc:
            log.warning("%d claimed messages of %s go back once Redis answers again: %s",
                        len(runnable), queue, exc)

    def run(self, work: Sequence[tuple[Delivery, Stage]]) -> list[ItemReport]:
        """Run deliveries (each with its stage); returns what happened to each. Items of
        ``async def`` stages run together on the process's event loop, after the others."""
        ledger = self.services.ledger
        progress = ledger.items.progress_many([(d.run_id, d.item_id) for d, _ in work])
        batch = Batch()
        ran: list[tuple[Delivery, Outcome, float]] = []
        waiting: list[tuple[int, Delivery, Stage]] = []  # async items: (index in ran, ...)
        seen: set[CopyOf] = set()
        for (delivery, stage), (state, iteration, stopped) in zip(work, progress, strict=True):
            started = time.perf_counter()
            copy_of = (delivery.run_id, delivery.item_id, delivery.iteration)
            if copy_of in seen:  # two copies of one message in this batch: run it once
                outcome = Outcome.DUPLICATE
            elif stopped and state == "p":  # killed or cancelled: its items end unrun
                batch.add(Finish(delivery.run_id, stage.name, delivery.item_id,
                                 Outcome.SKIPPED, iteration))
                outcome = Outcome.SKIPPED
            elif (not_runnable := self._not_runnable(delivery, stage, state, iteration)):
                outcome = not_runnable
            elif is_async(stage):
                waiting.append((len(ran), delivery, stage))
                outcome = Outcome.UNKNOWN_ITEM  # a placeholder: replaced once it has run
            else:
                outcome = self._run_one(delivery, stage, batch)
            seen.add(copy_of)
            ran.append((delivery, outcome, time.perf_counter() - started))
        refused: set[CopyOf] = set()
        by_run: dict[str, list[tuple[int, Delivery, Stage]]] = {}
        for entry in waiting:
            by_run.setdefault(entry[1].run_id, []).append(entry)
        weights = {run_id: self._run_weight(run_id) for run_id in by_run}
        if len(by_run) == 1:
            loop = process_loop()
            ended = loop.run(self._run_together([(d, s) for _, d, s in waiting], batch,
                                                loop.gate, weights))
            for (index, delivery, _), (outcome, runtime_s) in zip(waiting, ended, strict=True):
                ran[index] = (delivery, outcome, runtime_s)
        elif by_run:
            refused = self._run_runs_apart(list(by_run.values()), ran, batch, weights)
        refused |= record(self.services, batch)
        reports = []
        for delivery, outcome, runtime_s in ran:
            copy_of = (delivery.run_id, delivery.item_id, delivery.iteration)
            if copy_of in refused and outcome is not Outcome.DUPLICATE:
                outcome = Outcome.FAILED
            reports.append(ItemReport(delivery, outcome, runtime_s, batch.errors.get(copy_of)))
        return reports

    def _run_runs_apart(
        self, groups: list[list[tuple[int, Delivery, Stage]]],
        ran: list[tuple[Delivery, Outcome, float]], batch: Batch, weights: dict[str, int],
    ) -> set[CopyOf]:
        """Async items of several runs in one claimed batch: each run's items together on
        the loop, each run recorded as soon as its items have ended. A small run's few items
        claimed beside a backfill's many then end with their own last item, not with the
        backfill's (which wait for turns behind the rest of the backfill at the gate). Should
        a run's items meet an infrastructure error, the runs that ended before it stay
        recorded, the rest do not, and the error is raised once all have ended (the batch
        goes back; its items already recorded come back as duplicates, and are skipped).
        Returns the items whose records the sink refused."""
        loop = process_loop()
        pending = {}
        for group in groups:
            own = Batch()  # the run's own: recorded apart from the others
            items = [(d, s) for _, d, s in group]
            pending[loop.submit(self._run_together(items, own, loop.gate, weights))] = (group, own)
        refused: set[CopyOf] = set()
        failure: BaseException | None = None
        for future in concurrent.futures.as_completed(pending):
            group, own = pending[future]
            try:
                ended = future.result()
            except BaseException as exc:
                failure = failure or exc
                continue
            for (index, delivery, _), (outcome, runtime_s) in zip(group, ended, strict=True):
                ran[index] = (delivery, outcome, runtime_s)
            batch.errors.update(own.errors)
            if failure is None:
                refused |= record(self.services, own)
        if failure is not None:
            raise failure
        return refused

    # -- one delivery ---------------------------------------------------------------------

    def _decode_claimed(self, raw: str, stage: Stage) -> tuple[Delivery, Stage] | None:
        try:
            delivery = decode_redis(raw)
        except BadMessage as exc:
            self.services.dead_letters.add(stage.queue, raw, exc.reason)
            return None
        own = find_stage(delivery.task)
        if own is None:
            self.services.dead_letters.add(stage.queue, raw, f"unknown task {delivery.task!r}")
            return None
        return delivery, own

    def _not_runnable(
        self, delivery: Delivery, stage: Stage, state: str | None, iteration: int
    ) -> Outcome | None:
        """Why the ledger says this delivery must not run, or None."""
        if state is None:
            log.warning("%s %s: unknown item (run expired?), dropped", stage.task_name,
                        delivery.item_id)
            return Outcome.UNKNOWN_ITEM
        if state != "p":
            return Outcome.DUPLICATE
        if iteration != delivery.iteration:
            return Outcome.STALE  # the loop has moved on; this is an old copy
        return None

    def _context(self, delivery: Delivery, stage: Stage) -> tuple[StageContext, HookCalls]:
        pipeline = get_pipeline(stage.pipeline)
        ctx = StageContext(
            delivery.run_id, delivery.item_id, stage.pipeline, stage.name,
            self._run_params(delivery.run_id), delivery.attempt,
            LoopState(delivery.iteration, delivery.loop_payload), frozenset(pipeline.stages),
        )
        return ctx, HookCalls(self._hooks(pipeline, stage))

    def _run_one(self, delivery: Delivery, stage: Stage, batch: Batch) -> Outcome:
        ctx, hooks = self._context(delivery, stage)
        try:
            served = self._decide(hooks.before(ctx, delivery.payload), delivery, stage, batch)
            if isinstance(served, Outcome):
                return served
            if served is not None:
                return self._complete(delivery, stage, served, batch, Outcome.CACHED)
            http.reset_tries()
            try:
                returned = stage.fn(ctx, delivery.payload)
            except Loop as signal:
                returned = signal
            result = self._result(stage, ctx, returned)
            hooks.after(ctx, delivery.payload, result)
            return self._complete(delivery, stage, result, batch, Outcome.SUCCEEDED)
        except Throttled as held:  # a limit holds the item: run it again later, not a retry
            hooks.on_failure(ctx, delivery.payload, held, final=False)
            return self._throttle(delivery, stage, held, batch)
        except INFRA_ERRORS as exc:
            hooks.on_failure(ctx, delivery.payload, exc, final=False)  # e.g. a slot given back
            raise
        except Exception as exc:
            return self._failed(delivery, stage, ctx, hooks, exc, batch)

    # -- async items: together on the process's event loop --------------------------------

    async def _run_together(
        self, items: Sequence[tuple[Delivery, Stage]], batch: Batch, gate: FairGate,
        weights: dict[str, int],
    ) -> list[tuple[Outcome, float]]:
        """Run async items concurrently, each with a turn at the process's gate (its run's
        weight from ``weights``); returns (outcome, runtime) of each. Every item ends before
        this returns: should one meet an infrastructure error, the others still finish
        (their turns given back), and then that error is raised, the batch unrecorded, as a
        sync batch would."""
        ended = await asyncio.gather(
            *(self._run_one_async(d, s, batch, gate, weights[d.run_id]) for d, s in items),
            return_exceptions=True,
        )
        for result in ended:
            if isinstance(result, BaseException):
                raise result
        return cast(list[tuple[Outcome, float]], ended)

    async def _run_one_async(
        self, delivery: Delivery, stage: Stage, batch: Batch, gate: FairGate, weight: int
    ) -> tuple[Outcome, float]:
        """``_run_one`` for an item of an ``async def`` stage, in a task of its own (its own
        HTTP try count). Hooks run here, on the loop: ``before_async`` may wait for a limit
        without blocking it; the rest are short."""
        async with gate.turn(delivery.run_id, weight):
            started = time.perf_counter()
            ctx, hooks = self._context(delivery, stage)
            try:
                decision = await hooks.before_async(ctx, delivery.payload)
                served = self._decide(decision, delivery, stage, batch)
                if isinstance(served, Outcome):
                    outcome = served
                elif served is not None:
                    outcome = self._complete(delivery, stage, served, batch, Outcome.CACHED)
                else:
                    http.reset_tries()
                    try:
                        returned = await stage.fn(ctx, delivery.payload)
                    except Loop as signal:
                        returned = signal
                    result = self._result(stage, ctx, returned)
                    hooks.after(ctx, delivery.payload, result)
                    outcome = self._complete(delivery, stage, result, batch,
                                             Outcome.SUCCEEDED)
            except Throttled as held:
                hooks.on_failure(ctx, delivery.payload, held, final=False)
                outcome = self._throttle(delivery, stage, held, batch)
            except INFRA_ERRORS as exc:
                hooks.on_failure(ctx, delivery.payload, exc, final=False)
                raise
            except Exception as exc:
                outcome = self._failed(delivery, stage, ctx, hooks, exc, batch)
            return outcome, time.perf_counter() - started

    def _hooks(self, pipeline: Pipeline, stage: Stage) -> tuple[Hook, ...]:
        """The pipeline's and the stage's hooks, then those its own options ask for (its
        cache, its limits, its retries: ``stage_hooks.STAGE_HOOKS``)."""
        found = self._stage_hooks.get(stage.task_name)
        if found is None:
            found = (*pipeline.hooks_of(stage), *hooks_for(stage, self.services.ledger.redis))
            self._stage_hooks[stage.task_name] = found
        return found

    def _throttle(
        self, delivery: Delivery, stage: Stage, held: Throttled, batch: Batch
    ) -> Outcome:
        self.services.ledger.items.note(delivery.run_id, stage.name, "throttled")
        self.services.scheduler.later(delivery, held.wait_s)
        # Kept as what the try raised: Flower shows the item RETRY, the limit as its reason.
        batch.errors[(delivery.run_id, delivery.item_id, delivery.iteration)] = held
        return Outcome.THROTTLED

    def _decide(
        self, decision: Decision | None, delivery: Delivery, stage: Stage, batch: Batch,
    ) -> StageResult | Outcome | None:
        """What the hooks decided: an outcome ends the item here, a result replaces the
        call, None runs it."""
        if isinstance(decision, Skip):
            batch.add(Finish(delivery.run_id, stage.name, delivery.item_id,
                             Outcome.SKIPPED, delivery.iteration))
            return Outcome.SKIPPED
        if isinstance(decision, Defer):
            return self._throttle(delivery, stage, Throttled(decision.delay_s, decision.reason),
                                  batch)
        if isinstance(decision, Serve):
            return decision.result
        return None

    @staticmethod
    def _result(stage: Stage, ctx: StageContext, returned: Any) -> StageResult:
        result = StageResult(children={k: list(v) for k, v in ctx.children.items()},
                             batch_maps=list(ctx.batch_maps))
        if isinstance(returned, Loop):
            result.next_loop = returned
        elif stage.maps_to:
            result.children.setdefault(stage.maps_to, []).extend(list(returned or []))
        elif isinstance(returned, Record):
            result.records = [returned]
        elif (isinstance(returned, list | tuple) and returned
              and all(isinstance(r, Record) for r in returned)):
            result.records = list(returned)
        else:
            result.value = returned
        return result

    def _complete(
        self, delivery: Delivery, stage: Stage, result: StageResult, batch: Batch,
        outcome: Outcome,
    ) -> Outcome:
        pipeline = get_pipeline(stage.pipeline)
        parent = loop_parent(delivery.item_id, delivery.iteration)
        for target, items in result.children.items():
            publish_children(self.services, pipeline.stages[target], delivery.run_id, parent,
                             items)
        for wanted in result.batch_maps:
            batch_maps.start(self.services, pipeline.stages[wanted["stage"]], delivery.run_id,
                             parent, wanted["items"], wanted["size"], wanted["switch"],
                             wanted["per_item"])
        if result.next_loop is not None:
            return self._advance(delivery, stage, result.next_loop)
        batch.add(Finish(delivery.run_id, stage.name, delivery.item_id, outcome,
                         delivery.iteration, rows=len(result.records), result=result.value),
                  result.records, delivery)
        return outcome

    def _advance(self, delivery: Delivery, stage: Stage, signal: Loop) -> Outcome:
        if delivery.iteration + 1 > stage.max_iterations:
            raise LoopLimitExceeded(
                f"{stage.task_name} looped past max_iterations={stage.max_iterations}"
            )
        advanced = self.services.ledger.loops.advance(
            delivery.run_id, stage.name, delivery.item_id, delivery.iteration, signal.payload
        )
        if advanced:  # a duplicate of this iteration must not enqueue the next one twice
            self.services.scheduler.later(delivery.next_iteration(signal.payload),
                                          signal.delay_s)
        return Outcome.LOOPED

    def _failed(
        self, delivery: Delivery, stage: Stage, ctx: StageContext, hooks: HookCalls,
        exc: Exception, batch: Batch,
    ) -> Outcome:
        """Apply what the hooks decide (the stage's retry policy is one: ``retry_hook``):
        another try after a delay, or a final failure."""
        retry = hooks.retry(ctx, delivery.payload, exc)
        hooks.on_failure(ctx, delivery.payload, exc, final=retry is None)
        items = self.services.ledger.items
        trace = batch.failed(delivery, exc)
        # Every try counts, the vendor client's own retries too (one per failed attempt).
        tries, first_at = items.record_tries(delivery.run_id, delivery.item_id,
                                             max(1, http.tries()))
        if retry is not None:
            items.note(delivery.run_id, stage.name, "retried")
            log.info("%s %s attempt %d failed (%s), retrying in %.1fs", stage.task_name,
                     delivery.item_id, delivery.attempt, exc, retry.delay_s)
            self.services.scheduler.later(delivery.next_attempt(), retry.delay_s)
            return Outcome.RETRYING
        failure = failure_of(stage.name, delivery, exc, trace, tries=tries, first_at=first_at)
        batch.add(Finish(delivery.run_id, stage.name, delivery.item_id, Outcome.FAILED,
                         delivery.iteration, failure=failure))
        log.warning("%s %s failed after %d attempts: %s", stage.task_name, delivery.item_id,
                    delivery.attempt, exc, exc_info=exc)
        return Outcome.FAILED

    # -- the end of a batch: engine/batch_record.py -----------------------------------

    def _run_weight(self, run_id: str) -> int:
        """The run's priority (1 when unset): its weight at the process's gate, as at the
        claims. Read once per process, as its parameters are, from where the transport
        keeps it (the broker's Redis, which need not be the ledger's)."""
        weight = self._weights.get(run_id)
        if weight is None:
            weight = self.services.transport.priority(run_id)
            with self._params_lock:
                if len(self._weights) > 256:
                    self._weights.clear()
                self._weights[run_id] = weight
        return weight

    def _run_params(self, run_id: str) -> dict[str, Any]:
        """Run parameters, read from the ledger once per process (messages stay lean)."""
        params = self._params.get(run_id)
        if params is None:
            params = self.services.ledger.view.params(run_id)
            with self._params_lock:
                if len(self._params) > 256:
                    self._params.clear()
                self._params[run_id] = params
        return params

