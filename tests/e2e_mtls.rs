//! Mutual TLS on every gRPC hop: push-manager → controller, push-manager →
//! connect-node and connect-node → controller all run over TLS with client
//! certificates, and the public API admits only callers whose certificate
//! the cluster's CA signed.

use std::time::Duration;

use barrage_client::{Client, connect_url};
use barrage_proto::v1::PushToRoomRequest;
use barrage_proto::v1::push_manager_client::PushManagerClient;
use barrage_proto::{GrpcTls, GrpcTlsFiles};
use barrage_testkit::cluster::{TestCluster, within};
use barrage_testkit::pki::{Issued, TestPki};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const T: Duration = Duration::from_secs(10);

fn tls(pki: &TestPki, issued: &Issued) -> GrpcTls {
    GrpcTls::load(&GrpcTlsFiles {
        cert: Some(issued.cert.clone()),
        key: Some(issued.key.clone()),
        ca: Some(pki.ca_file()),
        server_name: "barrage".into(),
    })
    .expect("test certificates load")
}

/// A public-API client presenting `identity` (if any) and trusting `ca`.
async fn api_client(
    addr: &str,
    ca: &std::path::Path,
    identity: Option<&Issued>,
) -> anyhow::Result<PushManagerClient<tonic::transport::Channel>> {
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
        .domain_name("localhost");
    if let Some(id) = identity {
        cfg = cfg.identity(Identity::from_pem(
            std::fs::read(&id.cert)?,
            std::fs::read(&id.key)?,
        ));
    }
    let ch = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(cfg)?
        .connect_lazy();
    Ok(PushManagerClient::new(ch))
}

/// With TLS 1.3 the server's verdict on a client certificate arrives after
/// the client finished its handshake, so the call ends as the connection
/// closes, as the server's alert, or as a failed connect; never as an answer
/// from the service.
fn refused_by_transport(err: &tonic::Status) -> bool {
    matches!(
        err.code(),
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
    ) && format!("{err:?}").contains("transport::Error")
}

fn push(room: &str) -> PushToRoomRequest {
    PushToRoomRequest {
        room_id: room.into(),
        content: "over mtls".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpc_hop_runs_over_mutual_tls() -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let pki = TestPki::new("cluster")?;
    let names = ["barrage", "localhost"];
    let (c, n, m) = (
        pki.issue("controller", &names)?,
        pki.issue("node", &names)?,
        pki.issue("manager", &names)?,
    );
    let mut cluster = TestCluster::in_process();
    cluster
        .start_controller_with("c", |cfg| cfg.grpc_tls = tls(&pki, &c))
        .await?;
    cluster
        .start_node_with("n", |cfg| cfg.grpc_tls = tls(&pki, &n))
        .await?;
    cluster
        .start_manager_with("m", |cfg| cfg.grpc_tls = tls(&pki, &m))
        .await?;
    let api_addr = cluster.managers[0].grpc_addr.clone();

    // The node reached its controller over TLS (the connect is confirmed),
    // and the push crosses both TLS hops from the push-manager.
    let mut ws = within(
        T,
        "connect",
        Client::connect(&connect_url(&cluster.nodes[0].ws_url(), "alice", &["live"])),
    )
    .await??;
    let service = pki.issue("biz-service", &["biz"])?;
    let mut api = api_client(&api_addr, &pki.ca_file(), Some(&service)).await?;
    let r = within(T, "push", api.push_to_room(push("live")))
        .await??
        .into_inner();
    assert!(r.success, "{}", r.message);
    assert_eq!(r.delivered_count, 1);
    let msg = within(T, "message", ws.next_message())
        .await??
        .expect("message");
    assert_eq!(msg.data, Some(serde_json::json!("over mtls")));

    // No client certificate: refused during the handshake.
    let mut anonymous = api_client(&api_addr, &pki.ca_file(), None).await?;
    let err = within(T, "anonymous push", anonymous.push_to_room(push("live")))
        .await?
        .expect_err("a caller without a certificate is refused");
    assert!(refused_by_transport(&err), "{err}");

    // A certificate from another CA: refused too.
    let rogue_pki = TestPki::new("rogue")?;
    let rogue = rogue_pki.issue("rogue", &["biz"])?;
    let mut rogue_api = api_client(&api_addr, &pki.ca_file(), Some(&rogue)).await?;
    let err = within(T, "rogue push", rogue_api.push_to_room(push("live")))
        .await?
        .expect_err("a certificate from another CA is refused");
    assert!(refused_by_transport(&err), "{err}");

    // Plaintext to a TLS port: refused.
    let mut plain =
        PushManagerClient::new(Endpoint::from_shared(format!("http://{api_addr}"))?.connect_lazy());
    assert!(
        within(T, "plaintext push", plain.push_to_room(push("live")))
            .await?
            .is_err()
    );
    // Nothing arrived from the refused callers.
    let extra = tokio::time::timeout(Duration::from_millis(300), ws.next_message()).await;
    assert!(extra.is_err(), "unexpected frame: {extra:?}");
    Ok(())
}
