//! The HTTP transports a [`crate::Subscriber`] falls back to when WebSockets
//! do not get through: Server-Sent Events (`GET /sse`) and long-polling
//! (`GET /poll`). Plain `http://` only, like the WebSocket client.

use std::collections::VecDeque;

use barrage_protocol::{ServerFrame, StreamState};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::{Error, Result, Session};

/// `ws://host:port/ws?query` → `http://host:port/<path>?query`.
pub(crate) fn http_url(ws_url: &str, path: &str) -> Result<String> {
    let rest = ws_url
        .strip_prefix("ws://")
        .ok_or_else(|| Error::Protocol(format!("{ws_url}: HTTP fallbacks need a ws:// URL")))?;
    let (authority, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let query = tail.split_once('?').map_or("", |(_, q)| q);
    let mut url = format!("http://{authority}{path}");
    if !query.is_empty() {
        url.push('?');
        url.push_str(query);
    }
    Ok(url)
}

fn http_err(e: impl std::fmt::Display) -> Error {
    Error::Http(e.to_string())
}

/// Sends `GET url` and returns the status and the streaming body.
async fn get(url: &str) -> Result<(u16, Incoming)> {
    let uri: hyper::Uri = url.parse().map_err(http_err)?;
    let authority = uri
        .authority()
        .ok_or_else(|| Error::Http(format!("{url}: no host")))?
        .clone();
    let stream = TcpStream::connect(authority.as_str())
        .await
        .map_err(http_err)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority.as_str())
        .header(hyper::header::ACCEPT, "text/event-stream, application/json")
        .body(Empty::<Bytes>::new())
        .map_err(http_err)?;
    let resp = sender.send_request(req).await.map_err(http_err)?;
    Ok((resp.status().as_u16(), resp.into_body()))
}

async fn body_text(body: Incoming) -> Result<String> {
    let bytes = body.collect().await.map_err(http_err)?.to_bytes();
    Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
}

/// Refusals are final (like an HTTP error at the WebSocket upgrade).
async fn refused(status: u16, body: Incoming) -> Error {
    Error::Refused {
        status,
        body: body_text(body).await.unwrap_or_default(),
    }
}

/// A Server-Sent Events session.
pub(crate) struct SseConn {
    body: Incoming,
    buf: Vec<u8>,
}

impl SseConn {
    /// Opens `GET /sse` and waits for the `connected` event.
    pub(crate) async fn connect(url: &str) -> Result<(SseConn, Session)> {
        let (status, body) = get(url).await?;
        if status != 200 {
            return Err(refused(status, body).await);
        }
        let mut conn = SseConn {
            body,
            buf: Vec::new(),
        };
        let first = conn.next_frame().await?;
        Ok((conn, Session::from_connected(first)?))
    }

    /// The next event as a frame; a server `close` event becomes
    /// [`Error::Closed`] with its code.
    pub(crate) async fn next_frame(&mut self) -> Result<ServerFrame> {
        loop {
            // An event ends with a blank line.
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&block);
                let (mut event, mut data) = ("message", String::new());
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = if v.trim() == "close" {
                            "close"
                        } else {
                            "frame"
                        };
                    } else if let Some(v) = line.strip_prefix("data:") {
                        if !data.is_empty() {
                            data.push('\n');
                        }
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if data.is_empty() {
                    continue; // a comment (heartbeat) or a bare retry
                }
                if event == "close" {
                    let v: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
                    return Err(Error::Closed {
                        code: v["code"].as_u64().map_or(1006, |c| c as u16),
                        reason: v["reason"].as_str().unwrap_or_default().to_owned(),
                    });
                }
                return serde_json::from_str(&data)
                    .map_err(|e| Error::Protocol(format!("bad event {data:?}: {e}")));
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(chunk) = f.into_data() {
                        self.buf.extend(chunk.iter().filter(|b| **b != b'\r'));
                    }
                }
                Some(Err(e)) => return Err(http_err(e)),
                None => {
                    return Err(Error::Closed {
                        code: 1006,
                        reason: "event stream ended".into(),
                    });
                }
            }
        }
    }
}

