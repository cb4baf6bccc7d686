//! `cargo xtask setup`: check first, install only what is missing.
//!
//! When everything is present this is a handful of cheap checks (one
//! `rustup`, one `dpkg-query`, one `bpf-linker --version`): no network, no
//! `apt-get update`, no root needed.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, bail};

use crate::cmd::{is_root, run, which};

/// bpf-linker's version, built against the LLVM rustc uses (22 for 1.95).
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// A Debian package, and what shows it is present on other systems.
struct Package {
    name: &'static str,
    /// Commands (looked up on PATH and in the sbin directories) or
    /// absolute paths that the package provides.
    provides: &'static [&'static str],
}

/// Debian packages building ka needs (only to build bpf-linker).
const BUILD_PACKAGES: &[Package] = &[
    Package {
        name: "llvm-22-dev",
        provides: &["/usr/lib/llvm-22/bin/llvm-config"],
    },
    Package {
        name: "libpolly-22-dev",
        provides: &["/usr/lib/llvm-22/lib/libPolly.a"],
    },
];

/// Debian packages the tests use: the lab (iproute2, nftables), real peers
/// and load (nginx, curl, wrk), Prometheus and promtool, reference tools
/// (bpftool, libbpf-tools, whose `syscount` is also the other BPF tool
/// beside the agent in `tests/other_tools.rs`), tmux for the TUI test, ps, capsh for the
/// least-privilege tests, kmod's depmod for the kernel matrix, and openssl
/// and python3 for the fake Kubernetes API server (TLS) of the pod-label
/// test.
const TEST_PACKAGES: &[Package] = &[
    Package {
        name: "nftables",
        provides: &["nft"],
    },
    Package {
        name: "iproute2",
        provides: &["ip", "ss"],
    },
    Package {
        name: "bpftool",
        provides: &["bpftool"],
    },
    Package {
        name: "prometheus",
        provides: &["prometheus", "promtool"],
    },
    Package {
        name: "nginx-light",
        provides: &["nginx"],
    },
    Package {
        name: "wrk",
        provides: &["wrk"],
    },
    Package {
        name: "curl",
        provides: &["curl"],
    },
    Package {
        name: "libbpf-tools",
        provides: &["tcpstates", "tcplife", "syscount"],
    },
    Package {
        name: "tmux",
        provides: &["tmux"],
    },
    Package {
        name: "procps",
        provides: &["ps", "sysctl"],
    },
    Package {
        name: "libcap2-bin",
        provides: &["capsh"],
    },
    Package {
        name: "openssl",
        provides: &["openssl"],
    },
    Package {
        name: "python3",
        provides: &["python3"],
    },
    // virtme-ng (the kernel matrix's VM runner) calls depmod on the host.
    Package {
        name: "kmod",
        provides: &["depmod"],
    },
];

/// System services Debian starts when these packages are installed; the
/// tests run their own instances on their own ports.
const SERVICES: &[(&str, &str)] = &[("nginx-light", "nginx"), ("prometheus", "prometheus")];

pub fn setup(test_deps: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    ensure_rust_src()?;
    let linker_ready = bpf_linker_ready();
    let mut packages: Vec<&Package> = BUILD_PACKAGES.iter().collect();
    if test_deps {
        packages.extend(TEST_PACKAGES);
    }
    let installed_any = if is_debian() {
        ensure_debian_packages(&packages, test_deps)?
    } else {
        require_elsewhere(&packages, linker_ready)?;
        false
    };
    if !linker_ready {
        install_bpf_linker()?;
    }
    if test_deps {
        ensure_tracefs()?;
    }
    if installed_any || !linker_ready {
        eprintln!(
            "xtask: set-up complete in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn is_debian() -> bool {
    which("apt-get").is_some() && which("dpkg-query").is_some()
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let Ok(output) = Command::new("rustup")
        .args(["component", "list", "--installed"])
        .output()
    else {
        // No rustup: accept a toolchain that ships its sources anyway.
        if sysroot_has_sources() {
            return Ok(());
        }
        bail!(
            "rustup is not installed and this toolchain has no rust-src: install Rust \
             with rustup (https://rustup.rs), then `rustup component add rust-src`"
        );
    };
    if String::from_utf8_lossy(&output.stdout)
        .lines()
        .any(|line| line.trim() == "rust-src" || line.starts_with("rust-src-"))
    {
        return Ok(());
    }
    eprintln!("xtask: installing the rust-src component (the BPF target builds core from source)");
    run(Command::new("rustup").args(["component", "add", "rust-src"]))
}

fn sysroot_has_sources() -> bool {
    Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .is_ok_and(|o| {
            Path::new(String::from_utf8_lossy(&o.stdout).trim())
                .join("lib/rustlib/src/rust/library/core")
                .is_dir()
        })
}

fn bpf_linker_ready() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .any(|word| word == BPF_LINKER_VERSION)
        })
}

