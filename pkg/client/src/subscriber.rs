//! A subscriber that stays connected: it reconnects with exponential
//! backoff and jitter, resumes every stream from the last position it saw,
//! tells the caller whether recovery worked, and drops duplicate messages.
//! When WebSockets do not get through it falls back to Server-Sent Events,
//! then to long-polling, which resume the same way.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use barrage_protocol::{CloseCode, MessageFrame, ServerFrame, StreamPos, format_positions};

use crate::fallback::{PollConn, SseConn, http_url};
use crate::{Client, Error, Result, Session, connect_url};

/// How a [`Subscriber`] reaches a connect-node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `GET /ws`.
    WebSocket,
    /// Server-Sent Events, `GET /sse`.
    Sse,
    /// Long-polling, `GET /poll`.
    LongPoll,
}

#[allow(clippy::large_enum_variant)] // one per subscriber
enum Conn {
    Ws(Client),
    Sse(SseConn),
    Poll(PollConn),
}

/// How a [`Subscriber`] connects and reconnects.
#[derive(Debug, Clone)]
pub struct SubscriberOptions {
    /// `ws://host:port/ws` of a connect-node; several to fail over between.
    pub urls: Vec<String>,
    /// User id (insecure development mode).
    pub user_id: String,
    /// Rooms to join at connect.
    pub rooms: Vec<String>,
    /// First reconnect delay; doubles per failed attempt.
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
    /// Reconnect attempts before giving up (`None`: forever).
    pub max_attempts: Option<u32>,
    /// Transports in the order they are tried.
    pub transports: Vec<Transport>,
    /// Failed attempts in a row before moving to the next transport.
    pub fallback_after: u32,
    /// How long the server may hold one long-poll, seconds.
    pub poll_timeout_secs: u64,
    /// Frame format on WebSockets (the HTTP transports always carry JSON).
    pub format: crate::Format,
}

impl SubscriberOptions {
    /// Options for one node, a user and some rooms, with default backoff.
    pub fn new(url: &str, user_id: &str, rooms: &[&str]) -> Self {
        SubscriberOptions {
            urls: vec![url.to_owned()],
            user_id: user_id.to_owned(),
            rooms: rooms.iter().map(|r| (*r).to_owned()).collect(),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_attempts: None,
            transports: vec![Transport::WebSocket, Transport::Sse, Transport::LongPoll],
            fallback_after: 2,
            poll_timeout_secs: 25,
            format: crate::Format::Json,
        }
    }
}

/// What a [`Subscriber`] reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A (re)connection was established. `recovered` lists, for every
    /// stream a position was sent for, whether every missed message follows
    /// (`true`) or the app must refetch its state (`false`).
    Connected {
        /// The session the server confirmed.
        session: Session,
        /// Recovery outcome per stream (empty on the first connect).
        recovered: BTreeMap<String, bool>,
    },
    /// A message, in stream order, never twice.
    Message(MessageFrame),
    /// The connection dropped; a reconnect follows.
    Disconnected {
        /// Close code (1006 when the connection just dropped).
        code: u16,
        /// Reason given by the server.
        reason: String,
    },
}

/// Ids remembered per stream for de-duplication.
const SEEN_IDS: usize = 1024;

/// A self-healing subscription.
pub struct Subscriber {
    opts: SubscriberOptions,
    client: Option<Conn>,
    transport: usize,
    failures: u32,
    positions: BTreeMap<String, StreamPos>,
    seen: BTreeMap<String, (HashSet<String>, VecDeque<String>)>,
    attempt: u32,
    next_url: usize,
    pending: VecDeque<Event>,
}

impl Subscriber {
    /// Connects (retrying as configured) and returns once connected; the
    /// first event is [`Event::Connected`].
    pub async fn connect(opts: SubscriberOptions) -> Result<Self> {
        let mut s = Subscriber {
            opts,
            client: None,
            transport: 0,
            failures: 0,
            positions: BTreeMap::new(),
            seen: BTreeMap::new(),
            attempt: 0,
            next_url: 0,
            pending: VecDeque::new(),
        };
        s.reconnect().await?;
        Ok(s)
    }

    /// The transport in use.
    pub fn transport(&self) -> Transport {
        self.opts
            .transports
            .get(self.transport)
            .copied()
            .unwrap_or(Transport::WebSocket)
    }

    /// The last position seen per stream.
    pub fn positions(&self) -> &BTreeMap<String, StreamPos> {
        &self.positions
    }

    fn url(&mut self) -> String {
        let base = &self.opts.urls[self.next_url % self.opts.urls.len()];
        self.next_url += 1;
        let rooms: Vec<&str> = self.opts.rooms.iter().map(String::as_str).collect();
        let mut url = connect_url(base, &self.opts.user_id, &rooms);
        if !self.positions.is_empty() {
            url.push_str("&positions=");
            url.push_str(&format_positions(&self.positions));
        }
        url
    }

    fn backoff(&self) -> Duration {
        let exp = self
            .opts
            .min_backoff
            .saturating_mul(1 << self.attempt.min(16));
        let capped = exp.min(self.opts.max_backoff);
        // Full jitter in [capped/2, capped]: reconnect storms spread out.
        let half = capped / 2;
        half + half.mul_f64(rand_unit())
    }

