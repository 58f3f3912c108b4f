//! The discovery contract, run against both backends: the in-process
//! registry must behave like etcd for everything barrage relies on.

use std::time::Duration;

use barrage_discovery::{Discovery, Member, MemberWatch, Members, Role};
use barrage_testkit::EtcdServer;
use barrage_testkit::cluster::within;

const T: Duration = Duration::from_secs(15);

fn member(id: &str, addr: &str) -> Member {
    Member {
        id: id.into(),
        role: Role::ConnectNode,
        grpc_addr: addr.into(),
        http_addr: String::new(),
        ws_addr: Some("127.0.0.1:1".into()),
    }
}

async fn wait(
    w: &mut MemberWatch,
    what: &str,
    pred: impl Fn(&Members) -> bool,
) -> anyhow::Result<()> {
    w.wait_for(T, pred)
        .await
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

macro_rules! contract {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn in_process() -> anyhow::Result<()> {
                barrage_testkit::init_tracing();
                super::$name(barrage_discovery::Discovery::in_process(), None).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() -> anyhow::Result<()> {
                barrage_testkit::init_tracing();
                let etcd = super::EtcdServer::start().await?;
                let d = barrage_discovery::Discovery::etcd(&[etcd.endpoint()], "/barrage").await?;
                super::$name(d, Some(etcd)).await
            }
        }
    };
}

contract!(register_then_watch_and_watch_then_register);
async fn register_then_watch_and_watch_then_register(
    d: Discovery,
    _etcd: Option<EtcdServer>,
) -> anyhow::Result<()> {
    let mut early = d.watch(Role::ConnectNode).await?;
    assert!(early.current().is_empty());
    let reg = d
        .register(member("n1", "127.0.0.1:10"), Duration::from_secs(5))
        .await?;
    assert!(reg.is_registered());
    wait(&mut early, "early watcher sees n1", |m| {
        m.contains_key("n1")
    })
    .await?;
    let late = d.watch(Role::ConnectNode).await?;
    assert_eq!(
        late.current().get("n1"),
        Some(&member("n1", "127.0.0.1:10"))
    );
    // Other roles are not mixed in.
    assert!(d.watch(Role::Controller).await?.current().is_empty());
    within(T, "deregister", reg.deregister()).await?;
    wait(&mut early, "n1 gone after deregister", |m| m.is_empty()).await?;
    Ok(())
}

contract!(a_dropped_registration_expires_with_its_lease);
async fn a_dropped_registration_expires_with_its_lease(
    d: Discovery,
    _etcd: Option<EtcdServer>,
) -> anyhow::Result<()> {
    let mut w = d.watch(Role::ConnectNode).await?;
    let reg = d
        .register(member("n1", "a:1"), Duration::from_secs(2))
        .await?;
    wait(&mut w, "n1 registered", |m| m.contains_key("n1")).await?;
    let kept = d
        .register(member("n2", "a:2"), Duration::from_secs(2))
        .await?;
    drop(reg);
    wait(&mut w, "n1 expired", |m| !m.contains_key("n1")).await?;
    // n2 is kept alive well past its TTL by its keep-alive.
    assert!(w.current().contains_key("n2"));
    assert!(kept.is_registered());
    Ok(())
}

contract!(a_lost_lease_is_registered_again);
async fn a_lost_lease_is_registered_again(
    d: Discovery,
    _etcd: Option<EtcdServer>,
) -> anyhow::Result<()> {
    let mut w = d.watch(Role::ConnectNode).await?;
    let reg = d
        .register(member("n1", "a:1"), Duration::from_secs(3))
        .await?;
    let first = reg.lease();
    // Revoke behind the registration's back, as an etcd restart or a long
    // stall past the TTL would.
    d.backend().revoke(first).await?;
    wait(&mut w, "n1 removed by revoke", |m| !m.contains_key("n1")).await?;
    wait(&mut w, "n1 registered again", |m| m.contains_key("n1")).await?;
    barrage_testkit::cluster::eventually(T, "a new lease", || async {
        (reg.lease() != first).then_some(())
    })
    .await?;
    let mut up = reg.watch_registered();
    within(T, "registered flag", up.wait_for(|r| *r)).await??;
    Ok(())
}

contract!(a_key_deleted_behind_its_back_is_registered_again);
async fn a_key_deleted_behind_its_back_is_registered_again(
    d: Discovery,
    _etcd: Option<EtcdServer>,
) -> anyhow::Result<()> {
    let mut w = d.watch(Role::ConnectNode).await?;
    let reg = d
        .register(member("n1", "a:1"), Duration::from_secs(3))
        .await?;
    wait(&mut w, "n1 registered", |m| m.contains_key("n1")).await?;
    let lease = reg.lease();
    // Deleted while its lease lives (by hand, or by a tool).
    d.backend().delete(&d.key(Role::ConnectNode, "n1")).await?;
    wait(&mut w, "n1 deleted", |m| !m.contains_key("n1")).await?;
    wait(&mut w, "n1 registered again", |m| {
        m.get("n1").is_some_and(|n| n.grpc_addr == "a:1")
    })
    .await?;
    assert_eq!(reg.lease(), lease, "put back under the same lease");
    Ok(())
}

contract!(updates_arrive_in_order_and_bad_values_are_skipped);
async fn updates_arrive_in_order_and_bad_values_are_skipped(
    d: Discovery,
    _etcd: Option<EtcdServer>,
) -> anyhow::Result<()> {
    let mut w = d.watch(Role::ConnectNode).await?;
    let b = d.backend().clone();
    b.put(
        &d.key(Role::ConnectNode, "junk"),
        b"not json".to_vec(),
        None,
    )
    .await?;
    for i in 0..20 {
        let value = serde_json::to_vec(&member("n1", &format!("a:{i}")))?;
        b.put(&d.key(Role::ConnectNode, "n1"), value, None).await?;
    }
    wait(&mut w, "the last address", |m| {
        m.get("n1").is_some_and(|n| n.grpc_addr == "a:19")
    })
    .await?;
    assert!(!w.current().contains_key("junk"));
    // A watch started now lists the same (and skips the junk too).
    let fresh = d.watch(Role::ConnectNode).await?;
    assert_eq!(fresh.current().keys().collect::<Vec<_>>(), vec!["n1"]);
    b.delete(&d.key(Role::ConnectNode, "n1")).await?;
    wait(&mut w, "n1 deleted", |m| m.is_empty()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_keeps_registrations_and_watches() -> anyhow::Result<()> {
    let mut etcd = EtcdServer::start().await?;
    let d = Discovery::etcd(&[etcd.endpoint()], "/barrage").await?;
    let mut w = d.watch(Role::ConnectNode).await?;
    let reg = d
        .register(member("n1", "a:1"), Duration::from_secs(3))
        .await?;
    wait(&mut w, "n1 registered", |m| m.contains_key("n1")).await?;

    etcd.stop();
    // While etcd is down the watch keeps what it knew.
    assert!(w.current().contains_key("n1"));
    within(T, "etcd restart", etcd.restart()).await??;

    // Registered again after the restart (the lease may have expired
    // meanwhile), and a late registration is seen by the old watch.
    let other = d
        .register(member("n2", "a:2"), Duration::from_secs(3))
        .await?;
    wait(&mut w, "both members after the restart", |m| {
        m.contains_key("n1") && m.contains_key("n2")
    })
    .await?;
    let mut up = reg.watch_registered();
    within(T, "n1 registered flag", up.wait_for(|r| *r)).await??;
    drop(other);
    Ok(())
}
