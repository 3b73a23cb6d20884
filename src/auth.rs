//! Client tokens (a JWT verified with a shared secret, a previous secret during rotation,
//! or a PEM public key; or the user id itself in --dev) and API-key checks.

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{decode, decode_header, Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::clock::unix_ms;
use crate::config::ApiScope;
use crate::protocol::valid_name;

/// Who a verified token belongs to and which topics the connection joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) user: String,
    pub(crate) topics: Vec<String>,
    /// The token's expiry (Unix seconds); `None` in --dev.
    pub(crate) exp: Option<u64>,
}

/// Why a token was refused. The text goes into the 401 body; it never contains the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum AuthError {
    #[error("missing token: pass ?token= or an Authorization: Bearer header")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("token lives too long: its exp is more than {0} s away (--jwt-max-lifetime)")]
    TooLong(u64),
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token is not a JWT (three base64url parts with a JSON header and claims)")]
    Malformed,
    #[error("token algorithm {0} is not accepted here")]
    Algorithm(String),
    #[error("token has no \"exp\" claim")]
    NoExpiry,
    #[error("token \"aud\" does not name this service (--jwt-audience)")]
    Audience,
    #[error("token \"iss\" is not the expected issuer (--jwt-issuer)")]
    Issuer,
    #[error("token has no valid \"sub\" (1-256 characters, no white-space, control or invisible characters)")]
    BadSubject,
    #[error("token \"topics\" must be at most {0} valid topic names")]
    BadTopics(usize),
    #[error("the new token is for another user than the session")]
    WrongSubject,
}

impl AuthError {
    /// Metric label for refused upgrades, and the `reason` of a refused refresh.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::TooLong(_) => "too_long",
            AuthError::BadSignature => "bad_signature",
            AuthError::Malformed => "malformed",
            AuthError::Algorithm(_) => "algorithm",
            AuthError::NoExpiry => "no_expiry",
            AuthError::Audience => "audience",
            AuthError::Issuer => "issuer",
            AuthError::BadSubject => "bad_subject",
            AuthError::BadTopics(_) => "bad_topics",
            AuthError::WrongSubject => "wrong_subject",
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    #[serde(default)]
    topics: Option<Vec<String>>,
}

/// Why a verification key could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    #[error("{0} is not a PEM RSA, EC (P-256/P-384) or Ed25519 public key")]
    NotAPublicKey(String),
}

/// What JWT verification accepts.
#[derive(Debug, Clone, Default)]
pub(crate) struct JwtSettings {
    /// HMAC secrets: the current one first, then the previous one during a rotation.
    pub(crate) secrets: Vec<Vec<u8>>,
    /// PEM public keys (with a name for errors), for tokens an identity provider signs.
    pub(crate) public_keys: Vec<(String, Vec<u8>)>,
    /// Required `aud`, if any (otherwise `aud` is not checked).
    pub(crate) audience: Option<String>,
    /// Required `iss`, if any.
    pub(crate) issuer: Option<String>,
    /// Tokens whose `exp` lies further ahead are refused.
    pub(crate) max_lifetime: Duration,
    pub(crate) max_topics: usize,
}

/// One verification key and what it accepts.
pub(crate) struct Key {
    key: DecodingKey,
    validation: Validation,
}

/// Verifies client tokens.
pub(crate) enum Authenticator {
    /// Production: a JWT with `sub` and a required `exp`, optional `nbf`, `aud`, `iss` and
    /// `topics`, signed by one of the keys.
    Jwt {
        keys: Vec<Key>,
        max_lifetime: u64,
        max_topics: usize,
    },
    /// --dev: the token is the user id; topics come from the `topics` query parameter.
    Dev { max_topics: usize },
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authenticator::Jwt { keys, .. } => write!(f, "Authenticator::Jwt({} keys)", keys.len()),
            Authenticator::Dev { .. } => f.write_str("Authenticator::Dev"),
        }
    }
}

