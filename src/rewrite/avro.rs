//! Avro container files read and written with their header kept verbatim.
//!
//! Iceberg manifests carry their meaning in the Avro header (`schema`,
//! `partition-spec`, `format-version`, `content`, ...) and in field-id
//! attributes of the writer schema. A rewritten file keeps every header key
//! byte for byte, the original `avro.schema` text included, and the codec;
//! only the records change. `apache-avro` parses the schema and decodes the
//! header and the values icerelay does not decode itself (numbers and
//! strings); icerelay walks records without decoding them (see
//! [`lengths`]), frames data blocks, and inflates and deflates them with
//! zlib-rs (other codecs through `apache-avro`).
//!
//! Two ways in:
//!
//! - [`read`] / [`write()`]: whole records as [`Value`]s, for small files and
//!   tests.
//! - [`Records`]: the rewrite path. Decoding a manifest entry into a `Value`
//!   tree (a `String` per field name, a hash map per record when encoding it
//!   back) is what a table copy spent most of its time on, yet a rewrite
//!   changes two or three fields of each record. [`Records::read`] walks each
//!   record once by its schema with [`lengths::Walk`], decoding nothing, and
//!   notes where the few fields the caller asked for lie; [`Fields`] decodes
//!   just those (numbers and strings itself, other types with
//!   `apache-avro`), and writes records back as their original bytes with
//!   only the replaced fields encoded anew. Every other field is kept bit
//!   for bit, which is stronger than decoding and re-encoding it.
//!
//! Files come from any writer and may be corrupt. That walk checks every
//! length and count a record declares against the bytes that are there, and
//! the values a decoder would refuse (text that is not UTF-8, enum indexes,
//! ints, booleans; not the format of UUID strings), so that no declared
//! length makes `apache-avro` allocate more than the file holds and no
//! corrupt value is copied to a replica; block sizes, record counts, and
//! what Snappy and deflate blocks expand to are checked here.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::str::FromStr;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::ResolvedSchema;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::{Codec, Schema};
use md5::Digest;

use super::RewriteError;

mod lengths;

const MAGIC: &[u8; 4] = b"Obj\x01";
/// Bytes of records after which a data block is written out: `apache-avro`'s
/// own default, so that [`Fields::write`] cuts blocks where [`write()`] does.
const BLOCK_SIZE: usize = 16_000;
/// The decompressed records of one file [`Records`] can hold: spans are
/// `u32` offsets.
const MAX_RECORD_BYTES: usize = u32::MAX as usize;
/// How many bytes of records a file may decompress to, per byte of the file:
/// manifests deflate to a tenth of their size or so; a crafted block
/// inflates a thousandfold.
const RECORDS_PER_FILE_BYTE: usize = 128;
/// What any file may decompress to, whatever its size.
const MIN_RECORDS_BUDGET: usize = 64 << 20;

/// The bytes of records a file of `len` bytes may decompress to.
fn records_budget(len: usize) -> usize {
    len.saturating_mul(RECORDS_PER_FILE_BYTE).clamp(MIN_RECORDS_BUDGET, MAX_RECORD_BYTES)
}

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

fn invalid(file: &str, detail: impl Into<String>) -> RewriteError {
    RewriteError::CorruptAvro { file: file.to_owned(), detail: detail.into() }
}

