//! Running commands, and the build/run steps.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// The repository root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Runs `command`, failing with its name when it fails.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root());
    // A fresh clone in CI never reuses incremental data: it would only take
    // another gigabyte of the CI machine's disk.
    if std::env::var("CI").as_deref() == Ok("true")
        && std::env::var_os("CARGO_INCREMENTAL").is_none()
    {
        command.env("CARGO_INCREMENTAL", "0");
    }
    command
}

/// Builds ka-agent; returns the binary's path.
pub fn build_agent(release: bool) -> anyhow::Result<PathBuf> {
    let mut command = cargo();
    command.args(["build", "--package", "ka-agent"]);
    if release {
        command.arg("--release");
    }
    run(&mut command)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("ka-agent"))
}

/// The path of `program` on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}
