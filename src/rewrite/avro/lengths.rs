//! Every length an Avro datum declares, checked against the bytes that are
//! there before `apache-avro` reads them, in the one pass that also finds
//! where each field of a record lies.
//!
//! `apache-avro` allocates a string's, a byte array's or a fixed's declared
//! length (up to its process-wide limit of 512 MiB) before it finds that the
//! bytes are missing, and it reads nested values by recursion. One flipped
//! byte in a 4 KiB manifest could thus cost half a gigabyte, and a recursive
//! writer schema over deeply nested data a stack overflow, which no error
//! handling can catch. [`check`] walks a datum the way a decoder does but
//! decodes and allocates nothing, and fails at the first length, count or
//! nesting level the remaining bytes cannot hold. [`super::Records`] hands
//! `apache-avro` only data this walk has accepted, so every allocation it
//! makes for a declared length is bounded by the bytes of the file.
//!
//! Besides lengths, counts, union branches and nesting, the walk checks what
//! makes a value valid where a decoder would refuse it (UTF-8 strings and
//! map keys, enum indexes, int ranges, booleans): most fields of a rewritten
//! record are copied as they are without ever being decoded, and a corrupt
//! value must stop the rewrite here rather than reach a replica.

use std::fmt;

use apache_avro::Schema;
use apache_avro::schema::{DecimalSchema, InnerDecimalSchema, NamesRef, UuidSchema};

/// How deep values may nest, in schema levels (a record's field, a union's
/// branch, an array's item, a named type's use each count one). Iceberg's
/// manifests need at most six; only a recursive writer schema can go deeper, as deep
/// as its data, and every level is a stack frame here and in `apache-avro`.
pub(super) const MAX_DEPTH: usize = 64;

/// Why a datum cannot be what it declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Malformed {
    /// Offset of the offending number in the data walked (the file for a
    /// header, a block's records for a record).
    pub(super) at: usize,
    /// What is wrong there.
    pub(super) problem: Problem,
}

/// What is wrong with a datum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Problem {
    /// A length larger than the bytes left.
    Overrun {
        /// What declares it (`a string`, `a fixed`, ...).
        what: &'static str,
        /// The declared length.
        declared: u64,
        /// The bytes left after it.
        available: usize,
    },
    /// A count of items larger than the bytes left (see [`Walk::blocks`]).
    TooMany {
        /// What declares it (`an array block`, `a map block`).
        what: &'static str,
        /// The declared count.
        declared: u64,
        /// The bytes left after it.
        available: usize,
    },
    /// A number, or a value of fixed size, cut off by the end of the data.
    Truncated {
        /// What is cut off (`a number`, `a double`, ...).
        what: &'static str,
    },
    /// A negative length.
    Negative {
        /// What declares it.
        what: &'static str,
        /// The declared length.
        declared: i64,
    },
    /// A variable-length number longer than the 10 bytes a 64-bit one takes.
    Varint,
    /// Values nested more than [`MAX_DEPTH`] levels.
    TooDeep,
    /// A union branch the schema does not have.
    UnionIndex {
        /// The index read.
        index: i64,
        /// The number of branches.
        branches: usize,
    },
    /// A named type the schema does not define.
    UnknownName(String),
    /// Bytes that are not a valid value of the type.
    Invalid {
        /// What they should be (`UTF-8 text`, `a boolean`, ...).
        what: &'static str,
    },
    /// An int beyond 32 bits.
    IntRange(i64),
    /// An enum index beyond the symbols.
    EnumIndex {
        /// The index read.
        index: i64,
        /// The number of symbols.
        symbols: usize,
    },
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = self.at;
        match &self.problem {
            Problem::Overrun { what, declared, available } => {
                write!(f, "{what} at offset {at} declares {declared} bytes, but only {available} remain")
            }
            Problem::TooMany { what, declared, available } => {
                write!(
                    f,
                    "{what} at offset {at} declares {declared} items, more than the {available} bytes left can hold"
                )
            }
            Problem::Truncated { what } => write!(f, "{what} at offset {at} is cut off by the end of the data"),
            Problem::Negative { what, declared } => {
                write!(f, "{what} at offset {at} declares a negative length {declared}")
            }
            Problem::Varint => write!(f, "the number at offset {at} is longer than 10 bytes"),
            Problem::TooDeep => write!(f, "values nest more than {MAX_DEPTH} levels deep at offset {at}"),
            Problem::UnionIndex { index, branches } => {
                write!(f, "a union at offset {at} selects branch {index} of {branches}")
            }
            Problem::UnknownName(name) => write!(f, "the schema refers to an undefined type {name} (at offset {at})"),
            Problem::Invalid { what } => write!(f, "the value at offset {at} is not {what}"),
            Problem::IntRange(value) => write!(f, "the int at offset {at} is {value}, beyond 32 bits"),
            Problem::EnumIndex { index, symbols } => {
                write!(f, "an enum at offset {at} selects symbol {index} of {symbols}")
            }
        }
    }
}

