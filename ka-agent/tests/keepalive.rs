//! The keepalive scenarios and the zombie classifier, for real: each test
//! builds the situation in network namespaces and checks exact counts
//! against the namespace's own TcpExt counters.

#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests fail by panicking, with the value in the message"
)]

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use common::{
    Agent, Metrics, api_json,
    lab::{Netns, SocketOptions, close_with_reset, delta},
    pair, require_root, wait_api,
};

const FAST_KEEPALIVE: SocketOptions = SocketOptions {
    keepalive: Some((1, 1, 3)),
    user_timeout_ms: None,
};

fn connected(
    client: &Netns,
    server: &Netns,
    addr: &str,
    options: &SocketOptions,
) -> (TcpListener, TcpStream, TcpStream) {
    let addr: SocketAddr = addr.parse().unwrap();
    let listener = server.listen(addr);
    let stream = client.connect(addr, options).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    (listener, stream, accepted)
}

fn timeout_deaths(m: &Metrics, netns: &str) -> i64 {
    [
        "keepalive_timeout",
        "retransmit_timeout",
        "zero_window_timeout",
    ]
    .iter()
    .map(|cause| {
        m.count(
            "ka_connections_closed_total",
            &[("netns", netns), ("cause", cause)],
        )
    })
    .sum()
}

fn dead_peer_keepalive(tag: &str, addr: &str) {
    let (client, server) = pair(tag);
    let agent = Agent::start(&[]);
    let cn = client.inode().to_string();
    let before = client.counters();
    let (_listener, stream, _accepted) = connected(&client, &server, addr, &FAST_KEEPALIVE);
    // Two probes answered, then the peer vanishes.
    std::thread::sleep(Duration::from_millis(2500));
    server.drop_everything();
    // The scrape that saw the close sees the zombie counted with it: a
    // scrape takes each batch of counts whole (it once did not: closed 1,
    // zombies 0 in the 6.12 guest).
    let m = agent.wait_metrics(Duration::from_secs(20), "a keepalive death", |m| {
        m.count(
            "ka_connections_closed_total",
            &[("netns", &cn), ("cause", "keepalive_timeout")],
        ) == 1
    });
    let after = client.counters();
    let probes = delta(&before, &after, "TcpExt.TCPKeepAlive");
    assert!(
        probes >= 5,
        "2 answered + 3 unanswered probes, kernel says {probes}"
    );
    assert_eq!(
        m.count("ka_keepalive_probes_total", &[("netns", &cn)]),
        probes,
        "{}\n{}\n--- log ---\n{}",
        common::losses(&m),
        m.text,
        agent.log()
    );
    assert_eq!(
        timeout_deaths(&m, &cn),
        delta(&before, &after, "TcpExt.TCPAbortOnTimeout")
    );
    assert_eq!(
        m.count(
            "ka_zombies_total",
            &[("netns", &cn), ("kind", "dead_peer_keepalive")]
        ),
        1,
        "{}",
        m.text
    );
    assert_eq!(m.count("ka_zombies_total", &[("netns", &cn)]), 1);
    let closed = wait_api(
        &agent,
        "/api/v1/closed?cause=keepalive_timeout",
        "the dead connection",
        |c| c["netns"].as_u64() == Some(client.inode()),
    );
    assert_eq!(closed["keepalive"]["enabled"], true);
    assert_eq!(closed["keepalive"]["idle_secs"], 1.0);
    assert_eq!(closed["keepalive"]["probes"], 3);
    assert_eq!(closed["keepalive"]["idle_from_socket"], true);
    assert_eq!(closed["zombie"], "dead_peer_keepalive");
    assert_eq!(closed["error"], "Connection timed out");
    let mut stream = stream;
    assert_eq!(
        stream.write(b"x").unwrap_err().raw_os_error(),
        Some(libc::ETIMEDOUT)
    );
}

#[test]
fn dead_peer_with_keepalive_ipv4() {
    if require_root("dead_peer_with_keepalive_ipv4") {
        dead_peer_keepalive("k4", "198.18.10.2:7001");
    }
}

#[test]
fn dead_peer_with_keepalive_ipv6() {
    if require_root("dead_peer_with_keepalive_ipv6") {
        dead_peer_keepalive("k6", "[2001:db8:10::2]:7001");
    }
}