/// Clock skew tolerated on `exp` and `nbf`, in seconds. Kept small: an expired token must
/// not buy a fresh connection for long.
pub(crate) const EXP_LEEWAY_SECS: u64 = 5;

fn validation(algorithms: &[Algorithm], s: &JwtSettings) -> Validation {
    let mut v = Validation::new(algorithms[0]);
    v.algorithms = algorithms.to_vec();
    v.leeway = EXP_LEEWAY_SECS;
    let mut required = vec!["exp"];
    v.validate_exp = true;
    v.validate_nbf = true;
    match &s.audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            required.push("aud");
        }
        // Without a configured audience a token's `aud` is not this service's business.
        None => v.validate_aud = false,
    }
    if let Some(iss) = &s.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    v.set_required_spec_claims(&required);
    v
}

impl Authenticator {
    pub(crate) fn jwt(s: &JwtSettings) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        for secret in &s.secrets {
            keys.push(Key {
                key: DecodingKey::from_secret(secret),
                validation: validation(AlgorithmFamily::Hmac.algorithms(), s),
            });
        }
        for (name, pem) in &s.public_keys {
            let (key, family) = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                (k, AlgorithmFamily::Rsa)
            } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                (k, AlgorithmFamily::Ec)
            } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
                (k, AlgorithmFamily::Ed)
            } else {
                return Err(KeyError::NotAPublicKey(name.clone()));
            };
            keys.push(Key {
                key,
                validation: validation(family.algorithms(), s),
            });
        }
        Ok(Authenticator::Jwt {
            keys,
            max_lifetime: s.max_lifetime.as_secs(),
            max_topics: s.max_topics,
        })
    }

    pub(crate) fn dev(max_topics: usize) -> Self {
        Authenticator::Dev { max_topics }
    }

    /// Verifies a token. `dev_topics` is the comma-separated `topics` query parameter, which
    /// only --dev honours (a JWT carries its own topics).
    pub(crate) fn verify(
        &self,
        token: &str,
        dev_topics: Option<&str>,
    ) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        match self {
            Authenticator::Dev { max_topics } => {
                if !valid_name(token) {
                    return Err(AuthError::BadSubject);
                }
                let topics: Vec<String> = dev_topics
                    .unwrap_or("")
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
                    .collect();
                check_topics(&topics, *max_topics)?;
                Ok(Identity {
                    user: token.to_string(),
                    topics,
                    exp: None,
                })
            }
            Authenticator::Jwt {
                keys,
                max_lifetime,
                max_topics,
            } => {
                let header = decode_header(token).map_err(|_| AuthError::Malformed)?;
                // No key of the token's algorithm: refused for that, unless one was tried.
                let mut refused = AuthError::Algorithm(format!("{:?}", header.alg));
                for k in keys
                    .iter()
                    .filter(|k| k.validation.algorithms.contains(&header.alg))
                {
                    match decode::<Claims>(token, &k.key, &k.validation) {
                        Ok(data) => return identity(data.claims, *max_lifetime, *max_topics),
                        // Another key may have signed it (a rotation): try the next one.
                        Err(e) if *e.kind() == ErrorKind::InvalidSignature => {
                            refused = AuthError::BadSignature;
                        }
                        Err(e) => return Err(refusal(e.kind())),
                    }
                }
                Err(refused)
            }
        }
    }

    /// Verifies a token that replaces a session's one: it must be valid and for the same
    /// user. Returns its expiry.
    pub(crate) fn verify_refresh(&self, token: &str, user: &str) -> Result<Option<u64>, AuthError> {
        let id = self.verify(token, None)?;
        if id.user != user {
            return Err(AuthError::WrongSubject);
        }
        Ok(id.exp)
    }
}

fn refusal(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAudience => AuthError::Audience,
        ErrorKind::InvalidIssuer => AuthError::Issuer,
        ErrorKind::MissingRequiredClaim(c) if c == "exp" => AuthError::NoExpiry,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthError::Audience,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthError::Issuer,
        ErrorKind::InvalidAlgorithm => AuthError::Algorithm("of another key type".into()),
        _ => AuthError::Malformed,
    }
}

