//! The read-only mark: a table property every replica carries, naming the
//! source table it follows and the destination it was made for.
//!
//! icerelay sets it on every replica it makes or follows, as a property the
//! destination owns (the source's own value, if any, never wins). Any icerelay
//! whose primary holds a marked table refuses engine writes to it
//! ([`crate::proxy::read_only`]), so a replica cannot drift from its source
//! by accident; promotion (`icerelay promote`) removes the mark and the lane
//! stops following.

use std::collections::BTreeMap;

use reqwest::Url;

use crate::catalog::TableIdent;

/// The property key.
pub const REPLICA_OF: &str = "icerelay.replica-of";

/// The header with which the icerelay that keeps replicas writes them, so
/// that an icerelay in front of the replica catalog lets its commits through.
/// It names the writer as the mark does ([`writer`]); it is not a secret
/// (the mark is readable by anyone who may load the table): the read-only
/// mark prevents accidents, and who may write at all is the catalog's
/// authorization.
pub const WRITER_HEADER: &str = "x-icerelay-replica-writer";

/// The mark's value: `<source table> at <primary uri> (destination <name>)`.
/// The URI is shown without credentials or query.
pub fn value(source_table: &TableIdent, primary: &Url, destination: &str) -> String {
    format!("{source_table} at {}", writer(primary, destination))
}

/// Who writes a destination's replicas: `<primary uri> (destination <name>)`,
/// the end of every mark it sets.
pub fn writer(primary: &Url, destination: &str) -> String {
    format!("{} (destination {destination})", display_uri(primary))
}

/// Whether `mark` was set by `writer` (a [`WRITER_HEADER`] value).
pub fn written_by(mark: &str, writer: &str) -> bool {
    mark.strip_suffix(writer).is_some_and(|rest| rest.ends_with(" at "))
}

/// The properties a replica gets from its destination: the configured ones,
/// then the mark.
pub fn replica_properties(configured: &BTreeMap<String, String>, mark: String) -> BTreeMap<String, String> {
    let mut properties = configured.clone();
    properties.insert(REPLICA_OF.to_owned(), mark);
    properties
}

/// The command that promotes a replica, from its mark (which names the
/// destination); the general form when the mark does not parse.
pub fn promote_hint(mark: &str) -> String {
    let destination = mark.rsplit_once("(destination ").and_then(|(_, rest)| rest.strip_suffix(')'));
    let source = mark.split_once(" at ").map(|(table, _)| table);
    match (source, destination) {
        (Some(source), Some(destination)) => {
            format!("icerelay promote --table {source} --destination {destination}")
        }
        _ => "icerelay promote --table <source table> --destination <destination>".to_owned(),
    }
}

/// A URI as it may be shown anywhere: no user, password or query.
pub fn display_uri(uri: &Url) -> String {
    let mut shown = uri.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Namespace;

    #[test]
    fn the_mark_names_the_source_without_credentials() {
        let table = TableIdent::new(Namespace::new(vec!["sales".into()]), "orders");
        let uri = Url::parse("https://user:secret@catalog.example/api?token=abc").unwrap();
        let mark = value(&table, &uri, "dr");
        assert_eq!(mark, "sales.orders at https://catalog.example/api (destination dr)");
        let props = replica_properties(&BTreeMap::from([(REPLICA_OF.to_owned(), "forged".to_owned())]), mark.clone());
        assert_eq!(props.get(REPLICA_OF), Some(&mark));
        assert_eq!(promote_hint(&mark), "icerelay promote --table sales.orders --destination dr");
        assert!(promote_hint("made by hand").contains("<destination>"));
        assert!(written_by(&mark, &writer(&uri, "dr")));
        assert!(!written_by(&mark, &writer(&uri, "other")));
        assert!(!written_by(&mark, "(destination dr)"), "the writer names the primary too");
    }
}
