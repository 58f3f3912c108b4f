"""`barrage bench` runs end to end on a small, bounded load and reports a
complete summary with nothing lost or repeated (no timing is asserted)."""

import json
import subprocess


def test_bench_smoke(barrage_bin):
    p = subprocess.run(
        [str(barrage_bin), "bench", "--subscribers", "40", "--rate", "20", "--duration-secs", "2", "--sources", "3"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["scenario"] == "room-fanout"
    assert s["subscribers"] == 40 and s["connect_errors"] == 0
    assert s["pushes"] >= 1 and s["push_failures"] == 0
    assert s["deliveries"] == s["deliveries_expected"] == s["pushes"] * 40
    assert s["lost"] == 0 and s["duplicated"] == 0
    for k in ("p50", "p99", "p999", "max"):
        assert s["latency_ms"][k] >= 0
    assert s["server_rss_bytes"]["connected"] > 0


def test_bench_refuses_unbounded_runs(barrage_bin):
    for args, setting in [(["--duration-secs", "0"], "--duration-secs"), (["--subscribers", "1000000"], "--subscribers"),
                          (["--max-pushes", "0"], "--max-pushes")]:
        p = subprocess.run([str(barrage_bin), "bench", *args], capture_output=True, text=True, timeout=30)
        assert p.returncode == 64 and setting in p.stderr, (args, p.stderr)
