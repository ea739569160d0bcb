//! Parquet position-delete files: rewriting the `file_path` column.
//!
//! Each row of a position-delete file names a data file by its absolute path
//! (column `file_path`, field id 2147483546) and a row position. Copied
//! unchanged, a replica's delete files point at the source's data files, match
//! none of the replica's, and the deleted rows come back (measured: 10 rows
//! instead of 7, in PyIceberg and DuckDB, without any error). The rewrite
//! keeps the Arrow schema with its field ids, the other columns, the row
//! groups, each column's compression codec and the key-value metadata; it
//! re-sorts only if two mappings reordered the paths, because the spec
//! requires rows sorted by `file_path`, then `pos`.
//!
//! `file_path` is read and written as a dictionary: a delete file names few
//! data files in many rows, so memory is the distinct paths plus an index per
//! row, not every row's path (a few kilobytes of dictionary page can declare
//! millions of rows of one long path).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::Int32Type;
use arrow_array::{Array, ArrayRef, DictionaryArray, RecordBatch, StringArray};
use arrow_schema::{DataType, Schema, SchemaRef};
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::file::metadata::ParquetMetaData;
use parquet::file::properties::{WriterProperties, WriterVersion};
use parquet::schema::types::ColumnPath;

use super::manifest::DELETE_FILE_PATH_FIELD_ID;
use super::{PathMap, RewriteError};

const MAGIC: &[u8; 4] = b"PAR1";
/// The end of a Parquet file: the footer's length (u32 little-endian), `PAR1`.
const TRAILER: usize = 8;
const FIELD_ID_KEY: &str = "PARQUET:field_id";

fn error(file: &str, detail: impl std::fmt::Display) -> RewriteError {
    RewriteError::Parquet { file: file.to_owned(), detail: detail.to_string() }
}

/// How much a delete file may decode to, per byte of the file: a real one
/// (a path repeated in a dictionary, positions in deltas) decodes to a few
/// dozen times its size, a crafted one to any size.
const DECODED_PER_FILE_BYTE: usize = 256;
/// What any delete file may decode to, whatever its size.
const MIN_DECODED_BUDGET: usize = 64 << 20;
/// What no delete file may decode to (paths are held once each, so this is
/// mostly positions: 8 bytes a row, 512 million rows).
const MAX_DECODED_BUDGET: usize = 4 << 30;

/// The decoded bytes a delete file of `len` bytes may take.
fn decoded_budget(len: usize) -> usize {
    len.saturating_mul(DECODED_PER_FILE_BYTE).clamp(MIN_DECODED_BUDGET, MAX_DECODED_BUDGET)
}

/// Rewrites a position-delete file's `file_path` column through `map`.
pub fn rewrite(bytes: &[u8], file: &str, map: &PathMap) -> Result<Vec<u8>, RewriteError> {
    rewrite_within(bytes, file, map, decoded_budget(bytes.len()))
}

/// [`rewrite`], decoding at most `budget` bytes.
fn rewrite_within(bytes: &[u8], file: &str, map: &PathMap, budget: usize) -> Result<Vec<u8>, RewriteError> {
    check_footer(bytes, file)?;
    // The `parquet` and `arrow` crates still panic on some corrupt pages
    // instead of returning an error (a bounds assertion while decoding
    // definition levels, found by `mutation_tests`; apache/arrow-rs#10107 is
    // another). A delete file comes from any writer, so such a panic becomes
    // an error naming the file. Everything the closure builds is dropped with
    // it, so nothing half-changed survives. (This relies on panic = "unwind",
    // Cargo's default, which icerelay's profiles keep.)
    std::panic::catch_unwind(AssertUnwindSafe(|| rewrite_checked(bytes, file, map, budget))).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        Err(error(file, format!("the parquet crate panicked decoding it ({message})")))
    })
}

