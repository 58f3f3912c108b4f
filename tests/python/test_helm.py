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
    "dev": {"connectNode": {"insecureUserId": True, "service": {"type": "ClusterIP"}, "demo": {"enabled": True}},
            "logFormat": "text"},
    "tls-and-auth": {
        "tls": {"websocket": {"secretName": "barrage-ws-tls"}, "grpc": {"secretName": "barrage-grpc-tls"}},
        "auth": {"jwt": {"hs256Secret": "a-long-enough-secret-for-hs256", "jwks": '{"keys":[]}'},
                 "apiTokens": "svc-chat-7Rk2pW9xQ4mZ8vT1=push:room|push:user;comments-Vb3nQ8rT5yU1wE6p=push:room",
                 "publishApiToken": "comments-Vb3nQ8rT5yU1wE6p"},
        "otlpEndpoint": "http://otel-collector.observability:4317",
        "connectNode": {"allowedOrigins": ["https://app.example.com", "https://admin.example.com"],
                        "newConnectionsPerIpPerSec": 5,
                        "publish": {"rooms": ["live-*"], "sensitiveWords": {"list": "badword\n", "mode": "mask"},
                                    "blocklist": "troll\n", "mutes": "live-1 loud 4102444800\n",
                                    "moderation": {"hook": "moderator.biz:7000"}}},
    },
    "threads": {"controller": {"workerThreads": 4}, "pushManager": {"runtimeFlavor": "multi-thread", "workerThreads": 2},
                "connectNode": {"workerThreads": 8}},
    "existing-secrets": {
        "auth": {"jwt": {"existingSecret": "my-jwt", "existingSecretKeys": ["public-key.pem"]},
                 "apiTokensExistingSecret": "my-api-tokens", "publishApiTokenExistingSecret": "my-publish-token"},
        "connectNode": {"publish": {"rooms": ["live-*"]}},
    },
}


def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}


def file_is_mounted(workload, c, path):
    """The file at `path` comes from a Secret volume mounted in `c`."""
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    for m in c.get("volumeMounts", []):
        prefix = m["mountPath"].rstrip("/") + "/"
        if path.startswith(prefix):
            vol = volumes[m["name"]]
            source = vol.get("secret") or vol.get("configMap")
            name = source.get("secretName") or source.get("name")
            key = path[len(prefix):]
            items = source.get("items")
            return name, (items is None or any(i["path"] == key for i in items))
    return None, False


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

    runtimes = {c["args"][0]: (env_of(c)["RUNTIME_FLAVOR"]["value"], "TOKIO_WORKER_THREADS" in env_of(c))
                for _, c in containers(default) if c["name"] != "etcd"}
    assert runtimes == {"controller": ("multi-thread", False), "push-manager": ("current-thread", False),
                        "connect-node": ("multi-thread", False)}, "push-managers run on one thread unless asked"
    threads, _ = render(VARIANTS["threads"])
    runtimes = {c["args"][0]: (env_of(c)["RUNTIME_FLAVOR"]["value"], env_of(c)["TOKIO_WORKER_THREADS"]["value"])
                for _, c in containers(threads) if c["name"] != "etcd"}
    assert runtimes == {"controller": ("multi-thread", "4"), "push-manager": ("multi-thread", "2"),
                        "connect-node": ("multi-thread", "8")}

    mon, _ = render(VARIANTS["monitoring"])
    rule = by_kind(mon, "PrometheusRule")[0]
    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == shipped, "the PrometheusRule carries deploy/prometheus/alerts.yml"
    assert by_kind(mon, "ServiceMonitor")[0]["spec"]["endpoints"][0]["port"] == "metrics"


