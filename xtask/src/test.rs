//! `cargo xtask test`: the whole suite, as CI runs it.
//!
//! Every step runs even when an earlier one failed (CI then reports all
//! problems at once); the last line is a summary and the exit status is
//! non-zero if any step failed.

use std::{process::Command, time::Instant};

use anyhow::bail;

use crate::{
    cmd, setup,
    vm_test::{self, CI_KERNELS},
};

/// The crate built for the BPF target only: its host build is meaningless,
/// it is built (and checked by rustc) through ka-agent's build script and
/// linted for its own target below.
const BPF_CRATE: &str = "ka-ebpf";

pub fn test(args: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::setup(true)?;
    warn_when_disk_is_short();
    let mut test_command = cmd::cargo();
    test_command.args(["test", "--no-fail-fast"]);
    if !selects_packages(args) {
        test_command.args(["--workspace", "--exclude", BPF_CRATE]);
    }
    test_command.args(args);
    if !cmd::is_root() {
        if cmd::which("sudo").is_some() {
            // Build as this user, run the test binaries as root with this
            // environment: nothing in target/ becomes root's.
            eprintln!("xtask: not root: the test binaries run through `sudo -E`");
            test_command.env(runner_variable()?, "sudo -E");
        } else {
            eprintln!(
                "xtask: WARNING: not root and no sudo: the kernel and network tests will be \
                 SKIPPED (and fail under CI=true)"
            );
        }
    }

    let mut steps: Vec<(&str, Command)> = Vec::new();
    let mut format = cmd::cargo();
    format.args(["fmt", "--all", "--check"]);
    steps.push(("format", format));
    let mut lint = cmd::cargo();
    lint.args([
        "clippy",
        "--workspace",
        "--exclude",
        BPF_CRATE,
        "--all-targets",
    ])
    .args(["--", "-D", "warnings"]);
    steps.push(("lint", lint));
    steps.push(("lint kernel programs", kernel_lint()));
    // The fuzz targets are a workspace of their own (cargo-fuzz needs
    // nightly to run them): compiled here so they keep up with the agent.
    let mut fuzz_targets = cmd::cargo();
    fuzz_targets.args([
        "check",
        "--manifest-path",
        "fuzz/Cargo.toml",
        "--locked",
        "--target-dir",
        "target/fuzz-check",
    ]);
    steps.push(("fuzz targets compile", fuzz_targets));
    steps.push(("tests", test_command));

    let mut results = Vec::new();
    for (name, mut command) in steps {
        eprintln!("xtask: {name}: {}", shown(&command));
        let outcome = cmd::run(&mut command);
        if let Err(error) = &outcome {
            eprintln!("xtask: {name} FAILED: {error:#}");
        }
        results.push((name, outcome.is_ok()));
    }
    // The kernel matrix (docs/kernels.md): a subset of the scenarios on
    // Debian's 6.1 and 6.12 in virtual machines, one after the other, when
    // the whole suite runs.
    if args.is_empty() {
        eprintln!("xtask: kernel matrix: cargo xtask vm-test on {CI_KERNELS:?}");
        let outcome = vm_test::matrix();
        if let Err(error) = &outcome {
            eprintln!("xtask: kernel matrix FAILED: {error:#}");
        }
        results.push(("kernel matrix", outcome.is_ok()));
    }
    // The demo as a newcomer runs it, its narrated outcomes asserted from
    // the agent's metrics (`cargo xtask demo --ci`, about 20 s), when the
    // whole suite runs.
    if args.is_empty() {
        eprintln!("xtask: demo: cargo xtask demo --ci");
        let outcome = run_demo();
        if let Err(error) = &outcome {
            eprintln!("xtask: demo FAILED: {error:#}");
        }
        results.push(("demo", outcome.is_ok()));
    }
    // The benchmark's harness (`cargo xtask bench --quick`: every step once,
    // small, about 40 s once built; its figures mean nothing), when the
    // whole suite runs as root.
    if args.is_empty() && cmd::is_root() {
        eprintln!("xtask: bench harness: cargo xtask bench --quick");
        let outcome = std::env::current_exe()
            .map_err(anyhow::Error::from)
            .and_then(|xtask| cmd::run(Command::new(xtask).args(["bench", "--quick"])));
        if let Err(error) = &outcome {
            eprintln!("xtask: bench harness FAILED: {error:#}");
        }
        results.push(("bench harness", outcome.is_ok()));
    }
    let summary: Vec<String> = results
        .iter()
        .map(|(name, ok)| format!("{name} {}", if *ok { "ok" } else { "FAILED" }))
        .collect();
    let failed = results.iter().filter(|(_, ok)| !ok).count();
    eprintln!(
        "xtask: test summary: {} ({failed} failed) in {:.0} s",
        summary.join(", "),
        started.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} step(s) failed");
    }
    Ok(())
}

/// What a whole run from a fresh clone leaves under `target/`, measured
/// (4.4 GiB at 4a5c5b0, the kernel matrix and the bench included), with a
/// margin.
const DISK_A_RUN_NEEDS: u64 = 5 << 30;