/// [`rewrite`] once the footer's length is known to fit.
fn rewrite_checked(bytes: &[u8], file: &str, map: &PathMap, budget: usize) -> Result<Vec<u8>, RewriteError> {
    let input = Bytes::copy_from_slice(bytes);
    let builder = ParquetRecordBatchReaderBuilder::try_new(input.clone()).map_err(|e| error(file, e))?;
    let metadata = builder.metadata().clone();
    check_column_chunks(&metadata, bytes.len(), file)?;
    let path_column = path_column_index(builder.schema()).ok_or_else(|| {
        error(
            file,
            format!("no `file_path` column (field id {DELETE_FILE_PATH_FIELD_ID}); is this a position-delete file?"),
        )
    })?;
    let schema = with_dictionary_paths(builder.schema(), path_column, file)?;
    let pos_column = schema.fields().iter().position(|f| f.name() == "pos");

    let file_metadata = metadata.file_metadata();
    let original_kv = file_metadata.key_value_metadata().cloned().unwrap_or_default();
    // Kept as it was (the column it describes is still a string column): the
    // writer's own would describe the dictionary it is given.
    let kv = original_kv;

    let mut props = WriterProperties::builder()
        .set_writer_version(if file_metadata.version() >= 2 {
            WriterVersion::PARQUET_2_0
        } else {
            WriterVersion::PARQUET_1_0
        })
        .set_max_row_group_row_count(None)
        .set_key_value_metadata(if kv.is_empty() { None } else { Some(kv) });
    if let Some(created_by) = file_metadata.created_by() {
        props = props.set_created_by(created_by.to_owned());
    }
    if let Some(row_group) = metadata.row_groups().first() {
        for column in row_group.columns() {
            props = props
                .set_column_compression(ColumnPath::new(column.column_path().parts().to_vec()), column.compression());
        }
    }

    // Read and map every row group; remember the boundaries to keep them.
    // Batch by batch within the budget: a few kilobytes of dictionary and
    // run-length encoding can declare billions of rows.
    let mut decoded = 0usize;
    let mut groups: Vec<Vec<RecordBatch>> = Vec::new();
    let options = ArrowReaderOptions::new().with_schema(schema.clone());
    for index in 0..metadata.num_row_groups() {
        let reader = ParquetRecordBatchReaderBuilder::try_new_with_options(input.clone(), options.clone())
            .and_then(|b| b.with_row_groups(vec![index]).build())
            .map_err(|e| error(file, e))?;
        let mut batches = Vec::new();
        let mut dictionary: Option<ArrayRef> = None;
        for batch in reader {
            let batch = batch.map_err(|e| error(file, e))?;
            decoded = decoded.saturating_add(held_by(&batch, path_column, &mut dictionary));
            if decoded > budget {
                return Err(error(
                    file,
                    format!(
                        "it decodes to more than {budget} bytes from {} bytes, more than a position-delete file \
                         does; icerelay does not rewrite it",
                        bytes.len()
                    ),
                ));
            }
            batches.push(map_batch(&batch, path_column, map, file)?);
        }
        groups.push(batches);
    }
    if !is_sorted(&groups, path_column, pos_column) {
        groups = vec![vec![sort(&groups, &schema, path_column, pos_column, file)?]];
    }

    let options = parquet::arrow::arrow_writer::ArrowWriterOptions::new()
        .with_properties(props.build())
        .with_skip_arrow_metadata(true);
    let mut writer = ArrowWriter::try_new_with_options(Vec::new(), schema, options).map_err(|e| error(file, e))?;
    for batches in &groups {
        for batch in batches {
            writer.write(batch).map_err(|e| error(file, e))?;
        }
        writer.flush().map_err(|e| error(file, e))?;
    }
    writer.into_inner().map_err(|e| error(file, e))
}

/// Checks the magic numbers, and the footer's declared length against the
/// file's, before the `parquet` crate reads the footer: a clear error here
/// instead of the crate's "NeedMoreData".
fn check_footer(bytes: &[u8], file: &str) -> Result<(), RewriteError> {
    let len = bytes.len();
    if len < MAGIC.len() + TRAILER || &bytes[..MAGIC.len()] != MAGIC || &bytes[len - MAGIC.len()..] != MAGIC {
        return Err(error(file, format!("missing the PAR1 magic at the start or the end of its {len} bytes")));
    }
    let mut declared = [0u8; 4];
    declared.copy_from_slice(&bytes[len - TRAILER..len - MAGIC.len()]);
    let declared = u32::from_le_bytes(declared);
    let room = len - MAGIC.len() - TRAILER;
    if u64::from(declared) > room as u64 {
        return Err(error(
            file,
            format!("the footer declares {declared} bytes of metadata, more than the {room} bytes the file has for it"),
        ));
    }
    Ok(())
}