/// Reads the header and every record of an Avro container file.
pub fn read(bytes: &[u8], file: &str) -> Result<(Header, Vec<Value>), RewriteError> {
    // Through [`Records`], whose walk checks every declared length first:
    // the records are then decoded from the data that walk accepted.
    let records = Records::read(bytes, file, &[])?;
    let resolved = ResolvedSchema::try_from(&records.header.schema).map_err(|e| RewriteError::avro(file, e))?;
    let reader = GenericDatumReader::builder(&records.header.schema)
        .resolved_writer_schemata(resolved)
        .build()
        .map_err(|e| RewriteError::avro(file, e))?;
    let values = (0..records.len())
        .map(|record| {
            let span = records.span(record, None);
            let mut bytes = &records.data[span.start as usize..span.end as usize];
            reader.read_value(&mut bytes).map_err(|e| RewriteError::avro(file, e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((records.header.clone(), values))
}

/// Whether two container files hold the same header metadata and the same
/// records, however their blocks are cut and compressed.
pub fn same_contents(a: &[u8], b: &[u8], file: &str) -> Result<bool, RewriteError> {
    let (a, b) = (Records::read(a, file, &[])?, Records::read(b, file, &[])?);
    Ok(a.header.metadata == b.header.metadata && a.data == b.data)
}

/// The file's codec, as named in its header.
fn codec(metadata: &HashMap<String, Vec<u8>>, file: &str) -> Result<Codec, RewriteError> {
    match metadata.get("avro.codec").map(|c| std::str::from_utf8(c)) {
        None => Ok(Codec::Null),
        Some(Ok(name)) => Codec::from_str(name).map_err(|_| invalid(file, format!("unsupported codec {name:?}"))),
        Some(Err(_)) => Err(invalid(file, "the codec name is not UTF-8")),
    }
}

/// Appends the records of one data block, decompressed, to `data`, which
/// may hold at most `limit` bytes in all.
///
/// Deflate, the codec of nearly every manifest, is inflated here with
/// zlib-rs, about twice as fast as the `miniz_oxide` inside `apache-avro`,
/// and bounded as it goes: a small block could otherwise inflate to
/// gigabytes before any check sees it.
fn decompress(codec: Codec, block: &[u8], data: &mut Vec<u8>, limit: usize) -> Result<(), String> {
    match codec {
        Codec::Null => data.extend_from_slice(block),
        Codec::Deflate(_) => {
            // Straight into `data`'s spare capacity (a `Read` adapter would
            // zero every buffer first), with this thread's inflater: setting
            // one up costs about as much as inflating a small block.
            INFLATER.with_borrow_mut(|inflater| inflate(inflater, block, data, limit))?;
        }
        Codec::Zstandard(_) => {
            // Bounded as it goes too: zstd reaches ratios of thousands.
            let room = limit.saturating_sub(data.len()).saturating_add(1);
            let decoder =
                zstd::stream::read::Decoder::with_buffer(block).map_err(|e| format!("does not decompress ({e})"))?;
            decoder.take(room as u64).read_to_end(data).map_err(|e| format!("does not decompress ({e})"))?;
        }
        other => {
            if matches!(other, Codec::Snappy) {
                check_snappy_length(block)?;
            }
            let mut decompressed = block.to_vec();
            other.decompress(&mut decompressed).map_err(|e| format!("does not decompress ({e})"))?;
            data.extend_from_slice(&decompressed);
        }
    }
    if data.len() > limit {
        return Err(format!("decompresses to more than the {limit} bytes of records this file may hold"));
    }
    Ok(())
}

thread_local! {
    static INFLATER: RefCell<flate2::Decompress> = RefCell::new(flate2::Decompress::new(false));
    static DEFLATER: RefCell<flate2::Compress> =
        RefCell::new(flate2::Compress::new(flate2::Compression::fast(), false));
}

/// Inflates the raw deflate stream `block` onto `data`, up to `limit` bytes in all.
fn inflate(inflater: &mut flate2::Decompress, block: &[u8], data: &mut Vec<u8>, limit: usize) -> Result<(), String> {
    inflater.reset(false);
    loop {
        let consumed = inflater.total_in() as usize;
        if data.len() > limit {
            return Err(format!("inflates to more than the {limit} bytes of records a file may hold"));
        }
        if data.capacity() == data.len() {
            // Doubling, as `reserve` would, but never past the limit, which
            // a deflate bomb would otherwise double.
            let wanted = data.len().max((block.len() * 4).clamp(64 * 1024, 1 << 20));
            data.reserve_exact(wanted.min(limit.saturating_add(1) - data.len()));
        }
        let status = inflater
            .decompress_vec(&block[consumed..], data, flate2::FlushDecompress::Finish)
            .map_err(|e| format!("does not inflate ({e})"))?;
        match status {
            flate2::Status::StreamEnd => break,
            // Out of room: more is reserved above. Anything else is no
            // progress with input left, which a whole stream never makes.
            flate2::Status::Ok | flate2::Status::BufError if data.capacity() == data.len() => {}
            flate2::Status::Ok | flate2::Status::BufError => {
                return Err("is cut off inside its deflate stream".to_owned());
            }
        }
    }
    if data.len() > limit {
        return Err(format!("inflates to more than the {limit} bytes of records a file may hold"));
    }
    Ok(())
}

/// Refuses a Snappy block whose declared decompressed size it cannot hold.
/// `apache-avro` allocates the declared size before decompressing. One
/// element of Snappy's format writes at most 64 bytes from 3 (a copy with a
/// two-byte offset), so a block can expand at most 64/3 times; 22 times its
/// size is a bound no real block reaches.
fn check_snappy_length(block: &[u8]) -> Result<(), String> {
    // The size is Snappy's preamble: an unsigned varint of at most 5 bytes.
    let mut declared = 0u64;
    for (i, byte) in block.iter().take(5).enumerate() {
        declared |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let bound = (block.len() as u64).saturating_mul(22);
            return if declared > bound {
                Err(format!(
                    "declares {declared} bytes of Snappy-compressed records, more than its {} bytes can hold",
                    block.len()
                ))
            } else {
                Ok(())
            };
        }
    }
    Err("has no readable Snappy length".to_owned())
}

thread_local! {
    /// Writer schemas parsed on this thread, with their text, latest last.
    static SCHEMAS: RefCell<Vec<(Vec<u8>, Schema)>> = const { RefCell::new(Vec::new()) };
}

/// Writer schemas a thread keeps parsed: a table's manifests and manifest
/// lists share a few, and parsing one (JSON, then every name checked by
/// a regular expression) cost more than cloning it.
const SCHEMAS_KEPT: usize = 8;

/// The writer schema whose JSON text is `text`.
fn writer_schema(text: &[u8], file: &str) -> Result<Schema, RewriteError> {
    // The latest used is kept last, so that the schemas in constant use
    // (a table's manifest list schema) are not pushed out by many others.
    let hit = SCHEMAS.with_borrow_mut(|kept| {
        let found = kept.iter().position(|(kept, _)| kept == text)?;
        let entry = kept.remove(found);
        let schema = entry.1.clone();
        kept.push(entry);
        Some(schema)
    });
    if let Some(schema) = hit {
        return Ok(schema);
    }
    let json: serde_json::Value = serde_json::from_slice(text)
        .map_err(|e| invalid(file, format!("the header's `avro.schema` is not JSON: {e}")))?;
    let schema = Schema::parse(&json).map_err(|e| RewriteError::avro(file, e))?;
    SCHEMAS.with_borrow_mut(|kept| {
        if kept.len() == SCHEMAS_KEPT {
            kept.remove(0);
        }
        kept.push((text.to_vec(), schema.clone()));
    });
    Ok(schema)
}

/// The header's metadata map, decoded with `apache-avro` from the raw bytes
/// (the reader API does not expose `avro.*` keys), and the offset just past it.
fn read_metadata(bytes: &[u8], file: &str) -> Result<(HashMap<String, Vec<u8>>, usize), RewriteError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(invalid(file, "missing the Avro container magic bytes (not an Avro file, or empty)"));
    }
    let map_schema = Schema::map(Schema::Bytes).build();
    let mut end = MAGIC.len();
    lengths::check(&map_schema, &HashMap::new(), bytes, &mut end)
        .map_err(|m| invalid(file, format!("the header metadata is corrupt: {m}")))?;
    let mut cursor = Cursor::new(&bytes[MAGIC.len()..end]);
    let value = GenericDatumReader::builder(&map_schema)
        .build()
        .and_then(|r| r.read_value(&mut cursor))
        .map_err(|e| RewriteError::avro(file, e))?;
    let Value::Map(entries) = value else {
        return Err(invalid(file, "the header metadata is not a map"));
    };
    let metadata = entries
        .into_iter()
        .filter_map(|(k, v)| match v {
            Value::Bytes(b) => Some((k, b)),
            _ => None,
        })
        .collect();
    Ok((metadata, end))
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
    let encoder = GenericDatumWriter::builder(&header.schema).build().map_err(|e| RewriteError::avro(file, e))?;
    let mut blocks = Blocks::start(header, file, 0)?;
    for record in records {
        encoder.write_value_ref(blocks.record(), record).map_err(|e| RewriteError::avro(file, e))?;
        blocks.end_record()?;
    }
    blocks.finish()
}

/// The data blocks of a container file being written: each record is
/// appended as its encoded bytes, and a block is cut once it holds
/// [`BLOCK_SIZE`] bytes, as `apache-avro`'s writer cuts them.
struct Blocks<'f> {
    file: &'f str,
    codec: Codec,
    marker: [u8; 16],
    out: Vec<u8>,
    block: Vec<u8>,
    count: usize,
    /// A deflated block (deflate uses this thread's [`DEFLATER`]: setting
    /// one up costs more than compressing a small block).
    compressed: Vec<u8>,
}

impl<'f> Blocks<'f> {
    /// The header written, no record yet.
    /// `expected` bytes are reserved for the whole file.
    fn start(header: &Header, file: &'f str, expected: usize) -> Result<Self, RewriteError> {
        let (mut out, marker) = write_header(header, file)?;
        out.reserve(expected.saturating_sub(out.len()));
        Ok(Self {
            file,
            codec: header.codec,
            marker,
            out,
            block: Vec::with_capacity(BLOCK_SIZE + BLOCK_SIZE / 4),
            count: 0,
            compressed: Vec::new(),
        })
    }

    /// Where the next record's bytes go; [`Blocks::end_record`] after them.
    fn record(&mut self) -> &mut Vec<u8> {
        &mut self.block
    }

