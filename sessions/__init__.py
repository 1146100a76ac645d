"""Parley transceiver: WebRTC sessions, audio, agents and the node daemon."""
