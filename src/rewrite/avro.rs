//! Avro container files read and written with their header kept verbatim.
//!
//! Iceberg manifests carry their meaning in the Avro header (`schema`,
//! `partition-spec`, `format-version`, `content`, ...) and in field-id
//! attributes of the writer schema. A rewritten file keeps every header key
//! byte for byte, the original `avro.schema` text included, and the codec;
//! only the records change. `apache-avro` decodes the records with the writer
//! schema, encodes the header map and writes the data blocks; icerelay only
//! chooses what goes in the header.

use std::collections::HashMap;
use std::io::Cursor;
use std::str::FromStr;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::{Codec, Reader, Schema, Writer};
use md5::Digest;

use super::RewriteError;

const MAGIC: &[u8; 4] = b"Obj\x01";

/// An Avro container file's header: every metadata key, as written.
#[derive(Debug, Clone)]
pub struct Header {
    /// All metadata, `avro.schema` and `avro.codec` included.
    pub metadata: HashMap<String, Vec<u8>>,
    /// The writer schema.
    pub schema: Schema,
    /// The block codec.
    pub codec: Codec,
}

impl Header {
    /// A metadata value as UTF-8 text.
    pub fn text(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }
}

/// Reads the header and every record of an Avro container file.
pub fn read(bytes: &[u8], file: &str) -> Result<(Header, Vec<Value>), RewriteError> {
    let metadata = read_metadata(bytes, file)?;
    let codec = match metadata.get("avro.codec").map(|c| std::str::from_utf8(c)) {
        None => Codec::Null,
        Some(Ok(name)) => Codec::from_str(name).map_err(|_| RewriteError::InvalidManifest {
            file: file.to_owned(),
            kind: "Avro file",
            detail: format!("unsupported codec {name:?}"),
        })?,
        Some(Err(_)) => {
            return Err(RewriteError::InvalidManifest {
                file: file.to_owned(),
                kind: "Avro file",
                detail: "the codec name is not UTF-8".into(),
            });
        }
    };
    let reader = Reader::new(bytes).map_err(|e| RewriteError::avro(file, e))?;
    let schema = reader.writer_schema().clone();
    let mut records = Vec::new();
    for record in reader {
        records.push(record.map_err(|e| RewriteError::avro(file, e))?);
    }
    Ok((Header { metadata, schema, codec }, records))
}

/// The header's metadata map, decoded with `apache-avro` from the raw bytes
/// (the reader API does not expose `avro.*` keys).
fn read_metadata(bytes: &[u8], file: &str) -> Result<HashMap<String, Vec<u8>>, RewriteError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(RewriteError::InvalidManifest {
            file: file.to_owned(),
            kind: "Avro file",
            detail: "missing the Avro container magic bytes (not an Avro file, or empty)".into(),
        });
    }
    let mut cursor = Cursor::new(&bytes[MAGIC.len()..]);
    let map_schema = Schema::map(Schema::Bytes).build();
    let value = GenericDatumReader::builder(&map_schema)
        .build()
        .and_then(|r| r.read_value(&mut cursor))
        .map_err(|e| RewriteError::avro(file, e))?;
    let Value::Map(entries) = value else {
        return Err(RewriteError::InvalidManifest {
            file: file.to_owned(),
            kind: "Avro file",
            detail: "the header metadata is not a map".into(),
        });
    };
    Ok(entries
        .into_iter()
        .filter_map(|(k, v)| match v {
            Value::Bytes(b) => Some((k, b)),
            _ => None,
        })
        .collect())
}

/// Writes `records` with `header`'s schema, codec and metadata.
///
/// The records must have been decoded with the same schema, and only
/// changed in ways that keep their Avro types; they are not re-validated.
pub fn write<'a>(
    header: &Header,
    records: impl IntoIterator<Item = &'a Value>,
    file: &str,
) -> Result<Vec<u8>, RewriteError> {
    // Derived from the source path: rewriting the same file the same way always
    // gives the same bytes, so a rerun after a crash finds its earlier output
    // identical and a replica's recorded manifest lengths stay true.
    let marker: [u8; 16] = md5::Md5::digest(format!("icerelay sync marker {file}").as_bytes()).into();
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    // The header map is written in key order (not hash order), one block,
    // with the crate's encoders for each count, key and value.
    let mut entries: Vec<(&String, &Vec<u8>)> = header.metadata.iter().collect();
    entries.sort();
    let encode = |schema: &Schema, value: Value, out: &mut Vec<u8>| {
        GenericDatumWriter::builder(schema)
            .build()
            .and_then(|w| w.write_value(out, value))
            .map_err(|e| RewriteError::avro(file, e))
    };
    encode(&Schema::Long, Value::Long(entries.len() as i64), &mut out)?;
    for (key, value) in entries {
        encode(&Schema::String, Value::String(key.clone()), &mut out)?;
        encode(&Schema::Bytes, Value::Bytes(value.clone()), &mut out)?;
    }
    encode(&Schema::Long, Value::Long(0), &mut out)?;
    out.extend_from_slice(&marker);
    let mut writer = Writer::append_to_with_codec(&header.schema, out, header.codec, marker)
        .map_err(|e| RewriteError::avro(file, e))?;
    for record in records {
        writer.unvalidated_append_value_ref(record).map_err(|e| RewriteError::avro(file, e))?;
    }
    writer.into_inner().map_err(|e| RewriteError::avro(file, e))
}

