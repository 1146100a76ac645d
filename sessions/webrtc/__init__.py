"""Sans-I/O WebRTC protocol cores."""
