//! Authentication of Flight calls (`auth:`): bearer tokens, and basic credentials traded
//! for a token in `Handshake` (pyarrow's `authenticate_basic_token` flow).
//!
//! Secrets are compared in constant time (no early exit on the first differing byte, and
//! every configured secret is compared), and never logged: errors say what was wrong
//! with a request, not what it carried.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine as _;
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::config::{AuthConfig, AuthMode};

/// Equality whose time does not depend on where the bytes differ (`subtle`; a length
/// difference is answered at once, and lengths are not secret here).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// Whether `candidate` equals any of `secrets`, comparing against all of them.
fn any_ct_eq<'a>(secrets: impl Iterator<Item = &'a [u8]>, candidate: &[u8]) -> bool {
    secrets.fold(false, |found, s| found | ct_eq(s, candidate))
}

pub struct Auth {
    mode: AuthMode,
    tokens: Vec<Vec<u8>>,
    users: Vec<(Vec<u8>, Vec<u8>)>,
    ttl: Duration,
    /// Most tokens issued and unexpired at once (`auth.max_issued_tokens`); the oldest
    /// go first beyond it.
    max_issued: usize,
    issued: Mutex<HashMap<String, Instant>>,
}

fn read_lines(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}

impl Auth {
    /// Reads the token and user files; refuses a mode without any secret to check.
    pub fn from_config(c: &AuthConfig) -> anyhow::Result<Self> {
        let mut tokens: Vec<Vec<u8>> = c
            .tokens
            .iter()
            .map(|t| t.expose().as_bytes().to_vec())
            .collect();
        if let Some(f) = &c.token_file {
            tokens.extend(
                read_lines(f)
                    .context("auth.token_file")?
                    .into_iter()
                    .map(String::into_bytes),
            );
        }
        let mut users: Vec<(Vec<u8>, Vec<u8>)> = c
            .users
            .iter()
            .map(|u| {
                (
                    u.username.as_bytes().to_vec(),
                    u.password.expose().as_bytes().to_vec(),
                )
            })
            .collect();
        if let Some(f) = &c.users_file {
            for (i, line) in read_lines(f).context("auth.users_file")?.iter().enumerate() {
                let (user, pass) = line.split_once(':').with_context(|| {
                    format!(
                        "auth.users_file {}: entry {} is not username:password",
                        f.display(),
                        i + 1
                    )
                })?;
                users.push((user.as_bytes().to_vec(), pass.as_bytes().to_vec()));
            }
        }
        if tokens.iter().any(Vec::is_empty) {
            anyhow::bail!("auth: an empty token would let anyone in");
        }
        match c.mode {
            // Secrets with no mode that checks them would leave the server open to anyone
            // while its configuration reads as protected.
            AuthMode::None if !tokens.is_empty() || !users.is_empty() => {
                anyhow::bail!(
                    "auth.mode is none but {} set: every call would get in without them (set \
                     auth.mode: token or basic, or remove them)",
                    if tokens.is_empty() {
                        "users are"
                    } else {
                        "tokens are"
                    }
                )
            }
            AuthMode::Token if tokens.is_empty() => {
                anyhow::bail!("auth.mode token: no tokens (set auth.tokens or auth.token_file)")
            }
            AuthMode::Basic if users.is_empty() => {
                anyhow::bail!("auth.mode basic: no users (set auth.users or auth.users_file)")
            }
            _ => {}
        }
        Ok(Self {
            mode: c.mode,
            tokens,
            users,
            ttl: Duration::from_secs(c.token_ttl_s),
            max_issued: c.max_issued_tokens.max(1),
            issued: Mutex::new(HashMap::new()),
        })
    }

    /// Lets a call in, or `Unauthenticated`.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        if self.mode == AuthMode::None {
            return Ok(());
        }
        let token = bearer(metadata)?;
        if any_ct_eq(self.tokens.iter().map(Vec::as_slice), token.as_bytes()) {
            return Ok(());
        }
        if self.mode == AuthMode::Basic {
            let issued = self.issued.lock().expect("not poisoned");
            let now = Instant::now();
            let valid = issued
                .iter()
                .filter(|(_, at)| now.duration_since(**at) < self.ttl)
                .fold(false, |found, (t, _)| {
                    found | ct_eq(t.as_bytes(), token.as_bytes())
                });
            if valid {
                return Ok(());
            }
        }
        Err(Status::unauthenticated(
            "invalid or expired bearer token (auth.mode is on)",
        ))
    }

    /// `Handshake`: basic credentials → a new bearer token; a valid bearer token → the
    /// same token. Returns the token to send back.
    pub fn handshake(&self, metadata: &MetadataMap) -> Result<String, Status> {
        match self.mode {
            AuthMode::None => Err(Status::unimplemented(
                "authentication is not enabled on this server (auth.mode: none)",
            )),
            AuthMode::Token => {
                self.check(metadata)?;
                bearer(metadata)
            }
            AuthMode::Basic => {
                let header = authorization(metadata)?;
                if header.starts_with("Bearer ") {
                    self.check(metadata)?;
                    return bearer(metadata);
                }
                let encoded = header.strip_prefix("Basic ").ok_or_else(|| {
                    Status::unauthenticated("authorization must be Basic or Bearer")
                })?;
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .map_err(|_| Status::unauthenticated("basic credentials are not base64"))?;
                let (user, pass) = match decoded.iter().position(|&b| b == b':') {
                    Some(i) => (&decoded[..i], &decoded[i + 1..]),
                    None => {
                        return Err(Status::unauthenticated(
                            "basic credentials must be username:password",
                        ));
                    }
                };
                let ok = self.users.iter().fold(false, |found, (u, p)| {
                    found | (ct_eq(u, user) & ct_eq(p, pass))
                });
                if !ok {
                    return Err(Status::unauthenticated("invalid username or password"));
                }
                Ok(self.issue())
            }
        }
    }

    fn issue(&self) -> String {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).expect("the OS random source");
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut issued = self.issued.lock().expect("not poisoned");
        let now = Instant::now();
        issued.retain(|_, at| now.duration_since(*at) < self.ttl);
        if issued.len() >= self.max_issued
            && let Some(oldest) = issued
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(t, _)| t.clone())
        {
            issued.remove(&oldest);
        }
        issued.insert(token.clone(), now);
        token
    }
}

