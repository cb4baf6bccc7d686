//! `ka-agent`: see `ka-agent --help`.

use std::process::ExitCode;

use ka_agent::cli::{Cli, Command, LogFormat};

fn init_tracing(cli: &Cli) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .map_err(|e| format!("invalid --log filter {:?}: {e}", cli.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match cli.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("cannot initialise logging: {e}"))
}

/// Parses the command line; invalid input is one line on stderr and exit 2.
fn parse() -> Result<Cli, ExitCode> {
    use clap::{CommandFactory as _, FromArgMatches as _};
    let mut command = Cli::command();
    // The kernel summary reads /proc and /sys: only when it is shown.
    if std::env::args_os().any(|a| a == "--version" || a == "-V") {
        command = command.version(ka_agent::version::long_version(
            &ka_agent::version::Sources::system(),
        ));
    }
    match command
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches))
    {
        Ok(cli) => Ok(cli),
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = error.print();
                return Err(
                    if error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                        ExitCode::from(2)
                    } else {
                        ExitCode::SUCCESS
                    },
                );
            }
            let text = error.to_string();
            // clap's first paragraph, on one line: "the following required
            // arguments were not provided: <SHELL>", "invalid value 'x'
            // for '--class <CLASS>' [possible values: ...]".
            let paragraph: Vec<&str> = text
                .lines()
                .map(str::trim)
                .skip_while(|l| l.is_empty())
                .take_while(|l| !l.is_empty())
                .collect();
            let joined = paragraph.join(" ");
            let line = if joined.is_empty() {
                "invalid command line"
            } else {
                joined.trim_start_matches("error: ")
            };
            eprintln!("ka-agent: {line} (see ka-agent --help)");
            Err(ExitCode::from(2))
        }
    }
}

fn main() -> ExitCode {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    if let Err(message) = init_tracing(&cli) {
        eprintln!("ka-agent: {message}");
        return ExitCode::from(2);
    }
    let code = match cli.command {
        Command::Check(args) => ka_agent::check::check(&args),
        Command::Audit(args) => ka_agent::audit::audit_command(&args),
        Command::Snapshot(args) => ka_agent::audit::snapshot_command(&args),
        Command::Top(args) => ka_agent::top::top_command(&args),
        Command::Completions(args) => {
            use std::io::Write as _;

            use clap::CommandFactory as _;
            let mut script = Vec::new();
            clap_complete::generate(args.shell, &mut Cli::command(), "ka-agent", &mut script);
            match std::io::stdout().write_all(&script) {
                Ok(()) => 0,
                // `ka-agent completions bash | head` is not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
                Err(e) => {
                    eprintln!("ka-agent: cannot write the completion script: {e}");
                    1
                }
            }
        }
        Command::Run(args) => {
            // One malloc arena for every thread: the start-up (BTF, program
            // loading: tens of MiB, freed and trimmed) runs on a runtime
            // worker, and an arena of its own there kept 14 MiB more
            // resident for the agent's whole life (18 -> 32 MiB idle). The
            // threads allocate little once running (thread caches first).
            // SAFETY: mallopt only sets an allocator parameter; called
            // before any thread but this one exists.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("ka-agent: cannot start the runtime: {error}");
                    return ExitCode::from(1);
                }
            };
            // The agent's loop runs on a worker, which also waits on the
            // ring buffer, the timers and the sockets: its wake-ups need no
            // hand-over to the main thread (a futex wake and a context
            // switch, on every drain).
            let agent = runtime.spawn(ka_agent::run::run(args));
            match runtime.block_on(agent) {
                Ok(Ok(())) => 0,
                Ok(Err(error)) => {
                    eprintln!("ka-agent: {error}");
                    error.exit_code()
                }
                Err(error) => {
                    eprintln!("ka-agent: the agent stopped unexpectedly: {error}");
                    1
                }
            }
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
