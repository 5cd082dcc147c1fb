"""The broker's own semantics, free of any transport.

Sessions and what they hold (:mod:`.session`), who may connect and how much
they may hold (:mod:`.policy`), the registry of live sessions
(:mod:`.registry`), event fan-out (:mod:`.events`), the operations
(:mod:`.operations`) and the one table of calls (:mod:`.routes`); what the
transports report of each call (:mod:`.observe`) and what the sessions hold,
counted when asked (:mod:`.census`); the audit records of what the sessions
did and were refused (:mod:`.audit`).  An
operation takes the session and a request message and answers a
:class:`~grant_broker.core.reply.Reply` or raises
:class:`~grant_broker_protocol.errors.BrokerError`.  Nothing here imports
``grpc``: ``tests/test_layers.py`` checks it.
"""
