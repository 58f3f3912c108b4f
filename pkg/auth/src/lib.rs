//! Who may connect and who may push.
//!
//! * [`ConnectAuth`] verifies the JWT a WebSocket client presents: signed by
//!   the business side with a shared secret (HS256) or a private key whose
//!   public half barrage has (RS256/ES256, PEM or a JWKS file). `sub` is the
//!   user; `exp` (required) and `nbf` (when present) are enforced with a
//!   small leeway for clock skew; an optional `rooms` claim
//!   limits the rooms the connection may join (exact names, or prefixes
//!   written `prefix*`). `alg: none` and algorithm confusion are refused.
//! * [`ApiAuth`] checks the static bearer tokens business services present
//!   on the push API, each with its scopes.
//! * [`mint`] signs a development token (what `barrage token` prints).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, jwk::JwkSet};
use serde::{Deserialize, Serialize};

/// Why a token was refused. The text is safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error(
        "no token: pass ?token=<JWT>, an Authorization: Bearer header, or the bearer.<JWT> subprotocol"
    )]
    Missing,
    /// The token has expired.
    #[error("token expired")]
    Expired,
    /// The token's `nbf` (not before) is still in the future.
    #[error("token not yet valid: its nbf (not before) is in the future")]
    NotYetValid,
    /// Signature, algorithm or format is wrong.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token is valid but does not allow this.
    #[error("forbidden: {0}")]
    Forbidden(String),
}

/// A configuration problem, naming what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Claims barrage reads from a connection token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Rooms the connection may join: exact names, or prefixes ending in `*`.
    /// Absent: any room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    /// Rooms the connection may publish comments to where the node requires
    /// this claim (`PUBLISH_CLAIM_ROOMS`): exact names or `prefix*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
}

/// Whether `room` matches one of `patterns` (exact names or `prefix*`).
pub fn room_matches(patterns: &[String], room: &str) -> bool {
    patterns.iter().any(|g| match g.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => g == room,
    })
}

impl Claims {
    /// Whether the token's `publish` claim covers `room`.
    pub fn allows_publish(&self, room: &str) -> bool {
        self.publish
            .as_deref()
            .is_some_and(|p| room_matches(p, room))
    }

    /// Whether the token allows joining `room`.
    pub fn allows_room(&self, room: &str) -> bool {
        match &self.rooms {
            None => true,
            Some(grants) => room_matches(grants, room),
        }
    }
}

/// Verifies connection tokens.
#[derive(Clone)]
pub struct ConnectAuth {
    keys: Vec<(DecodingKey, Algorithm)>,
    leeway: Duration,
}

impl std::fmt::Debug for ConnectAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectAuth")
            .field("keys", &self.keys.len())
            .field("leeway", &self.leeway)
            .finish()
    }
}

impl ConnectAuth {
    /// No keys: every token is refused.
    pub fn new(leeway: Duration) -> Self {
        ConnectAuth {
            keys: Vec::new(),
            leeway,
        }
    }

    /// Accepts HS256 tokens signed with `secret`.
    pub fn with_hs256_secret(mut self, secret: &[u8]) -> Result<Self, ConfigError> {
        if secret.len() < 16 {
            return Err(ConfigError("must be at least 16 bytes".into()));
        }
        self.keys
            .push((DecodingKey::from_secret(secret), Algorithm::HS256));
        Ok(self)
    }

