"""gRPC channel and server options every process of the mesh agrees on."""

from __future__ import annotations

# The largest gRPC message a server accepts or a client sends or receives,
# on every channel of the mesh (servers, the SDK, the gateway's backends):
# a registry chunk is 1 MiB, an Infer tensor or a page of a list well under
# this. One number, so a message one side may send the other side takes.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MESSAGE_SIZE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)

# Channels to a peer that must be found again within a second of its return
# (the key directory, the usage ledger). gRPC keeps reconnect backoff (1 s,
# growing to 120 s) per subchannel in a process-wide pool, so a new channel
# inherited the backoff that earlier ones built up while the peer was away:
# a service took 2-5 s to follow a restarted gateway. A subchannel of the
# channel's own, retried every 0.1-0.5 s, finds it at once.
FAST_RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)
