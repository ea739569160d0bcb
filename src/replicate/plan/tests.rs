//! Planner tests against a tiny in-memory catalog that applies commits the
//! way the REST catalogs of the test stack do (ids assigned as the next free
//! one, requirements checked).

use super::*;

const SRC: &str = "s3://w/db/t";
const REP: &str = "s3://r/db/t";

fn schema(id: i64, fields: &[(i64, &str)]) -> Value {
    json!({"type": "struct", "schema-id": id,
        "fields": fields.iter().map(|(i, n)| json!({"id": i, "name": n, "type": "long", "required": false})).collect::<Vec<_>>()})
}

fn snap(id: i64, parent: Option<i64>, seq: i64, schema: i64) -> Value {
    json!({"snapshot-id": id, "parent-snapshot-id": parent, "sequence-number": seq, "timestamp-ms": 1000 + seq,
        "manifest-list": format!("{SRC}/metadata/snap-{id}.avro"), "summary": {"operation": "append"}, "schema-id": schema})
}

fn source() -> Value {
    json!({
        "format-version": 2, "table-uuid": "src-uuid", "location": SRC, "last-column-id": 2,
        "schemas": [schema(0, &[(1, "a")]), schema(1, &[(1, "a"), (2, "b")])], "current-schema-id": 1,
        "partition-specs": [{"spec-id": 0, "fields": []}], "default-spec-id": 0,
        "sort-orders": [{"order-id": 0, "fields": []}], "default-sort-order-id": 0,
        "properties": {"owner": "me", "write.data.path": format!("{SRC}/data")},
        "snapshots": [snap(10, None, 1, 0), snap(20, Some(10), 2, 1)],
        "refs": {"main": {"snapshot-id": 20, "type": "branch"}},
        "current-snapshot-id": 20
    })
}

/// A replica as createTable leaves it: first schema and spec, no snapshots.
fn created() -> Value {
    json!({
        "format-version": 2, "table-uuid": "rep-uuid", "location": REP, "last-column-id": 1,
        "schemas": [schema(0, &[(1, "a")])], "current-schema-id": 0,
        "partition-specs": [{"spec-id": 0, "fields": []}], "default-spec-id": 0,
        "sort-orders": [{"order-id": 0, "fields": []}], "default-sort-order-id": 0,
        "properties": {"schema.name-mapping.default": "catalog's own"},
        "snapshots": [], "refs": {}, "current-snapshot-id": -1
    })
}

fn map() -> PathMap {
    PathMap::from_locations(SRC, REP).expect("valid")
}

struct Lane {
    replica: Value,
    replicated: BTreeSet<i64>,
    managed: BTreeSet<String>,
    refs: BTreeMap<String, i64>,
    destination: BTreeMap<String, String>,
    /// What the proxy saw committed together.
    together: Vec<i64>,
}

impl Lane {
    fn new(replica: Value) -> Self {
        Self {
            replica,
            replicated: BTreeSet::new(),
            managed: BTreeSet::new(),
            refs: BTreeMap::new(),
            destination: BTreeMap::new(),
            together: Vec::new(),
        }
    }

    fn plan(&self, source: &Value) -> Result<Option<Step>, PlanError> {
        let map = map();
        next_step(&PlanInput {
            source,
            source_file: "src.metadata.json",
            replica: &self.replica,
            replicated: &self.replicated,
            map: &map,
            managed_properties: &self.managed,
            managed_refs: &self.refs,
            destination_properties: &self.destination,
            adopted: None,
            committed_together: &self.together,
        })
    }

    /// Plans and applies until converged; returns the steps.
    fn converge(&mut self, source: &Value) -> Vec<Step> {
        let mut steps = Vec::new();
        while let Some(step) = self.plan(source).expect("plans") {
            apply(&mut self.replica, &step).expect("the catalog accepts the commit");
            for &id in &step.snapshots {
                self.replicated.insert(id);
            }
            self.managed = step.managed_properties.clone();
            self.refs = step.managed_refs.clone();
            steps.push(step);
            assert!(steps.len() < 50, "does not converge; last step: {:?}", steps.last().map(Step::describe));
        }
        steps
    }
}

