//! One PushToRoom is one trace: the three roles run as separate processes
//! exporting OTLP to a collector in this test, and the caller's trace id
//! (W3C `traceparent`) ends up on spans from push-manager, controller and
//! connect-node. A process on the current-thread runtime exports the same
//! way and flushes its pending spans when it stops.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use barrage_client::{Client, connect_url};
use barrage_proto::v1::PushToRoomRequest;
use barrage_proto::v1::push_manager_client::PushManagerClient;
use barrage_testkit::cluster::{eventually, within};
use barrage_testkit::free_port;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

/// (service name, trace id, span name) of every span received.
type Spans = Arc<Mutex<Vec<(String, Vec<u8>, String)>>>;

#[derive(Clone, Default)]
struct Collector(Spans);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut out = self.0.lock();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    out.push((service.clone(), span.trace_id, span.name));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], env: &[(&str, String)]) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_barrage"));
    cmd.args(args)
        .env_remove("ETCD_ENDPOINTS")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(Proc(cmd.spawn()?))
}

async fn ready(port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200")
}

/// Three roles, each its own process, exporting spans to `collector`.
struct Cluster {
    collector: Collector,
    manager: Proc,
    _node: Proc,
    _controller: Proc,
    n_ws: u16,
    m_grpc: u16,
    m_http: u16,
}

/// Starts the roles; `manager_env` is added to the push-manager's environment.
async fn start(manager_env: &[(&str, String)]) -> anyhow::Result<Cluster> {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let otlp = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ];
    let p = |n: u16| n.to_string();
    let (c_grpc, c_http) = (free_port()?, free_port()?);
    let (n_ws, n_grpc, n_http) = (free_port()?, free_port()?, free_port()?);
    let (m_grpc, m_http) = (free_port()?, free_port()?);
    let mut with_controller = env.clone();
    with_controller.push(("CONTROLLER_ADDRESS", format!("127.0.0.1:{c_grpc}")));
    let controller = spawn(
        &[
            "controller",
            "--bind-addr",
            "127.0.0.1",
            "--grpc-port",
            &p(c_grpc),
            "--metrics-port",
            &p(c_http),
        ],
        &env,
    )?;
    let node = spawn(
        &[
            "connect-node",
            "--bind-addr",
            "127.0.0.1",
            "--insecure-user-id",
            "--node-id",
            "n1",
            "--ws-port",
            &p(n_ws),
            "--grpc-port",
            &p(n_grpc),
            "--metrics-port",
            &p(n_http),
        ],
        &with_controller,
    )?;
    let mut manager_env_all = with_controller.clone();
    manager_env_all.extend(manager_env.iter().cloned());
    let manager = spawn(
        &[
            "push-manager",
            "--bind-addr",
            "127.0.0.1",
            "--grpc-port",
            &p(m_grpc),
            "--metrics-port",
            &p(m_http),
        ],
        &manager_env_all,
    )?;
    for port in [c_http, n_http, m_http] {
        eventually(T, "a role to be ready", || async move {
            ready(port).await.then_some(())
        })
        .await?;
    }
    Ok(Cluster {
        collector,
        manager,
        _node: node,
        _controller: controller,
        n_ws,
        m_grpc,
        m_http,
    })
}

/// The caller's trace id of [`push_traced`], as bytes.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// One PushToRoom with the caller's `traceparent`, received by a subscriber.
async fn push_traced(c: &Cluster) -> anyhow::Result<()> {
    let url = connect_url(&format!("ws://127.0.0.1:{}/ws", c.n_ws), "t", &["traced"]);
    let mut client = within(T, "connect", Client::connect(&url)).await??;
    let mut api = PushManagerClient::connect(format!("http://127.0.0.1:{}", c.m_grpc)).await?;
    let mut req = tonic::Request::new(PushToRoomRequest {
        room_id: "traced".into(),
        content: "x".into(),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01").parse()?,
    );
    let resp = within(T, "push", api.push_to_room(req))
        .await??
        .into_inner();
    assert_eq!(resp.delivered_count, 1, "{}", resp.message);
    within(T, "message", client.next_message())
        .await??
        .context("message")?;
    Ok(())
}

/// Span names in the caller's trace, by service.
fn traced_spans(collector: &Collector) -> BTreeMap<String, BTreeSet<String>> {
    spans_in(collector, TRACE_ID)
}

/// Span names in the trace `trace_id` (hex), by service.
fn spans_in(collector: &Collector, trace_id: &str) -> BTreeMap<String, BTreeSet<String>> {
    let want: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap_or_default())
        .collect();
    let mut by_service: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (svc, _, name) in collector.0.lock().iter().filter(|(_, t, _)| *t == want) {
        by_service
            .entry(svc.clone())
            .or_default()
            .insert(name.clone());
    }
    by_service
}

