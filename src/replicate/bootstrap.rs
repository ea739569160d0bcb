//! How a replica table is first made, by the destination's [`Bootstrap`]:
//! registered with the source's whole retained history, created empty, or
//! created by a create transaction that carries the source's first commit.
//! Created replicas get the rest of the history by replay (the lane).
//!
//! Catalogs refuse a snapshot more than a minute older than the table's
//! `last-updated-ms`, and createTable sets it to now: a created replica can
//! only follow a table from its creation. A create transaction's commit
//! takes the source's first snapshots with their own timestamps (Java
//! Iceberg's catalogs accept it), so the replay that follows stays within
//! the minute, and history of any age is carried commit by commit, with the
//! source's snapshot-log.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::Context;
use super::destination::{Bootstrap, Capabilities, Destination, says_unsupported};
use super::error::ReplicateError;
use super::lane::{
    Following, Known, Planned, Replayer, TIMESTAMP_TOLERANCE_MS, count_copies, location_of, path_map,
    replica_properties, table_copier,
};
use super::plan::{self, Step};
use crate::catalog::{CatalogError, LoadedTable, TableIdent};
use crate::rewrite::metadata::{PATH_PROPERTIES, snapshot_ids};
use crate::state::{LaneKey, now_ms, rfc3339};
use crate::storage::copy::CopyReport;
use crate::table_copy::NoProgress;

/// A lane's replica to make: where, and from which source metadata.
#[derive(Clone, Copy)]
pub(super) struct Bootstrapping<'a> {
    pub(super) ctx: &'a Context,
    pub(super) key: &'a LaneKey,
    pub(super) destination: &'a Destination,
    pub(super) replica_table: &'a TableIdent,
    pub(super) source: &'a LoadedTable,
    /// Where the source's metadata was read.
    pub(super) source_file: &'a str,
}

/// Makes the replica, by the destination's bootstrap.
pub(super) async fn make(b: Bootstrapping<'_>, capabilities: &Capabilities) -> Result<Made, ReplicateError> {
    // Before anything is made: `create` makes the table before it copies.
    super::lane::check_source_prefixes(b.ctx, b.key, &b.source.metadata)?;
    match capabilities.bootstrap {
        Bootstrap::Register => register(b).await,
        Bootstrap::Create => {
            let properties = replica_properties(b.ctx, b.key, b.destination);
            create(b.destination, &properties, b.replica_table, b.source, &capabilities.reason).await
        }
        Bootstrap::CreateTransaction => create_in_transaction(b, capabilities).await,
    }
}

/// The replica after its bootstrap, and what icerelay put in it.
pub(super) struct Made {
    pub(super) table: LoadedTable,
    pub(super) snapshots: Vec<i64>,
    pub(super) managed_properties: BTreeSet<String>,
    pub(super) copied: CopyReport,
}

/// Bootstraps with history: every file of every retained snapshot copied and
/// rewritten, then the rewritten metadata.json written and registered.
async fn register(b: Bootstrapping<'_>) -> Result<Made, ReplicateError> {
    let Bootstrapping { ctx, key, destination, replica_table, source, source_file } = b;
    destination.catalog.ensure_namespace(&replica_table.namespace).await?;
    let location = destination.table_location(replica_table).await?;
    let map = path_map(ctx, key, &source.metadata, &location)?;
    let snapshots: BTreeSet<i64> = snapshot_ids(&source.metadata);
    let copier = table_copier(ctx, destination, false);
    let copied = copier.copy_snapshots(&source.metadata, source_file, &map, &snapshots, &NoProgress).await?;
    count_copies(&ctx.metrics, destination.name(), copied.report);

    let properties = replica_properties(ctx, key, destination);
    let mut metadata = source.metadata.clone();
    if let Some(root) = metadata.as_object_mut() {
        let props = root.entry("properties").or_insert_with(|| Value::Object(Map::new()));
        if let Some(props) = props.as_object_mut() {
            for (k, v) in &properties {
                props.insert(k.clone(), Value::String(v.clone()));
            }
        }
    }
    let target = map.rewrite(source_file, source_file).map_err(super::plan::PlanError::from)?;
    copier.write_metadata(&metadata, source_file, &map, &target, &|_| false).await?;
    // The copy before may have taken long: confirm the lease right before the write.
    ctx.confirm_lease().await?;
    let registered = destination.catalog.register_table(replica_table, &target).await?;

    // A catalog that answers 200 but loses the history must not be trusted.
    let expected_uuid = source.metadata.get("table-uuid");
    let kept =
        registered.metadata.get("table-uuid") == expected_uuid && snapshot_ids(&registered.metadata) == snapshots;
    if !kept {
        let _ = destination.catalog.drop_table(replica_table, false).await;
        return Err(ReplicateError::Refused(format!(
            "destination {} answered registerTable {replica_table} but did not keep the table's history (uuid or \
             snapshots differ); set bootstrap = \"create\" for this destination",
            destination.name()
        )));
    }
    tracing::info!(replica = %replica_table, snapshots = snapshots.len(), metadata = %target, "registered the replica with its history");
    let managed = plan::managed_property_keys(&source.metadata, &properties);
    Ok(Made {
        table: registered,
        snapshots: snapshots.into_iter().collect(),
        managed_properties: managed,
        copied: copied.report,
    })
}

