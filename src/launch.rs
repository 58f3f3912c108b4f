//! Starts what a [`Plan`] says: binds listeners, connects discovery, wires
//! SIGTERM/SIGINT to a graceful drain, and runs the role(s).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use anyhow::Context as _;
use barrage_discovery::{Discovery, Member, MemberWatch, Role};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::{Base, Cluster, DevPlan, Plan};

/// Runs the plan to completion.
pub async fn run(plan: Plan) -> anyhow::Result<()> {
    match plan {
        Plan::Controller {
            base,
            cfg,
            grpc_port,
            metrics_port,
        } => {
            traced(base.log_format, "barrage-controller", async {
                let listeners = barrage_controller::Listeners {
                    grpc: bind(base.bind, grpc_port, "GRPC_PORT")?,
                    http: bind(base.bind, metrics_port, "METRICS_PORT")?,
                };
                let discovery = discovery(&base).await?;
                let shutdown = on_signal();
                barrage_controller::run(
                    cfg,
                    listeners,
                    discovery,
                    barrage_telemetry::new_registry(),
                    shutdown,
                )
                .await?;
                Ok(())
            })
            .await?;
        }
        Plan::PushManager {
            base,
            cfg,
            grpc_port,
            metrics_port,
        } => {
            traced(base.log_format, "barrage-push-manager", async {
                let listeners = barrage_push_manager::Listeners {
                    grpc: bind(base.bind, grpc_port, "GRPC_PORT")?,
                    http: bind(base.bind, metrics_port, "METRICS_PORT")?,
                };
                let discovery = discovery(&base).await?;
                let peers = barrage_push_manager::Peers {
                    controllers: controllers(&base, discovery.as_ref()).await?,
                    nodes: match &discovery {
                        Some(d) => Some(d.watch(Role::ConnectNode).await?),
                        None => None,
                    },
                    discovery,
                };
                barrage_push_manager::run(
                    cfg,
                    listeners,
                    peers,
                    barrage_telemetry::new_registry(),
                    on_signal(),
                )
                .await?;
                Ok(())
            })
            .await?;
        }
        Plan::ConnectNode {
            base,
            cfg,
            grpc_port,
            metrics_port,
            ws_port,
        } => {
            traced(base.log_format, "barrage-connect-node", async {
                let listeners = barrage_connect_node::Listeners {
                    ws: bind(base.bind, ws_port, "WS_PORT")?,
                    grpc: bind(base.bind, grpc_port, "GRPC_PORT")?,
                    http: bind(base.bind, metrics_port, "METRICS_PORT")?,
                };
                let discovery = discovery(&base).await?;
                let controllers = controllers(&base, discovery.as_ref()).await?;
                barrage_connect_node::run(
                    cfg,
                    listeners,
                    controllers,
                    discovery,
                    barrage_telemetry::new_registry(),
                    on_signal(),
                )
                .await?;
                Ok(())
            })
            .await?;
        }
        Plan::Dev(d) => traced(d.log_format, "barrage-dev", dev(d)).await?,
        Plan::Sub(s) => crate::sub::run(s).await?,
        Plan::Bench(b) => crate::bench::run(b).await?,
        Plan::Bandwidth(b) => crate::bandwidth::run(b).await?,
        Plan::Idle(b) => crate::idle::run(b).await?,
        Plan::Hold(h) => crate::idle::hold(h).await?,
        Plan::Floor(port) => crate::bench::serve_floor(port).await?,
        Plan::Token(t) => println!("{t}"),
    }
    Ok(())
}

/// Runs `role` with logging, and trace export when
/// OTEL_EXPORTER_OTLP_ENDPOINT is set; its pending spans are flushed when
/// it ends, however it ends.
async fn traced(
    format: barrage_telemetry::LogFormat,
    service: &str,
    role: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let telemetry =
        barrage_telemetry::init_telemetry(format, service).map_err(anyhow::Error::msg)?;
    let r = role.await;
    telemetry.shutdown().await;
    r
}

/// Connections a listener holds between the handshake and `accept`,
/// asked of the kernel, which caps it at `net.core.somaxconn` (4096 by
/// default since Linux 5.4). When clients reconnect all at once (a node
/// restarts, a load balancer fails over), a full queue drops handshakes
/// and each dropped client waits a retransmission (1 s, then 3 s, 7 s…);
/// Tokio's own default, like the standard library's, is 128.
const LISTEN_BACKLOG: u32 = 65_535;

/// A listener on `ip`:`port`, as every role binds its ports; `setting`
/// names the port in the error.
pub(crate) fn bind(ip: IpAddr, port: u16, setting: &str) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::new(ip, port);
    listen(addr).with_context(|| format!("cannot listen on {addr} ({setting})"))
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does: a restarted process can listen again
    // while the old one's connections are in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn discovery(base: &Base) -> anyhow::Result<Option<Discovery>> {
    match &base.cluster {
        Cluster::Etcd { endpoints, prefix } => {
            let d = Discovery::etcd(endpoints, prefix).await.with_context(|| {
                format!(
                    "cannot reach etcd at {} (ETCD_ENDPOINTS)",
                    endpoints.join(",")
                )
            })?;
            Ok(Some(d))
        }
        Cluster::Static { .. } => Ok(None),
    }
}

