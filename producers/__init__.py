"""What starts work: triggering runs, the schedule, and the ``fanout`` command line."""
