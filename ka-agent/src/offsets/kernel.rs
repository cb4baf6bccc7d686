//! Facts about the running kernel that are not in BTF: symbol addresses,
//! `HZ`, the release, and where tracefs is.

use std::{
    ffi::CString,
    io::Read,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    time::Duration,
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
    #[error(
        "{path} shows {symbol} at address 0: kernel.kptr_restrict hides addresses from this process (run as root with CAP_SYSLOG, or lower kernel.kptr_restrict)"
    )]
    Hidden { path: PathBuf, symbol: String },
    #[error("tracefs is not mounted and could not be mounted: {reasons}")]
    Tracefs { reasons: String },
    #[error(
        "cannot tell the kernel's HZ: no CONFIG_HZ in /proc/config.gz or /boot/config-{release}, and /proc/timer_list is unreadable"
    )]
    NoHz { release: String },
}

/// Where tracefs lives on current kernels.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// Where it lives under debugfs (older setups).
pub const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

/// Address of the text symbol `name` (`t` local or `T` global), `Ok(None)`
/// when the kernel has no such symbol. Compiler-split parts such as
/// `tcp_keepalive_timer.cold` have other names and are never returned.
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
                symbol: name.to_owned(),
            });
        }
        return Ok(Some(address));
    }
    Ok(None)
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain old data (arrays of c_char); all-zero is a
    // valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname for the duration of the call.
    if unsafe { libc::uname(&raw mut uts) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| c.to_ne_bytes()[0])
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `CONFIG_HZ` of the running kernel: from `/proc/config.gz`, else
/// `/boot/config-<release>`, else measured from `/proc/timer_list`.
pub fn config_hz(release: &str) -> Result<u32, KernelError> {
    hz_from_files(
        Path::new("/proc/config.gz"),
        &Path::new("/boot").join(format!("config-{release}")),
    )
    .or_else(hz_from_timer_list)
    .ok_or_else(|| KernelError::NoHz {
        release: release.to_owned(),
    })
}

/// `CONFIG_HZ` from a gzipped config (`/proc/config.gz`) or, failing that,
/// a plain one (`/boot/config-*`).
fn hz_from_files(config_gz: &Path, plain_config: &Path) -> Option<u32> {
    let from_gz = std::fs::File::open(config_gz).ok().and_then(|file| {
        let mut config = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut config)
            .ok()?;
        hz_from_config(&config)
    });
    from_gz.or_else(|| hz_from_config(&std::fs::read_to_string(plain_config).ok()?))
}

fn hz_from_config(config: &str) -> Option<u32> {
    config
        .lines()
        .find_map(|line| line.strip_prefix("CONFIG_HZ="))
        .and_then(|value| value.trim().parse().ok())
        .filter(|hz| *hz > 0)
}

/// One sample of `/proc/timer_list`: (`now at N nsecs`, `jiffies: J`).
fn timer_list_sample(text: &str) -> Option<(u64, u64)> {
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
}

/// HZ from how far jiffies advance over a measured interval, rounded to the
/// values Linux allows.
fn hz_from_samples((t0, j0): (u64, u64), (t1, j1): (u64, u64)) -> Option<u32> {
    let elapsed_ns = t1.checked_sub(t0).filter(|ns| *ns > 0)?;
    let ticks = j1.checked_sub(j0)?;
    let hz = ticks.checked_mul(1_000_000_000)? / elapsed_ns;
    [100u32, 250, 300, 1000]
        .into_iter()
        .min_by_key(|candidate| u64::from(*candidate).abs_diff(hz))
}

/// Measures HZ from `/proc/timer_list` (no kernel config available).
fn hz_from_timer_list() -> Option<u32> {
    let sample = || timer_list_sample(&std::fs::read_to_string("/proc/timer_list").ok()?);
    let first = sample()?;
    std::thread::sleep(Duration::from_millis(200));
    hz_from_samples(first, sample()?)
}

