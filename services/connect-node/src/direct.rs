//! Frames written to a connection's socket by the fan-out itself.
//!
//! A frame for a connection normally goes into its send queue, and the
//! connection's task is woken to write it. For a frame that finds the
//! queue empty and the socket idle, that hand-over is work on top of the
//! write: waking the task, its trip through the runtime's run queue, and
//! polling it (in a room fan-out, about half of a node's user-space CPU;
//! BENCHMARKS.md). So when the connection's task has nothing left to
//! write, it
//! *opens the way* ([`Way`]): the next frame is written to the socket at
//! once by whoever fans it out, with one `writev` of its header and its
//! shared payload, and the task is not woken at all.
//!
//! The way closes again whenever something else must write: the task's
//! own writes (pings, replies it queued, the close frame, pongs the
//! WebSocket library sends while reading) close it before their first
//! byte, and a socket that does not take a whole frame closes it too
//! (the frame is then queued, or its unwritten end is kept for the task to
//! write before anything else). All of this happens under one lock per
//! connection, so frames keep their order and never interleave.
//!
//! Only plain TCP connections have a way; TLS connections (and the
//! SSE/long-poll fallback) always use the queue. Under load a node queues
//! fan-outs beyond a user's few connections even to open ways, since the
//! task then writes all its waiting frames with one flush (`Hub::deliver`).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A data frame this large or larger is never written directly: it goes
/// through the queue (and is sent in fragments, see `upgrade::fragments`).
pub const MAX_DIRECT: usize = crate::upgrade::FRAGMENT;

/// The shared side of one plain-TCP connection: its socket, and whether
/// the fan-out may write to it now.
#[derive(Debug)]
pub struct Way {
    sock: TcpStream,
    state: Mutex<WayState>,
}

#[derive(Debug, Default)]
struct WayState {
    /// The task has nothing buffered or queued: a frame may be written now.
    open: bool,
    /// The task's writer has bytes out that are not yet flushed.
    dirty: bool,
    /// The unwritten end of a frame the socket took only part of; written
    /// by the task before anything else.
    rest: Option<Bytes>,
}

/// What [`Way::send_or_queue`] did with a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent<R> {
    /// Written to the socket whole.
    Written,
    /// Written in part; the task must be woken to write the rest.
    Partly,
    /// Not written: `queue` ran, and this is what it returned.
    Queued(R),
}

/// The kind of a data frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data {
    /// A text frame (JSON connections).
    Text,
    /// A binary frame (`barrage.v1.bin` connections).
    Binary,
}

/// The header of an unmasked, final data frame of `len` payload bytes
/// (RFC 6455 §5.2), and how many of its bytes are used.
fn header(data: Data, len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80
        | match data {
            Data::Text => 0x1,
            Data::Binary => 0x2,
        };
    let used = if len < 126 {
        h[1] = len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        h[1] = 126;
        h[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (h, used)
}

impl Way {
    /// A way over `sock`, closed until the connection's task opens it.
    pub fn new(sock: TcpStream) -> Self {
        Way {
            sock,
            state: Mutex::new(WayState::default()),
        }
    }

    /// Writes `payload` as one data frame when the way is open and the
    /// socket takes at least part of it; otherwise runs `queue` (under the
    /// same lock, so frames keep their order) and returns what it did.
    pub fn send_or_queue<R>(
        &self,
        data: Data,
        payload: &[u8],
        queue: impl FnOnce() -> R,
    ) -> Sent<R> {
        let mut st = self.state.lock();
        if st.open && payload.len() < MAX_DIRECT {
            let (h, used) = header(data, payload.len());
            let head = &h[..used];
            let total = used + payload.len();
            let written = self
                .sock
                .try_write_vectored(&[IoSlice::new(head), IoSlice::new(payload)]);
            match written {
                Ok(n) if n >= total => return Sent::Written,
                Ok(n) if n > 0 => {
                    // The frame is started on the wire: its end must follow
                    // before any other byte, whatever the queue holds.
                    let mut rest = Vec::with_capacity(total - n);
                    if n < used {
                        rest.extend_from_slice(&head[n..]);
                        rest.extend_from_slice(payload);
                    } else {
                        rest.extend_from_slice(&payload[n - used..]);
                    }
                    st.open = false;
                    st.rest = Some(Bytes::from(rest));
                    return Sent::Partly;
                }
                // Nothing written (a full socket buffer, or an error the
                // task will meet on its own write): the task takes over.
                _ => {}
            }
        }
        // Closed first: nothing may overtake what is queued.
        st.open = false;
        Sent::Queued(queue())
    }

    /// Runs `queue` with the way closed, so no frame written directly can
    /// overtake what it queues.
    pub fn queue<R>(&self, queue: impl FnOnce() -> R) -> R {
        let mut st = self.state.lock();
        st.open = false;
        queue()
    }

    /// Called by the connection's task when it has nothing to write:
    /// opens the way if its writer is flushed, no partial frame is left
    /// and `idle` (checked under the lock) confirms nothing is queued.
    /// Returns true when the unwritten end of a frame is waiting instead;
    /// the task then flushes its socket, which writes it.
    pub fn open_if(&self, idle: impl FnOnce() -> bool) -> bool {
        let mut st = self.state.lock();
        if st.rest.is_some() {
            return true;
        }
        if !st.dirty && idle() {
            st.open = true;
        }
        false
    }

    /// Whether the fan-out may write now.
    #[cfg(test)]
    fn is_open(&self) -> bool {
        self.state.lock().open
    }

    /// Closes the way for a write of the task's own, marks its writer
    /// busy, and hands over what is left of a partly written frame.
    fn claim(&self) -> Option<Bytes> {
        let mut st = self.state.lock();
        st.open = false;
        st.dirty = true;
        st.rest.take()
    }

    /// The task's writer has flushed everything it had.
    fn flushed(&self) {
        self.state.lock().dirty = false;
    }
}

/// The byte stream under a connection's WebSocket.
pub enum Io {
    /// Plain TCP, shared with the fan-out through its [`Way`].
    Direct(DirectIo),
    /// Anything else (TLS): only the connection's task writes.
    Upgraded(TokioIo<Upgraded>),
}

impl Io {
    /// The stream of an upgraded HTTP connection, and a copy of the bytes
    /// the HTTP server had already read past the request (a copy: the
    /// server's `Bytes` would keep its whole read buffer alive for as long
    /// as the connection lives). Plain TCP gets a way when `direct` is set.
    pub fn new(upgraded: Upgraded, direct: bool) -> (Self, Vec<u8>) {
        if !direct {
            return (Io::Upgraded(TokioIo::new(upgraded)), Vec::new());
        }
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let way = Arc::new(Way::new(parts.io.into_inner()));
                (Io::Direct(DirectIo::new(way)), parts.read_buf.to_vec())
            }
            Err(upgraded) => (Io::Upgraded(TokioIo::new(upgraded)), Vec::new()),
        }
    }

    /// The way of a plain TCP connection.
    pub fn way(&self) -> Option<&Arc<Way>> {
        match self {
            Io::Direct(d) => Some(&d.way),
            Io::Upgraded(_) => None,
        }
    }
}

