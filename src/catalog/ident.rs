//! Namespace and table identifiers, and their forms in REST paths.
//!
//! The REST spec puts a multi-level namespace into one path segment, its
//! levels joined by the unit separator (0x1F) and percent-encoded (`a%1Fb`).
//! Bodies carry namespaces as JSON arrays of strings. These types hold the
//! levels themselves and convert to and from both forms.

use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde::{Deserialize, Serialize};

/// Characters left unencoded in a path segment (RFC 3986 unreserved).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// The separator between namespace levels in a REST path segment.
const LEVEL_SEPARATOR: char = '\u{1f}';

/// A namespace: one or more levels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Namespace(Vec<String>);

impl Namespace {
    /// A namespace from its levels.
    pub fn new(levels: Vec<String>) -> Self {
        Self(levels)
    }

    /// A namespace written with dots between levels (`a.b`), as in config files.
    pub fn from_dotted(s: &str) -> Self {
        Self(s.split('.').map(str::to_owned).collect())
    }

    /// Decodes the `{namespace}` segment of a REST path.
    ///
    /// Returns `None` when the percent-decoded bytes are not UTF-8.
    pub fn from_path_segment(segment: &str) -> Option<Self> {
        let decoded = percent_decode_str(segment).decode_utf8().ok()?;
        Some(Self(decoded.split(LEVEL_SEPARATOR).map(str::to_owned).collect()))
    }

    /// Encodes the namespace as a REST path segment.
    pub fn to_path_segment(&self) -> String {
        self.0.iter().map(|level| utf8_percent_encode(level, SEGMENT).to_string()).collect::<Vec<_>>().join("%1F")
    }

    /// The levels.
    pub fn levels(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// A table: its namespace and name, as the REST spec's `TableIdentifier`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TableIdent {
    /// The namespace.
    pub namespace: Namespace,
    /// The table's name.
    pub name: String,
}

impl TableIdent {
    /// Builds an identifier.
    pub fn new(namespace: Namespace, name: impl Into<String>) -> Self {
        Self { namespace, name: name.into() }
    }

    /// Decodes the `{namespace}` and `{table}` segments of a REST path.
    pub fn from_path_segments(namespace: &str, table: &str) -> Option<Self> {
        let name = percent_decode_str(table).decode_utf8().ok()?.into_owned();
        Some(Self { namespace: Namespace::from_path_segment(namespace)?, name })
    }

    /// Encodes the table name as a REST path segment.
    pub fn name_path_segment(&self) -> String {
        utf8_percent_encode(&self.name, SEGMENT).to_string()
    }
}

impl fmt::Display for TableIdent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_round_trip() {
        let ns = Namespace::from_path_segment("a%1Fb%20c").expect("utf8");
        assert_eq!(ns.levels(), ["a", "b c"]);
        assert_eq!(ns.to_path_segment(), "a%1Fb%20c");
        assert_eq!(ns.to_string(), "a.b c");
        let t = TableIdent::from_path_segments("db", "ev%2Fents").expect("utf8");
        assert_eq!(t.name, "ev/ents");
        assert_eq!(t.name_path_segment(), "ev%2Fents");
        assert_eq!(t.to_string(), "db.ev/ents");
    }

    #[test]
    fn body_form_is_the_spec_table_identifier() {
        let t: TableIdent = serde_json::from_str(r#"{"namespace":["a","b"],"name":"t"}"#).expect("valid");
        assert_eq!(t, TableIdent::new(Namespace::new(vec!["a".into(), "b".into()]), "t"));
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        assert!(Namespace::from_path_segment("%FF").is_none());
    }
}
