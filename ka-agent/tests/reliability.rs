//! Reliability: restarts, clean exits, overload, least privilege. Each test
//! provokes the fault for real.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "helpers of tests fail by panicking, with the value in the message"
)]

mod common;

use std::{net::SocketAddr, process::Command, time::Duration};

use common::{
    Agent, http_get,
    lab::{Netns, SocketOptions, close_with_reset},
    pair, require_root,
};

/// Ids of the BPF objects (`prog`, `map` or `link`) a process holds, from
/// the fdinfo of its file descriptors.
fn bpf_objects(kind: &str, pid: u32) -> Vec<u64> {
    let key = format!("{kind}_id:");
    let mut ids = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for fd in fds.flatten() {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        ids.extend(
            info.lines()
                .filter_map(|l| l.strip_prefix(&key))
                .filter_map(|v| v.trim().parse::<u64>().ok()),
        );
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The tests of this file provoke host-wide faults (storms, kills) and
/// count host-wide events: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Every id of that kind the kernel knows: after an exit, none of the
/// agent's ids may remain.
fn all_ids(kind: &str) -> Vec<u64> {
    if common::lab::require_program("bpftool", "all_ids").is_none() {
        return Vec::new();
    }
    let output = Command::new("bpftool")
        .args([kind, "show", "--json"])
        .output()
        .expect("bpftool");
    let list: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    list.as_array()
        .map(|objects| objects.iter().filter_map(|o| o["id"].as_u64()).collect())
        .unwrap_or_default()
}

/// The ids of `ids` the kernel still knows, once they are all gone or 10 s
/// passed. The kernel frees a closed program, map or link after an RCU
/// grace period, from a work queue: a busy machine takes longer than a
/// fixed wait would allow, a leak never ends.
fn left_behind(kind: &str, ids: &[u64]) -> Vec<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let remaining = all_ids(kind);
        let leaked: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| remaining.contains(id))
            .collect();
        if leaked.is_empty() || std::time::Instant::now() > deadline {
            return leaked;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sigterm_detaches_everything_and_exits_0() {
    if !require_root("sigterm_detaches_everything_and_exits_0") {
        return;
    }
    let _serial = serial();
    let agent = Agent::start(&[]);
    let pid = agent.pid();
    let addr = agent.addr;
    let programs = bpf_objects("prog", pid);
    let maps = bpf_objects("map", pid);
    let links = bpf_objects("link", pid);
    assert!(
        programs.len() >= 8,
        "at least the 8 tracepoint programs: {programs:?}"
    );
    assert!(!maps.is_empty());
    assert_eq!(agent.stop(), Some(0));
    for (kind, ids) in [("prog", programs), ("map", maps), ("link", links)] {
        let leaked = left_behind(kind, &ids);
        assert!(
            leaked.is_empty(),
            "{kind} left behind after exit: {leaked:?}"
        );
    }
    assert!(
        http_get(addr, "/metrics").is_none(),
        "/metrics still answers"
    );
}

#[test]
fn sigkill_leaves_nothing_and_a_new_agent_takes_over() {
    if !require_root("sigkill_leaves_nothing_and_a_new_agent_takes_over")
        || common::lab::require_program(
            "bpftool",
            "sigkill_leaves_nothing_and_a_new_agent_takes_over",
        )
        .is_none()
    {
        return;
    }
    let _serial = serial();
    let (client, server) = pair("rk");
    let cn = client.inode().to_string();
    let addr: SocketAddr = "198.18.10.2:7201".parse().unwrap();
    let listener = server.listen(addr);
    let options = SocketOptions {
        keepalive: Some((1, 1, 3)),
        user_timeout_ms: None,
    };
    let _stream = client.connect(addr, &options).unwrap();
    let _accepted = listener.accept().unwrap();
    let first = Agent::start(&[]);
    std::thread::sleep(Duration::from_millis(1500)); // probing
    let programs = bpf_objects("prog", first.pid());
    assert!(!programs.is_empty());
    first.kill_hard();
    let leaked = left_behind("prog", &programs);
    assert!(
        leaked.is_empty(),
        "programs of a killed agent remain: {leaked:?}"
    );

    let second = Agent::start(&[]);
    // Probes are being sent while the agent starts: compare from a quiet moment.
    let (probes_before, counted_before) = common::baseline(
        &second,
        &client,
        "TcpExt.TCPKeepAlive",
        "ka_keepalive_probes_total",
    );
    let counters_before = client.counters();
    server.drop_everything();
    let m = second.wait_metrics_explained(
        Duration::from_secs(20),
        "the death, classified by the new agent",
        |m| {
            m.count(
                "ka_connections_closed_total",
                &[("netns", &cn), ("cause", "keepalive_timeout")],
            ) == 1
        },
        || common::dead_peer::death_views(&second, &client, &counters_before),
    );
    assert_eq!(
        m.count(
            "ka_zombies_total",
            &[("netns", &cn), ("kind", "dead_peer_keepalive")]
        ),
        1
    );
    assert_eq!(
        m.count("ka_keepalive_probes_total", &[("netns", &cn)]) - counted_before,
        client.counters()["TcpExt.TCPKeepAlive"] - probes_before,
        "probes since the baseline (agent {counted_before}, kernel {probes_before}); {}",
        common::losses(&m)
    );
}

/// Opens and closes `count` connections inside `ns` as fast as it can.
fn storm(ns: &Netns, addr: SocketAddr, count: usize) {
    ns.run_in(|| {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        for _ in 0..count {
            let stream = std::net::TcpStream::connect(addr).unwrap();
            let (accepted, _) = listener.accept().unwrap();
            drop(stream);
            drop(accepted);
        }
    });
}

#[test]
fn overload_is_counted_never_silent() {
    if !require_root("overload_is_counted_never_silent") {
        return;
    }
    let _serial = serial();
    // A ring buffer of one page: 32 events.
    let agent = Agent::start(&["--ring-buffer-bytes", "4096"]);
    let ns = Netns::new("ov");
    // The fill gauge is the high-water mark of each second: the first
    // reading after the storm began shows it near full, and stays for a
    // second, so scraping until a second after the storm catches it.
    let fill = std::thread::scope(|scope| {
        let storming = scope.spawn(|| storm(&ns, "127.0.0.1:7202".parse().unwrap(), 2000));
        let mut highest = 0.0f64;
        let mut after = None;
        while after
            .is_none_or(|done: std::time::Instant| done.elapsed() < Duration::from_millis(1500))
        {
            highest = highest.max(agent.metrics().sum("ka_ring_buffer_fill_ratio", &[]));
            if after.is_none() && storming.is_finished() {
                after = Some(std::time::Instant::now());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        highest
    });
    assert!(fill > 0.5 && fill <= 1.0, "ring fill high-water {fill}");
    // Quiet now: wait for the agent to have read everything that was
    // submitted (kernel counters are read once a second).
    // submitted (read once a second) and received (live) must meet at some
    // scrape; other tests' connections on the host keep both moving.
    let kinds = ["state_change", "destroy_sock"];
    let m = agent.wait_metrics(Duration::from_secs(30), "received == submitted", |m| {
        m.count("ka_events_lost_total", &[]) > 0
            && kinds.iter().all(|kind| {
                m.count(
                    "ka_kernel_events_total",
                    &[("type", kind), ("outcome", "submitted")],
                ) == m.count("ka_events_total", &[("type", kind)])
            })
    });
    let lost = m.count("ka_events_lost_total", &[]);
    assert!(
        lost > 0,
        "a one-page ring buffer must overflow under a storm\n{}",
        m.text
    );
    assert_eq!(
        lost,
        m.count("ka_kernel_events_total", &[("outcome", "lost")])
    );
    // A full ring refuses a reservation before the event is numbered: a
    // loss, not a gap in the numbers.
    assert_eq!(m.count("ka_events_unreceived_total", &[]), 0, "{}", m.text);
    // Every event the programs produced was either received or counted lost.
    for kind in kinds {
        let submitted = m.count(
            "ka_kernel_events_total",
            &[("type", kind), ("outcome", "submitted")],
        );
        let received = m.count("ka_events_total", &[("type", kind)]);
        assert_eq!(
            submitted, received,
            "{kind}: submitted {submitted}, received {received}"
        );
    }
    assert_eq!(http_get(agent.addr, "/healthz").map(|r| r.0), Some(200));
}

/// An event the programs submitted and the agent never read is counted
/// (`ka_events_unreceived_total`) and followed by an inventory, like a
/// lost one. Nothing real loses one (that is what the count watches for),
/// so the test makes the gap itself: it raises the agent's in-kernel count
/// of submitted error reports on every CPU, which numbers the next one, as
/// if one had been submitted there and lost on the way; then it provokes a
/// real one (a refused connection on loopback).
#[test]
fn an_event_submitted_and_never_read_is_counted() {
    if !require_root("an_event_submitted_and_never_read_is_counted") {
        return;
    }
    let _serial = serial();
    let agent = Agent::start(&["--inventory-interval", "300s"]);
    let early =
        |m: &common::Metrics| m.count("ka_inventories_total", &[("trigger", "events_lost")]);
    let before = agent.metrics();
    assert_eq!(
        before.count("ka_events_unreceived_total", &[]),
        0,
        "{}",
        before.text
    );
    assert!(
        before.has_series("ka_events_unreceived_total", &[("type", "error_report")]),
        "the series exists at 0 before any gap\n{}",
        before.text
    );
    let slot = ka_common::Stat::submitted(ka_common::EventKind::ErrorReport);
    let stats = bpf_objects("map", agent.pid())
        .into_iter()
        .filter_map(|id| aya::maps::MapData::from_id(u32::try_from(id).ok()?).ok())
        .find(|map| {
            map.info()
                .is_ok_and(|info| info.name_as_str() == Some("STATS"))
        })
        .expect("the agent's STATS map");
    let mut stats: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(stats)).unwrap();
    // Another test's error report between the read and the write would be
    // uncounted, never a gap: the write only raises.
    let raised: Vec<u64> = stats.get(&slot, 0).unwrap().iter().map(|n| n + 1).collect();
    stats
        .set(slot, aya::maps::PerCpuValues::try_from(raised).unwrap(), 0)
        .unwrap();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let refused = std::net::TcpStream::connect(closed).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let m = agent.wait_metrics(
        Duration::from_secs(20),
        "the gap counted and an inventory asked for",
        |m| {
            m.count("ka_events_unreceived_total", &[("type", "error_report")]) >= 1
                && early(m) > early(&before)
        },
    );
    // The raised count made no gap in the numbers of any other kind.
    assert_eq!(
        m.count("ka_events_unreceived_total", &[]),
        m.count("ka_events_unreceived_total", &[("type", "error_report")]),
        "{}",
        m.text
    );
    assert!(
        agent
            .log()
            .contains("events submitted by the kernel programs were never read"),
        "{}",
        agent.log()
    );
}

/// Opens `count` connections inside `ns` and holds both ends of each.
fn hold(
    ns: &Netns,
    addr: SocketAddr,
    count: usize,
) -> Vec<(std::net::TcpStream, std::net::TcpStream)> {
    ns.run_in(|| {
        let listener = std::net::TcpListener::bind(addr).unwrap();
        (0..count)
            .map(|_| {
                let stream = std::net::TcpStream::connect(addr).unwrap();
                let (accepted, _) = listener.accept().unwrap();
                (stream, accepted)
            })
            .collect()
    })
}

/// Connections `lost_events_are_made_good_by_an_early_inventory` holds.
const HELD: usize = 300;

#[test]
fn lost_events_are_made_good_by_an_early_inventory() {
    if !require_root("lost_events_are_made_good_by_an_early_inventory") {
        return;
    }
    let _serial = serial();
    // A one-page ring, and no periodic inventory within the test: only
    // the inventory the agent asks for when it sees a loss can make good
    // what the overflow swallowed.
    let agent = Agent::start(&[
        "--ring-buffer-bytes",
        "4096",
        "--inventory-interval",
        "300s",
    ]);
    let ns = Netns::new("mg");
    let netns = ns.inode().to_string();
    // Closes lost: churned connections whose opening arrived but whose
    // close did not stay tracked until an inventory finds them gone.
    storm(&ns, "127.0.0.1:7205".parse().unwrap(), 2000);
    agent.wait_metrics(
        Duration::from_secs(20),
        "a loss, and none of the storm's connections left in the table",
        |m| {
            m.count("ka_events_lost_total", &[]) > 0
                && !m.has_series("ka_connections", &[("netns", &netns)])
        },
    );
    // Openings lost: held connections the agent never heard of until an
    // inventory finds them.
    let held = hold(&ns, "127.0.0.1:7204".parse().unwrap(), HELD);
    let both_ends = i64::try_from(2 * HELD).unwrap();
    let m = agent.wait_metrics(
        Duration::from_secs(30),
        "the namespace's table to be exactly its held connections",
        |m| {
            m.count("ka_events_lost_total", &[]) > 0
                && m.count("ka_connections", &[("netns", &netns)]) == both_ends
        },
    );
    assert_eq!(
        m.count(
            "ka_connections",
            &[("netns", &netns), ("state", "ESTABLISHED")]
        ),
        both_ends,
        "{}",
        m.text
    );
    // How many openings reached the agent as events (the rest came from
    // the inventory), for the record.
    let opened = m.count(
        "ka_connections_opened_total",
        &[("netns", &netns), ("port", "7204")],
    );
    eprintln!("held connections' openings received as events: {opened} of {both_ends}");
    // The inventories say so themselves: taken because of the losses, and
    // at least the held connections whose opening was lost were adopted.
    assert!(
        m.count("ka_inventories_total", &[("trigger", "events_lost")]) >= 1,
        "{}",
        m.text
    );
    assert!(
        m.count("ka_inventory_connections_total", &[("outcome", "adopted")]) >= both_ends - opened,
        "{}",
        m.text
    );
    assert_eq!(m.count("ka_inventory_failures_total", &[]), 0);
    // This test's namespace and the host's at least.
    assert!(m.count("ka_inventory_namespaces", &[]) >= 2, "{}", m.text);
    drop(held);
}

/// Holds a process stopped (SIGSTOP) and lets it go on when dropped, also
/// when the test fails.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        let pid_t = libc::pid_t::try_from(pid).unwrap();
        // SAFETY: kill(2) on a child process of this test.
        assert_eq!(unsafe { libc::kill(pid_t, libc::SIGSTOP) }, 0);
        // kill(2) returns before every thread has stopped: the ring's
        // reader could still drain what the test means it to lose.
        let all_stopped = || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .all(|task| matches!(run_state(&task.path()), Some('T' | 't')))
        };
        let stopped = Self(pid);
        assert!(
            ka_lab::wait_until(
                Duration::from_secs(10),
                Duration::from_millis(5),
                all_stopped
            ),
            "the agent (pid {pid}) did not stop"
        );
        stopped
    }
}

