//! Client publish (live comments): a connection sends
//! `{"type":"publish","room":"r","data":{"text":"…"}}` to a room it is in;
//! the comment passes a filter pipeline and then travels the normal push
//! path (the room's stream, seq, history, fan-out to every member), tagged
//! with the sender as `from`. The sender gets `ack` (message id, seq) or
//! `rejected` with the reason.
//!
//! Stages, in order, each counted in
//! `connect_node_publish_total{stage,outcome}`:
//! policy (room allowed, token claim where required, sender is a member) →
//! validation (text, length, control characters; the other fields of
//! `data`: size, control characters, sensitive words) → per-user rate →
//! per-room rate → sensitive words (reject or mask with `*`) → duplicate
//! (same text from the same user within the window; a comment that was
//! refused after this stage, or could not be pushed, does not count, so
//! it can be sent again at once) → push. Blocked users
//! and room mutes (files, re-read on change) are refused right after the
//! policy; an optional moderation service (`barrage.v1.Moderation`)
//! approves, denies or rewrites each comment within a deadline, failing
//! open or closed as configured, right before the push.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use barrage_auth::{Claims, room_matches};
use barrage_proto::v1::moderation_client::ModerationClient;
use barrage_proto::v1::push_manager_client::PushManagerClient;
use barrage_proto::v1::review_response::Verdict;
use barrage_proto::v1::{PushToRoomRequest, ReviewRequest};
use barrage_protocol::{RoomId, ServerFrame, UserId};
use parking_lot::{Mutex, RwLock};
use prometheus::IntCounterVec;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

/// What to do with a comment that contains a listed word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WordsMode {
    /// Refuse the comment (`rejected`, reason `sensitive`).
    Reject,
    /// Replace each matched character with `*` and publish.
    Mask,
}

/// Settings of client publishing.
#[derive(Debug, Clone)]
pub struct PublishSettings {
    /// Push API (`host:port` of a push-manager) accepted comments go through.
    pub api: String,
    /// API token sent with each push (`authorization: Bearer <token>`),
    /// for a push API that requires tokens (`API_TOKENS`); it needs the
    /// `push:room` scope. `None`: no token is sent.
    pub api_token: Option<String>,
    /// TLS of that call.
    pub tls: barrage_proto::GrpcTls,
    /// Rooms where members may publish (exact names or `prefix*`).
    pub rooms: Vec<String>,
    /// Of those, rooms where the token's `publish` claim must also allow it.
    pub claim_rooms: Vec<String>,
    /// Longest comment text, in characters.
    pub max_chars: usize,
    /// Comments per second per user (bursts of `user_burst`).
    pub user_per_sec: u32,
    /// Burst of the per-user limit.
    pub user_burst: u32,
    /// Comments per second per room over all its publishers; 0: off.
    pub room_per_sec: u32,
    /// The same text from the same user within this window is dropped.
    pub dedup_window: Duration,
    /// Sensitive words, one per line (`#` starts a comment); re-read when it changes.
    pub words_file: Option<PathBuf>,
    /// What a match does.
    pub words_mode: WordsMode,
    /// Users who may not publish, one id per line; re-read when it changes.
    pub blocklist_file: Option<PathBuf>,
    /// Per-room mutes, lines `<room> <user> <until, unix seconds>`; re-read
    /// when it changes; a mute ends at its time.
    pub mutes_file: Option<PathBuf>,
    /// A `barrage.v1.Moderation` service (`host:port`) that reviews comments.
    pub moderation: Option<ModerationHook>,
}