    fn end_record(&mut self) -> Result<(), RewriteError> {
        self.count += 1;
        if self.block.len() >= BLOCK_SIZE {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), RewriteError> {
        if self.count == 0 {
            return Ok(());
        }
        // Deflate at its fastest level: the level is not in the file (any
        // reader inflates any level), and at the default level compressing
        // was a table copy's largest cost, for output a few percent smaller.
        let body = if matches!(self.codec, Codec::Deflate(_)) {
            DEFLATER
                .with_borrow_mut(|deflater| deflate(deflater, &self.block, &mut self.compressed))
                .map_err(|e| invalid(self.file, format!("deflate failed: {e}")))?;
            &self.compressed
        } else {
            self.codec.compress(&mut self.block).map_err(|e| RewriteError::avro(self.file, e))?;
            &self.block
        };
        put_long(&mut self.out, self.count as i64);
        put_long(&mut self.out, body.len() as i64);
        self.out.extend_from_slice(body);
        self.out.extend_from_slice(&self.marker);
        self.block.clear();
        self.count = 0;
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<u8>, RewriteError> {
        self.flush()?;
        Ok(self.out)
    }
}

/// Deflates `block` into `out` (cleared first) as one raw deflate stream.
fn deflate(deflater: &mut flate2::Compress, block: &[u8], out: &mut Vec<u8>) -> Result<(), flate2::CompressError> {
    deflater.reset();
    out.clear();
    out.reserve(block.len() / 2 + 64);
    loop {
        let consumed = deflater.total_in() as usize;
        if deflater.compress_vec(&block[consumed..], out, flate2::FlushCompress::Finish)? == flate2::Status::StreamEnd {
            return Ok(());
        }
        out.reserve(out.capacity().max(64));
    }
}

/// Appends `n` as Avro writes a long: zigzag, then 7 bits a byte.
fn put_long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

/// The magic bytes, the header map and the sync marker of a rewritten file.
fn write_header(header: &Header, file: &str) -> Result<(Vec<u8>, [u8; 16]), RewriteError> {
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
    Ok((out, marker))
}

// === impl Records ===

/// The records of an Avro container file as their encoded bytes, with the
/// position of the fields asked for in each.
///
/// A field is asked for by its path of record field names from the top-level
/// record (`["data_file", "file_path"]`); each path is a *slot*, numbered in
/// the order given. A slot whose field the writer schema lacks is absent
/// from every record. Everything else in a record is only walked over.
#[derive(Debug, Clone)]
pub struct Records {
    header: Header,
    paths: &'static [&'static [&'static str]],
    /// The decompressed data blocks, one after the other.
    data: Vec<u8>,
    /// Per record: its own span, then one span per slot ([`ABSENT`] if the
    /// schema lacks the field).
    spans: Vec<Span>,
    /// The size of the file read, which a rewrite's size is close to.
    encoded_len: usize,
}

impl Drop for Records {
    fn drop(&mut self) {
        pool::DATA.give(std::mem::take(&mut self.data));
        pool::SPANS.give(std::mem::take(&mut self.spans));
    }
}

/// The buffers of files read before, for the next file to read into.
///
/// A manifest's records and spans are megabytes, allocated for each file
/// and freed when it is written. The allocator keeps freed memory for a
/// while, per thread, and reading runs on whichever of the blocking pool's
/// threads is free, so on a large table freed buffers of every thread added
/// up to more than the buffers in use. Reused, they are as many as the
/// files being read at once.
mod pool {
    use std::sync::Mutex;

    use super::Span;

    /// Buffers kept: more than files are read at once (a table copy reads
    /// four manifests at a time, replication one per lane).
    const KEPT: usize = 8;
    /// A buffer larger than this is freed, not kept: one huge file must
    /// not pin its memory for the life of the process.
    const LARGEST_KEPT: usize = 32 * 1024 * 1024;
    /// The most all kept buffers of a pool may hold together.
    const BYTES_KEPT: usize = 128 * 1024 * 1024;

    pub(super) struct Pool<T>(Mutex<Vec<Vec<T>>>);

    pub(super) static DATA: Pool<u8> = Pool(Mutex::new(Vec::new()));
    pub(super) static SPANS: Pool<Span> = Pool(Mutex::new(Vec::new()));

    impl<T> Pool<T> {
        /// An empty buffer, with the capacity of an earlier one if any.
        pub(super) fn take(&self) -> Vec<T> {
            self.0.lock().ok().and_then(|mut kept| kept.pop()).unwrap_or_default()
        }

        /// Keeps `buffer` for a later [`Pool::take`], if there is room.
        pub(super) fn give(&self, mut buffer: Vec<T>) {
            if buffer.capacity() == 0 || buffer.capacity() * size_of::<T>() > LARGEST_KEPT {
                return;
            }
            buffer.clear();
            let bytes = |buffers: &[Vec<T>]| buffers.iter().map(|b| b.capacity() * size_of::<T>()).sum::<usize>();
            if let Ok(mut kept) = self.0.lock()
                && kept.len() < KEPT
                && bytes(&kept) + buffer.capacity() * size_of::<T>() <= BYTES_KEPT
            {
                kept.push(buffer);
            }
        }
    }
}

/// A byte range of [`Records::data`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

const ABSENT: Span = Span { start: u32::MAX, end: u32::MAX };

impl Records {
    /// Reads an Avro container file, locating `paths` in each record.
    pub fn read(bytes: &[u8], file: &str, paths: &'static [&'static [&'static str]]) -> Result<Self, RewriteError> {
        let (metadata, mut pos) = read_metadata(bytes, file)?;
        let codec = codec(&metadata, file)?;
        let schema = writer_schema(
            metadata.get("avro.schema").ok_or_else(|| invalid(file, "the header has no `avro.schema`"))?,
            file,
        )?;
        let marker: [u8; 16] = bytes
            .get(pos..pos + 16)
            .and_then(|m| m.try_into().ok())
            .ok_or_else(|| invalid(file, "the header is truncated (no sync marker)"))?;
        pos += 16;

        let mut data = pool::DATA.take();
        let mut spans = pool::SPANS.take();
        {
            let layout = Layout::new(&schema, paths, file)?;
            let long = GenericDatumReader::builder(&Schema::Long).build().map_err(|e| RewriteError::avro(file, e))?;
            let read_count = |cursor: &mut Cursor<&[u8]>, at: usize, what: &str| -> Result<usize, RewriteError> {
                match long.read_value(cursor).map_err(|e| RewriteError::avro(file, e))? {
                    Value::Long(n) => usize::try_from(n).map_err(|_| {
                        invalid(file, format!("the data block at byte {at} declares a negative {what} {n}"))
                    }),
                    _ => Err(invalid(file, format!("the data block at byte {at} has no {what}"))),
                }
            };
            while pos < bytes.len() {
                let at = pos;
                let mut cursor = Cursor::new(&bytes[pos..]);
                let count = read_count(&mut cursor, at, "record count")?;
                let size = read_count(&mut cursor, at, "byte size")?;
                let start = pos + cursor.position() as usize;
                let left = bytes.len() - start;
                if size > left {
                    return Err(invalid(
                        file,
                        format!(
                            "the data block at byte {at} declares {size} bytes, more than the {left} left in the file"
                        ),
                    ));
                }
                let block = &bytes[start..start + size];
                let end = start + size;
                if bytes.get(end..end + 16) != Some(&marker[..]) {
                    return Err(invalid(
                        file,
                        format!("the data block at byte {at} does not end with the file's sync marker"),
                    ));
                }
                pos = end + 16;
                let base = data.len();
                decompress(codec, block, &mut data, records_budget(bytes.len()))
                    .map_err(|detail| invalid(file, format!("the data block at byte {at} {detail}")))?;
                let held = data.len() - base;
                if count > held {
                    return Err(invalid(
                        file,
                        format!(
                            "the data block at byte {at} declares {count} records, more than its {held} bytes of records can hold"
                        ),
                    ));
                }
                layout.walk_block(&data, base, count, &mut spans, file, at)?;
            }
        }
        Ok(Self { header: Header { metadata, schema, codec }, paths, data, spans, encoded_len: bytes.len() })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The number of records.
    pub fn len(&self) -> usize {
        self.spans.len() / (1 + self.paths.len())
    }

    /// The memory these records hold, once [`Self::shrink_to_fit`]: the
    /// records, their spans, and the header (its parsed schema counted at
    /// twice the metadata's text).
    pub fn held_bytes(&self) -> usize {
        let header: usize = self.header.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        3 * header + self.data.len() + self.spans.len() * std::mem::size_of::<Span>()
    }

    /// Gives back the buffers' spare room (a buffer from the pool may be a
    /// larger file's), for records kept a while.
    pub fn shrink_to_fit(&mut self) {
        self.data.shrink_to_fit();
        self.spans.shrink_to_fit();
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Decoders and encoders for the slots.
    pub fn fields(&self, file: &str) -> Result<Fields<'_>, RewriteError> {
        let resolved = ResolvedSchema::try_from(&self.header.schema).map_err(|e| RewriteError::avro(file, e))?;
        let mut slots = Vec::with_capacity(self.paths.len());
        for path in self.paths {
            let slot = match find(&self.header.schema, path, &resolved, file)? {
                None => None,
                Some(schema) => Some(SlotCodec {
                    simple: Simple::of(schema),
                    reader: GenericDatumReader::builder(schema)
                        .resolved_writer_schemata(resolved.clone())
                        .build()
                        .map_err(|e| RewriteError::avro(file, e))?,
                    writer: GenericDatumWriter::builder(schema)
                        .resolved_schemata(resolved.clone())
                        .build()
                        .map_err(|e| RewriteError::avro(file, e))?,
                }),
            };
            slots.push(slot);
        }
        Ok(Fields { records: self, slots })
    }

    fn span(&self, record: usize, slot: Option<usize>) -> Span {
        self.spans[record * (1 + self.paths.len()) + slot.map_or(0, |s| s + 1)]
    }
}

/// Decodes and replaces the slots of [`Records`].
pub struct Fields<'r> {
    records: &'r Records,
    slots: Vec<Option<SlotCodec<'r>>>,
}

struct SlotCodec<'s> {
    /// Set for a long, int or string slot, which is decoded and encoded
    /// here: through `apache-avro`, each value of the millions a large
    /// table has was allocated, and each new one validated against the schema.
    simple: Option<Simple>,
    reader: GenericDatumReader<'s>,
    writer: GenericDatumWriter<'s>,
}

/// A new value for a slot (see [`Fields::write`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    /// Any value of the field's Avro type.
    Value(Value),
    /// A number for a long or int field that holds one (nullable or not,
    /// but not null), keeping its type.
    Long(i64),
    /// Text for a string field that holds some (nullable or not, but not null).
    Text(String),
}

/// The type of a slot simple enough to decode and encode without
/// `apache-avro`: a long, an int or a string, alone or in a union with null.
#[derive(Debug, Clone, Copy)]
struct Simple {
    kind: SimpleKind,
    /// For a union with null: the branch index of null and of the value.
    nullable: Option<(i64, i64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SimpleKind {
    Long,
    Int,
    Text,
}

/// A simple slot's value, borrowed from the records.
enum SimpleValue<'d> {
    Null,
    Number(i64),
    Text(&'d [u8]),
}

impl Simple {
    fn of(schema: &Schema) -> Option<Self> {
        let kind = |schema: &Schema| match schema {
            Schema::Long => Some(SimpleKind::Long),
            Schema::Int => Some(SimpleKind::Int),
            Schema::String => Some(SimpleKind::Text),
            _ => None,
        };
        if let Schema::Union(union) = schema {
            return match union.variants() {
                [Schema::Null, other] => Some(Self { kind: kind(other)?, nullable: Some((0, 1)) }),
                [other, Schema::Null] => Some(Self { kind: kind(other)?, nullable: Some((1, 0)) }),
                _ => None,
            };
        }
        Some(Self { kind: kind(schema)?, nullable: None })
    }

    /// Decodes the value that the walk accepted in `bytes` (a slot's span);
    /// `None` if the bytes are not what the walk accepts.
    fn decode<'d>(&self, bytes: &'d [u8]) -> Option<SimpleValue<'d>> {
        let mut at = 0;
        if let Some((null, _)) = self.nullable
            && lengths::read_long(bytes, &mut at)? == null
        {
            return Some(SimpleValue::Null);
        }
        let value = match self.kind {
            SimpleKind::Long | SimpleKind::Int => SimpleValue::Number(lengths::read_long(bytes, &mut at)?),
            SimpleKind::Text => {
                let len = usize::try_from(lengths::read_long(bytes, &mut at)?).ok()?;
                let text = bytes.get(at..at.checked_add(len)?)?;
                at += len;
                SimpleValue::Text(text)
            }
        };
        (at == bytes.len()).then_some(value)
    }

    /// Encodes `edit` onto `out` if it is a value of this type.
    fn encode(&self, edit: &Edit, out: &mut Vec<u8>) -> bool {
        let branch = |out: &mut Vec<u8>| {
            if let Some((_, value)) = self.nullable {
                put_long(out, value);
            }
        };
        match (self.kind, edit) {
            (SimpleKind::Long, Edit::Long(n)) => {
                branch(out);
                put_long(out, *n);
            }
            (SimpleKind::Int, Edit::Long(n)) if i32::try_from(*n).is_ok() => {
                branch(out);
                put_long(out, *n);
            }
            (SimpleKind::Text, Edit::Text(text)) => {
                branch(out);
                put_long(out, text.len() as i64);
                out.extend_from_slice(text.as_bytes());
            }
            _ => return false,
        }
        true
    }
}

impl Fields<'_> {
    /// Whether the writer schema has the field of `slot`.
    pub fn has(&self, slot: usize) -> bool {
        self.slots.get(slot).is_some_and(Option::is_some)
    }

    /// The value of `slot` in `record`; `None` if the schema lacks the field.
    pub fn value(&self, record: usize, slot: usize, file: &str) -> Result<Option<Value>, RewriteError> {
        let Some(Some(codec)) = self.slots.get(slot) else { return Ok(None) };
        let mut bytes = self.bytes(record, slot);
        codec.reader.read_value(&mut bytes).map(Some).map_err(|e| RewriteError::avro(file, e))
    }

    /// The number in `slot` of `record` (an int or a long, nullable or not);
    /// `None` if the schema lacks the field, or it is null or not a number.
    pub fn long(&self, record: usize, slot: usize, file: &str) -> Result<Option<i64>, RewriteError> {
        match self.simple(record, slot, file)? {
            Some(SimpleValue::Number(n)) => Ok(Some(n)),
            Some(_) => Ok(None),
            None => Ok(self.value(record, slot, file)?.as_ref().and_then(as_long)),
        }
    }

    /// The text in `slot` of `record` (a string, nullable or not); `None` if
    /// the schema lacks the field, or it is null or not a string.
    pub fn text(&self, record: usize, slot: usize, file: &str) -> Result<Option<Cow<'_, str>>, RewriteError> {
        match self.simple(record, slot, file)? {
            Some(SimpleValue::Text(text)) => std::str::from_utf8(text)
                .map(|text| Some(Cow::Borrowed(text)))
                .map_err(|_| invalid(file, format!("`{}` is not UTF-8", self.records.paths[slot].join(".")))),
            Some(_) => Ok(None),
            None => Ok(self.value(record, slot, file)?.and_then(|v| match into_unwrapped(v) {
                Value::String(s) => Some(Cow::Owned(s)),
                _ => None,
            })),
        }
    }

