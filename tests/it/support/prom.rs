//! The one Prometheus text-format parser of the suite: every test that reads /metrics goes
//! through [`sum`] or [`has`] (usually via `Herald::metric`).
//!
//! # The rule
//!
//! A *selector* is written like a sample without its value, `name` or
//! `name{label="value",...}`:
//!
//! - `name` selects every sample whose metric name is exactly `name`, whatever its labels:
//!   `herald_upgrades_rejected_total` is the total over every `reason`;
//! - `name{...}` selects the samples named exactly `name` whose label set is exactly the
//!   given set (label order does not matter; a sample with a label the selector does not
//!   name is not selected); `name{}` selects only the unlabelled sample.
//!
//! [`sum`] is the sum of the values of the selected samples, 0 when none is selected.
//! [`has`] says whether any sample is selected, whatever its value. Names are compared
//! whole, never as prefixes: `herald_connections` does not select
//! `herald_connections_total`, and a histogram's series are separate names (`x_bucket`,
//! `x_sum`, `x_count`).
//!
//! Comment lines (`# HELP`, `# TYPE`), blank lines and lines that are not a well-formed
//! sample (say, a body cut short) select nothing. Label values may hold the escapes `\\`,
//! `\"` and `\n`; a trailing timestamp is ignored. A malformed *selector* panics: that is
//! a bug in the test.

/// A metric name with its label set (sorted), or `None` for "no label block written".
type Series<'a> = (&'a str, Option<Vec<(String, String)>>);

/// Sum of the values of the samples in `text` that `selector` selects (see the module doc).
pub fn sum(text: &str, selector: &str) -> f64 {
    let want = parse_selector(selector);
    samples(text)
        .filter(|(series, _)| selects(&want, series))
        .map(|(_, value)| value)
        .sum()
}

/// Whether `text` has at least one sample that `selector` selects (see the module doc).
pub fn has(text: &str, selector: &str) -> bool {
    let want = parse_selector(selector);
    samples(text).any(|(series, _)| selects(&want, &series))
}

fn selects(want: &Series<'_>, sample: &Series<'_>) -> bool {
    want.0 == sample.0
        && match &want.1 {
            None => true,
            Some(labels) => labels.as_slice() == sample.1.as_deref().unwrap_or_default(),
        }
}

fn parse_selector(selector: &str) -> Series<'_> {
    match parse_series(selector.trim()) {
        Some((series, "")) => series,
        _ => panic!("malformed metric selector {selector:?}"),
    }
}

/// Every well-formed sample line of `text`, as (series, value).
fn samples(text: &str) -> impl Iterator<Item = (Series<'_>, f64)> {
    text.lines().filter_map(|line| {
        let line = line.trim();
        if line.starts_with('#') {
            return None;
        }
        let (series, rest) = parse_series(line)?;
        if !rest.starts_with([' ', '\t']) {
            return None;
        }
        let mut fields = rest.split_whitespace();
        let value = fields.next()?.parse::<f64>().ok()?;
        let timestamp_ok = fields.next().is_none_or(|t| t.parse::<i64>().is_ok());
        (timestamp_ok && fields.next().is_none()).then_some((series, value))
    })
}

/// Parses `name` or `name{k="v",...}` at the start of `s`; returns the series (labels
/// sorted) and the rest of `s`.
fn parse_series(s: &str) -> Option<(Series<'_>, &str)> {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    let (name, rest) = s.split_at(end);
    let Some(mut rest) = rest.strip_prefix('{') else {
        return Some(((name, None), rest));
    };
    let mut labels = Vec::new();
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            labels.sort();
            return Some(((name, Some(labels)), after));
        }
        let (key, after_key) = rest.split_once('=')?;
        let key = key.trim();
        if key.is_empty() {
            return None;
        }
        let quoted = after_key.trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        let close = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.to_string(), value));
        rest = quoted[close + 1..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return None;
        }
    }
}
