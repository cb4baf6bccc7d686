//! `ka-agent --version`: the version with a summary of what this kernel
//! supports, computed cheaply and without privileges (no program is loaded:
//! `ka-agent check` is the full answer).

use std::path::Path;

use crate::loader::{Attachment, Hook};

/// Where the facts come from (real paths in production, fixtures in tests).
#[derive(Clone, Debug)]
pub struct Sources<'a> {
    pub osrelease: &'a Path,
    /// tracefs `events` directories to look in, first readable wins.
    pub tracefs_events: Vec<&'a Path>,
    pub kprobe_pmu: &'a Path,
    pub btf: &'a Path,
}

impl Sources<'static> {
    pub fn system() -> Self {
        Self {
            osrelease: Path::new("/proc/sys/kernel/osrelease"),
            tracefs_events: vec![
                Path::new("/sys/kernel/tracing/events"),
                Path::new("/sys/kernel/debug/tracing/events"),
            ],
            kprobe_pmu: Path::new("/sys/bus/event_source/devices/kprobe"),
            btf: Path::new("/sys/kernel/btf/vmlinux"),
        }
    }
}

/// `0.1.0 (kernel 6.18.44: tracepoints ok, kprobes absent, reset reasons present)`.
pub fn long_version(sources: &Sources<'_>) -> String {
    format!(
        "{} ({})",
        env!("CARGO_PKG_VERSION"),
        kernel_summary(sources)
    )
}

/// The kernel part of [`long_version`].
pub fn kernel_summary(sources: &Sources<'_>) -> String {
    let release = std::fs::read_to_string(sources.osrelease)
        .map_or_else(|_| "unknown".to_owned(), |r| r.trim().to_owned());
    format!(
        "kernel {release}: {}, {}, {}",
        tracepoints(&sources.tracefs_events),
        if sources.kprobe_pmu.exists() {
            "kprobes ok"
        } else {
            "kprobes absent"
        },
        reset_reasons(sources.btf),
    )
}

fn tracepoints(candidates: &[&Path]) -> String {
    let Some(events) = candidates.iter().find(|dir| std::fs::read_dir(dir).is_ok()) else {
        // tracefs is root-only (or not mounted yet): only `check` can tell.
        return "tracepoints unknown (run ka-agent check)".to_owned();
    };
    let missing: Vec<String> = Hook::ALL
        .iter()
        .filter_map(|hook| match hook.attachment() {
            Attachment::Tracepoint { category, name } => {
                (!events.join(category).join(name).is_dir()).then(|| format!("{category}:{name}"))
            }
            Attachment::Kprobe { .. } => None,
        })
        .collect();
    if missing.is_empty() {
        "tracepoints ok".to_owned()
    } else {
        format!("tracepoints missing: {}", missing.join(" "))
    }
}

/// Reset reasons exist where BTF knows `enum sk_rst_reason` (6.10+).
fn reset_reasons(btf: &Path) -> &'static str {
    const NEEDLE: &[u8] = b"sk_rst_reason\0";
    match std::fs::read(btf) {
        Ok(bytes) if bytes.windows(NEEDLE.len()).any(|w| w == NEEDLE) => "reset reasons present",
        Ok(_) => "reset reasons absent",
        Err(_) => "BTF absent (run ka-agent check)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_from_fixtures() {
        let dir = std::env::temp_dir().join(format!("ka-version-test-{}", std::process::id()));
        let events = dir.join("events");
        for hook in Hook::ALL {
            if let Attachment::Tracepoint { category, name } = hook.attachment() {
                std::fs::create_dir_all(events.join(category).join(name)).unwrap();
            }
        }
        std::fs::write(dir.join("osrelease"), "6.18.44\n").unwrap();
        std::fs::write(dir.join("btf"), b"\x9f\xeb...sk_rst_reason\0...").unwrap();
        let osrelease = dir.join("osrelease");
        let btf = dir.join("btf");
        let kprobe = dir.join("no-kprobe");
        let events_ref = events.as_path();
        let sources = Sources {
            osrelease: &osrelease,
            tracefs_events: vec![events_ref],
            kprobe_pmu: &kprobe,
            btf: &btf,
        };
        assert_eq!(
            kernel_summary(&sources),
            "kernel 6.18.44: tracepoints ok, kprobes absent, reset reasons present"
        );
        std::fs::remove_dir_all(events.join("timer")).unwrap();
        std::fs::write(&btf, b"no such enum").unwrap();
        std::fs::create_dir_all(&kprobe).unwrap();
        assert_eq!(
            kernel_summary(&sources),
            "kernel 6.18.44: tracepoints missing: timer:timer_start timer:timer_expire_entry, \
             kprobes ok, reset reasons absent"
        );
        let nowhere = dir.join("nowhere");
        let unreadable = Sources {
            tracefs_events: vec![nowhere.as_path()],
            btf: &nowhere,
            ..sources
        };
        assert!(
            kernel_summary(&unreadable).contains("tracepoints unknown (run ka-agent check)"),
            "{}",
            kernel_summary(&unreadable)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