/// Creates an empty replica with the source's first schema and spec; the
/// snapshots are replayed onto it. Refused before anything is created when
/// the catalog would refuse the source's history (the timestamp rule).
async fn create(
    destination: &Destination,
    replica_properties: &BTreeMap<String, String>,
    replica_table: &TableIdent,
    source: &LoadedTable,
    why: &str,
) -> Result<Made, ReplicateError> {
    let metadata = &source.metadata;
    let now = now_ms();
    if let Some(oldest) = too_old_to_replay(metadata, now) {
        return Err(ReplicateError::Refused(format!(
            "cannot replicate the existing history of this table to destination {}: its oldest snapshot is from {} \
             ({} s ago), and catalogs refuse a snapshot more than 60 s older than the table it is added to \
             (Iceberg's timestamp rule), while this destination can only replay tables from their creation ({why}). \
             icerelay does not change snapshot timestamps. Remedy: replicate it to a destination whose \
             registerTable keeps history (bootstrap = \"register\") or that takes history in a create transaction \
             (bootstrap = \"create-transaction\"); tables created through icerelay after the rule exists replicate \
             from their first commit",
            destination.name(),
            rfc3339(oldest),
            (now - oldest) / 1000
        )));
    }
    let first = FirstState::of(metadata, replica_table, replica_properties)?;
    destination.catalog.ensure_namespace(&replica_table.namespace).await?;
    let created = destination.catalog.create_table(&replica_table.namespace, &first.request).await?;
    if let Err(e) = first.check_spec(destination, replica_table, &created.metadata) {
        let _ = destination.catalog.drop_table(replica_table, true).await;
        return Err(e);
    }
    tracing::info!(replica = %replica_table, location = %location_of(&created.metadata, "replica").unwrap_or_default(), "created the replica");
    let managed = plan::managed_property_keys(metadata, replica_properties);
    Ok(Made { table: created, snapshots: Vec::new(), managed_properties: managed, copied: CopyReport::default() })
}