    /// The value of a simple slot; `None` if the slot is not simple.
    fn simple(&self, record: usize, slot: usize, file: &str) -> Result<Option<SimpleValue<'_>>, RewriteError> {
        let Some(Some(SlotCodec { simple: Some(simple), .. })) = self.slots.get(slot) else { return Ok(None) };
        simple.decode(self.bytes(record, slot)).map(Some).ok_or_else(|| {
            invalid(file, format!("`{}` of record {record} is corrupt", self.records.paths[slot].join(".")))
        })
    }

    fn bytes(&self, record: usize, slot: usize) -> &[u8] {
        let span = self.records.span(record, Some(slot));
        &self.records.data[span.start as usize..span.end as usize]
    }

    /// Encodes `edit` for `slot` onto `out`.
    fn encode(
        &self,
        record: usize,
        slot: usize,
        edit: &Edit,
        out: &mut Vec<u8>,
        file: &str,
    ) -> Result<(), RewriteError> {
        let Some(Some(codec)) = self.slots.get(slot) else { return Ok(()) };
        // A null stays null here as in the fallback below, which cannot
        // replace what is not there.
        if let Some(simple) = codec.simple
            && !matches!(self.simple(record, slot, file)?, Some(SimpleValue::Null))
            && simple.encode(edit, out)
        {
            return Ok(());
        }
        // Any other field type: the record's own value, changed, through
        // `apache-avro`, which keeps the union branch and checks the type.
        let replaced;
        let value = match edit {
            Edit::Value(value) => value,
            Edit::Long(_) | Edit::Text(_) => {
                let mut value = self.value(record, slot, file)?.unwrap_or(Value::Null);
                let fits = match edit {
                    Edit::Long(n) => replace_long(&mut value, *n),
                    Edit::Text(text) => replace_string(&mut value, text.clone()),
                    Edit::Value(_) => false,
                };
                if !fits {
                    let field = self.records.paths[slot].join(".");
                    return Err(invalid(file, format!("`{field}` cannot hold {edit:?}")));
                }
                replaced = value;
                &replaced
            }
        };
        codec.writer.write_value_ref(out, value).map(drop).map_err(|e| RewriteError::avro(file, e))
    }

    /// Writes every record with the header kept (see [`write()`]), each record
    /// as read except for the slots `edit` replaces: it is called with each
    /// record's index and fills in `(slot, new value)` pairs. A new value must
    /// have the field's type: a [`Edit::Value`] is validated against the
    /// schema, a number or text must suit the field.
    pub fn write(
        &self,
        file: &str,
        mut edit: impl FnMut(usize, &mut Vec<(usize, Edit)>) -> Result<(), RewriteError>,
    ) -> Result<Vec<u8>, RewriteError> {
        let records = self.records;
        // A little more than the original: paths may grow, and deflate at
        // its fastest level writes more than most writers.
        let mut blocks = Blocks::start(&records.header, file, records.encoded_len + records.encoded_len / 4)?;
        let mut edits = Vec::new();
        for record in 0..records.len() {
            edits.clear();
            edit(record, &mut edits)?;
            let whole = records.span(record, None);
            let mut at = whole.start as usize;
            if let Some((slot, _)) = edits.iter().find(|(slot, _)| !self.has(*slot)) {
                let path = records.paths.get(*slot).map(|p| p.join("."));
                return Err(invalid(file, format!("cannot replace field {path:?}: the schema lacks it")));
            }
            edits.sort_by_key(|(slot, _)| records.span(record, Some(*slot)).start);
            for (slot, value) in &edits {
                let span = records.span(record, Some(*slot));
                if (span.start as usize) < at {
                    return Err(invalid(file, format!("field {:?} is replaced twice", records.paths[*slot].join("."))));
                }
                blocks.record().extend_from_slice(&records.data[at..span.start as usize]);
                self.encode(record, *slot, value, blocks.record(), file)?;
                at = span.end as usize;
            }
            blocks.record().extend_from_slice(&records.data[at..whole.end as usize]);
            blocks.end_record()?;
        }
        blocks.finish()
    }
}