#[test]
fn answered_probes_are_counted_and_nothing_dies() {
    if !require_root("answered_probes_are_counted_and_nothing_dies") {
        return;
    }
    let (client, server) = pair("ka");
    let agent = Agent::start(&[]);
    let cn = client.inode().to_string();
    let before = client.counters();
    let (_listener, stream, _accepted) =
        connected(&client, &server, "198.18.10.2:7002", &FAST_KEEPALIVE);
    let local = stream.local_addr().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(4500));
    let view = wait_api(
        &agent,
        "/api/v1/connections?port=7002",
        "the probing connection",
        |c| c["local"] == local && c["keepalive"]["probes_answered"].as_u64() >= Some(3),
    );
    assert_eq!(view["class"], "ok");
    let m = agent.metrics();
    let probes = delta(&before, &client.counters(), "TcpExt.TCPKeepAlive");
    assert!(probes >= 3, "kernel sent {probes}");
    // A probe may be in flight between the two readings: compare again once
    // the agent has caught up with the kernel's count.
    let m = if m.count("ka_keepalive_probes_total", &[("netns", &cn)]) == probes {
        m
    } else {
        let now = delta(&before, &client.counters(), "TcpExt.TCPKeepAlive");
        agent.wait_metrics(
            Duration::from_secs(3),
            "probes equal to TCPKeepAlive",
            |m| m.count("ka_keepalive_probes_total", &[("netns", &cn)]) >= now,
        )
    };
    assert_eq!(m.count("ka_connections_closed_total", &[("netns", &cn)]), 0);
    assert_eq!(m.count("ka_zombies_total", &[("netns", &cn)]), 0);
    assert_eq!(
        m.count("ka_connections_probing", &[("netns", &cn)]),
        0,
        "every probe was answered"
    );
    drop(stream);
}

#[test]
fn peer_reboot_is_a_reset_not_a_timeout() {
    if !require_root("peer_reboot_is_a_reset_not_a_timeout") {
        return;
    }
    let (client, server) = pair("rb");
    let agent = Agent::start(&[]);
    let (cn, sn) = (client.inode().to_string(), server.inode().to_string());
    let options = SocketOptions {
        keepalive: Some((1, 1, 5)),
        user_timeout_ms: None,
    };
    let (listener, _stream, accepted) = connected(&client, &server, "198.18.10.2:7003", &options);
    // The server "reboots": its socket vanishes without a word reaching the
    // client (the abortive close's RST is dropped), then the host is back.
    server.drop_everything();
    close_with_reset(accepted);
    drop(listener);
    server.nft("delete table inet kalab_drop\n");
    let m = agent.wait_metrics(Duration::from_secs(15), "a reset death", |m| {
        m.count(
            "ka_connections_closed_total",
            &[("netns", &cn), ("cause", "reset_received")],
        ) == 1
    });
    assert_eq!(
        m.count("ka_zombies_total", &[("netns", &cn)]),
        0,
        "{}\n--- log ---\n{}",
        m.text,
        agent.log()
    );
    assert_eq!(timeout_deaths(&m, &cn), 0);
    assert!(
        m.count(
            "ka_resets_sent_total",
            &[("netns", &sn), ("reason", "no_socket")]
        ) >= 1
    );
}