/// What a step of a walk gives: a value, or why the data is malformed.
pub(super) type Walked<T> = Result<T, Box<Malformed>>;

/// Checks the datum of `schema` at `data[*pos..]` and moves `pos` past it.
/// `names` resolves the schema's named types.
pub(super) fn check(schema: &Schema, names: &NamesRef<'_>, data: &[u8], pos: &mut usize) -> Result<(), Malformed> {
    let mut walk = Walk::new(names, data, *pos);
    walk.datum(schema, 0).map_err(|e| *e)?;
    *pos = walk.pos;
    Ok(())
}

/// Reads the zigzag-encoded variable-length long at `data[*pos..]`, as Avro
/// writes every int, long, length and count, and moves `pos` past it;
/// `None` if the data ends inside it or it runs past the 10 bytes a 64-bit
/// number takes.
#[inline]
pub(super) fn read_long(data: &[u8], pos: &mut usize) -> Option<i64> {
    let mut raw = 0u64;
    for shift in (0..70).step_by(7) {
        let byte = *data.get(*pos)?;
        *pos += 1;
        raw |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some((raw >> 1) as i64 ^ -((raw & 1) as i64));
        }
    }
    None
}

/// A cursor over encoded data that moves past one datum at a time.
pub(super) struct Walk<'a, 'n> {
    names: &'a NamesRef<'n>,
    data: &'a [u8],
    pos: usize,
}

impl<'a, 'n> Walk<'a, 'n> {
    /// A walk over `data` from `pos`; `names` resolves named types.
    pub(super) fn new(names: &'a NamesRef<'n>, data: &'a [u8], pos: usize) -> Self {
        Self { names, data, pos }
    }

    /// Where the walk is.
    pub(super) fn pos(&self) -> usize {
        self.pos
    }

