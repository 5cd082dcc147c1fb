"""grant_broker_client: the async Python SDK for grant-broker."""
