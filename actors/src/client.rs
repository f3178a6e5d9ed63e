//! A small HTTP/1.1 client for the daemon's endpoint, over TCP or TLS (rustls): one request per
//! connection, a deadline on every wait, and errors that say what went wrong in the operator's
//! terms (nothing listening, TLS failure, the daemon closed the connection) rather than the
//! socket's. `uamt ctl` is built on it.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

/// How long a connection and each read or write may take.
pub const TIMEOUT: Duration = Duration::from_secs(20);
/// The largest answer read.
const MAX_ANSWER: usize = 16 << 20;

/// Where the daemon is and how to talk to it.
#[derive(Clone)]
pub struct Endpoint {
    /// `host:port` as given (the host is what the certificate is checked against).
    pub addr: String,
    /// TLS settings (HTTPS), or `None` for plain HTTP.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The `Authorization` header value to send, if any.
    pub authorization: Option<String>,
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not `host:port`, or the host does not resolve.
    #[error("{addr}: {why}")]
    Address {
        /// As given.
        addr: String,
        /// Why it is unusable.
        why: String,
    },
    /// Nothing listens there (connection refused): the daemon is not running, or on another port.
    #[error(
        "no daemon answers at {addr}: connection refused (is it running, and is this its telemetry.listen address?)"
    )]
    Refused {
        /// As given.
        addr: String,
    },
    /// The connection could not be made or broke.
    #[error("{addr}: {what}: {source}")]
    Io {
        /// As given.
        addr: String,
        /// What was being done.
        what: &'static str,
        /// The socket error.
        source: std::io::Error,
    },
    /// The TLS handshake failed or the TLS stream broke.
    #[error("{addr}: TLS failure: {why}")]
    Tls {
        /// As given.
        addr: String,
        /// The TLS error and a hint.
        why: String,
    },
    /// The daemon closed the connection without an HTTP answer.
    #[error("{addr}: the connection was closed without an answer{hint}")]
    NoAnswer {
        /// As given.
        addr: String,
        /// A hint at the likely cause.
        hint: &'static str,
    },
    /// Something answered, but not in HTTP/1.1.
    #[error("{addr}: not an HTTP answer: {why}")]
    NotHttp {
        /// As given.
        addr: String,
        /// What was wrong.
        why: String,
    },
}

/// An answer: the status code and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The HTTP status code.
    pub status: u16,
    /// The body as text.
    pub body: String,
}

/// A stream of either kind.
trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

impl Endpoint {
    /// Sends `method path` (no body) and returns the answer.
    pub fn request(&self, method: &str, path: &str) -> Result<Answer, ClientError> {
        let addr = self.addr.clone();
        let io = |what, source| ClientError::Io { addr: addr.clone(), what, source };
        let (host, sock) = self.resolve()?;
        let tcp = TcpStream::connect_timeout(&sock, TIMEOUT).map_err(|e| match e.kind() {
            ErrorKind::ConnectionRefused => ClientError::Refused { addr: addr.clone() },
            _ => io("connecting", e),
        })?;
        tcp.set_read_timeout(Some(TIMEOUT)).map_err(|e| io("connecting", e))?;
        tcp.set_write_timeout(Some(TIMEOUT)).map_err(|e| io("connecting", e))?;
        let mut stream: Box<dyn Stream> = match &self.tls {
            None => Box::new(tcp),
            Some(config) => {
                let name =
                    crate::tls::server_name(&host).map_err(|why| ClientError::Address { addr: addr.clone(), why })?;
                let conn = rustls::ClientConnection::new(config.clone(), name)
                    .map_err(|e| ClientError::Tls { addr: addr.clone(), why: e.to_string() })?;
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                // The handshake now, so that its failure is reported as one.
                while tls.conn.is_handshaking() {
                    tls.conn.complete_io(&mut tls.sock).map_err(|e| self.tls_error(e))?;
                }
                Box::new(tls)
            }
        };
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: uamt-ctl\r\n", self.addr);
        if let Some(a) = &self.authorization {
            head.push_str(&format!("Authorization: {a}\r\n"));
        }
        if method != "GET" {
            head.push_str("Content-Length: 0\r\n");
        }
        head.push_str("Connection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).and_then(|_| stream.flush()).map_err(|e| self.broken("sending", e))?;
        self.read_answer(&mut *stream)
    }

    /// The host part of the address and the first socket address it resolves to.
    fn resolve(&self) -> Result<(String, SocketAddr), ClientError> {
        let bad = |why: String| ClientError::Address { addr: self.addr.clone(), why };
        let (host, port) = self.addr.rsplit_once(':').ok_or_else(|| bad("not HOST:PORT".into()))?;
        port.parse::<u16>().map_err(|_| bad(format!("`{port}` is not a port")))?;
        let sock = self
            .addr
            .to_socket_addrs()
            .map_err(|e| bad(format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| bad("resolves to no address".into()))?;
        Ok((host.to_string(), sock))
    }

    /// A TLS error during the handshake, in words.
    fn tls_error(&self, e: std::io::Error) -> ClientError {
        let hint = match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::InvalidCertificate(c)) if format!("{c:?}").contains("CaUsedAsEndEntity") => {
                " (the daemon's certificate is a CA certificate, as `openssl req -x509` makes by default: make it \
                 with -addext basicConstraints=critical,CA:FALSE, or sign it with a CA and give that CA)"
            }
            Some(rustls::Error::InvalidCertificate(_)) => {
                " (the daemon's certificate is not signed by --cacert, or not for this host name or address)"
            }
            Some(rustls::Error::InvalidMessage(_)) => {
                " (does the daemon speak TLS on this port? drop --cacert for plain HTTP)"
            }
            _ if e.kind() == ErrorKind::UnexpectedEof => " (the daemon closed the connection during the handshake)",
            _ => "",
        };
        ClientError::Tls { addr: self.addr.clone(), why: format!("{e}{hint}") }
    }