    /// Moves past the datum of `schema`, `depth` levels into a record.
    pub(super) fn datum(&mut self, schema: &Schema, depth: usize) -> Walked<()> {
        if depth > MAX_DEPTH {
            return Err(self.fail(self.pos, Problem::TooDeep));
        }
        match schema {
            Schema::Null => Ok(()),
            Schema::Boolean => match self.data.get(self.pos) {
                Some(0 | 1) => self.primitive("a boolean", 1),
                Some(_) => Err(self.fail(self.pos, Problem::Invalid { what: "a boolean" })),
                None => Err(self.fail(self.pos, Problem::Truncated { what: "a boolean" })),
            },
            Schema::Int | Schema::Date | Schema::TimeMillis => {
                let at = self.pos;
                let value = self.long()?;
                if i32::try_from(value).is_err() {
                    return Err(self.fail(at, Problem::IntRange(value)));
                }
                Ok(())
            }
            Schema::Enum(symbols) => {
                let at = self.pos;
                let index = self.long()?;
                let symbols = symbols.symbols.len();
                if usize::try_from(index).map_or(true, |i| i >= symbols) {
                    return Err(self.fail(at, Problem::EnumIndex { index, symbols }));
                }
                Ok(())
            }
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => self.long().map(drop),
            Schema::Float => self.primitive("a float", 4),
            Schema::Double => self.primitive("a double", 8),
            Schema::String | Schema::Uuid(UuidSchema::String) => self.text("a string"),
            Schema::Bytes
            | Schema::Uuid(UuidSchema::Bytes)
            | Schema::Decimal(DecimalSchema { inner: InnerDecimalSchema::Bytes, .. }) => {
                self.sized("a byte array").map(drop)
            }
            Schema::BigDecimal => {
                // The bytes hold a length-prefixed unscaled value of their
                // own, which `apache-avro` allocates before reading.
                let start = self.sized("a big decimal")?;
                let mut inner = Walk { names: self.names, data: &self.data[..self.pos], pos: start };
                inner.sized("a big decimal's unscaled value").map(drop)
            }
            Schema::Fixed(fixed)
            | Schema::Duration(fixed)
            | Schema::Uuid(UuidSchema::Fixed(fixed))
            | Schema::Decimal(DecimalSchema { inner: InnerDecimalSchema::Fixed(fixed), .. }) => {
                self.take("a fixed", fixed.size as u64, self.pos)
            }
            Schema::Union(union) => {
                let at = self.pos;
                let index = self.long()?;
                let branches = union.variants();
                let branch = usize::try_from(index)
                    .ok()
                    .and_then(|i| branches.get(i))
                    .ok_or_else(|| self.fail(at, Problem::UnionIndex { index, branches: branches.len() }))?;
                self.datum(branch, depth + 1)
            }
            Schema::Record(record) => {
                for field in &record.fields {
                    self.datum(&field.schema, depth + 1)?;
                }
                Ok(())
            }
            Schema::Array(array) => self.blocks("an array block", |walk| walk.datum(&array.items, depth + 1)),
            Schema::Map(map) => self.blocks("a map block", |walk| {
                walk.text("a map key")?;
                walk.datum(&map.types, depth + 1)
            }),
            Schema::Ref { name } => {
                let named = self
                    .names
                    .get(name)
                    .copied()
                    .ok_or_else(|| self.fail(self.pos, Problem::UnknownName(name.to_string())))?;
                self.datum(named, depth + 1)
            }
        }
    }

    // Boxed and out of line: errors are rare, and a walk's results stay one
    // register wide (an unboxed `Malformed` made every call of the walk
    // return through memory).
    #[cold]
    #[inline(never)]
    fn fail(&self, at: usize, problem: Problem) -> Box<Malformed> {
        Box::new(Malformed { at, problem })
    }

    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    /// Moves past `n` bytes that `what` takes.
    fn take(&mut self, what: &'static str, n: u64, at: usize) -> Walked<()> {
        let available = self.remaining();
        match usize::try_from(n) {
            Ok(n) if n <= available => {
                self.pos += n;
                Ok(())
            }
            _ => Err(self.fail(at, Problem::Overrun { what, declared: n, available })),
        }
    }

    /// A zigzag-encoded variable-length long, as Avro writes every int,
    /// long, length and count.
    fn long(&mut self) -> Walked<i64> {
        let at = self.pos;
        read_long(self.data, &mut self.pos).ok_or_else(|| {
            // Ten bytes there, all continued: too long; fewer: cut off.
            let problem =
                if self.data.len() - at >= 10 { Problem::Varint } else { Problem::Truncated { what: "a number" } };
            self.fail(at, problem)
        })
    }

    /// Moves past a value of `n` bytes whose size the type fixes.
    fn primitive(&mut self, what: &'static str, n: usize) -> Walked<()> {
        if n > self.remaining() {
            return Err(self.fail(self.pos, Problem::Truncated { what }));
        }
        self.pos += n;
        Ok(())
    }

    /// A length prefix, then that many bytes; returns where they start.
    fn sized(&mut self, what: &'static str) -> Walked<usize> {
        let at = self.pos;
        let declared = self.long()?;
        let n = u64::try_from(declared).map_err(|_| self.fail(at, Problem::Negative { what, declared }))?;
        let start = self.pos;
        self.take(what, n, at)?;
        Ok(start)
    }

