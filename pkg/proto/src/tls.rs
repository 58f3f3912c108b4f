//! TLS on gRPC: one certificate per process, served on its gRPC port and
//! presented as its client certificate on internal hops; one CA bundle to
//! verify peers. With a CA configured, servers require client certificates
//! signed by it (mutual TLS) and clients verify servers against it.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

/// Name internal hops expect in peers' certificates unless told otherwise.
pub const DEFAULT_SERVER_NAME: &str = "barrage";

/// Files of a gRPC TLS setup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrpcTlsFiles {
    /// This process's certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// CA bundle that signs peers' certificates (PEM).
    pub ca: Option<PathBuf>,
    /// DNS name expected in the certificates of the servers this process calls.
    pub server_name: String,
}

/// Which file is wrong and why.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct GrpcTlsError {
    /// The setting at fault: `cert`, `key` or `ca`.
    pub which: &'static str,
    /// The file.
    pub path: String,
    /// What is wrong.
    pub why: String,
}

/// TLS settings of gRPC servers and clients; the default is plaintext.
#[derive(Debug, Clone, Default)]
pub struct GrpcTls {
    server: Option<ServerTlsConfig>,
    client: Option<ClientTlsConfig>,
}

fn read(which: &'static str, path: &Path) -> Result<Vec<u8>, GrpcTlsError> {
    let err = |why: String| GrpcTlsError {
        which,
        path: path.display().to_string(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let found = match which {
        "key" => PrivateKeyDer::from_pem_slice(&pem).is_ok(),
        _ => CertificateDer::pem_slice_iter(&pem).any(|c| c.is_ok()),
    };
    if !found {
        return Err(err(format!(
            "no PEM {} in the file",
            if which == "key" {
                "private key"
            } else {
                "certificate"
            }
        )));
    }
    Ok(pem)
}

impl GrpcTls {
    /// Plaintext gRPC.
    pub fn plaintext() -> GrpcTls {
        GrpcTls::default()
    }

    /// Loads and checks the files. A certificate needs its key; a CA alone
    /// makes this process a TLS client that verifies servers (no client
    /// certificate to present, no TLS on its own port).
    pub fn load(files: &GrpcTlsFiles) -> Result<GrpcTls, GrpcTlsError> {
        let identity = match (&files.cert, &files.key) {
            (Some(c), Some(k)) => Some(Identity::from_pem(read("cert", c)?, read("key", k)?)),
            (None, None) => None,
            (Some(c), None) => {
                return Err(GrpcTlsError {
                    which: "key",
                    path: c.display().to_string(),
                    why: "a certificate needs its private key".into(),
                });
            }
            (None, Some(k)) => {
                return Err(GrpcTlsError {
                    which: "cert",
                    path: k.display().to_string(),
                    why: "a private key needs its certificate".into(),
                });
            }
        };
        let ca = match &files.ca {
            Some(p) => Some(Certificate::from_pem(read("ca", p)?)),
            None => None,
        };
        let server = identity.clone().map(|id| {
            let s = ServerTlsConfig::new().identity(id);
            match &ca {
                Some(ca) => s.client_ca_root(ca.clone()),
                None => s,
            }
        });
        let client = ca.map(|ca| {
            let c = ClientTlsConfig::new().ca_certificate(ca).domain_name(
                if files.server_name.is_empty() {
                    DEFAULT_SERVER_NAME
                } else {
                    files.server_name.as_str()
                },
            );
            match identity {
                Some(id) => c.identity(id),
                None => c,
            }
        });
        Ok(GrpcTls { server, client })
    }

    /// Whether this process's gRPC port serves TLS.
    pub fn serves_tls(&self) -> bool {
        self.server.is_some()
    }

    /// A server builder, with TLS when configured.
    pub fn server(&self) -> Result<Server, tonic::transport::Error> {
        let builder = Server::builder().max_concurrent_streams(crate::MAX_CONCURRENT_STREAMS);
        match &self.server {
            Some(cfg) => builder.tls_config(cfg.clone()),
            None => Ok(builder),
        }
    }

    /// An endpoint for `addr` (`host:port`): `https` with the CA when one is
    /// configured, else plaintext.
    pub fn endpoint(&self, addr: &str) -> Result<Endpoint, tonic::transport::Error> {
        match &self.client {
            Some(cfg) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(cfg.clone()),
            None => Endpoint::from_shared(format!("http://{addr}")),
        }
    }
}
