//! Reading the agent's `/metrics` (the Prometheus text format) in the tests
//! and the tools: one parser, label values unescaped, so that every check
//! matches series the way Prometheus would.

/// One sample: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    #[must_use]
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// Whether every `(label, value)` of `filter` is one of the sample's.
    #[must_use]
    pub fn has_labels(&self, filter: &[(&str, &str)]) -> bool {
        filter.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// A parsed exposition, and its text.
#[derive(Clone, Debug)]
pub struct Exposition {
    pub text: String,
    samples: Vec<Sample>,
}

impl Exposition {
    /// Parses `text`; lines that are not samples (comments, `# EOF`,
    /// anything malformed) are skipped.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            samples: text.lines().filter_map(sample).collect(),
        }
    }

    /// The samples of metric `name` whose labels include all of `filter`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        filter: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> {
        self.samples
            .iter()
            .filter(move |s| s.name == name && s.has_labels(filter))
    }

    /// Sum of `name` over the series whose labels include all of `filter`.
    #[must_use]
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.matching(name, filter).map(|s| s.value).sum()
    }

    /// [`Self::sum`] as a whole count.
    #[must_use]
    pub fn count(&self, name: &str, filter: &[(&str, &str)]) -> i64 {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "counts in a test are far below 2^53"
        )]
        let count = self.sum(name, filter).round() as i64;
        count
    }

    /// Whether metric `name` has any sample.
    #[must_use]
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// Whether a series of `name` with all of `filter` exists, whatever its
    /// value (zero included).
    #[must_use]
    pub fn has_series(&self, name: &str, filter: &[(&str, &str)]) -> bool {
        self.matching(name, filter).next().is_some()
    }
}

/// One sample line: `name value` or `name{a="x",b="y"} value`, an optional
/// timestamp after the value.
fn sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(list) = rest.strip_prefix('{') {
        let (parsed, after) = label_list(list)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The labels after a `{`, and what follows the closing `}`.
fn label_list(mut list: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        list = list.trim_start_matches([',', ' ']);
        if let Some(after) = list.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, quoted) = list.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        let end = loop {
            match chars.next()? {
                (at, '"') => break at,
                (_, '\\') => match chars.next()? {
                    (_, 'n') => value.push('\n'),
                    (_, escaped) => value.push(escaped),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_owned(), value));
        list = &quoted[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_labels_and_escapes() {
        let text = "# HELP ka_x x\n# TYPE ka_x counter\n\
                    ka_x{a=\"1\",b=\"q \\\"x\\\", y} \\\\ z\"} 2\n\
                    ka_x{a=\"2\"} 3.5\n\
                    ka_y 7 1700000000000\n\
                    ka_z{} +Inf\n\
                    garbage\n# EOF\n";
        let e = Exposition::parse(text);
        assert!((e.sum("ka_x", &[]) - 5.5).abs() < f64::EPSILON);
        assert_eq!(e.count("ka_x", &[("a", "1")]), 2);
        assert_eq!(
            e.matching("ka_x", &[("a", "1")]).next().unwrap().label("b"),
            Some("q \"x\", y} \\ z")
        );
        assert_eq!(e.count("ka_y", &[]), 7);
        assert!(e.sum("ka_z", &[]).is_infinite());
        assert!(e.has_series("ka_x", &[("a", "2")]));
        assert!(!e.has_series("ka_x", &[("a", "3")]));
        assert!(!e.has("garbage"));
    }
}
