"""What runs in a worker: the pipeline API, the engine, the Celery app and its parts.

Importing ``workers`` (or ``workers.api``) builds nothing; ``workers.celery`` builds the app
for ``celery -A workers``. The layers, top down (each imports only from below it):
``celery``/``app``/``consumer``/``broker`` -> ``engine`` -> ``api``/``hooks``/``context``/
``looping`` -> ``transport``/``ledger``/``message``/``dead_letters``/``sinks``/``http`` ->
``ids``/``keys``/``scripts``/``outcome``/``settings``/``connections``.
"""


from workers.limits import per_key  # ``from workers import per_key`` (builds nothing)

__all__ = ["per_key"]
