"""Benchmark for per-connection flow control (issue 5).

Measures, with real proxy-server, proxy-agent and endpoint processes:
* aggregate download throughput of 8 active connections, without and then with one
  stalled neighbour on the same agent (a tunnel whose reader never reads while its source
  offers 4 GiB); target: with/without >= 0.9;
* peak RSS growth of server and agent during the stalled-reader run; target < 64 MiB.
Both in flow mode (our server + our agent, negotiated) and in plain mode (the agent forced
to the reference protocol), for comparison. Prints figures and writes
bench/results/flow_control.json. Run: python -m bench.flow_control
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from bench.common import MiB, Processes, RssSampler, arun, machine, processes, write_results
from proxy_common.client import Tunnel, open_tunnel

ACTIVE = 8
PER_CONNECTION = 64 * MiB
STALLED_OFFER = 4 << 30
TIMEOUT = 120.0


async def download(running: Processes, size: int) -> int:
    async with await open_tunnel(running.endpoint_address, uds_path=running.uds) as tunnel:
        await tunnel.send(f"SOURCE {size}\n".encode())
        received = 0
        while chunk := await tunnel.receive():
            received += len(chunk)
        return received


async def aggregate(running: Processes) -> float:
    started = time.perf_counter()
    async with asyncio.timeout(TIMEOUT):
        sizes = await asyncio.gather(*(download(running, PER_CONNECTION) for _ in range(ACTIVE)))
    assert sizes == [PER_CONNECTION] * ACTIVE, sizes
    return sum(sizes) / (time.perf_counter() - started) / MiB


async def stall(running: Processes) -> Tunnel:
    tunnel = await open_tunnel(running.endpoint_address, uds_path=running.uds)
    await tunnel.send(f"SOURCE {STALLED_OFFER}\n".encode())
    await tunnel.receive()  # data flows; from here on nobody reads
    return tunnel


async def measure(running: Processes, rounds: int = 3) -> dict[str, float]:
    """Alternate runs without and with a stalled neighbour (medians), so that machine noise
    hits both sides alike."""
    await aggregate(running)  # warm-up
    without: list[float] = []
    with_stalled: list[float] = []
    with RssSampler(running.pids()) as rss:
        for _ in range(rounds):
            without.append(await aggregate(running))
            stalled = await stall(running)
            with_stalled.append(await aggregate(running))
            await asyncio.sleep(1.0)  # let every buffer on the stalled path fill up
            await stalled.aclose()
    a, b = statistics.median(without), statistics.median(with_stalled)
    return {
        "aggregate_mib_s_without_stalled": round(a, 1),
        "aggregate_mib_s_with_stalled": round(b, 1),
        "ratio_with_over_without": round(b / a, 3),
        "runs_without": [round(x, 1) for x in without],
        "runs_with": [round(x, 1) for x in with_stalled],
        "server_rss_growth_mib": round((rss.peak["server"] - rss.baseline["server"]) / MiB, 1),
        "agent_rss_growth_mib": round((rss.peak["agent"] - rss.baseline["agent"]) / MiB, 1),
        "server_rss_peak_mib": round(rss.peak["server"] / MiB, 1),
        "agent_rss_peak_mib": round(rss.peak["agent"] / MiB, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating without/with rounds per mode (default 3)")
    options = parser.parse_args()
    results: dict[str, object] = {"machine": machine(), "active_connections": ACTIVE,
                                  "bytes_per_connection": PER_CONNECTION, "stalled_offer_bytes": STALLED_OFFER}
    for mode, agent_args in (("flow", ("--flow-control=true",)), ("plain", ("--flow-control=false",))):
        with processes(agent_args=agent_args, server_args=("--overflow-wait=5s",)) as running:
            figures = arun(measure(running, max(1, min(options.rounds, 10))))
        results[mode] = figures
        print(f"{mode:5}: 8 active {figures['aggregate_mib_s_without_stalled']:7.1f} MiB/s without, "
              f"{figures['aggregate_mib_s_with_stalled']:7.1f} MiB/s with a stalled neighbour "
              f"(ratio {figures['ratio_with_over_without']:.2f}); RSS growth server "
              f"{figures['server_rss_growth_mib']} MiB, agent {figures['agent_rss_growth_mib']} MiB")
    path = write_results("flow_control", results)
    print(f"written {path}")


if __name__ == "__main__":
    main()