/// Applies a commit like a REST catalog.
fn apply(table: &mut Value, step: &Step) -> Result<(), String> {
    for r in &step.requirements {
        match r["type"].as_str() {
            Some("assert-table-uuid") if table["table-uuid"] != r["uuid"] => return Err("uuid".into()),
            Some("assert-ref-snapshot-id") => {
                let name = r["ref"].as_str().unwrap_or_default();
                let have = table["refs"].get(name).map(|x| x["snapshot-id"].clone()).unwrap_or(Value::Null);
                if have != r["snapshot-id"] {
                    return Err(format!("ref {name} is {have}, expected {}", r["snapshot-id"]));
                }
            }
            _ => {}
        }
    }
    let t = table.as_object_mut().ok_or("not an object")?;
    for u in &step.updates {
        match u["action"].as_str().unwrap_or_default() {
            "add-schema" => {
                let list = t["schemas"].as_array_mut().ok_or("schemas")?;
                let next = list.iter().filter_map(|s| s["schema-id"].as_i64()).max().unwrap_or(-1) + 1;
                let mut s = u["schema"].clone();
                s["schema-id"] = json!(next);
                list.push(s);
            }
            "set-current-schema" => {
                t.insert("current-schema-id".into(), u["schema-id"].clone());
            }
            "add-spec" => {
                let list = t["partition-specs"].as_array_mut().ok_or("specs")?;
                let next = list.iter().filter_map(|s| s["spec-id"].as_i64()).max().unwrap_or(-1) + 1;
                let mut s = u["spec"].clone();
                s["spec-id"] = json!(next);
                list.push(s);
            }
            "set-default-spec" => {
                t.insert("default-spec-id".into(), u["spec-id"].clone());
            }
            "add-sort-order" => {
                let list = t["sort-orders"].as_array_mut().ok_or("orders")?;
                let next = list.iter().filter_map(|s| s["order-id"].as_i64()).max().unwrap_or(0) + 1;
                let mut s = u["sort-order"].clone();
                s["order-id"] = json!(next);
                list.push(s);
            }
            "set-default-sort-order" => {
                t.insert("default-sort-order-id".into(), u["sort-order-id"].clone());
            }
            "add-snapshot" => {
                let s = u["snapshot"].clone();
                let list = t["snapshots"].as_array_mut().ok_or("snapshots")?;
                if list.iter().any(|x| x["snapshot-id"] == s["snapshot-id"]) {
                    return Err("duplicate snapshot".into());
                }
                list.push(s);
            }
            "set-snapshot-ref" => {
                let name = u["ref-name"].as_str().ok_or("ref-name")?.to_owned();
                let mut r = u.clone();
                let obj = r.as_object_mut().ok_or("ref")?;
                obj.remove("action");
                obj.remove("ref-name");
                t["refs"][&name] = r;
                if name == MAIN {
                    t.insert("current-snapshot-id".into(), u["snapshot-id"].clone());
                }
            }
            "remove-snapshot-ref" => {
                let name = u["ref-name"].as_str().ok_or("ref-name")?;
                t["refs"].as_object_mut().ok_or("refs")?.remove(name);
            }
            "set-properties" => {
                for (k, v) in u["updates"].as_object().ok_or("updates")? {
                    t["properties"][k] = v.clone();
                }
            }
            "remove-properties" => {
                for k in u["removals"].as_array().ok_or("removals")? {
                    t["properties"].as_object_mut().ok_or("props")?.remove(k.as_str().unwrap_or_default());
                }
            }
            "upgrade-format-version" => {
                t.insert("format-version".into(), u["format-version"].clone());
            }
            "set-statistics" => {
                let list = t.entry("statistics").or_insert_with(|| json!([])).as_array_mut().ok_or("stats")?;
                list.retain(|e| e["snapshot-id"] != u["snapshot-id"]);
                list.push(u["statistics"].clone());
            }
            other => return Err(format!("unexpected action {other}")),
        }
    }
    Ok(())
}

fn actions(step: &Step) -> Vec<&str> {
    step.updates.iter().filter_map(|u| u["action"].as_str()).collect()
}

