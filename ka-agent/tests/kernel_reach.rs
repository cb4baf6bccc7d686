//! What the running kernel allows is used, and what it lacks is reported:
//! the `tcp_rcv_state_process` kprobe attaches wherever the kernel has
//! kprobes (Debian's 6.1 and 6.12, run by `cargo xtask vm-test`) and is
//! reported unavailable or failed where it has none (the 6.18 development
//! machines); reset reasons are present exactly when BTF has
//! `enum sk_rst_reason`. The evidence is the kernel's own (sysfs, the raw
//! BTF), not the agent's.

mod common;

use std::{path::Path, process::Command};

use common::{Agent, require_root};
use ka_agent::{
    loader::{Hook, LoadOptions, Probes},
    offsets::{KernelLayout, LayoutSources},
};

/// The kernel registered the kprobe PMU: it has kprobes.
fn kernel_has_kprobes() -> bool {
    Path::new("/sys/bus/event_source/devices/kprobe").exists()
}

/// Whether the kernel's BTF names `name` (`sk_rst_reason`: 6.10 and later;
/// `bpf_rdonly_cast`: 6.2 and later): looked up in the raw string section,
/// without the agent's BTF parser.
fn btf_names(name: &str) -> bool {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").unwrap_or_default();
    let needle = format!("\0{name}\0");
    btf.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn check_report() -> String {
    check_report_with(&[])
}

fn check_report_with(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_ka-agent"))
        .arg("check")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run ka-agent check: {e}"));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

fn line_of<'a>(report: &'a str, prefix: &str) -> &'a str {
    report
        .lines()
        .find(|line| line.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{report}"))
}

/// One `ka-agent check` (a load costs ~20 s under software emulation):
/// the kprobe, every tracepoint hook (the hot ones raw), and reset reasons.
#[test]
fn check_uses_what_the_kernel_has_and_reports_what_it_lacks() {
    if !require_root("check_uses_what_the_kernel_has_and_reports_what_it_lacks") {
        return;
    }
    let report = check_report();
    let line = line_of(&report, "kprobe:tcp_rcv_state_process");
    let status = line.split_whitespace().nth(1).unwrap_or_default();
    if kernel_has_kprobes() {
        assert_eq!(status, "attached", "the kernel has kprobes:\n{report}");
    } else {
        assert!(
            status == "unavailable" || status == "failed",
            "the kernel has no kprobes:\n{report}"
        );
    }
    // Every tracepoint hook attaches on every kernel of the matrix, the
    // reset hook too where it has the old layout (ports, no reason).
    for line in report.lines().filter(|l| {
        ["sock:", "tcp:", "timer:"]
            .iter()
            .any(|prefix| l.starts_with(prefix))
    }) {
        assert_eq!(
            line.split_whitespace().nth(1),
            Some("attached"),
            "{line}\n{report}"
        );
    }
    // The hot hooks, the counted ones and the error report run as raw
    // tracepoints on every
    // kernel of the matrix (5.6+ with BTF: the prototypes and
    // sock.sk_protocol are there; tcp_retransmit_skb without `err` before
    // 6.17, tcp_send_reset without `reason` before 6.10).
    for hook in [
        "sock:inet_sock_set_state",
        "tcp:tcp_destroy_sock",
        "timer:timer_start",
        "timer:timer_expire_entry",
        "tcp:tcp_retransmit_skb",
        "tcp:tcp_receive_reset",
        "tcp:tcp_send_reset",
        "sock:inet_sk_error_report",
    ] {
        assert!(
            line_of(&report, hook).ends_with("(raw tracepoint)"),
            "{hook} runs raw:\n{report}"
        );
    }
    // Kernel memory is loaded directly wherever the kfunc exists (6.12,
    // 6.18), with the helper elsewhere (6.1): either way every program
    // above loaded.
    let reads = line_of(&report, "kernel reads");
    if btf_names("bpf_rdonly_cast") {
        assert!(
            reads.ends_with("direct loads through bpf_rdonly_cast"),
            "BTF has bpf_rdonly_cast:\n{report}"
        );
    } else {
        assert!(
            reads.ends_with("bpf_probe_read_kernel"),
            "BTF has no bpf_rdonly_cast:\n{report}"
        );
    }
    let reasons = line_of(&report, "reset reasons");
    if btf_names("sk_rst_reason") {
        assert!(
            reasons.contains("present"),
            "BTF has sk_rst_reason:\n{report}"
        );
    } else {
        assert!(
            reasons.contains("absent"),
            "BTF has no sk_rst_reason:\n{report}"
        );
    }
}

/// With `--no-raw-tracepoints` the hot hooks load and attach their
/// tracepoint programs instead, and with `--no-direct-loads` every program
/// reads with `bpf_probe_read_kernel` (verified by this kernel, not only
/// built; the foundation lifecycle runs on tracepoints with direct loads,
/// the 6.1 VM on raw tracepoints with the helper).
#[test]
fn the_hot_hooks_fall_back_to_their_tracepoints_on_request() {
    if !require_root("the_hot_hooks_fall_back_to_their_tracepoints_on_request") {
        return;
    }
    let report = check_report_with(&["--no-raw-tracepoints", "--no-direct-loads"]);
    assert!(
        line_of(&report, "kernel reads").ends_with("bpf_probe_read_kernel"),
        "{report}"
    );
    for hook in [
        "sock:inet_sock_set_state",
        "tcp:tcp_destroy_sock",
        "timer:timer_start",
        "timer:timer_expire_entry",
        "sock:inet_sk_error_report",
    ] {
        let line = line_of(&report, hook);
        assert_eq!(
            line.split_whitespace().nth(1),
            Some("attached"),
            "{line}\n{report}"
        );
        assert!(!line.contains("raw tracepoint"), "{line}\n{report}");
    }
}

#[test]
fn the_agent_exports_the_kprobe_as_attached_where_the_kernel_has_kprobes() {
    if !require_root("the_agent_exports_the_kprobe_as_attached_where_the_kernel_has_kprobes") {
        return;
    }
    let agent = Agent::start(&[]);
    let metrics = agent.metrics();
    let attached = metrics.count("ka_hook_attached", &[("hook", "tcp_rcv_state_process")]);
    assert_eq!(
        attached,
        i64::from(kernel_has_kprobes()),
        "ka_hook_attached{{hook=\"tcp_rcv_state_process\"}}\n{}",
        metrics.text
    );
    for hook in [
        "inet_sock_set_state",
        "tcp_send_reset",
        "timer_start",
        "timer_expire_entry",
    ] {
        assert_eq!(
            metrics.count("ka_hook_attached", &[("hook", hook)]),
            1,
            "{hook}\n{}",
            metrics.text
        );
    }
    // Runs the kernel skipped are exported per attached hook (read once a
    // second from each program's fdinfo; 0 on kernels before 6.7).
    agent.wait_metrics(
        std::time::Duration::from_secs(5),
        "program misses exported for every attached hook",
        |m| {
            ["inet_sock_set_state", "timer_start", "timer_expire_entry"]
                .iter()
                .all(|hook| m.has_series("ka_program_misses_total", &[("hook", hook)]))
        },
    );
}

/// The kernel times BPF programs (host-wide, two clock reads per run of
/// every program) only when asked: `--program-run-stats` exports the runs
/// and time of each of ka's programs. Without the flag nothing is asserted
/// absent: another agent of this suite may hold the timing on meanwhile.
#[test]
fn program_run_time_is_exported_when_asked_for() {
    if !require_root("program_run_time_is_exported_when_asked_for") {
        return;
    }
    let agent = Agent::start(&["--program-run-stats"]);
    // Kernel timers start all the time; the run counts are read once a second.
    agent.wait_metrics(
        std::time::Duration::from_secs(10),
        "timer_start runs and run time exported",
        |m| {
            m.count("ka_program_runs_total", &[("hook", "timer_start")]) > 0
                && m.sum("ka_program_run_seconds_total", &[("hook", "timer_start")]) > 0.0
        },
    );
    assert!(
        !agent.log().contains("run-time stats unavailable"),
        "{}",
        agent.log()
    );
}

/// A verifier that refuses the programs' direct loads does not stop the
/// agent: it loads every program again with `bpf_probe_read_kernel` and
/// attaches the same hooks. Provoked by casting sockets to `struct
/// timer_list` (40 bytes), so that every socket member past it is a load
/// the verifier refuses, on this kernel, not a fixture.
#[test]
fn programs_refused_with_direct_loads_load_again_with_the_helper() {
    if !require_root("programs_refused_with_direct_loads_load_again_with_the_helper") {
        return;
    }
    let mut layout = KernelLayout::discover(&LayoutSources::default()).expect("layout");
    let Some(mut casts) = layout.casts else {
        assert!(
            !btf_names("bpf_rdonly_cast"),
            "BTF has bpf_rdonly_cast but the layout has no casts"
        );
        eprintln!("no bpf_rdonly_cast here (before 6.2): every program reads with the helper");
        return;
    };
    let options = LoadOptions {
        ring_buffer_bytes: 64 * 1024,
    };
    let attached = |probes: &Probes| -> Vec<Hook> {
        probes
            .hooks
            .iter()
            .filter(|(_, status)| status.is_attached())
            .map(|(hook, _)| *hook)
            .collect()
    };
    let direct = Probes::load(&layout, options).expect("load with direct loads");
    assert!(direct.direct);
    let expected = attached(&direct);
    assert!(expected.contains(&Hook::InetSockSetState), "{expected:?}");
    drop(direct);

    casts.types.tcp_sock = casts.types.timer_list;
    layout.casts = Some(casts);
    let probes = Probes::load(&layout, options).expect("load again with the helper");
    assert!(!probes.direct, "the refused direct loads were not replaced");
    assert_eq!(attached(&probes), expected);
}
