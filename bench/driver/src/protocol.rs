//! Just enough of PostgreSQL's frontend/backend protocol (version 3) to run one prepared
//! statement over and over on a Unix socket, the way a client library does: Parse once, then
//! Bind (parameters in binary) / Execute / Sync per call, reading up to ReadyForQuery.
//!
//! Only trust authentication is spoken: the benchmark's throwaway cluster uses nothing else.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

const PROTOCOL_3_0: i32 = 196_608;
/// Name of the one prepared statement each connection holds.
const STATEMENT: &[u8] = b"s\0";

pub struct Connection {
    stream: UnixStream,
    /// Bytes read but not yet parsed into whole messages.
    inbox: Vec<u8>,
    /// The next request (Bind, Execute, Sync), built before it is sent.
    outbox: Vec<u8>,
    /// An error the server reported for the call in flight, returned once it is ready again, so
    /// the stream stays in step.
    error: Option<String>,
}

/// What reading from a connection found.
pub enum Progress {
    /// The call in flight has not been answered in full yet.
    Pending,
    /// The server answered the call in flight and is ready for the next one.
    Ready,
}

impl Connection {
    pub fn connect(socket: &Path, user: &str, database: &str) -> io::Result<Connection> {
        let stream = UnixStream::connect(socket)?;
        let mut conn =
            Connection { stream, inbox: Vec::with_capacity(8192), outbox: Vec::with_capacity(8192), error: None };
        let mut body = Vec::new();
        body.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
        for (key, value) in [("user", user), ("database", database), ("application_name", "wsusage-bench")] {
            put_cstr(&mut body, key.as_bytes());
            put_cstr(&mut body, value.as_bytes());
        }
        body.push(0);
        let mut startup = Vec::with_capacity(body.len() + 4);
        startup.extend_from_slice(&len_of(&body, 4).to_be_bytes());
        startup.extend_from_slice(&body);
        conn.stream.write_all(&startup)?;
        conn.wait_ready()?;
        Ok(conn)
    }

    pub fn prepare(&mut self, sql: &str, param_types: &[u32]) -> io::Result<()> {
        let mut body = Vec::new();
        body.extend_from_slice(STATEMENT);
        put_cstr(&mut body, sql.as_bytes());
        body.extend_from_slice(&count(param_types.len()).to_be_bytes());
        for oid in param_types {
            body.extend_from_slice(&oid.to_be_bytes());
        }
        self.outbox.clear();
        put_message(&mut self.outbox, b'P', &body);
        put_message(&mut self.outbox, b'S', &[]);
        self.stream.write_all(&self.outbox)?;
        self.wait_ready()
    }

    /// Send one call of the prepared statement with these parameters, each already encoded in
    /// PostgreSQL's binary format. Its answer is read by [`Connection::read_some`].
    pub fn send_call(&mut self, params: &[&[u8]]) -> io::Result<()> {
        let mut bind = Vec::with_capacity(64 + params.iter().map(|p| p.len() + 4).sum::<usize>());
        bind.push(0); // unnamed portal
        bind.extend_from_slice(STATEMENT);
        bind.extend_from_slice(&1i16.to_be_bytes()); // one format code for every parameter:
        bind.extend_from_slice(&1i16.to_be_bytes()); // binary
        bind.extend_from_slice(&count(params.len()).to_be_bytes());
        for param in params {
            bind.extend_from_slice(&len_of(param, 0).to_be_bytes());
            bind.extend_from_slice(param);
        }
        bind.extend_from_slice(&1i16.to_be_bytes()); // one format code for every result column:
        bind.extend_from_slice(&1i16.to_be_bytes()); // binary, as client libraries ask for known types
        self.outbox.clear();
        put_message(&mut self.outbox, b'B', &bind);
        let mut execute = vec![0u8]; // unnamed portal
        execute.extend_from_slice(&0i32.to_be_bytes()); // every row
        put_message(&mut self.outbox, b'E', &execute);
        put_message(&mut self.outbox, b'S', &[]);
        self.stream.write_all(&self.outbox)
    }

    /// Read what the server has sent (the caller knows from poll that something is there) and
    /// say whether the call in flight is complete. An error the server reports is returned.
    pub fn read_some(&mut self) -> io::Result<Progress> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            // A server refusing a connection sends its reason, then closes.
            let reason = self.error.take().unwrap_or_else(|| "the server closed the connection".into());
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, reason));
        }
        self.inbox.extend_from_slice(&chunk[..n]);
        self.take_messages()
    }

    /// Send one call and wait for its answer: a client that makes one call at a time.
    pub fn call(&mut self, params: &[&[u8]]) -> io::Result<()> {
        self.send_call(params)?;
        self.wait_ready()
    }

    /// End the session as a client library does (Terminate), so the backend exits at once.
    pub fn close(mut self) -> io::Result<()> {
        self.stream.write_all(&[b'X', 0, 0, 0, 4])
    }

    pub fn raw_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.stream.as_raw_fd()
    }

    fn wait_ready(&mut self) -> io::Result<()> {
        loop {
            if let Progress::Ready = self.read_some()? {
                return Ok(());
            }
        }
    }

    /// Consume every whole message in the inbox; Ready once ReadyForQuery is among them.
    fn take_messages(&mut self) -> io::Result<Progress> {
        let mut at = 0;
        let mut progress = Progress::Pending;
        while self.inbox.len() - at >= 5 {
            let kind = self.inbox[at];
            let len =
                i32::from_be_bytes([self.inbox[at + 1], self.inbox[at + 2], self.inbox[at + 3], self.inbox[at + 4]]);
            let len = usize::try_from(len).map_err(|_| bad_message("negative message length"))?;
            if len < 4 {
                return Err(bad_message("message length below 4"));
            }
            if self.inbox.len() - at < 1 + len {
                break;
            }
            let body = &self.inbox[at + 5..at + 1 + len];
            match kind {
                b'Z' => progress = Progress::Ready,
                b'E' => self.error = Some(error_text(body)),
                b'R' if body.get(..4) != Some(&[0, 0, 0, 0]) => {
                    return Err(io::Error::other(
                        "the server asks for a password: the benchmark's cluster must trust local connections",
                    ));
                }
                _ => {}
            }
            at += 1 + len;
        }
        self.inbox.drain(..at);
        match (progress, self.error.take()) {
            (Progress::Ready, Some(text)) => Err(io::Error::other(text)),
            (progress, error) => {
                self.error = error;
                Ok(progress)
            }
        }
    }
}

/// The human-readable parts of an ErrorResponse: SQLSTATE and message.
fn error_text(body: &[u8]) -> String {
    let mut code = "";
    let mut message = "";
    for field in body.split(|b| *b == 0) {
        match field.split_first() {
            Some((b'C', value)) => code = std::str::from_utf8(value).unwrap_or("?"),
            Some((b'M', value)) => message = std::str::from_utf8(value).unwrap_or("?"),
            _ => {}
        }
    }
    format!("server error {code}: {message}")
}

fn bad_message(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("malformed message from the server: {what}"))
}

fn put_message(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&len_of(body, 4).to_be_bytes());
    out.extend_from_slice(body);
}

fn put_cstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    out.push(0);
}

/// A length field: `bytes.len() + extra`, which every message here keeps far below 2 GiB.
fn len_of(bytes: &[u8], extra: usize) -> i32 {
    i32::try_from(bytes.len() + extra).expect("a benchmark message is far below 2 GiB")
}

fn count(n: usize) -> i16 {
    i16::try_from(n).expect("a benchmark statement has few parameters")
}