/// The schema of the field at `path` under the top-level record; `None` if
/// some record on the way lacks the field.
fn find<'s>(
    schema: &'s Schema,
    path: &[&str],
    resolved: &ResolvedSchema<'s>,
    file: &str,
) -> Result<Option<&'s Schema>, RewriteError> {
    let mut current = schema;
    for (depth, name) in path.iter().enumerate() {
        let record = as_record(current, resolved)
            .ok_or_else(|| invalid(file, format!("`{}` is not a record", path[..depth].join("."))))?;
        match record.fields.iter().find(|f| f.name == *name) {
            Some(field) => current = &field.schema,
            None => return Ok(None),
        }
    }
    Ok(Some(current))
}

fn as_record<'s>(schema: &'s Schema, resolved: &ResolvedSchema<'s>) -> Option<&'s apache_avro::schema::RecordSchema> {
    match schema {
        Schema::Record(record) => Some(record),
        Schema::Ref { name } => match resolved.get_names().get(name) {
            Some(Schema::Record(record)) => Some(record),
            _ => None,
        },
        _ => None,
    }
}

/// How to walk one record: one step per field, in schema order.
struct Layout<'s> {
    resolved: ResolvedSchema<'s>,
    steps: Vec<Step<'s>>,
    slots: usize,
}

enum Step<'s> {
    /// Walked over.
    Skip(&'s Schema),
    /// Walked over, its span kept in a slot.
    Capture(usize, &'s Schema),
    /// A record holding fields asked for.
    Nested(Vec<Step<'s>>),
}

impl<'s> Layout<'s> {
    fn new(schema: &'s Schema, paths: &[&[&str]], file: &str) -> Result<Self, RewriteError> {
        let resolved = ResolvedSchema::try_from(schema).map_err(|e| RewriteError::avro(file, e))?;
        let record = as_record(schema, &resolved).ok_or_else(|| invalid(file, "the records are not Avro records"))?;
        let wanted: Vec<(usize, &[&str])> = paths.iter().enumerate().map(|(slot, p)| (slot, *p)).collect();
        let steps = plan(record, &wanted, &resolved, file, "")?;
        Ok(Self { resolved, steps, slots: paths.len() })
    }

    /// Walks the `count` records of the block at `data[base..]` (at byte
    /// `at` of the file), appending each record's spans.
    ///
    /// One pass checks every length a record declares (see [`lengths`])
    /// and notes where the slots lie: nothing is decoded here, and
    /// [`Fields`] later decodes only slots this walk accepted.
    fn walk_block(
        &self,
        data: &[u8],
        base: usize,
        count: usize,
        spans: &mut Vec<Span>,
        file: &str,
        at: usize,
    ) -> Result<(), RewriteError> {
        let mut walker = lengths::Walk::new(self.resolved.get_names(), &data[base..], 0);
        for record in 0..count {
            let first = spans.len();
            spans.resize(first + 1 + self.slots, ABSENT);
            let start = walker.pos();
            walk(&self.steps, &mut walker, base, &mut spans[first + 1..], 1).map_err(|m| {
                invalid(file, format!("record {record} of the data block at byte {at} is corrupt: {m}"))
            })?;
            if walker.pos() == start {
                return Err(invalid(file, "a record is empty"));
            }
            spans[first] = Span { start: (base + start) as u32, end: (base + walker.pos()) as u32 };
        }
        let left = data.len() - base - walker.pos();
        if left != 0 {
            return Err(invalid(file, format!("a data block has {left} bytes after its last record")));
        }
        Ok(())
    }
}

fn plan<'s>(
    record: &'s apache_avro::schema::RecordSchema,
    wanted: &[(usize, &[&str])],
    resolved: &ResolvedSchema<'s>,
    file: &str,
    prefix: &str,
) -> Result<Vec<Step<'s>>, RewriteError> {
    let mut steps = Vec::with_capacity(record.fields.len());
    for field in &record.fields {
        let here: Vec<(usize, &[&str])> = wanted
            .iter()
            .filter(|(_, p)| p.first() == Some(&field.name.as_str()))
            .map(|(s, p)| (*s, &p[1..]))
            .collect();
        let step = match here.as_slice() {
            [] => Step::Skip(&field.schema),
            [(slot, [])] => Step::Capture(*slot, &field.schema),
            _ if here.iter().all(|(_, rest)| !rest.is_empty()) => {
                let name = format!("{prefix}{}", field.name);
                let nested = as_record(&field.schema, resolved)
                    .ok_or_else(|| invalid(file, format!("`{name}` is not a record")))?;
                Step::Nested(plan(nested, &here, resolved, file, &format!("{name}."))?)
            }
            _ => return Err(invalid(file, format!("`{prefix}{}` is asked for more than once", field.name))),
        };
        steps.push(step);
    }
    Ok(steps)
}