/// The run state letter of a process or thread directory in /proc (`R`,
/// `S`, `T`, `Z`...): it follows the parenthesised name in `stat`.
fn run_state(dir: &std::path::Path) -> Option<char> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0) {
            // SAFETY: kill(2) on a child process of this test.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

/// A namespace deleted while its connections' closes were lost (a pod
/// deleted during a burst): no dump of it can ever find them gone. The
/// agent is stopped while they close, so its one-page ring overflows for
/// sure; once it runs again, the inventories that no longer find the
/// namespace close what is left of it.
#[test]
fn the_connections_of_a_namespace_deleted_unseen_are_closed() {
    if !require_root("the_connections_of_a_namespace_deleted_unseen_are_closed") {
        return;
    }
    let _serial = serial();
    let agent = Agent::start(&["--ring-buffer-bytes", "4096", "--inventory-interval", "2s"]);
    let lost = |m: &common::Metrics| m.count("ka_events_lost_total", &[]);
    let vanished =
        |m: &common::Metrics| m.count("ka_inventory_connections_total", &[("outcome", "vanished")]);
    // On a loaded host loopback's softirq work can wait for ksoftirqd
    // until after the agent runs again: then every close arrives, nothing
    // is lost, and there is nothing for this test to prove (seen twice in
    // CI). Such an attempt is made again, with a namespace of its own.
    let attempts = 3;
    let (netns, before) = (1..=attempts)
        .find_map(|attempt| {
            let (netns, before) = lose_the_closes_of_a_deleted_namespace(&agent, attempt);
            let after = agent.wait_metrics(
                Duration::from_secs(30),
                "the loss counted, or every close received",
                |m| {
                    lost(m) > lost(&before) || !m.has_series("ka_connections", &[("netns", &netns)])
                },
            );
            if lost(&after) > lost(&before) {
                return Some((netns, before));
            }
            eprintln!("attempt {attempt}: every close reached the agent, none lost; again");
            None
        })
        .unwrap_or_else(|| panic!("no close was lost in {attempts} attempts\n{}", agent.log()));
    // The log until then, not /metrics: each scrape is a new TCP socket,
    // which can take the kernel address of one of the closed sockets and
    // close its record first, as a reused address (the likely cause of a
    // failure under load, where no record was found gone).
    let gone = "network namespaces gone: their remaining connections closed";
    agent.wait_log(Duration::from_secs(30), gone);
    let m = agent.wait_metrics_explained(
        Duration::from_secs(30),
        "no record of the deleted namespace left",
        |m| lost(m) > lost(&before) && !m.has_series("ka_connections", &[("netns", &netns)]),
        || {
            // Whether anything on the host still leads to that namespace.
            let holders: Vec<String> = std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter(|p| {
                    std::fs::metadata(p.path().join("ns/net"))
                        .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m).to_string() == netns)
                })
                .map(|p| p.file_name().to_string_lossy().into_owned())
                .collect();
            format!("processes in namespace {netns}: {holders:?}")
        },
    );
    // Closed unseen: found gone, not received.
    assert!(vanished(&m) > vanished(&before), "{}", m.text);
}

