//! The planner: what the next replica commit must be, from the source's
//! metadata and the replica's.
//!
//! Pure and level-triggered: it looks only at the two current metadata
//! documents (as raw JSON, so nothing it does not know is lost) and at what
//! icerelay has written before, and answers with the one commit that brings
//! the replica a step closer to the source, or with nothing when they agree.
//! The lane applies that commit, and asks again with the replica's new
//! metadata. So a lost hint, a restart or an unknown commit outcome all end
//! the same way: the plan is made again from what is really there.
//!
//! The rules of a replica (see DESIGN.md, "What a replica must be"):
//!
//! - **One commit per source commit**, in sequence-number order: the
//!   snapshots the source committed together (an overwrite's delete and
//!   append) go in one commit ([`commit_group`]), so that the replica's
//!   snapshot-log equals the source's; each commit carries the metadata-only
//!   changes that are pending (new schemas, specs, sort
//!   orders, current schema, default spec and order, properties, format
//!   version, statistics). Catalogs refuse a snapshot more than a minute older
//!   than the table's `last-updated-ms`, and a commit without a snapshot sets
//!   it to now; folding keeps every snapshot acceptable.
//! - **Historical fields are only ever added**: nothing removes a snapshot,
//!   schema or spec from the replica, so source expiry stays on the source.
//! - **Active state follows the source**: refs (branches and tags),
//!   properties, format version. A branch moves through its history one
//!   snapshot at a time (each main-branch snapshot gets its snapshot-log
//!   entry); tags and other branches are set once their snapshot is there.
//! - **Replica-specific fields are the replica's own**: location, paths
//!   (rewritten through the lane's [`PathMap`]), properties set by the
//!   destination or by an operator.
//! - **Divergence is reported, never overwritten**: a snapshot or ref on the
//!   replica that neither the source has nor icerelay wrote stops the lane.
//! - Every commit carries `assert-table-uuid` and `assert-ref-snapshot-id`
//!   for `main` and for each ref it moves, so a concurrent writer on the
//!   replica makes the commit fail instead of being overwritten.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use crate::rewrite::metadata::{PATH_PROPERTIES, snapshot_ids};
use crate::rewrite::{PathMap, RewriteError, SequenceShift};

/// The branch every table has.
pub const MAIN: &str = "main";

/// Why no plan can be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The replica has something the source does not, and icerelay did not write it.
    #[error(
        "the replica has diverged from the source: {detail}; icerelay does not overwrite it. Remove what was written \
         on the replica (or drop the replica table to have it made again), then resync the lane"
    )]
    Diverged {
        /// What differs.
        detail: String,
    },
    /// The replica table existed before the lane with snapshots the source
    /// does not have (the old primary after a failover): an operator chooses.
    #[error("{detail}")]
    FailbackChoiceNeeded {
        /// What it has, and the choices.
        detail: String,
    },
    /// A partition spec would get another id on the replica than on the
    /// source; manifests name specs by id, so the replica would be unreadable.
    #[error(
        "partition spec {source_id} of the source is {detail} on the replica; manifests refer to specs by id, so \
         the replica cannot take this table's files. Drop the replica table and resync"
    )]
    SpecMismatch {
        /// The source's spec id.
        source_id: i64,
        /// What the replica has instead.
        detail: String,
    },
    /// The metadata is not what the Iceberg spec describes.
    #[error("{which} metadata is not valid Iceberg table metadata: {detail}")]
    InvalidMetadata {
        /// `source` or `replica`.
        which: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// A path cannot be mapped to the replica.
    #[error(transparent)]
    Rewrite(#[from] RewriteError),
}

/// What the planner compares.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// The source's current metadata.
    pub source: &'a Value,
    /// Where the source metadata was read (for messages).
    pub source_file: &'a str,
    /// The replica's current metadata.
    pub replica: &'a Value,
    /// Snapshot ids icerelay committed (or registered) on this replica.
    pub replicated: &'a BTreeSet<i64>,
    /// Source paths to replica paths.
    pub map: &'a PathMap,
    /// Property keys icerelay set from the source before (only these are
    /// removed when the source removes them).
    pub managed_properties: &'a BTreeSet<String>,
    /// The refs icerelay set on the replica before, and where it set them.
    pub managed_refs: &'a BTreeMap<String, i64>,
    /// Properties the destination sets on every replica (they win over the source's).
    pub destination_properties: &'a BTreeMap<String, String>,
    /// How the lane follows a replica table it adopted with snapshots of its
    /// own (failback); `None` for every replica icerelay made.
    pub adopted: Option<Adopted<'a>>,
    /// Snapshots of this table that the proxy saw one source commit add
    /// together, among them the first one the replica lacks (empty: none
    /// known). The snapshot-log shows what one commit added to `main`; this
    /// is how the snapshots one commit added to another branch are known.
    pub committed_together: &'a [i64],
}

/// A replica table adopted with snapshots the source does not have.
#[derive(Debug, Clone, Copy)]
pub struct Adopted<'a> {
    /// Those snapshots: kept, and a ref at one of them may be moved.
    pub unreplicated: &'a BTreeSet<i64>,
    /// The branch that keeps them, and the snapshot it points at.
    pub kept_branch: Option<(&'a str, i64)>,
    /// The table's own refs at them (besides `main`), kept as they are.
    pub kept_refs: &'a [String],
    /// Where its `main` was when adopted: icerelay moves it on from there.
    pub main_at: Option<i64>,
    /// How the source's sequence numbers differ on the replica.
    pub sequence_shift: Option<SequenceShift>,
}

