"""The errors the command line reports as one line and exit code 2 (with ``ConfigError``)."""


class CliError(Exception):
    """Bad usage or a state the user must change: one line, exit code 2."""


class UsageError(CliError):
    """The command line itself is wrong."""


class RunNotFound(CliError):
    """No such run (never started, or its ledger expired)."""


class RunFinished(CliError):
    """The run has finished (or was stopped already): nothing left to do to it."""
