//! `ka-agent top`: a live terminal view of the connections, worst first.
//!
//! It reads a running agent's API (`--agent`). When none answers, it starts
//! one as its own child (`ka-agent run --listen 127.0.0.1:<free port>`),
//! which dies with it. A poller thread fetches; the UI thread only draws
//! and reads keys, so it never blocks on the network. The terminal is
//! restored on quit, on error and on panic (ratatui's init installs a panic
//! hook that restores it before the panic message is printed).

pub mod fetch;
pub mod view;

use std::{
    io::IsTerminal as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

use self::view::{Source, View};
use crate::cli::TopArgs;

/// Why `top` could not run.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("top needs a terminal (standard input and output are not one)")]
    NotATerminal,
    #[error(
        "no agent answers at {url}, and starting one needs root (or CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN): run `ka-agent run` as root, or point --agent at a running agent"
    )]
    CannotStartAgent { url: String },
    #[error("cannot start an own agent: {0}")]
    Spawn(std::io::Error),
    #[error("the own agent did not get ready: {reason}; its log: {log}")]
    AgentNotReady { reason: String, log: String },
    #[error("terminal: {0}")]
    Terminal(std::io::Error),
}

impl TopError {
    /// 2 for what the operator can fix on the command line, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::NotATerminal | Self::CannotStartAgent { .. } => 2,
            _ => 1,
        }
    }
}

/// `ka-agent top`: returns the exit status.
pub fn top_command(args: &TopArgs) -> i32 {
    match top(args) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("ka-agent: {error}");
            error.exit_code()
        }
    }
}

fn top(args: &TopArgs) -> Result<(), TopError> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(TopError::NotATerminal);
    }
    let mut own = None;
    let mut source = Source {
        url: args.agent.url.clone(),
        own: false,
    };
    let mut addr = args.agent.addr;
    if !args.no_spawn && !fetch::answers(addr, Duration::from_secs(1)) {
        let agent = OwnAgent::start(args)?;
        addr = agent.addr;
        source = Source {
            url: format!("http://{addr}"),
            own: true,
        };
        own = Some(agent);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let updates = fetch::spawn_poller(addr, Duration::from_secs(args.refresh), Arc::clone(&stop))
        .map_err(TopError::Terminal)?;
    let mut view = View::new(source);
    view.set_class(args.class.as_deref());
    view.filter = args.filter.clone().unwrap_or_default();

    let result = {
        let _terminal = TerminalGuard;
        match ratatui::try_init() {
            Ok(mut terminal) => ui_loop(&mut terminal, &mut view, &updates),
            Err(error) => Err(TopError::Terminal(error)),
        }
    };
    stop.store(true, Ordering::Relaxed);
    drop(own);
    result
}

/// Restores the terminal when dropped (quit, error, or unwinding).
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

