"""Observability: alert rules checked and unit-tested with promtool, a real
Prometheus scraping barrage, a dashboard that only names exported metrics,
and the /stats views."""

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, Proc, WsClient, free_port, grpcurl, http_ok, run, wait_until

ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "barrage.json"


def need(binary):
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} not installed: run scripts/test.sh (apt-get install prometheus)")
    return path


def test_alert_rules_pass_promtool():
    check = subprocess.run([need("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout
    tests = subprocess.run([need("promtool"), "test", "rules", "tests/prometheus/alerts_test.yml"],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert tests.returncode == 0, tests.stdout + tests.stderr


def metrics_text(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def role_ports(dev):
    return {"controller": dev.metrics_port - 2, "connect-node": dev.metrics_port - 1, "push-manager": dev.metrics_port}


ROOMS = iter(range(1_000_000))


def traffic(dev, n):
    """n pushes to a fresh room with one listener, and one invalid push."""
    room = f"obs{next(ROOMS)}"

    async def scenario():
        c = await WsClient.connect(f"{dev.ws}?user_id=obs&rooms={room}")
        for i in range(n):
            reply = json.loads(grpcurl("-plaintext", "-d", json.dumps({"room_id": room, "content": str(i)}), dev.api,
                                       "barrage.v1.PushManager/PushToRoom").stdout)
            assert reply["deliveredCount"] == 1
            await c.next_message()
        grpcurl("-plaintext", "-d", '{"room_id":""}', dev.api, "barrage.v1.PushManager/PushToRoom", check=False)
        await c.close()

    run(scenario())


def test_dashboard_queries_name_only_exported_metrics(dev):
    traffic(dev, 1)
    exported = set()
    for port in role_ports(dev).values():
        exported |= set(re.findall(r"^# TYPE (\S+) ", metrics_text(port), re.M))
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 20
    names = set()
    for e in exprs:
        names |= set(re.findall(r"\b((?:push_manager|connect_node|controller|process)_[a-z_]+)", e))
    assert names
    for n in sorted(names):
        base = re.sub(r"_(bucket|sum|count)$", "", n)
        assert n in exported or base in exported, f"dashboard queries {n}, which no role exports"


def test_stats_views(dev):
    traffic(dev, 1)
    stats = {}
    for role, port in role_ports(dev).items():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
            stats[role] = json.loads(r.read())
        assert stats[role]["role"] == role
    assert stats["connect-node"]["node_id"] == "connect-node-dev"
    assert {"connections", "rooms", "users", "queued_frames", "max_queue_depth"} <= stats["connect-node"].keys()
    assert stats["push-manager"]["pooled_connect_nodes"] == ["connect-node-dev"]
    assert stats["controller"]["ready"] is True and stats["controller"]["connect_nodes"] == 1


def prom_query(port, q):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_a_real_prometheus_scrapes_the_push_counters(dev):
    prom_port = free_port()
    data = tempfile.mkdtemp(prefix="barrage-prom-")
    targets = {role: f"127.0.0.1:{port}" for role, port in role_ports(dev).items()}
    config = Path(data) / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n" + "".join(
        f"  - job_name: barrage-{role}\n    static_configs:\n      - targets: ['{t}']\n" for role, t in targets.items()))
    prom = Proc("prometheus", [need("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={data}/tsdb",
                               f"--web.listen-address=127.0.0.1:{prom_port}"])
    try:
        wait_until("prometheus ready", lambda: http_ok(f"http://127.0.0.1:{prom_port}/-/ready"), timeout=30)
        def now(series):
            text = metrics_text(dev.metrics_port)
            return float(text.split(f"\n{series} ")[1].split("\n")[0])

        ok = 'push_manager_api_requests_total{api="PushToRoom",status="OK"}'
        count = 'push_manager_api_duration_seconds_count{api="PushToRoom"}'
        before, before_ok, before_count = now("push_manager_push_success_total"), now(ok), now(count)
        traffic(dev, 5)

        def scraped(q, want):
            def check():
                r = prom_query(prom_port, q)
                return r and float(r[0]["value"][1]) == want
            wait_until(f"{q} == {want} in Prometheus", check, timeout=30)

        scraped("sum(push_manager_push_success_total)", before + 5)
        scraped(f"sum({ok})", before_ok + 5)
        scraped(f"sum({count})", before_count + 6)
        scraped("sum(up)", 3)  # all three roles are scraped
        p99 = prom_query(prom_port, 'histogram_quantile(0.99, sum by (le) (push_manager_api_duration_seconds_bucket{api="PushToRoom"}))')
        assert 0 < float(p99[0]["value"][1]) < 5
        delivered = prom_query(prom_port, "sum(connect_node_frames_delivered_total)")
        assert float(delivered[0]["value"][1]) >= 5
    finally:
        prom.stop()
        shutil.rmtree(data, ignore_errors=True)
