//! Bootstrap (join) tokens, in the spirit of Swarm's `SWMTKN-1-<ca digest>-<secret>`:
//!
//! `BERTH-1-<ca digest: 64 hex>-<id: 8 lowercase alnum>.<secret: 32 lowercase alnum>`
//!
//! The CA digest lets a joining agent pin the cluster CA before it has any certificate; the id
//! names the token so it can be listed and revoked; the secret proves the agent was handed the
//! token. The cluster stores only [`JoinToken::secret_hash`].

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{CaDigest, PkiError};

/// The prefix and version every token starts with.
pub const TOKEN_PREFIX: &str = "BERTH-";
/// The token format version this build writes and reads.
pub const TOKEN_VERSION: &str = "1";
/// Length of a token id.
pub const ID_LEN: usize = 8;
/// Length of a token secret (36^32 ≈ 2^165 possibilities).
pub const SECRET_LEN: usize = 32;

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A join token. `Debug` never prints the secret; there is deliberately no `Display`: use
/// [`JoinToken::encode`] where the whole token must be shown.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_digest: CaDigest,
    pub id: String,
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_digest", &self.ca_digest.0)
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl JoinToken {
    /// A token with a random id and secret for the CA with digest `ca_digest`.
    pub fn generate(ca_digest: CaDigest) -> Self {
        let mut rng = rand::rng();
        let mut random = |len: usize| -> String {
            (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
        };
        let id = random(ID_LEN);
        let secret = random(SECRET_LEN);
        JoinToken { ca_digest: CaDigest(ca_digest.0.to_ascii_lowercase()), id, secret }
    }

    /// Parses `BERTH-1-<digest>-<id>.<secret>` (surrounding whitespace is ignored). Errors name
    /// the part that is wrong and never contain the secret.
    pub fn parse(s: &str) -> Result<Self, PkiError> {
        let s = s.trim();
        let rest = s.strip_prefix(TOKEN_PREFIX).ok_or(PkiError::TokenPrefix)?;
        let (version, rest) = rest.split_once('-').unwrap_or((rest, ""));
        if version != TOKEN_VERSION {
            let found =
                if !version.is_empty() && version.len() <= 4 && version.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    format!("{version:?}")
                } else {
                    "(unreadable)".to_string()
                };
            return Err(PkiError::TokenVersion { found });
        }
        let (digest, rest) = rest.split_once('-').ok_or_else(|| PkiError::TokenDigest {
            reason: "expected '-' after the 64 hex characters of the CA digest".to_string(),
        })?;
        let ca_digest = CaDigest::parse(digest).map_err(|e| PkiError::TokenDigest {
            reason: match e {
                PkiError::InvalidDigest { reason } => format!("{reason}, expected 64 hex characters"),
                other => other.to_string(),
            },
        })?;
        let (id, secret) = rest.split_once('.').ok_or_else(|| PkiError::TokenId {
            reason: "expected <id>.<secret> after the CA digest, found no '.'".to_string(),
        })?;
        check_part(id, ID_LEN).map_err(|reason| PkiError::TokenId { reason })?;
        check_part(secret, SECRET_LEN).map_err(|reason| PkiError::TokenSecret { reason })?;
        Ok(JoinToken { ca_digest, id: id.to_string(), secret: secret.to_string() })
    }

    /// The token as handed to an operator: `BERTH-1-<digest>-<id>.<secret>`.
    pub fn encode(&self) -> String {
        format!("{TOKEN_PREFIX}{TOKEN_VERSION}-{}-{}.{}", self.ca_digest.0, self.id, self.secret)
    }

    /// Hex SHA-256 of the secret: what the cluster stores.
    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

impl FromStr for JoinToken {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A login for the web console: `BERTHC-1-<id: 8>.<secret: 32>` (lowercase letters and digits).
/// The id names the stored record (identity, expiry); the cluster keeps only the secret's hash.
/// There is no CA digest in it: the browser already checked the master's certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct ConsoleToken {
    pub id: String,
    pub secret: String,
}

impl fmt::Debug for ConsoleToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleToken").field("id", &self.id).field("secret", &"<redacted>").finish()
    }
}