impl PublishSettings {
    /// Members of `rooms` may publish, through the push-manager at `api`
    /// (plaintext, no API token), with the defaults of `barrage connect-node`: comments
    /// of up to 200 characters, 10 per second per user (bursts of 20), no
    /// room limit, duplicates dropped within 5 s, no word list, blocklist,
    /// mutes or moderation.
    pub fn open(api: impl Into<String>, rooms: Vec<String>) -> Self {
        PublishSettings {
            api: api.into(),
            api_token: None,
            tls: barrage_proto::GrpcTls::plaintext(),
            rooms,
            claim_rooms: Vec::new(),
            max_chars: 200,
            user_per_sec: 10,
            user_burst: 20,
            room_per_sec: 0,
            dedup_window: Duration::from_secs(5),
            words_file: None,
            words_mode: WordsMode::Reject,
            blocklist_file: None,
            mutes_file: None,
            moderation: None,
        }
    }
}

/// A moderation service and how to treat it when it does not answer.
#[derive(Debug, Clone)]
pub struct ModerationHook {
    /// `host:port` of the service.
    pub addr: String,
    /// Deadline of one review.
    pub timeout: Duration,
    /// Publish without a verdict when the service fails or is late
    /// (fail-open); otherwise refuse (fail-closed).
    pub fail_open: bool,
}

type Keyed<K> = governor::DefaultKeyedRateLimiter<K>;

/// A loaded word list.
struct Words {
    matcher: AhoCorasick,
    stamp: Option<SystemTime>,
}

/// A user-list file as last read, with its modification time.
#[derive(Default)]
struct Listed {
    blocked: HashSet<String>,
    /// (room, user) → muted until (unix seconds).
    mutes: HashMap<(String, String), u64>,
    stamps: [Option<SystemTime>; 2],
}

fn read_lists(blocklist: Option<&PathBuf>, mutes: Option<&PathBuf>) -> Result<Listed, WordsError> {
    let mut out = Listed::default();
    if let Some(p) = blocklist {
        let text = std::fs::read_to_string(p).map_err(|e| WordsError {
            path: p.display().to_string(),
            why: e.to_string(),
        })?;
        out.blocked = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        out.stamps[0] = std::fs::metadata(p).and_then(|m| m.modified()).ok();
    }
    if let Some(p) = mutes {
        let text = std::fs::read_to_string(p).map_err(|e| WordsError {
            path: p.display().to_string(),
            why: e.to_string(),
        })?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let until = match f.as_slice() {
                [_, _, until] => until.parse::<u64>().ok(),
                _ => None,
            };
            let Some(until) = until else {
                return Err(WordsError {
                    path: p.display().to_string(),
                    why: format!(
                        "line {}: expected <room> <user> <until unix seconds>",
                        n + 1
                    ),
                });
            };
            out.mutes.insert((f[0].to_owned(), f[1].to_owned()), until);
        }
        out.stamps[1] = std::fs::metadata(p).and_then(|m| m.modified()).ok();
    }
    Ok(out)
}

/// Checks the blocklist and mutes files load (for configuration checks).
pub fn check_list_files(
    blocklist: Option<&PathBuf>,
    mutes: Option<&PathBuf>,
) -> Result<(), WordsError> {
    read_lists(blocklist, mutes).map(|_| ())
}

/// The pipeline and the client of the push API.
pub struct Publisher {
    s: PublishSettings,
    api: PushManagerClient<Channel>,
    /// `Bearer <PUBLISH_API_TOKEN>`, sent with each push.
    authorization: Option<MetadataValue<Ascii>>,
    /// Roles in this process (`barrage dev`): a push-manager serving the
    /// API address here is called directly instead of over loopback.
    local: barrage_proto::LocalPeers,
    moderation: Option<ModerationClient<Channel>>,
    lists: RwLock<Listed>,
    per_user: Keyed<String>,
    per_room: Option<Keyed<String>>,
    recent: Mutex<HashMap<(String, u64), Instant>>,
    words: RwLock<Option<Words>>,
    counter: IntCounterVec,
}

/// Why the word list did not load.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct WordsError {
    path: String,
    why: String,
}

