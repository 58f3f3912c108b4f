//! The bench's receiving side: its subscribers' WebSockets, once open,
//! read by a few threads of their own over one epoll set each (mio), the
//! way load generators such as wrk read.
//!
//! The bench client shares the machine's cores with the servers it
//! measures, so every microsecond it spends per frame is a microsecond a
//! server waits for. A task per connection on an async runtime costs a
//! wake-up, a readiness check and a full WebSocket stack per frame; here a
//! thread takes every ready socket from one `epoll_wait`, reads each into
//! one reused buffer and parses the frames in place. Only what the bench
//! needs of the protocol is spoken: server frames (unmasked, possibly
//! fragmented) are read, pings are answered with pongs, a close or the
//! end of the stream ends the connection.
//!
//! Every message is handed on with two times: when the reader read it, and
//! when it reached the socket. The second is the kernel's receive
//! timestamp (`SO_TIMESTAMPNS`, Linux): it leaves out how long the frame
//! waited in the socket buffer for a reader thread to get a core, which on
//! a machine shared with the servers is the client's delay, not theirs.
//! The kernel turns stamping on for the whole system a moment after the
//! first socket asks; a read without a stamp counts its read time. The
//! bench waits half a second after starting the readers before it pushes.

use std::io::{ErrorKind, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, bail};
use mio::net::TcpStream as MioStream;
use mio::{Events, Interest, Poll, Token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest frame a subscriber accepts (a `batch` frame of many messages).
const MAX_FRAME: usize = 16 << 20;

/// How often a reader thread looks at its stop flag while nothing arrives.
const STOP_POLL: Duration = Duration::from_millis(20);

/// One WebSocket frame parsed from the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Frame<'a> {
    pub fin: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// The frame at the front of `buf` and the bytes it takes, or `None` while
/// it is incomplete. A masked frame (a server must not mask) or one over
/// `MAX_FRAME` is an error.
pub(crate) fn parse_frame(buf: &[u8]) -> anyhow::Result<Option<(Frame<'_>, usize)>> {
    let [b0, b1, rest @ ..] = buf else {
        return Ok(None);
    };
    if b1 & 0x80 != 0 {
        bail!("masked frame from the server");
    }
    let (len, header) = match b1 & 0x7f {
        126 => match rest {
            [a, b, ..] => (u64::from(u16::from_be_bytes([*a, *b])), 4),
            _ => return Ok(None),
        },
        127 => match rest.get(..8) {
            Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    if len > MAX_FRAME as u64 {
        bail!("frame of {len} bytes");
    }
    let end = header + len as usize;
    Ok(buf.get(header..end).map(|payload| {
        (
            Frame {
                fin: b0 & 0x80 != 0,
                opcode: b0 & 0x0f,
                payload,
            },
            end,
        )
    }))
}

/// A client frame (masked, as RFC 6455 requires of clients) of `opcode`.
pub(crate) fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    // The mask hides nothing from anyone on loopback; any key will do.
    let mask = [0x5a, 0x13, 0xc7, 0x2e];
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// When a message came, in nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Came {
    /// Read by the reader thread.
    pub read: u64,
    /// Reached the socket (the last of its bytes, by the kernel's receive
    /// timestamp); the read time where the kernel gives none.
    pub arrived: u64,
}

impl Came {
    /// Read at `read`; arrived when the kernel says, else then.
    fn at(read: u64, arrived: Option<u64>) -> Self {
        Came {
            read,
            arrived: arrived.unwrap_or(read),
        }
    }
}

/// A text message, whole, as it came off one connection.
pub(crate) trait OnText: Send + 'static {
    fn text(&mut self, text: &str, came: Came);
}

/// One open WebSocket, handshake done: the socket and whatever was read
/// past the handshake.
pub(crate) struct Open {
    pub stream: TcpStream,
    pub leftover: Vec<u8>,
}

/// Opens a WebSocket to `url` (`ws://host:port/path?query`) over `tcp`,
/// already connected. With `first_text`, waits for the server's first
/// text message too and returns it. Used before the pushes start; the
/// reader threads take over from there.
pub(crate) async fn open(
    mut tcp: tokio::net::TcpStream,
    url: &str,
    first_text: bool,
) -> anyhow::Result<(Open, Option<String>)> {
    let rest = url.strip_prefix("ws://").context("a ws:// URL")?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: YmFycmFnZSBiZW5jaCBrZXk=\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 << 10 || tcp.read_buf(&mut buf).await? == 0 {
            bail!("no upgrade response from {host}");
        }
    };
    let status = String::from_utf8_lossy(&buf[..head_end.min(64)]).into_owned();
    if !status.starts_with("HTTP/1.1 101") {
        bail!(
            "upgrade refused: {}",
            status.lines().next().unwrap_or_default()
        );
    }
    buf.drain(..head_end);
    let mut text = None;
    if first_text {
        loop {
            if let Some((f, used)) = parse_frame(&buf)? {
                if f.opcode == 1 {
                    text = Some(String::from_utf8_lossy(f.payload).into_owned());
                    buf.drain(..used);
                    break;
                }
                if f.opcode == 8 {
                    bail!("closed before the first message");
                }
                buf.drain(..used);
                continue;
            }
            if tcp.read_buf(&mut buf).await? == 0 {
                bail!("closed before the first message");
            }
        }
    }
    let stream = tcp.into_std()?;
    stream.set_nonblocking(true)?;
    Ok((
        Open {
            stream,
            leftover: buf,
        },
        text,
    ))
}