/// Mounts tracefs at `path` (a tracefs instance, `type` tracefs, source
/// `nodev`).
fn mount_tracefs(path: &Path) -> Result<(), String> {
    let target = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the
    // call; `data` may be NULL for tracefs.
    let status = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if status == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

/// Makes sure tracefs is mounted and returns the directory holding its
/// `events`: `path` (normally /sys/kernel/tracing) or the debugfs location;
/// when neither has `events`, mounts tracefs at `path`, then at the debugfs
/// location.
pub fn ensure_tracefs_mounted(path: &Path) -> Result<PathBuf, KernelError> {
    let candidates = [path, Path::new(DEBUGFS_TRACING)];
    if let Some(found) = candidates.iter().find(|c| c.join("events").is_dir()) {
        return Ok(found.to_path_buf());
    }
    let mut reasons = Vec::new();
    for candidate in candidates {
        match mount_tracefs(candidate) {
            Ok(()) if candidate.join("events").is_dir() => return Ok(candidate.to_owned()),
            Ok(()) => reasons.push(format!(
                "{}: mounted, but it has no events directory",
                candidate.display()
            )),
            Err(reason) => reasons.push(format!("{}: {reason}", candidate.display())),
        }
    }
    Err(KernelError::Tracefs {
        reasons: reasons.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("ka-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn kallsyms_lookup_skips_cold_parts_and_reports_hidden_addresses() {
        let dir = TempDir::new("kallsyms");
        let path = dir.0.join("kallsyms");
        std::fs::write(
            &path,
            "ffffffff812445d3 t tcp_keepalive_timer.cold\n\
             ffffffff8208c310 t tcp_keepalive_timer\n\
             ffffffff8208c400 T tcp_set_keepalive\n",
        )
        .unwrap();
        assert_eq!(
            symbol_address(&path, "tcp_keepalive_timer").unwrap(),
            Some(0xffff_ffff_8208_c310)
        );
        assert_eq!(
            symbol_address(&path, "tcp_set_keepalive").unwrap(),
            Some(0xffff_ffff_8208_c400)
        );
        assert_eq!(symbol_address(&path, "nope").unwrap(), None);
        std::fs::write(&path, "0000000000000000 t tcp_keepalive_timer\n").unwrap();
        let error = symbol_address(&path, "tcp_keepalive_timer").unwrap_err();
        assert!(matches!(error, KernelError::Hidden { .. }));
        assert!(error.to_string().contains("kptr_restrict"));
        assert!(matches!(
            symbol_address(&dir.0.join("missing"), "x"),
            Err(KernelError::Read { .. })
        ));
    }

    #[test]
    fn hz_from_gzipped_or_plain_config() {
        assert_eq!(
            hz_from_config("# x\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n"),
            Some(250)
        );
        assert_eq!(hz_from_config("CONFIG_X=y\n"), None);
        let dir = TempDir::new("config");
        let gz = dir.0.join("config.gz");
        let plain = dir.0.join("config-plain");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder
            .write_all(b"CONFIG_HZ_1000=y\nCONFIG_HZ=1000\n")
            .unwrap();
        std::fs::write(&gz, encoder.finish().unwrap()).unwrap();
        std::fs::write(&plain, "CONFIG_HZ=300\n").unwrap();
        assert_eq!(hz_from_files(&gz, &plain), Some(1000));
        assert_eq!(hz_from_files(&dir.0.join("none.gz"), &plain), Some(300));
        // A corrupt config.gz falls back to the plain file.
        std::fs::write(&gz, b"not gzip").unwrap();
        assert_eq!(hz_from_files(&gz, &plain), Some(300));
        assert_eq!(hz_from_files(&gz, &dir.0.join("none")), None);
    }

    #[test]
    fn hz_from_timer_list_samples() {
        let text =
            "Timer List Version: v0.10\nnow at 1000000000 nsecs\n\ncpu: 0\n  jiffies: 4295000000\n";
        let first = timer_list_sample(text).unwrap();
        assert_eq!(first, (1_000_000_000, 4_295_000_000));
        // 51 ticks in 200 ms: 255 Hz measured, 250 Hz configured.
        assert_eq!(
            hz_from_samples(first, (1_200_000_000, 4_295_000_051)),
            Some(250)
        );
        assert_eq!(hz_from_samples(first, first), None);
        assert_eq!(timer_list_sample("garbage"), None);
    }

    #[test]
    fn live_release_hz_and_symbol() {
        let release = kernel_release();
        assert_eq!(
            release,
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap()
                .trim()
        );
        let hz = config_hz(&release).unwrap();
        assert!(matches!(hz, 100 | 250 | 300 | 1000), "{hz}");
        if let Some(measured) = hz_from_timer_list() {
            assert_eq!(measured, hz);
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            let address = symbol_address(Path::new("/proc/kallsyms"), "tcp_keepalive_timer")
                .unwrap()
                .expect("tcp_keepalive_timer is in kallsyms");
            assert!(address > 0xffff_0000_0000_0000, "{address:#x}");
        } else {
            eprintln!("SKIPPED kallsyms: not root");
        }
    }

    #[test]
    fn tracefs_is_found_when_mounted() {
        if !Path::new(TRACEFS).join("events").is_dir() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "tracefs must be mounted in CI"
            );
            eprintln!("SKIPPED: tracefs not mounted at {TRACEFS}");
            return;
        }
        assert_eq!(
            ensure_tracefs_mounted(Path::new(TRACEFS)).unwrap(),
            Path::new(TRACEFS)
        );
    }
}