    /// A broken stream while `what`.
    fn broken(&self, what: &'static str, e: std::io::Error) -> ClientError {
        if self.tls.is_some() && e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
            return self.tls_error(e);
        }
        ClientError::Io { addr: self.addr.clone(), what, source: e }
    }

    /// Reads the status line, the headers and the body (by `Content-Length`, chunks, or up to
    /// the end of the connection).
    fn read_answer(&self, stream: &mut dyn Read) -> Result<Answer, ClientError> {
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        let head_end = loop {
            if let Some(at) = find(&raw, b"\r\n\r\n") {
                break at;
            }
            match stream.read(&mut buf) {
                Ok(0) => return Err(self.closed(&raw)),
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_reset(&e) => return Err(self.closed(&raw)),
                Err(e) => return Err(self.broken("reading the answer", e)),
            }
            if raw.len() > MAX_ANSWER {
                return Err(self.not_http("the header never ends"));
            }
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
            return Err(self.not_http(&format!("status line `{}`", status_line.escape_debug())));
        }
        let status = parts
            .next()
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| self.not_http(&format!("status line `{}`", status_line.escape_debug())))?;
        let mut length = None;
        let mut chunked = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else { continue };
            let (name, value) = (name.trim(), value.trim());
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().map_err(|_| self.not_http("a bad Content-Length"))?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") && value.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
        let mut body = raw.split_off(head_end + 4);
        let complete = |b: &[u8]| match (chunked, length) {
            (true, _) => dechunk(b).is_some(),
            (false, Some(n)) => b.len() >= n,
            (false, None) => false,
        };
        while !complete(&body) {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => body.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // A peer that closes without TLS's close_notify after a body read to the end.
                Err(e) if length.is_none() && !chunked && e.kind() == ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(self.broken("reading the answer", e)),
            }
            if body.len() > MAX_ANSWER {
                return Err(self.not_http("the answer is too large"));
            }
        }
        let body = match (chunked, length) {
            (true, _) => dechunk(&body).ok_or_else(|| self.not_http("the chunked body ends early"))?,
            (false, Some(n)) if body.len() < n => return Err(self.not_http("the body ends early")),
            (false, Some(n)) => body[..n].to_vec(),
            (false, None) => body,
        };
        Ok(Answer { status, body: String::from_utf8_lossy(&body).into_owned() })
    }

    /// The connection closed before a whole header came: a hint at why.
    fn closed(&self, raw: &[u8]) -> ClientError {
        if !raw.is_empty() && self.tls.is_none() && raw[0] == 0x15 {
            // A TLS alert record: the daemon speaks TLS on this port.
            return ClientError::NoAnswer {
                addr: self.addr.clone(),
                hint: " (the daemon speaks HTTPS on this port: give --cacert with the CA of its certificate)",
            };
        }
        let hint = if self.tls.is_none() {
            " (if the daemon serves HTTPS, give --cacert with the CA of its certificate)"
        } else {
            ""
        };
        ClientError::NoAnswer { addr: self.addr.clone(), hint }
    }

    fn not_http(&self, why: &str) -> ClientError {
        ClientError::NotHttp { addr: self.addr.clone(), why: why.to_string() }
    }
}

/// Whether `e` is the peer resetting or closing the connection.
fn is_reset(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::UnexpectedEof)
}

/// Where `needle` starts in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The body of a complete chunked encoding, or `None` while it is incomplete or malformed.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(b, b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(addr: &str) -> Endpoint {
        Endpoint { addr: addr.into(), tls: None, authorization: None }
    }

    #[test]
    fn answers_are_read_by_length_by_chunks_and_to_the_end() {
        let e = plain("127.0.0.1:1");
        let a = e.read_answer(&mut &b"HTTP/1.1 202 Accepted\r\nContent-Length: 5\r\n\r\nhello-and-more"[..]).unwrap();
        assert_eq!(a, Answer { status: 202, body: "hello".into() });
        let a = e
            .read_answer(
                &mut &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"[..],
            )
            .unwrap();
        assert_eq!(a.body, "abcde");
        let a = e.read_answer(&mut &b"HTTP/1.0 401 Unauthorized\r\n\r\nno"[..]).unwrap();
        assert_eq!((a.status, a.body.as_str()), (401, "no"));
        assert!(matches!(e.read_answer(&mut &b""[..]), Err(ClientError::NoAnswer { .. })));
        assert!(
            matches!(e.read_answer(&mut &b"\x15\x03\x03\x00\x02\x02\x46"[..]), Err(ClientError::NoAnswer { hint, .. }) if hint.contains("HTTPS"))
        );
        assert!(matches!(e.read_answer(&mut &b"SSH-2.0-x\r\n\r\n"[..]), Err(ClientError::NotHttp { .. })));
        assert!(e.read_answer(&mut &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"[..]).is_err());
    }

    #[test]
    fn nothing_listening_is_refused_and_bad_addresses_are_named() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = plain(&format!("127.0.0.1:{port}"));
        let err = e.request("GET", "/status").unwrap_err();
        assert!(matches!(err, ClientError::Refused { .. }), "{err}");
        assert!(err.to_string().contains("is it running"), "{err}");
        for bad in ["nohost", "127.0.0.1:http", "127.0.0.1:99999"] {
            assert!(matches!(plain(bad).request("GET", "/"), Err(ClientError::Address { .. })), "{bad}");
        }
    }
}
