//! Mutation tests: every rewriter on corrupted copies of the real fixtures.
//!
//! The rewriters read files written by any engine, and some of those files
//! will be truncated or corrupt. Each fixture file (`tests/fixtures/`) is
//! mutated in ways aimed at its format: truncations (inside the Avro header,
//! a data block, a Parquet or Puffin footer), byte flips, Avro block counts
//! and sizes and string lengths replaced by huge or negative numbers, Avro
//! writer schemas replaced by wrong but valid ones, codecs swapped, Parquet
//! footer lengths and Puffin footers and blob ranges beyond the file, and
//! metadata JSON with wrong types, missing fields, deep nesting and huge
//! numbers; plus a number of random mutations per file from a seeded
//! xorshift generator. Every case must end in `Ok`, or in an error whose
//! message names the file it was given and says what is wrong. A panic, an
//! error that does not, or a successful rewrite whose output does not read
//! back fails the test, which lists each such case with its mutation.
//!
//! The cases are deterministic. Environment variables run more of them:
//! `ICERELAY_MUTATION_CASES` (random mutations per file, default
//! [`DEFAULT_CASES`]), `ICERELAY_MUTATION_SEED` (a different stream of them),
//! and `ICERELAY_MUTATION_REPORT=1` prints how often each kind of error came
//! back, to review the messages.
//!
//! What this does not prove: that no allocation exceeds the file's size.
//! A counting global allocator would see every other test's allocations
//! too. The guard tests at the end instead show, on real fixtures, that
//! each declared-length check fires before the library that would allocate
//! is called: the error is the check's own, not the library's.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};

use apache_avro::Codec;
use serde_json::{Value, json};

use super::fixture_tests::{Fixture, TARGET};
use super::*;

/// Random mutations per file when `ICERELAY_MUTATION_CASES` is not set:
/// with the structured ones, about 19,000 cases, 6 s for the whole module in
/// a debug build on two cores.
const DEFAULT_CASES: usize = 128;
const FIXTURES: [&str; 3] = ["pyiceberg_v2", "duckdb_mor_v2", "duckdb_dv_v3"];

// === settings ===