/// How every console token starts.
pub const CONSOLE_TOKEN_PREFIX: &str = "BERTHC-1-";

impl ConsoleToken {
    /// A token with a random id and secret.
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let mut random = |len: usize| -> String {
            (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
        };
        let id = random(ID_LEN);
        ConsoleToken { id, secret: random(SECRET_LEN) }
    }

    /// Parses `BERTHC-1-<id>.<secret>` (surrounding whitespace is ignored). Errors never contain
    /// the secret.
    pub fn parse(s: &str) -> Result<Self, PkiError> {
        let bad = |reason: &str| PkiError::ConsoleToken { reason: reason.to_string() };
        let rest =
            s.trim().strip_prefix(CONSOLE_TOKEN_PREFIX).ok_or_else(|| bad("it does not start with BERTHC-1-"))?;
        let (id, secret) = rest.split_once('.').ok_or_else(|| bad("no '.' between its id and its secret"))?;
        check_part(id, ID_LEN).map_err(|r| bad(&format!("its id: {r}")))?;
        check_part(secret, SECRET_LEN).map_err(|r| bad(&format!("its secret: {r}")))?;
        Ok(ConsoleToken { id: id.to_string(), secret: secret.to_string() })
    }

    /// The token as handed to its user.
    pub fn encode(&self) -> String {
        format!("{CONSOLE_TOKEN_PREFIX}{}.{}", self.id, self.secret)
    }

    /// Hex SHA-256 of the secret: what the cluster stores (compare with [`secret_matches`]).
    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }
}

