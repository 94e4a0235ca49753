//! [`Options`]: the `WITH (key = value, ...)` map of a CREATE statement.
//!
//! Keys are case-insensitive (stored lower-case); values are kept as written. Connectors read
//! options through an [`OptionReader`], which remembers what it read so that
//! [`OptionReader::finish`] can reject every key nobody asked for: an unknown option is an
//! error, never silently ignored.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

/// The `WITH` options of one statement, in the order written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    entries: Vec<(String, String)>,
    /// A key written twice: reported (SQLSTATE 22023) when the options are read.
    duplicate: Option<String>,
}

/// An option that is unknown, missing or has a value that does not parse (SQLSTATE 22023).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OptionError {
    /// The option at fault.
    pub key: String,
    pub message: String,
}

impl OptionError {
    pub fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

impl Options {
    /// Builds options from pairs; a key given twice is an error naming it.
    pub fn try_from_pairs(
        pairs: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, OptionError> {
        let mut entries: Vec<(String, String)> = Vec::new();
        for (key, value) in pairs {
            let key = key.to_ascii_lowercase();
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(OptionError::new(
                    &key,
                    format!("option '{key}' is given twice"),
                ));
            }
            entries.push((key, value));
        }
        Ok(Self {
            entries,
            duplicate: None,
        })
    }

    /// Builds options as written, remembering a repeated key so that reading them fails
    /// with an error naming it (the parser does not decide what is valid).
    pub fn from_pairs_as_written(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut options = Self::default();
        for (key, value) in pairs {
            let key = key.to_ascii_lowercase();
            if options.entries.iter().any(|(k, _)| *k == key) {
                options.duplicate.get_or_insert(key);
            } else {
                options.entries.push((key, value));
            }
        }
        options
    }

    /// These options less `key` (for options a caller handles itself).
    pub fn without(&self, key: &str) -> Options {
        Options {
            entries: self
                .entries
                .iter()
                .filter(|(k, _)| k != key)
                .cloned()
                .collect(),
            duplicate: self.duplicate.clone(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A reader that tracks which keys were consumed.
    pub fn reader(&self) -> OptionReader<'_> {
        OptionReader {
            options: self,
            used: RefCell::new(BTreeSet::new()),
        }
    }

    /// Renders `WITH (...)` as it would be written back, every value quoted.
    pub fn to_sql(&self) -> String {
        let items: Vec<String> = self
            .entries
            .iter()
            .map(|(k, v)| format!("'{}' = '{}'", k.replace('\'', "''"), v.replace('\'', "''")))
            .collect();
        format!("WITH ({})", items.join(", "))
    }
}

impl fmt::Display for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_sql())
    }
}

/// Typed, tracked access to [`Options`].
pub struct OptionReader<'a> {
    options: &'a Options,
    used: RefCell<BTreeSet<String>>,
}

impl<'a> OptionReader<'a> {
    /// The raw value of `key`, if given.
    pub fn string(&self, key: &str) -> Option<&'a str> {
        self.used.borrow_mut().insert(key.to_string());
        self.options.get(key)
    }

    /// The raw value of `key`, which must be given.
    pub fn required(&self, key: &str) -> Result<&'a str, OptionError> {
        self.string(key)
            .ok_or_else(|| OptionError::new(key, format!("option '{key}' is required")))
    }

    /// One of `allowed` (case-insensitive), returned lower-case.
    pub fn one_of(&self, key: &str, allowed: &[&str]) -> Result<Option<String>, OptionError> {
        let Some(value) = self.string(key) else {
            return Ok(None);
        };
        let lower = value.to_ascii_lowercase();
        if allowed.contains(&lower.as_str()) {
            Ok(Some(lower))
        } else {
            Err(OptionError::new(
                key,
                format!(
                    "invalid value '{value}' for option '{key}': expected one of {}",
                    allowed.join(", ")
                ),
            ))
        }
    }

    pub fn u64(&self, key: &str) -> Result<Option<u64>, OptionError> {
        self.parsed(key, "a non-negative integer", |v| {
            v.trim().parse::<u64>().ok()
        })
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>, OptionError> {
        self.parsed(key, "a number", |v| {
            v.trim().parse::<f64>().ok().filter(|f| f.is_finite())
        })
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, OptionError> {
        self.parsed(key, "true or false", |v| {
            match v.trim().to_ascii_lowercase().as_str() {
                "true" | "on" | "yes" | "1" => Some(true),
                "false" | "off" | "no" | "0" => Some(false),
                _ => None,
            }
        })
    }

    pub fn duration(&self, key: &str) -> Result<Option<Duration>, OptionError> {
        self.parsed(
            key,
            "a duration such as '500ms', '1s', '5m', '1h' (at most 100 years)",
            parse_duration,
        )
    }

    pub fn size(&self, key: &str) -> Result<Option<u64>, OptionError> {
        self.parsed(key, "a size such as '64KB', '128MB', '1GB'", parse_size)
    }

    /// Every option whose key starts with `prefix`, with the prefix removed.
    pub fn prefixed(&self, prefix: &str) -> Vec<(&'a str, &'a str)> {
        let mut used = self.used.borrow_mut();
        self.options
            .entries
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix(prefix)?;
                used.insert(k.clone());
                Some((rest, v.as_str()))
            })
            .collect()
    }

    /// Fails on the first option no one read.
    pub fn finish(self) -> Result<(), OptionError> {
        if let Some(key) = &self.options.duplicate {
            return Err(OptionError::new(
                key,
                format!("option '{key}' is given twice"),
            ));
        }
        let used = self.used.into_inner();
        match self.options.entries.iter().find(|(k, _)| !used.contains(k)) {
            Some((key, _)) => Err(OptionError::new(key, format!("unknown option '{key}'"))),
            None => Ok(()),
        }
    }

    fn parsed<T>(
        &self,
        key: &str,
        expected: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, OptionError> {
        let Some(value) = self.string(key) else {
            return Ok(None);
        };
        parse(value).map(Some).ok_or_else(|| {
            OptionError::new(
                key,
                format!("invalid value '{value}' for option '{key}': expected {expected}"),
            )
        })
    }
}

