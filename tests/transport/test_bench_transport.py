"""`bench/transport.py` runs end to end and prints the JSON shape the issue fixes (a smoke run:
few iterations, the afd rows only; the numbers themselves are bench/NOTES.md's business)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "transport.py"


def test_bench_prints_one_json_object_with_the_three_rows() -> None:
    argv = [sys.executable, str(BENCH), "--json", "--only", "afd"]
    argv += ["--iters", "20", "--reps", "2", "--trials", "1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    rows = json.loads(out.strip().splitlines()[-1])["rows"]
    assert [(r["transport"], r["size_bytes"]) for r in rows] == [
        ("afd", 8 << 10),
        ("afd", 8 << 20),
        ("afd", 64 << 20),
    ]
    assert rows[0]["rtt_us"] > 0 and all(r["bandwidth_GBps"] > 0 for r in rows[1:])


def test_bench_proxy_lane_rows_round_trip_through_two_processes() -> None:
    """The proxy lane's rows on the host: the echo process sends back what it got (the bench
    checks it), one row per payload size."""
    argv = [sys.executable, str(BENCH), "--json", "--only", "lane", "--lanes", "proxy"]
    argv += ["--iters", "100"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True).stdout
    rows = json.loads(out.strip().splitlines()[-1])["rows"]
    assert [(r["transport"], r["size_bytes"]) for r in rows] == [
        ("proxy-eager", 8 << 10),
        ("proxy-eager", 256 << 10),
        ("proxy-eager", 8 << 20),
    ]
    assert all(r["rtt_us"] > 0 for r in rows)
