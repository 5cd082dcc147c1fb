"""grant_broker_protocol.v1: the generated protobuf/gRPC modules of proto/grant_broker/v1.

Everything else in this package is produced by the build (setup.py) from the
.proto files and is not kept in version control.
"""