fn random_cases() -> usize {
    std::env::var("ICERELAY_MUTATION_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_CASES)
}

fn base_seed() -> u64 {
    std::env::var("ICERELAY_MUTATION_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x1ce_2e1a7)
}

/// A small xorshift64* generator: deterministic, and enough to spread
/// mutations over a file.
struct Rng(u64);

impl Rng {
    /// A generator of its own per file, so that a file's cases do not depend
    /// on which files came before it.
    fn for_file(file: &str) -> Self {
        // FNV-1a of the name, mixed with the seed.
        let hash = file.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        // xorshift never leaves zero, so zero must not be the start.
        let state = hash ^ base_seed().wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Self(if state == 0 { 0x9e37_79b9_7f4a_7c15 } else { state })
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

// === outcomes ===

/// What the cases of one test came to.
#[derive(Default)]
struct Outcomes {
    cases: usize,
    ok: usize,
    /// Error messages with the file and digits blanked, and how often each came.
    errors: BTreeMap<String, usize>,
    failures: Vec<String>,
}

impl Outcomes {
    /// Runs one case: `run` must return `Ok`, or an error that names `file`
    /// and what is wrong, without panicking.
    fn case(&mut self, file: &str, mutation: &str, run: impl FnOnce() -> Result<(), RewriteError>) {
        self.cases += 1;
        match catch_unwind(AssertUnwindSafe(run)) {
            Ok(Ok(())) => self.ok += 1,
            Ok(Err(e)) => match explains(&e, file) {
                Ok(()) => *self.errors.entry(shape(&e.to_string(), file)).or_default() += 1,
                Err(why) => self.failures.push(format!("{file} [{mutation}]: {why}: {e}")),
            },
            Err(panic) => self.failures.push(format!("{file} [{mutation}]: panicked: {}", panic_message(&*panic))),
        }
    }

    /// Prints the report if asked for, then fails on any failure.
    fn finish(self, test: &str) {
        if std::env::var_os("ICERELAY_MUTATION_REPORT").is_some() {
            eprintln!(
                "{test}: {} cases, {} ok, {} errors, {} failures",
                self.cases,
                self.ok,
                self.cases - self.ok - self.failures.len(),
                self.failures.len()
            );
            for (shape, n) in &self.errors {
                eprintln!("  {n:6}  {shape}");
            }
        }
        assert!(self.cases > 0, "{test}: no cases ran");
        assert!(
            self.failures.is_empty(),
            "{test}: {} of {} cases failed:\n{}",
            self.failures.len(),
            self.cases,
            self.failures.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
        );
    }
}

/// Whether an error names the file and says what is wrong with it.
fn explains(e: &RewriteError, file: &str) -> Result<(), &'static str> {
    if !e.to_string().contains(file) {
        return Err("the error does not name the file");
    }
    let detail = match e {
        RewriteError::InvalidMetadata { detail, .. }
        | RewriteError::InvalidManifest { detail, .. }
        | RewriteError::CorruptAvro { detail, .. }
        | RewriteError::Parquet { detail, .. }
        | RewriteError::Puffin { detail, .. } => detail.clone(),
        RewriteError::Avro { source, .. } => source.to_string(),
        // The message itself says what is wrong: the path is not mapped.
        RewriteError::UnmappedPath { .. } => return Ok(()),
        RewriteError::InvalidMapping { .. } => return Err("a mapping error from a file's contents"),
    };
    if detail.trim().len() < 8 { Err("the error does not say what is wrong") } else { Ok(()) }
}

fn shape(message: &str, file: &str) -> String {
    let blanked: String =
        message.replace(file, "FILE").chars().map(|c| if c.is_ascii_digit() { '#' } else { c }).take(160).collect();
    blanked
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

// === the rewriters, as a table copy calls them ===

fn map(f: &Fixture) -> PathMap {
    PathMap::from_locations(f.location(), TARGET).expect("map")
}

/// Lists and rewrites a manifest; a rewrite that succeeds must read back.
fn exercise_manifest(bytes: &[u8], file: &str, map: &PathMap) -> Result<(), RewriteError> {
    let parsed = manifest::Manifest::read(bytes, file)?;
    let entries = parsed.entries(file)?;
    let sizes: HashMap<String, i64> = entries.iter().map(|e| (e.path.clone(), e.size.saturating_add(7))).collect();
    let out = parsed.rewrite(file, map, &sizes)?;
    let again = manifest::list(&out, file).unwrap_or_else(|e| panic!("the rewritten manifest does not read back: {e}"));
    assert_eq!(again.len(), entries.len(), "the rewritten manifest lost entries");
    Ok(())
}

/// Lists and rewrites a manifest list; a rewrite that succeeds must read back.
fn exercise_manifest_list(bytes: &[u8], file: &str, map: &PathMap) -> Result<(), RewriteError> {
    let parsed = manifest_list::ManifestList::read(bytes, file)?;
    let manifests = parsed.manifests(file)?;
    let lengths: HashMap<String, i64> =
        manifests.iter().map(|m| (m.path.clone(), m.length.saturating_add(7))).collect();
    let out = parsed.rewrite(file, map, &lengths)?;
    let again = manifest_list::list(&out, file)
        .unwrap_or_else(|e| panic!("the rewritten manifest list does not read back: {e}"));
    assert_eq!(again.len(), manifests.len(), "the rewritten manifest list lost manifests");
    Ok(())
}

fn exercise_parquet(bytes: &[u8], file: &str, map: &PathMap) -> Result<(), RewriteError> {
    let out = position_deletes::rewrite(bytes, file, map)?;
    let identity = PathMap::from_locations(TARGET, TARGET).expect("map");
    position_deletes::rewrite(&out, file, &identity)
        .unwrap_or_else(|e| panic!("the rewritten delete file does not read back: {e}"));
    Ok(())
}

fn exercise_puffin(bytes: &[u8], file: &str, map: &PathMap) -> Result<(), RewriteError> {
    let referenced = puffin::referenced_files(bytes, file)?;
    let out = puffin::rewrite(bytes, file, map)?;
    let again = puffin::referenced_files(&out, file)
        .unwrap_or_else(|e| panic!("the rewritten Puffin file does not read back: {e}"));
    assert_eq!(again.len(), referenced.len(), "the rewritten Puffin file lost blobs");
    Ok(())
}

fn exercise_metadata(value: &Value, file: &str, map: &PathMap) -> Result<(), RewriteError> {
    metadata::rewrite_metadata(value, map, file, &|_| true).map(drop)
}

// === byte mutations for any format ===

/// Avro's zigzag variable-length encoding of a long.
fn zigzag(n: i64) -> Vec<u8> {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    let mut out = Vec::new();
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
    out
}

fn read_long(bytes: &[u8], pos: &mut usize) -> i64 {
    let mut raw = 0u64;
    let mut shift = 0;
    loop {
        let byte = bytes[*pos];
        *pos += 1;
        raw |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return (raw >> 1) as i64 ^ -((raw & 1) as i64);
        }
        shift += 7;
    }
}

const HUGE: [i64; 7] = [i64::MAX, i64::MIN, 1 << 40, 1 << 31, -1, 0x7fff_ffff_ffff, 1 << 62];

/// One random mutation of `bytes`, and its name.
fn random_mutation(rng: &mut Rng, bytes: &[u8]) -> (String, Vec<u8>) {
    let mut out = bytes.to_vec();
    let len = out.len().max(1);
    let name = match rng.below(8) {
        0 => {
            let at = rng.below(len);
            out.truncate(at);
            format!("truncated at {at}")
        }
        1 => {
            let at = rng.below(len);
            let x = (rng.below(255) + 1) as u8;
            out[at] ^= x;
            format!("byte {at} ^= {x:#x}")
        }
        2 => {
            let n = 2 + rng.below(7);
            let mut at = Vec::new();
            for _ in 0..n {
                let i = rng.below(len);
                out[i] ^= (rng.below(255) + 1) as u8;
                at.push(i);
            }
            format!("bytes {at:?} flipped")
        }
        3 => {
            let at = rng.below(len);
            let v = rng.pick(&[0x00, 0xff, 0x80, 0x7f]);
            out[at] = v;
            format!("byte {at} = {v:#x}")
        }
        4 => {
            let at = rng.below(len);
            let huge = rng.pick(&HUGE);
            let encoded = zigzag(huge);
            let end = (at + 1).min(out.len());
            out.splice(at..end, encoded);
            format!("byte {at} replaced by varint {huge}")
        }
        5 => {
            let at = rng.below(len);
            let n = 1 + rng.below(16);
            let end = (at + n).min(out.len());
            out.drain(at..end);
            format!("bytes {at}..{end} removed")
        }
        6 => {
            let at = rng.below(len);
            let n = 1 + rng.below(16);
            let end = (at + n).min(out.len());
            let copy = out[at..end].to_vec();
            out.splice(at..at, copy);
            format!("bytes {at}..{end} duplicated")
        }
        _ => {
            let at = rng.below(len);
            let n = (1 + rng.below(8)).min(out.len() - at);
            out[at..at + n].fill(0xff);
            format!("bytes {at}..{} = 0xff", at + n)
        }
    };
    (name, out)
}

// === Avro containers ===

/// An Avro container file taken apart, to be put back together with one
/// part changed. Test-side parsing of known-good fixtures.
#[derive(Clone)]
struct Container {
    /// Header metadata, in file order.
    entries: Vec<(String, Vec<u8>)>,
    marker: [u8; 16],
    /// File offset of the first block.
    data_at: usize,
    blocks: Vec<Block>,
}

#[derive(Clone)]
struct Block {
    /// File offset.
    at: usize,
    count: i64,
    /// As stored (compressed, if the file is).
    data: Vec<u8>,
}

impl Container {
    fn parse(bytes: &[u8]) -> Self {
        assert_eq!(&bytes[..4], b"Obj\x01");
        let mut pos = 4;
        let mut entries = Vec::new();
        loop {
            let n = read_long(bytes, &mut pos);
            if n == 0 {
                break;
            }
            for _ in 0..n.unsigned_abs() {
                let mut text = || {
                    let len = read_long(bytes, &mut pos) as usize;
                    pos += len;
                    bytes[pos - len..pos].to_vec()
                };
                let key = String::from_utf8(text()).expect("key");
                entries.push((key, text()));
            }
        }
        let marker: [u8; 16] = bytes[pos..pos + 16].try_into().expect("marker");
        pos += 16;
        let data_at = pos;
        let mut blocks = Vec::new();
        while pos < bytes.len() {
            let at = pos;
            let count = read_long(bytes, &mut pos);
            let size = read_long(bytes, &mut pos) as usize;
            blocks.push(Block { at, count, data: bytes[pos..pos + size].to_vec() });
            pos += size + 16;
        }
        Self { entries, marker, data_at, blocks }
    }

    fn get(&self, key: &str) -> Option<&[u8]> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_slice())
    }

    fn set(&mut self, key: &str, value: &[u8]) {
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_vec(),
            None => self.entries.push((key.to_owned(), value.to_vec())),
        }
    }

    fn codec(&self) -> Codec {
        self.get("avro.codec").map_or(Codec::Null, |c| std::str::from_utf8(c).expect("utf8").parse().expect("codec"))
    }

    fn header(&self) -> Vec<u8> {
        let mut out = b"Obj\x01".to_vec();
        out.extend(zigzag(self.entries.len() as i64));
        for (key, value) in &self.entries {
            out.extend(zigzag(key.len() as i64));
            out.extend_from_slice(key.as_bytes());
            out.extend(zigzag(value.len() as i64));
            out.extend_from_slice(value);
        }
        out.push(0);
        out.extend_from_slice(&self.marker);
        out
    }

    /// The file, with block `i`'s framing numbers replaced if asked.
    fn encode_with(&self, framing: Option<(usize, Option<i64>, Option<i64>)>) -> Vec<u8> {
        let mut out = self.header();
        for (i, block) in self.blocks.iter().enumerate() {
            let (count, size) = match framing {
                Some((b, count, size)) if b == i => {
                    (count.unwrap_or(block.count), size.unwrap_or(block.data.len() as i64))
                }
                _ => (block.count, block.data.len() as i64),
            };
            out.extend(zigzag(count));
            out.extend(zigzag(size));
            out.extend_from_slice(&block.data);
            out.extend_from_slice(&self.marker);
        }
        out
    }

    fn encode(&self) -> Vec<u8> {
        self.encode_with(None)
    }

    /// The records of block `i`, decompressed.
    fn records(&self, i: usize) -> Vec<u8> {
        let mut data = self.blocks[i].data.clone();
        self.codec().decompress(&mut data).expect("decompress");
        data
    }

    /// Replaces the records of block `i`, compressing them with the file's codec.
    fn set_records(&mut self, i: usize, mut records: Vec<u8>) {
        self.codec().compress(&mut records).expect("compress");
        self.blocks[i].data = records;
    }
}

