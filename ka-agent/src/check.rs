//! `ka-agent check` and the start-up preflight both use: privileges, tracefs,
//! BTF, kallsyms, and hook by hook what this kernel allows.

use std::fmt::Write as _;

use crate::{
    cli::KernelArgs,
    loader::{Hook, HookStatus, LoadOptions, Probes},
    offsets::{KernelLayout, LayoutSources, RawTracepoints},
};

/// Why the agent cannot start here.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error(
        "ka-agent needs root (or CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN): running as uid {uid} without them"
    )]
    NotPrivileged { uid: u32 },
    #[error("{0}")]
    Tracefs(String),
    #[error("cannot read kernel layout: {0}")]
    Layout(#[from] crate::offsets::OffsetsError),
}

impl PreflightError {
    /// A path given on the command line that holds garbage is bad input (2);
    /// a machine that cannot run the agent is 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Layout(e) if e.is_bad_input() => 2,
            _ => 1,
        }
    }
}

/// Effective capabilities of this process (bit set from /proc/self/status).
fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0)
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Whether this process may load and attach tracing programs.
pub fn privileged() -> bool {
    let caps = effective_capabilities();
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))
}

/// Everything that must hold before programs are loaded.
pub fn preflight(args: &KernelArgs) -> Result<KernelLayout, PreflightError> {
    if !privileged() {
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        return Err(PreflightError::NotPrivileged { uid });
    }
    let tracefs = crate::offsets::ensure_tracefs_mounted(&args.tracefs)
        .map_err(|e| PreflightError::Tracefs(e.to_string()))?;
    let sources = LayoutSources {
        tracefs,
        btf: args.btf.clone(),
        kallsyms: args.kallsyms.clone(),
    };
    let mut layout = KernelLayout::discover(&sources)?;
    if args.no_raw_tracepoints {
        layout.raw = RawTracepoints::default();
    }
    if args.no_direct_loads {
        layout.casts = None;
    }
    Ok(layout)
}

/// The keepalive timer and reset reason lines of the report.
fn write_layout(out: &mut String, layout: &KernelLayout) {
    let _ = writeln!(
        out,
        "keepalive timer  {}",
        layout.keepalive_timer_fn.map_or_else(
            || "tcp_keepalive_timer NOT found in kallsyms".to_owned(),
            |a| format!(
                "tcp_keepalive_timer at {a:#x}, timer at sock+{:#x}",
                layout.sock.keepalive_timer
            )
        )
    );
    let _ = writeln!(
        out,
        "reset reasons    {}",
        if layout.reset_reasons.is_empty() {
            "absent (kernel < 6.10: resets_sent reason=unknown; keepalive deaths from timer evidence)".to_owned()
        } else {
            format!(
                "present ({} reasons from BTF enum sk_rst_reason)",
                layout.reset_reasons.len()
            )
        }
    );
}

/// How the loaded programs read kernel memory.
fn kernel_reads(probes: &Probes, layout: &KernelLayout) -> &'static str {
    if probes.direct {
        "direct loads through bpf_rdonly_cast"
    } else if layout.casts.is_some() {
        "bpf_probe_read_kernel (the kernel refused the direct loads; see the log)"
    } else {
        "bpf_probe_read_kernel"
    }
}

/// `ka-agent check`: prints the report, returns the exit status.
pub fn check(args: &KernelArgs) -> i32 {
    let mut out = String::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(out, "kernel      {}", release.trim());
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let _ = writeln!(
        out,
        "privileges  euid {euid}, {}",
        if privileged() {
            "can load BPF tracing programs"
        } else {
            "CANNOT load BPF programs (need root or CAP_BPF+CAP_PERFMON)"
        }
    );
    let _ = writeln!(
        out,
        "BTF         {} ({})",
        args.btf.display(),
        if args.btf.exists() {
            "present"
        } else {
            "MISSING"
        }
    );
    let layout = match preflight(args) {
        Ok(layout) => layout,
        Err(error) => {
            print!("{out}");
            eprintln!("ka-agent check: cannot run: {error}");
            return error.exit_code().max(1);
        }
    };
    let _ = writeln!(out, "tracefs     {}", args.tracefs.display());
    let _ = writeln!(out, "HZ          {}", layout.hz);
    write_layout(&mut out, &layout);
    for note in &layout.notes {
        let _ = writeln!(out, "note        {note}");
    }
    let probes = Probes::load(
        &layout,
        LoadOptions {
            ring_buffer_bytes: 64 * 1024,
        },
    );
    if let Ok(probes) = &probes {
        let _ = writeln!(out, "kernel reads     {}", kernel_reads(probes, &layout));
    }
    let _ = writeln!(out, "\n{:<34} {:<11} DETAIL", "HOOK", "STATUS");
    let code = match &probes {
        Ok(probes) => {
            for (hook, status) in &probes.hooks {
                let (word, detail) = match status {
                    HookStatus::Attached => ("attached", probes.attached_detail(*hook)),
                    HookStatus::Unavailable(why) => (
                        "unavailable",
                        format!("{why}; degrades: {}", hook.feature()),
                    ),
                    HookStatus::Failed(why) => {
                        ("failed", format!("{why}; degrades: {}", hook.feature()))
                    }
                };
                let _ = writeln!(out, "{:<34} {:<11} {}", hook.to_string(), word, detail);
            }
            0
        }
        Err(error) => {
            for hook in Hook::ALL {
                let _ = writeln!(out, "{:<34} {:<11}", hook.to_string(), "not loaded");
            }
            let _ = writeln!(out, "\ncannot run: {error}");
            1
        }
    };
    drop(probes);
    print!("{out}");
    if code == 0 {
        println!("\nka-agent can run on this machine.");
    } else {
        eprintln!("ka-agent check: the agent cannot run here (see above)");
    }
    code
}
