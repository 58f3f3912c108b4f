#![allow(missing_docs)] // criterion_group! generates undocumented items
//! Micro-benchmarks of the push hot path: frame encoding, ring lookup,
//! membership resolution, per-node batch assembly and local fan-out.
//! `cargo bench --bench hot_path`; results are recorded in BENCHMARKS.md.

use std::collections::HashSet;
use std::hint::black_box;
use std::time::{Duration, Instant};

use barrage_connect_node::batch::BatchCache;
use barrage_connect_node::hub::{DEFAULT_SHARDS, Hub, Outbound, Wire};
use barrage_controller::StreamConfig;
use barrage_controller::state::Membership;
use barrage_controller::streams::Streams;
use barrage_discovery::ring::Ring;
use barrage_proto::v1::session_change::Kind;
use barrage_proto::v1::{MessageBody, ResolvedTarget, SessionChange};
use barrage_protocol::binary::{self, Compression, FrameType};
use barrage_protocol::{MessageParts, RoomId, StreamKey, UserId, encode_message};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn parts(content: &str) -> MessageParts<'_> {
    MessageParts {
        stream: "room:live-42",
        id: "0193a1c4-7d1e-7b9a-a0b1-3c9f7a2d4e5f",
        epoch: 1_838_642_512_266_569,
        seq: 42,
        event: "comment",
        content,
        binary: &[],
        timestamp_ms: 1_764_000_000_123,
        from: "",
    }
}

fn frame_encoding(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode_message_frame");
    for size in [64usize, 1024, 16 * 1024] {
        let content = format!("{{\"text\":\"{}\"}}", "x".repeat(size));
        g.throughput(Throughput::Bytes(content.len() as u64));
        g.bench_with_input(BenchmarkId::new("json", size), &content, |b, content| {
            b.iter(|| encode_message(black_box(&parts(content))))
        });
        g.bench_with_input(BenchmarkId::new("binary", size), &content, |b, content| {
            b.iter(|| {
                let body = binary::message_body(black_box(&parts(content)));
                binary::frame(FrameType::Message, &body, Compression::OFF)
            })
        });
        g.bench_with_input(
            BenchmarkId::new("binary_deflate", size),
            &content,
            |b, content| {
                b.iter(|| {
                    let body = binary::message_body(black_box(&parts(content)));
                    binary::frame(FrameType::Message, &body, Compression::above(64))
                })
            },
        );
    }
    g.finish();
}

fn ring_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_owner");
    for controllers in [3usize, 16] {
        let ring = Ring::new(
            (0..controllers).map(|i| (format!("controller-{i}"), i)),
            128,
        );
        let keys: Vec<String> = (0..1024).map(|i| format!("room:r{i}")).collect();
        g.bench_function(BenchmarkId::from_parameter(controllers), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & 1023;
                black_box(ring.owner(&keys[i]))
            })
        });
    }
    g.finish();
}

fn membership(c: &mut Criterion) {
    // 50 nodes, 10k rooms, each room on 5 nodes.
    let mut m = Membership::new();
    let now = Instant::now();
    for n in 0..50 {
        let node = format!("node-{n}");
        m.sync(&node, "i", &format!("10.0.0.{n}:50052"), 0, true, &[], now);
        let changes: Vec<SessionChange> = (0..10_000)
            .filter(|r| r % 10 < 5 && (r + n) % 2 == 0)
            .map(|r| SessionChange {
                kind: Kind::Join as i32,
                key: format!("room:r{r}"),
                user_id: format!("u{n}-{r}"),
                ..Default::default()
            })
            .collect();
        m.report(&node, "i", 1, &changes, now);
    }
    let keys: Vec<String> = (0..10_000).map(|r| format!("room:r{r}")).collect();
    c.bench_function("membership_nodes_for", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 7) % keys.len();
            black_box(m.nodes_for(&keys[i]))
        })
    });
}

fn batch_assembly(c: &mut Criterion) {
    let mut g = c.benchmark_group("assemble_batches");
    for (targets, nodes) in [(1usize, 10usize), (100, 10), (1000, 50)] {
        let resolved: Vec<ResolvedTarget> = (0..targets)
            .map(|t| ResolvedTarget {
                key: format!("user:u{t}"),
                epoch: 7,
                seq: t as u64,
                node_ids: (0..3)
                    .map(|k| format!("node-{}", (t + k) % nodes))
                    .collect(),
                ..Default::default()
            })
            .collect();
        g.throughput(Throughput::Elements(targets as u64));
        g.bench_with_input(
            BenchmarkId::new("targets", targets),
            &resolved,
            |b, resolved| b.iter(|| barrage_push_manager::assemble_batches(resolved.clone(), &[])),
        );
    }
    g.finish();
}