    /// A length-prefixed UTF-8 string.
    fn text(&mut self, what: &'static str) -> Walked<()> {
        let start = self.sized(what)?;
        if std::str::from_utf8(&self.data[start..self.pos]).is_err() {
            return Err(self.fail(start, Problem::Invalid { what: "UTF-8 text" }));
        }
        Ok(())
    }

    /// The blocks of an array or a map: a count (negative when followed by
    /// the block's byte size), that many items, until a count of zero.
    ///
    /// A count is refused if it exceeds the bytes left. That is exact for
    /// items that take at least a byte, which every Iceberg item does; items
    /// of zero bytes (nulls, empty records) could legally outnumber the
    /// bytes, but no Iceberg file has those, and allowing them would let one
    /// corrupt count spin a decoder through 2^63 items.
    fn blocks(&mut self, what: &'static str, mut item: impl FnMut(&mut Self) -> Walked<()>) -> Walked<()> {
        loop {
            let at = self.pos;
            let count = match self.long()? {
                0 => return Ok(()),
                n if n > 0 => n.unsigned_abs(),
                n => {
                    let size_at = self.pos;
                    let size = self.long()?;
                    let size = u64::try_from(size)
                        .map_err(|_| self.fail(size_at, Problem::Negative { what, declared: size }))?;
                    if usize::try_from(size).map_or(true, |s| s > self.remaining()) {
                        let available = self.remaining();
                        return Err(self.fail(size_at, Problem::Overrun { what, declared: size, available }));
                    }
                    n.unsigned_abs()
                }
            };
            let available = self.remaining();
            if usize::try_from(count).map_or(true, |c| c > available) {
                return Err(self.fail(at, Problem::TooMany { what, declared: count, available }));
            }
            for _ in 0..count {
                item(self)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn zigzag(n: i64) -> Vec<u8> {
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        let mut out = Vec::new();
        loop {
            if z < 0x80 {
                out.push(z as u8);
                return out;
            }
            out.push((z as u8 & 0x7f) | 0x80);
            z >>= 7;
        }
    }

    fn run(schema: &Schema, data: &[u8]) -> Result<usize, Malformed> {
        let names = HashMap::new();
        let mut pos = 0;
        check(schema, &names, data, &mut pos).map(|()| pos)
    }

    #[test]
    fn accepts_what_apache_avro_writes() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "r", "fields": [
                {"name": "s", "type": "string"}, {"name": "b", "type": ["null", "bytes"]},
                {"name": "a", "type": {"type": "array", "items": "long"}},
                {"name": "m", "type": {"type": "map", "values": "double"}},
                {"name": "f", "type": {"type": "fixed", "name": "f4", "size": 4}}]}"#,
        )
        .expect("schema");
        let value = apache_avro::types::Value::Record(vec![
            ("s".into(), apache_avro::types::Value::String("héllo".into())),
            ("b".into(), apache_avro::types::Value::Union(1, Box::new(apache_avro::types::Value::Bytes(vec![1, 2])))),
            ("a".into(), apache_avro::types::Value::Array(vec![apache_avro::types::Value::Long(-5); 3])),
            (
                "m".into(),
                apache_avro::types::Value::Map(HashMap::from([("k".into(), apache_avro::types::Value::Double(1.5))])),
            ),
            ("f".into(), apache_avro::types::Value::Fixed(4, vec![9; 4])),
        ]);
        let mut bytes = Vec::new();
        apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .and_then(|w| w.write_value(&mut bytes, value))
            .expect("encode");
        assert_eq!(run(&schema, &bytes), Ok(bytes.len()));
    }

    #[test]
    fn a_string_longer_than_the_data_is_refused_before_reading() {
        let mut data = zigzag(1 << 40);
        data.extend_from_slice(b"abc");
        let e = run(&Schema::String, &data).expect_err("overrun");
        assert_eq!(e.problem, Problem::Overrun { what: "a string", declared: 1 << 40, available: 3 });
        assert!(e.to_string().contains("1099511627776"), "{e}");
        let e = run(&Schema::Bytes, &zigzag(-1)).expect_err("negative");
        assert_eq!(e.problem, Problem::Negative { what: "a byte array", declared: -1 });
    }

