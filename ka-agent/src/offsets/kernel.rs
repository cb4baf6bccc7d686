//! Facts about the running kernel that are not in BTF: symbol addresses,
//! `HZ`, and where tracefs is.

use std::{
    io::Read,
    path::{Path, PathBuf},
};

/// Why a kernel fact could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} hides kernel addresses (kptr_restrict); run as root")]
    Hidden { path: PathBuf },
    #[error("cannot mount tracefs at {path}: {reason}")]
    Tracefs { path: PathBuf, reason: String },
}

/// Address of the text symbol `name` (local or global), `Ok(None)` when the
/// kernel has no such symbol.
pub fn symbol_address(kallsyms: &Path, name: &str) -> Result<Option<u64>, KernelError> {
    let text = std::fs::read_to_string(kallsyms).map_err(|source| KernelError::Read {
        path: kallsyms.to_owned(),
        source,
    })?;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(address), Some(kind), Some(symbol)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if symbol != name || !matches!(kind, "t" | "T") {
            continue;
        }
        let Ok(address) = u64::from_str_radix(address, 16) else {
            continue;
        };
        if address == 0 {
            return Err(KernelError::Hidden {
                path: kallsyms.to_owned(),
            });
        }
        return Ok(Some(address));
    }
    Ok(None)
}

/// `CONFIG_HZ` of the running kernel.
pub fn config_hz(release: &str) -> Option<u32> {
    let mut config = String::new();
    if let Ok(file) = std::fs::File::open("/proc/config.gz") {
        let _ = flate2::read::GzDecoder::new(file).read_to_string(&mut config);
    }
    if config.is_empty() {
        config = std::fs::read_to_string(format!("/boot/config-{release}")).unwrap_or_default();
    }
    hz_from_config(&config).or_else(hz_from_timer_list)
}

fn hz_from_config(config: &str) -> Option<u32> {
    config
        .lines()
        .find_map(|line| line.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
}

/// Measures HZ from `/proc/timer_list`: jiffies advance over a known time.
fn hz_from_timer_list() -> Option<u32> {
    let sample = || -> Option<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/timer_list").ok()?;
        let now = text
            .lines()
            .find_map(|l| l.strip_prefix("now at "))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let jiffies = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("jiffies: "))?
            .trim()
            .parse()
            .ok()?;
        Some((now, jiffies))
    };
    let (t0, j0) = sample()?;
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (t1, j1) = sample()?;
    let elapsed_ns = t1.checked_sub(t0)?;
    let hz = (j1.checked_sub(j0)? * 1_000_000_000).checked_div(elapsed_ns)?;
    // Round to the HZ values Linux allows.
    [100u32, 250, 300, 1000]
        .into_iter()
        .min_by_key(|candidate| u64::from(*candidate).abs_diff(hz))
}

/// Makes sure tracefs is mounted at `path` (or the debugfs location) and
/// returns where its `events` directory is.
pub fn ensure_tracefs_mounted(path: &Path) -> Result<PathBuf, KernelError> {
    for candidate in [path, Path::new("/sys/kernel/debug/tracing")] {
        if candidate.join("events").is_dir() {
            return Ok(candidate.to_owned());
        }
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev"])
        .arg(path)
        .status();
    match status {
        Ok(s) if s.success() && path.join("events").is_dir() => Ok(path.to_owned()),
        Ok(s) => Err(KernelError::Tracefs {
            path: path.to_owned(),
            reason: format!("mount exited with {s}"),
        }),
        Err(e) => Err(KernelError::Tracefs {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kallsyms() {
        let dir = std::env::temp_dir().join(format!("ka-kallsyms-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kallsyms");
        std::fs::write(
            &path,
            "ffffffff812445d3 t tcp_keepalive_timer.cold\nffffffff8208c310 t tcp_keepalive_timer\n",
        )
        .unwrap();
        assert_eq!(
            symbol_address(&path, "tcp_keepalive_timer").unwrap(),
            Some(0xffff_ffff_8208_c310)
        );
        assert_eq!(symbol_address(&path, "nope").unwrap(), None);
        std::fs::write(&path, "0000000000000000 t tcp_keepalive_timer\n").unwrap();
        assert!(matches!(
            symbol_address(&path, "tcp_keepalive_timer"),
            Err(KernelError::Hidden { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parses_config_hz() {
        assert_eq!(
            hz_from_config("# x\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n"),
            Some(250)
        );
        assert_eq!(hz_from_config("CONFIG_X=y\n"), None);
    }

    #[test]
    fn live_hz_and_symbol() {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let hz = config_hz(release.trim());
        assert!(matches!(hz, Some(100 | 250 | 300 | 1000)), "{hz:?}");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(
                symbol_address(Path::new("/proc/kallsyms"), "tcp_keepalive_timer")
                    .unwrap()
                    .is_some()
            );
        }
    }
}
