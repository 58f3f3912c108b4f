//! `barrage sub`: a terminal subscriber that prints messages as they
//! arrive, reconnecting (and recovering what it missed) when the connection
//! drops.

use barrage_client::{Event, Subscriber, SubscriberOptions};
use barrage_protocol::ServerFrame;

/// What to subscribe to.
#[derive(Debug)]
pub struct SubPlan {
    pub url: String,
    pub user: String,
    pub rooms: Vec<String>,
    pub json: bool,
    pub count: Option<u64>,
}

/// Connects, then prints every message until `count` messages arrived (or
/// forever), reconnecting with backoff after drops.
pub async fn run(plan: SubPlan) -> anyhow::Result<()> {
    let rooms: Vec<&str> = plan.rooms.iter().map(String::as_str).collect();
    let opts = SubscriberOptions::new(&plan.url, &plan.user, &rooms);
    let mut sub = Subscriber::connect(opts).await?;
    let mut seen = 0u64;
    loop {
        match sub.next_event().await? {
            Event::Connected { session, recovered } => {
                eprintln!(
                    "connected to {} as {} (connection {}), rooms: [{}]",
                    session.node_id,
                    session.user_id,
                    session.conn_id,
                    session.rooms.join(", ")
                );
                for (stream, ok) in recovered {
                    if ok {
                        eprintln!("recovered {stream}: missed messages follow");
                    } else {
                        eprintln!("could not recover {stream}: messages were missed");
                    }
                }
            }
            Event::Disconnected { code, reason } => {
                eprintln!("disconnected ({code} {reason}); reconnecting");
            }
            Event::Message(m) => {
                if plan.json {
                    println!("{}", ServerFrame::Message(m).to_json());
                } else {
                    let data = match (&m.data, &m.data_b64) {
                        (Some(d), _) => d.to_string(),
                        (None, Some(b)) => format!("<binary, base64 {b}>"),
                        (None, None) => String::new(),
                    };
                    println!("[{}] #{} {} {}: {}", m.stream, m.seq, m.event, m.id, data);
                }
                seen += 1;
                if plan.count.is_some_and(|c| seen >= c) {
                    return Ok(());
                }
            }
        }
    }
}
