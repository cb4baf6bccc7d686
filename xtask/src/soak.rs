//! `cargo xtask soak`: a bounded soak of the agent under mixed load —
//! connection churn, resets, keepalive deaths — sampling its memory and
//! table, then checking nothing went unaccounted.
//!
//! Everything runs in a network namespace of its own (loopback inside it);
//! the namespace and the agent are removed on exit, also on error.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;

use ka_lab::{ConnectOpts, Lab, exposition::Exposition};

use crate::cmd;

/// The agent, stopped (SIGTERM) on drop.
struct Guard {
    child: Option<Child>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(i32::try_from(child.id()).unwrap_or(0), libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

/// Sum of a metric over the series that have every `(label, value)`.
fn metric(text: &str, name: &str, filter: &[(&str, &str)]) -> u64 {
    u64::try_from(Exposition::parse(text).count(name, filter)).unwrap_or(0)
}

/// Keepalive after 1 s idle, every 1 s, 2 probes: a dead peer is found in
/// about 3 s.
fn fast_keepalive() -> ConnectOpts {
    ConnectOpts::new().keepalive(Duration::from_secs(1), Duration::from_secs(1), 2)
}

#[expect(
    clippy::too_many_lines,
    reason = "one soak, start to finish, reads best in one place"
)]
pub fn soak(minutes: u32) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("the soak needs root (kernel programs, network namespaces)");
    }
    let binary = cmd::build_agent(true)?;
    // Declared before the agent's guard: the agent stops first.
    let lab = Lab::new("kasoak")?;
    let netns = lab.netns("load")?;
    netns.nft(
        "table inet kasoak {\n set dead { type inet_service; }\n\
          chain out { type filter hook output priority 0; tcp dport @dead drop; tcp sport @dead drop; }\n}\n",
    )?;
    let mut guard = Guard { child: None };
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    guard.child = Some(
        Command::new(&binary)
            .args(["run", "--listen", &addr.to_string(), "--log", "warn"])
            .stdout(Stdio::null())
            .spawn()?,
    );
    let pid = guard.child.as_ref().map_or(0, Child::id);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ka_lab::http::get_ok(addr, "/readyz").is_none_or(|b| !b.contains("ready")) {
        if Instant::now() > deadline {
            bail!("agent not ready");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let deaths = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(u64::from(minutes) * 60);
    let mut samples: Vec<(u64, u64, u64)> = Vec::new();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        // Churn: short connections, a few hundred a second.
        scope.spawn(|| {
            netns.run_in(|| {
                let Ok(listener) = TcpListener::bind("127.0.0.1:7300") else {
                    return;
                };
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..30 {
                        if let Ok(stream) = TcpStream::connect("127.0.0.1:7300") {
                            let _ = listener.accept();
                            drop(stream);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        });
        // Resets: connects to a closed port.
        scope.spawn(|| {
            netns.run_in(|| {
                while !stop.load(Ordering::Relaxed) {
                    let _ = TcpStream::connect("127.0.0.1:7399");
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        });
        // Keepalive deaths: a connection whose peer goes silent, every 5 s.
        scope.spawn(|| {
            netns.run_in(|| {
                let mut round = 0u16;
                while !stop.load(Ordering::Relaxed) {
                    let dead_port = 7400 + round % 500;
                    round += 1;
                    let Ok(listener) = TcpListener::bind(("127.0.0.1", dead_port)) else {
                        continue;
                    };
                    let Ok(client) = TcpStream::connect(("127.0.0.1", dead_port)) else {
                        continue;
                    };
                    let accepted = listener.accept();
                    if fast_keepalive().apply(&client).is_err() {
                        continue;
                    }
                    let _ = Command::new("nft")
                        .args([
                            "add",
                            "element",
                            "inet",
                            "kasoak",
                            "dead",
                            &format!("{{ {dead_port} }}"),
                        ])
                        .status();
                    std::thread::sleep(Duration::from_secs(5));
                    deaths.fetch_add(1, Ordering::Relaxed);
                    drop((client, accepted, listener));
                    let _ = Command::new("nft")
                        .args([
                            "delete",
                            "element",
                            "inet",
                            "kasoak",
                            "dead",
                            &format!("{{ {dead_port} }}"),
                        ])
                        .status();
                }
            })
        });
        while Instant::now() < end {
            std::thread::sleep(Duration::from_secs(10));
            let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next()?.parse().ok())
                })
                .unwrap_or(0);
            let text = ka_lab::http::get_ok(addr, "/metrics").unwrap_or_default();
            let tracked = metric(&text, "ka_tracked_connections", &[]);
            let events = metric(&text, "ka_events_total", &[]);
            eprintln!("soak: rss {rss_kib} KiB, tracked {tracked}, events {events}");
            samples.push((rss_kib, tracked, events));
        }
        stop.store(true, Ordering::Relaxed);
        Ok(())
    })?;
    std::thread::sleep(Duration::from_secs(8));
    // The kernel's counters are read once a second while events from the
    // rest of the host keep arriving: wait for a quiet moment to compare.
    let mut text = String::new();
    for _ in 0..15 {
        text = ka_lab::http::get_ok(addr, "/metrics").unwrap_or_default();
        if metric(&text, "ka_kernel_events_total", &[("outcome", "submitted")])
            == metric(&text, "ka_events_total", &[])
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(1100));
    }
    let lost = metric(&text, "ka_events_lost_total", &[]);
    let unreceived = metric(&text, "ka_events_unreceived_total", &[]);
    let submitted = metric(&text, "ka_kernel_events_total", &[("outcome", "submitted")]);
    let received = metric(&text, "ka_events_total", &[]);
    let keepalive_deaths = metric(
        &text,
        "ka_connections_closed_total",
        &[("cause", "keepalive_timeout")],
    );
    let zombies = metric(
        &text,
        "ka_zombies_total",
        &[("kind", "dead_peer_keepalive")],
    );
    let quarter = samples.len() / 4;
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let early = median(
        samples[quarter..2 * quarter.max(1)]
            .iter()
            .map(|s| s.0)
            .collect(),
    );
    let late = median(
        samples[samples.len() - quarter.max(1)..]
            .iter()
            .map(|s| s.0)
            .collect(),
    );
    let max_tracked = samples.iter().map(|s| s.1).max().unwrap_or(0);
    println!("soak: {minutes} min, {} samples", samples.len());
    println!(
        "  agent RSS: {early} KiB early (2nd quarter median) -> {late} KiB late (last quarter median)"
    );
    println!("  tracked connections: at most {max_tracked}");
    println!(
        "  events: {received} received, {submitted} submitted by the kernel programs, {lost} lost, {unreceived} never read"
    );
    println!(
        "  keepalive deaths: {} provoked, {keepalive_deaths} classified keepalive_timeout, {zombies} dead_peer_keepalive zombies",
        deaths.load(Ordering::Relaxed)
    );
    let json = format!(
        "{{\"minutes\":{minutes},\"rss_kib_early\":{early},\"rss_kib_late\":{late},\"max_tracked\":{max_tracked},\
         \"received\":{received},\"submitted\":{submitted},\"lost\":{lost},\"unreceived\":{unreceived},\"keepalive_deaths\":{keepalive_deaths}}}\n"
    );
    let out = cmd::root().join("target/soak");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("results.json"), json)?;
    // Received may run ahead of the once-a-second kernel reading, never behind.
    if received < submitted || lost != 0 || unreceived != 0 {
        bail!(
            "unaccounted events: received {received}, submitted {submitted}, lost {lost}, never read {unreceived}"
        );
    }
    if late > early + early / 10 + 4096 {
        bail!("agent RSS grew from {early} KiB to {late} KiB");
    }
    Ok(())
}