/// The longest duration an option or INTERVAL may give: far beyond any retention or window,
/// and small enough that adding it to a clock or a timestamp in ms cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Parses a duration with humantime: `'500ms'`, `'1s'`, `'5m'`, `'1h'`, `'30 s'`,
/// `'10 seconds'`, `'1.5s'`, `'1h 30m'`, `'1d'`, `'2 weeks'`, and the unit names SQL's INTERVAL
/// uses (`'500 millisecond'`); case does not matter (`'5M'` is five minutes). None for anything
/// else, for months and years (not a fixed length), and for more than [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim().to_ascii_lowercase();
    let mut spelled = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphabetic()) {
        let (before, word) = rest.split_at(start);
        let end = word
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(word.len());
        let (word, after) = word.split_at(end);
        spelled.push_str(before);
        spelled.push_str(match word {
            "milli" | "millisecond" | "milliseconds" => "ms",
            "microsecond" | "microseconds" => "us",
            "month" | "months" | "year" | "years" | "yr" | "yrs" | "y" => return None,
            other => other,
        });
        rest = after;
    }
    spelled.push_str(rest);
    humantime::parse_duration(&spelled)
        .ok()
        .filter(|d| *d <= MAX_DURATION)
}

/// Parses `'1024'`, `'64KB'`, `'128MB'`, `'1GB'` (powers of 1024).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" | "kib" => 1 << 10,
        "mb" | "m" | "mib" => 1 << 20,
        "gb" | "g" | "gib" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> Options {
        Options::try_from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .expect("valid options")
    }

    #[test]
    fn durations_accept_the_documented_spellings() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("30 s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("10 seconds"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("ten"), None);
        assert_eq!(parse_duration("5 fortnights"), None);
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h 30m"), Some(Duration::from_secs(5400)));
        assert_eq!(
            parse_duration("500 MILLISECOND"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_duration("5M"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1 month"), None, "not a fixed length");
        assert_eq!(parse_duration("-5s"), None);
        assert_eq!(parse_duration(""), None);
        // Too long for a clock: refused, not a panic.
        assert_eq!(parse_duration("100000000000000000000s"), None);
        assert_eq!(parse_duration("1e400s"), None);
        assert_eq!(parse_duration("36500 days"), Some(MAX_DURATION));
        assert_eq!(parse_duration("36501 days"), None);
    }

    #[test]
    fn sizes_are_powers_of_1024() {
        assert_eq!(parse_size("128MB"), Some(128 << 20));
        assert_eq!(parse_size("7"), Some(7));
        assert_eq!(parse_size("7 parsecs"), None);
    }

    #[test]
    fn unknown_keys_are_reported_by_name() {
        let opts = options(&[("path", "/x"), ("colour", "blue")]);
        let reader = opts.reader();
        assert_eq!(reader.string("path"), Some("/x"));
        let err = reader.finish().expect_err("colour is unknown");
        assert_eq!(err.key, "colour");
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let err = Options::try_from_pairs(vec![
            ("Path".to_string(), "a".to_string()),
            ("path".to_string(), "b".to_string()),
        ])
        .expect_err("duplicate");
        assert_eq!(err.key, "path");
    }

    #[test]
    fn typed_values_name_the_option_when_invalid() {
        let opts = options(&[("rows_per_second", "fast")]);
        let err = opts
            .reader()
            .u64("rows_per_second")
            .expect_err("not a number");
        assert!(err.message.contains("rows_per_second"), "{}", err.message);
    }
}
