//! A burst of small calls on one HTTP/2 connection, as a connect-node
//! sends its controller when all its clients reconnect at once, to a
//! server too busy to read them at once: every call is answered, none
//! fails because the server took the burst for a flood and closed the
//! connection.

use std::time::Duration;

use barrage_proto::{GrpcTls, grpc_incoming};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Well past what one connection could carry unread before the limit on
/// concurrent calls (about 2,000 small requests).
const CALLS: usize = 6_000;

#[tokio::test]
async fn a_burst_of_small_calls_on_one_connection_is_all_answered() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let addr = listener.local_addr().expect("addr");
    // The server barrage's roles build, each call's request read only
    // after a pause: a server busy with other work.
    let (_health, health) = tonic_health::server::health_reporter();
    let busy = tower::util::MapFutureLayer::new(|call| async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        call.await
    });
    let router = GrpcTls::plaintext()
        .server()
        .expect("server")
        .layer(busy)
        .add_service(health);
    let server = tokio::spawn(router.serve_with_incoming(grpc_incoming(listener)));

    let channel = tokio::time::timeout(
        Duration::from_secs(10),
        GrpcTls::plaintext()
            .endpoint(&addr.to_string())
            .expect("endpoint")
            .connect(),
    )
    .await
    .expect("connect timed out")
    .expect("connect");
    let calls = (0..CALLS).map(|_| {
        let mut client = HealthClient::new(channel.clone());
        async move { client.check(HealthCheckRequest::default()).await }
    });
    let results = tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(calls))
        .await
        .expect("the burst was not answered in time");
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {CALLS} calls failed, the first: {:?}",
        failed.len(),
        failed.first()
    );
    server.abort();
}
