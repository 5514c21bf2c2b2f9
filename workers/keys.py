"""Every Redis key fanout writes, in one place.

Run keys carry the run id as a hash tag (``{R}``), so one run's keys share a Redis Cluster slot
and its Lua scripts may touch them together. They all expire (``Settings.ledger_ttl_s``,
refreshed as the run progresses); only configuration (limits, schedules) lives without a TTL.

Run ledger, for run R (``RunKeys``):
- ``fanout:run:{R}``          hash: pipeline, status, params (JSON), created/progress/finished
                              times, ``pending`` (items not yet terminal)
- ``fanout:run:{R}:counts``   hash: ``STAGE:COUNTER`` -> int (enqueued, succeeded, failed,
                              cached, retried, throttled, skipped, iterations), ``rows``
- ``fanout:run:{R}:items``    hash: item id -> state (``p`` pending, ``s`` ``f`` ``c`` ``k``)
- ``fanout:run:{R}:failed``   hash: item id -> JSON {stage, item, error_type, message, attempts,
                              traceback (its last 4,000 characters), ...}
- ``fanout:run:{R}:done``     list: one element pushed when the run finishes (BLPOP wakes waiters)
- ``fanout:run:{R}:payloads`` hash: item id -> payload JSON while the item is pending (so the
                              reaper can publish a lost message again)
- ``fanout:run:{R}:results``  hash: item id -> JSON of what a stage returned that is neither
                              children nor records (``RunView.results``, for small runs)
- ``fanout:run:{R}:loops``    hash: item id -> JSON {iteration, payload} of a looping item
- ``fanout:run:{R}:roots``    list: root item ids in the order they were given (result order)
- ``fanout:run:{R}:delayed``  sorted set: item id -> due time of its delayed message (the
                              scheduler's per-run index: the reaper counts these in flight)
- ``fanout:run:{R}:tries``    hash: item id -> tries that failed (HTTP retries included), and
                              ``ITEM@first`` -> time of the first; written on failures only
- ``fanout:run:{R}:batchmaps`` hash: map id -> JSON state of a batch map (size, total,
                              released, done, counts, kill switch spec, deciding, complete)
- ``fanout:run:{R}:bmof``     hash: item id -> the batch map it belongs to
- ``fanout:run:{R}:bmqueue``  hash: ``MAP:INDEX`` -> item id and payload of an item of a later
                              batch, until its batch is released
- ``fanout:run:{R}:fanned``   set: digests of the fan-outs already published (a parent run
                              again after its worker died publishes no second copy of them)

Shared:
- ``fanout:runs``             sorted set: run id -> created time (``fanout status``, the reaper)
- ``fanout:reaper:lock``      string: held by the one worker sweeping for lost messages
- ``fanout:workers``          sorted set: worker id -> time of its last heartbeat (server time);
                              a worker silent for ``liveness.HEARTBEAT_TTL_S`` is dead
                              (``workers/liveness.py``; ``Settings.ledger_ttl_s``, refreshed
                              at each beat)
- ``fanout:worker:ID:held``   set: kombu delivery tags worker ID holds (delivered, not yet
                              acknowledged), written with kombu's own unacked bookkeeping
                              (``broker.py``); ``Settings.ledger_ttl_s``, refreshed at each beat
- ``fanout:worker:ID:queues`` set: the queues worker ID claimed batches on (where its claims
                              are when it dies; ``lua/claim.lua``, ``Settings.ledger_ttl_s``)
- ``fanout:worker:ID:reaping`` string: the worker putting back what dead worker ID held
                              (``REAPING_TTL_S``)
- ``fanout:delayed``          sorted set: encoded delivery -> due time (loops, retries); a mover
                              in every worker publishes what is due (``engine/scheduler.py``)
- ``fanout:dead:QUEUE``       list: messages of QUEUE that could not be decoded, with the reason
- ``fanout:dead:queues``      set: the queues that have dead letters
- ``fanout:sink:down``        string: JSON {error, since, worker} while a worker cannot write
                              to the sink (``outage.py: SinkOutageNote``); refreshed at each
                              failed probe, deleted when it is back, else expires after 30 s

Global limits (``limits.py``), for limit NAME (a hash tag: one limit's keys share a slot):
- ``fanout:limits``             set: the names of all limits (configuration: no TTL)
- ``fanout:limit:{NAME}``       hash: ``rate`` ("60/h"), ``burst``, ``concurrency`` (configuration)
- ``fanout:limit:{NAME}:tat``   string: GCRA theoretical arrival time (server time); expires once
                              it has passed (then it means "idle")
- ``fanout:limit:{NAME}:backoff`` string: nothing passes before this time (a vendor's
                              Retry-After, for every worker); expires when it has passed
- ``fanout:limit:{NAME}:slots`` sorted set: holder id -> lease expiry; expires with its longest
                              lease

Cache (``engine/cache_hook.py``):
- ``fanout:cache:TASK:KEY``     string: what stage TASK produced for inputs KEY (JSON), with
                              the stage's ``cache_ttl_s``

Broker side (kombu's own keys): one list per stage queue, named ``fanout.PIPELINE.STAGE``, and
- ``fanout:claimed:QUEUE``    sorted set: messages of QUEUE a worker claimed to run in a batch
                              -> claim time (server time; ``transport.py``)
- ``fanout:claimers:QUEUE``   hash: claimed message -> the worker id that claimed it: put back
                              when that worker dies, never while it lives

Fair share between runs (``transport.py``, ``lua/publish.lua``, ``lua/claim.lua``): a stage
queue is ``LANES`` lists, kombu's priority steps of it, so Celery consumes every one and Flower
counts them all; each run waiting on the queue has a lane of its own while lanes last:
- ``QUEUE``, ``QUEUE\x06\x161`` .. ``QUEUE\x06\x169``  lists: lane 0 (kombu's list) to lane 9
- ``fanout:lanes:QUEUE``      hash: ``run:LANE`` -> the run whose messages wait in lane LANE,
                              ``weight:LANE`` -> its priority, ``credit:LANE`` -> the weighted
                              round-robin's running credit of the lane (``Settings.ledger_ttl_s``)
- ``fanout:run:{R}:priority``  string: run R's priority, its lanes' weight (1 when unset), on
                              the broker's Redis (``Settings.ledger_ttl_s``)

Schedules (``fanout beat``, ``producers/beat.py``); their configuration is the config file, not
Redis. For schedule NAME and the run id R of one of its slots (``sched-NAME-SLOT``):
- ``fanout:schedule:slot:R``  string: ``claimed TOKEN`` while one beat triggers the slot
                              (``FANOUT_SCHEDULE_LEASE_S``), then ``fired`` (the grace period
                              and the lease): the slot is done, on every beat
- ``fanout:schedule:NAME:runs`` sorted set: run id -> slot time of its last 100 runs
                              (``fanout schedules``; ``Settings.ledger_ttl_s``)
- ``fanout:schedule:NAME:error`` string: JSON {run_id, slot, message, at} of its last failed
                              trigger (``Settings.ledger_ttl_s``)
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "fanout"
RUNS_INDEX = f"{PREFIX}:runs"
REAPER_LOCK = f"{PREFIX}:reaper:lock"
DELAYED = f"{PREFIX}:delayed"
DEAD_QUEUES = f"{PREFIX}:dead:queues"
WORKERS = f"{PREFIX}:workers"
#: How long a worker may take to put back what one dead worker held before another may.
REAPING_TTL_S = 60
LIMITS_INDEX = f"{PREFIX}:limits"
SINK_DOWN = f"{PREFIX}:sink:down"


@dataclass(frozen=True, slots=True)
class RunKeys:
    """The keys of one run, by name: Lua scripts are given them by name (``scripts.py``)."""

    run: str
    counts: str
    items: str
    failed: str
    done: str
    payloads: str
    results: str
    loops: str
    roots: str
    delayed: str
    tries: str
    batchmaps: str
    bmof: str
    bmqueue: str
    fanned: str  # the fan-outs already published (runner.publish_children), by digest

    @classmethod
    def of(cls, run_id: str) -> RunKeys:
        base = f"{PREFIX}:run:{{{run_id}}}"
        return cls(
            run=base, counts=f"{base}:counts", items=f"{base}:items", failed=f"{base}:failed",
            done=f"{base}:done", payloads=f"{base}:payloads", results=f"{base}:results",
            loops=f"{base}:loops", roots=f"{base}:roots", delayed=f"{base}:delayed",
            tries=f"{base}:tries", batchmaps=f"{base}:batchmaps", bmof=f"{base}:bmof",
            bmqueue=f"{base}:bmqueue", fanned=f"{base}:fanned",
        )


@dataclass(frozen=True, slots=True)
class LimitKeys:
    """The keys of one limit, or of one key of a limit used per key (``limits.py``), named as
    the ``limit_*.lua`` scripts name them. A key's state sits beside its template's
    configuration (one hash slot: ``{name}``); ``keys`` is the template's index of keys in
    use (key -> when it goes idle)."""

    config: str
    tat: str
    backoff: str
    slots: str
    sent: str  # when the last async call went out (limit_send.lua)
    aimd: str  # a rate = "auto" limit's current rate (limit_aimd.lua)
    keys: str

    @classmethod
    def of(cls, name: str, key: str | None = None) -> LimitKeys:
        config = f"{PREFIX}:limit:{{{name}}}"
        base = config if key is None else f"{config}:key:{key}"
        return cls(config=config, tat=f"{base}:tat", backoff=f"{base}:backoff",
                   slots=f"{base}:slots", sent=f"{base}:sent", aimd=f"{base}:aimd",
                   keys=f"{config}:keys")


def cache(task_name: str, key: str) -> str:
    return f"{PREFIX}:cache:{task_name}:{key}"


def dead_letters(queue: str) -> str:
    return f"{PREFIX}:dead:{queue}"


def claimed(queue: str) -> str:
    return f"{PREFIX}:claimed:{queue}"


def claimers(queue: str) -> str:
    return f"{PREFIX}:claimers:{queue}"


def worker_held(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}:held"


def worker_queues(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}:queues"


def worker_reaping(worker_id: str) -> str:
    return f"{PREFIX}:worker:{worker_id}:reaping"


def queue_name(pipeline: str, stage: str) -> str:
    return f"{PREFIX}.{pipeline}.{stage}"


# Fair share between runs: a stage queue's lanes (see the module docstring).
#: Lanes per stage queue: kombu's priority steps 0..9 (``app.transport_options`` sets them).
LANES = 10
#: kombu's separator between a queue's name and its priority step.
LANE_SEP = "\x06\x16"


def queue_lane(queue: str, lane: int) -> str:
    """Lane ``lane`` of ``queue``: kombu's name for priority step ``lane`` (0: the queue)."""
    return f"{queue}{LANE_SEP}{lane}" if lane else queue


def queue_lanes(queue: str) -> list[str]:
    return [queue_lane(queue, lane) for lane in range(LANES)]


def lane_map(queue: str) -> str:
    return f"{PREFIX}:lanes:{queue}"


def run_priority(run_id: str) -> str:
    return f"{PREFIX}:run:{{{run_id}}}:priority"


# Schedules (fanout beat): see the module docstring.
def schedule_slot(run_id: str) -> str:
    return f"{PREFIX}:schedule:slot:{run_id}"


def schedule_runs(name: str) -> str:
    return f"{PREFIX}:schedule:{name}:runs"


def schedule_error(name: str) -> str:
    return f"{PREFIX}:schedule:{name}:error"