def test_tls_and_auth_come_from_secrets():
    docs, out = render(VARIANTS["tls-and-auth"])
    [lists] = by_kind(docs, "ConfigMap")
    assert set(lists["data"]) == {"words.txt", "blocked.txt", "mutes.txt"}
    [secret] = by_kind(docs, "Secret")
    assert secret["metadata"]["name"] == "demo-barrage-auth"
    assert set(secret["stringData"]) == {"hs256-secret", "jwks.json", "api-tokens", "publish-api-token"}
    for workload, c in containers(docs):
        if c["name"] == "etcd":
            continue
        env = env_of(c)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.observability:4317"
        assert env["GRPC_TLS_SERVER_NAME"]["value"] == "barrage"
        files = {k: v["value"] for k, v in env.items() if k.endswith("_FILE")}
        assert {"GRPC_TLS_CERT_FILE", "GRPC_TLS_KEY_FILE", "GRPC_TLS_CA_FILE"} <= set(files)
        for name, path in files.items():
            secret_name, has_key = file_is_mounted(workload, c, path)
            assert secret_name and has_key, f"{c['name']}: {name}={path} is not mounted from a Secret"
            if name.startswith("GRPC_TLS"):
                assert secret_name == "barrage-grpc-tls"
        if c["name"] == "connect-node":
            assert env["JWT_HS256_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "demo-barrage-auth", "key": "hs256-secret"}
            assert file_is_mounted(workload, c, files["TLS_CERT_FILE"])[0] == "barrage-ws-tls"
            assert file_is_mounted(workload, c, files["JWT_JWKS_FILE"])[0] == "demo-barrage-auth"
            assert "JWT_PUBLIC_KEY_FILE" not in env
            assert env["ALLOWED_ORIGINS"]["value"] == "https://app.example.com,https://admin.example.com"
            assert env["PUBLISH_ROOMS"]["value"] == "live-*" and env["SENSITIVE_WORDS_MODE"]["value"] == "mask"
            for f in ("SENSITIVE_WORDS_FILE", "PUBLISH_BLOCKLIST_FILE", "PUBLISH_MUTES_FILE"):
                assert file_is_mounted(workload, c, files[f]) == ("demo-barrage-publish", True), f
            assert env["MODERATION_HOOK"]["value"] == "moderator.biz:7000"
            assert env["PUBLISH_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {
                "name": "demo-barrage-auth", "key": "publish-api-token"}
        if c["name"] == "push-manager":
            assert env["API_TOKENS"]["valueFrom"]["secretKeyRef"] == {"name": "demo-barrage-auth", "key": "api-tokens"}
    notes = out["barrage/templates/NOTES.txt"]
    assert "grpcurl -cacert ca.crt -cert client.crt -key client.key -servername barrage localhost:50053 list" in notes
    assert "-H 'authorization: Bearer <API token>'" in notes

    docs, _ = render(VARIANTS["existing-secrets"])
    assert not by_kind(docs, "Secret"), "nothing to create when the Secrets are the operator's"
    for workload, c in containers(docs):
        env = env_of(c)
        if c["name"] == "connect-node":
            assert "JWT_HS256_SECRET" not in env and "JWT_JWKS_FILE" not in env
            assert file_is_mounted(workload, c, env["JWT_PUBLIC_KEY_FILE"]["value"]) == ("my-jwt", True)
            assert env["PUBLISH_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {
                "name": "my-publish-token", "key": "publish-api-token"}
        if c["name"] == "push-manager":
            assert env["API_TOKENS"]["valueFrom"]["secretKeyRef"]["name"] == "my-api-tokens"
    default, out = render()
    assert not by_kind(default, "Secret")
    assert "no client can connect yet" in out["barrage/templates/NOTES.txt"]
    for _, c in containers(default):
        assert "PUBLISH_API_TOKEN" not in env_of(c), "no token unless one is given"


def test_publishing_behind_api_tokens_needs_a_publish_token():
    # Comments go through the push API: with API tokens on, a node without
    # a token of its own could publish nothing, so the chart says so.
    for tokens in ({"apiTokens": "svc-chat-7Rk2pW9xQ4mZ8vT1=*"}, {"apiTokensExistingSecret": "my-api-tokens"}):
        with pytest.raises(helm.HelmError, match="auth.publishApiToken"):
            render({"auth": tokens, "connectNode": {"publish": {"rooms": ["live-*"]}}})
        # Without publishing rooms no token is needed.
        render({"auth": tokens})


def test_roles_that_drain_wait_for_load_balancers_first():
    """Push-managers and connect-nodes sleep in preStop, while Services stop
    sending them work, and are given longer than that to drain."""
    def drains(values):
        docs, _ = render(values)
        out = {}
        for workload, c in containers(docs):
            if c["name"] in ("push-manager", "connect-node"):
                command = c["lifecycle"]["preStop"]["exec"]["command"]
                grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                out[c["name"]] = (command, grace)
        return out

    assert drains({}) == {"push-manager": (["sleep", "5"], 30), "connect-node": (["sleep", "5"], 30)}
    tuned = drains({"pushManager": {"preStopSleepSecs": 15, "terminationGracePeriodSeconds": 60}})
    assert tuned["push-manager"] == (["sleep", "15"], 60)
    for role in ("pushManager", "connectNode"):
        with pytest.raises(helm.HelmError, match="must be above"):
            render({role: {"preStopSleepSecs": 30, "terminationGracePeriodSeconds": 30}})


def test_the_chart_ships_the_same_alert_rules():
    assert (CHART / "files" / "alerts.yml").read_text() == (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()


def test_schema_rejects_bad_values():
    for bad in [{"connectNode": {"kind": "Pod"}}, {"logFormat": "xml"}, {"pushManager": {"grpcPort": 70000}},
                {"controller": {"replicas": -1}}, {"typo": 1},
                {"pushManager": {"runtimeFlavor": "green-threads"}}, {"connectNode": {"workerThreads": 0}},
                {"controller": {"workerThreads": "two"}}, {"connectNode": {"binaryCompressBytes": 32}},
                {"transparentHugePages": False}, {"transparentHugePages": "always"},
                {"auth": {"publishApiToken": "short"}}, {"auth": {"publishApiToken": "has spaces in it 0123456"}},
                {"auth": {"jwt": {"leewaySecs": 3601}}}]:
        with pytest.raises(helm.HelmError):
            render(bad)


def binary_env(barrage_bin, role):
    out = subprocess.run([str(barrage_bin), role, "--help"], capture_output=True, text=True, timeout=30).stdout
    # Settings with hidden values print as [env: NAME] rather than [env: NAME=value].
    return set(re.findall(r"\[env: ([A-Z0-9_]+)[=\]]", out))


# Read by the binary but meaningless under the chart: the chart always uses etcd.
NOT_FOR_THE_CHART = {"CONTROLLER_ADDRESS"}


def test_chart_env_matches_what_the_binary_reads(barrage_bin):
    chart_sets = {}
    for variant in ("default", "tls-and-auth", "existing-secrets", "dev", "threads"):
        docs, _ = render(VARIANTS[variant])
        for _, c in containers(docs):
            if c["name"] != "etcd":
                chart_sets.setdefault(c["args"][0], set()).update(e["name"] for e in c["env"])
    for role, chart_env in chart_sets.items():
        reads = binary_env(barrage_bin, role)
        assert "JWT_HS256_SECRET" in reads or role != "connect-node", "hidden-value settings are seen"
        extra = chart_env - reads - {"RUST_LOG", "OTEL_EXPORTER_OTLP_ENDPOINT"}
        assert not extra, f"{role}: the chart sets settings the binary does not read: {extra}"
        unexposed = reads - chart_env - NOT_FOR_THE_CHART
        assert not unexposed, f"{role}: settings the chart cannot set: {unexposed}"
    docs, _ = render(VARIANTS["default"])
    seen_roles = set()
    for _, c in containers(docs):
        if c["name"] == "etcd":
            continue
        role = c["args"][0]
        seen_roles.add(role)
        chart_env = {e["name"] for e in c["env"]}
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
