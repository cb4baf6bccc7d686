//! Middlebox idle timeouts: durations (`90s`, `5m`, `1h30m`) and named presets
//! (docs/middlebox-timeouts.md).

use std::{fmt, str::FromStr, time::Duration};

use serde::Serialize;

/// An idle timeout after which some middlebox on the path forgets a flow.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct IdleTimeout {
    /// The `idle_timeout` label: the preset name, or the duration as given.
    pub name: String,
    pub seconds: u64,
}

impl IdleTimeout {
    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.seconds)
    }
}

/// Presets: name, seconds, what it is.
pub const PRESETS: &[(&str, u64, &str)] = &[
    (
        "aws-nlb",
        350,
        "AWS Network Load Balancer (default; RST on next packet)",
    ),
    ("aws-alb", 60, "AWS Application Load Balancer"),
    (
        "aws-nat-gateway",
        350,
        "AWS NAT Gateway (RST on next packet)",
    ),
    (
        "azure-lb",
        240,
        "Azure Load Balancer (silent drop by default)",
    ),
    ("gcp-nat", 1200, "GCP Cloud NAT, established TCP"),
    ("gcp-firewall", 600, "GCP VPC firewall connection tracking"),
    ("ipvs", 900, "Linux IPVS / kube-proxy ipvs mode"),
    ("conntrack", 432_000, "Linux nf_conntrack established"),
    ("kube-proxy", 86_400, "kube-proxy conntrack established"),
    ("seed-dsr", 120, "the DSR load balancer of the seed note"),
];

/// Why an idle timeout could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdleTimeoutError {
    #[error("empty idle timeout")]
    Empty,
    #[error(
        "invalid idle timeout {0:?}: expected a duration like 90s, 5m, 1h30m or a preset ({presets})",
        presets = preset_names()
    )]
    Invalid(String),
    #[error("idle timeout {0:?} is zero")]
    Zero(String),
    #[error("idle timeout {0:?} is too large")]
    TooLarge(String),
}

fn preset_names() -> String {
    PRESETS
        .iter()
        .map(|(name, ..)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `90`, `90s`, `5m`, `2h`, `1d`, `1h30m` (whole seconds).
pub fn parse_duration(text: &str) -> Result<u64, IdleTimeoutError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(IdleTimeoutError::Empty);
    }
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(seconds);
    }
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    for c in text.chars() {
        if let Some(digit) = c.to_digit(10) {
            let n = number.unwrap_or(0);
            number = Some(
                n.checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(digit)))
                    .ok_or_else(|| IdleTimeoutError::TooLarge(text.to_owned()))?,
            );
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(IdleTimeoutError::Invalid(text.to_owned())),
        };
        let n = number
            .take()
            .ok_or_else(|| IdleTimeoutError::Invalid(text.to_owned()))?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| IdleTimeoutError::TooLarge(text.to_owned()))?;
    }
    if number.is_some() {
        return Err(IdleTimeoutError::Invalid(text.to_owned()));
    }
    Ok(total)
}

impl FromStr for IdleTimeout {
    type Err = IdleTimeoutError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if let Some((name, seconds, _)) = PRESETS.iter().find(|(name, ..)| *name == text) {
            return Ok(Self {
                name: (*name).to_owned(),
                seconds: *seconds,
            });
        }
        let seconds = parse_duration(text)?;
        if seconds == 0 {
            return Err(IdleTimeoutError::Zero(text.to_owned()));
        }
        if seconds > 365 * 86_400 {
            return Err(IdleTimeoutError::TooLarge(text.to_owned()));
        }
        Ok(Self {
            name: format!("{seconds}s"),
            seconds,
        })
    }
}

impl fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} s)", self.name, self.seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("5m"), Ok(300));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("2d"), Ok(172_800));
        assert_eq!(parse_duration("42"), Ok(42));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5m3").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn presets_and_names() {
        let t: IdleTimeout = "seed-dsr".parse().unwrap();
        assert_eq!((t.name.as_str(), t.seconds), ("seed-dsr", 120));
        let t: IdleTimeout = "5m".parse().unwrap();
        assert_eq!((t.name.as_str(), t.seconds), ("300s", 300));
        assert!("0s".parse::<IdleTimeout>().is_err());
        assert!("aws-foo".parse::<IdleTimeout>().is_err());
    }
}
