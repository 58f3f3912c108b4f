//! The barrage test kit: a real etcd on a free loopback port with a
//! temporary data directory, real barrage servers on `127.0.0.1:0`
//! ([`cluster::TestCluster`]), and deadline-bounded waits. Everything it
//! starts is stopped when its guard is dropped.

pub mod cluster;
pub mod pki;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};

/// A free TCP port on 127.0.0.1 for a server that binds it later, often
/// in another process (bound here, then released). It comes from below the
/// kernel's ephemeral range, so an outgoing connection (another test's
/// client, a role dialling a peer) cannot take it before the server binds
/// it, and this process never hands out the same port twice.
pub fn free_port() -> anyhow::Result<u16> {
    use std::hash::BuildHasher;
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    const LOWEST: u16 = 10_000;
    let below = ephemeral_low().unwrap_or(32_768).max(LOWEST + 1_000);
    let random = std::collections::hash_map::RandomState::new();
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for attempt in 0..500u32 {
        let port = LOWEST + (random.hash_one(attempt) % u64::from(below - LOWEST)) as u16;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return Ok(port);
        }
    }
    bail!("no free port on 127.0.0.1 between {LOWEST} and {below}")
}

/// The first port of the kernel's ephemeral range (`ip_local_port_range`).
fn ephemeral_low() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Installs a test log subscriber once (honours `RUST_LOG`, default `warn`).
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Finds the etcd binary: `ETCD_BIN`, then `PATH`, then `/usr/bin/etcd`.
pub fn etcd_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("ETCD_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("etcd");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let p = PathBuf::from("/usr/bin/etcd");
    if p.is_file() {
        return Ok(p);
    }
    bail!(
        "etcd not found: install it with `apt-get install etcd-server` (scripts/test.sh does) or set ETCD_BIN"
    )
}

/// A real etcd process on loopback, killed on drop.
pub struct EtcdServer {
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd on free ports with a fresh data dir and waits until it serves.
    pub async fn start() -> anyhow::Result<EtcdServer> {
        let mut server = EtcdServer {
            client_port: free_port()?,
            peer_port: free_port()?,
            dir: tempfile::tempdir()?,
            child: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// `http://127.0.0.1:<port>`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The data directory (holds `etcd.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = etcd_binary()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&bin)
            .arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("test={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                let log =
                    std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
                bail!("etcd exited with {status}: {}", tail(&log));
            }
            let ready = tokio::time::timeout(
                Duration::from_secs(2),
                barrage_discovery::etcd::EtcdBackend::connect(&[self.endpoint()]),
            )
            .await;
            if let Ok(Ok(_)) = ready {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(anyhow!("etcd at {} not ready within 20s", self.endpoint()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills etcd (SIGKILL), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops etcd, keeping its data, so it can be restarted.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts etcd again on the same ports and data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn().await
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let below = ephemeral_low().unwrap_or(32_768);
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for p in ports {
            assert!((10_000..below).contains(&p), "{p} is not below {below}");
            TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
    }
}
