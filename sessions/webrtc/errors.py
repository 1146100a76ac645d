"""Exception families of the protocol cores.

Remote input errors (anything a peer can make us raise by sending bytes) derive from
:class:`RemoteInputError`: callers count them and drop the input. Everything else is a local
programming error and is allowed to crash the actor that hit it.
"""

from __future__ import annotations


class RemoteInputError(ValueError):
    """Input from the network was malformed or failed a check; count it and drop it."""


class StunError(RemoteInputError):
    """A STUN message could not be parsed or failed authentication."""


class RtpError(RemoteInputError):
    """An RTP or RTCP packet could not be parsed."""


class SdpError(RemoteInputError):
    """An SDP offer could not be parsed or offers nothing we can answer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        #: machine-readable reason, reused as the signaling error code
        self.code = code


class StateTransitionError(RuntimeError):
    """A protocol state machine was asked for a transition its table does not allow.

    Never the peer's doing: each machine checks what a peer sent before it changes state, so
    this is a bug in this process and is allowed to crash the actor that hit it.
    """
