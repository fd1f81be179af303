"""Benchmarks: scripts that print figures and write JSON (never timed assertions)."""

from proxy_common import runtime

# The driver (the project's client library in this process) runs with the same grpc
# settings as the daemons; the daemons it starts inherit them.
runtime.prefer_inline_grpc_io()