/// Wrong but valid writer schemas, besides the other kind's real one.
fn wrong_schemas() -> Vec<(&'static str, Value)> {
    let record = |fields: Value| json!({"type": "record", "name": "wrong", "fields": fields});
    vec![
        ("a string schema", json!("string")),
        ("an empty record", record(json!([]))),
        ("a record of one string", record(json!([{"name": "status", "type": "string"}]))),
        ("a record of one long", record(json!([{"name": "manifest_path", "type": "long"}]))),
        (
            "a huge fixed",
            record(json!([{"name": "f", "type": {"type": "fixed", "name": "f", "size": 1_099_511_627_776u64}}])),
        ),
        ("an array of nulls", record(json!([{"name": "a", "type": {"type": "array", "items": "null"}}]))),
        ("a map of longs", record(json!([{"name": "m", "type": {"type": "map", "values": "long"}}]))),
        ("a big decimal", record(json!([{"name": "d", "type": {"type": "bytes", "logicalType": "big-decimal"}}]))),
        (
            "a recursive list",
            json!({"type": "record", "name": "node", "fields": [{"name": "next", "type": ["null", "node"]}]}),
        ),
        (
            "a record recursing without a union",
            json!({"type": "record", "name": "loop", "fields": [{"name": "again", "type": "loop"}]}),
        ),
    ]
}