#[test]
fn one_commit_per_snapshot_with_pending_metadata_folded_into_the_first() {
    let mut lane = Lane::new(created());
    let steps = lane.converge(&source());
    assert_eq!(steps.len(), 2);
    assert_eq!(
        actions(&steps[0]),
        ["add-schema", "set-current-schema", "set-properties", "add-snapshot", "set-snapshot-ref"]
    );
    assert_eq!(steps[0].snapshots, [10]);
    assert_eq!(
        steps[0].requirements,
        vec![
            json!({"type": "assert-table-uuid", "uuid": "rep-uuid"}),
            json!({"type": "assert-ref-snapshot-id", "ref": "main", "snapshot-id": null}),
        ]
    );
    let added = &steps[0].updates[3]["snapshot"];
    assert_eq!(added["manifest-list"], format!("{REP}/metadata/snap-10.avro"), "manifest list at the replica");
    assert_eq!(added["schema-id"], 0);
    assert_eq!(added["timestamp-ms"], 1001, "the source's own timestamp");
    assert!(added.get("parent-snapshot-id").is_none(), "a null optional field is left out: {added}");
    assert_eq!(actions(&steps[1]), ["add-snapshot", "set-snapshot-ref"]);
    assert_eq!(steps[1].requirements[1], json!({"type": "assert-ref-snapshot-id", "ref": "main", "snapshot-id": 10}));
    assert_eq!(steps[1].snapshots_behind, 1);

    let r = &lane.replica;
    assert_eq!(r["refs"]["main"]["snapshot-id"], 20);
    assert_eq!(r["current-schema-id"], 1);
    assert_eq!(r["properties"]["owner"], "me");
    assert_eq!(r["properties"]["write.data.path"], format!("{REP}/data"), "path properties are rewritten");
    assert_eq!(r["properties"]["schema.name-mapping.default"], "catalog's own", "not managed, so kept");
    assert!(!r.to_string().contains("s3://w/"), "no source path on the replica: {r}");
    assert_eq!(snapshots_behind(&source(), r), 0);
}

#[test]
fn source_expiry_and_removed_schemas_never_reach_the_replica() {
    let mut lane = Lane::new(created());
    lane.converge(&source());
    let mut expired = source();
    expired["snapshots"] = json!([snap(20, Some(10), 2, 1)]);
    expired["schemas"] = json!([schema(1, &[(1, "a"), (2, "b")])]);
    assert!(lane.plan(&expired).expect("plans").is_none(), "nothing to do");
    assert_eq!(lane.replica["snapshots"].as_array().map(Vec::len), Some(2), "history kept");
    // And a snapshot after the expiry still follows.
    expired["snapshots"].as_array_mut().expect("list").push(snap(30, Some(20), 3, 1));
    expired["refs"]["main"]["snapshot-id"] = json!(30);
    let steps = lane.converge(&expired);
    assert_eq!(steps.iter().map(|s| s.snapshots.clone()).collect::<Vec<_>>(), [vec![30]]);
}

#[test]
fn branches_and_tags_follow_their_snapshots() {
    let mut src = source();
    src["snapshots"].as_array_mut().expect("list").push(snap(30, Some(10), 3, 1));
    src["refs"] = json!({
        "main": {"snapshot-id": 20, "type": "branch"},
        "audit": {"snapshot-id": 30, "type": "branch", "max-ref-age-ms": 5000},
        "v1": {"snapshot-id": 10, "type": "tag"}
    });
    let mut lane = Lane::new(created());
    let steps = lane.converge(&src);
    let moved: Vec<Vec<&str>> = steps
        .iter()
        .map(|s| {
            s.updates
                .iter()
                .filter(|u| u["action"] == "set-snapshot-ref")
                .filter_map(|u| u["ref-name"].as_str())
                .collect()
        })
        .collect();
    assert_eq!(moved, [vec!["main", "v1"], vec!["main"], vec!["audit"]]);
    let audit = steps[2].updates.iter().find(|u| u["ref-name"] == "audit").expect("audit");
    assert_eq!(audit["max-ref-age-ms"], 5000);
    assert!(
        steps[2].requirements.contains(&json!({"type": "assert-ref-snapshot-id", "ref": "audit", "snapshot-id": null}))
    );

    // A tag removed on the source goes away on the replica; a rollback moves main back.
    src["refs"].as_object_mut().expect("refs").remove("v1");
    src["refs"]["main"]["snapshot-id"] = json!(10);
    let steps = lane.converge(&src);
    assert_eq!(actions(&steps[0]), ["set-snapshot-ref", "remove-snapshot-ref"]);
    assert_eq!(lane.replica["refs"]["main"]["snapshot-id"], 10);
}

