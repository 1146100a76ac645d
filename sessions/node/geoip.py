"""A client's region from its IP address, in an operator's MaxMind-format database (issue #19).

Nothing is shipped or downloaded: the operator points ``node.region_db`` at a ``.mmdb`` file
(GeoLite2 or GeoIP2 Country, or one of their own making) and says in ``node.region_map`` which
region each country or continent goes to: ``"DE=eu-west,FR=eu-west,NA=us-east,AS=ap-south"``.
A code is tried as the record's country (``country.iso_code``) first, then as its continent
(``continent.code``); a record with a top-level ``region`` string (a database made for Parley,
e.g. from a cloud's published address ranges) is taken as it is. The database is read with
MaxMind's own reader (``maxminddb``, the ``geoip`` extra).

The address looked up is the signaling connection's peer. Behind a load balancer that is the
balancer's address: use the header it sets instead (``node.region_header``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from typing import Any, final

from relay.settings import SettingsError, check_region

__all__ = ["RegionDatabase", "parse_region_map"]

log = logging.getLogger("parley.geoip")


def parse_region_map(text: str, setting: str = "node.region_map") -> dict[str, str]:
    """``CODE=region,...`` as a mapping of upper-case codes to region names; SettingsError."""
    out: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        code, sep, region = item.partition("=")
        code = code.strip().upper()
        if not sep or not code.isalpha() or len(code) != 2:
            raise SettingsError(f"{setting}: {item!r} is not CODE=region (a 2-letter code)")
        out[code] = check_region(region.strip(), setting)
    return out


def _text(record: Mapping[str, Any], *path: str) -> str | None:
    value: Any = record
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value if isinstance(value, str) else None


@final
class RegionDatabase:
    """``path`` (a MaxMind DB) and the ``mapping`` of codes to regions; raises SettingsError
    when the file cannot be read or the reader is not installed."""

    def __init__(self, path: str, mapping: Mapping[str, str]) -> None:
        try:
            import maxminddb
        except ImportError:
            raise SettingsError(
                "node.region_db needs MaxMind's reader: pip install 'parley[geoip]'"
            ) from None
        try:
            self._reader = maxminddb.open_database(path)
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise SettingsError(f"node.region_db: cannot read {path}: {exc}") from None
        self.mapping = dict(mapping)
        #: lookups by outcome: found, unmapped (a record no code maps), missing, bad
        self.counters = dict.fromkeys(("found", "unmapped", "missing", "bad"), 0)

    def lookup(self, host: str) -> str | None:
        """The region of ``host`` (an IP address), None when the database or the map has none."""
        try:
            address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
            record = self._reader.get(str(address))
        except ValueError:  # not an IP address, or an IPv6 address in an IPv4-only database
            self.counters["bad"] += 1
            return None
        if not isinstance(record, Mapping):
            self.counters["missing"] += 1
            return None
        own = _text(record, "region")
        if own is not None:
            try:
                region = check_region(own.lower())
            except SettingsError:
                region = ""
            if region:
                self.counters["found"] += 1
                return region
        for path in (("country", "iso_code"), ("continent", "code")):
            code = _text(record, *path)
            if code is not None and code.upper() in self.mapping:
                self.counters["found"] += 1
                return self.mapping[code.upper()]
        self.counters["unmapped"] += 1
        return None

    def close(self) -> None:
        self._reader.close()
