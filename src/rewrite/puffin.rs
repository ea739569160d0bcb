//! Puffin files holding deletion vectors (Iceberg v3): rewriting the footer.
//!
//! A deletion-vector blob names its data file in the blob property
//! `referenced-data-file`. Blobs come before the footer, so rewriting the
//! footer's JSON leaves every blob's `offset` and `length` valid; the file's
//! size changes and the manifest entry gets the new one.
//!
//! Layout: `PFA1`, blobs, then the footer: `PFA1`, the JSON payload, its
//! length (u32 little-endian), 4 flag bytes, `PFA1`.

use serde_json::Value;

use super::{PathMap, RewriteError};

const MAGIC: &[u8; 4] = b"PFA1";
/// Footer bytes after the payload: length, flags, magic.
const FOOTER_TAIL: usize = 12;
/// Bit 0 of the first flag byte: the payload is LZ4-compressed.
const FLAG_COMPRESSED: u8 = 1;
/// The blob property naming the data file a deletion vector applies to.
pub const REFERENCED_DATA_FILE: &str = "referenced-data-file";

fn error(file: &str, detail: impl Into<String>) -> RewriteError {
    RewriteError::Puffin { file: file.to_owned(), detail: detail.into() }
}

/// The footer's JSON and where the footer starts.
fn footer(bytes: &[u8], file: &str) -> Result<(Value, usize), RewriteError> {
    let len = bytes.len();
    if len < MAGIC.len() * 2 + FOOTER_TAIL || &bytes[..4] != MAGIC || &bytes[len - 4..] != MAGIC {
        return Err(error(file, "missing the PFA1 magic at the start or the end (truncated?)"));
    }
    let mut size = [0u8; 4];
    size.copy_from_slice(&bytes[len - FOOTER_TAIL..len - 8]);
    let payload_len = u32::from_le_bytes(size) as usize;
    let flags = bytes[len - 8];
    let payload_end = len - FOOTER_TAIL;
    let footer_start = payload_end
        .checked_sub(payload_len.saturating_add(MAGIC.len()))
        .filter(|start| *start >= MAGIC.len())
        .ok_or_else(|| error(file, format!("footer payload length {payload_len} does not fit in a {len}-byte file")))?;
    if &bytes[footer_start..footer_start + 4] != MAGIC {
        return Err(error(file, "no PFA1 magic at the start of the footer"));
    }
    if flags & FLAG_COMPRESSED != 0 {
        return Err(error(file, "the footer payload is LZ4-compressed, which icerelay cannot rewrite yet"));
    }
    let payload = &bytes[footer_start + 4..payload_end];
    let json = serde_json::from_slice(payload).map_err(|e| error(file, format!("footer is not JSON: {e}")))?;
    check_blobs(&json, footer_start, file)?;
    Ok((json, footer_start))
}

/// Checks that every blob lies between the leading magic and the footer.
/// A rewrite keeps the blobs where they are and the footer's offsets as they
/// are, so a blob outside that range means the file is corrupt, and a copy
/// would be too.
fn check_blobs(json: &Value, footer_start: usize, file: &str) -> Result<(), RewriteError> {
    let Some(blobs) = json.get("blobs").and_then(Value::as_array) else { return Ok(()) };
    let area = MAGIC.len() as u64..footer_start as u64;
    for (i, blob) in blobs.iter().enumerate() {
        let number = |key: &str| blob.get(key).and_then(Value::as_u64);
        let (Some(offset), Some(length)) = (number("offset"), number("length")) else {
            return Err(error(file, format!("blob {i} has no `offset` and `length` as non-negative integers")));
        };
        if offset < area.start || offset.checked_add(length).is_none_or(|end| end > area.end) {
            return Err(error(
                file,
                format!(
                    "blob {i} declares {length} bytes at offset {offset}, outside the blobs (bytes {} to {}, before the footer)",
                    area.start, area.end
                ),
            ));
        }
    }
    Ok(())
}

/// The `referenced-data-file` of every blob.
pub fn referenced_files(bytes: &[u8], file: &str) -> Result<Vec<String>, RewriteError> {
    let (json, _) = footer(bytes, file)?;
    Ok(blobs(&json)
        .iter()
        .filter_map(|b| b.get("properties")?.get(REFERENCED_DATA_FILE)?.as_str().map(str::to_owned))
        .collect())
}

fn blobs(json: &Value) -> Vec<Value> {
    json.get("blobs").and_then(Value::as_array).cloned().unwrap_or_default()
}

/// Rewrites each blob's `referenced-data-file` through `map`.
pub fn rewrite(bytes: &[u8], file: &str, map: &PathMap) -> Result<Vec<u8>, RewriteError> {
    let (mut json, footer_start) = footer(bytes, file)?;
    let blobs = json
        .get_mut("blobs")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| error(file, "the footer has no `blobs` array"))?;
    for blob in blobs {
        let Some(properties) = blob.get_mut("properties").and_then(Value::as_object_mut) else { continue };
        if let Some(path) = properties.get(REFERENCED_DATA_FILE).and_then(Value::as_str) {
            let mapped = map.rewrite(path, file)?;
            properties.insert(REFERENCED_DATA_FILE.to_owned(), Value::String(mapped));
        }
    }
    let payload = serde_json::to_vec(&json).map_err(|e| error(file, e.to_string()))?;
    let payload_len = u32::try_from(payload.len()).map_err(|_| error(file, "footer too large"))?;
    let flags_start = bytes.len() - 8;
    let mut out = Vec::with_capacity(footer_start + payload.len() + 16);
    out.extend_from_slice(&bytes[..footer_start]);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&payload);
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&bytes[flags_start..flags_start + 4]);
    out.extend_from_slice(MAGIC);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn puffin(blob: &[u8], footer: &Value) -> Vec<u8> {
        let payload = serde_json::to_vec(footer).expect("json");
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(blob);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&payload);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(MAGIC);
        out
    }

    #[test]
    fn referenced_data_file_changes_and_blobs_stay_in_place() {
        let blob = b"\x00\x01\x02bitmap-bytes";
        let footer = json!({"blobs": [{"type": "deletion-vector-v1", "fields": [2147483645], "snapshot-id": 1,
            "sequence-number": 1, "offset": 4, "length": blob.len(),
            "properties": {"referenced-data-file": "file:///w/t/data/a.parquet", "cardinality": "2"}}],
            "properties": {"created-by": "duckdb"}});
        let original = puffin(blob, &footer);
        let map = PathMap::from_locations("file:///w/t", "s3://r/t").expect("map");
        let out = rewrite(&original, "dv.puffin", &map).expect("rewrite");
        assert_eq!(&out[4..4 + blob.len()], blob, "blob bytes at the same offset");
        assert_eq!(referenced_files(&out, "dv.puffin").expect("footer"), ["s3://r/t/data/a.parquet"]);
        let (json, _) = super::footer(&out, "dv.puffin").expect("footer");
        assert_eq!(json["properties"], footer["properties"]);
        assert_eq!(json["blobs"][0]["cardinality"], footer["blobs"][0]["cardinality"]);
    }

    #[test]
    fn truncated_and_foreign_files_are_errors() {
        let original = puffin(b"x", &json!({"blobs": []}));
        let map = PathMap::from_locations("file:///w/t", "s3://r/t").expect("map");
        for cut in [0, 5, original.len() - 1] {
            assert!(rewrite(&original[..cut], "dv.puffin", &map).is_err(), "cut at {cut}");
        }
        assert!(rewrite(b"PAR1xxxxxxxxxxxxxxxxxxxxPAR1", "dv.puffin", &map).is_err());
    }
}
