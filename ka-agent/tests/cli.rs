//! The command line: `check` on the happy path and each failure we can
//! produce, and bad input: one line on stderr, exit status 2, nothing
//! half-started.

#![expect(
    clippy::expect_used,
    reason = "helpers of tests fail by panicking, naming what failed"
)]

mod common;

use std::process::{Command, Output};

use common::require_root;

fn ka(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ka-agent"))
        .args(args)
        .env_remove("KA_LISTEN")
        .output()
        .expect("run ka-agent")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Invalid input: exit 2 and exactly one line naming the problem.
fn assert_bad_input(args: &[&str], mentions: &str) {
    let output = ka(args);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{args:?}: {text}");
    assert_eq!(
        text.trim_end().lines().count(),
        1,
        "{args:?}: one line, got:\n{text}"
    );
    assert!(
        text.contains(mentions),
        "{args:?}: {text:?} should mention {mentions:?}"
    );
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn invalid_invocations_exit_2_with_one_line() {
    assert_bad_input(&["run", "--no-such-flag"], "--no-such-flag");
    assert_bad_input(&["frobnicate"], "frobnicate");
    assert_bad_input(&["run", "--idle-timeout", "5x"], "5x");
    assert_bad_input(&["run", "--idle-timeout", "aws-foo"], "aws-foo");
    assert_bad_input(&["run", "--idle-timeout", "0s"], "zero");
    assert_bad_input(&["run", "--listen", "not-an-address"], "not-an-address");
    assert_bad_input(&["run", "--listen", "127.0.0.1:99999"], "127.0.0.1:99999");
    assert_bad_input(&["run", "--ring-buffer-bytes", "1000"], "power of two");
    assert_bad_input(&["run", "--max-connections", "0"], "0");
    assert_bad_input(&["run", "--close-wait-threshold", "soon"], "soon");
    assert_bad_input(&["run", "--peer-label", "everything"], "everything");
    assert_bad_input(&["--log-format", "xml", "check"], "xml");
}

#[test]
fn environment_variables_are_options_too() {
    let output = Command::new(env!("CARGO_BIN_EXE_ka-agent"))
        .arg("run")
        .env("KA_IDLE_TIMEOUT", "seed-dsr,bogus")
        .output()
        .expect("run ka-agent");
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("bogus"));
    // A switch's variable takes a yes/no word; anything else is an error,
    // not "on".
    for (variable, command) in [
        ("KA_NO_RAW_TRACEPOINTS", "check"),
        ("KA_NO_DIRECT_LOADS", "check"),
        ("KA_PROGRAM_RUN_STATS", "run"),
        ("KA_JSON", "snapshot"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_ka-agent"))
            .arg(command)
            .env(variable, "maybe")
            .output()
            .expect("run ka-agent");
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{variable}: {text}");
        assert_eq!(text.trim_end().lines().count(), 1, "{variable}: {text}");
        assert!(text.contains("'maybe'"), "{variable}: {text}");
    }
}

#[test]
fn help_and_version_exit_0() {
    for args in [
        &["--help"][..],
        &["--version"],
        &["run", "--help"],
        &["check", "--help"],
    ] {
        let output = ka(args);
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        assert!(!output.stdout.is_empty());
    }
    let help = String::from_utf8_lossy(&ka(&["run", "--help"]).stdout).into_owned();
    assert!(
        help.contains("Examples:") && help.contains("KA_LISTEN"),
        "{help}"
    );
}

#[test]
fn port_in_use_is_bad_input_and_nothing_is_attached() {
    if !require_root("port_in_use_is_bad_input_and_nothing_is_attached") {
        return;
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    assert_bad_input(&["run", "--listen", &addr], "cannot listen");
}

#[test]
fn check_reports_every_hook_and_exits_0() {
    if !require_root("check_reports_every_hook_and_exits_0") {
        return;
    }
    let output = ka(&["check"]);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(0), "{text}\n{}", stderr(&output));
    for hook in [
        "sock:inet_sock_set_state",
        "tcp:tcp_retransmit_skb",
        "tcp:tcp_send_reset",
        "tcp:tcp_receive_reset",
        "tcp:tcp_destroy_sock",
        "sock:inet_sk_error_report",
        "timer:timer_start",
        "timer:timer_expire_entry",
        "kprobe:tcp_rcv_state_process",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(hook))
            .unwrap_or_else(|| panic!("{hook} missing:\n{text}"));
        // tcp_rcv_state_process is attached only where the kernel has kprobes.
        if !hook.starts_with("kprobe") {
            assert!(line.contains("attached"), "{line}");
        } else if !std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists() {
            assert!(
                line.contains("failed") || line.contains("unavailable"),
                "{line}"
            );
        }
    }
    assert!(text.contains("HZ"), "{text}");
    assert!(text.contains("can run"), "{text}");
}

#[test]
fn check_fails_clearly_without_privileges() {
    if !require_root("check_fails_clearly_without_privileges") {
        return;
    }
    // The same binary as an unprivileged user (nobody), with no capabilities.
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(env!("CARGO_BIN_EXE_ka-agent"))
        .arg("check")
        .output()
        .expect("setpriv");
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("needs root"), "{text}");
    assert!(!text.contains("panicked"));
}