fn identity(claims: Claims, max_lifetime: u64, max_topics: usize) -> Result<Identity, AuthError> {
    let exp = claims.exp.ok_or(AuthError::NoExpiry)?;
    let now = unix_ms() / 1000;
    if exp.saturating_sub(now) > max_lifetime {
        return Err(AuthError::TooLong(max_lifetime));
    }
    let user = claims.sub.ok_or(AuthError::BadSubject)?;
    if !valid_name(&user) {
        return Err(AuthError::BadSubject);
    }
    let mut topics = claims.topics.unwrap_or_default();
    topics.sort();
    topics.dedup();
    check_topics(&topics, max_topics)?;
    Ok(Identity {
        user,
        topics,
        exp: Some(exp),
    })
}

fn check_topics(topics: &[String], max: usize) -> Result<(), AuthError> {
    if topics.len() > max || !topics.iter().all(|t| valid_name(t)) {
        return Err(AuthError::BadTopics(max));
    }
    Ok(())
}

/// The credentials of an `Authorization` header value: the scheme is case-insensitive (RFC
/// 7235), surrounding white space is ignored, and anything but `Bearer` gives `None`.
pub(crate) fn bearer(header: &str) -> Option<&str> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

/// The node's API keys and their scopes.
pub(crate) struct ApiKeys {
    keys: Vec<(ApiScope, Vec<u8>)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.debug_struct("ApiKeys")
            .field("count", &self.keys.len())
            .finish()
    }
}

/// Why an API request's key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyRefusal {
    /// No key, or a key the node does not have (401).
    Unknown,
    /// A known key whose scope does not cover the route (403).
    Scope(ApiScope),
}

impl ApiKeys {
    /// No keys (only in --dev) means every request is let through as admin.
    pub(crate) fn new(keys: Vec<(ApiScope, String)>) -> Self {
        ApiKeys {
            keys: keys.into_iter().map(|(s, k)| (s, k.into_bytes())).collect(),
        }
    }