#[test]
fn snapshots_one_commit_added_to_a_branch_go_in_one_commit_where_the_proxy_saw_it() {
    // An overwrite on branch `audit`: a delete snapshot and an append
    // snapshot in one source commit. No snapshot-log records a branch.
    let mut src = source();
    let list = src["snapshots"].as_array_mut().expect("list");
    list.push(snap(30, Some(10), 3, 1));
    list.push(snap(40, Some(30), 4, 1));
    src["refs"]["audit"] = json!({"snapshot-id": 40, "type": "branch"});
    let branch_steps = |together: Vec<i64>| {
        let mut lane = Lane::new(created());
        lane.together = together;
        let steps = lane.converge(&src);
        assert_eq!(lane.replica["refs"]["audit"]["snapshot-id"], 40);
        steps.into_iter().filter(|s| s.snapshots.iter().any(|id| *id >= 30)).collect::<Vec<_>>()
    };
    let unknown = branch_steps(Vec::new());
    assert_eq!(unknown.iter().map(|s| s.snapshots.clone()).collect::<Vec<_>>(), [vec![30], vec![40]]);
    let seen = branch_steps(vec![30, 40]);
    assert_eq!(seen.len(), 1, "one commit: {:?}", seen.iter().map(Step::describe).collect::<Vec<_>>());
    assert_eq!(seen[0].snapshots, [30, 40]);
    assert_eq!(actions(&seen[0]), ["add-snapshot", "add-snapshot", "set-snapshot-ref"], "the branch is set once");
}

#[test]
fn a_snapshot_nobody_replicated_is_divergence() {
    let mut lane = Lane::new(created());
    lane.converge(&source());
    lane.replica["snapshots"].as_array_mut().expect("list").push(snap(99, Some(20), 3, 1));
    lane.replica["refs"]["main"]["snapshot-id"] = json!(99);
    let e = lane.plan(&source()).expect_err("diverged");
    assert!(e.to_string().contains("99"), "{e}");
    assert!(matches!(e, PlanError::Diverged { .. }));
}

#[test]
fn schema_ids_the_catalog_may_assign_differently_get_their_own_commit() {
    let mut src = source();
    // Schema 1 was removed on the source: schema 2 is next after 0.
    src["schemas"] = json!([schema(0, &[(1, "a")]), schema(2, &[(1, "a"), (2, "b")])]);
    src["current-schema-id"] = json!(2);
    src["snapshots"] = json!([snap(10, None, 1, 0), snap(20, Some(10), 2, 2)]);
    let mut lane = Lane::new(created());
    let first = lane.plan(&src).expect("plans").expect("a step");
    assert_eq!(actions(&first), ["add-schema"], "alone, so its id can be read back");
    assert!(first.snapshots.is_empty());
    let steps = lane.converge(&src);
    let last = steps.last().expect("steps");
    // The catalog gave the schema id 1; the snapshot names it so.
    assert_eq!(last.updates[0]["snapshot"]["schema-id"], 1);
    assert_eq!(lane.replica["current-schema-id"], 1);
}

#[test]
fn a_spec_under_another_id_is_refused() {
    let mut src = source();
    src["partition-specs"] =
        json!([{"spec-id": 0, "fields": [{"source-id": 1, "field-id": 1000, "name": "a", "transform": "identity"}]}]);
    let e = Lane::new(created()).plan(&src).expect_err("mismatch");
    assert!(matches!(e, PlanError::SpecMismatch { source_id: 0, .. }), "{e}");
}

#[test]
fn new_specs_and_sort_orders_are_added_and_made_default() {
    let mut src = source();
    src["partition-specs"].as_array_mut().expect("specs").push(
        json!({"spec-id": 1, "fields": [{"source-id": 1, "field-id": 1000, "name": "a", "transform": "identity"}]}),
    );
    src["default-spec-id"] = json!(1);
    src["sort-orders"].as_array_mut().expect("orders").push(
        json!({"order-id": 1, "fields": [{"source-id": 1, "transform": "identity", "direction": "asc", "null-order": "nulls-first"}]}),
    );
    src["default-sort-order-id"] = json!(1);
    let mut lane = Lane::new(created());
    let steps = lane.converge(&src);
    assert!(actions(&steps[0]).starts_with(&[
        "add-schema",
        "add-spec",
        "add-sort-order",
        "set-current-schema",
        "set-default-spec",
        "set-default-sort-order"
    ]));
    assert_eq!(lane.replica["default-spec-id"], 1);
    assert_eq!(lane.replica["default-sort-order-id"], 1);
    assert!(lane.plan(&src).expect("plans").is_none());
}