/// Checks that every column chunk the footer declares lies inside the file,
/// before the `parquet` crate reads one: the crate asserts (panics) on a
/// negative offset or length.
fn check_column_chunks(metadata: &ParquetMetaData, len: usize, file: &str) -> Result<(), RewriteError> {
    for (g, row_group) in metadata.row_groups().iter().enumerate() {
        for column in row_group.columns() {
            let start = column.dictionary_page_offset().unwrap_or_else(|| column.data_page_offset());
            let length = column.compressed_size();
            let inside = u64::try_from(start)
                .ok()
                .zip(u64::try_from(length).ok())
                .and_then(|(start, length)| start.checked_add(length))
                .is_some_and(|end| end <= len as u64);
            if !inside {
                return Err(error(
                    file,
                    format!(
                        "row group {g} declares column {} at offset {start} with {length} bytes, outside the file's {len} bytes",
                        column.column_path()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `schema` with the path column read as a dictionary of strings.
fn with_dictionary_paths(schema: &SchemaRef, column: usize, file: &str) -> Result<SchemaRef, RewriteError> {
    let mut fields: Vec<_> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let path = &fields[column];
    if !matches!(path.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
        return Err(error(file, format!("the file_path column has type {}, expected a string", path.data_type())));
    }
    fields[column] =
        path.clone().with_data_type(DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)));
    Ok(Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())))
}

/// The memory `batch` adds to what is held: its columns, the path column's
/// keys, and its dictionary when it is not the one the batch before shared.
fn held_by(batch: &RecordBatch, path_column: usize, dictionary: &mut Option<ArrayRef>) -> usize {
    let mut held = 0;
    for (i, column) in batch.columns().iter().enumerate() {
        let Some(paths) = column.as_dictionary_opt::<Int32Type>().filter(|_| i == path_column) else {
            held += column.get_array_memory_size();
            continue;
        };
        held += paths.keys().get_array_memory_size();
        let values = paths.values();
        if !dictionary.as_ref().is_some_and(|seen| Arc::ptr_eq(seen, values)) {
            held += values.get_array_memory_size();
            *dictionary = Some(values.clone());
        }
    }
    held
}

/// The column with field id 2147483546, or named `file_path`.
fn path_column_index(schema: &SchemaRef) -> Option<usize> {
    let by_id = schema.fields().iter().position(|f| {
        f.metadata().get(FIELD_ID_KEY).and_then(|id| id.parse::<i32>().ok()) == Some(DELETE_FILE_PATH_FIELD_ID)
    });
    by_id.or_else(|| schema.fields().iter().position(|f| f.name() == "file_path"))
}

/// `batch` with its paths (read as a dictionary, see
/// [`with_dictionary_paths`]) mapped: the distinct paths only.
fn map_batch(batch: &RecordBatch, column: usize, map: &PathMap, file: &str) -> Result<RecordBatch, RewriteError> {
    let dictionary = batch
        .column(column)
        .as_dictionary_opt::<Int32Type>()
        .ok_or_else(|| error(file, "the file_path column was not read as a dictionary of 32-bit keys"))?;
    let values = dictionary
        .values()
        .as_string_opt::<i32>()
        .ok_or_else(|| error(file, "the file_path dictionary does not hold strings"))?;
    let mapped: StringArray =
        values.iter().map(|p| p.map(|p| map.rewrite(p, file)).transpose()).collect::<Result<_, _>>()?;
    let new: ArrayRef =
        Arc::new(DictionaryArray::try_new(dictionary.keys().clone(), Arc::new(mapped)).map_err(|e| error(file, e))?);
    let mut columns = batch.columns().to_vec();
    columns[column] = new;
    RecordBatch::try_new(batch.schema(), columns).map_err(|e| error(file, e))
}

/// The path of row `i` of a dictionary-read path column.
fn path_at(array: &dyn Array, i: usize) -> Option<&str> {
    if array.is_null(i) {
        return None;
    }
    let dictionary = array.as_dictionary_opt::<Int32Type>()?;
    let key = usize::try_from(dictionary.keys().value(i)).ok()?;
    dictionary.values().as_string_opt::<i32>().filter(|v| key < v.len()).map(|v| v.value(key))
}

fn pos_at(array: Option<&ArrayRef>, i: usize) -> i64 {
    array.and_then(|a| a.as_primitive_opt::<arrow_array::types::Int64Type>()).map_or(0, |a| a.value(i))
}

fn is_sorted(groups: &[Vec<RecordBatch>], path: usize, pos: Option<usize>) -> bool {
    let mut previous: Option<(String, i64)> = None;
    for batch in groups.iter().flatten() {
        let paths = batch.column(path);
        let positions = pos.map(|p| batch.column(p));
        for i in 0..batch.num_rows() {
            let current = (path_at(paths.as_ref(), i).unwrap_or_default(), pos_at(positions, i));
            if let Some((p, n)) = &previous
                && (p.as_str(), *n) > current
            {
                return false;
            }
            previous = Some((current.0.to_owned(), current.1));
        }
    }
    true
}

fn sort(
    groups: &[Vec<RecordBatch>],
    schema: &SchemaRef,
    path: usize,
    pos: Option<usize>,
    file: &str,
) -> Result<RecordBatch, RewriteError> {
    let all: Vec<&RecordBatch> = groups.iter().flatten().collect();
    let batch = arrow_select::concat::concat_batches(schema, all).map_err(|e| error(file, e))?;
    let mut keys = vec![arrow_ord::sort::SortColumn { values: batch.column(path).clone(), options: None }];
    if let Some(p) = pos {
        keys.push(arrow_ord::sort::SortColumn { values: batch.column(p).clone(), options: None });
    }
    let indices = arrow_ord::sort::lexsort_to_indices(&keys, None).map_err(|e| error(file, e))?;
    let columns = batch
        .columns()
        .iter()
        .map(|c| arrow_select::take::take(c.as_ref(), &indices, None))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(file, e))?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| error(file, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Int64Array;
    use arrow_schema::{Field, Schema};
    use parquet::basic::{Compression, ZstdLevel};
    use std::collections::HashMap;

    fn field(name: &str, dt: DataType, id: i64) -> Field {
        Field::new(name, dt, false).with_metadata(HashMap::from([(FIELD_ID_KEY.to_owned(), id.to_string())]))
    }

    fn delete_file(paths: &[&str], positions: &[i64]) -> Vec<u8> {
        let schema = Arc::new(Schema::new(vec![
            field("file_path", DataType::Utf8, i64::from(DELETE_FILE_PATH_FIELD_ID)),
            field("pos", DataType::Int64, 2_147_483_545),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(StringArray::from(paths.to_vec())), Arc::new(Int64Array::from(positions.to_vec()))],
        )
        .expect("batch");
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_key_value_metadata(Some(vec![parquet::file::metadata::KeyValue::new(
                "delete-type".into(),
                "position".to_owned(),
            )]))
            .build();
        let mut w = ArrowWriter::try_new(Vec::new(), schema, Some(props)).expect("writer");
        w.write(&batch).expect("write");
        w.into_inner().expect("bytes")
    }

    fn read(bytes: Vec<u8>) -> (Vec<String>, Vec<i64>, parquet::file::metadata::ParquetMetaData) {
        let builder = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(bytes)).expect("reader");
        let meta = builder.metadata().as_ref().clone();
        let mut paths = Vec::new();
        let mut pos = Vec::new();
        for batch in builder.build().expect("build") {
            let batch = batch.expect("batch");
            paths.extend(batch.column(0).as_string::<i32>().iter().map(|p| p.unwrap_or_default().to_owned()));
            pos.extend(batch.column(1).as_primitive::<arrow_array::types::Int64Type>().values().iter().copied());
        }
        (paths, pos, meta)
    }

    #[test]
    fn paths_change_and_everything_else_stays() {
        let map = PathMap::from_locations("s3://w/t", "s3://r/t").expect("map");
        let original =
            delete_file(&["s3://w/t/data/a.parquet", "s3://w/t/data/a.parquet", "s3://w/t/data/b.parquet"], &[1, 5, 0]);
        let out = rewrite(&original, "d.parquet", &map).expect("rewrite");
        let (paths, pos, meta) = read(out);
        assert_eq!(paths, ["s3://r/t/data/a.parquet", "s3://r/t/data/a.parquet", "s3://r/t/data/b.parquet"]);
        assert_eq!(pos, [1, 5, 0]);
        let column = meta.row_group(0).column(0);
        assert!(matches!(column.compression(), Compression::ZSTD(_)), "codec kept");
        let kv = meta.file_metadata().key_value_metadata().expect("kv");
        assert!(kv.iter().any(|k| k.key == "delete-type" && k.value.as_deref() == Some("position")));
        let descr = meta.file_metadata().schema_descr();
        assert_eq!(descr.column(0).self_type().get_basic_info().id(), DELETE_FILE_PATH_FIELD_ID);
    }

    #[test]
    fn a_mapping_that_reorders_paths_re_sorts_the_rows() {
        let mut map = PathMap::from_locations("s3://w/t", "s3://r/t").expect("map");
        map.add("s3://w/t/data/a", "s3://r/t/data/z").expect("map");
        let original = delete_file(&["s3://w/t/data/a/1.parquet", "s3://w/t/data/b/1.parquet"], &[3, 4]);
        let (paths, pos, _) = read(rewrite(&original, "d.parquet", &map).expect("rewrite"));
        assert_eq!(paths, ["s3://r/t/data/b/1.parquet", "s3://r/t/data/z/1.parquet"]);
        assert_eq!(pos, [4, 3]);
    }

    #[test]
    fn one_long_path_in_many_rows_is_held_once_and_a_file_beyond_its_budget_is_refused() {
        let map = PathMap::from_locations("s3://w/t", "s3://r/t").expect("map");
        // 20,000 rows naming one 1 KB path: 20 MB as strings, a few
        // kilobytes as a dictionary.
        let long = format!("s3://w/t/data/{}.parquet", "x".repeat(1000));
        let positions: Vec<i64> = (0..20_000).collect();
        let many = delete_file(&vec![long.as_str(); positions.len()], &positions);
        assert!(many.len() < 200_000, "it compresses: {} bytes", many.len());
        let rewritten = rewrite_within(&many, "d.parquet", &map, 1 << 20).map_err(|e| e.to_string());
        let (paths, pos, _) = read(rewritten.expect("within 1 MiB: the path is held once"));
        assert_eq!((paths.len(), pos), (20_000, positions));
        assert!(paths.iter().all(|p| p.starts_with("s3://r/t/data/xxx")), "every row's path mapped");

        // Positions are held whole: 300,000 of them are 2.4 MB.
        let positions: Vec<i64> = (0..300_000).collect();
        let more = delete_file(&vec!["s3://w/t/data/a.parquet"; positions.len()], &positions);
        let refused = rewrite_within(&more, "d.parquet", &map, 1 << 20).map(|_| ()).expect_err("beyond 1 MiB");
        assert!(
            refused.to_string().contains("decodes to more than 1048576 bytes")
                && refused.to_string().contains("d.parquet"),
            "{refused}"
        );
        assert!(rewrite(&more, "d.parquet", &map).is_ok(), "within the real budget");
        assert_eq!(decoded_budget(1), MIN_DECODED_BUDGET);
        assert_eq!(decoded_budget(usize::MAX), MAX_DECODED_BUDGET);
        assert_eq!(decoded_budget(1 << 20), 256 << 20);
    }

    #[test]
    fn unmapped_and_corrupt_files_are_errors() {
        let map = PathMap::from_locations("s3://w/t", "s3://r/t").expect("map");
        let outside = delete_file(&["s3://other/x.parquet"], &[0]);
        assert!(
            rewrite(&outside, "d.parquet", &map).expect_err("unmapped").to_string().contains("s3://other/x.parquet")
        );
        let good = delete_file(&["s3://w/t/a.parquet"], &[0]);
        for cut in [0, 4, good.len() / 2, good.len() - 3] {
            assert!(rewrite(&good[..cut], "d.parquet", &map).is_err(), "cut at {cut}");
        }
    }
}
