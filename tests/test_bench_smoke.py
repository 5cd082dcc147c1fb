"""The benchmark command still runs and reports every figure.

``python -m bench.run`` with the smallest repetition counts: it must start its
broker and baseline servers, measure every figure and write them as JSON.
Only the shape of the report is checked — numbers where numbers belong —
never a timing: the benchmark's targets are not the test suite's pass/fail.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SIZES = ("4KiB", "16KiB", "64KiB", "256KiB", "1MiB")
# The fast path's figures (sessions whose calls are frames on the fd channel),
# judged against the asyncio floor.
FAST = {"map_fast", "batched_map_fast", "event_fast", "event_fanout_fast"}
# Grant copy through a copy ring on a fast-path session: a latency against the
# asyncio floor, and a throughput against memcpy.
RING = {"grant_copy_ring_4KiB": "seqpacket_fd_async", "grant_copy_ring_1MiB": "memcpy"}
# The map round trip with the broker's metrics on, against a broker with them off (issue 11).
METRICS = {"map_metrics_on", "map_fast_metrics_on"}
FIGURES = {
    "map_round_trip",
    "baseline_grpc_unary",
    "baseline_seqpacket_fd",
    "baseline_seqpacket_fd_async",
    "batched_map",
    "event_latency_1",
    "event_fanout",
    *FAST,
    *(f"grant_copy_{path}_{size}" for path in ("buffer", "bytes") for size in SIZES),
    "grant_copy_buffer_1MiB_pipelined",
    *RING,
    *METRICS,
    "baseline_grpc_copy_ceiling",
    "scale_rss_per_session",
    "scale_fds_per_session",
    "scale_in_flight_failures",
    "bystander_under_flood",
}
# Figures compared with a baseline measured in the same run.
COMPARED = {"map_round_trip", "batched_map", "event_latency_1", "event_fanout", "grant_copy_buffer_1MiB_pipelined",
            "bystander_under_flood",
            "baseline_grpc_copy_ceiling", "baseline_seqpacket_fd_async", *FAST, *RING, *METRICS,
            *(f"grant_copy_{path}_{size}" for path in ("buffer", "bytes") for size in SIZES)}
# Figures with a target the run says it meets or not.
JUDGED = {"map_round_trip", "batched_map", "event_latency_1", "grant_copy_buffer_1MiB", "grant_copy_buffer_1MiB_pipelined",
          "scale_rss_per_session", "scale_in_flight_failures", "bystander_under_flood", *FAST, *RING, *METRICS}

TINY = [
    "--quick", "--rounds", "2", "--per-round", "5", "--batch-reps", "2", "--subscribers", "5", "--fanout-reps", "2",
    "--copy-reps", "4", "--pipeline-depth", "2", "--sessions", "20", "--mappings", "4", "--in-flight", "100",
    "--workers", "2",
]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_bench_reports_every_figure_with_its_baseline(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "bench.run", *TINY, "--json", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=110,
    )
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stderr[-4000:]
    assert elapsed < 60, f"the smoke run took {elapsed:.0f} s"
    assert "figure" in run.stdout and "map round trip" in run.stdout  # the table

    result = json.loads(report.read_text())
    assert result["mode"] == "quick"
    machine = result["machine"]
    for key in ("nproc", "cpu", "python", "grpcio"):
        assert machine[key], key
    assert _number(result["baselines"]["grpc_unary_us"]["median"])
    assert _number(result["baselines"]["seqpacket_fd_us"]["median"])
    assert _number(result["baselines"]["seqpacket_fd_async_us"]["median"])
    assert all(_number(result["baselines"][f"memcpy_{size}_GBps"]) for size in SIZES)

    figures = result["figures"]
    assert set(figures) == FIGURES
    for name, figure in figures.items():
        assert _number(figure["value"]), name
        assert figure["unit"] and figure["target"], name
        if figure["time"] is not None:
            assert all(_number(figure["time"][key]) for key in ("min", "median", "p99")), name
            assert figure["time"]["min"] <= figure["time"]["median"] <= figure["time"]["p99"], name
        if name in COMPARED:
            assert _number(figure["baseline"]) and _number(figure["ratio"]), name
        if name in JUDGED:
            assert isinstance(figure["met"], bool), name
    for name in FAST:
        figure = figures[name]
        assert figure["baseline_name"] == "seqpacket_fd_async" or name == "batched_map_fast", name
        assert _number(figure["extra"]["vs_seqpacket_fd"]), name
        assert figure["time"] is not None, name  # latencies (the batch: its map + unmap cycle)
    for name, baseline in RING.items():
        figure = figures[name]
        assert figure["baseline_name"] == baseline, name
        assert _number(figure["extra"]["vs_seqpacket_fd"]), name
        assert figure["time"] is not None, name  # per doorbell
    assert _number(figures["grant_copy_ring_1MiB"]["extra"]["in_flight"]["GBps"])
    for name in METRICS:
        figure = figures[name]
        assert figure["baseline_name"] == "metrics off", name
        assert _number(figure["extra"]["scrape_us"]) and figure["extra"]["scrape_bytes"] > 0, name
    scale = figures["scale_rss_per_session"]["extra"]
    assert scale["sessions"] == 20 and scale["setup_failed"] == 0
    assert figures["scale_in_flight_failures"]["extra"]["calls"] == 100
    floods = figures["bystander_under_flood"]["extra"]["floods"]
    assert set(floods) == {"events", "unauthenticated"}
    assert all(_number(flood["ratio"]) and flood["calls"] > 0 for flood in floods.values()), floods