/// Says so up front when `target/`'s file system has less room than a whole
/// run needs: a build that runs out of space fails late, in the middle of a
/// step, with an error that names no cause in this project.
fn warn_when_disk_is_short() {
    let target = cmd::root().join("target");
    let directory = if target.exists() { target } else { cmd::root() };
    match rustix::fs::statvfs(&directory) {
        Ok(stats) => {
            let free = stats.f_bavail.saturating_mul(stats.f_frsize);
            if let Some(warning) = disk_warning(free, &directory) {
                eprintln!("{warning}");
            }
        }
        Err(error) => eprintln!(
            "xtask: WARNING: cannot read the free space under {}: {error}",
            directory.display()
        ),
    }
}

/// The warning for `free` bytes under `directory`, if they are too few.
fn disk_warning(free: u64, directory: &std::path::Path) -> Option<String> {
    (free < DISK_A_RUN_NEEDS).then(|| {
        format!(
            "xtask: WARNING: {} MiB free under {}; a whole run from a fresh clone needs \
             about {} GiB: steps may fail with `No space left on device`",
            free >> 20,
            directory.display(),
            DISK_A_RUN_NEEDS >> 30,
        )
    })
}

/// `cargo xtask demo --ci` in a process of its own (its own Ctrl-C
/// handler and namespaces), through `sudo -E` when not root; interrupted
/// (it cleans up) after five minutes.
fn run_demo() -> anyhow::Result<()> {
    let xtask = std::env::current_exe()?;
    let mut command = if cmd::is_root() {
        Command::new(&xtask)
    } else if cmd::which("sudo").is_some() {
        let mut sudo = Command::new("sudo");
        sudo.arg("-E").arg(&xtask);
        sudo
    } else {
        bail!("the demo needs root, and sudo is not installed");
    };
    command.args(["demo", "--ci"]).current_dir(cmd::root());
    let mut child = command.spawn()?;
    let deadline = Instant::now() + std::time::Duration::from_mins(5);
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            bail!("cargo xtask demo --ci failed with {status}");
        }
        if Instant::now() > deadline {
            // SAFETY: kill(2) on our own child's pid, not yet reaped.
            unsafe { libc::kill(i32::try_from(child.id()).unwrap_or(0), libc::SIGINT) };
            let grace = Instant::now() + std::time::Duration::from_secs(30);
            while Instant::now() < grace && child.try_wait()?.is_none() {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            let _ = child.kill();
            let _ = child.wait();
            bail!("cargo xtask demo --ci did not finish within five minutes");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The kernel programs, linted (pedantic, like the rest) for the BPF target
/// they are built for.
fn kernel_lint() -> Command {
    let mut command = cmd::cargo();
    command
        .args(["clippy", "--package", BPF_CRATE, "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--target-dir", "target/ebpf-lint", "--", "-D", "warnings"])
        // The BPF target is tier 3: core is built from source, which needs
        // an unstable flag, allowed for this command only.
        .env("RUSTC_BOOTSTRAP", "1");
    command
}

/// Whether the caller chose packages (`-p xtask`, `--workspace`...) before
/// any `--` that starts the test binaries' own arguments.
fn selects_packages(args: &[String]) -> bool {
    args.iter().take_while(|arg| *arg != "--").any(|arg| {
        ["-p", "--package", "--workspace", "--all", "--manifest-path"]
            .iter()
            .any(|flag| arg == flag || arg.starts_with(&format!("{flag}=")))
            || (arg.starts_with("-p") && arg.len() > 2)
    })
}

/// `CARGO_TARGET_<HOST TRIPLE>_RUNNER`.
fn runner_variable() -> anyhow::Result<String> {
    let output = Command::new("rustc").arg("-vV").output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let Some(host) = text.lines().find_map(|line| line.strip_prefix("host: ")) else {
        bail!("`rustc -vV` does not name the host triple");
    };
    Ok(format!(
        "CARGO_TARGET_{}_RUNNER",
        host.trim().to_uppercase().replace(['-', '.'], "_")
    ))
}

/// `cargo fmt --all --check`, for the log.
fn shown(command: &Command) -> String {
    let args: Vec<String> = command
        .get_args()
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    format!("cargo {}", args.join(" "))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::{DISK_A_RUN_NEEDS, disk_warning, selects_packages};

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn package_selection_is_recognised_before_the_separator_only() {
        assert!(selects_packages(&args(&["-p", "xtask"])));
        assert!(selects_packages(&args(&["-pxtask"])));
        assert!(selects_packages(&args(&["--package=ka-agent", "probe"])));
        assert!(selects_packages(&args(&["--workspace"])));
        assert!(!selects_packages(&args(&["probe", "--", "-p"])));
        assert!(!selects_packages(&args(&[
            "--release",
            "--",
            "--nocapture"
        ])));
        assert!(!selects_packages(&[]));
    }

    #[test]
    fn too_little_disk_is_one_warning_naming_the_need() {
        let target = Path::new("/r/target");
        let warning = disk_warning(300 << 20, target).expect("a warning");
        assert!(warning.starts_with("xtask: WARNING: 300 MiB free under /r/target;"));
        assert!(warning.contains("about 5 GiB"));
        assert!(!warning.contains('\n'));
        assert_eq!(disk_warning(DISK_A_RUN_NEEDS, target), None);
    }

    #[test]
    fn the_free_space_of_this_checkout_can_be_read() {
        let stats = rustix::fs::statvfs(crate::cmd::root()).expect("statvfs");
        assert!(stats.f_frsize > 0 && stats.f_blocks > 0);
    }
}
