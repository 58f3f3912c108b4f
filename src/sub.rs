//! `barrage sub`: a terminal subscriber that prints messages as they arrive.

use barrage_client::{Client, connect_url};
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

/// Connects, then prints every frame until the server closes or `count`
/// messages arrived.
pub async fn run(plan: SubPlan) -> anyhow::Result<()> {
    let rooms: Vec<&str> = plan.rooms.iter().map(String::as_str).collect();
    let url = connect_url(&plan.url, &plan.user, &rooms);
    let mut client = Client::connect(&url).await?;
    let s = client.session();
    eprintln!(
        "connected to {} as {} (connection {}), rooms: [{}]",
        s.node_id,
        s.user_id,
        s.conn_id,
        s.rooms.join(", ")
    );
    let mut seen = 0u64;
    while let Some(frame) = client.next_frame().await? {
        if plan.json {
            println!("{}", frame.to_json());
        } else {
            match &frame {
                ServerFrame::Message(m) => {
                    let data = match (&m.data, &m.data_b64) {
                        (Some(d), _) => d.to_string(),
                        (None, Some(b)) => format!("<binary, base64 {b}>"),
                        (None, None) => String::new(),
                    };
                    println!("[{}] #{} {} {}: {}", m.stream, m.seq, m.event, m.id, data);
                }
                other => println!("{}", other.to_json()),
            }
        }
        if matches!(frame, ServerFrame::Message(_)) {
            seen += 1;
            if plan.count.is_some_and(|c| seen >= c) {
                break;
            }
        }
    }
    Ok(())
}
