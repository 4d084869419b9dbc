"""Sizes every process of the mesh agrees on, in one place."""

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
