"""What runs in a worker: the Celery app, the fanout primitives, pipelines and sinks."""

from workers.app import app, load_pipelines

load_pipelines(app)

__all__ = ["app"]
