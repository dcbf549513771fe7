"""Logging for the command line: lines for people, or one JSON object per line.

Configured once, by `p2p-node` at its start (`--log-level`, `--log-format`);
the library itself only logs, through `logging.getLogger(__name__)`.

A JSON line holds `time` (ISO 8601, UTC, milliseconds), `level`, `logger` and
`message`; then every field the call passed with `extra=` (`peer`, `job_id`,
...); then `exception` (the formatted traceback) when there is one.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord holds; anything else on a record came with `extra=`.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _utc_iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # Fields passed with extra= may be anything: what JSON cannot hold goes as str().
        return json.dumps(line, default=str)


def _utc_iso(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def configure_logging(level: str, log_format: str, *, quiet_libp2p: bool) -> None:
    """Log to stderr at `level` (one of LOG_LEVELS), as `log_format` (LOG_FORMATS)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level.upper(), handlers=[handler])
    if level == "debug":
        return
    if quiet_libp2p:
        # A client's failures are reported as one line by us; libp2p's own
        # multi-line error logs would only repeat them.
        logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    else:
        # A node's pubsub tries every new connection, clients included, and logs
        # an error each time a client does not speak GossipSub.
        logging.getLogger("libp2p.host.basic_host").setLevel(logging.CRITICAL)
