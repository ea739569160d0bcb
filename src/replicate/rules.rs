//! Which tables replicate where: matching a table against the `[[rules]]`.
//!
//! Rules exist at three levels: every namespace (`*`), one namespace, one
//! table. The most specific level that matches a table decides alone, so a
//! table rule can narrow (or widen) what its namespace rule says; rules of the
//! same level add up. Each match is a [`Route`]: a destination, the replica's
//! identifier there (the rule may put replicas under another namespace, for
//! fan-in) and what a source drop does.

use crate::catalog::{Namespace, TableIdent};
use crate::config::{NamespacePattern, OnDrop, RuleConfig};

/// Where one table replicates to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The destination's name.
    pub destination: String,
    /// The replica's identifier in the destination catalog.
    pub replica_table: TableIdent,
    /// What dropping the source does to this replica.
    pub on_drop: OnDrop,
    /// The prefixes the source's paths must be under (empty: any).
    pub source_prefixes: Vec<String>,
}

/// The configured rules.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<RuleConfig>,
}

impl Rules {
    /// Rules as configured.
    pub fn new(rules: Vec<RuleConfig>) -> Self {
        Self { rules }
    }

    /// Whether there are any rules at all.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Every route of `table`, one per destination.
    pub fn routes(&self, table: &TableIdent) -> Vec<Route> {
        let Some(level) = self.rules.iter().filter_map(|r| specificity(r, table)).max() else {
            return Vec::new();
        };
        let mut routes: Vec<Route> = Vec::new();
        for rule in self.rules.iter().filter(|r| specificity(r, table) == Some(level)) {
            for destination in &rule.destinations {
                if routes.iter().any(|r| &r.destination == destination) {
                    continue;
                }
                let namespace = rule.target_namespace.clone().unwrap_or_else(|| table.namespace.clone());
                routes.push(Route {
                    destination: destination.clone(),
                    replica_table: TableIdent::new(namespace, table.name.clone()),
                    on_drop: rule.on_drop,
                    source_prefixes: rule.source_prefixes.clone(),
                });
            }
        }
        routes
    }

    /// The route of `table` to `destination`, if a rule still names it.
    pub fn route(&self, table: &TableIdent, destination: &str) -> Option<Route> {
        self.routes(table).into_iter().find(|r| r.destination == destination)
    }

    /// The namespaces discovery must list: `None` when a `*` rule means all of them.
    pub fn namespaces(&self) -> Option<Vec<Namespace>> {
        let mut out: Vec<Namespace> = Vec::new();
        for rule in &self.rules {
            match &rule.namespace {
                NamespacePattern::Any => return None,
                NamespacePattern::Exact(ns) if !out.contains(ns) => out.push(ns.clone()),
                NamespacePattern::Exact(_) => {}
            }
        }
        Some(out)
    }
}

/// How specifically `rule` matches `table` (higher wins), or `None`.
fn specificity(rule: &RuleConfig, table: &TableIdent) -> Option<u8> {
    match (&rule.namespace, &rule.table) {
        (NamespacePattern::Any, _) => Some(0),
        (NamespacePattern::Exact(ns), None) if *ns == table.namespace => Some(1),
        (NamespacePattern::Exact(ns), Some(name)) if *ns == table.namespace && *name == table.name => Some(2),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(namespace: &str, table: Option<&str>, destinations: &[&str]) -> RuleConfig {
        RuleConfig {
            namespace: if namespace == "*" {
                NamespacePattern::Any
            } else {
                NamespacePattern::Exact(Namespace::from_dotted(namespace))
            },
            table: table.map(str::to_owned),
            destinations: destinations.iter().map(|d| (*d).to_owned()).collect(),
            target_namespace: None,
            on_drop: OnDrop::Keep,
            source_prefixes: Vec::new(),
        }
    }

    fn t(ns: &str, name: &str) -> TableIdent {
        TableIdent::new(Namespace::from_dotted(ns), name)
    }

    fn names(routes: &[Route]) -> Vec<&str> {
        routes.iter().map(|r| r.destination.as_str()).collect()
    }

    #[test]
    fn the_most_specific_level_decides() {
        let rules = Rules::new(vec![
            rule("*", None, &["all"]),
            rule("sales", None, &["dr", "eu"]),
            rule("sales", Some("raw"), &["archive"]),
        ]);
        assert_eq!(names(&rules.routes(&t("hr", "people"))), ["all"]);
        assert_eq!(names(&rules.routes(&t("sales", "orders"))), ["dr", "eu"]);
        assert_eq!(names(&rules.routes(&t("sales", "raw"))), ["archive"]);
        assert_eq!(rules.namespaces(), None, "a * rule lists everything");
    }

    #[test]
    fn same_level_rules_add_up_and_nested_namespaces_are_exact() {
        let rules = Rules::new(vec![rule("a.b", None, &["x"]), rule("a.b", None, &["y", "x"])]);
        assert_eq!(names(&rules.routes(&t("a.b", "t"))), ["x", "y"]);
        assert!(rules.routes(&t("a", "t")).is_empty());
        assert!(rules.routes(&t("a.b.c", "t")).is_empty());
        assert_eq!(rules.namespaces(), Some(vec![Namespace::from_dotted("a.b")]));
    }

    #[test]
    fn target_namespace_renames_the_replica_for_fan_in() {
        let mut r = rule("eu", None, &["analytics"]);
        r.target_namespace = Some(Namespace::from_dotted("all.eu"));
        r.on_drop = OnDrop::Propagate;
        let routes = Rules::new(vec![r]).routes(&t("eu", "orders"));
        assert_eq!(routes[0].replica_table, t("all.eu", "orders"));
        assert_eq!(routes[0].on_drop, OnDrop::Propagate);
    }
}
