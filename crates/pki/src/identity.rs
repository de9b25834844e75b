use std::fmt;
use std::str::FromStr;

use crate::{IDENTITY_URI_SCHEME, PkiError};

/// Longest id an identity may carry.
const MAX_ID_LEN: usize = 128;

/// What a certificate holder is allowed to be.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Master,
    Agent,
    /// The bootstrap administrator from `berth pki init`: every right, like Kubernetes'
    /// `system:masters`.
    Admin,
    /// A user from `berth user add`: the rights of its role bindings.
    User,
}

impl Role {
    /// The lowercase name used in certificates: `master`, `agent` or `admin`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Agent => "agent",
            Role::Admin => "admin",
            Role::User => "user",
        }
    }

    /// Parses the lowercase role name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "master" => Some(Role::Master),
            "agent" => Some(Role::Agent),
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a certificate belongs to. Masters have their numeric raft id (`"1"`), agents their node
/// id (a uuid string), admins a name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub id: String,
}

impl Identity {
    pub fn master(id: u64) -> Self {
        Identity { role: Role::Master, id: id.to_string() }
    }

    pub fn agent(node_id: &str) -> Self {
        Identity { role: Role::Agent, id: node_id.to_string() }
    }

    pub fn admin(name: &str) -> Self {
        Identity { role: Role::Admin, id: name.to_string() }
    }

    pub fn user(name: &str) -> Self {
        Identity { role: Role::User, id: name.to_string() }
    }

    /// The raft id of a master identity; `None` for other roles or a non-numeric id.
    pub fn master_id(&self) -> Option<u64> {
        match self.role {
            Role::Master => self.id.parse().ok(),
            _ => None,
        }
    }

    /// The subject common name: `<role>/<id>`.
    pub fn common_name(&self) -> String {
        format!("{}/{}", self.role, self.id)
    }

    /// The identity URI SAN: `berth://<role>/<id>`.
    pub fn uri(&self) -> String {
        format!("{IDENTITY_URI_SCHEME}{}/{}", self.role, self.id)
    }

    /// Checks that the id can be written into a certificate and read back unchanged: 1 to 128
    /// characters from `A-Z a-z 0-9 . _ -`, and numeric for masters.
    pub fn validate(&self) -> Result<(), PkiError> {
        let invalid = |reason: &str| PkiError::InvalidIdentity { value: self.to_string(), reason: reason.to_string() };
        if self.id.is_empty() {
            return Err(invalid("the id is empty"));
        }
        if self.id.len() > MAX_ID_LEN {
            return Err(invalid("the id is longer than 128 characters"));
        }
        if !self.id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            return Err(invalid("the id may only contain ASCII letters, digits, '.', '_' and '-'"));
        }
        if self.role == Role::Master && self.master_id().is_none() {
            return Err(invalid("a master id must be a decimal number (its raft id)"));
        }
        Ok(())
    }

    /// Parses `<role>/<id>` (the common-name form) and validates it.
    pub fn parse(s: &str) -> Result<Self, PkiError> {
        let (role, id) = s.split_once('/').ok_or_else(|| PkiError::InvalidIdentity {
            value: s.to_string(),
            reason: "expected <role>/<id>, e.g. master/1 or agent/<node id>".to_string(),
        })?;
        let role = Role::parse(role).ok_or_else(|| PkiError::InvalidIdentity {
            value: s.to_string(),
            reason: format!("unknown role {role:?}: expected master, agent, admin or user"),
        })?;
        let identity = Identity { role, id: id.to_string() };
        identity.validate()?;
        Ok(identity)
    }

    /// Parses the URI SAN form `berth://<role>/<id>`.
    pub fn from_uri(uri: &str) -> Result<Self, PkiError> {
        let rest = uri.strip_prefix(IDENTITY_URI_SCHEME).ok_or_else(|| PkiError::InvalidIdentity {
            value: uri.to_string(),
            reason: format!("expected a {IDENTITY_URI_SCHEME}<role>/<id> URI"),
        })?;
        Self::parse(rest)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.id)
    }
}

impl FromStr for Identity {
    type Err = PkiError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        for identity in
            [Identity::master(1), Identity::agent("6f1c2a9e-0b7d-4c1e-9a57-3b2f1d0e8c44"), Identity::admin("alice")]
        {
            let text = identity.to_string();
            assert_eq!(Identity::parse(&text).unwrap(), identity);
            assert_eq!(Identity::from_uri(&identity.uri()).unwrap(), identity);
        }
        assert_eq!(Identity::master(7).to_string(), "master/7");
        assert_eq!(Identity::agent("n1").to_string(), "agent/n1");
        assert_eq!(Identity::admin("bob").to_string(), "admin/bob");
    }

    #[test]
    fn master_id_only_for_masters() {
        assert_eq!(Identity::master(42).master_id(), Some(42));
        assert_eq!(Identity::agent("42").master_id(), None);
        assert_eq!(Identity::admin("42").master_id(), None);
    }

    #[test]
    fn invalid_identities_are_rejected() {
        assert!(Identity::parse("master").is_err());
        assert!(Identity::parse("root/1").is_err());
        assert!(Identity::parse("master/one").is_err());
        assert!(Identity::parse("agent/").is_err());
        assert!(Identity::parse("agent/a/b").is_err());
        assert!(Identity::parse("admin/has space").is_err());
        assert!(Identity::from_uri("spiffe://agent/x").is_err());
    }
}
