//! `PathMap`: where each source path goes at the target.
//!
//! An ordered list of `(from, to)` prefix pairs; the longest matching prefix
//! wins. Prefixes are directory prefixes: `s3://b/t` matches `s3://b/t` and
//! `s3://b/t/...`, never `s3://b/t2/...`. A path that no pair maps is an
//! error naming the path and the file it was found in: a replica must never
//! point back at the source's storage. `file:/path` (Hadoop's form, which
//! Spark's file IO writes), `file:///path` and `file://localhost/path` are
//! one URL: each matches a pair written in any of the forms, and a local
//! target is written in the form the source path used.

use std::borrow::Cow;
use std::fmt;

use super::{RewriteError, SequenceShift};

/// One mapping pair.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pair {
    /// Source prefix, without a trailing slash.
    from: String,
    /// Target prefix, without a trailing slash.
    to: String,
}

/// Source-to-target path prefixes (and, after a failback, sequence numbers:
/// everything a file's rewrite changes besides sizes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathMap {
    /// Longest `from` first.
    pairs: Vec<Pair>,
    /// How sequence numbers differ at the target, if they do.
    sequence: Option<SequenceShift>,
}

impl PathMap {
    /// An empty map (maps nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// The default map of a table copy: source table location to target table location.
    pub fn from_locations(source: &str, target: &str) -> Result<Self, RewriteError> {
        let mut map = Self::new();
        map.add(source, target)?;
        Ok(map)
    }

    /// Adds a pair; a later pair with the same `from` replaces the earlier one.
    pub fn add(&mut self, from: &str, to: &str) -> Result<(), RewriteError> {
        let (from, to) = (normalize_file_url(from), normalize_file_url(to));
        let from = trim(&from);
        let to = trim(&to);
        if from.is_empty() || !from.contains("://") && !from.starts_with('/') {
            return Err(RewriteError::InvalidMapping { from: from.to_owned(), to: to.to_owned() });
        }
        if to.is_empty() {
            return Err(RewriteError::InvalidMapping { from: from.to_owned(), to: to.to_owned() });
        }
        self.pairs.retain(|p| p.from != from);
        self.pairs.push(Pair { from: from.to_owned(), to: to.to_owned() });
        self.pairs.sort_by(|a, b| b.from.len().cmp(&a.from.len()).then_with(|| a.from.cmp(&b.from)));
        Ok(())
    }

    /// The target of `path`, if a pair maps it. (A table copy maps every
    /// path of every manifest: this allocates only the result.)
    pub fn map(&self, path: &str) -> Option<String> {
        let form = FileForm::of(path);
        self.pairs.iter().find_map(|pair| {
            let rest = form.strip(path, &pair.from)?;
            (rest.is_empty() || rest.starts_with('/')).then(|| form.join(&pair.to, rest))
        })
    }

    /// The target of `path`, or an error naming the path and `found_in`.
    pub fn rewrite(&self, path: &str, found_in: &str) -> Result<String, RewriteError> {
        self.map(path).ok_or_else(|| RewriteError::UnmappedPath {
            path: path.to_owned(),
            found_in: found_in.to_owned(),
            prefixes: self.pairs.iter().map(|p| p.from.clone()).collect(),
        })
    }

    /// Whether `path` starts with one of the source prefixes.
    pub fn is_source_path(&self, path: &str) -> bool {
        self.map(path).is_some()
    }

    /// This map, with sequence numbers shifted at the target.
    pub fn with_sequence_shift(mut self, shift: Option<SequenceShift>) -> Self {
        self.sequence = shift.filter(|s| s.by != 0);
        self
    }

    /// How sequence numbers differ at the target, if they do.
    pub fn sequence_shift(&self) -> Option<SequenceShift> {
        self.sequence
    }

    /// The pairs, longest source prefix first.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|p| (p.from.as_str(), p.to.as_str()))
    }
}

impl fmt::Display for PathMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.pairs.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} -> {}", p.from, p.to)?;
        }
        Ok(())
    }
}