/// One connection inside a reader thread.
struct Conn<H> {
    stream: MioStream,
    /// Bytes of a frame not complete yet.
    partial: Vec<u8>,
    /// A fragmented text message being gathered.
    message: Vec<u8>,
    handler: H,
    closed: bool,
}

impl<H: OnText> Conn<H> {
    /// Reads whatever the socket has, handing every complete text message
    /// to the handler. Returns false once the connection is over.
    fn read(&mut self, scratch: &mut [u8], now: &impl Fn() -> u64) -> bool {
        loop {
            match recv(&mut self.stream, scratch) {
                Ok((0, _)) => return false,
                Ok((n, arrived)) => {
                    let came = Came::at(now(), arrived);
                    let mut rest = Vec::new();
                    let ok = if self.partial.is_empty() {
                        // The usual case: whole frames, parsed where they were read.
                        self.frames(&scratch[..n], came, &mut rest)
                    } else {
                        let mut input = std::mem::take(&mut self.partial);
                        input.extend_from_slice(&scratch[..n]);
                        self.frames(&input, came, &mut rest)
                    };
                    self.partial = rest;
                    if !ok {
                        return false;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }

    /// Handles the complete frames of `input`; an incomplete tail goes to
    /// `rest`. Returns false on a close or a protocol error.
    fn frames(&mut self, mut input: &[u8], came: Came, rest: &mut Vec<u8>) -> bool {
        loop {
            let (f, used) = match parse_frame(input) {
                Ok(Some(x)) => x,
                Ok(None) => {
                    rest.extend_from_slice(input);
                    return true;
                }
                Err(_) => return false,
            };
            match f.opcode {
                1 if f.fin => self.text(f.payload, came),
                1 | 0 => {
                    self.message.extend_from_slice(f.payload);
                    if f.fin && f.opcode == 0 {
                        let m = std::mem::take(&mut self.message);
                        self.text(&m, came);
                    }
                }
                8 => return false,
                9 => {
                    // A pong of a few bytes fits any socket buffer; one that
                    // does not is dropped and the server's read deadline
                    // says so.
                    let _ = self.stream.write(&client_frame(10, f.payload));
                }
                _ => {}
            }
            input = &input[used..];
        }
    }

    fn text(&mut self, payload: &[u8], came: Came) {
        if let Ok(s) = std::str::from_utf8(payload) {
            self.handler.text(s, came);
        }
    }
}

/// Reader threads over the bench's open connections.
pub(crate) struct Readers<H> {
    threads: Vec<JoinHandle<std::io::Result<Vec<H>>>>,
    stop: Arc<AtomicBool>,
}

impl<H: OnText> Readers<H> {
    /// Starts `threads` readers at niceness `nice` and spreads `conns`
    /// over them. Each connection's leftover bytes are handled first.
    pub(crate) fn start(
        conns: Vec<(Open, H)>,
        threads: usize,
        nice: u8,
        now: fn() -> u64,
    ) -> anyhow::Result<Self> {
        let threads = threads.max(1);
        let stop = Arc::new(AtomicBool::new(false));
        let mut shares: Vec<Vec<(Open, H)>> = (0..threads).map(|_| Vec::new()).collect();
        for (i, c) in conns.into_iter().enumerate() {
            shares[i % threads].push(c);
        }
        let mut handles = Vec::with_capacity(threads);
        for (n, share) in shares.into_iter().enumerate() {
            let stop = stop.clone();
            let poll = Poll::new()?;
            let mut conns = Vec::with_capacity(share.len());
            for (i, (open, handler)) in share.into_iter().enumerate() {
                stamp_arrivals(&open.stream)?;
                let mut stream = MioStream::from_std(open.stream);
                poll.registry()
                    .register(&mut stream, Token(i), Interest::READABLE)?;
                let mut c = Conn {
                    stream,
                    partial: Vec::new(),
                    message: Vec::new(),
                    handler,
                    closed: false,
                };
                let mut rest = Vec::new();
                c.closed = !c.frames(&open.leftover, Came::at(now(), None), &mut rest);
                c.partial = rest;
                conns.push(c);
            }
            handles.push(
                std::thread::Builder::new()
                    .name(format!("bench-reader-{n}"))
                    .spawn(move || run(poll, conns, &stop, now, nice))?,
            );
        }
        Ok(Readers {
            threads: handles,
            stop,
        })
    }

    /// Stops the readers and returns every connection's handler.
    pub(crate) fn stop(self) -> anyhow::Result<Vec<H>> {
        self.stop.store(true, Ordering::Release);
        let mut out = Vec::new();
        for t in self.threads {
            let handlers = t
                .join()
                .map_err(|_| anyhow::anyhow!("a bench reader thread panicked"))??;
            out.extend(handlers);
        }
        Ok(out)
    }
}

/// Asks the kernel to timestamp what `stream` receives.
#[cfg(target_os = "linux")]
fn stamp_arrivals(stream: &TcpStream) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(stream, nix::sys::socket::sockopt::ReceiveTimestampns, &true)
        .map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn stamp_arrivals(_: &TcpStream) -> std::io::Result<()> {
    Ok(())
}

/// One read: the bytes, and the kernel's receive timestamp of the last of
/// them (nanoseconds since the Unix epoch) when it gives one.
#[cfg(target_os = "linux")]
fn recv(stream: &mut MioStream, buf: &mut [u8]) -> std::io::Result<(usize, Option<u64>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::AsRawFd;
    let mut cmsgs = [0u8; 64];
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsgs),
        MsgFlags::empty(),
    )
    .map_err(std::io::Error::from)?;
    let arrived = msg.cmsgs().ok().and_then(|mut all| {
        all.find_map(|c| match c {
            ControlMessageOwned::ScmTimestampns(t) => {
                Some(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
            }
            _ => None,
        })
    });
    Ok((msg.bytes, arrived))
}

#[cfg(not(target_os = "linux"))]
fn recv(stream: &mut MioStream, buf: &mut [u8]) -> std::io::Result<(usize, Option<u64>)> {
    Ok((std::io::Read::read(stream, buf)?, None))
}

/// Sets the calling thread's niceness (on Linux `setpriority` with no
/// pid applies to the calling thread alone).
#[cfg(target_os = "linux")]
fn yield_cores(nice: u8) -> std::io::Result<()> {
    if nice == 0 {
        return Ok(());
    }
    rustix::process::setpriority_process(None, i32::from(nice)).map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn yield_cores(_: u8) -> std::io::Result<()> {
    Ok(())
}

fn run<H: OnText>(
    mut poll: Poll,
    mut conns: Vec<Conn<H>>,
    stop: &AtomicBool,
    now: fn() -> u64,
    nice: u8,
) -> std::io::Result<Vec<H>> {
    yield_cores(nice)?;
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Acquire) {
        match poll.poll(&mut events, Some(STOP_POLL)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in &events {
            if let Some(c) = conns.get_mut(ev.token().0)
                && !c.closed
                && !c.read(&mut scratch, &now)
            {
                c.closed = true;
                let _ = poll.registry().deregister(&mut c.stream);
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }
    Ok(conns.into_iter().map(|c| c.handler).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![u8::from(fin) << 7 | opcode];
        match payload.len() {
            n @ 0..=125 => out.push(n as u8),
            n @ 126..=0xffff => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn parses_each_length_form_and_waits_for_the_rest() {
        for len in [0, 5, 125, 126, 300, 70_000] {
            let payload = vec![b'a'; len];
            let wire = server_frame(true, 1, &payload);
            let (f, used) = parse_frame(&wire).unwrap().unwrap();
            assert_eq!(
                (f.fin, f.opcode, f.payload.len(), used),
                (true, 1, len, wire.len())
            );
            for cut in [1, wire.len() - 1] {
                if cut < wire.len() {
                    assert!(
                        parse_frame(&wire[..cut]).unwrap().is_none(),
                        "len {len} cut {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn refuses_masked_and_oversized_frames() {
        assert!(parse_frame(&[0x81, 0x81, 1, 2, 3, 4, 0]).is_err());
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(MAX_FRAME as u64 + 1).to_be_bytes());
        assert!(parse_frame(&huge).is_err());
    }

    #[test]
    fn client_frames_are_masked_and_unmask_to_the_payload() {
        for len in [0usize, 3, 200, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let f = client_frame(10, &payload);
            assert_eq!(f[0], 0x8a);
            assert_eq!(f[1] & 0x80, 0x80, "masked");
            let (hdr, key) = match f[1] & 0x7f {
                126 => (8, &f[4..8]),
                127 => (14, &f[10..14]),
                _ => (6, &f[2..6]),
            };
            let unmasked: Vec<u8> = f[hdr..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            assert_eq!(unmasked, payload);
        }
    }

    struct Texts(std::sync::mpsc::Sender<(String, Came)>);
    impl OnText for Texts {
        fn text(&mut self, text: &str, came: Came) {
            let _ = self.0.send((text.to_owned(), came));
        }
    }

    /// A connected loopback pair: (client, server), both blocking.
    fn pair() -> (TcpStream, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    /// Returns once the kernel stamps what sockets receive, and a socket
    /// pair that keeps it doing so while it lives. The kernel turns
    /// stamping on for the whole system a moment after the first socket
    /// asks for it; reads before that carry no timestamp.
    #[cfg(target_os = "linux")]
    fn receive_timestamps_on() -> (TcpStream, MioStream) {
        let (mut tx, rx) = pair();
        stamp_arrivals(&rx).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rx = MioStream::from_std(rx);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            tx.write_all(b"x").unwrap();
            let (n, stamp) = recv(&mut rx, &mut [0u8; 16]).unwrap();
            assert_eq!(n, 1);
            if stamp.is_some() {
                return (tx, rx);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the kernel never stamped a received byte"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn receive_timestamps_on() {}

    /// Against a real loopback socket: frames split anywhere, fragmented
    /// messages, a ping answered with a pong, and a close that ends the
    /// connection (nothing after it is read, the socket is shut).
    #[test]
    fn reads_split_and_fragmented_frames_answers_pings_and_stops_at_close() {
        let _stamping = receive_timestamps_on();
        let (client, mut server) = pair();
        server
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client.set_nonblocking(true).unwrap();
        let mut wire = server_frame(true, 1, b"second");
        wire.extend(server_frame(true, 9, b"hi"));
        wire.extend(server_frame(false, 1, b"thi"));
        wire.extend(server_frame(true, 2, b"binary, skipped"));
        wire.extend(server_frame(true, 0, b"rd"));
        let big = "x".repeat(100_000);
        wire.extend(server_frame(true, 1, big.as_bytes()));
        wire.extend(server_frame(true, 8, &[0x03, 0xe8]));
        wire.extend(server_frame(true, 1, b"after close, never read"));
        let leftover = server_frame(true, 1, b"first");
        let (tx, rx) = std::sync::mpsc::channel();
        let readers = Readers::start(
            vec![(
                Open {
                    stream: client,
                    leftover,
                },
                Texts(tx),
            )],
            1,
            0,
            || 0,
        )
        .unwrap();
        for chunk in wire.chunks(7) {
            server.write_all(chunk).unwrap();
        }
        let mut pong = [0u8; 8];
        server.read_exact(&mut pong).unwrap();
        assert_eq!(pong[0], 0x8a);
        let key = &pong[2..6];
        assert_eq!([pong[6] ^ key[0], pong[7] ^ key[1]], *b"hi");
        // The close shuts the socket: the server reads its end.
        let mut more = [0u8; 16];
        assert_eq!(
            server.read(&mut more).unwrap(),
            0,
            "socket shut after the close"
        );
        let (texts, came): (Vec<String>, Vec<Came>) = rx.try_iter().unzip();
        assert_eq!(
            texts,
            vec!["first".to_owned(), "second".into(), "third".into(), big]
        );
        // The reader's clock here always says 0; what came off the socket
        // carries the kernel's receive time, the leftover its read time.
        assert_eq!(
            came[0],
            Came {
                read: 0,
                arrived: 0
            }
        );
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        for c in &came[1..] {
            assert_eq!(c.read, 0);
            if cfg!(target_os = "linux") {
                assert!(
                    c.arrived > wall - 60_000_000_000 && c.arrived <= wall,
                    "kernel receive time {} not within the last minute of {wall}",
                    c.arrived
                );
            }
        }
        readers.stop().unwrap();
    }

    /// The readers run at the niceness they were started with.
    #[cfg(target_os = "linux")]
    #[test]
    fn readers_run_at_the_niceness_asked_for() {
        let (client, mut server) = pair();
        client.set_nonblocking(true).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let open = Open {
            stream: client,
            leftover: Vec::new(),
        };
        let readers = Readers::start(vec![(open, Texts(tx))], 1, 7, || 0).unwrap();
        // Once a frame has been read the thread is past setting its niceness.
        server.write_all(&server_frame(true, 1, b"hello")).unwrap();
        let (text, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(text, "hello");
        // Field 19 of a thread's stat, counted from the state after the
        // command name's closing parenthesis, is its niceness.
        let nice_of = |dir: &std::path::Path| -> Option<i32> {
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            let after = &stat[stat.rfind(')')? + 2..];
            after.split(' ').nth(16)?.parse().ok()
        };
        // Other tests' readers (at 0) may be running beside this one.
        let readers_nice: Vec<i32> = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| {
                let dir = t.ok()?.path();
                let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
                (comm.trim() == "bench-reader-0").then(|| nice_of(&dir))?
            })
            .collect();
        assert!(readers_nice.contains(&7), "{readers_nice:?}");
        // Only the reader's own thread: the rest of the process keeps its
        // priority.
        assert_eq!(nice_of(std::path::Path::new("/proc/thread-self")), Some(0));
        readers.stop().unwrap();
    }
}
