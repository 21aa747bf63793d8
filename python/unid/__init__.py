"""Unique, increasing integer ids from the local unid agent.

    import unid
    with unid.open("orders") as orders:
        i = orders.next()                  # an int
        batch = orders.take(1000)          # list[int], increasing
        first, count = orders.take_range(10_000)

The handle maps the agent's shared-memory ring (``/dev/shm/unid``, or
``UNID_RING_DIR``) and takes ids from it with one compare-and-swap; without a
ring it uses the agent's localhost socket (``UNID_SOCKET``, default
``127.0.0.1:7411``). Errors are subclasses of :class:`unid.Error` carrying the
client's messages. Handles may be shared by threads and survive ``os.fork()``:
a child's handle opens the sequence again and never hands out what the
parent's had taken.
"""

from ._unid import (
    TAKE_IDS_MAX,
    AgentNotRunning,
    BadCount,
    Corrupt,
    Error,
    Exhausted,
    Insecure,
    InvalidName,
    NotReady,
    PermissionDenied,
    ProtocolError,
    RingError,
    SocketError,
    TooWide,
    Unid,
    UnknownSequence,
    open,
)

__all__ = [
    "TAKE_IDS_MAX",
    "AgentNotRunning",
    "BadCount",
    "Corrupt",
    "Error",
    "Exhausted",
    "Insecure",
    "InvalidName",
    "NotReady",
    "PermissionDenied",
    "ProtocolError",
    "RingError",
    "SocketError",
    "TooWide",
    "Unid",
    "UnknownSequence",
    "open",
]
