"""Security as an operator configures it: every setting documented, the
API-token grpcurl line of docs/security.md, and a three-process cluster with
mutual TLS on gRPC and wss:// whose certificate is reloaded on SIGHUP. The
certificates come from the openssl command line, as an operator would make
test ones."""

import asyncio
import re
import shlex
import signal
import socket
import ssl
import subprocess
import urllib.request

import pytest
import websockets

from conftest import ROOT, WsClient, Proc, free_block, grpcurl, run, wait_until

ROLES = ["controller", "push-manager", "connect-node"]


def help_env(barrage_bin, role):
    out = subprocess.run([str(barrage_bin), role, "--help"], capture_output=True, text=True, timeout=30).stdout
    return set(re.findall(r"\[env: ([A-Z0-9_]+)[=\]]", out))


def test_every_setting_is_documented_in_the_readme(barrage_bin):
    readme = (ROOT / "README.md").read_text()
    for role in ROLES:
        for env in help_env(barrage_bin, role):
            assert f"`{env}`" in readme, f"{role} reads {env}, which the README's configuration tables do not list"


def doc_grpcurl_lines(doc):
    text = (ROOT / doc).read_text()
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        lines += [" ".join(l.split()) for l in joined.splitlines() if l.strip().startswith("grpcurl ")]
    return lines


def test_the_api_token_line_of_the_security_guide(barrage_bin):
    base = free_block(7)
    api, metrics = base + 1, base + 6
    proc = Proc("dev-tokens", [str(barrage_bin), "dev", "--ws-port", str(base), "--grpc-port", str(api),
                               "--controller-grpc-port", str(base + 2), "--node-grpc-port", str(base + 3),
                               "--metrics-port", str(metrics)],
                env={"API_TOKENS": "svc-chat-7Rk2pW9xQ4mZ8vT1=push:room|push:user;ops-4Hn8sL2cV6bY0qE3=*"})
    try:
        proc.wait_ready(metrics)
        [line] = [l for l in doc_grpcurl_lines("docs/security.md") if "-plaintext" in l]
        args = shlex.split(line.replace("127.0.0.1:50053", f"127.0.0.1:{api}"))
        p = grpcurl(*args[1:])
        assert '"success": true' in p.stdout, p.stdout
        no_token = [a for a in args[1:] if a not in ("-H", "authorization: Bearer svc-chat-7Rk2pW9xQ4mZ8vT1")]
        p = grpcurl(*no_token, check=False)
        assert p.returncode != 0 and "Unauthenticated" in p.stdout + p.stderr, p.stdout + p.stderr
    finally:
        proc.stop()


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(d):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2", "-subj", "/CN=barrage test CA", cwd=d)


def issue(d, name):
    (d / "ext.cnf").write_text("subjectAltName=DNS:barrage,DNS:localhost\n"
                               "extendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", "ext.cnf", cwd=d)


def presented_cert(port, ca):
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def metric(port, series):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def tls_cluster(barrage_bin, tmp_path):
    make_ca(tmp_path)
    for name in ["controller", "manager", "node", "biz", "ws"]:
        issue(tmp_path, name)
    base = free_block(8)
    ports = dict(c_grpc=base, c_http=base + 1, m_grpc=base + 2, m_http=base + 3,
                 n_grpc=base + 4, n_http=base + 5, ws=base + 6)

    def tls_env(name):
        return {"GRPC_TLS_CERT_FILE": str(tmp_path / f"{name}.pem"),
                "GRPC_TLS_KEY_FILE": str(tmp_path / f"{name}-key.pem"),
                "GRPC_TLS_CA_FILE": str(tmp_path / "ca.pem"),
                "BIND_ADDR": "127.0.0.1"}

    controller_addr = f"127.0.0.1:{ports['c_grpc']}"
    procs = [
        Proc("tls-controller", [str(barrage_bin), "controller"],
             env={**tls_env("controller"), "GRPC_PORT": str(ports["c_grpc"]), "METRICS_PORT": str(ports["c_http"])}),
        Proc("tls-node", [str(barrage_bin), "connect-node"],
             env={**tls_env("node"), "GRPC_PORT": str(ports["n_grpc"]), "METRICS_PORT": str(ports["n_http"]),
                  "WS_PORT": str(ports["ws"]), "CONTROLLER_ADDRESS": controller_addr, "INSECURE_USER_ID": "true",
                  "TLS_CERT_FILE": str(tmp_path / "ws.pem"), "TLS_KEY_FILE": str(tmp_path / "ws-key.pem")}),
        Proc("tls-manager", [str(barrage_bin), "push-manager"],
             env={**tls_env("manager"), "GRPC_PORT": str(ports["m_grpc"]), "METRICS_PORT": str(ports["m_http"]),
                  "CONTROLLER_ADDRESS": controller_addr}),
    ]
    try:
        for proc, key in zip(procs, ("c_http", "n_http", "m_http")):
            proc.wait_ready(ports[key])
        yield tmp_path, ports, procs
    finally:
        for p in procs:
            p.stop()
        for p in procs:
            if p.p.returncode not in (0, None, -signal.SIGTERM):
                print(p.output())


def test_mutual_tls_cluster_with_wss_and_certificate_reload(tls_cluster):
    d, ports, procs = tls_cluster
    node = procs[1]
    ca = d / "ca.pem"
    ws_url = f"wss://localhost:{ports['ws']}/ws?user_id=alice&rooms=lobby"
    ctx = ssl.create_default_context(cafile=str(ca))

    # The guide's mutual-TLS grpcurl line, with this cluster's files and port.
    [line] = [l for l in doc_grpcurl_lines("docs/security.md") if "-cacert" in l]
    line = (line.replace("ca.pem", str(ca)).replace("biz.pem", str(d / "biz.pem"))
                .replace("biz-key.pem", str(d / "biz-key.pem"))
                .replace("push-manager:50053", f"127.0.0.1:{ports['m_grpc']}"))
    args = shlex.split(line)

    async def scenario():
        ws = await asyncio.wait_for(websockets.connect(ws_url, ssl=ctx, open_timeout=10), 10)
        first = await asyncio.wait_for(ws.recv(), 10)
        assert '"connected"' in first, first
        alice = WsClient(ws)
        p = grpcurl(*args[1:])
        assert '"deliveredCount": 1' in p.stdout, p.stdout
        assert (await alice.next_message())["data"] == "hi"

        # Without a client certificate the API is out of reach.
        anonymous = [a for a in args[1:] if a not in ("-cert", "-key", str(d / "biz.pem"), str(d / "biz-key.pem"))]
        p = grpcurl(*anonymous, check=False)
        assert p.returncode != 0, p.stdout

        # Renew the WebSocket certificate and signal the node: new
        # connections get the new certificate, the open one keeps working.
        before = presented_cert(ports["ws"], ca)
        issue(d, "ws")
        node.p.send_signal(signal.SIGHUP)
        wait_until("the renewed certificate", lambda: presented_cert(ports["ws"], ca) != before)
        assert metric(ports["n_http"], 'connect_node_tls_reloads_total{result="ok"}') >= 1
        assert node.alive(), node.output()
        p = grpcurl(*args[1:])
        assert '"deliveredCount": 1' in p.stdout, p.stdout
        assert (await alice.next_message())["data"] == "hi"
        await alice.close()

    run(scenario(), timeout=90)