    /// Accepts tokens signed by the private half of a PEM public key (RSA
    /// keys verify RS256, EC P-256 keys ES256).
    pub fn with_public_key_pem(mut self, pem: &[u8]) -> Result<Self, ConfigError> {
        if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
            self.keys.push((k, Algorithm::RS256));
        } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
            self.keys.push((k, Algorithm::ES256));
        } else {
            return Err(ConfigError(
                "not an RSA or EC public key in PEM form".into(),
            ));
        }
        Ok(self)
    }

    /// Accepts tokens signed by any RS256/ES256 key of a JWKS document.
    pub fn with_jwks(mut self, json: &str) -> Result<Self, ConfigError> {
        let set: JwkSet = serde_json::from_str(json)
            .map_err(|e| ConfigError(format!("not a JWKS document: {e}")))?;
        for jwk in &set.keys {
            let key =
                DecodingKey::from_jwk(jwk).map_err(|e| ConfigError(format!("bad key: {e}")))?;
            let alg = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                _ => return Err(ConfigError("only RSA and EC keys are supported".into())),
            };
            self.keys.push((key, alg));
        }
        if set.keys.is_empty() {
            return Err(ConfigError("the JWKS document has no keys".into()));
        }
        Ok(self)
    }

    /// Whether any key is configured.
    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Clock skew allowed on `exp` and `nbf`: a connection is also closed
    /// this long after its token's expiry, not before.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Verifies a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("malformed: {e}")))?;
        let mut last = AuthError::Invalid(format!("no key accepts alg {:?}", header.alg));
        for (key, alg) in &self.keys {
            if *alg != header.alg {
                continue;
            }
            let mut v = Validation::new(*alg);
            v.leeway = self.leeway.as_secs();
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp", "sub"]);
            v.validate_aud = false;
            match jsonwebtoken::decode::<Claims>(token, key, &v) {
                Ok(data) => {
                    if data.claims.sub.is_empty() {
                        return Err(AuthError::Invalid("empty sub".into()));
                    }
                    return Ok(data.claims);
                }
                Err(e) => {
                    last = match e.kind() {
                        jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                        jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                            AuthError::NotYetValid
                        }
                        _ => AuthError::Invalid(e.to_string()),
                    };
                }
            }
        }
        Err(last)
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs an HS256 connection token for `user`, valid for `ttl`.
pub fn mint(
    secret: &[u8],
    user: &str,
    rooms: Option<Vec<String>>,
    ttl: Duration,
) -> Result<String, ConfigError> {
    let claims = Claims {
        sub: user.to_owned(),
        exp: now_secs() + ttl.as_secs(),
        rooms,
        publish: None,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| ConfigError(e.to_string()))
}

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// PushToRoom.
    PushRoom,
    /// PushToUser.
    PushUser,
    /// Broadcast.
    Broadcast,
    /// Admin reads (GetRoomInfo, GetUserNode).
    Admin,
}

impl Scope {
    /// The scope's name in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::PushRoom => "push:room",
            Scope::PushUser => "push:user",
            Scope::Broadcast => "broadcast",
            Scope::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Vec<Scope>> {
        Some(match s {
            "push:room" => vec![Scope::PushRoom],
            "push:user" => vec![Scope::PushUser],
            "broadcast" => vec![Scope::Broadcast],
            "admin" => vec![Scope::Admin],
            "*" => vec![
                Scope::PushRoom,
                Scope::PushUser,
                Scope::Broadcast,
                Scope::Admin,
            ],
            _ => return None,
        })
    }
}

/// Static API tokens and their scopes. Empty: the API is open.
#[derive(Debug, Clone, Default)]
pub struct ApiAuth {
    tokens: HashMap<String, HashSet<Scope>>,
}

impl ApiAuth {
    /// Parses `token=scope|scope;token2=*` (scopes: `push:room`,
    /// `push:user`, `broadcast`, `admin`, `*` for all).
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let mut tokens = HashMap::new();
        for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let (token, scopes) = entry.split_once('=').ok_or_else(|| {
                ConfigError(format!(
                    "{:?}: expected <token>=<scope>|<scope>",
                    redact(entry)
                ))
            })?;
            if token.len() < 16 {
                return Err(ConfigError(format!(
                    "token {:?} is shorter than 16 characters",
                    redact(token)
                )));
            }
            let mut set = HashSet::new();
            for s in scopes.split('|').map(str::trim) {
                set.extend(Scope::parse(s).ok_or_else(|| {
                    ConfigError(format!(
                        "unknown scope {s:?}: expected push:room, push:user, broadcast, admin or *"
                    ))
                })?);
            }
            tokens.insert(token.to_owned(), set);
        }
        Ok(ApiAuth { tokens })
    }

    /// Whether tokens are required.
    pub fn is_enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Checks an `authorization` header value for `scope`.
    pub fn check(&self, authorization: Option<&str>, scope: Scope) -> Result<(), AuthError> {
        if !self.is_enabled() {
            return Ok(());
        }
        let token = authorization
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(AuthError::Missing)?;
        match self.tokens.get(token) {
            None => Err(AuthError::Invalid("unknown API token".into())),
            Some(scopes) if scopes.contains(&scope) => Ok(()),
            Some(_) => Err(AuthError::Forbidden(format!(
                "this token lacks the {} scope",
                scope.as_str()
            ))),
        }
    }
}

