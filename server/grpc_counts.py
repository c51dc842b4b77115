"""gRPC core's own count of the calls a server received (channelz), shed ones included.

Calls gRPC sheds from a full accept queue (``max_pending_rpcs``) never reach the server's code, so
no request counter of ours sees them; gRPC core still counts every call it started. Comparing the
two tells how many calls gRPC itself turned away. ``calls_started`` reads that count, for the
``fusionserve_grpc_calls_received`` gauge and the door's estimate of the loop's lag (server/admission.py).
A read is not cheap: it renders the server's channelz JSON while holding the GIL, about 0.8 ms of CPU
in fusionserve's (bench/cpu_budget.py's idle figure with 50 and with 10 reads a second).

channelz's Python entry point lives in grpcio's Cython module (``grpc._cython.cygrpc``): the
official ``grpcio-channelz`` servicer calls the same functions. Where it is missing, the gauge is
not exported.
"""

from __future__ import annotations

import json
from collections.abc import Callable

try:
    from grpc._cython import cygrpc

    _get_servers: Callable[[int], str] | None = cygrpc.channelz_get_servers
    _get_server: Callable[[int], str] | None = cygrpc.channelz_get_server
except (ImportError, AttributeError):  # pragma: no cover - a grpcio without channelz
    _get_servers = _get_server = None


def server_ids() -> set[int]:
    """The channelz ids of the gRPC servers of this process (empty without channelz)."""
    if _get_servers is None:
        return set()
    ids: set[int] = set()
    while True:
        page = json.loads(_get_servers(max(ids, default=-1) + 1))
        found = {int(server["ref"]["serverId"]) for server in page.get("server", [])}
        ids |= found
        if page.get("end", True) or not found:
            return ids


def calls_started(server_id: int) -> int:
    """Calls the gRPC server ``server_id`` has received since it started."""
    assert _get_server is not None
    return int(json.loads(_get_server(server_id))["server"]["data"].get("callsStarted", 0))
