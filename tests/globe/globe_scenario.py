"""The simulated globe (ops/bench/globe.py) as one scenario, in a private network and PID
namespace (only ``lo`` up)::

    unshare --net --pid --fork --kill-child --mount-proc -- \
        python globe_scenario.py OUTFILE STEERING CLIENTS_PER_REGION [chromium]

STEERING is ``on`` or ``off`` (``node.steering``, passed to the nodes where the setting exists).
etcd, the WAN emulator, a relay and a node per region start; every region's aiortc clients call
their own region's node at once, beep for a few seconds and time their echo (two that nominate
as aioice does, the first pair to answer, and one by priority, as browsers do).

With ``chromium``, one headless Chromium calls from every region beside them: a tab per region,
each on its own region's node with a token naming its region, each placed in its region on the
WAN emulator by its host candidate's flow (``globe_browsers.py``); then the relay the ``ap``
tab uses is SIGKILLed (nothing restarts it) and the tabs that used it must carry on through
another relay's candidate. The emulator runs without a ``default_region``: a browser datagram
from a flow nobody placed is dropped and counted (``unknown_region``).

What every client was offered, the pair it uses and its round trips go to OUTFILE as JSON, also
when something fails (``error`` says what).
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ops.bench.globe import GlobeParams, run_globe
from tests.globe.globe_browsers import browsers
from tests.interop.chromium_scenario import isolate_network

TALK = 6.0
#: more clients per region that nominate by priority, as a browser does
PRIORITY_CLIENTS = 1


def main(outfile: Path, steering: bool, clients: int, chromium: bool) -> None:
    result: dict[str, Any] = {}
    try:
        result["interfaces_up"] = isolate_network()
        work = Path(tempfile.mkdtemp(prefix="parley-globe-"))
        params = GlobeParams(
            clients_per_region=clients,
            talk=TALK,
            steering=steering,
            priority_clients=PRIORITY_CLIENTS,
        )
        result.update(run_globe(work, params, browsers if chromium else None))
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    finally:
        outfile.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    from tests.programs import record_from_env

    record_from_env()  # the programs this scenario starts count for tests/programs.py too
    main(Path(sys.argv[1]), sys.argv[2] == "on", int(sys.argv[3]), sys.argv[4:] == ["chromium"])
