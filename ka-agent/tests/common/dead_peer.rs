//! A connection whose peer vanishes, and the checks every such death shares.

use std::{collections::HashMap, net::SocketAddr, net::TcpStream, time::Duration};

use super::{
    Agent,
    lab::{Netns, SocketOptions, delta},
    pair, wait_api,
};

/// What a dead-peer scenario leaves for its own checks.
pub struct Death {
    /// The client namespace's counters before the peer died, and after.
    pub before: HashMap<String, i64>,
    pub after: HashMap<String, i64>,
    /// The death in `/api/v1/closed`.
    pub closed: serde_json::Value,
    /// `ka_retransmits_total` of the client's namespace.
    pub retransmits: i64,
    /// The agent that watched it, still running.
    pub agent: Agent,
}

/// A connection from a client with a 3-second user timeout to a peer that
/// `kill` makes vanish (given the agent, both namespaces and the client's
/// stream);
/// checks that it dies of `cause`: exactly one kernel timeout
/// (`TCPAbortOnTimeout`), one `dead_peer_retransmit` zombie, and
/// `ka_retransmits_total` equal to the `RetransSegs` delta (exact: the
/// socket's own counter, read again at the close, makes up any
/// retransmission event the kernel skipped).
pub fn dead_peer(
    tag: &str,
    port: u16,
    cause: &str,
    kill: impl FnOnce(&Agent, &Netns, &Netns, &mut TcpStream),
) -> Death {
    let (client, server) = pair(tag);
    let agent = Agent::start(&[]);
    let cn = client.inode().to_string();
    let addr = SocketAddr::from(([198, 18, 10, 2], port));
    let listener = server.listen(addr);
    let options = SocketOptions {
        keepalive: None,
        user_timeout_ms: Some(3000),
    };
    let mut stream = client.connect(addr, &options).expect("connect");
    let (_accepted, _) = listener.accept().expect("accept");
    let before = client.counters();
    // The views a failure prints run only when a test fails: here, while
    // the connection lives, both must show it.
    let record = wait_api(
        &agent,
        &format!("/api/v1/connections?port={port}"),
        "the client's connection",
        |c| c["netns"].as_u64() == Some(client.inode()),
    );
    let views = death_views(&agent, &client, &before);
    assert!(
        record["local"]
            .as_str()
            .is_some_and(|local| views.matches(local).count() >= 2)
            && views.contains(&format!("198.18.10.2:{port}")),
        "the failure views miss the live connection:\n{views}"
    );
    kill(&agent, &client, &server, &mut stream);
    let m = agent.wait_metrics_explained(
        Duration::from_secs(20),
        cause,
        |m| {
            m.count(
                "ka_connections_closed_total",
                &[("netns", &cn), ("cause", cause)],
            ) == 1
        },
        || death_views(&agent, &client, &before),
    );
    let after = client.counters();
    assert_eq!(delta(&before, &after, "TcpExt.TCPAbortOnTimeout"), 1);
    // Every event the programs submitted so far (the agent sees the whole
    // host's) was read: no gap in their numbers.
    assert_eq!(m.count("ka_events_unreceived_total", &[]), 0, "{}", m.text);
    assert_eq!(
        m.count(
            "ka_zombies_total",
            &[("netns", &cn), ("kind", "dead_peer_retransmit")]
        ),
        1,
        "{}",
        m.text
    );
    let kernel = delta(&before, &after, "Tcp.RetransSegs");
    let retransmits = m.count("ka_retransmits_total", &[("netns", &cn)]);
    assert!(
        retransmits == kernel,
        "ka_retransmits_total {retransmits}, RetransSegs delta {kernel}\n\
         TCPRetransFail {}, TCPTimeouts {}, TCPLossProbes {}\n{}",
        delta(&before, &after, "TcpExt.TCPRetransFail"),
        delta(&before, &after, "TcpExt.TCPTimeouts"),
        delta(&before, &after, "TcpExt.TCPLossProbes"),
        agent
            .log()
            .lines()
            .filter(|l| l.contains("retransmi") || l.contains(&format!(":{port}")))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let closed = wait_api(
        &agent,
        &format!("/api/v1/closed?cause={cause}"),
        "the dead connection",
        |c| c["netns"].as_u64() == Some(client.inode()),
    );
    Death {
        before,
        after,
        closed,
        retransmits,
        agent,
    }
}

/// What the kernel and the agent say of the client's connections, for a
/// death the agent did not report: the kernel's sockets and counters, the
/// agent's records of that namespace (state, last event, retransmissions).
pub fn death_views(agent: &Agent, client: &Netns, before: &HashMap<String, i64>) -> String {
    let inode = client.inode();
    let body = super::api_json(agent, "/api/v1/connections");
    let records: Vec<String> = body["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["netns"].as_u64() == Some(inode))
        .map(ToString::to_string)
        .collect();
    format!(
        "{}\nthe agent's records of the client's namespace:\n{}",
        kernel_view(client, before),
        records.join("\n")
    )
}

/// What the client's kernel says, for a failure message: its sockets and
/// the counters a death moves.
pub fn kernel_view(client: &Netns, before: &HashMap<String, i64>) -> String {
    let after = client.counters();
    // EstabResets and CurrEstab move in tcp_set_state(CLOSE) itself, next
    // to the state tracepoint: they tell a close the kernel made without
    // firing it from one it never made.
    let moved = [
        "Tcp.EstabResets",
        "Tcp.CurrEstab",
        "Tcp.RetransSegs",
        "TcpExt.TCPTimeouts",
        "TcpExt.TCPLossProbes",
        "TcpExt.TCPAbortOnTimeout",
        "TcpExt.TCPKeepAlive",
        "TcpExt.TCPRetransFail",
        "TcpExt.TCPWinProbe",
    ]
    .map(|key| format!("{key} {:+}", delta(before, &after, key)))
    .join(", ");
    format!(
        "client counters: {moved}\nclient sockets:\n{}",
        client.sockets()
    )
}

/// Waits (bounded) until the client namespace's `counter` moved.
pub fn wait_counter(netns: &Netns, before: &HashMap<String, i64>, counter: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while delta(before, &netns.counters(), counter) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{counter} did not move within 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
