//! Kernel ground truth: the per-namespace SNMP/netstat counters.

use std::collections::BTreeMap;
use std::fmt;

use crate::LabError;

/// Counters from `/proc/net/netstat` and `/proc/net/snmp` of one network
/// namespace, keyed `"<Section>.<Name>"`, e.g. `"TcpExt.TCPKeepAlive"` or
/// `"Tcp.RetransSegs"`. Values are signed because `Tcp.MaxConn` is -1 and a
/// [`Counters::delta`] of a gauge (`Tcp.CurrEstab`) can go down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters(BTreeMap<String, i64>);

impl Counters {
    /// Parses the concatenated text of `/proc/net/netstat` and
    /// `/proc/net/snmp`: pairs of lines, a header (`Tcp: RtoAlgorithm ...`)
    /// followed by the values (`Tcp: 1 200 ...`).
    pub fn parse(text: &str) -> Result<Self, LabError> {
        let mut map = BTreeMap::new();
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        while let Some(header) = lines.next() {
            let values = lines.next().ok_or_else(|| LabError::Parse {
                what: "netstat".into(),
                detail: format!("header without values: {header:?}"),
            })?;
            let (section, names) = split_section(header)?;
            let (section2, values) = split_section(values)?;
            if section != section2 {
                return Err(LabError::Parse {
                    what: "netstat".into(),
                    detail: format!("section {section:?} followed by {section2:?}"),
                });
            }
            let names: Vec<&str> = names.split_whitespace().collect();
            let values: Vec<&str> = values.split_whitespace().collect();
            if names.len() != values.len() {
                return Err(LabError::Parse {
                    what: "netstat".into(),
                    detail: format!(
                        "{section}: {} names but {} values",
                        names.len(),
                        values.len()
                    ),
                });
            }
            for (name, value) in names.into_iter().zip(values) {
                let value = parse_value(value).ok_or_else(|| LabError::Parse {
                    what: "netstat".into(),
                    detail: format!("{section}.{name}: not a number: {value:?}"),
                })?;
                map.insert(format!("{section}.{name}"), value);
            }
        }
        Ok(Self(map))
    }

    /// The value of `key` (`"TcpExt.TCPKeepAlive"`), if the kernel reports it.
    pub fn get(&self, key: &str) -> Option<i64> {
        self.0.get(key).copied()
    }

    /// The value of `key`, 0 when the kernel does not report it.
    pub fn value(&self, key: &str) -> i64 {
        self.get(key).unwrap_or(0)
    }

    /// `after - before` for every key present in `after` (a key missing in
    /// `before` counts from 0).
    pub fn delta(before: &Self, after: &Self) -> Self {
        Self(
            after
                .0
                .iter()
                .map(|(k, v)| (k.clone(), v.wrapping_sub(before.value(k))))
                .collect(),
        )
    }

    /// Only the keys whose value is not 0 (handy to print a delta).
    #[must_use]
    pub fn nonzero(&self) -> Self {
        Self(
            self.0
                .iter()
                .filter(|(_, v)| **v != 0)
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        )
    }

    /// All counters, sorted by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// Number of counters.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when no counter was parsed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in &self.0 {
            writeln!(f, "{k} {v}")?;
        }
        Ok(())
    }
}

fn split_section(line: &str) -> Result<(&str, &str), LabError> {
    line.split_once(':').ok_or_else(|| LabError::Parse {
        what: "netstat".into(),
        detail: format!("line without section: {line:?}"),
    })
}

fn parse_value(s: &str) -> Option<i64> {
    s.parse::<i64>().ok().or_else(|| {
        // Counters above i64::MAX do not happen in a test; keep the bits.
        s.parse::<u64>()
            .ok()
            .map(|v| i64::from_ne_bytes(v.to_ne_bytes()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "TcpExt: SyncookiesSent TCPKeepAlive TCPAbortOnTimeout\n\
TcpExt: 0 7 2\n\
IpExt: InNoRoutes\n\
IpExt: 3\n\
Tcp: RtoAlgorithm MaxConn RetransSegs OutRsts EstabResets CurrEstab\n\
Tcp: 1 -1 10 4 1 3\n";

    #[test]
    fn parses_sections_and_signed_values() {
        let c = Counters::parse(SAMPLE).unwrap();
        assert_eq!(c.get("TcpExt.TCPKeepAlive"), Some(7));
        assert_eq!(c.get("Tcp.MaxConn"), Some(-1));
        assert_eq!(c.get("Tcp.OutRsts"), Some(4));
        assert_eq!(c.get("IpExt.InNoRoutes"), Some(3));
        assert_eq!(c.get("Tcp.Nope"), None);
        assert_eq!(c.len(), 10);
    }

    #[test]
    fn delta_subtracts_and_counts_missing_from_zero() {
        let before = Counters::parse(SAMPLE).unwrap();
        let after = Counters::parse(
            "TcpExt: TCPKeepAlive TCPAbortOnTimeout New\nTcpExt: 9 2 5\n\
             Tcp: CurrEstab\nTcp: 1\n",
        )
        .unwrap();
        let d = Counters::delta(&before, &after);
        assert_eq!(d.get("TcpExt.TCPKeepAlive"), Some(2));
        assert_eq!(d.get("TcpExt.TCPAbortOnTimeout"), Some(0));
        assert_eq!(d.get("TcpExt.New"), Some(5));
        assert_eq!(d.get("Tcp.CurrEstab"), Some(-2));
        assert_eq!(d.nonzero().len(), 3);
    }

    #[test]
    fn rejects_mismatched_lines() {
        assert!(Counters::parse("Tcp: A B\nTcp: 1\n").is_err());
        assert!(Counters::parse("Tcp: A\nUdp: 1\n").is_err());
        assert!(Counters::parse("Tcp: A\n").is_err());
        assert!(Counters::parse("Tcp: A\nTcp: x\n").is_err());
    }
}
