//! Reading the Prometheus text format (0.0.4) the agent serves on
//! `/metrics`: samples with their labels, and which families are counters.
//!
//! Deliberately small: `# TYPE` lines, and sample lines of the form
//! `name{label="value",...} value [timestamp]`, with the format's escapes
//! in label values. Anything else is an error, so a malformed exposition
//! fails the test that reads it (`promtool check metrics` judges the rest).
//!
//! Does not own: fetching (`http`, `agent`).

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
};

/// One sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Sample name (a histogram's carry `_bucket`, `_sum`, `_count`).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// `name{a="x",b="y"}` with labels sorted: a key across scrapes.
    pub fn key(&self) -> String {
        let mut key = self.name.clone();
        if !self.labels.is_empty() {
            key.push('{');
            for (i, (k, v)) in self.labels.iter().enumerate() {
                let _ = write!(key, "{}{k}={v:?}", if i > 0 { "," } else { "" });
            }
            key.push('}');
        }
        key
    }
}

/// A parsed `/metrics` page.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    /// `# TYPE` of each family.
    pub types: HashMap<String, String>,
    /// Every sample, in order.
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Parses the text format.
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let mut out = Exposition::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest
                    .split_once(' ')
                    .ok_or_else(|| format!("line {}: bad TYPE line {line:?}", n + 1))?;
                out.types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            out.samples
                .push(parse_sample(line).map_err(|e| format!("line {}: {e}: {line:?}", n + 1))?);
        }
        Ok(out)
    }

    /// The value of the sample `name` whose labels include `labels`, if
    /// exactly one matches.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.matching(name, labels);
        let first = found.next()?;
        found.next().is_none().then_some(first.value)
    }

    /// Sum over the samples `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The family a sample belongs to: its name, or for `_bucket`, `_sum`
    /// and `_count` the histogram or summary it is part of.
    fn family_of<'a>(&self, sample: &'a str) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.strip_suffix(suffix)
                && matches!(
                    self.types.get(base).map(String::as_str),
                    Some("histogram" | "summary")
                )
            {
                return base;
            }
        }
        sample
    }

    /// Every sample that must never go down: those of counter families and
    /// the buckets, sums and counts of histograms; keyed by [`Sample::key`].
    pub fn monotonic(&self) -> BTreeMap<String, f64> {
        self.samples
            .iter()
            .filter(|s| {
                matches!(
                    self.types.get(self.family_of(&s.name)).map(String::as_str),
                    Some("counter" | "histogram")
                )
            })
            .map(|s| (s.key(), s.value))
            .collect()
    }
}

/// A sample value that counts something (bytes, sessions, minor units,
/// milliseconds) as the integer it is; panics if it is negative, has a
/// fraction, or is too large for an f64 to hold exactly.
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "checked: a non-negative whole number below 2^53"
)]
pub fn whole(value: f64) -> u64 {
    assert!(
        value >= 0.0 && value.fract() == 0.0 && value < 9_007_199_254_740_992.0,
        "{value} is not a whole count"
    );
    value as u64
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let c: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < c.len() && c[i] != '{' && c[i] != ' ' {
        i += 1;
    }
    let name: String = c[..i].iter().collect();
    if name.is_empty() {
        return Err("no sample name".into());
    }
    let mut labels = BTreeMap::new();
    if c.get(i) == Some(&'{') {
        i += 1;
        loop {
            while matches!(c.get(i), Some(',' | ' ')) {
                i += 1;
            }
            match c.get(i) {
                Some('}') => {
                    i += 1;
                    break;
                }
                None => return Err("unterminated label set".into()),
                Some(_) => {}
            }
            let key_start = i;
            while c.get(i).is_some_and(|&ch| ch != '=') {
                i += 1;
            }
            let key: String = c[key_start..i].iter().collect();
            if c.get(i + 1) != Some(&'"') {
                return Err(format!("value of label {key} not quoted"));
            }
            i += 2;
            let mut value = String::new();
            loop {
                match c.get(i) {
                    Some('\\') => {
                        match c.get(i + 1) {
                            Some('n') => value.push('\n'),
                            Some(&ch) => value.push(ch),
                            None => return Err("escape at the end".into()),
                        }
                        i += 2;
                    }
                    Some('"') => {
                        i += 1;
                        break;
                    }
                    Some(&ch) => {
                        value.push(ch);
                        i += 1;
                    }
                    None => return Err(format!("unterminated value of label {key}")),
                }
            }
            labels.insert(key, value);
        }
    }
    let rest: String = c[i..].iter().collect();
    let value = rest
        .split_whitespace()
        .next()
        .ok_or("no value")?
        .parse::<f64>()
        .map_err(|e| format!("bad value: {e}"))?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP a_total x\n# TYPE a_total counter\n\
        a_total{service=\"web\",direction=\"egress\"} 1000\n\
        a_total{service=\"web\",direction=\"ingress\"} 10\n\
        # TYPE g gauge\ng 2.5\n\
        # TYPE h histogram\nh_bucket{le=\"0.5\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.7\nh_count 2\n\
        # TYPE e_total counter\ne_total{v=\"a\\\"b,c\"} 3\n";

    #[test]
    fn samples_labels_and_monotonic_families() {
        let e = Exposition::parse(TEXT).unwrap();
        assert_eq!(e.value("a_total", &[("direction", "egress")]), Some(1000.0));
        assert_eq!(e.value("a_total", &[]), None, "two match");
        assert!((e.sum("a_total", &[("service", "web")]) - 1010.0).abs() < f64::EPSILON);
        assert_eq!(e.value("e_total", &[("v", "a\"b,c")]), Some(3.0));
        let m = e.monotonic();
        assert_eq!(m.len(), 7, "{m:?}");
        assert!(m.contains_key("h_bucket{le=\"+Inf\"}"));
        assert!(m.contains_key("a_total{direction=\"egress\",service=\"web\"}"));
        assert!(!m.contains_key("g"));
        assert!(Exposition::parse("x{a=\"b} 1\n").is_err());
    }
}
