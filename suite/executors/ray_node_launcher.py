"""`ray start`, for the loopback test cluster only, with a longer wait for the raylet to
register: Ray allows a fixed 30 s (ray._private.node, not configurable), which a raylet on
a heavily loaded shared host misses. The clock of that one wait runs 10x slower here;
nothing else of Ray changes.

    python -m suite.executors.ray_node_launcher start --head ...   (same arguments as `ray start`)
"""

from __future__ import annotations

import sys
import time
import types

WAIT_FACTOR = 10.0


def patched_clock() -> types.SimpleNamespace:
    clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    clock.monotonic = lambda: time.monotonic() / WAIT_FACTOR
    return clock


def main() -> None:
    import ray._private.node as node
    from ray.scripts.scripts import main as ray_main

    node.time = patched_clock()        # node.py uses monotonic() for that wait only
    sys.argv = ["ray", *sys.argv[1:]]
    ray_main()


if __name__ == "__main__":
    main()