/// A long-polling session: each [`PollConn::next_frame`] that finds nothing
/// buffered polls again from the caller's positions.
pub(crate) struct PollConn {
    url: String,
    buffered: VecDeque<ServerFrame>,
    timeout_secs: u64,
}

/// One poll's answer.
struct Answer {
    frames: Vec<ServerFrame>,
    session: Session,
    recovered: bool,
}

impl PollConn {
    async fn poll(url: &str, since: &str, timeout_secs: u64) -> Result<Answer> {
        let mut full = format!("{url}&timeout_secs={timeout_secs}");
        if !since.is_empty() {
            full.push_str("&since=");
            full.push_str(since);
        }
        let (status, body) = get(&full).await?;
        if status != 200 {
            if status == 429 || status >= 500 {
                return Err(Error::Http(format!(
                    "HTTP {status}: {}",
                    body_text(body).await?
                )));
            }
            return Err(refused(status, body).await);
        }
        #[derive(serde::Deserialize)]
        struct Raw {
            messages: Vec<ServerFrame>,
            user_id: String,
            node_id: String,
            rooms: Vec<String>,
            streams: std::collections::BTreeMap<String, StreamState>,
            recovered: bool,
        }
        let text = body_text(body).await?;
        let raw: Raw = serde_json::from_str(&text)
            .map_err(|e| Error::Protocol(format!("bad poll answer: {e}")))?;
        Ok(Answer {
            frames: raw.messages,
            session: Session {
                conn_id: "poll".into(),
                user_id: raw.user_id,
                node_id: raw.node_id,
                rooms: raw.rooms,
                streams: raw.streams,
            },
            recovered: raw.recovered,
        })
    }

    /// The first poll: where to start, and what was missed since `since`.
    pub(crate) async fn connect(
        url: &str,
        since: &str,
        timeout_secs: u64,
    ) -> Result<(PollConn, Session)> {
        // `positions=` in the URL would repeat `since`; polls carry their own.
        let base: String = {
            let (path, query) = url.split_once('?').unwrap_or((url, ""));
            let kept: Vec<&str> = query
                .split('&')
                .filter(|kv| !kv.is_empty() && !kv.starts_with("positions="))
                .collect();
            format!("{path}?{}", kept.join("&"))
        };
        let a = PollConn::poll(&base, since, timeout_secs).await?;
        Ok((
            PollConn {
                url: base,
                buffered: a.frames.into(),
                timeout_secs,
            },
            a.session,
        ))
    }

    /// The next frame. When a later poll could not resume a stream, a fresh
    /// `connected` frame comes first so the caller resets its positions.
    pub(crate) async fn next_frame(&mut self, since: &str) -> Result<ServerFrame> {
        loop {
            if let Some(f) = self.buffered.pop_front() {
                return Ok(f);
            }
            let a = PollConn::poll(&self.url, since, self.timeout_secs).await?;
            if !a.recovered {
                let s = a.session;
                self.buffered.push_back(ServerFrame::Connected {
                    conn_id: s.conn_id,
                    user_id: s.user_id,
                    node_id: s.node_id,
                    rooms: s.rooms,
                    streams: s.streams,
                });
            }
            self.buffered.extend(a.frames);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_urls_become_http_urls() {
        assert_eq!(
            http_url("ws://127.0.0.1:8080/ws?user_id=a&rooms=r", "/sse").ok(),
            Some("http://127.0.0.1:8080/sse?user_id=a&rooms=r".to_owned())
        );
        assert_eq!(
            http_url("ws://h:1/ws", "/poll").ok(),
            Some("http://h:1/poll".to_owned())
        );
        assert!(http_url("wss://h/ws", "/sse").is_err());
    }
}
