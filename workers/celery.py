"""``celery -A workers worker`` (and ``celery -A workers flower``) find the app here."""

from workers.app import create_app

app = create_app()
