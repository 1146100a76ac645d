"""The node daemon: registration under a lease, the session supervisor, signaling, media ports.

Above the session library (``sessions.webrtc``, ``sessions.audio``, ``sessions.agents``, the
transceiver): the library never imports this package.
"""