#[test]
fn properties_follow_the_source_but_the_replicas_own_stay() {
    let mut lane = Lane::new(created());
    lane.destination.insert("retention".into(), "30d".into());
    lane.destination.insert("owner".into(), "dr-team".into());
    lane.replica["properties"]["operator.note"] = json!("mine");
    lane.converge(&source());
    assert_eq!(lane.replica["properties"]["owner"], "dr-team", "the destination's value wins");
    assert_eq!(lane.replica["properties"]["retention"], "30d");

    let mut src = source();
    src["properties"] = json!({"new": "1"});
    let steps = lane.converge(&src);
    assert_eq!(actions(&steps[0]), ["set-properties", "remove-properties"]);
    assert_eq!(steps[0].updates[1]["removals"], json!(["write.data.path"]));
    let props = &lane.replica["properties"];
    assert_eq!(props["operator.note"], "mine", "never set by icerelay, so never removed");
    assert_eq!(props["owner"], "dr-team");
    assert_eq!(props["new"], "1");
}

#[test]
fn statistics_are_set_with_replica_paths_and_format_upgrades_replay() {
    let mut src = source();
    src["format-version"] = json!(3);
    src["statistics"] = json!([{"snapshot-id": 20, "statistics-path": format!("{SRC}/metadata/stats-20.puffin"),
        "file-size-in-bytes": 10, "file-footer-size-in-bytes": 4, "blob-metadata": []}]);
    let mut lane = Lane::new(created());
    let steps = lane.converge(&src);
    assert!(steps.iter().any(|s| actions(s).contains(&"upgrade-format-version")));
    let with_stats = steps.iter().find(|s| !s.statistics_of.is_empty()).expect("statistics set");
    assert_eq!(with_stats.snapshots, [20], "set with the snapshot they describe");
    assert_eq!(lane.replica["statistics"][0]["statistics-path"], format!("{REP}/metadata/stats-20.puffin"));
    assert_eq!(lane.replica["format-version"], 3);
}

#[test]
fn unmapped_paths_stop_the_plan_with_the_path_in_the_message() {
    let mut src = source();
    src["snapshots"][0]["manifest-list"] = json!("s3://elsewhere/snap.avro");
    let e = Lane::new(created()).plan(&src).expect_err("unmapped");
    assert!(e.to_string().contains("s3://elsewhere/snap.avro"), "{e}");
}

#[test]
fn refs_moved_on_the_replica_are_divergence_but_an_unrecorded_step_of_ours_is_not() {
    let mut src = source();
    src["snapshots"].as_array_mut().expect("list").push(snap(30, Some(20), 3, 1));
    src["refs"]["main"]["snapshot-id"] = json!(30);
    let mut lane = Lane::new(created());
    lane.converge(&src);
    assert_eq!(lane.refs, BTreeMap::from([("main".to_owned(), 30)]));

    // Someone rolls main back on the replica: reported, not undone.
    let mut rolled_back = Lane { replica: lane.replica.clone(), ..Lane::new(created()) };
    rolled_back.replicated = lane.replicated.clone();
    rolled_back.refs = lane.refs.clone();
    rolled_back.replica["refs"]["main"]["snapshot-id"] = json!(10);
    let e = rolled_back.plan(&src).expect_err("diverged");
    assert!(e.to_string().contains("\"main\" was moved on the replica to snapshot 10"), "{e}");

    // A tag made on the replica is not icerelay's either.
    let mut tagged = Lane { replica: lane.replica.clone(), ..Lane::new(created()) };
    tagged.replicated = lane.replicated.clone();
    tagged.refs = lane.refs.clone();
    tagged.replica["refs"]["mine"] = json!({"snapshot-id": 20, "type": "tag"});
    assert!(matches!(tagged.plan(&src), Err(PlanError::Diverged { .. })));

    // But a commit that landed before icerelay could record it (a crash) is
    // recognised: main one step further along the source's history.
    let mut crashed = Lane { replica: lane.replica.clone(), ..Lane::new(created()) };
    crashed.replicated = lane.replicated.clone();
    crashed.refs = BTreeMap::from([("main".to_owned(), 20)]);
    assert!(crashed.plan(&src).expect("plans").is_none(), "nothing to do, nothing diverged");
}

