"""Transports: thin adapters that carry the core's calls to clients.

* :mod:`grant_broker.transport.fdchannel` serves the session's SOCK_SEQPACKET
  channel: the hello that opens a session, and the descriptors clients send.
* :mod:`grant_broker.transport.grpc` serves every call of the route table
  (:mod:`grant_broker.core.routes`) over gRPC.

A transport authenticates a call, decodes it, runs the core's operation and
encodes what it answers; it holds no semantics of its own.
"""