impl Adopted<'_> {
    fn tolerates(&self, id: i64) -> bool {
        self.unreplicated.contains(&id)
    }

    fn keeps(&self, name: &str) -> bool {
        self.kept_branch.is_some_and(|(kept, _)| kept == name) || self.kept_refs.iter().any(|r| r == name)
    }

    /// Whether `name` at `id` is where the adopted table's `main` was.
    fn main_was(&self, name: &str, id: i64) -> bool {
        name == MAIN && self.main_at == Some(id)
    }
}

/// One replica commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// `requirements` of the `updateTable` request.
    pub requirements: Vec<Value>,
    /// `updates` of the `updateTable` request.
    pub updates: Vec<Value>,
    /// The source snapshots this commit adds, in order (several when the
    /// source committed them together); their files must be copied first.
    pub snapshots: Vec<i64>,
    /// Snapshots whose statistics files this commit references (copy them first).
    pub statistics_of: BTreeSet<i64>,
    /// Property keys managed from the source once this commit is applied.
    pub managed_properties: BTreeSet<String>,
    /// The replica's refs once this commit is applied (all set by icerelay).
    pub managed_refs: BTreeMap<String, i64>,
    /// Source snapshots still missing on the replica before this commit.
    pub snapshots_behind: usize,
}

impl Step {
    /// A short description for logs: the update actions in order.
    pub fn describe(&self) -> String {
        let actions: Vec<&str> = self.updates.iter().filter_map(|u| u.get("action").and_then(Value::as_str)).collect();
        match self.snapshots.as_slice() {
            [] => format!("metadata ({})", actions.join(", ")),
            [id] => format!("snapshot {id} ({})", actions.join(", ")),
            ids => {
                let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
                format!("snapshots {} in one commit ({})", ids.join(", "), actions.join(", "))
            }
        }
    }
}

/// Source snapshots the replica does not have.
pub fn snapshots_behind(source: &Value, replica: &Value) -> usize {
    snapshots_missing_from(source, &snapshot_ids(replica))
}

/// Source snapshots that are not among `replicated` (what icerelay recorded
/// as committed to the replica), for when the replica cannot be loaded.
pub fn snapshots_missing_from(source: &Value, replicated: &BTreeSet<i64>) -> usize {
    snapshots(source).iter().filter(|s| id_of(s).is_some_and(|id| !replicated.contains(&id))).count()
}

/// Plans the next replica commit; `None` when the replica agrees with the source.
///
/// In phases: divergence, the format version, historical fields (a commit of
/// their own when the catalog may number them differently), active state,
/// properties, statistics, then the next snapshot with the refs it moves (or,
/// with no snapshot missing, the refs alone).
pub fn next_step(input: &PlanInput<'_>) -> Result<Option<Step>, PlanError> {
    let source = Table::new(input.source, "source")?;
    let replica = Table::new(input.replica, "replica")?;
    check_divergence(&source, &replica, input.replicated, input.managed_refs, input.adopted)?;

    let missing = source.missing_on(&replica);
    let group = commit_group(&source, &missing, input.committed_together);
    let next = group.first().copied();
    let mut updates = Vec::new();

    // Format version first: later updates may need it. But a v3 table takes
    // only snapshots with row lineage (`first-row-id`): snapshots written
    // before the source's upgrade go in first.
    if source.format_version > replica.format_version
        && (source.format_version < 3 || next.is_none_or(|s| s.get("first-row-id").is_some_and(|v| !v.is_null())))
    {
        updates.push(json!({"action": "upgrade-format-version", "format-version": source.format_version}));
    }

    let history = historical_updates(&source, &replica)?;
    updates.extend(history.updates.iter().cloned());
    if history.assigned_elsewhere {
        // Ids the catalog may number differently go in a commit of their
        // own, so that the next plan can read back what they became.
        return Ok(Some(Step {
            requirements: requirements(&replica, &BTreeSet::new()),
            updates,
            snapshots: Vec::new(),
            statistics_of: BTreeSet::new(),
            managed_properties: input.managed_properties.clone(),
            managed_refs: replica.ref_ids(),
            snapshots_behind: missing.len(),
        }));
    }
    updates.extend(active_state_updates(&source, &replica, &history));
    let (property_updates, managed_properties) = properties(&source, &replica, input)?;
    updates.extend(property_updates);
    let (statistics, statistics_of) = statistics_updates(&source, &replica, &group, input)?;
    updates.extend(statistics);
    let (ref_updates, moved) = if group.is_empty() {
        ref_updates(&source, &replica)
    } else {
        snapshot_updates(&source, &replica, &group, &history, input)?
    };
    updates.extend(ref_updates);
    let (cleanup, cleaned) = ref_cleanup(&source, &replica, input.adopted);
    updates.extend(cleanup);

    if updates.is_empty() {
        return Ok(None);
    }
    let mut moved = moved;
    moved.extend(cleaned);
    Ok(Some(Step {
        requirements: requirements(&replica, &moved),
        managed_refs: refs_after(&replica, &updates),
        updates,
        snapshots: group.iter().filter_map(|s| id_of(s)).collect(),
        statistics_of,
        managed_properties,
        snapshots_behind: missing.len(),
    }))
}

