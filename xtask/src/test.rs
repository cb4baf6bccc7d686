//! `cargo xtask test`: the whole suite, as CI runs it.

use std::time::Instant;

use crate::{cmd, setup};

pub fn test(args: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    setup::setup(true)?;
    if !cmd::is_root() {
        eprintln!(
            "xtask: WARNING: not root: the kernel and network tests will be SKIPPED (and fail under CI=true)"
        );
    }
    // The default members: everything but the BPF-target crate, which is
    // built (and checked by rustc) through ka-agent's build script.
    let steps: [(&str, &[&str]); 2] = [
        ("format", &["fmt", "--all", "--check"]),
        ("lint", &["clippy", "--all-targets", "--", "-D", "warnings"]),
    ];
    for (name, step) in steps {
        eprintln!("xtask: {name}: cargo {}", step.join(" "));
        cmd::run(cmd::cargo().args(step))?;
    }
    // The kernel programs, linted for the BPF target they are built for.
    eprintln!("xtask: lint kernel programs: cargo clippy -p ka-ebpf --target bpfel-unknown-none");
    cmd::run(
        cmd::cargo()
            .args([
                "clippy",
                "--package",
                "ka-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--target-dir",
                "target/ebpf-lint",
                "--",
                "-D",
                "warnings",
            ])
            // The BPF target is tier 3: core is built from source, which
            // needs an unstable flag, allowed for this command only.
            .env("RUSTC_BOOTSTRAP", "1"),
    )?;
    eprintln!("xtask: tests: cargo test --no-fail-fast {}", args.join(" "));
    cmd::run(cmd::cargo().args(["test", "--no-fail-fast"]).args(args))?;
    eprintln!(
        "xtask: all checks passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
