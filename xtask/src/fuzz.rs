//! `cargo xtask fuzz`: every cargo-fuzz target for a bounded time.
//!
//! Crashes land in `fuzz/artifacts/<target>/`; copy a reproducer to
//! `fuzz/regressions/<target>/` and `ka-agent/tests/fuzz_regressions.rs`
//! replays it in every test run.

use std::process::Command;

use anyhow::Context;

use crate::cmd::{root, run, which};

pub const TARGETS: [&str; 4] = [
    "tracefs_format",
    "btf_offsets",
    "decode_event",
    "idle_timeout",
];

pub fn fuzz(seconds: u32, only: Option<&str>) -> anyhow::Result<()> {
    if which("cargo-fuzz").is_none() {
        eprintln!("xtask: installing cargo-fuzz (once)");
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let fuzz_dir = root().join("fuzz");
    for target in TARGETS.iter().filter(|t| only.is_none_or(|o| o == **t)) {
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        // cargo-fuzz needs unstable compiler flags: allowed on the stable
        // toolchain for this build only. The kernel programs are not needed.
        run(Command::new("cargo")
            .current_dir(&fuzz_dir)
            .args(["fuzz", "run", "--sanitizer", "none", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .arg("-rss_limit_mb=2048")
            .env("RUSTC_BOOTSTRAP", "1")
            .env("AYA_BUILD_SKIP", "1"))
        .with_context(|| {
            format!("fuzz target {target} found a crash: see fuzz/artifacts/{target}/")
        })?;
    }
    Ok(())
}
