"""SDP lexing (RFC 8866 §5): a session description into its session part and media sections.

Checks only the syntax every SDP shares: the line types and where they may appear, the
``o=`` and ``m=`` lines, attribute names. What the lines mean is for
:mod:`~sessions.webrtc.sdp.offer` to say.
"""

from __future__ import annotations

import re
from typing import Final, final

import attrs

from sessions.webrtc.sdp.grammar import TOKEN_RE, bad

__all__ = ["MAX_SDP_CHARS", "Section", "lex"]

#: Offers longer than this are refused before parsing (a many-transceiver browser offer
#: is a few tens of KiB; this only bounds the work a peer can make us do).
MAX_SDP_CHARS: Final = 256 * 1024

_PROTO_RE: Final = re.compile(
    r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+(?:/[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+)*", re.ASCII
)
_LINE_RE: Final = re.compile(r"([a-z])=(.*)", re.ASCII | re.DOTALL)
_PORT_RE: Final = re.compile(r"([0-9]{1,5})(?:/([0-9]{1,5}))?", re.ASCII)
_ORIGIN_RE: Final = re.compile(r"\S+ [0-9]{1,20} [0-9]{1,20} \S+ \S+ \S+", re.ASCII)
# RFC 8866 §5 fixes which line types exist and where; anything else is refused (§5 allows
# a parser to reject a description containing a type letter it does not understand).
_SESSION_TYPES: Final = frozenset("vosiuepcbtrzka")
_MEDIA_TYPES: Final = frozenset("icbka")


@final
@attrs.frozen
class Section:
    """One session- or media-level block of lines. ``kind`` is None for the session."""

    kind: str | None
    port: int
    proto: str
    fmts: tuple[str, ...]
    attributes: tuple[tuple[str, str], ...]
    other_lines: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        """Values of every ``a=<name>`` line, in order."""
        return [value for key, value in self.attributes if key == name]

    def has(self, name: str) -> bool:
        """Whether an ``a=<name>`` line is present."""
        return any(key == name for key, _ in self.attributes)

    def single(self, name: str) -> str | None:
        """Value of an attribute that may appear at most once; repeats must agree."""
        values = set(self.values(name))
        if len(values) > 1:
            raise bad(f"conflicting a={name} lines")
        return values.pop() if values else None


def lex(sdp: str) -> tuple[Section, list[Section]]:
    """Split an SDP text into its session part and media sections, checking syntax."""
    if len(sdp) > MAX_SDP_CHARS:
        raise bad("session description too large")
    # RFC 8866 §5: lines end with CRLF, but parsers should accept a bare LF too.
    lines = sdp.split("\n")
    while lines and lines[-1] in ("", "\r"):
        lines.pop()
    if not lines:
        raise bad("empty session description")
    if lines[0].removesuffix("\r") != "v=0":
        raise bad("a session description starts with v=0 (RFC 8866 §5.1)")

    blocks: list[tuple[str | None, str, list[tuple[str, str]]]] = [(None, "", [])]
    for raw in lines:
        line = raw.removesuffix("\r")
        if "\r" in line or "\x00" in line:
            raise bad("CR or NUL inside an SDP line")
        match = _LINE_RE.fullmatch(line)
        if match is None:
            raise bad(f"not a <type>=<value> line: {line[:80]!r}")
        kind, value = match.group(1), match.group(2)
        if kind == "m":
            blocks.append(("m", value, []))
            continue
        allowed = _SESSION_TYPES if blocks[-1][0] is None else _MEDIA_TYPES
        if kind not in allowed:
            raise bad(f"unexpected {kind}= line (RFC 8866 §5)")
        blocks[-1][2].append((kind, value))

    session = _section(None, "", blocks[0][2])
    for kind in "ost":
        if not any(k == kind for k, _ in session.other_lines):
            raise bad(f"missing {kind}= line (RFC 8866 §5)")
    for kind in "vos":
        if sum(k == kind for k, _ in session.other_lines) > 1:
            raise bad(f"repeated {kind}= line (RFC 8866 §5)")
    origin = next(v for k, v in session.other_lines if k == "o")
    if not _ORIGIN_RE.fullmatch(origin):
        raise bad("malformed o= line (RFC 8866 §5.2)")
    return session, [_section("m", m_value, body) for _, m_value, body in blocks[1:]]


def _section(kind: str | None, m_value: str, body: list[tuple[str, str]]) -> Section:
    attributes: list[tuple[str, str]] = []
    others: list[tuple[str, str]] = []
    for line_type, value in body:
        if line_type != "a":
            others.append((line_type, value))
            continue
        # RFC 8866 §5.13: a=<attribute-name>[:<attribute-value>]
        name, _, attr_value = value.partition(":")
        if not TOKEN_RE.fullmatch(name):
            raise bad(f"malformed attribute name: {name[:40]!r}")
        attributes.append((name, attr_value))
    if kind is None:
        return Section(None, 0, "", (), tuple(attributes), tuple(others))

    # RFC 8866 §5.14: m=<media> <port>[/<number of ports>] <proto> <fmt> ...
    fields = [field for field in m_value.split(" ") if field]
    if len(fields) < 4:
        raise bad(f"malformed m= line: {m_value[:80]!r}")
    media, port_text, proto, *fmts = fields
    port_match = _PORT_RE.fullmatch(port_text)
    if (
        not TOKEN_RE.fullmatch(media)
        or port_match is None
        or int(port_match.group(1)) > 65535
        or not _PROTO_RE.fullmatch(proto)
        or not all(TOKEN_RE.fullmatch(fmt) for fmt in fmts)
    ):
        raise bad(f"malformed m= line: {m_value[:80]!r}")
    return Section(
        media.lower(),
        int(port_match.group(1)),
        proto,
        tuple(fmts),
        tuple(attributes),
        tuple(others),
    )
