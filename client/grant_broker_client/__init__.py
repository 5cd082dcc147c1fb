"""grant_broker_client: the async Python SDK for grant-broker.

>>> import grant_broker_client
>>> async def main() -> None:                       # doctest: +SKIP
...     async with await grant_broker_client.connect(domid=1) as session:
...         info = await session.describe()
...         print(info.capabilities.backend)
"""

from grant_broker_client.errors import BrokerClientError
from grant_broker_client.session import Session, connect
from grant_broker_protocol.endpoints import default_socket_path
from grant_broker_client.reconnect import ReconnectingSession, Retry

__all__ = ["BrokerClientError", "ReconnectingSession", "Retry", "Session", "connect", "default_socket_path"]