/// The source snapshots the next replica commit adds: the first missing
/// one and, when the source committed it together with the next ones, those
/// too, so that the replica's snapshot-log equals the source's.
///
/// Iceberg's metadata builders leave out of the snapshot-log a snapshot that
/// one commit added and then replaced as `main` (an overwrite's delete
/// snapshot, say): a snapshot of `main`'s history that the log does not list,
/// though newer than the log's first entry, was committed with its child.
/// So was the root of `main` whose child is the log's first entry (a table's
/// first commit that added several snapshots). Other older snapshots, from
/// before the log was trimmed, are committed one by one.
///
/// Snapshots one commit added to another branch are in no log: where the
/// proxy saw that commit (`together`), its snapshots go in one commit too,
/// as far as they follow one another.
fn commit_group<'a>(source: &Table<'a>, missing: &[&'a Value], together: &[i64]) -> Vec<&'a Value> {
    let Some(first) = missing.first().copied() else { return Vec::new() };
    if id_of(first).is_some_and(|id| together.contains(&id)) {
        return chain(first, missing, |_, child| id_of(child).is_some_and(|id| together.contains(&id)));
    }
    let log = source.list("snapshot-log");
    let logged: BTreeSet<i64> = log.iter().filter_map(|e| e.get("snapshot-id").and_then(Value::as_i64)).collect();
    let Some(log_start) = log.iter().filter_map(|e| e.get("timestamp-ms").and_then(Value::as_i64)).min() else {
        return vec![first];
    };
    let log_first = log
        .iter()
        .find(|e| e.get("timestamp-ms").and_then(Value::as_i64) == Some(log_start))
        .and_then(|e| e.get("snapshot-id").and_then(Value::as_i64));
    let first_commit_before_log = |snapshot: &Value| {
        snapshot.get("parent-snapshot-id").and_then(Value::as_i64).is_none()
            && missing.iter().any(|child| {
                child.get("parent-snapshot-id").and_then(Value::as_i64) == id_of(snapshot)
                    && id_of(child).is_some_and(|id| Some(id) == log_first)
            })
    };
    let unlogged = |snapshot: &Value| {
        id_of(snapshot).is_some_and(|id| !logged.contains(&id))
            && (snapshot.get("timestamp-ms").and_then(Value::as_i64).is_some_and(|ts| ts >= log_start)
                || first_commit_before_log(snapshot))
    };
    if !unlogged(first) {
        return vec![first];
    }
    let main_history = source.history_of(MAIN);
    let on_main = |snapshot: &Value| id_of(snapshot).is_some_and(|id| main_history.contains(&id));
    if !on_main(first) {
        return vec![first];
    }
    // An unlogged snapshot of main was committed with its child.
    chain(first, missing, |parent, child| unlogged(parent) && on_main(child))
}

/// `first` and the snapshots after it in `missing`, as long as each is the
/// child of the one before and `belongs(parent, child)`.
fn chain<'a>(first: &'a Value, missing: &[&'a Value], belongs: impl Fn(&Value, &Value) -> bool) -> Vec<&'a Value> {
    let mut group = vec![first];
    while let Some(last) = group.last().copied()
        && let Some(child) = missing.get(group.len()).copied()
        && child.get("parent-snapshot-id").and_then(Value::as_i64) == id_of(last)
        && belongs(last, child)
    {
        group.push(child);
    }
    group
}

/// The historical fields the replica lacks, and where each source id is on
/// the replica.
struct History {
    updates: Vec<Value>,
    /// Source schema id to the replica's, for schemas it has.
    schema_ids: BTreeMap<i64, i64>,
    /// Source schema id to the id the catalog will give it, for added ones.
    added_schemas: BTreeMap<i64, i64>,
    /// Source sort order id to the replica's, for orders it has.
    order_ids: BTreeMap<i64, i64>,
    /// Source sort order ids added by these updates.
    added_orders: BTreeSet<i64>,
    /// Some id would not be the one the catalog assigns (the next free one).
    assigned_elsewhere: bool,
}

impl History {
    fn schema_on_replica(&self, id: i64) -> Option<i64> {
        self.schema_ids.get(&id).or_else(|| self.added_schemas.get(&id)).copied()
    }

    fn order_on_replica(&self, id: i64) -> Option<i64> {
        self.order_ids.get(&id).copied().or_else(|| self.added_orders.contains(&id).then_some(id))
    }
}

/// Historical fields, only ever added: schemas, partition specs, sort orders.
fn historical_updates(source: &Table<'_>, replica: &Table<'_>) -> Result<History, PlanError> {
    let mut updates = Vec::new();
    let schema_ids = match_by_structure(source.schemas(), replica.schemas(), "schema-id", same_schema);
    let mut next_schema_id = replica.max_id(replica.schemas(), "schema-id") + 1;
    let mut assigned_elsewhere = false;
    let mut added_schemas = BTreeMap::new();
    for schema in source.schemas() {
        let Some(id) = schema.get("schema-id").and_then(Value::as_i64) else { continue };
        if schema_ids.contains_key(&id) {
            continue;
        }
        assigned_elsewhere |= id != next_schema_id;
        added_schemas.insert(id, next_schema_id);
        next_schema_id += 1;
        updates.push(json!({"action": "add-schema", "schema": schema, "last-column-id": source.last_column_id()}));
    }
    let mut added_specs = 0;
    for spec in source.specs() {
        let Some(id) = spec.get("spec-id").and_then(Value::as_i64) else { continue };
        match replica.specs().iter().find(|s| s.get("spec-id").and_then(Value::as_i64) == Some(id)) {
            Some(there) if same_fields(spec, there) => continue,
            Some(there) => {
                return Err(PlanError::SpecMismatch {
                    source_id: id,
                    detail: format!(
                        "a different spec ({} on the replica, {} on the source)",
                        fields(there),
                        fields(spec)
                    ),
                });
            }
            None => {}
        }
        if let Some(there) = replica.specs().iter().find(|s| same_fields(spec, s)) {
            return Err(PlanError::SpecMismatch {
                source_id: id,
                detail: format!("spec {} (same fields, other id)", there.get("spec-id").unwrap_or(&Value::Null)),
            });
        }
        assigned_elsewhere |= id != replica.max_id(replica.specs(), "spec-id") + 1 + added_specs;
        added_specs += 1;
        updates.push(json!({"action": "add-spec", "spec": spec}));
    }
    let order_ids = match_by_structure(source.sort_orders(), replica.sort_orders(), "order-id", same_fields);
    let mut added_orders = BTreeSet::new();
    for order in source.sort_orders() {
        let Some(id) = order.get("order-id").and_then(Value::as_i64) else { continue };
        if !order_ids.contains_key(&id) {
            assigned_elsewhere |=
                id != replica.max_id(replica.sort_orders(), "order-id").max(0) + 1 + added_orders.len() as i64;
            added_orders.insert(id);
            updates.push(json!({"action": "add-sort-order", "sort-order": order}));
        }
    }
    Ok(History { updates, schema_ids, added_schemas, order_ids, added_orders, assigned_elsewhere })
}

/// Active state: current schema, default spec and sort order.
fn active_state_updates(source: &Table<'_>, replica: &Table<'_>, history: &History) -> Vec<Value> {
    let mut updates = Vec::new();
    if let Some(current) = source.int("current-schema-id").and_then(|id| history.schema_on_replica(id))
        && replica.int("current-schema-id") != Some(current)
    {
        updates.push(json!({"action": "set-current-schema", "schema-id": current}));
    }
    if let Some(spec) = source.int("default-spec-id")
        && replica.int("default-spec-id") != Some(spec)
    {
        updates.push(json!({"action": "set-default-spec", "spec-id": spec}));
    }
    if let Some(order) = source.int("default-sort-order-id").and_then(|id| history.order_on_replica(id))
        && replica.int("default-sort-order-id") != Some(order)
    {
        updates.push(json!({"action": "set-default-sort-order", "sort-order-id": order}));
    }
    updates
}

/// Statistics of snapshots the replica has (or gets in this commit), and
/// the snapshots whose statistics files must be copied first.
fn statistics_updates(
    source: &Table<'_>,
    replica: &Table<'_>,
    group: &[&Value],
    input: &PlanInput<'_>,
) -> Result<(Vec<Value>, BTreeSet<i64>), PlanError> {
    let mut updates = Vec::new();
    let mut statistics_of = BTreeSet::new();
    let on_replica = |id: i64| replica.has_snapshot(id) || group.iter().any(|n| id_of(n) == Some(id));
    for (field, action_name) in [("statistics", "set-statistics"), ("partition-statistics", "set-partition-statistics")]
    {
        for entry in source.list(field) {
            let Some(id) = entry.get("snapshot-id").and_then(Value::as_i64).filter(|id| on_replica(*id)) else {
                continue;
            };
            let mut rewritten = entry.clone();
            if let Some(path) = entry.get("statistics-path").and_then(Value::as_str)
                && let Some(obj) = rewritten.as_object_mut()
            {
                obj.insert("statistics-path".into(), Value::String(input.map.rewrite(path, input.source_file)?));
            }
            let there = replica.list(field).iter().find(|e| e.get("snapshot-id").and_then(Value::as_i64) == Some(id));
            if there.map(normalized) != Some(normalized(&rewritten)) {
                statistics_of.insert(id);
                updates.push(if field == "statistics" {
                    json!({"action": action_name, "snapshot-id": id, "statistics": rewritten})
                } else {
                    json!({"action": action_name, "partition-statistics": rewritten})
                });
            }
        }
    }
    Ok((updates, statistics_of))
}

/// The next snapshots (one, or those the source committed together), each
/// with its manifest list at the replica, its schema id there and (after a
/// failback) its shifted sequence number, and the refs they move: those that
/// point at one of them, and branches whose history passes through the last.
fn snapshot_updates(
    source: &Table<'_>,
    replica: &Table<'_>,
    group: &[&Value],
    history: &History,
    input: &PlanInput<'_>,
) -> Result<(Vec<Value>, BTreeSet<String>), PlanError> {
    let mut updates = Vec::new();
    let mut ids = Vec::new();
    for snapshot in group {
        let (id, added) = replica_snapshot(snapshot, history, input)?;
        updates.push(json!({"action": "add-snapshot", "snapshot": added}));
        ids.push(id);
    }
    let Some(last) = ids.last().copied() else { return Ok((updates, BTreeSet::new())) };
    let mut moved = BTreeSet::new();
    let main_was = |name: &str, at: i64| input.adopted.is_some_and(|a| a.main_was(name, at));
    for (name, target) in source.refs() {
        // An adopted table's main moves on from where it was to the source's history.
        let follows = |on_replica: Option<i64>| {
            name == MAIN && on_replica.is_none()
                || on_replica.is_some_and(|r| source.is_ancestor(r, last, replica) || main_was(&name, r))
        };
        let to = if ids.contains(&target.id) {
            Some(target.id)
        } else if target.is_branch() && source.is_ancestor(last, target.id, replica) && follows(replica.ref_id(&name)) {
            Some(last)
        } else {
            None
        };
        if let Some(to) = to {
            updates.push(set_ref(&name, target.json, to));
            moved.insert(name);
        }
    }
    Ok((updates, moved))
}

/// A source snapshot as the replica gets it: its manifest list at the
/// replica, its schema id there and (after a failback) its shifted sequence number.
fn replica_snapshot(snapshot: &Value, history: &History, input: &PlanInput<'_>) -> Result<(i64, Value), PlanError> {
    let id = id_of(snapshot).ok_or_else(|| invalid("source", "a snapshot has no `snapshot-id`"))?;
    let mut added = snapshot.clone();
    let obj = added.as_object_mut().ok_or_else(|| invalid("source", "a snapshot is not an object"))?;
    // An optional field may be null or absent in metadata, but Java
    // Iceberg's parser refuses a null in a request ("Cannot parse to a long
    // value: parent-snapshot-id: null").
    obj.retain(|_, v| !v.is_null());
    let list = snapshot.get("manifest-list").and_then(Value::as_str).ok_or_else(|| {
        invalid("source", &format!("snapshot {id} has no `manifest-list` (v1 inline manifests cannot be replayed)"))
    })?;
    obj.insert("manifest-list".into(), Value::String(input.map.rewrite(list, input.source_file)?));
    if let (Some(shift), Some(n)) =
        (input.map.sequence_shift(), snapshot.get("sequence-number").and_then(Value::as_i64))
    {
        obj.insert("sequence-number".into(), json!(shift.apply(n)));
    }
    if let Some(schema) = snapshot.get("schema-id").and_then(Value::as_i64) {
        let mapped = history.schema_on_replica(schema).ok_or_else(|| {
            invalid("source", &format!("snapshot {id} names schema {schema}, which the source does not have"))
        })?;
        obj.insert("schema-id".into(), json!(mapped));
    }
    Ok((id, added))
}

/// With no snapshot missing: refs set (or changed) where the source has them.
fn ref_updates(source: &Table<'_>, replica: &Table<'_>) -> (Vec<Value>, BTreeSet<String>) {
    let mut updates = Vec::new();
    let mut moved = BTreeSet::new();
    for (name, target) in source.refs() {
        if !replica.has_snapshot(target.id) {
            continue;
        }
        let there = replica.refs().into_iter().find(|(n, _)| *n == name).map(|(_, r)| r);
        if there.is_none_or(|r| r.id != target.id || !same_ref_settings(r.json, target.json)) {
            updates.push(set_ref(&name, target.json, target.id));
            moved.insert(name);
        }
    }
    (updates, moved)
}

/// The branch that keeps an adopted table's own snapshots, and the removal
/// of refs the source no longer has (every ref on the replica was set by
/// icerelay, else it diverged; an adopted table's own refs are kept).
fn ref_cleanup(
    source: &Table<'_>,
    replica: &Table<'_>,
    adopted: Option<Adopted<'_>>,
) -> (Vec<Value>, BTreeSet<String>) {
    let mut updates = Vec::new();
    let mut moved = BTreeSet::new();
    if let Some((name, id)) = adopted.and_then(|a| a.kept_branch)
        && replica.ref_id(name).is_none()
    {
        updates.push(json!({"action": "set-snapshot-ref", "ref-name": name, "type": "branch", "snapshot-id": id}));
        moved.insert(name.to_owned());
    }
    let source_refs: BTreeSet<String> = source.refs().into_iter().map(|(n, _)| n).collect();
    for (name, _) in replica.refs() {
        if !source_refs.contains(&name) && !adopted.is_some_and(|a| a.keeps(&name)) {
            updates.push(json!({"action": "remove-snapshot-ref", "ref-name": name}));
            moved.insert(name);
        }
    }
    (updates, moved)
}

/// The replica's refs once `updates` are applied.
fn refs_after(replica: &Table<'_>, updates: &[Value]) -> BTreeMap<String, i64> {
    let mut refs = replica.ref_ids();
    for update in updates {
        let name = update.get("ref-name").and_then(Value::as_str).unwrap_or_default().to_owned();
        match action(update) {
            "set-snapshot-ref" => {
                if let Some(id) = update.get("snapshot-id").and_then(Value::as_i64) {
                    refs.insert(name, id);
                }
            }
            "remove-snapshot-ref" => {
                refs.remove(&name);
            }
            _ => {}
        }
    }
    refs
}

/// `assert-table-uuid`, and `assert-ref-snapshot-id` for `main` and every moved ref.
fn requirements(replica: &Table<'_>, moved: &BTreeSet<String>) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(uuid) = replica.value.get("table-uuid").and_then(Value::as_str) {
        out.push(json!({"type": "assert-table-uuid", "uuid": uuid}));
    }
    let mut refs: BTreeSet<&str> = moved.iter().map(String::as_str).collect();
    refs.insert(MAIN);
    for name in refs {
        out.push(json!({"type": "assert-ref-snapshot-id", "ref": name, "snapshot-id": replica.ref_id(name)}));
    }
    out
}

fn set_ref(name: &str, source_ref: &Value, id: i64) -> Value {
    let mut update = json!({"action": "set-snapshot-ref", "ref-name": name, "snapshot-id": id,
        "type": source_ref.get("type").and_then(Value::as_str).unwrap_or("branch")});
    for key in ["max-ref-age-ms", "max-snapshot-age-ms", "min-snapshots-to-keep"] {
        if let (Some(v), Some(obj)) = (source_ref.get(key).filter(|v| !v.is_null()), update.as_object_mut()) {
            obj.insert(key.into(), v.clone());
        }
    }
    update
}

fn same_ref_settings(a: &Value, b: &Value) -> bool {
    ["type", "max-ref-age-ms", "max-snapshot-age-ms", "min-snapshots-to-keep"]
        .iter()
        .all(|k| a.get(*k).filter(|v| !v.is_null()) == b.get(*k).filter(|v| !v.is_null()))
}

/// Property updates and the keys managed afterwards.
fn properties(
    source: &Table<'_>,
    replica: &Table<'_>,
    input: &PlanInput<'_>,
) -> Result<(Vec<Value>, BTreeSet<String>), PlanError> {
    let mut desired: BTreeMap<String, String> = BTreeMap::new();
    for (key, value) in &source.properties() {
        let Some(text) = value.as_str() else { continue };
        if input.destination_properties.contains_key(key) {
            continue;
        }
        let text = if PATH_PROPERTIES.contains(&key.as_str()) {
            input.map.rewrite(text, &format!("{} (property {key})", input.source_file))?
        } else {
            text.to_owned()
        };
        desired.insert(key.clone(), text);
    }
    let managed: BTreeSet<String> = desired.keys().cloned().collect();
    desired.extend(input.destination_properties.iter().map(|(k, v)| (k.clone(), v.clone())));
    let current = replica.properties();
    let set: Map<String, Value> = desired
        .iter()
        .filter(|(k, v)| current.get(*k).and_then(Value::as_str) != Some(v.as_str()))
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let removed: Vec<&String> =
        current.keys().filter(|k| !desired.contains_key(*k) && input.managed_properties.contains(*k)).collect();
    let mut updates = Vec::new();
    if !set.is_empty() {
        updates.push(json!({"action": "set-properties", "updates": set}));
    }
    if !removed.is_empty() {
        updates.push(json!({"action": "remove-properties", "removals": removed}));
    }
    Ok((updates, managed))
}

/// The replica diverged when it has a snapshot that neither the source has
/// nor icerelay wrote, or a ref icerelay did not put where it is.
fn check_divergence(
    source: &Table<'_>,
    replica: &Table<'_>,
    replicated: &BTreeSet<i64>,
    managed_refs: &BTreeMap<String, i64>,
    adopted: Option<Adopted<'_>>,
) -> Result<(), PlanError> {
    let tolerated = |id: i64| adopted.is_some_and(|a| a.tolerates(id));
    let known = |id: i64| source.has_snapshot(id) || replicated.contains(&id) || tolerated(id);
    let foreign: Vec<String> =
        replica.snapshots().iter().filter_map(id_of).filter(|id| !known(*id)).map(|id| id.to_string()).collect();
    if !foreign.is_empty() {
        return Err(PlanError::Diverged {
            detail: format!(
                "snapshot(s) {} are on the replica but neither on the source nor written by icerelay",
                foreign.join(", ")
            ),
        });
    }
    let source_refs: BTreeMap<String, i64> = source.ref_ids();
    for (name, r) in replica.refs() {
        if adopted.is_some_and(|a| a.keeps(&name)) {
            continue;
        }
        if !known(r.id) {
            return Err(PlanError::Diverged {
                detail: format!("ref {name:?} points at snapshot {}, which the source does not have", r.id),
            });
        }
        let on_source = source_refs.get(&name).copied();
        // Where icerelay may have put the ref: where it recorded, where the
        // source has it now, or a step further along the source's history (a
        // commit that landed just before a crash, not recorded yet).
        // An adopted table's main, where it was, is icerelay's to move.
        let ours = adopted.is_some_and(|a| a.main_was(&name, r.id))
            || match managed_refs.get(&name) {
                Some(set) => {
                    r.id == *set
                        || on_source == Some(r.id)
                        || source.has_snapshot(r.id) && source.is_ancestor(*set, r.id, replica)
                }
                None => on_source.is_some_and(|target| source.is_ancestor(r.id, target, replica)),
            };
        if !ours {
            let detail = match managed_refs.get(&name) {
                Some(set) => {
                    format!("ref {name:?} was moved on the replica to snapshot {} (icerelay had set it to {set})", r.id)
                }
                None => format!("ref {name:?} (at snapshot {}) was created on the replica, not by icerelay", r.id),
            };
            return Err(PlanError::Diverged { detail });
        }
    }
    Ok(())
}

/// The property keys a replica of `source` takes from it: all but the ones
/// the destination sets itself.
pub fn managed_property_keys(source: &Value, destination_properties: &BTreeMap<String, String>) -> BTreeSet<String> {
    source
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().filter(|k| !destination_properties.contains_key(*k)).cloned().collect())
        .unwrap_or_default()
}