#[test]
fn close_wait_leak_is_counted_once() {
    if !require_root("close_wait_leak_is_counted_once") {
        return;
    }
    let (client, server) = pair("cw");
    let agent = Agent::start(&["--close-wait-threshold", "2s"]);
    let cn = client.inode().to_string();
    let (_listener, stream, accepted) = connected(
        &client,
        &server,
        "198.18.10.2:7004",
        &SocketOptions::default(),
    );
    drop(accepted); // the peer closes; the client application never does
    agent.wait_metrics(Duration::from_secs(10), "a CLOSE_WAIT leak", |m| {
        m.count(
            "ka_zombies_total",
            &[("netns", &cn), ("kind", "close_wait_leak")],
        ) == 1
    });
    std::thread::sleep(Duration::from_secs(2));
    let m = agent.metrics();
    assert_eq!(
        m.count(
            "ka_zombies_total",
            &[("netns", &cn), ("kind", "close_wait_leak")]
        ),
        1
    );
    let leaks = api_json(&agent, "/api/v1/connections?class=zombie");
    assert!(
        leaks["connections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["state"] == "CLOSE_WAIT" && c["netns"].as_u64() == Some(client.inode())),
        "{leaks}"
    );
    drop(stream);
}

#[test]
fn agent_started_late_still_classifies_the_death() {
    if !require_root("agent_started_late_still_classifies_the_death") {
        return;
    }
    let (client, server) = pair("lt");
    let cn = client.inode().to_string();
    let (_listener, _stream, _accepted) =
        connected(&client, &server, "198.18.10.2:7005", &FAST_KEEPALIVE);
    std::thread::sleep(Duration::from_millis(1500));
    let agent = Agent::start(&[]);
    // Probes are being sent while the agent starts: compare from a quiet moment.
    let (probes_before, counted_before) = common::baseline(
        &agent,
        &client,
        "TcpExt.TCPKeepAlive",
        "ka_keepalive_probes_total",
    );
    let before = client.counters();
    server.drop_everything();
    // The scrape that saw the close sees the zombie counted with it: a
    // scrape takes each batch of counts whole (it once did not: closed 1,
    // zombies 0 in the 6.12 guest).
    let m = agent.wait_metrics(Duration::from_secs(20), "a keepalive death", |m| {
        m.count(
            "ka_connections_closed_total",
            &[("netns", &cn), ("cause", "keepalive_timeout")],
        ) == 1
    });
    let after = client.counters();
    assert_eq!(
        m.count(
            "ka_zombies_total",
            &[("netns", &cn), ("kind", "dead_peer_keepalive")]
        ),
        1
    );
    assert_eq!(
        m.count("ka_keepalive_probes_total", &[("netns", &cn)]) - counted_before,
        after["TcpExt.TCPKeepAlive"] - probes_before,
        "probes since the baseline (agent {counted_before}, kernel {probes_before}); {}\n{}",
        common::losses(&m),
        agent.log()
    );
    assert_eq!(
        timeout_deaths(&m, &cn),
        delta(&before, &after, "TcpExt.TCPAbortOnTimeout")
    );
}

#[test]
fn idle_before_close_reveals_the_peers_keepalive_timeout() {
    if !require_root("idle_before_close_reveals_the_peers_keepalive_timeout") {
        return;
    }
    let (client, server) = pair("ib");
    let agent = Agent::start(&[]);
    let cn = client.inode().to_string();
    let (_listener, mut stream, mut accepted) = connected(
        &client,
        &server,
        "198.18.10.2:7006",
        &SocketOptions::default(),
    );
    stream.write_all(b"GET").unwrap();
    let mut buf = [0u8; 3];
    accepted.read_exact(&mut buf).unwrap();
    accepted.write_all(b"200").unwrap();
    stream.read_exact(&mut buf).unwrap();
    // The server keeps the connection 2 s after its response, then closes.
    std::thread::sleep(Duration::from_secs(2));
    drop(accepted);
    std::thread::sleep(Duration::from_millis(200));
    drop(stream);
    let m = agent.wait_metrics(Duration::from_secs(5), "the close", |m| {
        m.count(
            "ka_idle_before_close_seconds_count",
            &[("netns", &cn), ("closer", "peer")],
        ) == 1
    });
    let idle = m.sum(
        "ka_idle_before_close_seconds_sum",
        &[("netns", &cn), ("closer", "peer")],
    );
    assert!(
        (1.9..2.6).contains(&idle),
        "client saw the peer close after {idle} s idle"
    );
}

/// A connection the peer resets before any inventory saw it alive (a
/// young pooled connection, a server restarting): the kernel program names
/// the socket's inode at the close, and the next inventories find the
/// process holding it in every process's descriptors. Counted, with that
/// process's name, until it closes the socket.
#[test]
fn a_connection_reset_before_any_inventory_is_counted_while_its_process_holds_it() {
    if !require_root(
        "a_connection_reset_before_any_inventory_is_counted_while_its_process_holds_it",
    ) {
        return;
    }
    let (client, server) = pair("dy");
    let agent = Agent::start(&["--inventory-interval", "3s"]);
    let cn = client.inode().to_string();
    // Right after an inventory: the next is seconds away, and the
    // connection lives a few milliseconds.
    let inventories = |m: &Metrics| m.count("ka_inventories_total", &[]);
    let before = inventories(&agent.metrics());
    agent.wait_metrics(Duration::from_secs(10), "a fresh inventory", |m| {
        inventories(m) > before
    });
    let (_listener, mut stream, accepted) = connected(
        &client,
        &server,
        "198.18.10.2:8097",
        &SocketOptions {
            keepalive: None,
            user_timeout_ms: None,
        },
    );
    close_with_reset(accepted);
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    let comm = comm.trim_end();
    let held = [
        ("netns", cn.as_str()),
        ("cause", "reset_received"),
        ("comm", comm),
        ("direction", "outbound"),
        ("port", "8097"),
    ];
    agent.wait_metrics_explained(
        Duration::from_secs(20),
        "the reset connection, held",
        |m| m.count("ka_dead_connections_held", &held) == 1,
        || client.sockets(),
    );
    let closed = wait_api(
        &agent,
        "/api/v1/closed?cause=reset_received&held=true",
        "the reset connection, held",
        |c| c["netns"].as_u64() == Some(client.inode()),
    );
    assert_eq!(closed["held_by_pid"], std::process::id(), "{closed}");
    assert_eq!(closed["comm"], comm, "{closed}");
    assert_eq!(
        std::io::Read::read(&mut stream, &mut [0; 1])
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ECONNRESET)
    );
    drop(stream);
    agent.wait_metrics(Duration::from_secs(20), "the socket released", |m| {
        !m.has_series("ka_dead_connections_held", &[("netns", &cn)])
    });
    assert_eq!(agent.stop(), Some(0), "clean exit on SIGTERM");
}

