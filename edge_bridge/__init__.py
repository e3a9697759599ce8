"""The edge side: the bridge daemon (ingress, durable buffer, shipper,
heartbeats) and the SDK edge applications import (:mod:`edge_bridge.sdk`)."""