/// Holds 40 connection pairs in a new namespace, closes them while the
/// agent is stopped (so its one-page ring overflows), and deletes the
/// namespace; returns its inode and the metrics from before the closes.
fn lose_the_closes_of_a_deleted_namespace(
    agent: &Agent,
    attempt: usize,
) -> (String, common::Metrics) {
    let ns = Netns::new(&format!("gn{attempt}"));
    let netns = ns.inode().to_string();
    let pairs: usize = 40;
    let held = hold(&ns, "127.0.0.1:7206".parse().unwrap(), pairs);
    let both_ends = i64::try_from(2 * pairs).unwrap();
    let before = agent.wait_metrics(
        Duration::from_secs(20),
        "the held connections tracked",
        |m| m.count("ka_connections", &[("netns", &netns)]) == both_ends,
    );
    let _stopped = Stopped::new(agent.pid());
    // Four events or more per pair into a ring of 32 nobody reads.
    drop(held);
    let closed = || {
        // `ss -e` continues a socket's line on an indented one.
        ns.sockets()
            .lines()
            .skip(1)
            .filter(|line| !line.starts_with(char::is_whitespace))
            .all(|line| line.starts_with("TIME-WAIT"))
    };
    assert!(
        ka_lab::wait_until(Duration::from_secs(10), Duration::from_millis(20), closed),
        "{}",
        ns.sockets()
    );
    drop(ns);
    (netns, before)
}