    /// Checks the bearer key of `header` against every key in constant time (each
    /// comparison runs whatever the outcome of the others, so timing does not tell which
    /// key, or how much of one, matched) and whether its scope allows `need`.
    pub(crate) fn check(&self, header: Option<&str>, need: ApiScope) -> Result<(), KeyRefusal> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let given = header.and_then(bearer).unwrap_or("").as_bytes();
        let mut found: Option<ApiScope> = None;
        for (scope, key) in &self.keys {
            if bool::from(given.ct_eq(key)) && found.is_none_or(|f| *scope > f) {
                found = Some(*scope);
            }
        }
        match found {
            None => Err(KeyRefusal::Unknown),
            Some(scope) if scope.allows(need) => Ok(()),
            Some(scope) => Err(KeyRefusal::Scope(scope)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    const OLD: &str = "the-previous-secret-0123456789ab";

    fn now() -> u64 {
        unix_ms() / 1000
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn settings(max_topics: usize) -> JwtSettings {
        JwtSettings {
            secrets: vec![SECRET.into()],
            max_lifetime: Duration::from_secs(86_400),
            max_topics,
            ..JwtSettings::default()
        }
    }

    fn auth(max_topics: usize) -> Authenticator {
        Authenticator::jwt(&settings(max_topics)).unwrap()
    }

    #[test]
    fn valid_jwt_yields_user_topics_and_expiry() {
        let a = auth(4);
        let exp = now() + 60;
        let t = token(json!({"sub":"42","exp":exp,"topics":["b","a","a"]}), SECRET);
        assert_eq!(
            a.verify(&t, None),
            Ok(Identity {
                user: "42".into(),
                topics: vec!["a".into(), "b".into()],
                exp: Some(exp),
            })
        );
    }

    #[test]
    fn bad_tokens_are_refused_with_the_right_reason() {
        let a = auth(2);
        assert_eq!(a.verify("", None), Err(AuthError::Missing));
        assert_eq!(a.verify("garbage", None), Err(AuthError::Malformed));
        let expired = token(json!({"sub":"42","exp":now()-3600}), SECRET);
        assert_eq!(a.verify(&expired, None), Err(AuthError::Expired));
        let wrong = token(
            json!({"sub":"42","exp":now()+60}),
            "another-secret-entirely-0123456789",
        );
        assert_eq!(a.verify(&wrong, None), Err(AuthError::BadSignature));
        let no_exp = token(json!({"sub":"42"}), SECRET);
        assert_eq!(a.verify(&no_exp, None), Err(AuthError::NoExpiry));
        let no_sub = token(json!({"exp":now()+60}), SECRET);
        assert_eq!(a.verify(&no_sub, None), Err(AuthError::BadSubject));
        let many = token(
            json!({"sub":"1","exp":now()+60,"topics":["a","b","c"]}),
            SECRET,
        );
        assert_eq!(a.verify(&many, None), Err(AuthError::BadTopics(2)));
        let later = token(json!({"sub":"1","exp":now()+120,"nbf":now()+60}), SECRET);
        assert_eq!(a.verify(&later, None), Err(AuthError::NotYetValid));
        let forever = token(
            json!({"sub":"1","exp":1_000_000_000_000_000_000u64}),
            SECRET,
        );
        assert_eq!(a.verify(&forever, None), Err(AuthError::TooLong(86_400)));
        let invisible = token(json!({"sub":"a\u{202e}b","exp":now()+60}), SECRET);
        assert_eq!(a.verify(&invisible, None), Err(AuthError::BadSubject));
    }

    #[test]
    fn audience_and_issuer_are_checked_only_when_configured() {
        let with_aud = token(
            json!({"sub":"1","exp":now()+60,"aud":"herald","iss":"idp"}),
            SECRET,
        );
        assert!(
            auth(2).verify(&with_aud, None).is_ok(),
            "aud is ignored when not configured"
        );
        let strict = Authenticator::jwt(&JwtSettings {
            audience: Some("herald".into()),
            issuer: Some("idp".into()),
            ..settings(2)
        })
        .unwrap();
        assert!(strict.verify(&with_aud, None).is_ok());
        let other_aud = token(
            json!({"sub":"1","exp":now()+60,"aud":"other","iss":"idp"}),
            SECRET,
        );
        assert_eq!(strict.verify(&other_aud, None), Err(AuthError::Audience));
        let no_aud = token(json!({"sub":"1","exp":now()+60,"iss":"idp"}), SECRET);
        assert_eq!(strict.verify(&no_aud, None), Err(AuthError::Audience));
        let other_iss = token(
            json!({"sub":"1","exp":now()+60,"aud":"herald","iss":"x"}),
            SECRET,
        );
        assert_eq!(strict.verify(&other_iss, None), Err(AuthError::Issuer));
    }

    #[test]
    fn a_previous_secret_still_verifies_during_a_rotation() {
        let rotating = Authenticator::jwt(&JwtSettings {
            secrets: vec![SECRET.into(), OLD.into()],
            ..settings(2)
        })
        .unwrap();
        let old = token(json!({"sub":"1","exp":now()+60}), OLD);
        assert!(rotating.verify(&old, None).is_ok());
        assert_eq!(auth(2).verify(&old, None), Err(AuthError::BadSignature));
    }

    /// An EC P-256 key pair made with `openssl ecparam -name prime256v1 -genkey` (test only).
    const EC_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgjguacckoyTZvFAXb
loqaYyvUICDLAME/nqvMJdYVahWhRANCAASO2RFs/w3LhIjiYghL2pIU6JUOMK1H
IaGG+t/Bzw/uXwXnmOKpnULHIBut+29Qdp3URdvi1zPjmc/oS8HbUo3l
-----END PRIVATE KEY-----
";
    const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEjtkRbP8Ny4SI4mIIS9qSFOiVDjCt
RyGhhvrfwc8P7l8F55jiqZ1CxyAbrftvUHad1EXb4tcz45nP6EvB21KN5Q==
-----END PUBLIC KEY-----
";

    #[test]
    fn public_keys_verify_their_algorithms_only() {
        let idp = Authenticator::jwt(&JwtSettings {
            secrets: vec![],
            public_keys: vec![("ec".into(), EC_PUBLIC.into())],
            ..settings(2)
        })
        .unwrap();
        let signed = encode(
            &Header::new(Algorithm::ES256),
            &json!({"sub":"1","exp":now()+60}),
            &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
        )
        .unwrap();
        assert_eq!(idp.verify(&signed, None).map(|i| i.user), Ok("1".into()));
        let hs = token(json!({"sub":"1","exp":now()+60}), SECRET);
        assert_eq!(
            idp.verify(&hs, None),
            Err(AuthError::Algorithm("HS256".into()))
        );
        assert!(Authenticator::jwt(&JwtSettings {
            public_keys: vec![("junk".into(), b"not a key".to_vec())],
            ..settings(2)
        })
        .is_err());
    }

    #[test]
    fn refresh_needs_the_same_user() {
        let a = auth(2);
        let exp = now() + 600;
        let mine = token(json!({"sub":"1","exp":exp}), SECRET);
        assert_eq!(a.verify_refresh(&mine, "1"), Ok(Some(exp)));
        assert_eq!(a.verify_refresh(&mine, "2"), Err(AuthError::WrongSubject));
    }

    #[test]
    fn dev_tokens_are_user_ids() {
        let a = Authenticator::dev(4);
        let id = a.verify("alice", Some("x,y")).unwrap();
        assert_eq!(id.user, "alice");
        assert_eq!(id.topics, vec!["x".to_string(), "y".to_string()]);
        assert_eq!(id.exp, None);
        assert_eq!(a.verify("a b", None), Err(AuthError::BadSubject));
    }

    #[test]
    fn bearer_schemes_are_case_insensitive() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("abc"), None);
        let keys = ApiKeys::new(vec![
            (ApiScope::Admin, "admin-key-0123456789".into()),
            (ApiScope::Publish, "publish-key-0123456789".into()),
            (ApiScope::Read, "read-key-0123456789".into()),
        ]);
        let admin = Some("Bearer admin-key-0123456789");
        let publish = Some("bearer publish-key-0123456789");
        let read = Some("BEARER read-key-0123456789");
        for need in [ApiScope::Publish, ApiScope::Read, ApiScope::Admin] {
            assert_eq!(keys.check(admin, need), Ok(()), "admin may do {need:?}");
        }
        assert_eq!(keys.check(publish, ApiScope::Publish), Ok(()));
        assert_eq!(
            keys.check(publish, ApiScope::Read),
            Err(KeyRefusal::Scope(ApiScope::Publish))
        );
        assert_eq!(
            keys.check(publish, ApiScope::Admin),
            Err(KeyRefusal::Scope(ApiScope::Publish))
        );
        assert_eq!(keys.check(read, ApiScope::Read), Ok(()));
        assert_eq!(
            keys.check(read, ApiScope::Publish),
            Err(KeyRefusal::Scope(ApiScope::Read))
        );
        for wrong in [
            None,
            Some("admin-key-0123456789"),
            Some("Bearer admin-key-012345678"),
            Some("Bearer admin-key-01234567890"),
            Some("Basic admin-key-0123456789"),
            Some("Bearer "),
        ] {
            assert_eq!(
                keys.check(wrong, ApiScope::Publish),
                Err(KeyRefusal::Unknown),
                "{wrong:?}"
            );
        }
        let open = ApiKeys::new(Vec::new());
        assert_eq!(
            open.check(None, ApiScope::Admin),
            Ok(()),
            "--dev without keys"
        );
    }
}