/// Every `"type": <primitive>` in a schema, by JSON pointer.
fn primitive_types(schema: &Value, at: String, out: &mut Vec<String>) {
    match schema {
        Value::Object(map) => {
            for (key, value) in map {
                let here = format!("{at}/{key}");
                if key == "type" && value.is_string() {
                    out.push(here.clone());
                }
                primitive_types(value, here, out);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                primitive_types(item, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// The structured and random mutations of one Avro file.
fn avro_mutations(bytes: &[u8], foreign_schemas: &[Vec<u8>], rng: &mut Rng) -> Vec<(String, Vec<u8>)> {
    let file = Container::parse(bytes);
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    let header_len = file.data_at;

    // Truncations at the places the format changes meaning.
    let mut cuts = vec![0, 3, 4, 5, header_len / 2, header_len - 17, header_len - 16, header_len - 8, header_len];
    for block in &file.blocks {
        let end = block.at + 4 + block.data.len();
        cuts.extend([block.at + 1, block.at + 2, block.at + block.data.len() / 2, end - 1, end + 8, end + 15]);
    }
    cuts.push(bytes.len() - 1);
    for cut in cuts.into_iter().filter(|c| *c < bytes.len()) {
        cases.push((format!("truncated at {cut}"), bytes[..cut].to_vec()));
    }

    // Block counts and sizes.
    for i in 0..file.blocks.len() {
        let count = file.blocks[i].count;
        let size = file.blocks[i].data.len() as i64;
        for n in HUGE.into_iter().chain([count + 1, count - 1, 0, size + 1, size - 1]) {
            cases.push((format!("block {i} count = {n}"), file.encode_with(Some((i, Some(n), None)))));
        }
        for n in HUGE.into_iter().chain([size + 1, size - 1, 0, size + 17]) {
            cases.push((format!("block {i} size = {n}"), file.encode_with(Some((i, None, Some(n))))));
        }
    }

    // The header map: its count, and a key's and a value's length.
    let header = file.header();
    let rest = &bytes[header_len..];
    for huge in HUGE {
        let mut out = b"Obj\x01".to_vec();
        out.extend(zigzag(huge));
        out.extend_from_slice(&header[4 + zigzag(file.entries.len() as i64).len()..]);
        out.extend_from_slice(rest);
        cases.push((format!("header map count = {huge}"), out));
        for (what, key_side) in [("key", true), ("value", false)] {
            let mut out = b"Obj\x01".to_vec();
            out.extend(zigzag(file.entries.len() as i64));
            for (i, (key, value)) in file.entries.iter().enumerate() {
                let len = |n: usize, side: bool| if i == 0 && side { zigzag(huge) } else { zigzag(n as i64) };
                out.extend(len(key.len(), key_side));
                out.extend_from_slice(key.as_bytes());
                out.extend(len(value.len(), !key_side));
                out.extend_from_slice(value);
            }
            out.push(0);
            out.extend_from_slice(&file.marker);
            out.extend_from_slice(rest);
            cases.push((format!("header {what} 0 length = {huge}"), out));
        }
    }

    // Writer schemas: the other kinds' real ones, wrong ones, broken ones.
    let own = file.get("avro.schema").expect("schema").to_vec();
    let mut schemas: Vec<(String, Vec<u8>)> = foreign_schemas
        .iter()
        .filter(|s| **s != own)
        .enumerate()
        .map(|(i, s)| (format!("foreign schema {i}"), s.clone()))
        .collect();
    schemas.extend(wrong_schemas().into_iter().map(|(name, s)| (name.to_owned(), s.to_string().into_bytes())));
    schemas.push(("schema not JSON".into(), b"{\"type\": \"record\"".to_vec()));
    schemas.push(("schema not UTF-8".into(), vec![0xff, 0xfe, b'{']));
    schemas.push(("schema empty".into(), Vec::new()));
    let own_json: Value = serde_json::from_slice(&own).expect("schema json");
    let mut pointers = Vec::new();
    primitive_types(&own_json, String::new(), &mut pointers);
    for _ in 0..random_cases() / 8 {
        let pointer = pointers[rng.below(pointers.len())].clone();
        let new = rng.pick(&["string", "long", "int", "bytes", "boolean", "double", "null", "float", "nonsense"]);
        let mut changed = own_json.clone();
        if let Some(slot) = changed.pointer_mut(&pointer) {
            *slot = json!(new);
        }
        schemas.push((format!("schema {pointer} = {new}"), changed.to_string().into_bytes()));
    }
    for (name, schema) in schemas {
        let mut changed = file.clone();
        changed.set("avro.schema", &schema);
        cases.push((format!("writer schema: {name}"), changed.encode()));
    }

    // Codecs.
    for codec in ["null", "deflate", "snappy", "zstandard", "bzip2", "xz", "bogus", ""] {
        let mut changed = file.clone();
        changed.set("avro.codec", codec.as_bytes());
        cases.push((format!("codec = {codec:?}"), changed.encode()));
    }

    // Inside the (decompressed) records: string lengths, flips, huge numbers.
    for i in 0..file.blocks.len() {
        let records = file.records(i);
        // Paths are the longest strings: their lengths take two bytes.
        let lengths: Vec<usize> = (2..records.len())
            .filter(|&p| records[p - 2] & 0x80 != 0 && records[p - 1] & 0x80 == 0 && records[p..].starts_with(b"s3:"))
            .chain((2..records.len()).filter(|&p| {
                records[p - 2] & 0x80 != 0 && records[p - 1] & 0x80 == 0 && records[p..].starts_with(b"file:")
            }))
            .map(|p| p - 2)
            .collect();
        for _ in 0..random_cases() / 8 {
            if lengths.is_empty() {
                break;
            }
            let at = lengths[rng.below(lengths.len())];
            let mut pos = at;
            let len = read_long(&records, &mut pos);
            let new = rng.pick(&[i64::MAX, 1 << 40, -1, len + 1, len - 1, len + 1000, 0, 1 << 28]);
            let mut changed = file.clone();
            let mut edited = records.clone();
            edited.splice(at..pos, zigzag(new));
            changed.set_records(i, edited);
            cases.push((format!("block {i} string at {at}: length {len} -> {new}"), changed.encode()));
        }
        for _ in 0..random_cases() / 4 {
            let (name, edited) = random_mutation(rng, &records);
            let mut changed = file.clone();
            changed.set_records(i, edited);
            cases.push((format!("block {i} records: {name}"), changed.encode()));
        }
    }
    cases
}

fn avro_files(role: &str) -> Vec<(Fixture, Vec<String>)> {
    FIXTURES
        .into_iter()
        .map(|name| {
            let f = Fixture::load(name);
            let paths = f.paths(role);
            (f, paths)
        })
        .collect()
}

fn all_schemas() -> Vec<Vec<u8>> {
    let mut schemas = Vec::new();
    for role in ["manifest", "manifest-list"] {
        for (f, paths) in avro_files(role) {
            for path in paths {
                let schema = Container::parse(&f.read(&path)).get("avro.schema").expect("schema").to_vec();
                if !schemas.contains(&schema) {
                    schemas.push(schema);
                }
            }
        }
    }
    schemas
}

fn run_avro(role: &str, test: &str, exercise: fn(&[u8], &str, &PathMap) -> Result<(), RewriteError>) {
    let foreign = all_schemas();
    let mut outcomes = Outcomes::default();
    for (f, paths) in avro_files(role) {
        let map = map(&f);
        for path in paths {
            let bytes = f.read(&path);
            exercise(&bytes, &path, &map).expect("the unchanged fixture rewrites");
            let mut rng = Rng::for_file(&path);
            let mut cases = avro_mutations(&bytes, &foreign, &mut rng);
            cases.extend((0..random_cases()).map(|_| random_mutation(&mut rng, &bytes)));
            for (mutation, mutated) in cases {
                outcomes.case(&path, &mutation, || exercise(&mutated, &path, &map));
            }
        }
    }
    outcomes.finish(test);
}

#[test]
fn mutated_manifests() {
    run_avro("manifest", "mutated_manifests", exercise_manifest);
}

#[test]
fn mutated_manifest_lists() {
    run_avro("manifest-list", "mutated_manifest_lists", exercise_manifest_list);
}

// === Parquet ===

fn parquet_mutations(bytes: &[u8], rng: &mut Rng) -> Vec<(String, Vec<u8>)> {
    let len = bytes.len();
    let footer_len = u32::from_le_bytes(bytes[len - 8..len - 4].try_into().expect("4 bytes")) as usize;
    let footer_at = len - 8 - footer_len;
    let mut cases = Vec::new();
    for declared in
        [u32::MAX, len as u32, (len - 12) as u32, (len - 11) as u32, 0, footer_len as u32 + 1, footer_len as u32 - 1]
    {
        let mut out = bytes.to_vec();
        out[len - 8..len - 4].copy_from_slice(&declared.to_le_bytes());
        cases.push((format!("footer length = {declared}"), out));
    }
    for cut in [0, 3, 4, 5, footer_at, footer_at + footer_len / 2, len - 8, len - 5, len - 4, len - 1] {
        cases.push((format!("truncated at {cut}"), bytes[..cut].to_vec()));
    }
    for _ in 0..(random_cases() * 2) {
        // Inside the footer (Thrift metadata): the most fragile part.
        let mut out = bytes.to_vec();
        let at = footer_at + rng.below(footer_len);
        let x = (rng.below(255) + 1) as u8;
        out[at] ^= x;
        cases.push((format!("footer byte {at} ^= {x:#x}"), out));
    }
    for _ in 0..random_cases() {
        let mut out = bytes.to_vec();
        let at = footer_at + rng.below(footer_len);
        let huge = rng.pick(&HUGE);
        out.splice(at..at + 1, zigzag(huge));
        // Keep the declared footer length right, so the crate reads the change.
        let new_len = (footer_len + zigzag(huge).len() - 1) as u32;
        let n = out.len();
        out[n - 8..n - 4].copy_from_slice(&new_len.to_le_bytes());
        cases.push((format!("footer byte {at} replaced by varint {huge}"), out));
    }
    cases
}

#[test]
fn mutated_position_delete_files() {
    let mut outcomes = Outcomes::default();
    for name in FIXTURES {
        let f = Fixture::load(name);
        let map = map(&f);
        for path in f.paths("position-deletes") {
            let bytes = f.read(&path);
            exercise_parquet(&bytes, &path, &map).expect("the unchanged fixture rewrites");
            let mut rng = Rng::for_file(&path);
            let mut cases = parquet_mutations(&bytes, &mut rng);
            cases.extend((0..random_cases()).map(|_| random_mutation(&mut rng, &bytes)));
            for (mutation, mutated) in cases {
                outcomes.case(&path, &mutation, || exercise_parquet(&mutated, &path, &map));
            }
        }
    }
    outcomes.finish("mutated_position_delete_files");
}

// === Puffin ===

/// A Puffin file with `footer` as its footer payload and `flags`.
fn with_footer(bytes: &[u8], footer: &[u8], flags: [u8; 4]) -> Vec<u8> {
    let len = bytes.len();
    let payload_len = u32::from_le_bytes(bytes[len - 12..len - 8].try_into().expect("4 bytes")) as usize;
    let footer_at = len - 12 - payload_len - 4;
    let mut out = bytes[..footer_at].to_vec();
    out.extend_from_slice(b"PFA1");
    out.extend_from_slice(footer);
    out.extend_from_slice(&(footer.len() as u32).to_le_bytes());
    out.extend_from_slice(&flags);
    out.extend_from_slice(b"PFA1");
    out
}

fn puffin_mutations(bytes: &[u8], rng: &mut Rng) -> Vec<(String, Vec<u8>)> {
    let len = bytes.len();
    let payload_len = u32::from_le_bytes(bytes[len - 12..len - 8].try_into().expect("4 bytes")) as usize;
    let footer_at = len - 12 - payload_len - 4;
    let footer: Value = serde_json::from_slice(&bytes[footer_at + 4..len - 12]).expect("footer json");
    let mut cases = Vec::new();
    for declared in [u32::MAX, len as u32, (len - 12) as u32, 0, payload_len as u32 + 1, payload_len as u32 - 1] {
        let mut out = bytes.to_vec();
        out[len - 12..len - 8].copy_from_slice(&declared.to_le_bytes());
        cases.push((format!("footer payload size = {declared}"), out));
    }
    for cut in [0, 3, 4, 8, footer_at, footer_at + 2, footer_at + payload_len / 2, len - 12, len - 8, len - 1] {
        cases.push((format!("truncated at {cut}"), bytes[..cut].to_vec()));
    }
    cases.push(("footer compressed flag".into(), with_footer(bytes, &bytes[footer_at + 4..len - 12], [1, 0, 0, 0])));
    let edits: Vec<(&str, Value)> = vec![
        ("/blobs/0/offset", json!(len + 10)),
        ("/blobs/0/offset", json!(0)),
        ("/blobs/0/offset", json!(-4)),
        ("/blobs/0/offset", json!("4")),
        ("/blobs/0/offset", json!(u64::MAX)),
        ("/blobs/0/length", json!(1u64 << 40)),
        ("/blobs/0/length", json!(footer_at)),
        ("/blobs/0/length", json!(-1)),
        ("/blobs/0/length", json!(1.5)),
        ("/blobs/0/length", Value::Null),
        ("/blobs/0", json!("not a blob")),
        ("/blobs/0/properties", json!(5)),
        ("/blobs/0/properties/referenced-data-file", json!(7)),
        ("/blobs/0/properties/referenced-data-file", json!("")),
        ("/blobs/0/properties/referenced-data-file", json!("s3://elsewhere/data/x.parquet")),
        ("/blobs", json!({})),
        ("/blobs", json!("x")),
        ("/blobs", Value::Null),
        ("", json!([])),
        ("", json!("a string")),
    ];
    for (pointer, new) in edits {
        let mut changed = footer.clone();
        match changed.pointer_mut(pointer) {
            Some(slot) => *slot = new.clone(),
            None => continue,
        }
        cases.push((format!("footer {pointer} = {new}"), with_footer(bytes, changed.to_string().as_bytes(), [0; 4])));
    }
    if let Some(blob) = footer.pointer("/blobs/0").and_then(Value::as_object) {
        for key in ["offset", "length", "properties"] {
            let mut changed = footer.clone();
            if let Some(blob) = changed.pointer_mut("/blobs/0").and_then(Value::as_object_mut) {
                blob.remove(key);
            }
            cases.push((
                format!("footer blob 0 without {key}"),
                with_footer(bytes, changed.to_string().as_bytes(), [0; 4]),
            ));
        }
        assert!(blob.contains_key("offset"));
    }
    for _ in 0..random_cases() {
        let (name, payload) = random_mutation(rng, &bytes[footer_at + 4..len - 12]);
        cases.push((format!("footer payload: {name}"), with_footer(bytes, &payload, [0; 4])));
    }
    cases
}

#[test]
fn mutated_puffin_files() {
    let mut outcomes = Outcomes::default();
    for name in FIXTURES {
        let f = Fixture::load(name);
        let map = map(&f);
        for path in f.paths("puffin") {
            let bytes = f.read(&path);
            exercise_puffin(&bytes, &path, &map).expect("the unchanged fixture rewrites");
            let mut rng = Rng::for_file(&path);
            let mut cases = puffin_mutations(&bytes, &mut rng);
            cases.extend((0..random_cases()).map(|_| random_mutation(&mut rng, &bytes)));
            for (mutation, mutated) in cases {
                outcomes.case(&path, &mutation, || exercise_puffin(&mutated, &path, &map));
            }
        }
    }
    outcomes.finish("mutated_puffin_files");
}

// === metadata JSON ===

/// Every JSON pointer in a document.
fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match value {
        Value::Object(map) => {
            map.iter().for_each(|(k, v)| pointers(v, format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")), out))
        }
        Value::Array(items) => items.iter().enumerate().for_each(|(i, v)| pointers(v, format!("{at}/{i}"), out)),
        _ => {}
    }
}

fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| Value::Array(vec![inner]))
}

fn wrong_values() -> Vec<(&'static str, Value)> {
    vec![
        ("a string", json!("x")),
        ("a number", json!(1)),
        ("a huge number", json!(u64::MAX)),
        ("the smallest long", json!(i64::MIN)),
        ("a float", json!(1e308)),
        ("null", Value::Null),
        ("a boolean", json!(true)),
        ("an empty array", json!([])),
        ("an empty object", json!({})),
        ("arrays nested 100 deep", nested(100)),
        ("a 64 KiB string", json!("s3://warehouse/".repeat(4096))),
    ]
}

fn metadata_mutations(text: &[u8], rng: &mut Rng) -> Vec<(String, Value)> {
    let doc: Value = serde_json::from_slice(text).expect("metadata json");
    let mut all = Vec::new();
    pointers(&doc, String::new(), &mut all);
    let mut cases = Vec::new();
    // Every wrong type at the fields the rewrite reads.
    let read = [
        "",
        "/location",
        "/snapshots",
        "/snapshots/0",
        "/snapshots/0/manifest-list",
        "/snapshots/0/snapshot-id",
        "/statistics",
        "/properties",
        "/properties/write.data.path",
        "/metadata-log",
        "/metadata-log/0",
        "/metadata-log/0/metadata-file",
    ];
    for pointer in read {
        for (name, value) in wrong_values() {
            let mut changed = doc.clone();
            if let Some(slot) = changed.pointer_mut(pointer) {
                *slot = value;
                cases.push((format!("{pointer} = {name}"), changed));
            }
        }
    }
    for (name, value) in [
        ("statistics without a path", json!([{"snapshot-id": 1}])),
        ("a statistics entry that is a number", json!([5])),
        ("partition statistics that are a string", json!("x")),
        ("v1 manifests of numbers", json!([1, 2])),
    ] {
        let mut changed = doc.clone();
        let key = if name.starts_with("partition") { "partition-statistics" } else { "statistics" };
        if name.starts_with("v1") {
            if let Some(snapshot) = changed.pointer_mut("/snapshots/0").and_then(Value::as_object_mut) {
                snapshot.remove("manifest-list");
                snapshot.insert("manifests".into(), value);
            }
        } else if let Some(root) = changed.as_object_mut() {
            root.insert(key.into(), value);
        }
        cases.push((name.to_owned(), changed));
    }
    // Random fields removed or given a wrong type.
    for _ in 0..random_cases() {
        let pointer = all[rng.below(all.len())].clone();
        let mut changed = doc.clone();
        if rng.below(3) == 0 && !pointer.is_empty() {
            let (parent, key) = pointer.rsplit_once('/').expect("parent");
            match changed.pointer_mut(parent) {
                Some(Value::Object(map)) => {
                    map.remove(&key.replace("~1", "/").replace("~0", "~"));
                }
                Some(Value::Array(items)) => {
                    if let Ok(i) = key.parse::<usize>() {
                        items.remove(i);
                    }
                }
                _ => {}
            }
            cases.push((format!("{pointer} removed"), changed));
        } else {
            let (name, value) = wrong_values().swap_remove(rng.below(wrong_values().len()));
            if let Some(slot) = changed.pointer_mut(&pointer) {
                *slot = value;
            }
            cases.push((format!("{pointer} = {name}"), changed));
        }
    }
    // Byte mutations of the text, for those that still parse.
    for _ in 0..random_cases() {
        let (name, bytes) = random_mutation(rng, text);
        if let Ok(value) = serde_json::from_slice(&bytes) {
            cases.push((format!("text: {name}"), value));
        }
    }
    cases
}

#[test]
fn mutated_table_metadata() {
    let mut outcomes = Outcomes::default();
    for name in FIXTURES {
        let f = Fixture::load(name);
        let map = map(&f);
        for path in f.paths("metadata") {
            let text = f.read(&path);
            let original: Value = serde_json::from_slice(&text).expect("json");
            exercise_metadata(&original, &path, &map).expect("the unchanged fixture rewrites");
            let mut rng = Rng::for_file(&path);
            for (mutation, value) in metadata_mutations(&text, &mut rng) {
                outcomes.case(&path, &mutation, || exercise_metadata(&value, &path, &map));
            }
        }
    }
    outcomes.finish("mutated_table_metadata");
}

#[test]
fn metadata_nested_beyond_serde_json_limit_is_a_parse_error() {
    // Metadata reaches the rewrite as a parsed `Value`; what keeps a deeply
    // nested document from overflowing the stack (here, or when the `Value`
    // is cloned or dropped) is serde_json's recursion limit when parsing.
    let deep = format!("{{\"location\": {}1{}}}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(serde_json::from_str::<Value>(&deep).is_err());
}

// === the allocation guards, one by one ===

fn first(fixture: &str, role: &str) -> (Fixture, String, Vec<u8>) {
    let f = Fixture::load(fixture);
    let path = f.paths(role).into_iter().next().expect("a file of the role");
    let bytes = f.read(&path);
    (f, path, bytes)
}

fn error_of(result: Result<impl Sized, RewriteError>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn guard_avro_block_record_count() {
    for fixture in ["pyiceberg_v2", "duckdb_mor_v2"] {
        let (_, path, bytes) = first(fixture, "manifest");
        let file = Container::parse(&bytes);
        let e = error_of(manifest::list(&file.encode_with(Some((0, Some(i64::MAX), None))), &path));
        assert!(e.starts_with(&path), "{e}");
        assert!(e.contains("declares 9223372036854775807 records, more than its"), "{e}");
    }
}

#[test]
fn guard_avro_block_size() {
    let (_, path, bytes) = first("duckdb_mor_v2", "manifest-list");
    let file = Container::parse(&bytes);
    let e = error_of(manifest_list::list(&file.encode_with(Some((0, None, Some(1 << 40)))), &path));
    assert!(e.contains("declares 1099511627776 bytes, more than the") && e.contains("left in the file"), "{e}");
}

#[test]
fn guard_avro_string_length_inside_a_compressed_block() {
    // A deflate-compressed PyIceberg manifest: the length is checked on the
    // decompressed records, before apache-avro allocates the string.
    let (_, path, bytes) = first("pyiceberg_v2", "manifest");
    let mut file = Container::parse(&bytes);
    assert_eq!(file.codec(), Codec::Deflate(Default::default()));
    let mut records = file.records(0);
    let at = (2..records.len()).find(|&p| records[p..].starts_with(b"s3:")).expect("a path") - 2;
    records.splice(at..at + 2, zigzag(1 << 40));
    file.set_records(0, records);
    let e = error_of(manifest::list(&file.encode(), &path));
    assert!(e.contains(&format!("a string at offset {at} declares 1099511627776 bytes, but only")), "{e}");
}

#[test]
fn guard_avro_header_lengths() {
    let (_, path, bytes) = first("duckdb_dv_v3", "manifest");
    let file = Container::parse(&bytes);
    let mut out = b"Obj\x01".to_vec();
    out.extend(zigzag(1));
    out.extend(zigzag(1 << 40));
    out.extend_from_slice(&bytes[file.data_at..]);
    let e = error_of(manifest::list(&out, &path));
    assert!(e.contains("the header metadata is corrupt: a map key at offset 5 declares 1099511627776 bytes"), "{e}");
    let mut out = b"Obj\x01".to_vec();
    out.extend(zigzag(i64::MAX));
    out.extend_from_slice(&bytes[5..]);
    let e = error_of(manifest::list(&out, &path));
    assert!(e.contains("a map block at offset 4 declares 9223372036854775807 items"), "{e}");
}

#[test]
fn guard_avro_fixed_size_from_the_schema() {
    let (_, path, bytes) = first("duckdb_mor_v2", "manifest");
    let mut file = Container::parse(&bytes);
    let schema = json!({"type": "record", "name": "r", "fields": [
        {"name": "f", "type": {"type": "fixed", "name": "f", "size": 1_099_511_627_776u64}}]});
    file.set("avro.schema", schema.to_string().as_bytes());
    let e = error_of(manifest::list(&file.encode(), &path));
    assert!(e.contains("a fixed at offset 0 declares 1099511627776 bytes"), "{e}");
}

#[test]
fn guard_avro_snappy_declared_length() {
    let (_, path, bytes) = first("duckdb_mor_v2", "manifest");
    let mut file = Container::parse(&bytes);
    let mut records = file.records(0);
    file.set("avro.codec", b"snappy");
    Codec::Snappy.compress(&mut records).expect("compress");
    // Snappy's preamble (an unsigned varint) now claims 2^32 - 1 bytes.
    let preamble = snappy_preamble_len(&records);
    records.splice(..preamble, [0xff, 0xff, 0xff, 0xff, 0x0f]);
    file.blocks[0].data = records;
    let e = error_of(manifest::list(&file.encode(), &path));
    assert!(e.contains("declares 4294967295 bytes of Snappy-compressed records, more than its"), "{e}");
}

fn snappy_preamble_len(block: &[u8]) -> usize {
    block.iter().position(|b| b & 0x80 == 0).expect("varint end") + 1
}

#[test]
fn guard_avro_nesting_depth() {
    let (_, path, bytes) = first("duckdb_mor_v2", "manifest");
    let mut file = Container::parse(&bytes);
    let list = json!({"type": "record", "name": "node", "fields": [{"name": "next", "type": ["null", "node"]}]});
    file.set("avro.schema", list.to_string().as_bytes());
    file.blocks = vec![Block { at: 0, count: 1, data: vec![2; 5_000] }];
    let e = error_of(manifest::list(&file.encode(), &path));
    assert!(e.contains("values nest more than 64 levels deep"), "{e}");
}

#[test]
fn guard_parquet_footer_length() {
    let (f, path, bytes) = first("duckdb_mor_v2", "position-deletes");
    let mut out = bytes.clone();
    let n = out.len();
    out[n - 8..n - 4].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = error_of(position_deletes::rewrite(&out, &path, &map(&f)));
    assert!(
        e.contains(&format!("the footer declares 4294967295 bytes of metadata, more than the {} bytes", n - 12)),
        "{e}"
    );
}

#[test]
fn guard_puffin_footer_and_blob_ranges() {
    let (f, path, bytes) = first("duckdb_dv_v3", "puffin");
    let n = bytes.len();
    let mut out = bytes.clone();
    out[n - 12..n - 8].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = error_of(puffin::rewrite(&out, &path, &map(&f)));
    assert!(e.contains("footer payload length 4294967295 does not fit"), "{e}");

    let payload_len = u32::from_le_bytes(bytes[n - 12..n - 8].try_into().expect("4 bytes")) as usize;
    let mut footer: Value = serde_json::from_slice(&bytes[n - 12 - payload_len..n - 12]).expect("footer");
    footer["blobs"][0]["length"] = json!(1u64 << 40);
    let e = error_of(puffin::rewrite(&with_footer(&bytes, footer.to_string().as_bytes(), [0; 4]), &path, &map(&f)));
    assert!(e.contains("blob 0 declares 1099511627776 bytes at offset"), "{e}");
}
