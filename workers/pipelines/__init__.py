"""Vendor pipelines bundled with fanout."""
