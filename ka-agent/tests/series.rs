//! Connection series of the real agent with the real `prometheus` crate.
//! Root only: skipped loudly otherwise, failed when CI=true.

#![expect(
    clippy::expect_used,
    reason = "tests fail by panicking, naming what failed"
)]

mod common;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::Stdio,
    time::Duration,
};

use common::{
    Agent,
    lab::{ChildGuard, Netns, SocketOptions},
    pair, require_root,
};

/// A server process named `argv[1]` (its `comm`, which the agent's
/// inventory reads as the owner of its sockets) that accepts one
/// connection on `argv[2]:argv[3]` and closes it when its stdin closes.
/// Bounded by its own alarm.
const NAMED_SERVER_PY: &str = r#"
import ctypes, signal, socket, sys
signal.alarm(60)
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[2], int(sys.argv[3])))
listener.listen(1)
print("ready", flush=True)
conn, _ = listener.accept()
sys.stdin.read()
conn.close()
"#;

/// Starts a [`NAMED_SERVER_PY`] in `netns` and waits until it listens.
fn named_server(netns: &Netns, comm: &str, addr: SocketAddr) -> ChildGuard {
    let mut server = ChildGuard(
        netns
            .command("python3")
            .args(["-c", NAMED_SERVER_PY, comm])
            .args([addr.ip().to_string(), addr.port().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn python3"),
    );
    let stdout = server.0.stdout.take().expect("stdout");
    let mut line = String::new();
    // Bounded by the server's alarm.
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the server's ready line");
    assert_eq!(line.trim(), "ready", "{comm} on {addr} did not start");
    server
}

/// The `prometheus` crate keys a series by a hash of its label values
/// concatenated without a separator: `port="80", comm="1x"` and
/// `port="801", comm="x"` (same namespace and direction) would share one
/// series, the second connection counted under the first's labels. The
/// agent gives the first label set its series and folds the second into
/// `other`, counted in `ka_series_overflow_total`: each connection is
/// counted once, never under another's labels.
#[test]
fn label_sets_that_run_together_never_share_a_series() {
    if !require_root("label_sets_that_run_together_never_share_a_series") {
        return;
    }
    let (client, server) = pair("runtog");
    let netns = server.inode().to_string();
    let one_x = named_server(&server, "1x", "198.18.10.2:80".parse().expect("addr"));
    let x = named_server(&server, "x", "198.18.10.2:801".parse().expect("addr"));
    // Started after the servers took their names: the inventory reads a
    // process's comm when it first sees it.
    let agent = Agent::start(&["--inventory-interval", "1s"]);
    let overflow_before = agent.metrics().count("ka_series_overflow_total", &[]);

    let to_one_x = client
        .connect(
            "198.18.10.2:80".parse().expect("addr"),
            &SocketOptions::default(),
        )
        .expect("connect to 1x");
    let to_x = client
        .connect(
            "198.18.10.2:801".parse().expect("addr"),
            &SocketOptions::default(),
        )
        .expect("connect to x");

    let inbound = [("netns", netns.as_str()), ("direction", "inbound")];
    let with = |port: &'static str, comm: &'static str| {
        let mut filter = inbound.to_vec();
        filter.extend([("port", port), ("comm", comm)]);
        filter
    };
    // Both open, their owners named by an inventory: the gauge keeps the
    // first set in label order (port "80" before "801") and sums the
    // other into `other`.
    let open = agent.wait_metrics(
        Duration::from_secs(20),
        "both connections open with their owners named",
        |m| {
            m.count("ka_connections", &with("80", "1x")) == 1
                && m.count("ka_connections", &with("other", "other")) == 1
        },
    );
    assert!(
        !open.has_series("ka_connections", &with("801", "x")),
        "the second set has a series of its own:\n{}",
        open.text
    );
    assert_eq!(open.count("ka_connections", &inbound), 2, "{}", open.text);

    drop(to_one_x);
    drop(to_x);
    drop(one_x);
    drop(x);
    // Each close counted once: whichever set came first has its series,
    // the other is folded into `other` and counted as an overflow.
    let closed = agent.wait_metrics(Duration::from_secs(20), "both closes counted", |m| {
        m.count("ka_connections_closed_total", &inbound) == 2
    });
    let own = |port, comm| closed.count("ka_connections_closed_total", &with(port, comm));
    let folded = own("other", "other");
    assert_eq!(
        (own("80", "1x") + own("801", "x"), folded),
        (1, 1),
        "one set kept its series, the other folded:\n{}",
        closed.text
    );
    assert!(
        closed.count("ka_series_overflow_total", &[]) > overflow_before,
        "the fold was not counted:\n{}",
        closed.text
    );
}
