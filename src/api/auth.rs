//! Client token verification (HS256 JWT, or the user id itself in --dev) and API-key checks.

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::protocol::valid_name;

/// Who a verified token belongs to and which topics the connection joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    pub(crate) user: String,
    pub(crate) topics: Vec<String>,
}

/// Why a token was refused. The text goes into the 401 body; it never contains the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum AuthError {
    #[error("missing token: pass ?token= or an Authorization: Bearer header")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token is malformed or not HS256")]
    Malformed,
    #[error("token has no valid \"sub\" (1-256 printable characters without whitespace)")]
    BadSubject,
    #[error("token \"topics\" must be at most {0} valid topic names")]
    BadTopics(usize),
}

impl AuthError {
    /// Metric label for refused upgrades.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Expired => "expired",
            AuthError::BadSignature => "bad_signature",
            AuthError::Malformed => "malformed",
            AuthError::BadSubject => "bad_subject",
            AuthError::BadTopics(_) => "bad_topics",
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    #[serde(default)]
    topics: Option<Vec<String>>,
}

/// Verifies client tokens.
#[derive(Clone)]
pub(crate) enum Authenticator {
    /// Production: an HS256 JWT with `sub`, a required `exp`, and optional `topics`.
    Jwt {
        key: DecodingKey,
        validation: Box<Validation>,
        max_topics: usize,
    },
    /// --dev: the token is the user id; topics come from the `topics` query parameter.
    Dev { max_topics: usize },
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Authenticator::Jwt { .. } => f.write_str("Authenticator::Jwt"),
            Authenticator::Dev { .. } => f.write_str("Authenticator::Dev"),
        }
    }
}

/// Clock skew tolerated on `exp`, in seconds. Kept small: an expired token must not buy a
/// fresh connection for long.
pub(crate) const EXP_LEEWAY_SECS: u64 = 5;

impl Authenticator {
    pub(crate) fn jwt(secret: &str, max_topics: usize) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = EXP_LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_exp = true;
        Authenticator::Jwt {
            key: DecodingKey::from_secret(secret.as_bytes()),
            validation: Box::new(validation),
            max_topics,
        }
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
                })
            }
            Authenticator::Jwt {
                key,
                validation,
                max_topics,
            } => {
                let data = decode::<Claims>(token, key, validation).map_err(|e| {
                    use jsonwebtoken::errors::ErrorKind;
                    match e.kind() {
                        ErrorKind::ExpiredSignature => AuthError::Expired,
                        ErrorKind::InvalidSignature => AuthError::BadSignature,
                        _ => AuthError::Malformed,
                    }
                })?;
                let user = data.claims.sub.ok_or(AuthError::BadSubject)?;
                if !valid_name(&user) {
                    return Err(AuthError::BadSubject);
                }
                let mut topics = data.claims.topics.unwrap_or_default();
                topics.sort();
                topics.dedup();
                check_topics(&topics, *max_topics)?;
                Ok(Identity { user, topics })
            }
        }
    }
}

fn check_topics(topics: &[String], max: usize) -> Result<(), AuthError> {
    if topics.len() > max || !topics.iter().all(|t| valid_name(t)) {
        return Err(AuthError::BadTopics(max));
    }
    Ok(())
}

/// Checks the API key in constant time; `None` (only in --dev) accepts any request.
pub(crate) fn api_key_ok(expected: Option<&str>, header: Option<&str>) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
        return false;
    };
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn valid_jwt_yields_user_and_topics() {
        let a = Authenticator::jwt(SECRET, 4);
        let t = token(
            json!({"sub":"42","exp":now()+60,"topics":["b","a","a"]}),
            SECRET,
        );
        assert_eq!(
            a.verify(&t, None),
            Ok(Identity {
                user: "42".into(),
                topics: vec!["a".into(), "b".into()]
            })
        );
    }

    #[test]
    fn bad_tokens_are_refused_with_the_right_reason() {
        let a = Authenticator::jwt(SECRET, 2);
        assert_eq!(a.verify("", None), Err(AuthError::Missing));
        assert_eq!(a.verify("garbage", None), Err(AuthError::Malformed));
        let expired = token(json!({"sub":"42","exp":now()-3600}), SECRET);
        assert_eq!(a.verify(&expired, None), Err(AuthError::Expired));
        let wrong = token(
            json!({"sub":"42","exp":now()+60}),
            "another-secret-entirely",
        );
        assert_eq!(a.verify(&wrong, None), Err(AuthError::BadSignature));
        let no_exp = token(json!({"sub":"42"}), SECRET);
        assert_eq!(a.verify(&no_exp, None), Err(AuthError::Malformed));
        let no_sub = token(json!({"exp":now()+60}), SECRET);
        assert_eq!(a.verify(&no_sub, None), Err(AuthError::BadSubject));
        let many = token(
            json!({"sub":"1","exp":now()+60,"topics":["a","b","c"]}),
            SECRET,
        );
        assert_eq!(a.verify(&many, None), Err(AuthError::BadTopics(2)));
    }

    #[test]
    fn dev_tokens_are_user_ids() {
        let a = Authenticator::dev(4);
        let id = a.verify("alice", Some("x,y")).unwrap();
        assert_eq!(id.user, "alice");
        assert_eq!(id.topics, vec!["x".to_string(), "y".to_string()]);
        assert_eq!(a.verify("a b", None), Err(AuthError::BadSubject));
    }

    #[test]
    fn api_key_needs_exact_bearer() {
        assert!(api_key_ok(Some("k1"), Some("Bearer k1")));
        assert!(!api_key_ok(Some("k1"), Some("Bearer k2")));
        assert!(!api_key_ok(Some("k1"), Some("k1")));
        assert!(!api_key_ok(Some("k1"), None));
        assert!(api_key_ok(None, None));
    }
}