/// Checks a token part's length and alphabet without echoing it.
fn check_part(part: &str, len: usize) -> Result<(), String> {
    if part.len() != len {
        return Err(format!("expected {len} characters, found {}", part.chars().count()));
    }
    if !part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        return Err("only lowercase letters a-z and digits 0-9 are allowed".to_string());
    }
    Ok(())
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Constant-time compare of a presented secret against a stored hash (from
/// [`JoinToken::secret_hash`]).
pub fn secret_matches(secret: &str, stored_hash: &str) -> bool {
    let presented = hash_secret(secret);
    let stored = stored_hash.trim().to_ascii_lowercase();
    presented.as_bytes().ct_eq(stored.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_tokens_round_trip_and_bad_ones_say_what_is_wrong() {
        let t = ConsoleToken::generate();
        let parsed = ConsoleToken::parse(&format!("  {}\n", t.encode())).unwrap();
        assert_eq!(parsed, t);
        assert!(secret_matches(&t.secret, &t.secret_hash()));
        assert!(!secret_matches(&ConsoleToken::generate().secret, &t.secret_hash()));
        assert!(!format!("{t:?}").contains(&t.secret));
        for (bad, says) in [
            ("BERTH-1-abc", "does not start"),
            ("BERTHC-1-abcdefgh", "no '.'"),
            ("BERTHC-1-abc.def", "its id"),
            (&format!("BERTHC-1-abcdefgh.{}", "X".repeat(32)), "its secret"),
        ] {
            let e = ConsoleToken::parse(bad).unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("berth console token create"), "{bad}: {e}");
        }
    }

    fn digest() -> CaDigest {
        CaDigest::of_der(b"some CA certificate")
    }

    fn encoded() -> (JoinToken, String) {
        let token = JoinToken::generate(digest());
        let s = token.encode();
        (token, s)
    }

    #[test]
    fn generate_encode_parse_round_trip() {
        let (token, s) = encoded();
        assert_eq!(token.id.len(), ID_LEN);
        assert_eq!(token.secret.len(), SECRET_LEN);
        assert!(s.starts_with(&format!("BERTH-1-{}-", digest().0)));
        assert_eq!(s.len(), "BERTH-1-".len() + 64 + 1 + ID_LEN + 1 + SECRET_LEN);
        let parsed = JoinToken::parse(&s).unwrap();
        assert_eq!(parsed, token);
        assert_eq!(parsed.encode(), s);
        assert_eq!(format!("  {s}\n").parse::<JoinToken>().unwrap(), token);
        // Two tokens differ.
        let other = JoinToken::generate(digest());
        assert_ne!(other.id, token.id);
        assert_ne!(other.secret, token.secret);
    }

    #[test]
    fn each_malformed_form_has_its_own_error() {
        let (token, s) = encoded();
        let d = &token.ca_digest.0;
        let (id, secret) = (&token.id, &token.secret);
        type Check = fn(&PkiError) -> bool;
        let cases: Vec<(String, Check)> = vec![
            (format!("SWMTKN-1-{d}-{id}.{secret}"), |e| matches!(e, PkiError::TokenPrefix)),
            (String::new(), |e| matches!(e, PkiError::TokenPrefix)),
            (format!("BERTH-2-{d}-{id}.{secret}"), |e| matches!(e, PkiError::TokenVersion { .. })),
            (format!("BERTH-{d}-{id}.{secret}"), |e| matches!(e, PkiError::TokenVersion { .. })),
            (format!("BERTH-1-{}-{id}.{secret}", &d[..63]), |e| matches!(e, PkiError::TokenDigest { .. })),
            (format!("BERTH-1-{}z-{id}.{secret}", &d[..63]), |e| matches!(e, PkiError::TokenDigest { .. })),
            (format!("BERTH-1-{d}{id}.{secret}"), |e| matches!(e, PkiError::TokenDigest { .. })),
            (format!("BERTH-1-{d}-{id}{secret}"), |e| matches!(e, PkiError::TokenId { .. })),
            (format!("BERTH-1-{d}-{}.{secret}", &id[..7]), |e| matches!(e, PkiError::TokenId { .. })),
            (format!("BERTH-1-{d}-{}.{secret}", id.to_uppercase()), |e| matches!(e, PkiError::TokenId { .. })),
            (format!("BERTH-1-{d}-{id}.{}", &secret[..31]), |e| matches!(e, PkiError::TokenSecret { .. })),
            (format!("BERTH-1-{d}-{id}.{secret}x"), |e| matches!(e, PkiError::TokenSecret { .. })),
            (format!("BERTH-1-{d}-{id}.{}_", &secret[..31]), |e| matches!(e, PkiError::TokenSecret { .. })),
            (format!("BERTH-1-{d}-{id}.{}", secret.to_uppercase()), |e| matches!(e, PkiError::TokenSecret { .. })),
        ];
        for (input, is_expected) in cases {
            let err = JoinToken::parse(&input).unwrap_err();
            assert!(is_expected(&err), "{input:?} gave {err:?}");
            let message = err.to_string();
            assert!(!message.contains(&secret[..16]), "error {message:?} leaks the secret");
            assert!(!message.to_lowercase().contains(&secret[..16]), "error {message:?} leaks the secret");
        }
        assert!(JoinToken::parse(&s).is_ok());
    }

    #[test]
    fn secret_matches_only_the_right_secret() {
        let (token, _) = encoded();
        let stored = token.secret_hash();
        assert_eq!(stored.len(), 64);
        assert_ne!(stored, token.secret);
        assert!(secret_matches(&token.secret, &stored));
        assert!(secret_matches(&token.secret, &stored.to_uppercase()));
        let mut wrong = token.secret.clone();
        wrong.replace_range(0..1, if wrong.starts_with('a') { "b" } else { "a" });
        assert!(!secret_matches(&wrong, &stored));
        assert!(!secret_matches("", &stored));
        assert!(!secret_matches(&token.secret, ""));
        assert!(!secret_matches(&token.secret, &stored[..63]));
    }

    #[test]
    fn debug_does_not_contain_the_secret() {
        let (token, _) = encoded();
        let debug = format!("{token:?}");
        assert!(!debug.contains(&token.secret), "{debug}");
        assert!(debug.contains(&token.id));
        assert!(debug.contains("<redacted>"));
    }
}
