//! `cargo xtask setup`: check first, install only what is missing.

use std::process::Command;

use anyhow::{Context, bail};

use crate::cmd::{is_root, run, which};

/// bpf-linker's version, built against the LLVM rustc uses (22 for 1.95).
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Debian packages building ka needs.
const BUILD_PACKAGES: &[&str] = &["llvm-22-dev", "libpolly-22-dev"];

/// Debian packages the tests use: the lab (iproute2, nftables), real peers
/// (nginx, curl, wrk), Prometheus and promtool, reference tools
/// (bpftool, libbpf-tools), tmux for the TUI test, capsh for least privilege.
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "bpftool",
    "nginx-light",
    "curl",
    "wrk",
    "prometheus",
    "libbpf-tools",
    "tmux",
    "procps",
    "libcap2-bin",
];

pub fn setup(test_deps: bool) -> anyhow::Result<()> {
    ensure_rust_src()?;
    let mut packages: Vec<&str> = BUILD_PACKAGES.to_vec();
    if test_deps {
        packages.extend_from_slice(TEST_PACKAGES);
    }
    ensure_packages(&packages)?;
    ensure_bpf_linker()?;
    if test_deps {
        ensure_tracefs();
    }
    Ok(())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let output = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
        .context("rustup is needed (the machine's Rust toolchain comes from rustup)")?;
    if String::from_utf8_lossy(&output.stdout)
        .lines()
        .any(|line| line.starts_with("rust-src"))
    {
        return Ok(());
    }
    eprintln!("xtask: installing rust-src (the BPF target builds core from source)");
    run(Command::new("rustup").args(["component", "add", "rust-src"]))
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn ensure_packages(packages: &[&str]) -> anyhow::Result<()> {
    if which("dpkg-query").is_none() || which("apt-get").is_none() {
        // Off Debian the build packages only matter to build bpf-linker.
        let linker_ready = Command::new("bpf-linker")
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
        if linker_ready && packages.len() == BUILD_PACKAGES.len() {
            return Ok(());
        }
        bail!(
            "not a Debian-like system: install these yourself, then retry: {} \
             (LLVM 22 development files, with llvm-config at {LLVM_PREFIX}/bin/llvm-config)",
            packages.join(" ")
        );
    }
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: run as root (or apt-get install them)",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    // Packages such as nginx and prometheus start a system service when
    // installed; the tests run their own instances on their own ports, so
    // services are kept from starting (policy-rc.d 101 = "not allowed").
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let had_policy = policy.exists();
    if !had_policy {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n").context("writing policy-rc.d")?;
        run(Command::new("chmod").args(["755", "/usr/sbin/policy-rc.d"]))?;
    }
    let result = run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if !had_policy {
        let _ = std::fs::remove_file(policy);
    }
    result
}

fn ensure_bpf_linker() -> anyhow::Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)"
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", LLVM_PREFIX))
}

/// The tests read tracefs; mount it where the kernel expects it.
fn ensure_tracefs() {
    if std::path::Path::new("/sys/kernel/tracing/events").is_dir() || !is_root() {
        return;
    }
    let _ = Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status();
}