#[test]
fn a_full_connection_table_evicts_and_counts() {
    if !require_root("a_full_connection_table_evicts_and_counts") {
        return;
    }
    let _serial = serial();
    let agent = Agent::start(&["--max-connections", "50"]);
    let ns = Netns::new("ev");
    let addr: SocketAddr = "127.0.0.1:7203".parse().unwrap();
    let listener = ns.listen(addr);
    let mut open = Vec::new();
    for _ in 0..100 {
        let stream = ns.connect(addr, &SocketOptions::default()).unwrap();
        let accepted = listener.accept().unwrap();
        open.push((stream, accepted));
    }
    let m = agent.wait_metrics(Duration::from_secs(5), "evictions", |m| {
        m.count("ka_connection_evictions_total", &[]) > 0
    });
    assert!(m.count("ka_tracked_connections", &[]) <= 50);
    assert_eq!(http_get(agent.addr, "/healthz").map(|r| r.0), Some(200));
    // What the agent costs, said by itself: the default 4 MiB ring is in
    // its kernel map memory, its own memory is the process's.
    assert!(m.count("ka_kernel_map_bytes", &[]) >= 4 << 20, "{}", m.text);
    assert!(
        m.sum("process_resident_memory_bytes", &[]) > 0.0,
        "{}",
        m.text
    );
    assert!(m.count("process_open_fds", &[]) > 0, "{}", m.text);
    // Closing them all abortively: a socket evicted before its close is
    // one the agent first sees at its CLOSE transition (no FIN before it),
    // whose snapshot the kernel takes after releasing the local port. Its
    // close still carries the port (every connection here is to or from
    // 7203).
    let netns = ns.inode().to_string();
    for (stream, (accepted, _)) in open {
        close_with_reset(accepted);
        drop(stream);
    }
    let m = agent.wait_metrics(Duration::from_secs(20), "every connection closed", |m| {
        m.count("ka_connections_closed_total", &[("netns", &netns)]) == 200
    });
    assert_eq!(
        m.count(
            "ka_connections_closed_total",
            &[("netns", &netns), ("port", "7203")]
        ),
        200,
        "{}",
        m.text
    );
}