/// The newest snapshot of the source's `main` branch that the replica has
/// (the point two histories share, after a failover).
pub fn common_ancestor(source: &Value, replica: &Value) -> Option<i64> {
    let source = Table { value: source, format_version: 0 };
    let replica = Table { value: replica, format_version: 0 };
    let mut current = source.ref_id(MAIN);
    let mut steps = 0;
    while let Some(id) = current {
        if replica.has_snapshot(id) {
            return Some(id);
        }
        steps += 1;
        if steps > 100_000 {
            return None;
        }
        current = source.snapshot(id).and_then(|s| s.get("parent-snapshot-id")).and_then(Value::as_i64);
    }
    None
}

/// A field of one snapshot of a table's metadata (`timestamp-ms`, `sequence-number`).
pub fn snapshot_field(metadata: &Value, id: i64, key: &str) -> Option<i64> {
    snapshots(metadata).iter().find(|s| id_of(s) == Some(id))?.get(key)?.as_i64()
}

/// How the replica's snapshot-log times differ from the source's, over the
/// entries of snapshots both hold (the same ids, in the same order).
///
/// A ref move without a new snapshot (rollback, set-current-snapshot,
/// fast-forward) is a bare `set-snapshot-ref`, and the replica's catalog
/// stamps its log entry with its own commit time: the REST protocol has no
/// update that sets it. Time travel by timestamp between the two times
/// answers differently on the two sides.
pub fn log_drift(source: &Value, replica: &Value) -> LogDrift {
    let both = shared_snapshots(source, replica);
    let log = |m: &Value| -> Vec<(i64, i64)> {
        m.get("snapshot-log")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e.get("snapshot-id")?.as_i64()?, e.get("timestamp-ms")?.as_i64()?)))
            .filter(|(id, _)| both.contains(id))
            .collect()
    };
    let (theirs, ours) = (log(source), log(replica));
    // Aligned from the newest entry back: expiry trims a log's oldest
    // entries, so what one side lacks at the start is not drift. An entry
    // one side has and the other lacks (a ref move the replica skipped while
    // it lagged) is drift too, without a time difference to measure.
    let mut drift = LogDrift::default();
    let (mut i, mut j) = (theirs.len(), ours.len());
    while i > 0 && j > 0 {
        let ((a, at), (b, bt)) = (theirs[i - 1], ours[j - 1]);
        if a == b {
            let difference = i64::try_from(at.abs_diff(bt)).unwrap_or(i64::MAX);
            if difference != 0 {
                drift.entries += 1;
                drift.max_ms = drift.max_ms.max(difference);
            }
            i -= 1;
            j -= 1;
        } else {
            drift.entries += 1;
            if at >= bt { i -= 1 } else { j -= 1 }
        }
    }
    drift
}

