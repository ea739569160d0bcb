//! Access to environment variables, behind a trait so tests pass a map.
//!
//! The configuration reads the environment twice: `${VAR}` references inside
//! string values, and `ICERELAY__SECTION__KEY` overrides. Both go through
//! [`Env`], so a test never mutates the process environment (which is shared
//! by every test thread).

use std::collections::BTreeMap;

/// A source of environment variables.
pub trait Env {
    /// The value of `name`, if set and valid UTF-8.
    fn var(&self, name: &str) -> Option<String>;
    /// Every variable whose name starts with `prefix`, sorted by name.
    fn vars_with_prefix(&self, prefix: &str) -> Vec<(String, String)>;
}

/// The real process environment.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn vars_with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let mut vars: Vec<_> = std::env::vars().filter(|(k, _)| k.starts_with(prefix)).collect();
        vars.sort();
        vars
    }
}

/// A fixed set of variables, for tests.
#[derive(Debug, Default, Clone)]
pub struct MapEnv(pub BTreeMap<String, String>);

impl MapEnv {
    /// Builds the map from pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(pairs.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
    }
}

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }

    fn vars_with_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        self.0.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// Why a `${VAR}` reference could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpandError {
    /// `${NAME}` names a variable that is not set.
    Unset(String),
    /// `${` without a closing `}`, or an empty or invalid name.
    Malformed(String),
}

/// Replaces every `${NAME}` in `input` with the variable's value.
///
/// `$${` stands for a literal `${`, so a value that really contains the
/// characters can still be written. A lone `$` is kept as it is.
pub fn expand(input: &str, env: &dyn Env) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("${") {
            let end = tail
                .find('}')
                // The value is not quoted: it may be a credential.
                .ok_or_else(|| {
                    ExpandError::Malformed("`${` without a closing `}`; write `$${` for a literal `${`".into())
                })?;
            let name = &tail[..end];
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(ExpandError::Malformed(format!(
                    "`${{{name}}}` is not a valid variable name (letters, digits and `_`, not starting with a digit)"
                )));
            }
            let value = env.var(name).ok_or_else(|| ExpandError::Unset(name.to_owned()))?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_known_variables() {
        let env = MapEnv::from_pairs([("A", "x"), ("B_2", "y")]);
        assert_eq!(expand("${A}-${B_2}/$HOME", &env).as_deref(), Ok("x-y/$HOME"));
        assert_eq!(expand("cost: 5$", &env).as_deref(), Ok("cost: 5$"));
        assert_eq!(expand("$${A}", &env).as_deref(), Ok("${A}"));
    }

    #[test]
    fn reports_unset_and_malformed() {
        let env = MapEnv::default();
        assert_eq!(expand("${NOPE}", &env), Err(ExpandError::Unset("NOPE".into())));
        assert!(matches!(expand("${OPEN", &env), Err(ExpandError::Malformed(_))));
        assert!(matches!(expand("${}", &env), Err(ExpandError::Malformed(_))));
        assert!(matches!(expand("${1X}", &env), Err(ExpandError::Malformed(_))));
    }
}