/// A running process's soft `RLIMIT_NOFILE`, lowered from outside with
/// prlimit(1) and put back on drop (also when the test fails).
struct LoweredFileLimit {
    pid: u32,
    soft: String,
    hard: String,
}

impl LoweredFileLimit {
    fn to(pid: u32, soft: u32) -> Self {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        // "Max open files            1024                 524288               files"
        let values: Vec<&str> = limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .expect("a file limit")
            .split_whitespace()
            .collect();
        let limit = Self {
            pid,
            soft: values[0].to_owned(),
            hard: values[1].to_owned(),
        };
        limit.set(&format!("{soft}:"));
        limit
    }

    fn set(&self, nofile: &str) {
        let status = Command::new("prlimit")
            .args([
                "--pid",
                &self.pid.to_string(),
                &format!("--nofile={nofile}"),
            ])
            .status()
            .expect("prlimit (util-linux)");
        assert!(status.success(), "prlimit --nofile={nofile}");
    }
}

impl Drop for LoweredFileLimit {
    fn drop(&mut self) {
        self.set(&format!("{}:{}", self.soft, self.hard));
    }
}

#[test]
fn an_inventory_that_fails_is_counted_and_the_next_one_recovers() {
    if !require_root("an_inventory_that_fails_is_counted_and_the_next_one_recovers") {
        return;
    }
    let _serial = serial();
    let agent = Agent::start(&["--inventory-interval", "1s"]);
    agent.wait_metrics(Duration::from_secs(20), "the first inventory", |m| {
        m.count("ka_inventories_total", &[("trigger", "start")]) == 1
    });
    {
        // Descriptors 0-2 are open, so the agent can open no new one: not
        // /proc, not a namespace, not a sock_diag socket. What it holds
        // (the ring buffer, its listener) stays usable.
        let _limit = LoweredFileLimit::to(agent.pid(), 3);
        std::thread::sleep(Duration::from_millis(3500));
    }
    let restored = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let m = agent.wait_metrics(
        Duration::from_secs(20),
        "the failed inventories counted, then one reconciled after the limit was restored",
        |m| {
            m.count("ka_inventory_failures_total", &[]) >= 2
                && m.sum("ka_inventory_last_success_timestamp_seconds", &[]) >= restored
        },
    );
    let log = agent.log();
    assert!(
        log.contains("inventory failed") && log.contains("Too many open files"),
        "{log}"
    );
    // A failure is not mistaken for a host without namespaces.
    assert!(!log.contains("limited to the agent's own"), "{log}");
    assert!(m.count("ka_inventory_namespaces", &[]) >= 1, "{}", m.text);
    assert_eq!(http_get(agent.addr, "/readyz").map(|r| r.0), Some(200));
    assert_eq!(agent.stop(), Some(0));
}