#[test]
fn check_rejects_a_garbage_btf_file() {
    if !require_root("check_rejects_a_garbage_btf_file") {
        return;
    }
    let path = std::env::temp_dir().join(format!("ka-garbage-btf-{}", std::process::id()));
    std::fs::write(&path, b"this is not BTF").unwrap();
    let output = ka(&["check", "--btf", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("BTF"), "{}", stderr(&output));
    let output = ka(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--btf",
        "/nonexistent/vmlinux",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_eq!(
        stderr(&output).trim_end().lines().count(),
        1,
        "{}",
        stderr(&output)
    );
}

#[test]
fn check_reports_a_missing_keepalive_symbol() {
    if !require_root("check_reports_a_missing_keepalive_symbol") {
        return;
    }
    let path = std::env::temp_dir().join(format!("ka-kallsyms-{}", std::process::id()));
    std::fs::write(&path, "ffffffff81000000 T _text\n").unwrap();
    let output = ka(&["check", "--kallsyms", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    // The agent still runs: only the keepalive hooks degrade.
    assert_eq!(output.status.code(), Some(0), "{text}");
    let timer = text
        .lines()
        .find(|l| l.starts_with("timer:timer_start"))
        .unwrap();
    assert!(
        timer.contains("unavailable") && timer.contains("tcp_keepalive_timer"),
        "{timer}"
    );
}

#[test]
fn invalid_top_and_completions_invocations_exit_2_with_one_line() {
    assert_bad_input(&["top", "--no-such-flag"], "--no-such-flag");
    assert_bad_input(&["top", "--agent", "ftp://127.0.0.1:9977"], "ftp");
    assert_bad_input(&["top", "--agent", "http://127.0.0.1:99999"], "99999");
    assert_bad_input(&["top", "--agent", "not an address"], "not an address");
    assert_bad_input(&["top", "--agent", "http://127.0.0.1:9977/x"], "HOST:PORT");
    assert_bad_input(&["top", "--refresh", "0s"], "zero");
    assert_bad_input(&["top", "--refresh", "soon"], "soon");
    assert_bad_input(&["top", "--class", "undead"], "possible values: zombie");
    assert_bad_input(&["top", "--idle-timeout", "aws-foo"], "aws-foo");
    assert_bad_input(&["completions"], "SHELL");
    assert_bad_input(&["completions", "tcsh"], "tcsh");
    assert_bad_input(&["completions", "bash", "zsh"], "zsh");
    // Not a terminal (the test's pipes): one line, exit 2, nothing started.
    assert_bad_input(
        &["top", "--agent", "http://127.0.0.1:9"],
        "needs a terminal",
    );
    let output = Command::new(env!("CARGO_BIN_EXE_ka-agent"))
        .arg("top")
        .env("KA_REFRESH", "never")
        .output()
        .expect("run ka-agent");
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("never"));
}

#[test]
fn every_command_has_examples_and_version_names_the_kernel() {
    for command in ["run", "check", "audit", "snapshot", "top", "completions"] {
        let output = ka(&[command, "--help"]);
        let help = String::from_utf8_lossy(&output.stdout).into_owned();
        assert_eq!(output.status.code(), Some(0), "{command}");
        assert!(
            help.contains("Examples:\n  ka-agent") || help.contains("Examples:\n  KA_"),
            "{command} --help has no examples:\n{help}"
        );
    }
    let top = String::from_utf8_lossy(&ka(&["top", "--help"]).stdout).into_owned();
    for option in [
        "KA_AGENT",
        "KA_REFRESH",
        "KA_CLASS",
        "KA_FILTER",
        "KA_NO_SPAWN",
    ] {
        assert!(top.contains(option), "{option} missing:\n{top}");
    }
    assert!(top.contains("child process"), "{top}");
    let version = String::from_utf8_lossy(&ka(&["--version"]).stdout).into_owned();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    assert!(
        version.starts_with(&format!(
            "ka-agent {} (kernel {}: ",
            env!("CARGO_PKG_VERSION"),
            release.trim()
        )),
        "{version}"
    );
    assert!(
        version.contains("tracepoints") && version.contains("kprobes"),
        "{version}"
    );
    assert!(version.contains("reset reasons"), "{version}");
}

#[test]
fn completions_for_bash_zsh_fish() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef ka-agent"),
        ("fish", "complete -c ka-agent"),
    ] {
        let output = ka(&["completions", shell]);
        let script = String::from_utf8_lossy(&output.stdout).into_owned();
        assert_eq!(output.status.code(), Some(0), "{shell}");
        assert!(script.contains(marker), "{shell}: {marker} missing");
        for word in ["run", "top", "audit", "idle-timeout", "agent"] {
            assert!(script.contains(word), "{shell}: {word} missing");
        }
    }
    // bash loads it and registers the completion.
    if std::path::Path::new("/bin/bash").exists() {
        let file = std::env::temp_dir().join(format!("ka-completion-{}.bash", std::process::id()));
        std::fs::write(&file, ka(&["completions", "bash"]).stdout).expect("write");
        let output = Command::new("/bin/bash")
            .arg("-c")
            .arg(format!("source {} && complete -p ka-agent", file.display()))
            .output()
            .expect("bash");
        let _ = std::fs::remove_file(&file);
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(String::from_utf8_lossy(&output.stdout).contains("ka-agent"));
    }
}