fn ui_loop(
    terminal: &mut ratatui::DefaultTerminal,
    view: &mut View,
    updates: &std::sync::mpsc::Receiver<Result<fetch::Fetched, String>>,
) -> Result<(), TopError> {
    // Runs until q (or Ctrl-C, or the poller is gone for good).
    loop {
        while let Ok(update) = updates.try_recv() {
            view.update(update);
        }
        terminal
            .draw(|frame| view.draw(frame))
            .map_err(TopError::Terminal)?;
        if !event::poll(Duration::from_millis(250)).map_err(TopError::Terminal)? {
            continue;
        }
        // Handle everything that is waiting before drawing again.
        for _ in 0..64 {
            if let Event::Key(key) = event::read().map_err(TopError::Terminal)?
                && key.kind != KeyEventKind::Release
                && handle_key(view, key.code, key.modifiers) == Flow::Quit
            {
                return Ok(());
            }
            if !event::poll(Duration::ZERO).map_err(TopError::Terminal)? {
                break;
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Quit,
}

fn handle_key(view: &mut View, code: KeyCode, modifiers: KeyModifiers) -> Flow {
    if modifiers.contains(KeyModifiers::CONTROL) && code == KeyCode::Char('c') {
        return Flow::Quit;
    }
    if let Some(text) = view.editing.as_mut() {
        match code {
            KeyCode::Enter => {
                view.filter = view.editing.take().unwrap_or_default();
                view.table.select(None);
            }
            KeyCode::Esc => {
                view.editing = None;
                view.filter.clear();
            }
            KeyCode::Backspace => {
                text.pop();
            }
            KeyCode::Char(c) if text.len() < 128 => text.push(c),
            _ => {}
        }
        return Flow::Continue;
    }
    match code {
        KeyCode::Char('q') => return Flow::Quit,
        KeyCode::Char('/') => view.editing = Some(view.filter.clone()),
        KeyCode::Esc => view.filter.clear(),
        KeyCode::Char('s') => view.sort = view.sort.next(),
        KeyCode::Char('r') => view.reverse = !view.reverse,
        KeyCode::Char('z') => view.set_class(Some("zombie")),
        KeyCode::Char('p') => view.set_class(Some("probing")),
        KeyCode::Char('a') => view.set_class(Some("at_risk")),
        KeyCode::Char('o') => view.set_class(Some("ok")),
        KeyCode::Char('0') => view.set_class(None),
        KeyCode::Down | KeyCode::Char('j') => view.table.select_next(),
        KeyCode::Up | KeyCode::Char('k') => view.table.select_previous(),
        KeyCode::PageDown => view.table.scroll_down_by(10),
        KeyCode::PageUp => view.table.scroll_up_by(10),
        KeyCode::Home => view.table.select_first(),
        KeyCode::End => view.table.select_last(),
        _ => {}
    }
    Flow::Continue
}

/// An agent top started itself: `ka-agent run` on a free loopback port,
/// logging to a file (not the terminal); SIGTERM on drop, and the kernel
/// sends it SIGTERM should top die without dropping it.
struct OwnAgent {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl OwnAgent {
    fn start(args: &TopArgs) -> Result<Self, TopError> {
        use std::os::unix::process::CommandExt as _;
        if !crate::check::privileged() {
            return Err(TopError::CannotStartAgent {
                url: args.agent.url.clone(),
            });
        }
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(TopError::Spawn)?;
        let log = std::env::temp_dir().join(format!("ka-agent-top-{}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).map_err(TopError::Spawn)?;
        let exe = std::env::current_exe().map_err(TopError::Spawn)?;
        let timeouts: Vec<String> = args.idle_timeouts.iter().map(|t| t.name.clone()).collect();
        eprintln!(
            "ka-agent top: no agent answers at {}; starting one on {addr} (log: {})",
            args.agent.url,
            log.display()
        );
        let mut command = Command::new(exe);
        command
            .args(["run", "--listen", &addr.to_string(), "--idle-timeout"])
            .arg(timeouts.join(","))
            .env_remove("KA_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches
        // only the child being set up between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = command.spawn().map_err(TopError::Spawn)?;
        let mut agent = Self { child, addr, log };
        agent.wait_ready()?;
        Ok(agent)
    }

    fn wait_ready(&mut self) -> Result<(), TopError> {
        let started = Instant::now();
        let deadline = started + Duration::from_mins(1);
        let mut said = Instant::now();
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.not_ready(format!("it exited with {status}")));
            }
            if fetch::http_get(self.addr, "/readyz", Duration::from_secs(1)).is_ok() {
                return Ok(());
            }
            if said.elapsed() >= Duration::from_secs(5) {
                eprintln!(
                    "ka-agent top: waiting for the agent's first inventory ({:.0} s)",
                    started.elapsed().as_secs_f64()
                );
                said = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(self.not_ready("not ready within 60 s".to_owned()))
    }

    fn not_ready(&self, reason: String) -> TopError {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let last = log.lines().last().unwrap_or("(empty)").trim().to_owned();
        TopError::AgentNotReady {
            reason,
            log: format!("{} (last line: {last})", self.log.display()),
        }
    }
}

impl Drop for OwnAgent {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.log);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> View {
        View::new(Source {
            url: "http://127.0.0.1:9977".into(),
            own: false,
        })
    }

    fn press(view: &mut View, keys: &str) -> Flow {
        let mut flow = Flow::Continue;
        for c in keys.chars() {
            let code = match c {
                '\n' => KeyCode::Enter,
                '\x1b' => KeyCode::Esc,
                '\x08' => KeyCode::Backspace,
                c => KeyCode::Char(c),
            };
            flow = handle_key(view, code, KeyModifiers::NONE);
        }
        flow
    }

    #[test]
    fn keys() {
        let mut v = view();
        assert_eq!(press(&mut v, "/80x\x08\n"), Flow::Continue);
        assert_eq!(v.filter, "80");
        assert!(v.editing.is_none());
        // q while typing is text, not quit.
        press(&mut v, "/q");
        assert_eq!(v.editing.as_deref(), Some("80q"));
        press(&mut v, "\x1b");
        assert_eq!(v.filter, "");
        press(&mut v, "zs");
        assert_eq!(v.class, Some("zombie"));
        assert_eq!(v.sort, view::SortKey::Idle);
        press(&mut v, "0r");
        assert_eq!(v.class, None);
        assert!(v.reverse);
        assert_eq!(press(&mut v, "q"), Flow::Quit);
        assert_eq!(
            handle_key(&mut v, KeyCode::Char('c'), KeyModifiers::CONTROL),
            Flow::Quit
        );
    }
}