    /// Takes a confirmed session: streams that could not be resumed (or
    /// were never seen) start from where the server is now.
    fn on_session(&mut self, session: Session) -> Event {
        let mut recovered = BTreeMap::new();
        for (stream, st) in &session.streams {
            if let Some(ok) = st.recovered {
                recovered.insert(stream.clone(), ok);
            }
            if st.recovered != Some(true) {
                self.positions.insert(
                    stream.clone(),
                    StreamPos {
                        epoch: st.epoch,
                        seq: st.seq,
                    },
                );
            }
        }
        Event::Connected { session, recovered }
    }

    async fn open(&mut self, url: &str) -> Result<(Conn, Session)> {
        match self.transport() {
            Transport::WebSocket => {
                let client = Client::connect_with(url, self.opts.format).await?;
                let session = client.session().clone();
                Ok((Conn::Ws(client), session))
            }
            Transport::Sse => {
                let (conn, session) = SseConn::connect(&http_url(url, "/sse")?).await?;
                Ok((Conn::Sse(conn), session))
            }
            Transport::LongPoll => {
                let since = format_positions(&self.positions);
                let (conn, session) = PollConn::connect(
                    &http_url(url, "/poll")?,
                    &since,
                    self.opts.poll_timeout_secs,
                )
                .await?;
                Ok((Conn::Poll(conn), session))
            }
        }
    }

    async fn reconnect(&mut self) -> Result<()> {
        loop {
            let url = self.url();
            match self.open(&url).await {
                Ok((conn, session)) => {
                    self.attempt = 0;
                    self.failures = 0;
                    let event = self.on_session(session);
                    self.client = Some(conn);
                    self.pending.push_back(event);
                    return Ok(());
                }
                Err(Error::Refused { status, body })
                    if (400..500).contains(&status) && status != 429 =>
                {
                    return Err(Error::Refused { status, body });
                }
                Err(e) => {
                    self.attempt += 1;
                    self.failures += 1;
                    if self.failures >= self.opts.fallback_after
                        && self.transport + 1 < self.opts.transports.len()
                    {
                        self.transport += 1;
                        self.failures = 0;
                        tracing::info!(transport = ?self.transport(), error = %e, "falling back");
                    }
                    if self.opts.max_attempts.is_some_and(|m| self.attempt > m) {
                        return Err(e);
                    }
                    tokio::time::sleep(self.backoff()).await;
                }
            }
        }
    }

    /// Whether `m` is new: by id when it has one (two pushes in flight at
    /// once may arrive in either order, so an older seq can still be new),
    /// else by position.
    fn is_new(&mut self, m: &MessageFrame) -> bool {
        let older = self
            .positions
            .get(&m.stream)
            .is_some_and(|p| p.epoch == m.epoch && m.seq <= p.seq);
        if m.id.is_empty() {
            return !older;
        }
        let (set, order) = self.seen.entry(m.stream.clone()).or_default();
        if !set.insert(m.id.clone()) {
            return false;
        }
        order.push_back(m.id.clone());
        if order.len() > SEEN_IDS
            && let Some(old) = order.pop_front()
        {
            set.remove(&old);
        }
        true
    }

    /// The next event. Reconnects by itself after a drop; fails only when
    /// the server says not to reconnect (4400–4499, or an HTTP 4xx at the
    /// upgrade) or the attempts run out.
    pub async fn next_event(&mut self) -> Result<Event> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            let since = format_positions(&self.positions);
            let Some(conn) = self.client.as_mut() else {
                self.reconnect().await?;
                continue;
            };
            let next = match conn {
                Conn::Ws(client) => client
                    .next_message()
                    .await
                    .map(|m| m.map(ServerFrame::Message)),
                Conn::Sse(sse) => sse.next_frame().await.map(Some),
                Conn::Poll(poll) => poll.next_frame(&since).await.map(Some),
            };
            match next {
                Ok(Some(ServerFrame::Message(m))) => {
                    if self.is_new(&m) {
                        let newer = self
                            .positions
                            .get(&m.stream)
                            .is_none_or(|p| p.epoch != m.epoch || m.seq > p.seq);
                        if newer {
                            self.positions.insert(
                                m.stream.clone(),
                                StreamPos {
                                    epoch: m.epoch,
                                    seq: m.seq,
                                },
                            );
                        }
                        return Ok(Event::Message(m));
                    }
                }
                // A long-poll that could not resume a stream starts over.
                Ok(Some(frame @ ServerFrame::Connected { .. })) => {
                    return Ok(self.on_session(Session::from_connected(frame)?));
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    self.client = None;
                    return Ok(Event::Disconnected {
                        code: 1000,
                        reason: "closed".into(),
                    });
                }
                Err(Error::Closed { code, reason }) => {
                    self.client = None;
                    if !CloseCode::should_reconnect(code) && code != 1000 {
                        return Err(Error::Closed { code, reason });
                    }
                    return Ok(Event::Disconnected { code, reason });
                }
                Err(Error::Ws(e)) => {
                    self.client = None;
                    return Ok(Event::Disconnected {
                        code: 1006,
                        reason: e.to_string(),
                    });
                }
                Err(Error::Http(e)) => {
                    self.client = None;
                    return Ok(Event::Disconnected {
                        code: 1006,
                        reason: e,
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A uniform value in [0, 1) from the system's randomness, cheap and
/// good enough for jitter.
fn rand_unit() -> f64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}
