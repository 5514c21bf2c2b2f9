"""Every Redis key fanout writes, in one place.

All run keys expire (``Settings.ledger_ttl_s``, refreshed as the run progresses); only
configuration (limits, schedules) would live without a TTL.

Run ledger, for run R:
- ``fanout:run:R``          hash: pipeline, status, params (JSON), created/started/finished
                            times, ``pending`` (items not yet terminal)
- ``fanout:run:R:counts``   hash: ``STAGE:COUNTER`` -> int (enqueued, succeeded, failed, cached,
                            retried, throttled, skipped), plus ``rows`` (sink rows written)
- ``fanout:run:R:items``    hash: item id -> state (``p`` pending, ``s`` succeeded, ``f`` failed)
- ``fanout:run:R:failed``   hash: item id -> JSON {stage, item, error_type, message, attempts}
- ``fanout:run:R:done``     list: one element pushed when the run finishes (BLPOP wakes waiters)
- ``fanout:run:R:payloads`` hash: item id -> payload JSON, while the item is pending (so the
                            reaper can publish a lost message again)
- ``fanout:run:R:results``  hash: item id -> JSON of what a stage returned that is neither
                            children nor records (``run_results``, for small runs)
- ``fanout:run:R:loops``    hash: item id -> JSON {iteration, payload} of a looping item
- ``fanout:run:R:roots``    list: root item ids in the order they were given (result order)
- ``fanout:runs``           sorted set: run id -> created time (for ``fanout status``)
- ``fanout:reaper:lock``    string: held by the one worker sweeping for lost messages
- ``fanout:delayed``        sorted set: due time -> message waiting for its delay (loops);
                            a mover in every worker publishes what is due

Queues (kombu's own keys): one list per stage queue, named ``fanout.PIPELINE.STAGE``.
- ``fanout:claimed:QUEUE``  sorted set: messages of QUEUE a worker claimed to run in a batch
                            -> claim time (``claiming.py``); put back if never released
"""

from __future__ import annotations

PREFIX = "fanout"
RUNS_INDEX = f"{PREFIX}:runs"
REAPER_LOCK = f"{PREFIX}:reaper:lock"
DELAYED = f"{PREFIX}:delayed"


def run(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}"


def run_counts(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:counts"


def run_items(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:items"


def run_failed(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:failed"


def run_done(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:done"


def run_payloads(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:payloads"


def run_results(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:results"


def run_loops(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:loops"


def run_roots(run_id: str) -> str:
    return f"{PREFIX}:run:{run_id}:roots"


def run_keys(run_id: str) -> list[str]:
    """The keys of one run, in the order the ledger's Lua scripts take them."""
    return [
        run(run_id), run_counts(run_id), run_items(run_id), run_failed(run_id), run_done(run_id),
        run_payloads(run_id), run_results(run_id), run_loops(run_id), run_roots(run_id),
    ]


def claimed(queue: str) -> str:
    return f"{PREFIX}:claimed:{queue}"


def queue_name(pipeline: str, stage: str) -> str:
    return f"{PREFIX}.{pipeline}.{stage}"