fn push_to_user_targets(c: &mut Criterion) {
    let mut g = c.benchmark_group("push_to_user_targets");
    for n in [10usize, 100, 1000] {
        let ids: Vec<String> = (0..n).map(|i| format!("user-{i}")).collect();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("user_ids", n), &ids, |b, ids| {
            b.iter(|| barrage_push_manager::target_users(String::new(), ids.clone(), 1000))
        });
    }
    g.finish();
}

fn local_fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let mut g = c.benchmark_group("hub_deliver_room");
    g.measurement_time(Duration::from_secs(3));
    // The default sharding against one shard: what a room fan-out pays for
    // reading the shards one after another.
    for (members, shards) in [
        (1_000usize, DEFAULT_SHARDS),
        (10_000, DEFAULT_SHARDS),
        (10_000, 1),
    ] {
        // Queues only (these connections have no socket): what the
        // fan-out itself costs, on one thread.
        let hub = Hub::detached(1 << 20, &prometheus::Registry::new())
            .expect("hub")
            .with_shards(shards)
            .with_direct_writes(false);
        let room = RoomId::new("stage").expect("room");
        let mut queues = Vec::with_capacity(members);
        for i in 0..members {
            let (_conn, rx, _ack) = hub.connect(
                UserId::new(format!("u{i}")).expect("user"),
                std::slice::from_ref(&room),
                Wire::Json,
                None,
            );
            queues.push(rx);
        }
        let frame = Outbound::message(&parts("{\"text\":\"hi\"}"), Compression::OFF);
        let key = StreamKey::Room(room);
        let exclude = HashSet::new();
        g.throughput(Throughput::Elements(members as u64));
        g.bench_function(BenchmarkId::new(format!("shards-{shards}"), members), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(hub.deliver(&key, &frame, &exclude));
                }
                let took = start.elapsed();
                for q in &mut queues {
                    while q.try_recv().is_ok() {}
                }
                took
            })
        });
    }
    g.finish();
}

/// The controller's once-a-second sweep of its history, which holds the
/// state lock: with `streams` user streams of 100 messages each (the
/// default user retention), nothing yet old enough to expire.
fn history_sweep(c: &mut Criterion) {
    let mut g = c.benchmark_group("history_sweep");
    g.measurement_time(Duration::from_secs(3));
    g.sample_size(20);
    for streams in [1_000usize, 10_000] {
        let mut s = Streams::new(StreamConfig::default());
        let now = tokio::time::Instant::now();
        for i in 0..streams * 100 {
            let body = MessageBody {
                id: format!("m{i}"),
                ..Default::default()
            };
            s.append(&format!("user:u{}", i % streams), &body, false, now);
        }
        g.throughput(Throughput::Elements((streams * 100) as u64));
        g.bench_function(BenchmarkId::from_parameter(streams * 100), |b| {
            b.iter(|| s.sweep(black_box(now)))
        });
    }
    g.finish();
}

/// One push's append to a full user stream (100 messages kept): the
/// oldest of that stream is dropped, as in a controller's steady state.
fn history_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("history_append");
    g.measurement_time(Duration::from_secs(3));
    let streams = 1_000usize;
    let mut s = Streams::new(StreamConfig::default());
    let now = tokio::time::Instant::now();
    let mut i = 0usize;
    let keys: Vec<String> = (0..streams).map(|u| format!("user:u{u}")).collect();
    let mut body = MessageBody::default();
    let mut append = |s: &mut Streams| {
        body.id = format!("m{i}");
        s.append(&keys[i % streams], &body, false, now);
        i += 1;
    };
    for _ in 0..streams * 100 {
        append(&mut s);
    }
    g.throughput(Throughput::Elements(1));
    g.bench_function("full-user-stream", |b| b.iter(|| append(black_box(&mut s))));
    g.finish();
}

/// A `batch` frame of 8 messages: built (and, binary, compressed) by
/// every connection, against taken from the cache shared by the
/// connections that gathered the same messages.
fn batch_frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_frame_8");
    let content = format!("{{\"text\":\"{}\"}}", "x".repeat(200));
    let frames: Vec<Outbound> = (0..8)
        .map(|_| Outbound::message(&parts(&content), Compression::OFF))
        .collect();
    for (name, wire) in [
        ("json", Wire::Json),
        ("binary_deflate", Wire::Binary(Compression::above(64))),
    ] {
        g.bench_function(BenchmarkId::new("built", name), |b| {
            b.iter(|| barrage_connect_node::batch::build(black_box(&frames), wire))
        });
        let cache = BatchCache::default();
        g.bench_function(BenchmarkId::new("shared", name), |b| {
            b.iter(|| cache.get(black_box(&frames), wire))
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    batch_frame,
    history_append,
    history_sweep,
    frame_encoding,
    ring_lookup,
    membership,
    batch_assembly,
    push_to_user_targets,
    local_fanout
);
criterion_main!(benches);