async fn controllers(base: &Base, discovery: Option<&Discovery>) -> anyhow::Result<MemberWatch> {
    if let Some(d) = discovery {
        return Ok(d.watch(Role::Controller).await?);
    }
    let Cluster::Static {
        controller: Some(addr),
    } = &base.cluster
    else {
        anyhow::bail!("CONTROLLER_ADDRESS: required without ETCD_ENDPOINTS");
    };
    tracing::info!(controller = %addr, "no etcd: using the controller at CONTROLLER_ADDRESS");
    Ok(MemberWatch::fixed(fixed_controller(addr)))
}

fn fixed_controller(addr: &str) -> BTreeMap<String, Member> {
    let m = Member {
        id: "controller".into(),
        role: Role::Controller,
        grpc_addr: addr.to_owned(),
        http_addr: String::new(),
        ws_addr: None,
    };
    [(m.id.clone(), m)].into_iter().collect()
}

/// A token cancelled on SIGTERM or Ctrl-C.
fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received; draining");
        t.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// All three roles in one process on an in-process registry.
async fn dev(d: DevPlan) -> anyhow::Result<()> {
    let discovery = Discovery::in_process();
    let shutdown = on_signal();
    // The push-manager calls the controller and the node in this process
    // directly; their ports still serve everyone else.
    let local_peers = barrage_proto::LocalPeers::default();

    let controller = barrage_controller::Listeners {
        grpc: bind(d.bind, d.controller_grpc_port, "CONTROLLER_GRPC_PORT")?,
        http: bind(d.bind, d.metrics_port - 2, "METRICS_PORT")?,
    };
    let node = barrage_connect_node::Listeners {
        ws: bind(d.bind, d.ws_port, "WS_PORT")?,
        grpc: bind(d.bind, d.node_grpc_port, "NODE_GRPC_PORT")?,
        http: bind(d.bind, d.metrics_port - 1, "METRICS_PORT")?,
    };
    let manager = barrage_push_manager::Listeners {
        grpc: bind(d.bind, d.grpc_port, "GRPC_PORT")?,
        http: bind(d.bind, d.metrics_port, "METRICS_PORT")?,
    };
    let ws_addr = node.ws.local_addr()?;
    let api_addr = manager.grpc.local_addr()?;

    let c = tokio::spawn(barrage_controller::run(
        barrage_controller::Config {
            node_id: "controller-dev".into(),
            local_peers: local_peers.clone(),
            ..Default::default()
        },
        controller,
        Some(discovery.clone()),
        barrage_telemetry::new_registry(),
        shutdown.clone(),
    ));
    let n = tokio::spawn(barrage_connect_node::run(
        barrage_connect_node::Config {
            node_id: "connect-node-dev".into(),
            insecure_user_id: true,
            auth: d.auth,
            demo: Some(barrage_connect_node::demo::DemoSettings {
                publish_api: Some(api_addr.to_string()),
                tls: barrage_proto::GrpcTls::plaintext(),
            }),
            // Every room takes comments from its members in dev.
            publish: Some(barrage_connect_node::publish::PublishSettings::open(
                api_addr.to_string(),
                vec!["*".into()],
            )),
            local_peers: local_peers.clone(),
            ..d.node
        },
        node,
        discovery.watch(Role::Controller).await?,
        Some(discovery.clone()),
        barrage_telemetry::new_registry(),
        shutdown.clone(),
    ));
    let p = tokio::spawn(barrage_push_manager::run(
        barrage_push_manager::Config {
            local_peers,
            ..d.push
        },
        manager,
        barrage_push_manager::Peers {
            controllers: discovery.watch(Role::Controller).await?,
            nodes: Some(discovery.watch(Role::ConnectNode).await?),
            discovery: Some(discovery.clone()),
        },
        barrage_telemetry::new_registry(),
        shutdown.clone(),
    ));
    eprintln!(
        "\nbarrage dev is running (all roles, in-process registry, INSECURE ?user_id= logins)\n\
         \x20 WebSocket:  ws://{ws_addr}/ws?user_id=alice&rooms=r1\n\
         \x20 gRPC API:   {api_addr}   (grpcurl -plaintext {api_addr} list)\n\
         \x20 metrics:    http://{}:{}/metrics\n\
         \x20 subscriber: barrage sub --room r1\n\
         Ctrl-C to stop.\n",
        d.bind, d.metrics_port
    );
    let (c, n, p) = tokio::join!(c, n, p);
    c??;
    n??;
    p??;
    Ok(())
}