fn load_words(path: &PathBuf) -> Result<Words, WordsError> {
    let err = |why: String| WordsError {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let words: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let matcher = AhoCorasickBuilder::new()
        .ascii_case_insensitive(true)
        .match_kind(MatchKind::LeftmostLongest)
        .build(&words)
        .map_err(|e| err(e.to_string()))?;
    Ok(Words {
        matcher,
        stamp: std::fs::metadata(path).and_then(|m| m.modified()).ok(),
    })
}

/// Checks a word-list file loads (for configuration checks).
pub fn check_words_file(path: &PathBuf) -> Result<(), WordsError> {
    load_words(path).map(|_| ())
}

fn hash(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// The `authorization` header value carrying an API token.
fn bearer(token: &str) -> Result<MetadataValue<Ascii>, &'static str> {
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces");
    }
    format!("Bearer {token}")
        .parse()
        .map_err(|_| "must be printable ASCII without spaces")
}

/// Checks an API token for the push API can be sent (for configuration checks).
pub fn check_api_token(token: &str) -> Result<(), &'static str> {
    bearer(token).map(drop)
}

/// Bytes a comment's fields besides `text` may take (keys and encoded
/// values).
pub const MAX_EXTRA_BYTES: usize = 512;

/// Every string inside `v`, in order.
fn strings_in<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|v| strings_in(v, out)),
        Value::Object(o) => o.iter().for_each(|(k, v)| {
            out.push(k);
            strings_in(v, out);
        }),
        _ => {}
    }
}

/// The text of a comment: `{"text": "…"}` or a bare string.
fn text_of(data: &Value) -> Option<&str> {
    match data {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("text").and_then(Value::as_str),
        _ => None,
    }
}

