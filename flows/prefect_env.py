"""Local Prefect settings for the `webkd` CLI and the bench scripts, applied in one explicit call
(`local_defaults()`, before Prefect is imported), never as a side effect of importing a module.

Each is a default: a value already in the environment wins. `PREFECT_HOME` is left to Prefect
(`~/.prefect`, one per user): the temporary server's SQLite database is never shared by every
user of an install.
"""
import os

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # the first start of a temporary server migrates its database: over a minute on 2 cores
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    # the library's own log lines (webkd.pipeline, .selection, .training) reach the flow run's logs
    "PREFECT_LOGGING_EXTRA_LOGGERS": "webkd",
    # library log lines outside a flow run (the demo's no-flow baseline) go to the console only,
    # without Prefect's "attempted to send logs to the API without a flow run id" warning
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def local_defaults() -> None:
    """Set the defaults above where the environment says nothing."""
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
