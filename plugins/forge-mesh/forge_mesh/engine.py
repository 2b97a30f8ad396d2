"""Which I/O path grpcio's C core takes in this process; must run before anything imports grpc.

grpcio's asyncio stack hands every completed operation from the C core to the event loop through
a poller thread (a socketpair wakes the loop). Since the C core moved its sockets to the
EventEngine, a message that arrives also crosses the EventEngine's own threads first (an epoll
thread, then a worker that reads and parses), so one stream round trip costs each process about
12 context switches against about 6 on the older polling path, where the thread waiting in
``grpc_completion_queue_next`` polls the sockets itself (measured with a 1 KB message on one
bidirectional stream: 120 -> 77 us per round trip, 63 -> 40 us of CPU per side). On a busy
machine every extra thread wake-up is a wait for a core, which is where forwarded calls lost
their milliseconds.

The C core reads ``GRPC_EXPERIMENTS`` once, when grpc is first imported, so this runs from the
package's ``__init__`` before any module of ours imports grpc. An operator's own
``GRPC_EXPERIMENTS`` is left as it is. ``tests/test_mesh_engine.py`` proves the flags are still
understood by the installed grpcio and still keep the EventEngine threads out of each call.
"""

from __future__ import annotations

import os
import sys

#: the client connector and server listener on the C core's polling path instead of the EventEngine
EXPERIMENTS = "-event_engine_client,-event_engine_listener"

#: why the flags were not applied in this process ("" when they were)
not_applied = ""


def prefer_polling_path() -> None:
    global not_applied
    if "GRPC_EXPERIMENTS" in os.environ:
        if os.environ["GRPC_EXPERIMENTS"] != EXPERIMENTS:
            not_applied = f"GRPC_EXPERIMENTS is set to {os.environ['GRPC_EXPERIMENTS']!r} in the environment"
        return
    if "grpc" in sys.modules:
        not_applied = "grpc was imported before forge_mesh (its C core had read its settings already)"
        return
    os.environ["GRPC_EXPERIMENTS"] = EXPERIMENTS
