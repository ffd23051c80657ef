"""A new connection for each request to a tracking server that answers kept-alive ones late.

``mlflow server`` runs uvicorn with 4 workers by default, and uvicorn before 0.55 with more than one worker
left Nagle's algorithm on (uvicorn issue #3149): every request after a connection's first then waits for the
client's delayed ACK, ~40 ms on Linux, a dozen times per sweep trial. ``harness.tracking.store`` probes the
server once per command (``keepalive_delay``) and sets ``HARNESS_MLFLOW_NEW_CONNECTIONS`` to 1 when it is
one of those (0 otherwise; a value the user set is kept). This MLflow plugin (the entry point
``mlflow.request_header_provider`` in pyproject.toml) then adds ``Connection: close`` to MLflow's requests:
the server closes each connection after its answer, and the next request opens a new one (~1-3 ms on a LAN)
instead of waiting for the delayed ACK.
"""
from __future__ import annotations

import os

from mlflow.tracking.request_header.abstract_request_header_provider import RequestHeaderProvider

ENV = "HARNESS_MLFLOW_NEW_CONNECTIONS"


class NewConnections(RequestHeaderProvider):
    def in_context(self) -> bool:
        return os.environ.get(ENV) == "1"

    def request_headers(self) -> dict[str, str]:
        return {"Connection": "close"}