    #[test]
    fn array_and_map_counts_and_sizes_are_bounded_by_the_data() {
        let array = Schema::array(Schema::Long).build();
        for count in [i64::MAX, 4, -i64::MAX] {
            let mut data = zigzag(count);
            if count < 0 {
                data.extend(zigzag(1));
            }
            data.extend_from_slice(&[2, 2, 0]);
            assert!(matches!(run(&array, &data).expect_err("overrun").problem, Problem::TooMany { .. }), "{count}");
        }
        let mut sized = zigzag(-1);
        sized.extend(zigzag(i64::MAX));
        sized.push(2);
        assert!(matches!(run(&array, &sized).expect_err("size").problem, Problem::Overrun { .. }));
        let map = Schema::map(Schema::Bytes).build();
        let mut data = zigzag(1);
        data.extend(zigzag(1 << 40));
        assert!(matches!(run(&map, &data).expect_err("key").problem, Problem::Overrun { what: "a map key", .. }));
    }

    #[test]
    fn a_fixed_larger_than_the_data_and_a_bad_union_branch_are_refused() {
        let fixed = Schema::parse_str(r#"{"type": "fixed", "name": "huge", "size": 1099511627776}"#).expect("schema");
        assert!(matches!(run(&fixed, &[0; 16]).expect_err("fixed").problem, Problem::Overrun { what: "a fixed", .. }));
        let union = Schema::parse_str(r#"["null", "long"]"#).expect("schema");
        assert_eq!(run(&union, &zigzag(7)).expect_err("branch").problem, Problem::UnionIndex { index: 7, branches: 2 });
        assert_eq!(run(&Schema::Long, &[0xff; 11]).expect_err("varint").problem, Problem::Varint);
        assert_eq!(run(&Schema::Long, &[0xff; 3]).expect_err("cut").problem, Problem::Truncated { what: "a number" });
        assert_eq!(run(&Schema::Double, &[0; 7]).expect_err("cut").problem, Problem::Truncated { what: "a double" });
    }

    #[test]
    fn values_a_decoder_would_refuse_are_refused_while_walking() {
        let mut not_utf8 = zigzag(2);
        not_utf8.extend_from_slice(&[0xc3, 0x28]);
        assert_eq!(run(&Schema::String, &not_utf8).expect_err("utf8").problem, Problem::Invalid { what: "UTF-8 text" });
        let map = Schema::map(Schema::Long).build();
        let mut key = zigzag(1);
        key.extend(not_utf8.iter());
        key.extend(zigzag(5));
        key.extend(zigzag(0));
        assert_eq!(run(&map, &key).expect_err("key").problem, Problem::Invalid { what: "UTF-8 text" });
        assert_eq!(run(&Schema::Boolean, &[2]).expect_err("bool").problem, Problem::Invalid { what: "a boolean" });
        assert_eq!(run(&Schema::Int, &zigzag(1 << 40)).expect_err("int").problem, Problem::IntRange(1 << 40));
        let colour = Schema::parse_str(r#"{"type": "enum", "name": "c", "symbols": ["red", "blue"]}"#).expect("enum");
        assert_eq!(run(&colour, &zigzag(2)).expect_err("enum").problem, Problem::EnumIndex { index: 2, symbols: 2 });
        assert_eq!(run(&colour, &zigzag(1)), Ok(1));
        assert_eq!(run(&Schema::Int, &zigzag(-(1 << 31))), Ok(5));
    }

    #[test]
    fn recursion_stops_at_the_depth_limit() {
        let list = Schema::parse_str(
            r#"{"type": "record", "name": "node", "fields": [{"name": "next", "type": ["null", "node"]}]}"#,
        )
        .expect("schema");
        let resolved = apache_avro::schema::ResolvedSchema::try_from(&list).expect("names");
        // Branch 1 (another node) 10,000 times: 10,000 levels in 10,000 bytes.
        let data = vec![2u8; 10_000];
        let mut pos = 0;
        let e = check(&list, resolved.get_names(), &data, &mut pos).expect_err("too deep");
        assert_eq!(e.problem, Problem::TooDeep);
    }
}
