"""grant_broker.deviceplugin.v1beta1: kubelet's device-plugin API, generated from
proto/grant_broker/deviceplugin/v1beta1/api.proto by the build (setup.py).

``api_pb2`` / ``api_pb2_grpc`` (and their typed stubs) are not kept in version control.
"""
