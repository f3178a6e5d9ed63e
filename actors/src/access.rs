//! Who may do what on the HTTP endpoint: the tokens (`telemetry.control_token_file`,
//! `telemetry.read_token_file`) and the rule for each kind of request, as plain functions of the
//! peer address and the `Authorization` header, tested without a server.
//!
//! | request | no token file | with `control_token_file` | with `read_token_file` |
//! |---|---|---|---|
//! | control (`POST /stop`, `POST /checkpoint`) | loopback peers only, else 403 | the control token, else 401 | (no change) |
//! | read (`/metrics`, `/healthz`, `/status`) | anyone | (no change) | the read or the control token, else 401 |
//!
//! A token is compared in constant time ([`subtle`]) and never printed: [`Token`] has no
//! `Display`, its `Debug` is `Token(<redacted>)`, and the errors about a token file name the key
//! and the path, never the content.

use std::net::SocketAddr;
use std::path::Path;
use subtle::ConstantTimeEq;

/// The least number of bytes a token may have.
pub const MIN_TOKEN_BYTES: usize = 16;

/// A secret token read from a file. Its bytes never leave this type but through [`Token::bearer`]
/// (what a client sends).
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Why a token file was refused. The message names the key (or flag) and the file, never the
/// content.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {why}")]
pub struct TokenFileError {
    /// The config key or flag that names the file (`telemetry.control_token_file`, `--token-file`).
    pub key: String,
    /// What is wrong, with the path.
    pub why: String,
}

impl Token {
    /// The token in `path`, named by `key` in errors: a regular file that neither group nor
    /// others may access ([`uamt::fsutil::read_private`]), holding at least [`MIN_TOKEN_BYTES`]
    /// bytes of visible ASCII (surrounding white space, such as the newline `echo` writes, is
    /// dropped; none inside: a header cannot carry it).
    pub fn from_file(key: &str, path: &Path) -> Result<Token, TokenFileError> {
        let refuse = |why: String| TokenFileError { key: key.to_string(), why };
        let bytes = uamt::fsutil::read_private(path).map_err(|e| refuse(e.to_string()))?;
        let token = bytes.trim_ascii();
        if token.is_empty() {
            return Err(refuse(format!("{}: the token file is empty", path.display())));
        }
        if let Some(at) = token.iter().position(|b| !b.is_ascii_graphic()) {
            return Err(refuse(format!(
                "{}: the token holds a byte that is not visible ASCII (at offset {at}); an HTTP header cannot \
                 carry it",
                path.display()
            )));
        }
        if token.len() < MIN_TOKEN_BYTES {
            return Err(refuse(format!(
                "{}: the token has {} bytes, fewer than the {MIN_TOKEN_BYTES} required (e.g. `openssl rand -hex 32 \
                 > FILE; chmod 600 FILE`)",
                path.display(),
                token.len()
            )));
        }
        Ok(Token(token.to_vec()))
    }

    /// Whether `presented` is this token, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        bool::from(self.0.as_slice().ct_eq(presented))
    }

    /// The `Authorization` header value that carries this token.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", String::from_utf8_lossy(&self.0))
    }
}

/// The kind of request, for [`Access::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `GET /metrics`, `/healthz`, `/status`.
    Read,
    /// `POST /stop`, `/checkpoint`: anything that changes the run.
    Control,
}

/// A request refused, with the status code and the message the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 401 (no or a wrong token) or 403 (control from another host without a token file).
    pub status: u16,
    /// What the client is told.
    pub message: String,
}

/// The endpoint's access rules: the tokens, if configured.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Required on control requests; also taken on read requests.
    pub control: Option<Token>,
    /// Required on read requests (the control token is taken too).
    pub read: Option<Token>,
}

impl Access {
    /// The tokens `telemetry.control_token_file` and `telemetry.read_token_file` name (an empty
    /// path: none).
    pub fn from_config(t: &uamt::config::TelemetryConfig) -> Result<Access, TokenFileError> {
        let load = |key: &str, p: &Path| {
            (!p.as_os_str().is_empty()).then(|| Token::from_file(&format!("telemetry.{key}"), p)).transpose()
        };
        Ok(Access {
            control: load("control_token_file", &t.control_token_file)?,
            read: load("read_token_file", &t.read_token_file)?,
        })
    }

    /// Whether a request of `kind` from `peer` with the `Authorization` header `authorization`
    /// may proceed.
    pub fn check(&self, kind: Kind, peer: Option<SocketAddr>, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        let presented = authorization.and_then(bearer_token);
        let holds = |t: &Token| presented.is_some_and(|p| t.matches(p));
        match kind {
            Kind::Control => match &self.control {
                Some(t) if holds(t) => Ok(()),
                Some(_) => Err(unauthorized(presented.is_some(), "telemetry.control_token_file")),
                None if peer.is_some_and(|p| p.ip().to_canonical().is_loopback()) => Ok(()),
                None => Err(Refusal {
                    status: 403,
                    message: format!(
                        "control requests are taken only from this host (loopback) while no token is configured; \
                         the request came from {}. To allow them from other hosts, set \
                         telemetry.control_token_file to a file holding a secret token (mode 600, at least \
                         {MIN_TOKEN_BYTES} bytes) and send it as `Authorization: Bearer <token>` (uamt ctl \
                         --token-file)",
                        peer.map_or("an unknown address".to_string(), |p| p.ip().to_string())
                    ),
                }),
            },
            Kind::Read => match &self.read {
                None => Ok(()),
                Some(t) if holds(t) || self.control.as_ref().is_some_and(holds) => Ok(()),
                Some(_) => Err(unauthorized(presented.is_some(), "telemetry.read_token_file")),
            },
        }
    }
}