/// Every span received, for a failure message.
fn all_spans(collector: &Collector) -> String {
    let summary: BTreeSet<(String, String, String)> = collector
        .0
        .lock()
        .iter()
        .map(|(s, t, n)| {
            (
                s.clone(),
                t.iter().map(|b| format!("{b:02x}")).collect(),
                n.clone(),
            )
        })
        .collect();
    format!("spans received: {summary:?}")
}

fn service<'a>(
    spans: &'a BTreeMap<String, BTreeSet<String>>,
    name: &str,
) -> Option<&'a BTreeSet<String>> {
    spans
        .iter()
        .find(|(s, _)| s.contains(name))
        .map(|(_, names)| names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_push_is_one_trace_across_all_three_roles() -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let c = start(&[]).await?;
    push_traced(&c).await?;
    let services = eventually(T, "spans of all three roles in the caller's trace", || {
        let spans = traced_spans(&c.collector);
        async move { (spans.len() == 3).then_some(spans) }
    })
    .await
    .with_context(|| all_spans(&c.collector))?;
    for role in [
        "barrage-push-manager",
        "barrage-controller",
        "barrage-connect-node",
    ] {
        assert!(service(&services, role).is_some(), "{services:?}");
    }
    let all: BTreeSet<&String> = services.values().flatten().collect();
    for span in ["PushToRoom", "Resolve", "PushMessageBatch"] {
        assert!(
            all.iter().any(|n| n.as_str() == span),
            "no {span} span in {services:?}"
        );
    }
    Ok(())
}

/// A push over the HTTP API carrying the caller's `traceparent` (and
/// `tracestate`) is part of the caller's trace, as a gRPC push is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_push_joins_the_callers_trace() -> anyhow::Result<()> {
    const HTTP_TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
    barrage_testkit::init_tracing();
    let c = start(&[]).await?;
    let url = connect_url(
        &format!("ws://127.0.0.1:{}/ws", c.n_ws),
        "h",
        &["over-http"],
    );
    let mut client = within(T, "connect", Client::connect(&url)).await??;
    let body = r#"{"content":"x"}"#;
    let request = format!(
        "POST /api/v1/push/room/over-http HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\
         traceparent: 00-{HTTP_TRACE_ID}-b7ad6b7169203331-01\r\n\
         tracestate: vendor=opaque\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = within(T, "the HTTP push", async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", c.m_http)).await?;
        s.write_all(request.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    })
    .await??;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    within(T, "message", client.next_message())
        .await??
        .context("message")?;
    let services = eventually(T, "spans of all three roles in the caller's trace", || {
        let spans = spans_in(&c.collector, HTTP_TRACE_ID);
        async move { (spans.len() == 3).then_some(spans) }
    })
    .await
    .with_context(|| all_spans(&c.collector))?;
    let manager = service(&services, "barrage-push-manager").context("push-manager spans")?;
    assert!(manager.contains("PushToRoom"), "{services:?}");
    Ok(())
}

/// A push-manager on the current-thread runtime, whose exporter is told to
/// wait ten minutes between exports: its spans leave only through the flush
/// at shutdown, which must complete (the flush waits on a connection that
/// the process's one thread has to keep driving meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_current_thread_process_flushes_its_spans_when_it_stops() -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let mut c = start(&[
        ("RUNTIME_FLAVOR", "current-thread".to_string()),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000".to_string()),
    ])
    .await?;
    push_traced(&c).await?;
    eventually(T, "the controller's and the node's spans", || {
        let spans = traced_spans(&c.collector);
        async move {
            (service(&spans, "barrage-controller").is_some()
                && service(&spans, "barrage-connect-node").is_some())
            .then_some(())
        }
    })
    .await
    .with_context(|| all_spans(&c.collector))?;
    assert!(
        service(&traced_spans(&c.collector), "barrage-push-manager").is_none(),
        "the push-manager exported before it was stopped: {}",
        all_spans(&c.collector)
    );

    let pid = c.manager.0.id().to_string();
    let kill = Command::new("kill").args(["-TERM", &pid]).status()?;
    assert!(kill.success(), "kill -TERM {pid}: {kill}");
    let status = eventually(T, "the push-manager to exit", || {
        let exited = c.manager.0.try_wait();
        async move { exited.ok().flatten() }
    })
    .await?;
    assert!(status.success(), "push-manager exited with {status}");
    let spans = traced_spans(&c.collector);
    let manager = service(&spans, "barrage-push-manager").with_context(|| {
        format!(
            "no push-manager span after it stopped: {}",
            all_spans(&c.collector)
        )
    })?;
    assert!(manager.contains("PushToRoom"), "{spans:?}");
    Ok(())
}
