//! `cargo xtask`: everything about tooling lives here.
//!
//! The README's two commands are `cargo xtask run` and `cargo xtask test`;
//! both begin with `setup`, which installs what is missing and is a quick
//! no-op when everything is present.

mod bench;
mod cmd;
mod demo;
mod fuzz;
mod run;
mod setup;
mod soak;
mod test;
mod vm_test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "ka's build, run and test tooling")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building ka needs (rust-src, LLVM 22, bpf-linker).
    Setup {
        /// Also install what the tests use (nftables, nginx, wrk, prometheus...).
        #[arg(long)]
        test_deps: bool,
    },
    /// Build the agent (and, through its build script, the kernel programs).
    Build {
        /// An optimised build (target/release/ka-agent).
        #[arg(long)]
        release: bool,
    },
    /// Set up, build (release) and run the agent as root: `ka-agent run
    /// [ARGS]` (through sudo when not root).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up (with test dependencies), then fmt, clippy and the whole test
    /// suite. Extra arguments go to `cargo test`.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build and run `ka-agent check`.
    Check,
    /// A bounded soak: churn, resets and keepalive deaths under the agent,
    /// checking memory stays flat and no event goes unaccounted.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u32,
    },
    /// The performance benchmark (docs/benchmarks.md): throughput under the
    /// agent vs none vs tcpstates, program run times, lost events, memory,
    /// /metrics latency; results in target/bench/results.json.
    Bench(bench::BenchArgs),
    /// The seed's story in network namespaces (client, a load balancer
    /// that forgets idle flows, two backends), narrated with the agent's
    /// own metrics: the reset after idle, the zombie, the fixes. Root.
    Demo {
        /// Short timings, no pauses; fail when an outcome does not show.
        #[arg(long)]
        ci: bool,
    },
    /// Run every fuzz target (cargo-fuzz) for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Boot a stock Debian kernel under QEMU (software emulation) and run
    /// the root integration tests in it; a representative subset without
    /// a filter.
    VmTest {
        /// `6.1.0-56-amd64`, `6.12.117+deb12-amd64`, or a series (`6.1`,
        /// `6.12`) for its newest generic amd64 package.
        #[arg(long)]
        kernel: String,
        /// Seconds allowed for the virtual machine, boot to power-off.
        #[arg(long, default_value_t = vm_test::DEFAULT_TIMEOUT_SECS)]
        timeout: u64,
        /// `cargo test` filter arguments for every integration test binary.
        #[arg(last = true)]
        filter: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cargo_bin_on_path();
    let result = match cli.command {
        Command::Setup { test_deps } => setup::setup(test_deps),
        Command::Build { release } => {
            setup::setup(false).and_then(|()| cmd::build_agent(release).map(|_| ()))
        }
        Command::Run { args } => run::run(&args),
        Command::Test { args } => test::test(&args),
        Command::Check => run::check(),
        Command::Soak { minutes } => soak::soak(minutes),
        Command::Bench(args) => bench::bench(&args),
        Command::Demo { ci } => demo::demo(ci),
        Command::Fuzz { seconds, target } => fuzz::fuzz(seconds, target.as_deref()),
        Command::VmTest {
            kernel,
            timeout,
            filter,
        } => vm_test::vm_test(&kernel, std::time::Duration::from_secs(timeout), &filter),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo install` puts bpf-linker in `$CARGO_HOME/bin`, which a fresh
/// shell may not have on PATH yet: set-up checks it and the BPF build runs
/// it from there.
fn cargo_bin_on_path() {
    let bin = setup::cargo_bin();
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| dir == bin) {
        return;
    }
    let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)));
    if let Ok(joined) = joined {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("PATH", joined) };
    }
}