/// `file:/a/b` (as Hadoop and Java Iceberg write local paths) and
/// `file://localhost/a/b` as `file:///a/b`.
pub fn normalize_file_url(url: &str) -> Cow<'_, str> {
    match url.strip_prefix("file:") {
        Some(rest) if rest.starts_with('/') && !rest.starts_with("//") => format!("file://{rest}").into(),
        Some(rest) => match rest.strip_prefix("//localhost/") {
            Some(path) => format!("file:///{path}").into(),
            None => url.into(),
        },
        None => url.into(),
    }
}

/// How a local file URL was written, so that its rewrite is written alike
/// (a reader compares paths as strings: Spark's `file:/` paths stay `file:/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileForm {
    /// `file:///path`, or not a local file URL at all.
    Standard,
    /// `file:/path`.
    Hadoop,
    /// `file://localhost/path`.
    Localhost,
}

impl FileForm {
    fn of(url: &str) -> Self {
        match url.strip_prefix("file:") {
            Some(rest) if rest.starts_with('/') && !rest.starts_with("//") => Self::Hadoop,
            Some(rest) if rest.starts_with("//localhost/") => Self::Localhost,
            _ => Self::Standard,
        }
    }

    /// What follows `prefix` (normalized) in `url` (in this form), as if
    /// `url` were normalized first.
    fn strip<'u>(self, url: &'u str, prefix: &str) -> Option<&'u str> {
        let local = |scheme: &str| Some((url.get(scheme.len()..)?, prefix.strip_prefix("file://")?));
        let (url, prefix) = match self {
            Self::Standard => (url, prefix),
            Self::Hadoop => local("file:")?,
            Self::Localhost => local("file://localhost")?,
        };
        url.strip_prefix(prefix)
    }

    /// `prefix` (normalized) followed by `rest`, written in this form if it
    /// is a local file URL.
    fn join(self, prefix: &str, rest: &str) -> String {
        let mut url = String::with_capacity(prefix.len() + rest.len() + "localhost".len());
        url.push_str(prefix);
        url.push_str(rest);
        if url.strip_prefix("file://").is_some_and(|path| path.starts_with('/')) {
            match self {
                Self::Standard => {}
                Self::Hadoop => url.replace_range(.."file://".len(), "file:"),
                Self::Localhost => url.replace_range(.."file://".len(), "file://localhost"),
            }
        }
        url
    }
}

