//! `ka-agent top` for real, in a pseudo-terminal: a tmux session of 80×24
//! runs a shell, the shell runs top against a real agent; the test reads
//! the screen (`capture-pane`), types keys (`send-keys`), and checks that
//! after `q` the shell is back and the terminal left the alternate screen.

#![expect(
    clippy::expect_used,
    reason = "helpers of tests fail by panicking, naming what failed"
)]

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{
    Agent,
    lab::{SocketOptions, require_program},
    pair, require_root, wait_api,
};

/// A tmux server of its own (`-L`), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// An 80×24 session running a plain shell with a known prompt.
    fn start(tag: &str) -> Self {
        let tmux = Self {
            socket: format!("ka-top-{}-{tag}", std::process::id()),
        };
        let status = Command::new("tmux")
            .args(["-L", &tmux.socket, "-f", "/dev/null"])
            .args(["new-session", "-d", "-x", "80", "-y", "24", "-s", "t"])
            .args(["env", "PS1=shell$ ", "TERM=xterm-256color"])
            .args(["sh"])
            .status()
            .expect("tmux");
        assert!(status.success(), "tmux new-session");
        tmux
    }

    fn tmux(&self, args: &[&str]) -> String {
        let output = Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux");
        assert!(
            output.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "t"])
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        self.tmux(&args);
    }

    /// Typed as text, not key names.
    fn type_text(&self, text: &str) {
        self.tmux(&["send-keys", "-t", "t", "-l", text]);
    }

    fn alternate_screen(&self) -> bool {
        self.tmux(&["display-message", "-p", "-t", "t", "#{alternate_on}"])
            .trim()
            == "1"
    }

    /// Waits (bounded) until the screen satisfies `predicate`.
    fn wait(&self, what: &str, timeout: Duration, predicate: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if predicate(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

/// The status `echo top-exit=$?` printed, once top has exited (the
/// command line itself shows `top-exit=$?`).
fn top_exit(screen: &str) -> Option<u8> {
    screen.split("top-exit=").skip(1).find_map(|rest| {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

fn line_with<'a>(screen: &'a str, needle: &str) -> Option<&'a str> {
    screen.lines().find(|l| l.contains(needle))
}

#[test]
fn top_shows_filters_and_quits_restoring_the_terminal() {
    if !require_root("top_shows_filters_and_quits_restoring_the_terminal")
        || require_program("tmux", "top_shows_filters_and_quits_restoring_the_terminal").is_none()
    {
        return;
    }
    let (client, server) = pair("tp");
    let agent = Agent::start(&["--idle-timeout", "3s"]);
    // Two known connections: one idle with keepalive off (at risk of the
    // 3 s idle timeout), one with keepalive on 1s/1s×3 (ok).
    let listener_risk = server.listen("198.18.10.2:7101".parse().unwrap());
    let listener_ok = server.listen("198.18.10.2:7102".parse().unwrap());
    let _risky = client
        .connect(
            "198.18.10.2:7101".parse().unwrap(),
            &SocketOptions::default(),
        )
        .unwrap();
    let _risky_peer = listener_risk.accept().unwrap();
    let _fine = client
        .connect(
            "198.18.10.2:7102".parse().unwrap(),
            &SocketOptions {
                keepalive: Some((1, 1, 3)),
                user_timeout_ms: None,
            },
        )
        .unwrap();
    let _fine_peer = listener_ok.accept().unwrap();
    wait_api(
        &agent,
        "/api/v1/connections?at_risk=true&port=7101",
        "the idle connection at risk",
        |c| c["remote"] == "198.18.10.2:7101",
    );

    let tmux = Tmux::start("main");
    tmux.wait("the shell prompt", Duration::from_secs(10), |s| {
        s.contains("shell$")
    });
    tmux.type_text(&format!(
        "{} top --agent http://{}; echo top-exit=$?",
        env!("CARGO_BIN_EXE_ka-agent"),
        agent.addr
    ));
    tmux.keys(&["Enter"]);
    let screen = tmux.wait("both connections", Duration::from_secs(15), |s| {
        s.contains("198.18.10.2:7101") && s.contains("198.18.10.2:7102")
    });
    assert!(tmux.alternate_screen(), "top draws on the alternate screen");
    assert!(screen.contains("ka top"), "{screen}");
    let risky = line_with(&screen, "198.18.10.2:7101").unwrap();
    assert!(
        risky.contains("at_risk") && risky.contains("off"),
        "{risky}\n{screen}"
    );
    let fine = line_with(&screen, "198.18.10.2:7102").unwrap();
    assert!(
        fine.contains("ok") && fine.contains("on 1s/1s\u{d7}3"),
        "{fine}\n{screen}"
    );
    // Worst first: the connection at risk is above the one that is fine.
    let position = |needle| screen.find(needle).unwrap();
    assert!(position("198.18.10.2:7101") < position("198.18.10.2:7102"));
    // Every line fits 80 columns (tmux would wrap, not cut, a longer one).
    assert!(screen.lines().all(|l| l.chars().count() <= 80));

    // Filter: `/`, text, Enter.
    tmux.keys(&["/"]);
    tmux.type_text(":7102");
    tmux.keys(&["Enter"]);
    let filtered = tmux.wait("the filtered view", Duration::from_secs(5), |s| {
        s.contains("filter::7102") && !s.contains("198.18.10.2:7101")
    });
    assert!(filtered.contains("198.18.10.2:7102"), "{filtered}");
    // Class keys: at risk only (nothing matches with the filter), then all.
    // Esc alone (with a following key it would read as Alt+key).
    tmux.keys(&["Escape"]);
    tmux.wait("the filter cleared", Duration::from_secs(5), |s| {
        !s.contains("filter::7102") && s.contains("198.18.10.2:7101")
    });
    tmux.keys(&["a"]);
    let at_risk = tmux.wait("the at-risk class", Duration::from_secs(5), |s| {
        s.contains("class:at_risk") && s.contains("198.18.10.2:7101")
    });
    assert!(!at_risk.contains("198.18.10.2:7102"), "{at_risk}");
    tmux.keys(&["0", "s"]);
    tmux.wait("sort by idle", Duration::from_secs(5), |s| {
        s.contains("sort:idle") && s.contains("198.18.10.2:7102")
    });

    tmux.keys(&["q"]);
    let after = tmux.wait("the shell again", Duration::from_secs(10), |s| {
        top_exit(s).is_some()
    });
    assert_eq!(top_exit(&after), Some(0), "{after}");
    assert!(!tmux.alternate_screen(), "alternate screen left:\n{after}");
    assert!(
        !after.contains("KEEPALIVE"),
        "the table is gone with the alternate screen:\n{after}"
    );
    // The terminal is back in cooked mode: the shell echoes and runs a line.
    tmux.type_text("echo still-$((40+2))");
    tmux.keys(&["Enter"]);
    tmux.wait("a working shell", Duration::from_secs(5), |s| {
        s.contains("still-42")
    });
    drop((client, server));
}

#[test]
fn top_starts_its_own_agent_when_none_answers() {
    if !require_root("top_starts_its_own_agent_when_none_answers")
        || require_program("tmux", "top_starts_its_own_agent_when_none_answers").is_none()
    {
        return;
    }
    // A port nobody listens on.
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let tmux = Tmux::start("own");
    tmux.wait("the shell prompt", Duration::from_secs(10), |s| {
        s.contains("shell$")
    });
    tmux.type_text(&format!(
        "{} top --agent http://{unused}; echo top-exit=$?",
        env!("CARGO_BIN_EXE_ka-agent"),
    ));
    tmux.keys(&["Enter"]);
    let screen = tmux.wait("the own agent's view", Duration::from_mins(1), |s| {
        s.contains("(own agent)") && s.contains("s ago")
    });
    // Its own agent listens on another loopback port, shown in the header.
    let header = line_with(&screen, "ka top").unwrap();
    let own = header
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http://"))
        .unwrap()
        .parse::<std::net::SocketAddr>()
        .unwrap();
    assert!(common::http_get(own, "/healthz").is_some());
    tmux.keys(&["q"]);
    let after = tmux.wait("the shell again", Duration::from_secs(20), |s| {
        top_exit(s).is_some()
    });
    assert_eq!(top_exit(&after), Some(0), "{after}");
    assert!(!tmux.alternate_screen());
    // The own agent stopped with top.
    let deadline = Instant::now() + Duration::from_secs(10);
    while common::http_get(own, "/healthz").is_some() {
        assert!(Instant::now() < deadline, "top's own agent still runs");
        std::thread::sleep(Duration::from_millis(100));
    }
}