#[test]
fn an_upgrade_to_v3_waits_for_the_first_snapshot_with_row_lineage() {
    let mut src = source();
    src["format-version"] = json!(3);
    let mut v3_snap = snap(30, Some(20), 3, 1);
    v3_snap["first-row-id"] = json!(0);
    v3_snap["added-rows"] = json!(5);
    src["snapshots"].as_array_mut().expect("list").push(v3_snap);
    src["refs"]["main"]["snapshot-id"] = json!(30);
    let mut lane = Lane::new(created());
    let steps = lane.converge(&src);
    let upgraded_with: Vec<Vec<i64>> =
        steps.iter().filter(|s| actions(s).contains(&"upgrade-format-version")).map(|s| s.snapshots.clone()).collect();
    assert_eq!(upgraded_with, [vec![30]], "v2 snapshots 10 and 20 go in before the upgrade");
    assert_eq!(lane.replica["format-version"], 3);
}

#[test]
fn two_new_specs_fold_into_the_snapshot_commit() {
    let mut src = source();
    for (id, name) in [(1, "a"), (2, "b")] {
        src["partition-specs"].as_array_mut().expect("specs").push(
            json!({"spec-id": id, "fields": [{"source-id": 1, "field-id": 1000 + id, "name": name, "transform": "identity"}]}),
        );
    }
    src["default-spec-id"] = json!(2);
    let first = Lane::new(created()).plan(&src).expect("plans").expect("step");
    assert_eq!(first.snapshots, [10], "no commit of their own: {:?}", first.describe());
    assert_eq!(actions(&first).iter().filter(|a| **a == "add-spec").count(), 2);
}

#[test]
fn statistics_spelled_differently_by_the_catalog_are_not_set_again() {
    let mut src = source();
    src["statistics"] = json!([{"snapshot-id": 20, "statistics-path": format!("{SRC}/metadata/stats-20.puffin"),
        "file-size-in-bytes": 10, "file-footer-size-in-bytes": 4, "blob-metadata": [], "key-metadata": null}]);
    let mut lane = Lane::new(created());
    lane.converge(&src);
    // The catalog drops the nulls and empty lists.
    lane.replica["statistics"] = json!([{"snapshot-id": 20, "statistics-path": format!("{REP}/metadata/stats-20.puffin"),
        "file-size-in-bytes": 10, "file-footer-size-in-bytes": 4}]);
    assert!(lane.plan(&src).expect("plans").is_none());
}

#[test]
fn snapshots_missing_from_what_was_recorded_counts_without_the_replica() {
    let s = source();
    let all: BTreeSet<i64> = snapshot_ids(&s).into_iter().collect();
    assert!(!all.is_empty());
    assert_eq!(snapshots_missing_from(&s, &all), 0);
    assert_eq!(snapshots_missing_from(&s, &BTreeSet::new()), all.len());
    let first: BTreeSet<i64> = all.iter().take(1).copied().collect();
    assert_eq!(snapshots_missing_from(&s, &first), all.len() - 1);
}

/// The old primary after a failover: it shares snapshot 10 with the source
/// (the new primary) and has snapshot 11 of its own, which took sequence
/// number 2; the source's snapshot 20 has number 2 too.
fn old_primary() -> Value {
    let mut table = source();
    table["location"] = json!(REP);
    table["table-uuid"] = json!("old-uuid");
    table["snapshots"] = json!([snap(10, None, 1, 0), snap(11, Some(10), 2, 1)]);
    table["refs"] = json!({"main": {"snapshot-id": 11, "type": "branch"}});
    table["last-sequence-number"] = json!(2);
    table
}

