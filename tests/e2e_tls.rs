//! WebSockets over TLS: wss:// with a real rustls client, plain clients
//! refused, and a renewed certificate picked up from disk without a
//! restart while open connections keep receiving.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use barrage_client::{Client, connect_url};
use barrage_connect_node::listener::TlsFiles;
use barrage_proto::v1::PushToRoomRequest;
use barrage_testkit::cluster::{TestCluster, eventually, within};
use futures::StreamExt;
use rustls::pki_types::{CertificateDer, ServerName};

const T: Duration = Duration::from_secs(10);

/// A fresh self-signed certificate for `localhost`, written to `dir`.
fn write_cert(dir: &Path) -> anyhow::Result<CertificateDer<'static>> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&key)?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    Ok(cert.der().clone())
}

type Wss =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Opens wss:// trusting only `trusted`; returns the socket and the
/// certificate the server presented.
async fn connect_wss(
    addr: &str,
    trusted: &CertificateDer<'static>,
    user: &str,
) -> anyhow::Result<(Wss, CertificateDer<'static>)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trusted.clone())?;
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost")?.to_owned(), tcp)
        .await?;
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first().cloned())
        .ok_or_else(|| anyhow::anyhow!("no certificate presented"))?;
    let port = addr.rsplit(':').next().unwrap_or_default();
    let url = format!("wss://localhost:{port}/ws?user_id={user}&rooms=r");
    let (ws, _) = tokio_tungstenite::client_async(url, tls).await?;
    Ok((ws, presented))
}

async fn next_text(ws: &mut Wss) -> anyhow::Result<String> {
    loop {
        let msg = within(T, "frame", ws.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("closed"))??;
        if msg.is_text() {
            return Ok(msg.into_text()?.to_string());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_serves_and_reloads_a_renewed_certificate() -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let dir = tempfile::tempdir()?;
    let first = write_cert(dir.path())?;
    let files = TlsFiles {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    };
    let mut cluster = TestCluster::in_process();
    cluster.start_controller("c").await?;
    cluster
        .start_node_with("tls", |c| c.tls = Some(files.clone()))
        .await?;
    cluster.start_manager("m").await?;
    let addr = cluster.nodes[0].ws_addr.clone().expect("ws addr");

    let (mut early, presented) = within(T, "wss", connect_wss(&addr, &first, "early")).await??;
    assert_eq!(presented, first);
    assert!(
        next_text(&mut early)
            .await?
            .contains(r#""type":"connected""#)
    );

    // Plain WebSocket to the TLS port: refused, counted.
    assert!(
        within(
            T,
            "plain",
            Client::connect(&connect_url(&format!("ws://{addr}/ws"), "plain", &[]))
        )
        .await?
        .is_err()
    );
    let node = &cluster.nodes[0];
    eventually(T, "the plain attempt counted", || async {
        (node.metric(r#"connect_node_rejected_total{reason="tls"}"#) == 1.0).then_some(())
    })
    .await?;

    // A broken file is refused and the old certificate stays in service.
    std::fs::write(
        dir.path().join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )?;
    eventually(
        Duration::from_secs(20),
        "the broken file to be refused",
        || async {
            (node.metric(r#"connect_node_tls_reloads_total{result="error"}"#) >= 1.0).then_some(())
        },
    )
    .await?;
    let (_, still) = within(T, "wss", connect_wss(&addr, &first, "still")).await??;
    assert_eq!(still, first);

    // The renewed certificate is served to new connections.
    let renewed = write_cert(dir.path())?;
    let (mut late, _) = eventually(
        Duration::from_secs(20),
        "the renewed certificate",
        || async { connect_wss(&addr, &renewed, "late").await.ok() },
    )
    .await?;
    assert!(node.metric(r#"connect_node_tls_reloads_total{result="ok"}"#) >= 1.0);
    assert!(
        next_text(&mut late)
            .await?
            .contains(r#""type":"connected""#)
    );

    // Both the connection from before the renewal and the new one receive.
    let mut api = cluster.push_client().await?;
    let r = within(
        T,
        "push",
        api.push_to_room(PushToRoomRequest {
            room_id: "r".into(),
            content: "over tls".into(),
            ..Default::default()
        }),
    )
    .await??
    .into_inner();
    assert_eq!(r.delivered_count, 2);
    for ws in [&mut early, &mut late] {
        assert!(next_text(ws).await?.contains("over tls"));
    }
    Ok(())
}