impl Publisher {
    /// Builds the pipeline; `counter` is `connect_node_publish_total`;
    /// `local` holds the roles of this process.
    pub fn new(
        s: PublishSettings,
        counter: IntCounterVec,
        local: barrage_proto::LocalPeers,
    ) -> Result<Arc<Publisher>, WordsError> {
        let words = match &s.words_file {
            Some(p) => Some(load_words(p)?),
            None => None,
        };
        let endpoint = s.tls.endpoint(&s.api).map_err(|e| WordsError {
            path: s.api.clone(),
            why: e.to_string(),
        })?;
        let api = PushManagerClient::new(
            endpoint
                .connect_timeout(Duration::from_secs(2))
                .connect_lazy(),
        );
        let authorization = match &s.api_token {
            Some(t) => Some(bearer(t).map_err(|why| WordsError {
                path: "PUBLISH_API_TOKEN".into(),
                why: why.into(),
            })?),
            None => None,
        };
        let lists = read_lists(s.blocklist_file.as_ref(), s.mutes_file.as_ref())?;
        let moderation = match &s.moderation {
            Some(h) => Some(ModerationClient::new(
                s.tls
                    .endpoint(&h.addr)
                    .map_err(|e| WordsError {
                        path: h.addr.clone(),
                        why: e.to_string(),
                    })?
                    .connect_timeout(h.timeout.max(Duration::from_millis(200)))
                    .connect_lazy(),
            )),
            None => None,
        };
        let rate = NonZeroU32::new(s.user_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(s.user_burst).unwrap_or(rate);
        let per_user =
            governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst));
        let per_room = NonZeroU32::new(s.room_per_sec)
            .map(|r| governor::RateLimiter::keyed(governor::Quota::per_second(r)));
        Ok(Arc::new(Publisher {
            s,
            api,
            authorization,
            local,
            moderation,
            lists: RwLock::new(lists),
            per_user,
            per_room,
            recent: Mutex::new(HashMap::new()),
            words: RwLock::new(words),
            counter,
        }))
    }

    /// Re-reads the word list when the file changes, and forgets old
    /// duplicate records, until `stop`.
    pub async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            let window = self.s.dedup_window;
            self.recent.lock().retain(|_, at| at.elapsed() < window);
            self.per_user.retain_recent();
            if let Some(r) = &self.per_room {
                r.retain_recent();
            }
            self.reload_lists();
            let Some(path) = &self.s.words_file else {
                continue;
            };
            let now = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            let changed = self.words.read().as_ref().is_none_or(|w| w.stamp != now);
            if changed {
                match load_words(path) {
                    Ok(w) => {
                        *self.words.write() = Some(w);
                        tracing::info!(path = %path.display(), "sensitive word list reloaded");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "sensitive word list not reloaded; the previous one stays")
                    }
                }
            }
        }
    }

    fn reload_lists(&self) {
        let (b, m) = (self.s.blocklist_file.as_ref(), self.s.mutes_file.as_ref());
        if b.is_none() && m.is_none() {
            return;
        }
        let stamp = |p: Option<&PathBuf>| {
            p.and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        };
        if self.lists.read().stamps == [stamp(b), stamp(m)] {
            return;
        }
        match read_lists(b, m) {
            Ok(l) => {
                *self.lists.write() = l;
                tracing::info!("blocklist and mutes reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "blocklist or mutes not reloaded; the previous ones stay")
            }
        }
    }

    /// Forgets a comment recorded for duplicate detection that was not
    /// published, unless the record is another's by now (a later copy,
    /// recorded once this one's window had passed).
    fn forget(&self, (key, at): &((String, u64), Instant)) {
        let mut recent = self.recent.lock();
        if recent.get(key) == Some(at) {
            recent.remove(key);
        }
    }

    fn count(&self, stage: &str, outcome: &str) {
        self.counter.with_label_values(&[stage, outcome]).inc();
    }

    fn reject(
        &self,
        stage: &str,
        reference: Option<String>,
        room: &str,
        reason: &str,
        message: impl Into<String>,
    ) -> ServerFrame {
        self.count(stage, reason);
        ServerFrame::Rejected {
            reference,
            room: room.to_owned(),
            reason: reason.to_owned(),
            message: message.into(),
        }
    }

    /// Runs the pipeline for one comment and answers `ack` or `rejected`.
    pub async fn publish(
        &self,
        user: &UserId,
        claims: Option<&Claims>,
        member_of: impl Fn(&RoomId) -> bool,
        room: String,
        data: Value,
        reference: Option<String>,
    ) -> ServerFrame {
        // Policy.
        let room_id = match RoomId::new(room.as_str()) {
            Ok(r) => r,
            Err(e) => {
                return self.reject("policy", reference, &room, "invalid", format!("room: {e}"));
            }
        };
        if !room_matches(&self.s.rooms, &room) {
            return self.reject(
                "policy",
                reference,
                &room,
                "not_allowed",
                format!("publishing to {room} is not allowed"),
            );
        }
        if room_matches(&self.s.claim_rooms, &room)
            && !claims.is_some_and(|c| c.allows_publish(&room))
        {
            return self.reject(
                "policy",
                reference,
                &room,
                "not_allowed",
                format!("publishing to {room} needs a token whose publish claim allows it"),
            );
        }
        if !member_of(&room_id) {
            return self.reject(
                "policy",
                reference,
                &room,
                "not_joined",
                format!("join {room} before publishing to it"),
            );
        }
        self.count("policy", "pass");
        // Blocked users and room mutes.
        {
            let lists = self.lists.read();
            if lists.blocked.contains(user.as_str()) {
                drop(lists);
                return self.reject(
                    "blocklist",
                    reference,
                    &room,
                    "blocked",
                    "you may not publish",
                );
            }
            if let Some(until) = lists.mutes.get(&(room.clone(), user.to_string()))
                && *until > barrage_auth::now_secs()
            {
                let until = *until;
                drop(lists);
                return self.reject(
                    "mute",
                    reference,
                    &room,
                    "muted",
                    format!("muted in {room} until {until} (unix time)"),
                );
            }
        }
        self.count("blocklist", "pass");
        // Validation.
        let Some(text) = text_of(&data) else {
            return self.reject(
                "validate",
                reference,
                &room,
                "invalid",
                r#"data must be a string or {"text": "..."}"#,
            );
        };
        let text = text.trim();
        let chars = text.chars().count();
        if chars == 0 {
            return self.reject("validate", reference, &room, "invalid", "text is empty");
        }
        if chars > self.s.max_chars {
            return self.reject(
                "validate",
                reference,
                &room,
                "too_long",
                format!("{chars} characters, at most {}", self.s.max_chars),
            );
        }
        if text.chars().any(char::is_control) {
            return self.reject(
                "validate",
                reference,
                &room,
                "invalid",
                "text contains control characters",
            );
        }
        // The comment's other fields (a colour, a display mode) travel
        // to every member too: they are kept small and pass the same
        // character and word checks as the text.
        if let Value::Object(o) = &data {
            let extras: Vec<(&String, &Value)> = o.iter().filter(|(k, _)| *k != "text").collect();
            let size: usize = extras
                .iter()
                .map(|(k, v)| k.len() + v.to_string().len())
                .sum();
            if size > MAX_EXTRA_BYTES {
                return self.reject(
                    "validate",
                    reference,
                    &room,
                    "too_long",
                    format!(
                        "data's fields besides text take {size} bytes, at most {MAX_EXTRA_BYTES}"
                    ),
                );
            }
            let mut strings = Vec::new();
            for (k, v) in &extras {
                strings.push(k.as_str());
                strings_in(v, &mut strings);
            }
            if strings.iter().any(|t| t.chars().any(char::is_control)) {
                return self.reject(
                    "validate",
                    reference,
                    &room,
                    "invalid",
                    "data contains control characters",
                );
            }
            if let Some(w) = self.words.read().as_ref()
                && strings.iter().any(|t| w.matcher.is_match(t))
            {
                return self.reject(
                    "validate",
                    reference,
                    &room,
                    "sensitive",
                    "a field of data besides text contains a blocked word",
                );
            }
        }
        self.count("validate", "pass");
        // Rates.
        if self.per_user.check_key(&user.to_string()).is_err() {
            return self.reject(
                "user_rate",
                reference,
                &room,
                "rate_limited",
                format!("more than {} comments per second", self.s.user_per_sec),
            );
        }
        self.count("user_rate", "pass");
        if let Some(r) = &self.per_room
            && r.check_key(&room).is_err()
        {
            return self.reject(
                "room_rate",
                reference,
                &room,
                "room_rate_limited",
                format!("{room} is too busy, try again"),
            );
        }
        self.count("room_rate", "pass");
        // Sensitive words.
        let mut text = text.to_owned();
        if let Some(w) = self.words.read().as_ref()
            && w.matcher.is_match(&text)
        {
            match self.s.words_mode {
                WordsMode::Reject => {
                    return self.reject(
                        "words",
                        reference,
                        &room,
                        "sensitive",
                        "the comment contains a blocked word",
                    );
                }
                WordsMode::Mask => {
                    let mut masked = String::with_capacity(text.len());
                    let mut last = 0;
                    for m in w.matcher.find_iter(&text) {
                        masked.push_str(&text[last..m.start()]);
                        masked.extend(text[m.start()..m.end()].chars().map(|_| '*'));
                        last = m.end();
                    }
                    masked.push_str(&text[last..]);
                    text = masked;
                    self.count("words", "masked");
                }
            }
        } else {
            self.count("words", "pass");
        }
        // Duplicates. The comment is recorded now, so that the same one
        // sent meanwhile (from another connection of the user) is refused,
        // and forgotten again if it is not published after all.
        let recorded = {
            let key = (user.to_string(), hash(&text));
            let mut recent = self.recent.lock();
            if recent
                .get(&key)
                .is_some_and(|at| at.elapsed() < self.s.dedup_window)
            {
                drop(recent);
                return self.reject(
                    "duplicate",
                    reference,
                    &room,
                    "duplicate",
                    "the same comment was just sent",
                );
            }
            let at = Instant::now();
            recent.insert(key.clone(), at);
            (key, at)
        };
        self.count("duplicate", "pass");
        let unpublished = |frame: ServerFrame| {
            self.forget(&recorded);
            frame
        };
        // Moderation hook.
        if let (Some(client), Some(hook)) = (&self.moderation, &self.s.moderation) {
            let mut req = tonic::Request::new(ReviewRequest {
                room_id: room.clone(),
                user_id: user.to_string(),
                text: text.clone(),
            });
            req.set_timeout(hook.timeout);
            let verdict = tokio::time::timeout(hook.timeout, client.clone().review(req)).await;
            match verdict {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    match Verdict::try_from(r.verdict).unwrap_or(Verdict::Unspecified) {
                        Verdict::Approve => self.count("moderation", "approved"),
                        Verdict::Rewrite => {
                            self.count("moderation", "rewritten");
                            text = r.text;
                        }
                        Verdict::Deny | Verdict::Unspecified => {
                            let why = if r.reason.is_empty() {
                                "refused by moderation".to_owned()
                            } else {
                                r.reason
                            };
                            return unpublished(self.reject(
                                "moderation",
                                reference,
                                &room,
                                "denied",
                                why,
                            ));
                        }
                    }
                }
                _ if hook.fail_open => self.count("moderation", "failed_open"),
                _ => {
                    return unpublished(self.reject(
                        "moderation",
                        reference,
                        &room,
                        "unavailable",
                        "moderation did not answer in time; try again",
                    ));
                }
            }
        }
        // Push.
        let mut content = match data {
            Value::Object(o) => Value::Object(o),
            _ => serde_json::json!({}),
        };
        content["text"] = Value::String(text);
        let mut req = tonic::Request::new(PushToRoomRequest {
            room_id: room.clone(),
            content: content.to_string(),
            event: "comment".into(),
            sender: user.to_string(),
            ..Default::default()
        });
        const PUSH_TIMEOUT: Duration = Duration::from_secs(3);
        req.set_timeout(PUSH_TIMEOUT);
        if let Some(a) = &self.authorization {
            req.metadata_mut().insert("authorization", a.clone());
        }
        // Looked up per call: the push-manager of this process may start
        // after this node, or stop before it.
        let pushed = match self.local.get(&self.s.api, PUSH_TIMEOUT) {
            Some(local) => PushManagerClient::new(local).push_to_room(req).await,
            None => self.api.clone().push_to_room(req).await,
        };
        match pushed {
            Ok(r) => {
                let r = r.into_inner();
                self.count("push", "ok");
                ServerFrame::Ack {
                    reference,
                    room,
                    id: r.message_id,
                    seq: r.seq,
                }
            }
            Err(s) => {
                let message = match (s.code(), &self.authorization) {
                    (tonic::Code::Unauthenticated, None) => format!(
                        "not published: the push API requires an API token; set PUBLISH_API_TOKEN on the connect-node to a token of its API_TOKENS with the push:room scope ({})",
                        s.message()
                    ),
                    (tonic::Code::Unauthenticated, Some(_)) => format!(
                        "not published: the push API does not know the connect-node's PUBLISH_API_TOKEN; set it to a token of the push-manager's API_TOKENS with the push:room scope ({})",
                        s.message()
                    ),
                    (tonic::Code::PermissionDenied, _) => format!(
                        "not published: the connect-node's PUBLISH_API_TOKEN lacks the push:room scope; grant it in the push-manager's API_TOKENS ({})",
                        s.message()
                    ),
                    _ => format!("not published: {}", s.message()),
                };
                tracing::warn!(code = ?s.code(), %message, "publish could not be pushed");
                unpublished(self.reject("push", reference, &room, "unavailable", message))
            }
        }
    }
}
