//! The WebSocket listener: plain TCP or TLS (rustls), with one handshake
//! deadline covering the TLS handshake and the HTTP upgrade request.
//!
//! The certificate and key are re-read on SIGHUP and whenever either file
//! changes on disk (checked every few seconds), so a renewed certificate
//! (cert-manager, a rotated Kubernetes Secret) is served to new
//! connections without a restart. A file that does not load keeps the
//! previous certificate in service and is logged and counted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::{Mutex, RwLock};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::metrics::Metrics;

/// How often the certificate files are checked for changes.
pub const TLS_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Paths of a PEM certificate chain and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC), PEM.
    pub key: PathBuf,
}

/// Why a certificate or key did not load.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is unreadable or holds no certificate.
    #[error("certificate {path}: {why}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The key file is unreadable, holds no key, or the key does not fit the certificate.
    #[error("private key {path}: {why}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

fn load_key(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let cert_err = |why: String| TlsError::Cert {
        path: files.cert.clone(),
        why,
    };
    let key_err = |why: String| TlsError::Key {
        path: files.key.clone(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(cert_err("no PEM certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| key_err(e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(certs, key, &provider).map_err(|e| key_err(e.to_string()))
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The certificate in service, swapped in place on reload.
#[derive(Debug)]
pub struct CertStore {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
    loaded_stamp: Mutex<[Option<(SystemTime, u64)>; 2]>,
}

impl CertStore {
    /// Loads the certificate and key, failing when either is unusable.
    pub fn load(files: TlsFiles) -> Result<Arc<CertStore>, TlsError> {
        let stamps = [stamp(&files.cert), stamp(&files.key)];
        let key = load_key(&files)?;
        Ok(Arc::new(CertStore {
            files,
            current: RwLock::new(Arc::new(key)),
            loaded_stamp: Mutex::new(stamps),
        }))
    }

    /// Re-reads both files; on error the previous certificate stays in service.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = [stamp(&self.files.cert), stamp(&self.files.key)];
        *self.loaded_stamp.lock() = stamps;
        let key = load_key(&self.files)?;
        *self.current.write() = Arc::new(key);
        Ok(())
    }

    fn changed_on_disk(&self) -> bool {
        let now = [stamp(&self.files.cert), stamp(&self.files.key)];
        *self.loaded_stamp.lock() != now
    }

    /// A rustls server configuration serving whatever certificate is current.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = match ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
        {
            Ok(b) => b,
            // The ring provider supports the default versions.
            Err(_) => ServerConfig::builder(),
        }
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }

    /// Reloads on SIGHUP and when the files change, until `stop`.
    pub async fn watch(self: Arc<Self>, metrics: Metrics, stop: CancellationToken) {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let signalled = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(TLS_POLL_INTERVAL) => false,
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            if !signalled && !self.changed_on_disk() {
                continue;
            }
            match self.reload() {
                Ok(()) => {
                    metrics.tls_reloads.with_label_values(&["ok"]).inc();
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    metrics.tls_reloads.with_label_values(&["error"]).inc();
                    tracing::error!(error = %e, "TLS certificate not reloaded; the previous one stays in service");
                }
            }
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// How the WebSocket port accepts connections.
#[derive(Clone)]
pub struct ListenOptions {
    /// Time from accept until the upgrade request has been read (TLS
    /// handshake included); slower clients are dropped.
    pub handshake_timeout: Duration,
    /// Serve TLS with this certificate store.
    pub tls: Option<Arc<CertStore>>,
}

/// Accepts connections until `shutdown`, then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    opts: ListenOptions,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let acceptor = opts
        .tls
        .as_ref()
        .map(|s| tokio_rustls::TlsAcceptor::from(s.server_config()));
    let tasks = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let deadline = tokio::time::Instant::now() + opts.handshake_timeout;
        let (router, metrics, shutdown) = (router.clone(), metrics.clone(), shutdown.clone());
        match acceptor.clone() {
            None => tasks.spawn(http(tcp, peer, router, deadline, metrics, shutdown)),
            Some(acceptor) => tasks.spawn(async move {
                match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => http(tls, peer, router, deadline, metrics, shutdown).await,
                    Ok(Err(e)) => {
                        metrics.rejected.with_label_values(&["tls"]).inc();
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics
                            .rejected
                            .with_label_values(&["handshake_timeout"])
                            .inc();
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            }),
        };
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
}

/// Ends the HTTP connection a request came on, whatever hyper is doing
/// with it. Every request carries one (as an extension). An event stream
/// whose client stopped reading uses it: hyper has no deadline on writing
/// a response, and would otherwise hold the socket for as long as the
/// client keeps the connection open without reading.
#[derive(Debug, Clone)]
pub struct ConnAbort(CancellationToken);

impl ConnAbort {
    /// Drops the connection (its socket is closed).
    pub fn abort(&self) {
        self.0.cancel();
    }
}

async fn http<IO>(
    io: IO,
    peer: SocketAddr,
    router: Router,
    deadline: tokio::time::Instant,
    metrics: Metrics,
    shutdown: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let abort = CancellationToken::new();
    let handle = ConnAbort(abort.clone());
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(handle.clone());
        router.clone().oneshot(req)
    });
    let left = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .max(Duration::from_millis(1));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(left)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = abort.cancelled() => {
            tracing::debug!(%peer, "HTTP connection dropped: its client stopped reading");
            return;
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                () = abort.cancelled() => return,
            }
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            metrics
                .rejected
                .with_label_values(&["handshake_timeout"])
                .inc();
            tracing::debug!(%peer, "upgrade request not received in time");
        } else {
            tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        };
        let err = CertStore::load(files.clone()).expect_err("missing");
        assert!(
            matches!(err, TlsError::Cert { ref path, .. } if *path == cert),
            "{err}"
        );
        std::fs::write(&cert, "not pem").expect("write");
        let err = CertStore::load(files.clone()).expect_err("empty");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }
}