/// See [`log_drift`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct LogDrift {
    /// Log entries whose time differs, or that one side has and the other lacks.
    pub entries: i64,
    /// The largest time difference of an entry both have, in milliseconds.
    pub max_ms: i64,
}

/// Snapshot ids the replica and the source both have.
pub fn shared_snapshots(source: &Value, replica: &Value) -> BTreeSet<i64> {
    let theirs = snapshot_ids(source);
    snapshot_ids(replica).into_iter().filter(|id| theirs.contains(id)).collect()
}

/// A table's refs by name.
pub fn ref_ids(metadata: &Value) -> BTreeMap<String, i64> {
    Table { value: metadata, format_version: 0 }.ref_ids()
}

/// A ref's target and its JSON.
struct RefTarget<'a> {
    id: i64,
    json: &'a Value,
}

impl RefTarget<'_> {
    fn is_branch(&self) -> bool {
        self.json.get("type").and_then(Value::as_str) != Some("tag")
    }
}

/// Read access to one metadata document.
struct Table<'a> {
    value: &'a Value,
    format_version: i64,
}

static EMPTY: Vec<Value> = Vec::new();

impl<'a> Table<'a> {
    fn new(value: &'a Value, which: &'static str) -> Result<Self, PlanError> {
        if !value.is_object() {
            return Err(invalid(which, "not a JSON object"));
        }
        let format_version =
            value.get("format-version").and_then(Value::as_i64).ok_or_else(|| invalid(which, "no `format-version`"))?;
        Ok(Self { value, format_version })
    }

