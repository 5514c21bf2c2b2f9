"""Policies as pure functions and frozen values: no Celery, no Redis, no hidden state.

- ``retry``: when to retry a failed item and how long to wait first (seed 004).
- ``cache_options``, ``limit_options``: the stage options of caching and limits, checked.
- ``gcra``: the Generic Cell Rate Algorithm's arithmetic, mirrored by ``lua/limit_gcra.lua``.
- ``kill_switch``: when a batch map must stop, decided from the run's counters (seed 003).

Time and randomness are passed in (``now_s``, ``rand``) so every decision is testable with
exact numbers.
"""