/// The capabilities the `DaemonSet` and the systemd unit grant (docs/security.md).
const CAPABILITIES: [&str; 6] = [
    "bpf",
    "perfmon",
    "syslog",
    "sys_admin",
    "sys_ptrace",
    "dac_read_search",
];

/// The setpriv(1) command and arguments that run what follows with only
/// `caps` (as root: the bounding set becomes the permitted set).
fn with_capabilities<'a>(caps: impl IntoIterator<Item = &'a str>) -> [String; 3] {
    let bounding = std::iter::once("-all".to_owned())
        .chain(caps.into_iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    [
        "setpriv".to_owned(),
        format!("--bounding-set={bounding}"),
        format!("--inh-caps={bounding}"),
    ]
}

/// `ka-agent <command>` with only `caps`.
fn agent_command_with_capabilities<'a>(
    caps: impl IntoIterator<Item = &'a str>,
    command: &str,
) -> std::process::Output {
    let [setpriv, bounding, inheritable] = with_capabilities(caps);
    Command::new(setpriv)
        .args([bounding, inheritable])
        .arg(env!("CARGO_BIN_EXE_ka-agent"))
        .arg(command)
        .output()
        .expect("setpriv")
}

fn check_with_capabilities(caps: &[&str]) -> std::process::Output {
    agent_command_with_capabilities(caps.iter().copied(), "check")
}

#[test]
fn least_privilege_is_enough_and_less_is_not() {
    if !require_root("least_privilege_is_enough_and_less_is_not") {
        return;
    }
    let _serial = serial();
    let output = check_with_capabilities(&CAPABILITIES);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.lines().filter(|l| l.contains(" attached ")).count() >= 8,
        "{text}"
    );
    // Without CAP_SYSLOG the kernel hides symbol addresses: the keepalive
    // hooks degrade, clearly, and the rest still runs.
    let without_syslog: Vec<&str> = CAPABILITIES
        .iter()
        .copied()
        .filter(|c| *c != "syslog")
        .collect();
    let output = check_with_capabilities(&without_syslog);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("kptr_restrict") || text.contains("tcp_keepalive_timer"),
        "{text}"
    );
    // Without the BPF capabilities (CAP_SYS_ADMIN implies them) it cannot run.
    let output = check_with_capabilities(&["syslog", "sys_ptrace", "dac_read_search"]);
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("needs root") && text.lines().count() == 1,
        "{text}"
    );
}