/// The task's side of a [`Way`]: every write first closes the way and
/// writes any partial frame's end.
pub struct DirectIo {
    way: Arc<Way>,
    /// What is left of a partly written frame, being written.
    pending: Bytes,
}

impl DirectIo {
    /// The task's side of `way`.
    pub fn new(way: Arc<Way>) -> Self {
        DirectIo {
            way,
            pending: Bytes::new(),
        }
    }

    /// Closes the way and writes the end of a partly written frame.
    fn poll_claim(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.pending.is_empty()
            && let Some(rest) = self.way.claim()
        {
            self.pending = rest;
        }
        while !self.pending.is_empty() {
            let n = ready!(poll_write_to(&self.way.sock, cx, &self.pending))?;
            self.pending.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

fn poll_write_to(sock: &TcpStream, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    loop {
        ready!(sock.poll_write_ready(cx))?;
        match sock.try_write(buf) {
            Ok(0) if !buf.is_empty() => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Upgraded(io) => Pin::new(io).poll_read(cx, buf),
            Io::Direct(d) => loop {
                ready!(d.way.sock.poll_read_ready(cx))?;
                match d.way.sock.try_read(buf.initialize_unfilled()) {
                    Ok(n) => {
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            },
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Upgraded(io) => Pin::new(io).poll_write(cx, buf),
            Io::Direct(d) => {
                ready!(d.poll_claim(cx))?;
                poll_write_to(&d.way.sock, cx, buf)
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Upgraded(io) => Pin::new(io).poll_flush(cx),
            Io::Direct(d) => {
                ready!(d.poll_claim(cx))?;
                // TCP has no buffer of its own to flush: what the writer
                // handed over is in the kernel.
                d.way.flushed();
                Poll::Ready(Ok(()))
            }
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Upgraded(io) => Pin::new(io).poll_shutdown(cx),
            Io::Direct(d) => {
                ready!(d.poll_claim(cx))?;
                Poll::Ready(socket2::SockRef::from(&d.way.sock).shutdown(std::net::Shutdown::Write))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    const T: Duration = Duration::from_secs(10);

    /// A connected loopback pair with small buffers, so the server's
    /// socket stops taking frames soon when the client does not read.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::time::timeout(T, async {
            tokio::join!(TcpStream::connect(addr), listener.accept())
        })
        .await
        .expect("connect in time");
        let (client, (server, _)) = (client.expect("connect"), accepted.expect("accept"));
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .expect("sndbuf");
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(4096)
            .expect("rcvbuf");
        (server, client)
    }

    /// Frame `i` of a run of frames `len` bytes long.
    fn payload(i: usize, len: usize) -> Vec<u8> {
        format!("{i:06}").into_bytes().repeat(len / 6)
    }

    /// Offers frames of `len` bytes to a client that does not read until
    /// the socket stops taking whole ones. Returns how many went out (in
    /// whole or in part) and whether the last went in part.
    fn fill(way: &Way, len: usize) -> (usize, bool) {
        let mut written = 0;
        for i in 0..10_000 {
            match way.send_or_queue(Data::Text, &payload(i, len), || ()) {
                Sent::Written => written += 1,
                Sent::Partly => return (written + 1, true),
                Sent::Queued(()) => return (written, false),
            }
        }
        panic!("the socket took 10,000 frames from a client that does not read");
    }

    #[tokio::test]
    async fn frames_stay_whole_and_in_order_when_the_socket_takes_part_of_one() {
        // Whether a write ends in part depends on how the kernel accounts
        // its buffers: a few frame sizes, until one does.
        for len in [3_000, 1_000, 7_000, 300] {
            if partly_written_frame_is_finished_first(len).await {
                return;
            }
        }
        panic!("no frame size made the socket take part of a frame");
    }

    /// False when the socket took no part of a frame at this size.
    async fn partly_written_frame_is_finished_first(len: usize) -> bool {
        let (server, client) = pair().await;
        let way = Arc::new(Way::new(server));
        let mut io = Io::Direct(DirectIo::new(way.clone()));
        assert!(!way.is_open(), "closed until the task opens it");
        assert!(!way.open_if(|| true), "nothing partly written yet");
        assert!(way.is_open());

        let (written, partly) = fill(&way, len);
        assert!(
            !way.is_open(),
            "a socket that takes no whole frame closes the way"
        );
        if !partly {
            return false;
        }
        // While the end is unwritten, frames are queued, not written...
        assert_eq!(
            way.send_or_queue(Data::Text, b"late", || 7),
            Sent::Queued(7)
        );
        // ...and the task is told to flush it out before opening again.
        assert!(way.open_if(|| true));
        assert!(!way.is_open());

        let reader = tokio::spawn(async move {
            let mut ws = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
            let mut got = Vec::new();
            while let Some(m) = ws.next().await {
                let m = m.expect("a well-formed frame");
                let text = m.into_text().expect("text");
                if text.as_str() == "tail" {
                    break;
                }
                got.push(text.as_bytes().to_vec());
            }
            got
        });
        // The task's own write: its flush first writes the frame's end.
        tokio::time::timeout(T, async {
            io.flush().await.expect("flush");
            let (h, n) = header(Data::Text, 4);
            io.write_all(&h[..n]).await.expect("header");
            io.write_all(b"tail").await.expect("tail");
            io.flush().await.expect("flush");
        })
        .await
        .expect("written in time");
        let got = tokio::time::timeout(T, reader)
            .await
            .expect("read in time")
            .expect("reader");
        assert_eq!(got.len(), written);
        for (i, frame) in got.iter().enumerate() {
            assert!(
                *frame == payload(i, len),
                "frame {i} arrived whole and in order"
            );
        }
        // Flushed and nothing queued: the way opens again.
        assert!(!way.open_if(|| true));
        assert!(way.is_open());
        // A write of the task's own closes it first.
        tokio::time::timeout(T, io.write_all(b"x"))
            .await
            .expect("in time")
            .expect("write");
        assert!(!way.is_open());
        true
    }

    #[tokio::test]
    async fn the_way_opens_only_when_idle_and_queueing_closes_it() {
        let (server, _client) = pair().await;
        let way = Way::new(server);
        assert!(!way.open_if(|| false), "something queued: stays closed");
        assert!(!way.is_open());
        assert!(!way.open_if(|| true));
        assert!(way.is_open());
        assert_eq!(way.send_or_queue(Data::Binary, b"x", || ()), Sent::Written);
        assert!(way.is_open(), "a whole write leaves it open");
        // A frame too large for one direct write is queued.
        let large = vec![0u8; MAX_DIRECT];
        assert_eq!(
            way.send_or_queue(Data::Binary, &large, || 1),
            Sent::Queued(1)
        );
        assert!(!way.is_open(), "what is queued must not be overtaken");
        assert!(!way.open_if(|| true));
        assert_eq!(way.queue(|| 2), 2);
        assert!(!way.is_open(), "queueing closes the way");
    }

    #[test]
    fn headers_follow_rfc_6455_length_forms() {
        let (h, n) = header(Data::Text, 5);
        assert_eq!(&h[..n], &[0x81, 5]);
        let (h, n) = header(Data::Binary, 125);
        assert_eq!(&h[..n], &[0x82, 125]);
        let (h, n) = header(Data::Text, 126);
        assert_eq!(&h[..n], &[0x81, 126, 0, 126]);
        let (h, n) = header(Data::Binary, 65_535);
        assert_eq!(&h[..n], &[0x82, 126, 0xff, 0xff]);
        let (h, n) = header(Data::Text, 65_536);
        assert_eq!(&h[..n], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }
}