fn trim(s: &str) -> &str {
    let t = s.trim_end_matches('/');
    // Keep `file:///` or `s3://b` roots meaningful.
    if t.ends_with(':') { s } else { t }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn longest_prefix_wins_and_directories_are_respected() {
        let mut m = PathMap::from_locations("s3://w/db/t", "s3://r/db/t/").expect("valid");
        m.add("s3://w/db/t/data/special", "s3://cold/special").expect("valid");
        assert_eq!(m.map("s3://w/db/t").as_deref(), Some("s3://r/db/t"));
        assert_eq!(m.map("s3://w/db/t/metadata/v1.json").as_deref(), Some("s3://r/db/t/metadata/v1.json"));
        assert_eq!(m.map("s3://w/db/t/data/special/a.parquet").as_deref(), Some("s3://cold/special/a.parquet"));
        assert_eq!(m.map("s3://w/db/t2/data/a.parquet"), None, "t must not match t2");
        assert_eq!(m.map("s3://w/db/t/data/special2/a").as_deref(), Some("s3://r/db/t/data/special2/a"));
    }

    #[test]
    fn unmapped_paths_are_errors_naming_path_and_file() {
        let m = PathMap::from_locations("s3://w/t", "file:///r/t").expect("valid");
        let e = m.rewrite("s3://elsewhere/x.parquet", "s3://w/t/metadata/m1.avro").expect_err("unmapped");
        let text = e.to_string();
        assert!(text.contains("s3://elsewhere/x.parquet") && text.contains("s3://w/t/metadata/m1.avro"), "{text}");
        assert!(text.contains("--map"), "says what to do: {text}");
    }

    #[test]
    fn every_form_of_a_local_file_url_is_the_same_url_and_keeps_its_form() {
        for (source, target) in [
            ("file:/tmp/wh/db/t", "file:/tmp/replica/db/t"),
            ("file:///tmp/wh/db/t", "file:///tmp/replica/db/t"),
            ("file://localhost/tmp/wh/db/t", "file://localhost/tmp/replica/db/t"),
        ] {
            let m = PathMap::from_locations(source, target).expect("valid");
            assert_eq!(
                m.map("file:/tmp/wh/db/t/data/a.parquet").as_deref(),
                Some("file:/tmp/replica/db/t/data/a.parquet"),
                "{source}"
            );
            assert_eq!(
                m.map("file:///tmp/wh/db/t/data/a.parquet").as_deref(),
                Some("file:///tmp/replica/db/t/data/a.parquet"),
                "{source}"
            );
            assert_eq!(
                m.map("file://localhost/tmp/wh/db/t/data/a.parquet").as_deref(),
                Some("file://localhost/tmp/replica/db/t/data/a.parquet"),
                "{source}"
            );
            assert_eq!(m.map("file:/tmp/wh/db/t2/a.parquet"), None);
            assert_eq!(m.map("file://otherhost/tmp/wh/db/t/a.parquet"), None, "another host is not this one");
        }
        // A local path mapped to object storage is written as the target is.
        let m = PathMap::from_locations("file:/tmp/wh/t", "s3://r/t").expect("valid");
        assert_eq!(m.map("file:/tmp/wh/t/data/a.parquet").as_deref(), Some("s3://r/t/data/a.parquet"));
    }

    #[test]
    fn invalid_pairs_are_refused() {
        assert!(PathMap::from_locations("", "s3://r").is_err());
        assert!(PathMap::from_locations("relative/path", "s3://r").is_err());
        assert!(PathMap::from_locations("s3://w", "").is_err());
    }

    proptest! {
        #[test]
        fn every_mapped_path_starts_with_its_target(
            bucket in "[a-z]{1,8}", table in "[a-z0-9_]{1,12}", rest in "(/[a-zA-Z0-9_.=-]{1,16}){0,4}"
        ) {
            let from = format!("s3://{bucket}/{table}");
            let map = PathMap::from_locations(&from, "s3://target/t").expect("valid");
            let path = format!("{from}{rest}");
            let mapped = map.map(&path).expect("maps");
            prop_assert!(mapped.starts_with("s3://target/t"));
            prop_assert_eq!(&mapped["s3://target/t".len()..], rest.as_str());
            // A sibling whose name extends the table name never matches.
            let sibling = format!("{from}x{rest}");
            prop_assert!(map.map(&sibling).is_none());
        }

        #[test]
        fn mapping_without_normalizing_first_is_mapping_the_normalized_url(
            source_form in 0..3usize, target_form in 0..4usize, path_form in 0..4usize,
            dirs in "(/[a-z]{1,3}){1,3}", rest in "(/[a-z.]{1,4}){0,3}",
        ) {
            let local = |form: usize, path: &str| match form {
                0 => format!("file:{path}"),
                1 => format!("file://{path}"),
                2 => format!("file://localhost{path}"),
                _ => format!("s3://b{path}"),
            };
            let map = PathMap::from_locations(&local(source_form, &dirs), &local(target_form, "/target/t")).expect("valid");
            let path = local(path_form, &format!("{dirs}{rest}"));
            // What `map` did before it stopped allocating the normalized URL.
            let reference = {
                let normalized = normalize_file_url(&path);
                map.pairs.iter().find_map(|pair| {
                    let rest = normalized.strip_prefix(&pair.from)?;
                    (rest.is_empty() || rest.starts_with('/')).then(|| {
                        let url = format!("{}{rest}", pair.to);
                        match (FileForm::of(&path), url.strip_prefix("file://").filter(|p| p.starts_with('/'))) {
                            (FileForm::Hadoop, Some(p)) => format!("file:{p}"),
                            (FileForm::Localhost, Some(p)) => format!("file://localhost{p}"),
                            _ => url,
                        }
                    })
                })
            };
            prop_assert_eq!(map.map(&path), reference);
        }
    }
}