    fn int(&self, key: &str) -> Option<i64> {
        self.value.get(key).and_then(Value::as_i64)
    }

    fn list(&self, key: &str) -> &'a [Value] {
        self.value.get(key).and_then(Value::as_array).map_or(EMPTY.as_slice(), Vec::as_slice)
    }

    fn snapshots(&self) -> &'a [Value] {
        self.list("snapshots")
    }

    fn schemas(&self) -> &'a [Value] {
        self.list("schemas")
    }

    fn specs(&self) -> &'a [Value] {
        self.list("partition-specs")
    }

    fn sort_orders(&self) -> &'a [Value] {
        self.list("sort-orders")
    }

    fn last_column_id(&self) -> Option<i64> {
        self.int("last-column-id")
    }

    fn max_id(&self, items: &[Value], key: &str) -> i64 {
        items.iter().filter_map(|i| i.get(key).and_then(Value::as_i64)).max().unwrap_or(-1)
    }

    fn properties(&self) -> Map<String, Value> {
        self.value.get("properties").and_then(Value::as_object).cloned().unwrap_or_default()
    }

    fn snapshot(&self, id: i64) -> Option<&'a Value> {
        self.snapshots().iter().find(|s| id_of(s) == Some(id))
    }

    fn has_snapshot(&self, id: i64) -> bool {
        self.snapshot(id).is_some()
    }

    /// Refs by name; a v1 table without `refs` has `main` at its current snapshot.
    fn refs(&self) -> Vec<(String, RefTarget<'a>)> {
        match self.value.get("refs").and_then(Value::as_object) {
            Some(refs) => refs
                .iter()
                .filter_map(|(name, r)| {
                    let id = r.get("snapshot-id").and_then(Value::as_i64)?;
                    Some((name.clone(), RefTarget { id, json: r }))
                })
                .collect(),
            None => {
                static BRANCH: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| json!({"type": "branch"}));
                match self.int("current-snapshot-id").filter(|id| *id >= 0) {
                    Some(id) => vec![(MAIN.to_owned(), RefTarget { id, json: &BRANCH })],
                    None => Vec::new(),
                }
            }
        }
    }

    fn ref_ids(&self) -> BTreeMap<String, i64> {
        self.refs().into_iter().map(|(n, r)| (n, r.id)).collect()
    }

    fn ref_id(&self, name: &str) -> Option<i64> {
        self.refs().into_iter().find(|(n, _)| n == name).map(|(_, r)| r.id)
    }

    /// The snapshots of `name`'s history: its target and every ancestor this table has.
    fn history_of(&self, name: &str) -> BTreeSet<i64> {
        let parents: std::collections::HashMap<i64, Option<i64>> = self
            .snapshots()
            .iter()
            .filter_map(|s| Some((id_of(s)?, s.get("parent-snapshot-id").and_then(Value::as_i64))))
            .collect();
        let mut ids = BTreeSet::new();
        let mut current = self.ref_id(name);
        while let Some(id) = current.filter(|id| parents.contains_key(id)) {
            if !ids.insert(id) {
                break;
            }
            current = parents.get(&id).copied().flatten();
        }
        ids
    }

    /// Source snapshots `other` lacks, oldest first.
    fn missing_on(&self, other: &Table<'_>) -> Vec<&'a Value> {
        let have = snapshot_ids(other.value);
        let mut missing: Vec<&Value> =
            self.snapshots().iter().filter(|s| id_of(s).is_some_and(|id| !have.contains(&id))).collect();
        missing.sort_by_key(|s| {
            (
                s.get("sequence-number").and_then(Value::as_i64).unwrap_or(0),
                s.get("timestamp-ms").and_then(Value::as_i64).unwrap_or(0),
                id_of(s).unwrap_or(0),
            )
        });
        missing
    }

    /// Whether `ancestor` is `id` or one of its ancestors, following parents
    /// through this table's snapshots and then `other`'s (which keeps
    /// snapshots this one expired).
    fn is_ancestor(&self, ancestor: i64, id: i64, other: &Table<'_>) -> bool {
        let mut current = Some(id);
        let mut steps = 0;
        while let Some(c) = current {
            if c == ancestor {
                return true;
            }
            steps += 1;
            if steps > 100_000 {
                return false;
            }
            current = self
                .snapshot(c)
                .or_else(|| other.snapshot(c))
                .and_then(|s| s.get("parent-snapshot-id"))
                .and_then(Value::as_i64);
        }
        false
    }
}

