"""Acme's pipelines for fanout: the worked example of docs/guide/deploying.md."""
