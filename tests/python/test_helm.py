"""The Helm chart: lint, render variants with the real Helm library, check
every manifest against Kubernetes' schemas, and keep the chart's settings
in step with what the binary reads."""

import re
import subprocess
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT

CHART = ROOT / "helm" / "barrage"
K8S = kubernetes_validate.latest_version()
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def render(values=None):
    out = helm.Chart.load(str(CHART)).render(values or {}, name="demo", namespace="push", is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs, out


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def containers(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                yield d, c


VARIANTS = {
    "default": {},
    "external-etcd": {"etcd": {"endpoints": "http://etcd-0.infra:2379,http://etcd-1.infra:2379"}},
    "autoscaling": {"pushManager": {"autoscaling": {"enabled": True}}, "connectNode": {"autoscaling": {"enabled": True}}},
    "daemonset": {"connectNode": {"kind": "DaemonSet", "autoscaling": {"enabled": True}}},
    "monitoring": {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}},
    "dev": {"connectNode": {"insecureUserId": True, "service": {"type": "ClusterIP"}}, "logFormat": "text"},
}


def test_lint_is_clean():
    report = helm.lint(str(CHART), strict=True)
    assert not report["errors"], report
    assert all(m["severity"] < 2 for m in report["messages"]), report


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_manifest_is_valid_kubernetes(variant):
    docs, _ = render(VARIANTS[variant])
    assert docs
    for d in docs:
        if d["kind"] in CRD_KINDS:
            assert d["apiVersion"] == "monitoring.coreos.com/v1" and d["spec"], d
            continue
        kubernetes_validate.validate(d, K8S, strict=True)
    for workload, c in containers(docs):
        if c["name"] == "etcd":
            continue
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
        assert workload["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_variants_change_what_they_should():
    default, _ = render()
    assert len(by_kind(default, "StatefulSet")) == 1, "bundled etcd by default"
    assert not by_kind(default, "HorizontalPodAutoscaler")
    assert len(by_kind(default, "PodDisruptionBudget")) == 3

    ext, _ = render(VARIANTS["external-etcd"])
    assert not by_kind(ext, "StatefulSet")
    for _, c in containers(ext):
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["ETCD_ENDPOINTS"] == "http://etcd-0.infra:2379,http://etcd-1.infra:2379"

    auto, _ = render(VARIANTS["autoscaling"])
    assert {h["spec"]["scaleTargetRef"]["name"] for h in by_kind(auto, "HorizontalPodAutoscaler")} == {
        "demo-barrage-push-manager", "demo-barrage-connect-node"}
    assert all("replicas" not in d["spec"] for d in by_kind(auto, "Deployment")
               if d["metadata"]["name"] != "demo-barrage-controller")

    ds, _ = render(VARIANTS["daemonset"])
    assert [d["metadata"]["name"] for d in by_kind(ds, "DaemonSet")] == ["demo-barrage-connect-node"]
    assert [h["spec"]["scaleTargetRef"]["name"] for h in by_kind(ds, "HorizontalPodAutoscaler")] == []

    mon, _ = render(VARIANTS["monitoring"])
    rule = by_kind(mon, "PrometheusRule")[0]
    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == shipped, "the PrometheusRule carries deploy/prometheus/alerts.yml"
    assert by_kind(mon, "ServiceMonitor")[0]["spec"]["endpoints"][0]["port"] == "metrics"


def test_the_chart_ships_the_same_alert_rules():
    assert (CHART / "files" / "alerts.yml").read_text() == (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()


def test_schema_rejects_bad_values():
    for bad in [{"connectNode": {"kind": "Pod"}}, {"logFormat": "xml"}, {"pushManager": {"grpcPort": 70000}},
                {"controller": {"replicas": -1}}, {"typo": 1}]:
        with pytest.raises(helm.HelmError):
            render(bad)


def binary_env(barrage_bin, role):
    out = subprocess.run([str(barrage_bin), role, "--help"], capture_output=True, text=True, timeout=30).stdout
    return set(re.findall(r"\[env: ([A-Z_]+)=", out))


def test_chart_env_matches_what_the_binary_reads(barrage_bin):
    docs, _ = render(VARIANTS["default"])
    seen_roles = set()
    for _, c in containers(docs):
        if c["name"] == "etcd":
            continue
        role = c["args"][0]
        seen_roles.add(role)
        chart_env = {e["name"] for e in c["env"]}
        reads = binary_env(barrage_bin, role) | {"RUST_LOG"}
        assert chart_env <= reads, f"{role}: the chart sets settings the binary does not read: {chart_env - reads}"
        must = {"ETCD_ENDPOINTS", "ADVERTISE_HOST", "GRPC_PORT", "METRICS_PORT",
                "MANAGER_ID" if role == "push-manager" else "NODE_ID"}
        assert must <= chart_env, f"{role}: required settings missing: {must - chart_env}"
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert int(env["GRPC_PORT"]) == ports["grpc"] and int(env["METRICS_PORT"]) == ports["metrics"]
    assert seen_roles == {"controller", "push-manager", "connect-node"}


def test_notes_explain_how_to_try_it():
    _, out = render()
    notes = out["barrage/templates/NOTES.txt"]
    assert "port-forward svc/demo-barrage-push-manager 50053:50053" in notes
    assert "grpcurl -plaintext localhost:50053 list" in notes
    assert "bundled single-member etcd" in notes
