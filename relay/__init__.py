"""Parley relay: one public UDP port, QUIC tunnels to nodes."""
