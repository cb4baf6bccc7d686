//! No false positives: ordinary HTTP traffic against a real nginx (short
//! connections and kept-alive ones, from curl and wrk) produces only normal
//! closes and no zombies. The one exception is real: when its duration is
//! up, wrk closes its connections with requests in flight, which the kernel
//! does with an RST (unread data): at most one per wrk connection, seen as
//! `reset_sent` by the client and `reset_received` by nginx. Every
//! connection is named after its process, on both sides, though no
//! inventory saw them.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use common::{
    Agent,
    lab::{Nginx, require_program},
    pair, require_root,
};

#[test]
fn ordinary_http_traffic_is_all_normal() {
    const TEST: &str = "ordinary_http_traffic_is_all_normal";
    if !require_root(TEST) {
        return;
    }
    let (Some(nginx), Some(curl), Some(wrk)) = (
        require_program("nginx", TEST),
        require_program("curl", TEST),
        require_program("wrk", TEST),
    ) else {
        return;
    };
    let (client, server) = pair("ht");
    let (cn, sn) = (client.inode().to_string(), server.inode().to_string());
    let _nginx = Nginx::start(&server, &nginx, "198.18.10.2:8088", 1);
    // Started after nginx listens: its first inventory (before it is
    // ready) names nginx's listener, and with it every connection nginx
    // accepts until the next inventory, 30 s away.
    let agent = Agent::start(&[]);
    let url = "http://198.18.10.2:8088/";
    // 30 short connections.
    for _ in 0..30 {
        let status = client
            .command(&curl.display().to_string())
            .args(["-sf", "-o", "/dev/null", "-H", "Connection: close", url])
            .status()
            .expect("curl");
        assert!(status.success());
    }
    // 5 kept-alive connections of 10 requests each, left for nginx's
    // keep-alive timeout to close.
    for _ in 0..5 {
        let status = client
            .command(&curl.display().to_string())
            .args(["-sf", "-o", "/dev/null"])
            .args(std::iter::repeat_n(url, 10))
            .status()
            .expect("curl");
        assert!(status.success());
    }
    // wrk with keep-alive, bounded: 4 connections for 2 seconds.
    let output = client
        .command(&wrk.display().to_string())
        .args(["-t1", "-c4", "-d2s", url])
        .output()
        .expect("wrk");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // One request from a thread of this test, whose name (the test's) is
    // not its process's: named after the process, as an inventory would.
    let thread = client.run_in(|| {
        let mut stream = TcpStream::connect("198.18.10.2:8088").expect("connect");
        stream
            .write_all(b"GET / HTTP/1.0\r\n\r\n")
            .expect("request");
        stream.read_to_end(&mut Vec::new()).expect("answer");
        std::fs::read_to_string("/proc/thread-self/comm").expect("thread name")
    });
    let process = std::fs::read_to_string("/proc/self/comm").expect("process name");
    let names = (process.trim_end(), thread.trim_end());
    assert_ne!(names.0, names.1, "the test needs a thread named apart");
    std::thread::sleep(Duration::from_secs(2)); // nginx's keep-alive timeout
    let m = agent.wait_metrics(Duration::from_secs(10), "every connection closed", |m| {
        m.count("ka_connections_closed_total", &[("netns", &cn)]) >= 40
            && m.count("ka_connections_opened_total", &[("netns", &cn)])
                == m.count("ka_connections_closed_total", &[("netns", &cn)])
    });
    for (netns, direction, abort) in [
        (&cn, "outbound", "reset_sent"),
        (&sn, "inbound", "reset_received"),
    ] {
        let side = [("netns", netns.as_str()), ("direction", direction)];
        let closed = m.count("ka_connections_closed_total", &side);
        let normal = m.count(
            "ka_connections_closed_total",
            &[side[0], side[1], ("cause", "normal")],
        );
        let aborted = m.count(
            "ka_connections_closed_total",
            &[side[0], side[1], ("cause", abort)],
        );
        assert!(
            aborted <= 4,
            "at most one abortive close per wrk connection:\n{}",
            m.text
        );
        assert_eq!(
            normal + aborted,
            closed,
            "only normal closes in {netns}:\n{}",
            m.text
        );
        assert_eq!(m.count("ka_zombies_total", &[("netns", netns)]), 0);
    }
    assert!(
        m.count(
            "ka_idle_before_close_seconds_count",
            &[("netns", &sn), ("closer", "local")]
        ) >= 5
    );
    every_connection_is_named(&m, &cn, &sn, names);
}

/// Every connection carries its process's name, on both sides, though no
/// inventory saw any of them (the next is 30 s away).
fn every_connection_is_named(
    m: &common::Metrics,
    cn: &str,
    sn: &str,
    (process, thread): (&str, &str),
) {
    // Every accepted connection carries nginx's name, also the 30 that
    // lived a few milliseconds.
    let inbound = [("netns", sn), ("direction", "inbound")];
    assert_eq!(
        m.count(
            "ka_connections_closed_total",
            &[inbound[0], inbound[1], ("comm", "nginx")]
        ),
        m.count("ka_connections_closed_total", &inbound),
        "{}",
        m.text
    );
    // And every outbound one its client's, which the kernel program
    // recorded at connect(): no inventory saw any of them.
    let outbound = [("netns", cn), ("direction", "outbound")];
    let by = |comm| {
        m.count(
            "ka_connections_closed_total",
            &[outbound[0], outbound[1], ("comm", comm)],
        )
    };
    assert_eq!(by("curl"), 35, "{}", m.text);
    assert_eq!((by(process), by(thread)), (1, 0), "{}", m.text);
    assert_eq!(
        by("curl") + by("wrk") + by(process),
        m.count("ka_connections_closed_total", &outbound),
        "{}",
        m.text
    );
    assert!(
        m.text.contains("\nka_kernel_connectors_unknown_total "),
        "{}",
        m.text
    );
}