fn authorization(metadata: &MetadataMap) -> Result<&str, Status> {
    metadata
        .get("authorization")
        .ok_or_else(|| {
            Status::unauthenticated(
                "missing authorization header: send \"authorization: Bearer TOKEN\" \
                 (auth.mode is on)",
            )
        })?
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization header is not text"))
}

fn bearer(metadata: &MetadataMap) -> Result<String, Status> {
    let header = authorization(metadata)?;
    header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(|t| t.trim().to_string())
        .ok_or_else(|| Status::unauthenticated("authorization must be \"Bearer TOKEN\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BasicUser, Secret};

    fn meta(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().unwrap());
        m
    }

    #[test]
    fn constant_time_equality_is_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(!ct_eq(b"", b"a"));
        assert!(ct_eq(b"", b""));
        // Lengths that differ by a multiple of 256 must still differ.
        assert!(!ct_eq(&[0u8; 256], &[]));
        assert!(any_ct_eq([&b"x"[..], &b"yy"[..]].into_iter(), b"yy"));
    }

    #[test]
    fn tokens_and_basic_credentials() {
        let c = AuthConfig {
            mode: AuthMode::Basic,
            tokens: vec![Secret::new("static")],
            users: vec![BasicUser {
                username: "alice".into(),
                password: Secret::new("wonder:land"),
            }],
            ..Default::default()
        };
        let auth = Auth::from_config(&c).unwrap();
        assert!(auth.check(&MetadataMap::new()).is_err());
        assert!(auth.check(&meta("Bearer static")).is_ok());
        assert!(auth.check(&meta("Bearer stati")).is_err());
        let basic = |u: &str, p: &str| {
            meta(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            ))
        };
        let token = auth.handshake(&basic("alice", "wonder:land")).unwrap();
        assert_eq!(token.len(), 64);
        assert!(auth.check(&meta(&format!("Bearer {token}"))).is_ok());
        let err = auth.handshake(&basic("alice", "wrong")).unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert!(!err.message().contains("wrong"), "never echoes secrets");
        assert!(auth.handshake(&basic("bob", "wonder:land")).is_err());
    }

    #[test]
    fn secrets_without_a_mode_are_refused() {
        let c = AuthConfig {
            tokens: vec![Secret::new("static")],
            ..Default::default()
        };
        let err = Auth::from_config(&c).err().expect("refused").to_string();
        assert!(
            err.contains("auth.mode is none but tokens are set"),
            "{err}"
        );
        let c = AuthConfig {
            users: vec![BasicUser {
                username: "a".into(),
                password: Secret::new("b"),
            }],
            ..Default::default()
        };
        assert!(Auth::from_config(&c).is_err());
        assert!(Auth::from_config(&AuthConfig::default()).is_ok());
    }

    #[test]
    fn a_mode_without_secrets_is_refused() {
        let c = AuthConfig {
            mode: AuthMode::Token,
            ..Default::default()
        };
        assert!(Auth::from_config(&c).is_err());
        let c = AuthConfig {
            mode: AuthMode::Token,
            tokens: vec![Secret::new("")],
            ..Default::default()
        };
        assert!(Auth::from_config(&c).is_err());
    }

    #[test]
    fn issued_tokens_are_bounded_oldest_dropped_first() {
        let c = AuthConfig {
            mode: AuthMode::Basic,
            users: vec![BasicUser {
                username: "a".into(),
                password: Secret::new("b"),
            }],
            max_issued_tokens: 2,
            ..Default::default()
        };
        let auth = Auth::from_config(&c).unwrap();
        let first = auth.issue();
        std::thread::sleep(Duration::from_millis(2));
        let second = auth.issue();
        std::thread::sleep(Duration::from_millis(2));
        let third = auth.issue();
        assert_eq!(auth.issued.lock().unwrap().len(), 2);
        assert!(auth.check(&meta(&format!("Bearer {first}"))).is_err());
        assert!(auth.check(&meta(&format!("Bearer {second}"))).is_ok());
        assert!(auth.check(&meta(&format!("Bearer {third}"))).is_ok());
    }

    #[test]
    fn issued_tokens_expire() {
        let c = AuthConfig {
            mode: AuthMode::Basic,
            users: vec![BasicUser {
                username: "a".into(),
                password: Secret::new("b"),
            }],
            token_ttl_s: 1,
            ..Default::default()
        };
        let auth = Auth::from_config(&c).unwrap();
        let token = auth.issue();
        assert!(auth.check(&meta(&format!("Bearer {token}"))).is_ok());
        auth.issued
            .lock()
            .unwrap()
            .insert(token.clone(), Instant::now() - Duration::from_secs(2));
        assert!(auth.check(&meta(&format!("Bearer {token}"))).is_err());
    }
}
