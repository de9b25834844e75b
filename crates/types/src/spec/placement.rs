//! Placement expressions: constraints (`node.labels.zone == eu-1a`) and spread keys (`node.labels.zone`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a constraint accepts, used in error messages.
pub const CONSTRAINT_ALLOWED: &str = "`node.labels.KEY`, `node.name` or `node.id`, then `==` or `!=`, then a value, \
     such as \"node.labels.zone == eu-1a\" or \"node.name != h3\"";
/// What a spread entry accepts, used in error messages.
pub const SPREAD_ALLOWED: &str = "a node label written as `node.labels.KEY`, such as \"node.labels.zone\"";

const LABEL_PREFIX: &str = "node.labels.";

/// True for a label key usable in `node.labels.KEY`: letters, digits, `-`, `_`, `.` and `/`.
pub fn is_label_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
}

/// The node attribute a constraint looks at.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConstraintField {
    /// `node.labels.KEY`
    Label(String),
    /// `node.name`
    NodeName,
    /// `node.id`
    NodeId,
}

impl fmt::Display for ConstraintField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConstraintField::Label(key) => write!(f, "{LABEL_PREFIX}{key}"),
            ConstraintField::NodeName => f.write_str("node.name"),
            ConstraintField::NodeId => f.write_str("node.id"),
        }
    }
}

/// A constraint's comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConstraintOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl fmt::Display for ConstraintOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConstraintOp::Eq => "==",
            ConstraintOp::Ne => "!=",
        })
    }
}

/// A parsed placement constraint such as `node.labels.zone == eu-1a`.
///
/// Written as a string in specs; parsed when the spec is read, so an invalid one never exists.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Constraint {
    /// What is compared.
    pub field: ConstraintField,
    /// How.
    pub op: ConstraintOp,
    /// With what.
    pub value: String,
}

impl Constraint {
    /// Whether a node whose value for [`Constraint::field`] is `actual` (None: label absent) satisfies this
    /// constraint. A missing label never equals a value, so `!=` accepts it.
    pub fn matches(&self, actual: Option<&str>) -> bool {
        let equal = actual == Some(self.value.as_str());
        match self.op {
            ConstraintOp::Eq => equal,
            ConstraintOp::Ne => !equal,
        }
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.field, self.op, self.value)
    }
}

impl FromStr for Constraint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (lhs, op, rhs) = match (text.find("=="), text.find("!=")) {
            (Some(i), None) => (&text[..i], ConstraintOp::Eq, &text[i + 2..]),
            (None, Some(i)) => (&text[..i], ConstraintOp::Ne, &text[i + 2..]),
            (None, None) => {
                return Err(format!(
                    "constraint \"{text}\" has no valid operator; allowed operators: `==` and `!=`; allowed form: {CONSTRAINT_ALLOWED}"
                ));
            }
            (Some(_), Some(_)) => {
                return Err(format!("constraint \"{text}\" has more than one operator; allowed: {CONSTRAINT_ALLOWED}"));
            }
        };
        let (lhs, rhs) = (lhs.trim(), rhs.trim());
        let field = match lhs {
            "node.name" => ConstraintField::NodeName,
            "node.id" => ConstraintField::NodeId,
            _ => match lhs.strip_prefix(LABEL_PREFIX) {
                Some(key) if is_label_key(key) => ConstraintField::Label(key.to_string()),
                _ => {
                    return Err(format!(
                        "constraint \"{text}\" compares unknown field `{lhs}`; allowed: {CONSTRAINT_ALLOWED}"
                    ));
                }
            },
        };
        if rhs.is_empty() {
            return Err(format!("constraint \"{text}\" has no value; allowed: {CONSTRAINT_ALLOWED}"));
        }
        if rhs.chars().any(|c| c.is_whitespace() || c == '=' || c == '!' || c == '<' || c == '>') {
            return Err(format!(
                "constraint \"{text}\" has an invalid value `{rhs}` (no spaces or comparison characters); \
                 allowed operators: `==` and `!=`; allowed form: {CONSTRAINT_ALLOWED}"
            ));
        }
        Ok(Constraint { field, op, value: rhs.to_string() })
    }
}

impl Serialize for Constraint {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Constraint {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        super::parse_str(deserializer, CONSTRAINT_ALLOWED, str::parse)
    }
}

/// A spread key: tasks are spread evenly over the values of this node label. Written `node.labels.KEY`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpreadLabel(String);

impl SpreadLabel {
    /// The label key (`zone` for `node.labels.zone`).
    pub fn label(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SpreadLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{LABEL_PREFIX}{}", self.0)
    }
}

impl FromStr for SpreadLabel {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().strip_prefix(LABEL_PREFIX) {
            Some(key) if is_label_key(key) => Ok(SpreadLabel(key.to_string())),
            _ => Err(format!("spread entry \"{text}\" is not a node label; allowed: {SPREAD_ALLOWED}")),
        }
    }
}

impl Serialize for SpreadLabel {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpreadLabel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        super::parse_str(deserializer, SPREAD_ALLOWED, str::parse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_parse() {
        let c: Constraint = "node.labels.zone == eu-1a".parse().unwrap();
        assert_eq!(c.field, ConstraintField::Label("zone".into()));
        assert_eq!(c.op, ConstraintOp::Eq);
        assert_eq!(c.value, "eu-1a");
        assert_eq!(c.to_string(), "node.labels.zone == eu-1a");
        let c: Constraint = "node.name!=h3".parse().unwrap();
        assert_eq!((c.field.clone(), c.op, c.value.as_str()), (ConstraintField::NodeName, ConstraintOp::Ne, "h3"));
        assert!(c.matches(Some("h1")) && !c.matches(Some("h3")) && c.matches(None));
        let c: Constraint = "node.id == abc".parse().unwrap();
        assert_eq!(c.field, ConstraintField::NodeId);
        for bad in [
            "node.labels.zone = eu",
            "node.labels.zone >= eu",
            "node.labels.zone === eu",
            "node.labels. == eu",
            "node.ip == 1",
            "node.name ==",
            "node.name == a b",
            "node.name == a != b",
        ] {
            assert!(bad.parse::<Constraint>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn spread_parse() {
        assert_eq!("node.labels.zone".parse::<SpreadLabel>().unwrap().label(), "zone");
        assert!("node.name".parse::<SpreadLabel>().is_err());
        assert!("zone".parse::<SpreadLabel>().is_err());
    }
}