#[test]
fn an_adopted_table_keeps_its_own_snapshots_on_a_branch_and_follows_from_the_ancestor_shifted() {
    let source = source();
    let replica = old_primary();
    let (replicated, managed, refs, destination) =
        (BTreeSet::from([10]), BTreeSet::new(), BTreeMap::new(), BTreeMap::new());
    let unreplicated = BTreeSet::from([11]);
    let shift = SequenceShift { above: 1, by: 1 };
    let map = map().with_sequence_shift(Some(shift));
    let input = |adopted| PlanInput {
        source: &source,
        source_file: "src.metadata.json",
        replica: &replica,
        replicated: &replicated,
        map: &map,
        managed_properties: &managed,
        managed_refs: &refs,
        destination_properties: &destination,
        adopted,
        committed_together: &[],
    };
    // Without the operator's choice, snapshot 11 is divergence.
    let refused = next_step(&input(None)).expect_err("diverged");
    assert!(refused.to_string().contains("11"), "{refused}");

    let adopted = Adopted {
        unreplicated: &unreplicated,
        kept_branch: Some(("lost", 11)),
        kept_refs: &[],
        main_at: Some(11),
        sequence_shift: Some(shift),
    };
    let step = next_step(&input(Some(adopted))).expect("plans").expect("a step");
    assert_eq!(step.snapshots, [20]);
    let added = step.updates.iter().find(|u| u["action"] == "add-snapshot").expect("add-snapshot");
    assert_eq!(added["snapshot"]["sequence-number"], 3, "above the old side's own number 2");
    assert_eq!(added["snapshot"]["parent-snapshot-id"], 10);
    let set = |name: &str| step.updates.iter().find(|u| u["action"] == "set-snapshot-ref" && u["ref-name"] == name);
    assert_eq!(set("main").map(|u| u["snapshot-id"].clone()), Some(json!(20)), "main moves on from 11");
    assert_eq!(set("lost").map(|u| u["snapshot-id"].clone()), Some(json!(11)), "11 is kept on the branch");
    assert!(step.requirements.contains(&json!({"type": "assert-ref-snapshot-id", "ref": "main", "snapshot-id": 11})));
    assert!(step.requirements.contains(&json!({"type": "assert-ref-snapshot-id", "ref": "lost", "snapshot-id": null})));
    assert!(!step.updates.iter().any(|u| u["action"] == "remove-snapshot-ref"), "nothing of the old side is removed");

    // Applied, the next plan leaves the kept branch alone.
    let mut after = replica.clone();
    apply(&mut after, &step).expect("applies");
    let replicated = BTreeSet::from([10, 20]);
    let refs = step.managed_refs.clone();
    let next =
        next_step(&PlanInput { replica: &after, replicated: &replicated, managed_refs: &refs, ..input(Some(adopted)) })
            .expect("plans");
    assert!(next.as_ref().is_none_or(|s| !s.updates.iter().any(|u| u["ref-name"] == "lost")), "{next:?}");
}

/// An overwrite: snapshot 20 (delete) and 30 (append) were one commit, so
/// the source's snapshot-log lists 10 and 30 only.
fn overwritten() -> Value {
    let mut src = source();
    let mut append = snap(30, Some(20), 3, 1);
    append["timestamp-ms"] = json!(1003);
    src["snapshots"].as_array_mut().expect("list").push(append);
    src["refs"]["main"]["snapshot-id"] = json!(30);
    src["current-snapshot-id"] = json!(30);
    src["snapshot-log"] = json!([{"snapshot-id": 10, "timestamp-ms": 1001}, {"snapshot-id": 30, "timestamp-ms": 1003}]);
    src
}

