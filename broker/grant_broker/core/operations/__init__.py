"""The operations of the broker, one module per device interface.

Each takes the calling :class:`~grant_broker.core.session.Session` and a
request message and answers a :class:`~grant_broker.core.reply.Reply`; the
route table (:mod:`grant_broker.core.routes`) names them for the transports.
"""