/// Walks one record's fields by `steps`, `depth` levels into it, noting the
/// slots' spans (offset by `base`, where the walked data starts in
/// [`Records::data`]).
fn walk(
    steps: &[Step<'_>],
    walker: &mut lengths::Walk<'_, '_>,
    base: usize,
    slots: &mut [Span],
    depth: usize,
) -> lengths::Walked<()> {
    for step in steps {
        match step {
            Step::Skip(schema) => walker.datum(schema, depth)?,
            Step::Capture(slot, schema) => {
                let start = walker.pos();
                walker.datum(schema, depth)?;
                slots[*slot] = Span { start: (base + start) as u32, end: (base + walker.pos()) as u32 };
            }
            Step::Nested(inner) => walk(inner, walker, base, slots, depth + 1)?,
        }
    }
    Ok(())
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

/// Owned variant of [`unwrap_union`].
pub fn into_unwrapped(value: Value) -> Value {
    match value {
        Value::Union(_, inner) => *inner,
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

/// A string, looking through a nullable union.
pub fn as_str(value: &Value) -> Option<&str> {
    match unwrap_union(value) {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// An integer (int or long), looking through a nullable union.
pub fn as_long(value: &Value) -> Option<i64> {
    match unwrap_union(value) {
        Value::Long(n) => Some(*n),
        Value::Int(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// Replaces a (possibly nullable) string.
pub fn replace_string(value: &mut Value, new: String) -> bool {
    match unwrap_union_mut(value) {
        Value::String(s) => {
            *s = new;
            true
        }
        _ => false,
    }
}

/// Replaces a (possibly nullable) number, keeping its Avro type.
pub fn replace_long(value: &mut Value, new: i64) -> bool {
    match unwrap_union_mut(value) {
        Value::Long(n) => {
            *n = new;
            true
        }
        Value::Int(n) => match i32::try_from(new) {
            Ok(v) => {
                *n = v;
                true
            }
            Err(_) => false,
        },
        _ => false,
    }
}

/// `value` (a long, or a union holding one) with `shift` applied, if that
/// changes it; `None` for null, a missing field, or a number it keeps.
pub fn shift_long(value: Option<Value>, shift: super::SequenceShift) -> Option<Value> {
    let mut value = value?;
    let n = as_long(&value)?;
    let shifted = shift.apply(n);
    (shifted != n && replace_long(&mut value, shifted)).then_some(value)
}

/// A string field.
pub fn string<'v>(value: &'v Value, name: &str) -> Option<&'v str> {
    field(value, name).and_then(as_str)
}

/// An integer field (int or long).
pub fn long(value: &Value, name: &str) -> Option<i64> {
    field(value, name).and_then(as_long)
}

/// Replaces the string in a (possibly nullable) string field.
pub fn set_string(value: &mut Value, name: &str, new: String) -> bool {
    field_mut(value, name).is_some_and(|v| replace_string(v, new))
}

/// Replaces the number in a (possibly nullable) long field, keeping its Avro type.
pub fn set_long(value: &mut Value, name: &str, new: i64) -> bool {
    field_mut(value, name).is_some_and(|v| replace_long(v, new))
}

/// The same file with every record in a block of its own: other bytes,
/// the same contents (for tests of [`same_contents`] and its callers).
#[cfg(test)]
pub(crate) fn one_record_per_block(bytes: &[u8], file: &str) -> Vec<u8> {
    let records = Records::read(bytes, file, &[]).expect("read");
    let mut blocks = Blocks::start(&records.header, file, 0).expect("start");
    for record in 0..records.len() {
        let span = records.span(record, None);
        blocks.record().extend_from_slice(&records.data[span.start as usize..span.end as usize]);
        blocks.end_record().expect("record");
        blocks.flush().expect("flush");
    }
    blocks.finish().expect("finish")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deflated(raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        DEFLATER.with_borrow_mut(|d| deflate(d, raw, &mut out)).expect("deflate");
        out
    }

    #[test]
    fn a_zstd_block_is_decompressed_whole_and_bounded() {
        let raw: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let block = zstd::encode_all(&raw[..], 3).expect("zstd");
        let mut data = b"earlier".to_vec();
        decompress(Codec::Zstandard(Default::default()), &block, &mut data, MAX_RECORD_BYTES).expect("decompress");
        assert_eq!((&data[..7], &data[7..]), (&b"earlier"[..], &raw[..]));

        // 64 MiB of zeros from a few kilobytes: refused at the limit, having
        // read no more than one byte past it.
        let bomb = zstd::encode_all(&vec![0u8; 64 << 20][..], 19).expect("zstd");
        assert!(bomb.len() < 16 * 1024, "{}", bomb.len());
        let mut data = Vec::new();
        let e = decompress(Codec::Zstandard(Default::default()), &bomb, &mut data, 100_000).expect_err("bomb");
        assert!(e.contains("more than the 100000 bytes"), "{e}");
        assert!(data.len() <= 100_001, "{}", data.len());
        let e = decompress(Codec::Zstandard(Default::default()), &block[..block.len() / 2], &mut Vec::new(), 1 << 30)
            .expect_err("cut off");
        assert!(e.contains("does not decompress"), "{e}");

        assert_eq!(records_budget(1000), MIN_RECORDS_BUDGET);
        assert_eq!(records_budget(1 << 20), 128 << 20);
        assert_eq!(records_budget(usize::MAX), MAX_RECORD_BYTES);
    }

    /// A zigzag varint, as Avro writes longs.
    fn varint(n: i64) -> Vec<u8> {
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        let mut out = Vec::new();
        while z >= 0x80 {
            out.push((z as u8) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
        out
    }

    #[test]
    fn a_file_whose_records_decompress_beyond_its_budget_is_refused() {
        // A zstd container of one string record of 65 MiB, a few kilobytes
        // long: past the 64 MiB any file may hold, and 128 times its size.
        let schema =
            Schema::parse_str(r#"{"type": "record", "name": "r", "fields": [{"name": "s", "type": "string"}]}"#)
                .expect("schema");
        let writer = apache_avro::Writer::with_codec(&schema, Vec::new(), Codec::Zstandard(Default::default()));
        let header = writer.expect("writer").into_inner().expect("a header alone");
        let sync = header[header.len() - 16..].to_vec();
        let text = 65usize << 20;
        let mut record = varint(text as i64);
        record.resize(record.len() + text, b'a');
        let block = zstd::encode_all(&record[..], 3).expect("zstd");
        let mut bomb = header;
        bomb.extend(varint(1));
        bomb.extend(varint(block.len() as i64));
        bomb.extend(&block);
        bomb.extend(&sync);
        assert!(bomb.len() < 512 * 1024, "{}", bomb.len());
        let e = Records::read(&bomb, "m.avro", &[]).map(|_| ()).expect_err("beyond the budget");
        assert!(e.to_string().contains("more than the 67108864 bytes") && e.to_string().contains("m.avro"), "{e}");
    }

    #[test]
    fn a_deflate_block_is_inflated_whole_and_bounded() {
        let raw: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        let block = deflated(&raw);
        let mut data = b"earlier".to_vec();
        decompress(Codec::Deflate(Default::default()), &block, &mut data, MAX_RECORD_BYTES).expect("inflate");
        assert_eq!(&data[..7], b"earlier");
        assert_eq!(&data[7..], &raw[..], "appended after what was there");

        // A bomb: a megabyte of zeros from a hundredth of it, refused at the limit
        // without the buffer growing past it.
        let bomb = deflated(&vec![0; 1 << 20]);
        assert!(bomb.len() < 16 * 1024, "{}", bomb.len());
        let mut data = Vec::new();
        let e = decompress(Codec::Deflate(Default::default()), &bomb, &mut data, 100_000).expect_err("bomb");
        assert!(e.contains("more than the 100000 bytes"), "{e}");
        assert!(data.capacity() <= 100_001, "{}", data.capacity());

        let e = decompress(Codec::Deflate(Default::default()), &block[..block.len() / 2], &mut Vec::new(), 1 << 30)
            .expect_err("cut");
        assert!(e.contains("cut off"), "{e}");
    }

    const SCHEMA: &str = r#"{"type": "record", "name": "r", "fields": [
        {"name": "path", "type": "string", "field-id": 500},
        {"name": "n", "type": ["null", "long"], "field-id": 501, "doc": "kept"}]}"#;

    fn file(codec: Codec) -> Vec<u8> {
        let schema = Schema::parse_str(SCHEMA).expect("schema");
        let mut w = apache_avro::Writer::with_codec(&schema, Vec::new(), codec).expect("writer");
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
            // The same codec; deflate at its fastest level.
            let kind = |c: Codec| std::mem::discriminant(&c);
            assert_eq!(kind(header.codec), kind(codec));
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

    /// A schema with every kind of Avro type around the fields asked for.
    const RICH: &str = r#"{"type": "record", "name": "entry", "fields": [
        {"name": "status", "type": "int"},
        {"name": "kind", "type": {"type": "enum", "name": "kind", "symbols": ["A", "B"]}},
        {"name": "tags", "type": {"type": "map", "values": ["null", "string"]}},
        {"name": "file", "type": {"type": "record", "name": "file", "fields": [
            {"name": "sums", "type": {"type": "array", "items": {"type": "record", "name": "kv",
                "fields": [{"name": "key", "type": "int"}, {"name": "value", "type": "bytes"}]}}},
            {"name": "path", "type": ["null", "string"]},
            {"name": "hash", "type": {"type": "fixed", "name": "md5", "size": 4}},
            {"name": "size", "type": "long"},
            {"name": "ratio", "type": ["null", "double"]},
            {"name": "empty", "type": {"type": "record", "name": "empty", "fields": []}},
            {"name": "partition", "type": {"type": "record", "name": "partition", "fields": [
                {"name": "day", "type": ["null", {"type": "int", "logicalType": "date"}]},
                {"name": "ts", "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}]},
                {"name": "t", "type": ["null", {"type": "long", "logicalType": "time-micros"}]},
                {"name": "price", "type": ["null", {"type": "fixed", "name": "dec", "size": 4,
                    "logicalType": "decimal", "precision": 9, "scale": 2}]},
                {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 20, "scale": 0}},
                {"name": "id", "type": ["null", {"type": "fixed", "name": "uuid16", "size": 16, "logicalType": "uuid"}]},
                {"name": "key", "type": {"type": "string", "logicalType": "uuid"}}]}}]}},
        {"name": "flag", "type": "boolean"},
        {"name": "f", "type": "float"}]}"#;
    const RICH_FIELDS: &[&[&str]] =
        &[&["status"], &["file", "path"], &["file", "size"], &["file", "missing"], &["nope"]];

    fn rich_record(i: i64) -> Value {
        let sums = (0..(i % 4)).map(|k| {
            Value::Record(vec![
                ("key".into(), Value::Int(k as i32)),
                ("value".into(), Value::Bytes(vec![k as u8; k as usize])),
            ])
        });
        Value::Record(vec![
            ("status".into(), Value::Int((i % 3) as i32)),
            ("kind".into(), Value::Enum((i % 2) as u32, if i % 2 == 0 { "A" } else { "B" }.into())),
            (
                "tags".into(),
                Value::Map(HashMap::from([(
                    "k".to_owned(),
                    Value::Union(1, Box::new(Value::String(format!("t{i}")))),
                )])),
            ),
            (
                "file".into(),
                Value::Record(vec![
                    ("sums".into(), Value::Array(sums.collect())),
                    (
                        "path".into(),
                        if i % 7 == 3 {
                            Value::Union(0, Box::new(Value::Null))
                        } else {
                            Value::Union(1, Box::new(Value::String(format!("s3://w/data/{i:06}.parquet"))))
                        },
                    ),
                    ("hash".into(), Value::Fixed(4, vec![1, 2, 3, i as u8])),
                    ("size".into(), Value::Long(i * 1000)),
                    (
                        "ratio".into(),
                        if i % 2 == 0 {
                            Value::Union(0, Box::new(Value::Null))
                        } else {
                            Value::Union(1, Box::new(Value::Double(0.5)))
                        },
                    ),
                    ("empty".into(), Value::Record(vec![])),
                    (
                        "partition".into(),
                        Value::Record(vec![
                            ("day".into(), Value::Union(1, Box::new(Value::Date(19_000 + i as i32)))),
                            ("ts".into(), Value::Union(1, Box::new(Value::TimestampMicros(1_700_000_000_000_000 + i)))),
                            ("t".into(), Value::Union(0, Box::new(Value::Null))),
                            ("price".into(), Value::Union(1, Box::new(Value::Decimal(vec![0, 0, 1, i as u8].into())))),
                            ("amount".into(), Value::Decimal(vec![1, i as u8].into())),
                            (
                                "id".into(),
                                Value::Union(1, Box::new(Value::Uuid(apache_avro::Uuid::from_bytes([i as u8; 16])))),
                            ),
                            ("key".into(), Value::Uuid(apache_avro::Uuid::from_bytes([7; 16]))),
                        ]),
                    ),
                ]),
            ),
            ("flag".into(), Value::Boolean(i % 2 == 0)),
            ("f".into(), Value::Float(1.5)),
        ])
    }

    fn rich_file(codec: Codec, n: i64) -> Vec<u8> {
        let schema = Schema::parse_str(RICH).expect("schema");
        let mut w = apache_avro::Writer::with_codec(&schema, Vec::new(), codec).expect("writer");
        w.add_user_metadata("format-version".into(), b"2").expect("meta");
        for i in 0..n {
            w.append_value(rich_record(i)).expect("append");
        }
        w.into_inner().expect("bytes")
    }

    #[test]
    fn spliced_records_are_the_bytes_a_value_rewrite_writes() {
        let codecs =
            [Codec::Null, Codec::Deflate(Default::default()), Codec::Snappy, Codec::Zstandard(Default::default())];
        for codec in codecs {
            // 2,000 records span several data blocks.
            for n in [0, 1, 2_000] {
                let bytes = rich_file(codec, n);
                let records = Records::read(&bytes, "f.avro", RICH_FIELDS).expect("records");
                assert_eq!(records.len(), n as usize);
                let fields = records.fields("f.avro").expect("fields");
                assert!(fields.has(0) && fields.has(1) && fields.has(2));
                assert!(!fields.has(3) && !fields.has(4), "fields the schema lacks are absent");
                let (header, mut expected) = read(&bytes, "f.avro").expect("read");
                for (i, record) in expected.iter_mut().enumerate() {
                    assert_eq!(
                        fields.value(i, 0, "f.avro").expect("status").as_ref().and_then(as_long),
                        long(record, "status")
                    );
                    assert_eq!(fields.long(i, 0, "f.avro").expect("status"), long(record, "status"));
                    assert_eq!(fields.value(i, 3, "f.avro").expect("absent"), None);
                    assert_eq!(fields.long(i, 3, "f.avro").expect("absent"), None);
                    let file = field_mut(record, "file").expect("file");
                    assert_eq!(fields.text(i, 1, "f.avro").expect("path").as_deref(), string(file, "path"));
                    assert_eq!(fields.long(i, 2, "f.avro").expect("size"), long(file, "size"));
                    if let Some(path) = string(file, "path").map(|p| p.replace("s3://w", "s3://replica/x")) {
                        assert!(set_string(file, "path", path));
                    }
                    if i % 5 == 0 {
                        assert!(set_long(file, "size", 1 << 40));
                    }
                }
                // Half of the edits as values through `apache-avro`, half
                // encoded here: the same bytes either way.
                let spliced = fields
                    .write("f.avro", |i, edits| {
                        if i % 2 == 0 {
                            if let Some(path) = fields.text(i, 1, "f.avro")? {
                                edits.push((1, Edit::Text(path.replace("s3://w", "s3://replica/x"))));
                            }
                        } else {
                            let mut path = fields.value(i, 1, "f.avro")?.expect("path");
                            if let Some(new) = as_str(&path).map(|p| p.replace("s3://w", "s3://replica/x")) {
                                assert!(replace_string(&mut path, new));
                                edits.push((1, Edit::Value(path)));
                            }
                        }
                        if i % 10 == 0 {
                            edits.push((2, Edit::Long(1 << 40)));
                        } else if i % 5 == 0 {
                            let mut size = fields.value(i, 2, "f.avro")?.expect("size");
                            assert!(replace_long(&mut size, 1 << 40));
                            edits.push((2, Edit::Value(size)));
                        }
                        Ok(())
                    })
                    .expect("write");
                let rewritten = write(&header, &expected, "f.avro").expect("value write");
                assert_eq!(
                    spliced, rewritten,
                    "{codec:?}, {n} records: same bytes as decoding and encoding everything"
                );
                let untouched = fields.write("f.avro", |_, _| Ok(())).expect("write");
                assert_eq!(read(&untouched, "f.avro").expect("read back").1, read(&bytes, "f.avro").expect("read").1);
            }
        }
    }

    #[test]
    fn files_of_different_schemas_read_in_turn_each_get_their_own() {
        let small = Schema::parse_str(r#"{"type": "record", "name": "s", "fields": [{"name": "n", "type": "long"}]}"#)
            .expect("schema");
        let mut w = apache_avro::Writer::new(&small, Vec::new()).expect("writer");
        w.append_value(Value::Record(vec![("n".into(), Value::Long(7))])).expect("append");
        let small_file = w.into_inner().expect("bytes");
        let rich_file = rich_file(Codec::Null, 3);
        // More schemas than a thread keeps, then the first ones again.
        let mut others = Vec::new();
        for i in 0..SCHEMAS_KEPT + 1 {
            let schema = Schema::parse_str(&format!(
                r#"{{"type": "record", "name": "o{i}", "fields": [{{"name": "x", "type": "int"}}]}}"#
            ))
            .expect("schema");
            let mut w = apache_avro::Writer::new(&schema, Vec::new()).expect("writer");
            w.append_value(Value::Record(vec![("x".into(), Value::Int(i as i32))])).expect("append");
            let bytes = w.into_inner().expect("bytes");
            others.push((schema, bytes));
        }
        for _ in 0..2 {
            for (bytes, expected) in [(&small_file, &small), (&rich_file, &Schema::parse_str(RICH).expect("rich"))] {
                let (header, values) = read(bytes, "f.avro").expect("read");
                assert_eq!(&header.schema, expected);
                assert_eq!(values.len(), apache_avro::Reader::new(&bytes[..]).expect("reader").count());
            }
            for (schema, bytes) in &others {
                assert_eq!(&read(bytes, "o.avro").expect("read").0.schema, schema);
            }
        }
    }

    #[test]
    fn read_decodes_what_apache_avros_reader_decodes() {
        for codec in [Codec::Null, Codec::Deflate(Default::default()), Codec::Snappy] {
            let bytes = rich_file(codec, 300);
            let (header, values) = read(&bytes, "f.avro").expect("read");
            let reader = apache_avro::Reader::new(&bytes[..]).expect("reader");
            assert_eq!(&header.schema, reader.writer_schema());
            let expected = reader.collect::<Result<Vec<_>, _>>().expect("records");
            assert_eq!(values, expected, "{codec:?}");
        }
    }

    #[test]
    fn a_replacement_of_the_wrong_type_is_refused() {
        let bytes = rich_file(Codec::Null, 3);
        let records = Records::read(&bytes, "f.avro", RICH_FIELDS).expect("records");
        let fields = records.fields("f.avro").expect("fields");
        let wrong = [
            (2, Edit::Value(Value::String("not a long".into()))),
            (2, Edit::Text("not a long".into())),
            (1, Edit::Long(1)),
            (0, Edit::Long(1 << 40)),
        ];
        for (slot, edit) in wrong {
            let e = fields.write("f.avro", |_, edits| {
                edits.push((slot, edit.clone()));
                Ok(())
            });
            assert!(e.is_err(), "{edit:?} into slot {slot}");
        }
        for slot in [3, 99] {
            let e = fields.write("f.avro", |_, edits| {
                edits.push((slot, Edit::Long(1)));
                Ok(())
            });
            assert!(e.is_err(), "slot {slot}: a field the schema lacks cannot be replaced");
        }
        let twice = fields.write("f.avro", |_, edits| {
            edits.extend([(2, Edit::Long(1)), (2, Edit::Long(2))]);
            Ok(())
        });
        assert!(twice.is_err(), "a field replaced twice");
        // Record 3's nullable path is null: text is not put in its place.
        let bytes = rich_file(Codec::Null, 4);
        let records = Records::read(&bytes, "f.avro", RICH_FIELDS).expect("records");
        let fields = records.fields("f.avro").expect("fields");
        assert_eq!(fields.text(3, 1, "f.avro").expect("path"), None);
        let into_null = fields.write("f.avro", |i, edits| {
            edits.push((1, Edit::Text(format!("s3://replica/{i}"))));
            Ok(())
        });
        assert!(into_null.is_err(), "a null replaced");
    }

    #[test]
    fn truncated_or_corrupt_records_are_errors_not_panics() {
        for codec in [Codec::Null, Codec::Deflate(Default::default())] {
            let bytes = rich_file(codec, 500);
            assert!(Records::read(&bytes, "f.avro", RICH_FIELDS).is_ok());
            for cut in [0, 3, 10, 100, bytes.len() / 2, bytes.len() - 17, bytes.len() - 1] {
                assert!(Records::read(&bytes[..cut], "f.avro", RICH_FIELDS).is_err(), "{codec:?} cut at {cut}");
            }
            let mut corrupt = bytes.clone();
            let n = corrupt.len();
            corrupt[n / 2..n / 2 + 32].fill(0xee);
            assert!(Records::read(&corrupt, "f.avro", RICH_FIELDS).is_err(), "{codec:?} corrupted");
        }
        let wrong: &[&[&str]] = &[&["status", "inner"]];
        assert!(Records::read(&rich_file(Codec::Null, 1), "f.avro", wrong).is_err(), "status is not a record");
    }
}
