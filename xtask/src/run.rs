//! `cargo xtask run` and `cargo xtask check`: build the agent (release) and
//! hand the terminal over to it, as root.

use std::{os::unix::process::CommandExt, path::Path, process::Command};

use anyhow::{Context, bail};

use crate::{cmd, setup};

/// `ka-agent run ARGS` with the defaults of `ka-agent` (listening on
/// 127.0.0.1:9977).
pub fn run(args: &[String]) -> anyhow::Result<()> {
    setup::setup(false)?;
    exec_agent("run", args)
}

/// `ka-agent check`: what this kernel and these privileges allow.
pub fn check() -> anyhow::Result<()> {
    setup::setup(false)?;
    exec_agent("check", &[])
}

/// Builds (release) and replaces this process with `ka-agent <sub> <args>`,
/// through sudo when not root, so Ctrl-C and SIGTERM go straight to the agent
/// and its exit status is ours.
fn exec_agent(sub: &str, args: &[String]) -> anyhow::Result<()> {
    let binary = cmd::build_agent(true)?;
    let error = if cmd::is_root() {
        Command::new(&binary).arg(sub).args(args).exec()
    } else if cmd::which("sudo").is_some() {
        eprintln!("xtask: ka-agent needs root for its kernel programs: running it with sudo");
        sudo(&binary).arg(sub).args(args).exec()
    } else {
        bail!(
            "ka-agent needs root (or CAP_BPF, CAP_PERFMON, CAP_SYSLOG and CAP_SYS_ADMIN, see \
             docs/security.md) and sudo is not installed: run `{} {sub}` as root",
            binary.display()
        );
    };
    Err(error).with_context(|| format!("cannot run {}", binary.display()))
}

/// `sudo env KA_...=... RUST_LOG=... <binary>`: sudo resets the environment,
/// and the agent's options read `KA_<OPTION>` variables.
fn sudo(binary: &Path) -> Command {
    let mut command = Command::new("sudo");
    command.args(["--", "env"]);
    for (name, value) in std::env::vars_os() {
        let keep = name.to_str().is_some_and(|name| {
            name.starts_with("KA_") || ["RUST_LOG", "RUST_BACKTRACE", "NO_COLOR"].contains(&name)
        });
        if keep {
            let mut pair = name;
            pair.push("=");
            pair.push(value);
            command.arg(pair);
        }
    }
    command.arg(binary);
    command
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn sudo_passes_the_agent_options_on() {
        // SAFETY: this test's own variable; no other test reads it.
        unsafe { std::env::set_var("KA_XTASK_TEST_OPTION", "1") };
        let command = super::sudo(Path::new("/bin/ka-agent"));
        let args: Vec<_> = command.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(command.get_program(), "sudo");
        assert_eq!(args[..2], ["--", "env"]);
        assert!(args.iter().any(|a| a == "KA_XTASK_TEST_OPTION=1"));
        assert_eq!(args.last().map(AsRef::as_ref), Some("/bin/ka-agent"));
    }
}