/// 401 for a missing or wrong token; the message says which, never what was sent.
fn unauthorized(presented: bool, key: &str) -> Refusal {
    let message = if presented {
        format!("the bearer token is not the one in {key}")
    } else {
        format!("this request needs `Authorization: Bearer <token>` with the token of {key}")
    };
    Refusal { status: 401, message }
}

/// The token of an `Authorization: Bearer <token>` header value (the scheme in any case).
pub fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    Some(rest.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(s: &str) -> Token {
        Token(s.as_bytes().to_vec())
    }

    fn peer(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    const GOOD: &str = "0123456789abcdef-control";

    #[test]
    fn bearer_tokens_are_parsed_from_the_header() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer   abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearerabc"), None);
        assert_eq!(bearer_token(b"Bear"), None);
    }

    #[test]
    fn without_a_token_control_is_for_loopback_peers_only() {
        let a = Access::default();
        for p in ["127.0.0.1:5000", "127.8.9.1:1", "[::1]:5000", "[::ffff:127.0.0.1]:5000"] {
            assert_eq!(a.check(Kind::Control, peer(p), None), Ok(()), "{p}");
        }
        for p in ["192.0.2.7:5000", "[2001:db8::1]:5000", "[::ffff:192.0.2.7]:1"] {
            let r = a.check(Kind::Control, peer(p), Some(b"Bearer whatever")).unwrap_err();
            assert_eq!(r.status, 403, "{p}");
            assert!(r.message.contains("telemetry.control_token_file"), "{}", r.message);
        }
        assert_eq!(a.check(Kind::Control, None, None).unwrap_err().status, 403);
        assert_eq!(a.check(Kind::Read, peer("192.0.2.7:1"), None), Ok(()), "reading is open without a read token");
    }

    #[test]
    fn with_a_control_token_every_control_request_must_carry_it() {
        let a = Access { control: Some(token(GOOD)), read: None };
        let header = format!("Bearer {GOOD}");
        for p in ["127.0.0.1:1", "192.0.2.7:1"] {
            assert_eq!(a.check(Kind::Control, peer(p), Some(header.as_bytes())), Ok(()));
            let missing = a.check(Kind::Control, peer(p), None).unwrap_err();
            assert_eq!(missing.status, 401, "loopback needs the token too once one is set");
            let wrong = a.check(Kind::Control, peer(p), Some(b"Bearer 0123456789abcdef-contro")).unwrap_err();
            assert_eq!(wrong.status, 401);
            assert!(!wrong.message.contains(GOOD));
        }
        assert_eq!(a.check(Kind::Read, peer("192.0.2.7:1"), None), Ok(()));
    }

    #[test]
    fn a_read_token_guards_reading_and_the_control_token_opens_it_too() {
        let a = Access { control: Some(token(GOOD)), read: Some(token("reader-0123456789abcdef")) };
        assert_eq!(a.check(Kind::Read, peer("127.0.0.1:1"), None).unwrap_err().status, 401);
        assert_eq!(a.check(Kind::Read, peer("127.0.0.1:1"), Some(b"Bearer reader-0123456789abcdef")), Ok(()));
        assert_eq!(a.check(Kind::Read, peer("127.0.0.1:1"), Some(format!("Bearer {GOOD}").as_bytes())), Ok(()));
        let r = a.check(Kind::Control, peer("127.0.0.1:1"), Some(b"Bearer reader-0123456789abcdef")).unwrap_err();
        assert_eq!(r.status, 401, "the read token does not control");
    }

    #[test]
    fn a_token_never_shows_in_debug_output() {
        let t = token(GOOD);
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        let a = Access { control: Some(t.clone()), read: Some(t) };
        assert!(!format!("{a:?}").contains(GOOD));
    }

    #[test]
    fn token_files_are_checked_and_their_content_never_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("uamt-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        let write = |text: &str, mode: u32| {
            std::fs::write(&f, text).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let key = "telemetry.control_token_file";
        write(&format!("{GOOD}\n"), 0o600);
        let t = Token::from_file(key, &f).unwrap();
        assert!(t.matches(GOOD.as_bytes()), "the newline echo writes is dropped");
        assert_eq!(t.bearer(), format!("Bearer {GOOD}"));
        for (text, mode, says) in [
            ("", 0o600, "empty"),
            (" \n", 0o600, "empty"),
            ("short-secret", 0o600, "fewer than the 16"),
            ("0123456789 abcdef", 0o600, "not visible ASCII"),
            (GOOD, 0o644, "mode 644"),
        ] {
            write(text, mode);
            let msg = Token::from_file(key, &f).unwrap_err().to_string();
            assert!(msg.starts_with(key) && msg.contains(&f.display().to_string()) && msg.contains(says), "{msg}");
            if !text.trim().is_empty() {
                assert!(!msg.contains(text.trim()), "the token leaked: {msg}");
            }
        }
        let msg = Token::from_file(key, &dir.join("missing")).unwrap_err().to_string();
        assert!(msg.starts_with(key) && msg.contains("missing"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