#[test]
fn without_cap_sys_admin_the_inventory_says_it_covers_its_own_namespace_only() {
    if !require_root("without_cap_sys_admin_the_inventory_says_it_covers_its_own_namespace_only") {
        return;
    }
    let _serial = serial();
    // Another namespace with a connection in it, which only setns reaches.
    let ns = Netns::new("on");
    let addr: SocketAddr = "127.0.0.1:7206".parse().unwrap();
    let listener = ns.listen(addr);
    let _held = (
        ns.connect(addr, &SocketOptions::default()).unwrap(),
        listener.accept().unwrap(),
    );
    let without_sys_admin = || CAPABILITIES.into_iter().filter(|c| *c != "sys_admin");
    let wrapper = with_capabilities(without_sys_admin());
    let agent = Agent::start_via(&wrapper.each_ref().map(String::as_str), &[], &[]);
    let m = agent.metrics();
    assert_eq!(
        m.count("ka_inventory_own_namespace_only", &[]),
        1,
        "{}",
        m.text
    );
    assert_eq!(m.count("ka_inventory_namespaces", &[]), 1, "{}", m.text);
    assert_eq!(m.count("ka_inventory_failures_total", &[]), 0, "{}", m.text);
    let log = agent.log();
    assert!(
        log.contains("inventory limited to the agent's own network namespace")
            && log.contains("CAP_SYS_ADMIN"),
        "{log}"
    );
    assert_eq!(agent.stop(), Some(0));
    // The audit, likewise limited, says so in its report.
    let audit = agent_command_with_capabilities(without_sys_admin(), "audit");
    let report = String::from_utf8_lossy(&audit.stdout);
    assert!(
        report.contains("only this process's own network namespace")
            && report.contains("in 1 network namespaces"),
        "{report}{}",
        String::from_utf8_lossy(&audit.stderr)
    );

    // With it: every namespace, and the gauge says so.
    let agent = Agent::start(&[]);
    let m = agent.metrics();
    assert_eq!(
        m.count("ka_inventory_own_namespace_only", &[]),
        0,
        "{}",
        m.text
    );
    assert!(m.count("ka_inventory_namespaces", &[]) >= 2, "{}", m.text);
}

#[test]
fn an_unparsable_tracefs_format_is_one_clear_error() {
    if !require_root("an_unparsable_tracefs_format_is_one_clear_error") {
        return;
    }
    let _serial = serial();
    let dir = std::env::temp_dir().join(format!("ka-bad-tracefs-{}", std::process::id()));
    let format = dir.join("events/sock/inet_sock_set_state");
    std::fs::create_dir_all(&format).unwrap();
    std::fs::write(
        format.join("format"),
        "name: inet_sock_set_state\nformat:\n\tfield:int; offset:x;\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ka-agent"))
        .args(["check", "--tracefs", dir.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(
        text.contains("cannot parse") && text.trim_end().lines().count() == 1,
        "{text}"
    );
}

/// An MPTCP socket inside `ns`: a listener at `addr`, or a connection to it.
fn mptcp(ns: &Netns, addr: SocketAddr, listen: bool) -> socket2::Socket {
    ns.run_in(|| {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::MPTCP),
        )
        .expect("MPTCP socket (net.mptcp.enabled)");
        if listen {
            socket.bind(&addr.into()).expect("bind");
            socket.listen(8).expect("listen");
        } else {
            socket.connect(&addr.into()).expect("connect");
        }
        socket
    })
}

/// An MPTCP connection's own socket changes state through the same
/// tracepoint as TCP's. Its transitions are not sent, and are counted
/// apart (`ka_kernel_not_tcp_transitions_total`) by both programs: the raw
/// one learns the protocol from the socket, the tracepoint one from the
/// record. Its subflow is TCP and is tracked once on each side.
#[test]
fn transitions_of_sockets_that_are_not_tcp_are_counted_not_sent() {
    if !require_root("transitions_of_sockets_that_are_not_tcp_are_counted_not_sent") {
        return;
    }
    for (tag, env) in [
        ("mpraw", &[][..]),
        ("mptp", &[("KA_NO_RAW_TRACEPOINTS", "1")][..]),
    ] {
        let (client, server) = pair(tag);
        let agent = Agent::start_via(&[], env, &[]);
        let not_tcp = |m: &common::Metrics| m.count("ka_kernel_not_tcp_transitions_total", &[]);
        let before = not_tcp(&agent.metrics());
        let addr: SocketAddr = "198.18.10.2:7310".parse().unwrap();
        let listener = mptcp(&server, addr, true);
        let stream = mptcp(&client, addr, false);
        let (accepted, _) = listener.accept().unwrap();
        drop(stream);
        drop(accepted);
        drop(listener);
        let m = agent.wait_metrics(
            Duration::from_secs(10),
            "the MPTCP sockets' transitions counted apart",
            |m| not_tcp(m) >= before + 2,
        );
        for (ns, direction) in [(&client, "outbound"), (&server, "inbound")] {
            let netns = ns.inode().to_string();
            assert_eq!(
                m.count(
                    "ka_connections_opened_total",
                    &[("netns", &netns), ("direction", direction)]
                ),
                1,
                "{tag}: one TCP subflow, the MPTCP socket not sent\n{}",
                m.text
            );
        }
    }
}