fn redact(s: &str) -> String {
    let shown: String = s.chars().take(4).collect();
    format!("{shown}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn auth() -> ConnectAuth {
        ConnectAuth::new(Duration::from_secs(5))
            .with_hs256_secret(SECRET)
            .unwrap()
    }

    #[test]
    fn minted_tokens_verify_and_carry_rooms() {
        let t = mint(
            SECRET,
            "alice",
            Some(vec!["lobby".into(), "live:*".into()]),
            Duration::from_secs(60),
        )
        .unwrap();
        let c = auth().verify(&t).unwrap();
        assert_eq!(c.sub, "alice");
        assert!(c.allows_room("lobby") && c.allows_room("live:42"));
        assert!(!c.allows_room("lobby2") && !c.allows_room("admin"));
        let open = auth()
            .verify(&mint(SECRET, "bob", None, Duration::from_secs(60)).unwrap())
            .unwrap();
        assert!(open.allows_room("anything"));
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        assert_eq!(auth().verify(""), Err(AuthError::Missing));
        let other = mint(
            b"another-secret-of-32-bytes-long!",
            "eve",
            None,
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(matches!(auth().verify(&other), Err(AuthError::Invalid(_))));
        assert!(matches!(
            auth().verify("not.a.jwt"),
            Err(AuthError::Invalid(_))
        ));
        // Expired beyond the leeway.
        let claims = Claims {
            sub: "old".into(),
            exp: now_secs() - 60,
            rooms: None,
            publish: None,
        };
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(auth().verify(&expired), Err(AuthError::Expired));
        // alg "none": header {"alg":"none"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJldmUiLCJleHAiOjQxMDI0NDQ4MDB9.";
        assert!(matches!(auth().verify(none), Err(AuthError::Invalid(_))));
        // An HS256 token is refused by a verifier that only has public keys.
        let only_rsa = ConnectAuth::new(Duration::ZERO);
        assert!(
            only_rsa
                .verify(&mint(SECRET, "x", None, Duration::from_secs(60)).unwrap())
                .is_err()
        );
    }

    fn signed(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    #[test]
    fn nbf_is_enforced_with_the_leeway() {
        let now = now_secs();
        let exp = now + 3600;
        let future = signed(serde_json::json!({"sub": "early", "exp": exp, "nbf": now + 60}));
        assert_eq!(auth().verify(&future), Err(AuthError::NotYetValid));
        // Within the leeway (5 s) of this clock: accepted.
        let skewed = signed(serde_json::json!({"sub": "skewed", "exp": exp, "nbf": now + 3}));
        assert_eq!(auth().verify(&skewed).unwrap().sub, "skewed");
        let past = signed(serde_json::json!({"sub": "ok", "exp": exp, "nbf": now - 10}));
        assert_eq!(auth().verify(&past).unwrap().sub, "ok");
        // A malformed nbf is refused, not ignored.
        let bad = signed(serde_json::json!({"sub": "bad", "exp": exp, "nbf": "soon"}));
        assert!(matches!(auth().verify(&bad), Err(AuthError::Invalid(_))));
        assert_eq!(auth().leeway(), Duration::from_secs(5));
    }

    #[test]
    fn short_secrets_and_bad_keys_are_config_errors() {
        assert!(
            ConnectAuth::new(Duration::ZERO)
                .with_hs256_secret(b"short")
                .is_err()
        );
        assert!(
            ConnectAuth::new(Duration::ZERO)
                .with_public_key_pem(b"nope")
                .is_err()
        );
        assert!(ConnectAuth::new(Duration::ZERO).with_jwks("{}").is_err());
    }

    #[test]
    fn api_tokens_and_scopes() {
        let a =
            ApiAuth::parse("svc-token-aaaaaaaaaaaa=push:room|push:user; admin-token-bbbbbbbbb=*")
                .unwrap();
        assert!(
            a.check(Some("Bearer svc-token-aaaaaaaaaaaa"), Scope::PushRoom)
                .is_ok()
        );
        assert!(matches!(
            a.check(Some("Bearer svc-token-aaaaaaaaaaaa"), Scope::Broadcast),
            Err(AuthError::Forbidden(_))
        ));
        assert!(
            a.check(Some("Bearer admin-token-bbbbbbbbb"), Scope::Admin)
                .is_ok()
        );
        assert_eq!(a.check(None, Scope::PushRoom), Err(AuthError::Missing));
        assert!(matches!(
            a.check(Some("Bearer nope"), Scope::PushRoom),
            Err(AuthError::Invalid(_))
        ));
        assert!(
            ApiAuth::default().check(None, Scope::Admin).is_ok(),
            "no tokens: open"
        );
        assert!(ApiAuth::parse("short=admin").is_err());
        assert!(
            ApiAuth::parse("long-enough-token-x=root")
                .unwrap_err()
                .to_string()
                .contains("unknown scope")
        );
    }
}