fn snapshots(metadata: &Value) -> &[Value] {
    metadata.get("snapshots").and_then(Value::as_array).map_or(EMPTY.as_slice(), Vec::as_slice)
}

fn id_of(snapshot: &Value) -> Option<i64> {
    snapshot.get("snapshot-id").and_then(Value::as_i64)
}

fn action(update: &Value) -> &str {
    update.get("action").and_then(Value::as_str).unwrap_or("")
}

fn invalid(which: &'static str, detail: &str) -> PlanError {
    PlanError::InvalidMetadata { which, detail: detail.to_owned() }
}

/// Source id to replica id, for items the replica has with the same content
/// (the same id first, then any id).
fn match_by_structure(
    source: &[Value],
    replica: &[Value],
    id_key: &str,
    same: fn(&Value, &Value) -> bool,
) -> BTreeMap<i64, i64> {
    let mut out = BTreeMap::new();
    for item in source {
        let Some(id) = item.get(id_key).and_then(Value::as_i64) else { continue };
        let same_id = replica.iter().find(|r| r.get(id_key).and_then(Value::as_i64) == Some(id) && same(item, r));
        let any = same_id.or_else(|| replica.iter().find(|r| same(item, r)));
        if let Some(found) = any.and_then(|r| r.get(id_key)).and_then(Value::as_i64) {
            out.insert(id, found);
        }
    }
    out
}

/// Same fields (ids, names, types, requiredness, defaults, docs) and identifier fields.
fn same_schema(a: &Value, b: &Value) -> bool {
    same_fields(a, b)
        && normalized(a.get("identifier-field-ids").unwrap_or(&Value::Null))
            == normalized(b.get("identifier-field-ids").unwrap_or(&Value::Null))
}

fn same_fields(a: &Value, b: &Value) -> bool {
    normalized(a.get("fields").unwrap_or(&Value::Null)) == normalized(b.get("fields").unwrap_or(&Value::Null))
}

fn fields(item: &Value) -> String {
    item.get("fields").map_or_else(|| "[]".to_owned(), Value::to_string)
}

/// Catalogs differ in how they spell "nothing": `null`, a missing key, `[]`.
fn normalized(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
                .map(|(k, v)| (k.clone(), normalized(v)))
                .collect(),
        ),
        Value::Array(items) if items.is_empty() => Value::Null,
        Value::Array(items) => Value::Array(items.iter().map(normalized).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests;
