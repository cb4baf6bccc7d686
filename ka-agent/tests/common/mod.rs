//! Shared by the integration tests: a real `ka-agent run` process, a reader
//! for its /metrics and API, and the network lab.

#![expect(
    clippy::expect_used,
    reason = "test helpers fail by panicking, naming what failed"
)]
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::{
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant},
};

use lab::{Netns, link};

/// A running agent; stopped with SIGTERM (then SIGKILL) on drop.
pub struct Agent {
    child: Option<Child>,
    pub addr: SocketAddr,
    stderr_path: std::path::PathBuf,
}

/// A port for an agent to serve on, different for every call in this
/// process, taken from above the kernel's ephemeral range where there is
/// room: a port `bind(0)` chose and gave back could be another socket's
/// source port, or another test's agent's, before the agent binds it.
fn free_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let ephemeral_top = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().nth(1)?.parse::<u16>().ok())
        .unwrap_or(u16::MAX);
    let room = u16::MAX - ephemeral_top;
    if room >= 256 {
        let start = u16::try_from(std::process::id() % u32::from(room)).unwrap_or(0);
        for _ in 0..room {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = ephemeral_top + 1 + start.wrapping_add(n) % room;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Agent {
    /// Starts `ka-agent run` with `args` and waits until /readyz says ready.
    ///
    /// Create the test's namespaces first: the kernel reuses the inode
    /// number of a namespace another test just deleted, and an agent
    /// started before ours existed may have counted that test's events under
    /// the same `netns` label.
    pub fn start(args: &[&str]) -> Self {
        Self::start_via(&[], &[], args)
    }

    /// Starts the agent through `wrapper` (a command and its arguments
    /// that runs the rest, such as `setpriv` with fewer capabilities), with
    /// `env` added to its environment.
    pub fn start_via(wrapper: &[&str], env: &[(&str, &str)], args: &[&str]) -> Self {
        let mut addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut agent = Self::spawn_via(wrapper, env, addr, args);
        let mut port_retries = 3;
        // Software emulation (`cargo xtask vm-test`) is many times slower.
        let ready_secs = std::env::var("KA_TEST_READY_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30);
        let deadline = Instant::now() + Duration::from_secs(ready_secs);
        loop {
            if let Some(status) = agent
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = agent.log();
                // Another process took the port between the check and the
                // agent's bind: a fault of the test, not of the agent.
                if log.contains("Address already in use") && port_retries > 0 {
                    port_retries -= 1;
                    addr.set_port(free_port());
                    agent = Self::spawn_via(wrapper, env, addr, args);
                    continue;
                }
                panic!("ka-agent exited early with {status}:\n{log}");
            }
            if http_get(addr, "/readyz").is_some_and(|(code, _)| code == 200) {
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "ka-agent not ready in {ready_secs} s:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the agent as [`Agent::start_via`] does, serving on `listen`,
    /// without waiting for it: for an agent the test cannot reach.
    pub fn spawn_via(
        wrapper: &[&str],
        env: &[(&str, &str)],
        addr: SocketAddr,
        args: &[&str],
    ) -> Self {
        let port = addr.port();
        let stderr_path =
            std::env::temp_dir().join(format!("ka-agent-test-{}-{port}.log", std::process::id()));
        let stderr = std::fs::File::create(&stderr_path).expect("log file");
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command
                    .args(wrapper_args)
                    .arg(env!("CARGO_BIN_EXE_ka-agent"));
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_ka-agent")),
        };
        let child = command
            .envs(env.iter().copied())
            .arg("run")
            .arg("--listen")
            .arg(addr.to_string())
            .args(args)
            .env("KA_LOG", "info,ka_agent=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn ka-agent");
        Self {
            child: Some(child),
            addr,
            stderr_path,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill_hard(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits (bounded) until the agent's log contains `text`; fails with
    /// the log otherwise.
    pub fn wait_log(&self, timeout: Duration, text: &str) {
        assert!(
            ka_lab::wait_until(timeout, Duration::from_millis(100), || self
                .log()
                .contains(text)),
            "timed out waiting for {text:?} in the log:\n{}",
            self.log()
        );
    }

    pub fn metrics(&self) -> Metrics {
        let (code, body) = http_get(self.addr, "/metrics").expect("GET /metrics");
        assert_eq!(code, 200, "{body}");
        Metrics::parse(&body)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path).expect("GET")
    }

    /// Waits (bounded) until `predicate` holds for the metrics; returns them.
    pub fn wait_metrics(
        &self,
        timeout: Duration,
        what: &str,
        predicate: impl Fn(&Metrics) -> bool,
    ) -> Metrics {
        self.wait_metrics_explained(timeout, what, predicate, String::new)
    }

    /// [`Agent::wait_metrics`], whose failure message also carries
    /// `context()` (e.g. the kernel's sockets of a namespace at that moment).
    pub fn wait_metrics_explained(
        &self,
        timeout: Duration,
        what: &str,
        predicate: impl Fn(&Metrics) -> bool,
        context: impl Fn() -> String,
    ) -> Metrics {
        let deadline = Instant::now() + timeout;
        loop {
            let metrics = self.metrics();
            if predicate(&metrics) {
                return metrics;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n--- context ---\n{}\n--- losses and inventories ---\n{}\n--- metrics ---\n{}\n--- log ---\n{}",
                context(),
                metrics
                    .text
                    .lines()
                    .filter(|l| !l.starts_with('#')
                        && ["miss", "lost", "unreceived", "not_tcp", "inventor", "evict"]
                            .iter()
                            .any(|k| l.contains(k)))
                    .collect::<Vec<_>>()
                    .join("\n"),
                metrics.text,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGTERM, wait; returns the exit code.
    pub fn stop(mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(i32::try_from(child.id()).ok()?, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(i32::try_from(child.id()).unwrap_or(0), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub use ka_lab::http::get as http_get;

/// The agent's `/metrics`, parsed.
pub use ka_lab::exposition::Exposition as Metrics;
pub use ka_lab::require_root;

pub mod dashboards;
pub mod dead_peer;
pub mod lab;

pub fn pair(tag: &str) -> (Netns, Netns) {
    let client = Netns::new(&format!("{tag}c"));
    let server = Netns::new(&format!("{tag}s"));
    link(
        &client,
        &["198.18.10.1/24", "2001:db8:10::1/64"],
        &server,
        &["198.18.10.2/24", "2001:db8:10::2/64"],
    );
    (client, server)
}

pub fn api_json(agent: &Agent, path: &str) -> serde_json::Value {
    let (code, body) = agent.get(path);
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

/// Waits until the API lists a matching connection; returns it.
pub fn wait_api(
    agent: &Agent,
    path: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = api_json(agent, path);
        if let Some(found) = body["connections"]
            .as_array()
            .and_then(|list| list.iter().find(|c| pred(c)))
        {
            return found.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} not in {path}: {body}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every count of events the agent did not get that is not zero (lost on
/// the ring, never read, program runs the kernel skipped, keepalive
/// expiries the kernel reported to no program), one per line:
/// what to know first when the agent's count disagrees with the kernel's.
pub fn losses(m: &Metrics) -> String {
    const LOSSES: [&str; 4] = [
        "ka_events_lost_total",
        "ka_events_unreceived_total",
        "ka_program_misses_total",
        "ka_keepalive_expiries_unseen_total",
    ];
    let nonzero: Vec<String> = LOSSES
        .iter()
        .flat_map(|name| m.matching(name, &[]))
        .filter(|sample| sample.value != 0.0)
        .map(|sample| format!("{} {:?} {}", sample.name, sample.labels, sample.value))
        .collect();
    if nonzero.is_empty() {
        "the agent counted no lost event, no skipped program run and no unseen expiry".to_owned()
    } else {
        format!("the agent's losses:\n{}", nonzero.join("\n"))
    }
}

/// The kernel's counter `key` in `ns` and the agent's `metric` for that
/// namespace, read at one quiet moment (no change of the kernel counter
/// while the agent was scraped): the baseline of an exact comparison.
pub fn baseline(agent: &Agent, ns: &Netns, key: &str, metric: &str) -> (i64, i64) {
    let netns = ns.inode().to_string();
    for _ in 0..50 {
        let before = ns.counters().get(key).copied().unwrap_or(0);
        // An idle agent reads the ring every 100 ms (`IDLE_DRAIN_INTERVAL`
        // in run.rs): a shorter wait took an event the kernel had counted
        // but the agent not yet read as the agent's baseline, and the
        // agent then counted one more than the kernel since.
        std::thread::sleep(Duration::from_millis(300));
        let agent_count = agent.metrics().count(metric, &[("netns", &netns)]);
        let after = ns.counters().get(key).copied().unwrap_or(0);
        if before == after {
            return (after, agent_count);
        }
    }
    panic!("{key} never stood still");
}
