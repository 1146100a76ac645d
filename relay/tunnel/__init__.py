"""The tunnel library both ends use: mutually authenticated QUIC links between relays and nodes,
their datagram framing, the cluster's certificates and the routing hints minted into ICE ufrags.

The relay daemon (``relay.daemon``, ``relay.edge``, ``relay.routes``) and the node daemon
(``sessions.node.daemon``) import it; it imports neither.
"""