// === value helpers ===

/// The field `name` of a record (looking through a nullable union).
pub fn field<'v>(value: &'v Value, name: &str) -> Option<&'v Value> {
    match value {
        Value::Record(fields) => fields.iter().find(|(n, _)| n == name).map(|(_, v)| v),
        Value::Union(_, inner) => field(inner, name),
        _ => None,
    }
}

/// Mutable access to the field `name` of a record (looking through a nullable union).
pub fn field_mut<'v>(value: &'v mut Value, name: &str) -> Option<&'v mut Value> {
    match value {
        Value::Record(fields) => fields.iter_mut().find(|(n, _)| n == name).map(|(_, v)| v),
        Value::Union(_, inner) => field_mut(inner, name),
        _ => None,
    }
}

/// The value inside a nullable union, or the value itself.
pub fn unwrap_union(value: &Value) -> &Value {
    match value {
        Value::Union(_, inner) => inner,
        other => other,
    }
}

/// Mutable variant of [`unwrap_union`].
pub fn unwrap_union_mut(value: &mut Value) -> &mut Value {
    match value {
        Value::Union(_, inner) => inner,
        other => other,
    }
}

/// A string field.
pub fn string<'v>(value: &'v Value, name: &str) -> Option<&'v str> {
    match field(value, name).map(unwrap_union) {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

/// An integer field (int or long).
pub fn long(value: &Value, name: &str) -> Option<i64> {
    match field(value, name).map(unwrap_union) {
        Some(Value::Long(n)) => Some(*n),
        Some(Value::Int(n)) => Some(i64::from(*n)),
        _ => None,
    }
}

/// Replaces the string in a (possibly nullable) string field.
pub fn set_string(value: &mut Value, name: &str, new: String) -> bool {
    match field_mut(value, name).map(unwrap_union_mut) {
        Some(Value::String(s)) => {
            *s = new;
            true
        }
        _ => false,
    }
}

/// Replaces the number in a (possibly nullable) long field, keeping its Avro type.
pub fn set_long(value: &mut Value, name: &str, new: i64) -> bool {
    match field_mut(value, name).map(unwrap_union_mut) {
        Some(Value::Long(n)) => {
            *n = new;
            true
        }
        Some(Value::Int(n)) => match i32::try_from(new) {
            Ok(v) => {
                *n = v;
                true
            }
            Err(_) => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"{"type": "record", "name": "r", "fields": [
        {"name": "path", "type": "string", "field-id": 500},
        {"name": "n", "type": ["null", "long"], "field-id": 501, "doc": "kept"}]}"#;

    fn file(codec: Codec) -> Vec<u8> {
        let schema = Schema::parse_str(SCHEMA).expect("schema");
        let mut w = Writer::with_codec(&schema, Vec::new(), codec).expect("writer");
        w.add_user_metadata("format-version".into(), b"2").expect("meta");
        w.add_user_metadata("partition-spec".into(), br#"[{"x":1}]"#).expect("meta");
        for i in 0..3 {
            let record = Value::Record(vec![
                ("path".into(), Value::String(format!("s3://w/{i}"))),
                ("n".into(), Value::Union(1, Box::new(Value::Long(i)))),
            ]);
            w.append_value(record).expect("append");
        }
        w.into_inner().expect("bytes")
    }

    #[test]
    fn header_is_kept_verbatim_and_records_change() {
        for codec in [Codec::Null, Codec::Deflate(Default::default()), Codec::Snappy] {
            let bytes = file(codec);
            let (header, mut records) = read(&bytes, "f.avro").expect("read");
            assert_eq!(header.codec, codec);
            assert_eq!(header.text("format-version"), Some("2"));
            for r in &mut records {
                let p = string(r, "path").expect("path").replace("s3://w", "s3://r");
                assert!(set_string(r, "path", p));
                assert!(set_long(r, "n", 7));
            }
            let out = write(&header, &records, "f.avro").expect("write");
            assert_eq!(out, write(&header, &records, "f.avro").expect("write"), "deterministic output");
            let (again, records) = read(&out, "f.avro").expect("read back");
            assert_eq!(again.metadata, header.metadata, "every header key, avro.schema text included");
            assert_eq!(records.len(), 3);
            assert_eq!(string(&records[2], "path"), Some("s3://r/2"));
            assert_eq!(long(&records[0], "n"), Some(7));
            assert!(again.text("avro.schema").is_some_and(|s| s.contains("field-id")));
        }
    }

    #[test]
    fn truncated_or_foreign_bytes_are_errors_not_panics() {
        let bytes = file(Codec::Deflate(Default::default()));
        for cut in [0, 3, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(read(&bytes[..cut], "f.avro").is_err(), "cut at {cut}");
        }
        assert!(read(b"PAR1 not avro", "f.avro").is_err());
        let mut corrupt = bytes.clone();
        let n = corrupt.len();
        corrupt[n - 20..n - 10].fill(0xff);
        assert!(read(&corrupt, "f.avro").is_err());
    }
}