/// A connection the kernel ended while its application still holds the
/// socket (a pool's idle connection): no `ss` lists it any more, and its
/// next use fails. It is counted in `ka_dead_connections_held`, with the
/// process, from the first inventory after the death until the
/// application closes the socket. An inventory must have seen it alive
/// (that names the socket's inode and its process).
#[test]
fn a_dead_connection_its_process_still_holds_is_counted_until_released() {
    if !require_root("a_dead_connection_its_process_still_holds_is_counted_until_released") {
        return;
    }
    let (client, server) = pair("dh");
    let agent = Agent::start(&["--inventory-interval", "1s"]);
    let cn = client.inode().to_string();
    let options = SocketOptions {
        keepalive: Some((3, 1, 2)),
        user_timeout_ms: None,
    };
    let (_listener, mut stream, _accepted) =
        connected(&client, &server, "198.18.10.2:8096", &options);
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    let comm = comm.trim_end();
    wait_api(
        &agent,
        "/api/v1/connections?port=8096",
        "the client's connection with its process",
        |c| c["netns"].as_u64() == Some(client.inode()) && c["comm"] == comm,
    );
    server.drop_everything();
    let held = [
        ("netns", cn.as_str()),
        ("cause", "keepalive_timeout"),
        ("comm", comm),
        ("direction", "outbound"),
        ("port", "8096"),
    ];
    let metrics = agent.wait_metrics_explained(
        Duration::from_secs(20),
        "the dead connection, held",
        |m| m.count("ka_dead_connections_held", &held) == 1,
        || client.sockets(),
    );
    // What `top`'s header names, read from this agent's exposition: every
    // dead connection this process holds, here and in the other tests of
    // this binary running beside it (the agent sees every namespace).
    let by_this_process = metrics.count("ka_dead_connections_held", &[("comm", comm)]);
    assert!(
        ka_agent::top::view::held_by_process(&metrics.text)
            .contains(&(comm.to_owned(), u64::try_from(by_this_process).unwrap())),
        "{}",
        metrics.text
    );
    let closed = wait_api(
        &agent,
        "/api/v1/closed?cause=keepalive_timeout&held=true",
        "the dead connection, held",
        |c| c["netns"].as_u64() == Some(client.inode()),
    );
    assert_eq!(closed["held_by_pid"], std::process::id(), "{closed}");
    // The kernel has let it go: only the descriptor is left.
    assert!(
        !client.sockets().contains("198.18.10.2:8096"),
        "{}",
        client.sockets()
    );
    assert_eq!(
        stream.write(b"x").unwrap_err().raw_os_error(),
        Some(libc::ETIMEDOUT)
    );
    drop(stream);
    agent.wait_metrics(Duration::from_secs(10), "the socket released", |m| {
        !m.has_series("ka_dead_connections_held", &[("netns", &cn)])
    });
    let closed = wait_api(
        &agent,
        "/api/v1/closed?cause=keepalive_timeout",
        "the dead connection, released",
        |c| c["netns"].as_u64() == Some(client.inode()),
    );
    assert!(closed.get("held_by_pid").is_none(), "{closed}");
    let held = api_json(&agent, "/api/v1/closed?held=true");
    assert!(
        !held["connections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["netns"].as_u64() == Some(client.inode())),
        "{held}"
    );
    assert_eq!(agent.stop(), Some(0), "clean exit on SIGTERM");
}