/// An agent in a PID namespace of its own (a container without `hostPID`)
/// reads a `/proc` whose ids are not the kernel's: the kernel program's
/// record of its start-up probe tells it so. It says so, and names
/// outbound connections after the connecting thread, as the kernel
/// recorded it, not after whatever its `/proc` holds under the kernel's
/// id. An agent in the host's namespace finds the ids agree.
#[test]
fn an_agent_in_a_pid_namespace_of_its_own_says_so_and_names_threads() {
    const TEST: &str = "an_agent_in_a_pid_namespace_of_its_own_says_so_and_names_threads";
    const WARNING: &str = "the agent runs in a PID namespace of its own";
    if !require_root(TEST) || common::lab::require_program("unshare", TEST).is_none() {
        return;
    }
    // `--kill-child`: `unshare` ignores SIGTERM, and takes the agent (the
    // namespace's first process) with it when killed.
    let agent = Agent::start_via(
        &["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
        &[],
        &[],
    );
    agent.wait_log(Duration::from_secs(10), WARNING);
    let m = connect_and_wait_for_the_name(&agent, CONNECTING_THREAD);
    assert_eq!(m.count("ka_own_pid_namespace", &[]), 1, "{}", m.text);
    agent.kill_hard();

    let agent = Agent::start(&[]);
    agent.wait_log(
        Duration::from_secs(10),
        "the kernel's process ids are /proc's",
    );
    assert!(!agent.log().contains(WARNING), "{}", agent.log());
    // The same connect, in the host's namespace: named after the process,
    // read from /proc, not after the thread.
    let process = std::fs::read_to_string("/proc/self/comm").unwrap();
    let m = connect_and_wait_for_the_name(&agent, process.trim_end());
    assert!(
        !m.has_series(
            "ka_connections_opened_total",
            &[("comm", CONNECTING_THREAD)]
        ),
        "{}",
        m.text
    );
    assert_eq!(m.count("ka_own_pid_namespace", &[]), 0, "{}", m.text);
    assert!(m.has("ka_own_pid_namespace"), "{}", m.text);
}

/// An agent whose own connect cannot even send its SYN (here: serving on
/// every address of a namespace without loopback) cannot check its
/// process ids, and says so, once; it runs on all the same.
#[test]
fn an_agent_that_cannot_probe_its_own_process_id_says_so() {
    const TEST: &str = "an_agent_that_cannot_probe_its_own_process_id_says_so";
    if !require_root(TEST) {
        return;
    }
    let ns = Netns::new("np");
    // Down is not enough: its local routes stay, and a SYN leaves.
    ns.ip(&["address", "flush", "dev", "lo"]);
    ns.ip(&["link", "set", "lo", "down"]);
    let listen: SocketAddr = "0.0.0.0:9464".parse().unwrap();
    let agent = Agent::spawn_via(&["ip", "netns", "exec", ns.name()], &[], listen, &[]);
    let warning = "the probe of the agent's own process id could not connect";
    agent.wait_log(Duration::from_secs(30), warning);
    let log = agent.log();
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    assert!(log.contains("unreachable"), "{log}");
    assert!(!log.contains("ERROR"), "{log}");
    assert!(log.contains("serving /metrics"), "{log}");
    // Alive: not exited, not even unreaped (state Z).
    let state = run_state(std::path::Path::new(&format!("/proc/{}", agent.pid())));
    assert!(
        state.is_some_and(|state| !matches!(state, 'Z' | 'X')),
        "{state:?}\n{log}"
    );
}

/// The name of the thread [`connect_from_a_named_thread`] connects from.
const CONNECTING_THREAD: &str = "ka-test-conn";

/// Connects from [`CONNECTING_THREAD`] and waits until `agent` counts that
/// one connection opened under the name `comm`.
fn connect_and_wait_for_the_name(agent: &Agent, comm: &str) -> common::Metrics {
    let port = connect_from_a_named_thread().to_string();
    let opened = [
        ("comm", comm),
        ("direction", "outbound"),
        ("port", port.as_str()),
    ];
    agent.wait_metrics(
        Duration::from_secs(10),
        &format!("the test's connection named {comm}"),
        |m| m.count("ka_connections_opened_total", &opened) == 1,
    )
}

/// Connects once to a listener of its own, from a thread of its own name
/// (the test's scrapes connect from other threads); returns the port.
fn connect_from_a_named_thread() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::Builder::new()
        .name(CONNECTING_THREAD.to_owned())
        .spawn(move || drop(std::net::TcpStream::connect(addr).unwrap()))
        .unwrap()
        .join()
        .unwrap();
    drop(listener.accept().unwrap());
    addr.port()
}
