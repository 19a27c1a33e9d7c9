"""Serve the built-in simulator with any SimConfig (``python -m bench.simserver``).

``zoho-image-sync simulate`` has no flag for every setting the benchmarks need
(``latency``, ``png_share``), so this runs ``Simulator`` directly. It prints one JSON
line ``{"base_url", "build_seconds"}`` on stdout once serving, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

from zoho_image_sync.simulator import SimConfig, Simulator


async def serve(config: SimConfig, port: int) -> None:
    """Build the catalogue, serve on 127.0.0.1:port until SIGTERM/SIGINT."""
    t0 = time.perf_counter()
    sim = Simulator(config)
    built = time.perf_counter() - t0
    base = await sim.start("127.0.0.1", port)
    sys.stdout.write(json.dumps({"base_url": base, "build_seconds": round(built, 3)}) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await sim.stop()


def main() -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--config", default="{}", help="SimConfig keyword arguments as JSON")
    args = p.parse_args()
    config = SimConfig(**json.loads(args.config))
    asyncio.run(serve(config, args.port))


if __name__ == "__main__":
    main()