/// Creates the replica in a create transaction: a staged create (which
/// makes nothing), then one `assert-create` commit with the source's first
/// commit in it, its files copied before. The table starts with the
/// source's first snapshots, ids and timestamps; the lane replays the rest.
async fn create_in_transaction(b: Bootstrapping<'_>, capabilities: &Capabilities) -> Result<Made, ReplicateError> {
    let Bootstrapping { ctx, key, destination, replica_table, source, .. } = b;
    let properties = replica_properties(ctx, key, destination);
    let first = FirstState::of(&source.metadata, replica_table, &properties)?;
    destination.catalog.ensure_namespace(&replica_table.namespace).await?;
    let mut staging = first.request.clone();
    if let Some(request) = staging.as_object_mut() {
        request.insert("stage-create".into(), Value::Bool(true));
    }
    let staged = destination.catalog.create_table(&replica_table.namespace, &staging).await?;
    first.check_spec(destination, replica_table, &staged.metadata)?;
    let uuid = source
        .metadata
        .get("table-uuid")
        .or_else(|| staged.metadata.get("table-uuid"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();

    let FirstCommit { step, managed, copied } = first_commit(b, &staged, &uuid, capabilities, &properties).await?;
    let (updates, snapshots) =
        step.as_ref().map_or_else(Default::default, |s| (s.updates.clone(), s.snapshots.clone()));
    ctx.confirm_lease().await?;
    let created = match destination.catalog.commit_create(replica_table, &staged.metadata, &uuid, &updates).await {
        Ok(created) => created,
        // It may have landed all the same: what the catalog has decides.
        Err(e @ (CatalogError::CommitOutcomeUnknown { .. } | CatalogError::CommitConflict { .. })) => {
            match destination.catalog.load_table(replica_table).await? {
                Some(there) if has_all(&there.metadata, &uuid, &snapshots) => there,
                _ => return Err(e.into()),
            }
        }
        Err(e) if says_unsupported(&e) => {
            return Err(ReplicateError::Refused(format!(
                "{e} — destination {} refused the create transaction that makes the replica {replica_table} with the \
                 source's first commit ({}). Set bootstrap = \"register\" or \"create\" for this destination, \
                 whichever keeps history there (bootstrap = \"auto\" probes it)",
                destination.name(),
                step.as_ref().map_or_else(|| "no snapshot".to_owned(), plan::Step::describe),
            )));
        }
        Err(e) => return Err(e.into()),
    };
    // A catalog that accepts the commit but changes what it carried must not
    // be trusted, nor the table it made kept (the next run would follow it).
    if !has_all(&created.metadata, &uuid, &snapshots) {
        let _ = destination.catalog.drop_table(replica_table, false).await;
        return Err(ReplicateError::Refused(format!(
            "destination {} accepted the create transaction of {replica_table} but did not keep its uuid or \
             snapshots {snapshots:?} (the table was dropped again); set bootstrap = \"create\" for this destination",
            destination.name()
        )));
    }
    tracing::info!(replica = %replica_table, snapshots = snapshots.len(), "created the replica in a create transaction");
    Ok(Made { table: created, snapshots, managed_properties: managed, copied })
}

/// The source's oldest snapshot time, if a table made now could not take it
/// (the timestamp rule, with 5 s of margin for the copies before).
fn too_old_to_replay(metadata: &Value, now: i64) -> Option<i64> {
    metadata
        .get("snapshots")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|s| s.get("timestamp-ms").and_then(Value::as_i64))
        .min()
        .filter(|t| *t < now - TIMESTAMP_TOLERANCE_MS + 5_000)
}

/// The source's first commit, as a create transaction carries it.
struct FirstCommit {
    /// The commit (none: the source has nothing to add to the staged table).
    step: Option<Step>,
    /// The property keys managed from the source once it is applied.
    managed: BTreeSet<String>,
    /// The files copied for it.
    copied: CopyReport,
}

/// Plans the source's first commit as any other, against the table the
/// staged create describes (with the uuid the commit assigns), and copies
/// its files.
async fn first_commit(
    b: Bootstrapping<'_>,
    staged: &LoadedTable,
    uuid: &str,
    capabilities: &Capabilities,
    properties: &BTreeMap<String, String>,
) -> Result<FirstCommit, ReplicateError> {
    let Bootstrapping { ctx, key, destination, source, source_file, .. } = b;
    let mut base = staged.metadata.clone();
    if let Some(root) = base.as_object_mut() {
        root.insert("table-uuid".into(), Value::String(uuid.to_owned()));
    }
    let following = Following {
        source: source.clone(),
        source_file: source_file.to_owned(),
        replica: LoadedTable { metadata: base, ..staged.clone() },
        known: Known {
            replicated: BTreeSet::new(),
            managed_properties: BTreeSet::new(),
            managed_refs: BTreeMap::new(),
            mode: capabilities.mode(),
            source_uuid: Some(uuid.to_owned()),
            adoption: None,
        },
        unknown_outcome: false,
    };
    let replayer = Replayer::new(ctx, key, destination, &following)?;
    let Some(Planned { step, .. }) = replayer.next_commit(ctx, &key.table, &following).await? else {
        let managed = plan::managed_property_keys(&source.metadata, properties);
        return Ok(FirstCommit { step: None, managed, copied: CopyReport::default() });
    };
    // The planner parts metadata from snapshots where the source's ids have
    // gaps the catalog would number otherwise. A first step without
    // snapshots makes a table dated now: fine for a young table, whose
    // snapshots then replay, but the older ones of an old table never could.
    if step.snapshots.is_empty()
        && let Some(oldest) = too_old_to_replay(&source.metadata, now_ms())
    {
        return Err(ReplicateError::Refused(format!(
            "the source's first commit cannot be carried by a create transaction onto destination {}: {} must \
             come first in a commit of its own, which would date the table now, and its snapshots from {} on \
             would be refused (Iceberg's timestamp rule). Set bootstrap = \"register\" for this destination if \
             its registerTable keeps history",
            destination.name(),
            step.describe(),
            rfc3339(oldest),
        )));
    }
    let copied = replayer.copy(ctx, destination, &following, &step).await?;
    Ok(FirstCommit { managed: step.managed_properties.clone(), step: Some(step), copied })
}

/// Whether `metadata` is the table with `uuid` and has every one of `snapshots`.
fn has_all(metadata: &Value, uuid: &str, snapshots: &[i64]) -> bool {
    let there = snapshot_ids(metadata);
    metadata.get("table-uuid").and_then(Value::as_str) == Some(uuid) && snapshots.iter().all(|id| there.contains(id))
}

/// What a created replica starts as: the source's first schema and
/// partition spec, its properties (without paths) and the destination's,
/// and its format version, as a `CreateTableRequest`.
struct FirstState {
    request: Value,
    spec: Option<Value>,
}

impl FirstState {
    fn of(
        metadata: &Value,
        replica_table: &TableIdent,
        replica_properties: &BTreeMap<String, String>,
    ) -> Result<Self, ReplicateError> {
        let lowest = |list: &str, id: &str| {
            metadata
                .get(list)
                .and_then(Value::as_array)
                .and_then(|items| items.iter().min_by_key(|s| s.get(id).and_then(Value::as_i64).unwrap_or(i64::MAX)))
                .cloned()
        };
        let schema = lowest("schemas", "schema-id")
            .ok_or_else(|| ReplicateError::Refused(format!("the source of {replica_table} has no schema")))?;
        let spec = lowest("partition-specs", "spec-id");
        let mut properties: Map<String, Value> = metadata
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| {
                p.iter()
                    .filter(|(k, _)| !PATH_PROPERTIES.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for (k, v) in replica_properties {
            properties.insert(k.clone(), Value::String(v.clone()));
        }
        if let Some(version) = metadata.get("format-version").and_then(Value::as_i64) {
            properties.insert("format-version".into(), Value::String(version.to_string()));
        }
        let mut request = json!({"name": replica_table.name, "schema": schema, "properties": properties});
        if let (Some(spec), Some(obj)) = (spec.clone(), request.as_object_mut()) {
            obj.insert("partition-spec".into(), spec);
        }
        Ok(Self { request, spec })
    }

    /// Manifests name partition specs by id and partition fields by field
    /// id: the replica's first spec must be the source's.
    fn check_spec(
        &self,
        destination: &Destination,
        replica_table: &TableIdent,
        created: &Value,
    ) -> Result<(), ReplicateError> {
        let created_spec = created.pointer("/partition-specs/0").cloned();
        let same = match (&self.spec, &created_spec) {
            (Some(a), Some(b)) => a.get("spec-id") == b.get("spec-id") && a.get("fields") == b.get("fields"),
            (None, _) => true,
            (Some(_), None) => false,
        };
        if same {
            return Ok(());
        }
        Err(ReplicateError::Refused(format!(
            "destination {} makes {replica_table} with partition spec {} where the source has {}; manifests refer \
             to partition fields by id, so the replica would be unreadable (it is not kept)",
            destination.name(),
            created_spec.map_or_else(|| "none".to_owned(), |s| s.to_string()),
            self.spec.as_ref().map_or_else(|| "none".to_owned(), ToString::to_string),
        )))
    }
}
