"""gRPC on the broker's Unix socket: every call of the route table, for every language.

:mod:`.handlers` builds the handlers from :mod:`grant_broker.core.routes`;
:mod:`.status` maps :class:`~grant_broker_protocol.errors.BrokerError` to a
status, once.
"""
