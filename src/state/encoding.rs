//! How state values are written as database text, shared by both stores.
//!
//! Namespaces are JSON arrays of their levels (a level may hold a dot), hint
//! kinds are short words, and structured lane fields (refs, adoption, drift)
//! are JSON documents, so the embedded and the shared store read each
//! other's values and a schema change is a migration, not a format change.

use crate::catalog::{Namespace, TableIdent};
use crate::proxy::commit_tap::{CommitHint, HintKind};

/// A namespace as stored: the JSON array of its levels.
pub fn ns_text(ns: &Namespace) -> String {
    serde_json::to_string(ns.levels()).unwrap_or_else(|_| "[]".into())
}

/// A stored namespace.
pub fn ns_parse(text: &str) -> Result<Namespace, serde_json::Error> {
    serde_json::from_str::<Vec<String>>(text).map(Namespace::new)
}

/// A hint's kind as stored.
pub fn hint_kind(kind: &HintKind) -> &'static str {
    match kind {
        HintKind::Commit => "commit",
        HintKind::Drop => "drop",
        HintKind::Rename { .. } => "rename",
    }
}

/// The renamed-from table of a rename hint, as stored (namespace text, name).
pub fn hint_from(hint: &CommitHint) -> (Option<String>, Option<String>) {
    match &hint.kind {
        HintKind::Rename { from } => (Some(ns_text(&from.namespace)), Some(from.name.clone())),
        _ => (None, None),
    }
}

/// A hint kind from its stored word and renamed-from table.
pub fn hint_kind_parse(
    kind: &str,
    from_namespace: Option<&str>,
    from_name: Option<String>,
) -> Result<HintKind, serde_json::Error> {
    Ok(match kind {
        "drop" => HintKind::Drop,
        "rename" => HintKind::Rename {
            from: TableIdent::new(ns_parse(from_namespace.unwrap_or("[]"))?, from_name.unwrap_or_default()),
        },
        _ => HintKind::Commit,
    })
}

/// A structured value as stored JSON.
pub fn to_json<T: serde::Serialize>(value: Option<&T>) -> Option<String> {
    value.and_then(|v| serde_json::to_string(v).ok())
}
