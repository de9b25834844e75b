//! Placement constraints: `node.labels.KEY == VALUE`, `node.name != NAME`, `node.id == ID`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::model::NodeInfo;

/// A node attribute a constraint compares.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Field {
    /// `node.name` (alias `node.hostname`).
    NodeName,
    /// `node.id`.
    NodeId,
    /// `node.labels.KEY`.
    Label(String),
}

/// Comparison of a constraint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

/// One placement constraint. Values compare exactly (case-sensitive). A node without the label
/// fails `==` and passes `!=`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Constraint {
    pub field: Field,
    pub op: Op,
    pub value: String,
}

/// Why a constraint string does not parse. Each message says what a valid one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    #[error(
        "constraint `{input}`: no operator; expected node.labels.KEY, node.name or node.id on the left, == or != in the middle, a value on the right (e.g. `node.labels.zone == eu-1a`)"
    )]
    MissingOperator { input: String },
    #[error(
        "constraint `{input}`: unknown field `{field}`; expected node.labels.KEY, node.name or node.id on the left, == or != in the middle (e.g. `node.labels.zone == eu-1a`)"
    )]
    UnknownField { input: String, field: String },
    #[error("constraint `{input}`: empty label key; write node.labels.KEY, e.g. `node.labels.zone == eu-1a`")]
    EmptyLabelKey { input: String },
    #[error("constraint `{input}`: empty value; put a value right of == or != (e.g. `node.name != h3`)")]
    EmptyValue { input: String },
}

impl Constraint {
    /// Whether `node` satisfies the constraint.
    pub fn matches(&self, node: &NodeInfo) -> bool {
        let actual = match &self.field {
            Field::NodeName => Some(node.name.as_str()),
            Field::NodeId => Some(node.id.as_str()),
            Field::Label(key) => node.labels.get(key).map(String::as_str),
        };
        let equal = actual == Some(self.value.as_str());
        match self.op {
            Op::Eq => equal,
            Op::Ne => !equal,
        }
    }
}

impl FromStr for Constraint {
    type Err = ConstraintError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let owned = || input.trim().to_string();
        let (pos, op) = match (input.find("=="), input.find("!=")) {
            (Some(e), Some(n)) if n < e => (n, Op::Ne),
            (Some(e), _) => (e, Op::Eq),
            (None, Some(n)) => (n, Op::Ne),
            (None, None) => return Err(ConstraintError::MissingOperator { input: owned() }),
        };
        let left = input[..pos].trim();
        let value = input[pos + 2..].trim();
        let field = match left {
            "node.name" | "node.hostname" => Field::NodeName,
            "node.id" => Field::NodeId,
            _ => match left.strip_prefix("node.labels.") {
                Some("") => return Err(ConstraintError::EmptyLabelKey { input: owned() }),
                Some(key) => Field::Label(key.to_string()),
                None if left == "node.labels" => return Err(ConstraintError::EmptyLabelKey { input: owned() }),
                None => return Err(ConstraintError::UnknownField { input: owned(), field: left.to_string() }),
            },
        };
        if value.is_empty() {
            return Err(ConstraintError::EmptyValue { input: owned() });
        }
        Ok(Constraint { field, op, value: value.to_string() })
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Field::NodeName => f.write_str("node.name")?,
            Field::NodeId => f.write_str("node.id")?,
            Field::Label(key) => write!(f, "node.labels.{key}")?,
        }
        let op = match self.op {
            Op::Eq => "==",
            Op::Ne => "!=",
        };
        write!(f, " {op} {}", self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_fields_and_round_trips() {
        let c: Constraint = "node.labels.zone == eu-1a".parse().unwrap();
        assert_eq!(c, Constraint { field: Field::Label("zone".into()), op: Op::Eq, value: "eu-1a".into() });
        assert_eq!(c.to_string(), "node.labels.zone == eu-1a");

        let c: Constraint = "node.name!=h3".parse().unwrap();
        assert_eq!(c, Constraint { field: Field::NodeName, op: Op::Ne, value: "h3".into() });
        assert_eq!(c.to_string().parse::<Constraint>().unwrap(), c);

        let c: Constraint = "  node.id ==  X ".parse().unwrap();
        assert_eq!(c, Constraint { field: Field::NodeId, op: Op::Eq, value: "X".into() });
    }

    #[test]
    fn parse_errors_say_what_is_expected() {
        let err = "node.labels.zone = eu-1a".parse::<Constraint>().unwrap_err();
        assert!(matches!(err, ConstraintError::MissingOperator { .. }), "{err:?}");
        assert!(err.to_string().contains("== or != in the middle"), "{err}");

        let err = "node.zone == a".parse::<Constraint>().unwrap_err();
        assert_eq!(err, ConstraintError::UnknownField { input: "node.zone == a".into(), field: "node.zone".into() });
        let msg = err.to_string();
        assert!(msg.contains("expected node.labels.KEY, node.name or node.id on the left"), "{msg}");
        assert!(msg.contains("`node.zone`"), "{msg}");

        let err = "node.labels. == a".parse::<Constraint>().unwrap_err();
        assert!(matches!(err, ConstraintError::EmptyLabelKey { .. }), "{err:?}");

        let err = "node.name ==".parse::<Constraint>().unwrap_err();
        assert!(matches!(err, ConstraintError::EmptyValue { .. }), "{err:?}");
        assert!(err.to_string().contains("empty value"));
    }

    #[test]
    fn matching_on_labels_name_and_id() {
        let node = NodeInfo {
            id: "n1".into(),
            name: "h1".into(),
            labels: [("zone".to_string(), "eu-1a".to_string())].into(),
            ready: true,
            availability: crate::Availability::Active,
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
            networks: false,
            host_paths: Vec::new(),
        };
        let m = |s: &str| s.parse::<Constraint>().unwrap().matches(&node);
        assert!(m("node.labels.zone == eu-1a"));
        assert!(!m("node.labels.zone != eu-1a"));
        assert!(!m("node.labels.zone == EU-1A"));
        assert!(!m("node.labels.disk == ssd"), "a missing label fails ==");
        assert!(m("node.labels.disk != ssd"), "a missing label passes !=");
        assert!(m("node.name == h1"));
        assert!(m("node.name != h3"));
        assert!(m("node.id == n1"));
        assert!(!m("node.id != n1"));
    }
}
