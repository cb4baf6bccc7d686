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
    let steps: [(&str, &[&str]); 2] = [
        ("format", &["fmt", "--all", "--check"]),
        (
            "lint",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
    ];
    for (name, step) in steps {
        eprintln!("xtask: {name}: cargo {}", step.join(" "));
        cmd::run(cmd::cargo().args(step))?;
    }
    eprintln!(
        "xtask: tests: cargo test --workspace --no-fail-fast {}",
        args.join(" ")
    );
    cmd::run(
        cmd::cargo()
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(args),
    )?;
    eprintln!(
        "xtask: all checks passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