/// The packages dpkg reports as installed, among `names` (one call).
fn dpkg_installed(names: &[&str]) -> anyhow::Result<Vec<String>> {
    // dpkg-query exits 1 when some package is unknown; it still prints the
    // others, so only its output matters.
    let output = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${Status}\n")
        .args(names)
        .output()
        .context("cannot run dpkg-query")?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.ends_with(" install ok installed"))
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Installs the missing packages with apt-get; true if it installed any.
fn ensure_debian_packages(packages: &[&Package], test_deps: bool) -> anyhow::Result<bool> {
    let names: Vec<&str> = packages.iter().map(|p| p.name).collect();
    let installed = dpkg_installed(&names)?;
    let missing: Vec<&str> = names
        .into_iter()
        .filter(|name| !installed.iter().any(|i| i == name))
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {list}\n\
             installing them needs root: run `sudo apt-get install -y {list}` \
             (or this command as root: `cargo xtask setup{flag}`), then retry",
            list = missing.join(" "),
            flag = if test_deps { " --test-deps" } else { "" },
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    let result = {
        let _policy = NoServiceStarts::install()?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(["-o", "Dpkg::Use-Pty=0"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("RUNLEVEL", "1"))
    };
    if let Err(error) = result {
        if missing.iter().any(|p| p.contains("-22-")) {
            eprintln!(
                "xtask: LLVM 22 packages come from Debian (bookworm-security, trixie) or \
                 apt.llvm.org; check that one of them is in your apt sources"
            );
        }
        return Err(error);
    }
    disable_services(&missing);
    Ok(true)
}

/// Keeps Debian maintainer scripts from starting services while it lives:
/// `/usr/sbin/policy-rc.d` exiting 101 means "not allowed". A policy file
/// that was there before is put back afterwards.
struct NoServiceStarts {
    previous: Option<Vec<u8>>,
}

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

impl NoServiceStarts {
    fn install() -> anyhow::Result<Self> {
        let previous = fs::read(POLICY_RC_D).ok();
        fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# written by cargo xtask setup while installing packages\nexit 101\n",
        )
        .with_context(|| format!("cannot write {POLICY_RC_D}"))?;
        fs::set_permissions(POLICY_RC_D, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot make {POLICY_RC_D} executable"))?;
        Ok(Self { previous })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        let restored = match &self.previous {
            Some(content) => fs::write(POLICY_RC_D, content),
            None => fs::remove_file(POLICY_RC_D),
        };
        if let Err(error) = restored {
            eprintln!("xtask: WARNING: cannot restore {POLICY_RC_D}: {error}");
        }
    }
}

/// Under systemd, Debian still enables the units of the services just
/// installed (policy-rc.d only kept them from starting): disable them so they
/// do not start at the next boot either.
fn disable_services(just_installed: &[&str]) {
    if !Path::new("/run/systemd/system").is_dir() {
        return;
    }
    let units: Vec<&str> = SERVICES
        .iter()
        .filter(|(package, _)| just_installed.contains(package))
        .map(|(_, unit)| *unit)
        .collect();
    if units.is_empty() {
        return;
    }
    let status = Command::new("systemctl")
        .args(["disable", "--now", "--quiet"])
        .args(&units)
        .status();
    if !status.is_ok_and(|s| s.success()) {
        eprintln!(
            "xtask: WARNING: could not disable {}: the tests use their own instances on their own ports",
            units.join(", ")
        );
    }
}

/// Off Debian: report exactly what is missing, and fail if anything is.
fn require_elsewhere(packages: &[&Package], linker_ready: bool) -> anyhow::Result<()> {
    let missing: Vec<&Package> = packages
        .iter()
        .copied()
        // LLVM's development files only matter to build bpf-linker.
        .filter(|p| !(linker_ready && BUILD_PACKAGES.iter().any(|b| b.name == p.name)))
        .filter(|p| !p.provides.iter().all(|thing| present(thing)))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut lines = vec![
        "this is not a Debian-like system (no apt-get/dpkg-query), so set-up cannot \
         install anything; install these with your package manager, then retry:"
            .to_owned(),
    ];
    for package in &missing {
        let absent: Vec<&str> = package
            .provides
            .iter()
            .copied()
            .filter(|thing| !present(thing))
            .collect();
        lines.push(format!(
            "  - {} (Debian's name), providing {}",
            package.name,
            absent.join(", ")
        ));
    }
    if missing.iter().any(|p| p.name.contains("-22-")) {
        lines.push(format!(
            "LLVM 22 must be at {LLVM_PREFIX} (or install bpf-linker {BPF_LINKER_VERSION} by \
             hand: LLVM_PREFIX=<LLVM 22> cargo install bpf-linker --version \
             {BPF_LINKER_VERSION} --locked --no-default-features --features llvm-22)"
        ));
    }
    bail!("{}", lines.join("\n"))
}

/// An absolute path that exists, or a command on PATH or in an sbin directory
/// (which a normal user's PATH often lacks).
fn present(thing: &str) -> bool {
    if thing.starts_with('/') {
        return Path::new(thing).exists();
    }
    which(thing).is_some()
        || ["/usr/sbin", "/sbin", "/usr/local/sbin"]
            .iter()
            .any(|dir| Path::new(dir).join(thing).is_file())
}

fn install_bpf_linker() -> anyhow::Result<()> {
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (3-4 minutes on 2 cores, once)"
    );
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
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
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )?;
    if !bpf_linker_ready() {
        bail!(
            "bpf-linker {BPF_LINKER_VERSION} was installed but `bpf-linker --version` does not \
             report it: is {} on PATH?",
            cargo_bin().display()
        );
    }
    Ok(())
}

/// Where `cargo install` puts binaries.
pub fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"))
        .join("bin")
}

/// The tests (and the agent) read tracefs at /sys/kernel/tracing.
fn ensure_tracefs() -> anyhow::Result<()> {
    let tracing = Path::new("/sys/kernel/tracing");
    if tracing.join("events").is_dir() {
        return Ok(());
    }
    if !is_root() {
        eprintln!(
            "xtask: WARNING: tracefs is not mounted at /sys/kernel/tracing and mounting it needs root"
        );
        return Ok(());
    }
    eprintln!("xtask: mounting tracefs at /sys/kernel/tracing");
    run(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))
        .context("the tests need tracefs at /sys/kernel/tracing")
}