#[test]
fn snapshots_the_source_committed_together_are_committed_together() {
    let src = overwritten();
    let mut lane = Lane::new(created());
    let steps = lane.converge(&src);
    let groups: Vec<Vec<i64>> = steps.iter().filter(|s| !s.snapshots.is_empty()).map(|s| s.snapshots.clone()).collect();
    assert_eq!(groups, [vec![10], vec![20, 30]], "{:?}", steps.iter().map(Step::describe).collect::<Vec<_>>());
    let both = steps.iter().find(|s| s.snapshots == [20, 30]).expect("the overwrite's commit");
    let sets: Vec<&Value> = both.updates.iter().filter(|u| u["action"] == "set-snapshot-ref").collect();
    assert_eq!(sets.len(), 1, "main is set once, to the last: {:?}", both.updates);
    assert_eq!(sets[0]["snapshot-id"], 30);
    let adds: Vec<i64> = both
        .updates
        .iter()
        .filter(|u| u["action"] == "add-snapshot")
        .filter_map(|u| u["snapshot"]["snapshot-id"].as_i64())
        .collect();
    assert_eq!(adds, [20, 30], "in the source's order");

    // A tag on the intermediate snapshot is set to it in the same commit.
    let mut tagged = overwritten();
    tagged["refs"]["before"] = json!({"snapshot-id": 20, "type": "tag"});
    let mut lane = Lane::new(created());
    let steps = lane.converge(&tagged);
    let both = steps.iter().find(|s| s.snapshots == [20, 30]).expect("one commit");
    assert!(both.updates.iter().any(|u| u["ref-name"] == "before" && u["snapshot-id"] == 20), "{:?}", both.updates);

    // Snapshots older than the log's first entry (a trimmed log) go one by one.
    let mut trimmed = overwritten();
    trimmed["snapshot-log"] = json!([{"snapshot-id": 30, "timestamp-ms": 1003}]);
    let mut lane = Lane::new(created());
    let steps = lane.converge(&trimmed);
    let groups: Vec<Vec<i64>> = steps.iter().filter(|s| !s.snapshots.is_empty()).map(|s| s.snapshots.clone()).collect();
    assert_eq!(groups, [vec![10], vec![20], vec![30]]);

    // A table whose first commit added 10 and 20: the log starts at 20, and
    // 10, older than it, is the root of main. Not a trimmed log.
    let mut first_commit = overwritten();
    first_commit["snapshot-log"] =
        json!([{"snapshot-id": 20, "timestamp-ms": 1002}, {"snapshot-id": 30, "timestamp-ms": 1003}]);
    let mut lane = Lane::new(created());
    let steps = lane.converge(&first_commit);
    let groups: Vec<Vec<i64>> = steps.iter().filter(|s| !s.snapshots.is_empty()).map(|s| s.snapshots.clone()).collect();
    assert_eq!(groups, [vec![10, 20], vec![30]]);
}

#[test]
fn log_drift_counts_entries_of_shared_snapshots_whose_time_differs() {
    let mut src = overwritten();
    src["snapshot-log"] = json!([{"snapshot-id": 10, "timestamp-ms": 1001}, {"snapshot-id": 30, "timestamp-ms": 1003},
        {"snapshot-id": 10, "timestamp-ms": 5000}]);
    let mut rep = src.clone();
    rep["snapshot-log"] = json!([{"snapshot-id": 10, "timestamp-ms": 1001}, {"snapshot-id": 30, "timestamp-ms": 1003},
        {"snapshot-id": 10, "timestamp-ms": 5140}]);
    assert_eq!(log_drift(&src, &rep), LogDrift { entries: 1, max_ms: 140 });
    assert_eq!(log_drift(&src, &src), LogDrift::default());

    // A source log trimmed by expiry is not drift; a ref move the replica
    // skipped (it lagged over a rollback) is.
    let mut trimmed = src.clone();
    trimmed["snapshot-log"] =
        json!([{"snapshot-id": 30, "timestamp-ms": 1003}, {"snapshot-id": 10, "timestamp-ms": 5000}]);
    assert_eq!(log_drift(&trimmed, &src), LogDrift::default());
    let mut skipped = src.clone();
    skipped["snapshot-log"] =
        json!([{"snapshot-id": 10, "timestamp-ms": 1001}, {"snapshot-id": 30, "timestamp-ms": 1003}]);
    assert_eq!(log_drift(&src, &skipped), LogDrift { entries: 1, max_ms: 0 });
}

#[test]
fn a_branch_snapshot_between_two_main_snapshots_is_not_grouped_with_them() {
    // 20 is on main but not logged; 25 (a branch off 20) sorts between 20 and 30.
    let mut src = overwritten();
    let mut branch = snap(25, Some(20), 3, 1);
    branch["timestamp-ms"] = json!(1002);
    let mut append = snap(30, Some(20), 4, 1);
    append["timestamp-ms"] = json!(1004);
    src["snapshots"] = json!([snap(10, None, 1, 0), snap(20, Some(10), 2, 1), branch, append]);
    src["refs"]["b2"] = json!({"snapshot-id": 25, "type": "branch"});
    src["snapshot-log"] = json!([{"snapshot-id": 10, "timestamp-ms": 1001}, {"snapshot-id": 30, "timestamp-ms": 1004}]);
    let mut lane = Lane::new(created());
    let steps = lane.converge(&src);
    let groups: Vec<Vec<i64>> = steps.iter().filter(|s| !s.snapshots.is_empty()).map(|s| s.snapshots.clone()).collect();
    assert!(!groups.contains(&vec![20, 25]), "25 is not on main: {groups:?}");
    assert!(groups.iter().all(|g| g.len() == 1 || g == &vec![20, 30]), "{groups:?}");
}
