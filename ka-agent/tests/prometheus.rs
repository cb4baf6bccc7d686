//! The exporter as Prometheus sees it: the real Prometheus server scrapes
//! the agent during a lab scenario and PromQL returns what happened;
//! promtool finds nothing to complain about in the exposition.

#![expect(
    clippy::expect_used,
    reason = "helpers of tests fail by panicking, naming what failed"
)]

mod common;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    Agent, http_get,
    lab::{ChildGuard, SocketOptions, require_program},
    pair, require_root,
};

/// A Prometheus server on loopback scraping `target` every second, with its
/// own storage in a temporary directory (removed on drop).
struct Prometheus {
    _child: ChildGuard,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(binary: &std::path::Path, target: SocketAddr) -> Self {
        Self::start_with_rules(binary, target, None)
    }

    /// Also evaluating the alert rules of `rules` every second.
    fn start_with_rules(
        binary: &std::path::Path,
        target: SocketAddr,
        rules: Option<&std::path::Path>,
    ) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let dir = std::env::temp_dir().join(format!("ka-prometheus-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let rule_files = rules.map_or_else(String::new, |path| {
            format!("rule_files:\n  - '{}'\n", path.display())
        });
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{rule_files}\
                 scrape_configs:\n  - job_name: ka\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("config");
        let child = Command::new(binary)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus");
        let prometheus = Self {
            _child: ChildGuard(child),
            addr,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(addr, "/-/ready").is_none_or(|(code, _)| code != 200) {
            assert!(Instant::now() < deadline, "prometheus not ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    /// The single value of an instant PromQL query, if any.
    fn query(&self, promql: &str) -> Option<f64> {
        let (code, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        )?;
        assert_eq!(code, 200, "{promql}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// How many series an instant PromQL query returns.
    fn series(&self, promql: &str) -> usize {
        let (code, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", encode(promql)),
        )
        .expect("prometheus answers");
        assert_eq!(code, 200, "{promql}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        json["data"]["result"].as_array().map_or(0, Vec::len)
    }

    /// Every alerting rule loaded: (name, health, state).
    fn alerts(&self) -> Vec<(String, String, String)> {
        let (_, body) = http_get(self.addr, "/api/v1/rules?type=alert").expect("rules");
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        json["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().into_iter().flatten())
            .map(|rule| {
                let field = |name: &str| rule[name].as_str().unwrap_or_default().to_owned();
                (field("name"), field("health"), field("state"))
            })
            .collect()
    }

    fn wait_for(&self, promql: &str, expected: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let value = self.query(promql);
            if value.is_some_and(|v| (v - expected).abs() < 1e-9) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{promql} = {value:?}, expected {expected}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn prometheus_sees_a_dead_peer_through_promql() {
    const TEST: &str = "prometheus_sees_a_dead_peer_through_promql";
    if !require_root(TEST) {
        return;
    }
    let Some(binary) = require_program("prometheus", TEST) else {
        return;
    };
    let (client, server) = pair("pq");
    let agent = Agent::start(&[]);
    let prometheus = Prometheus::start(&binary, agent.addr);
    let cn = client.inode();
    let addr: SocketAddr = "198.18.10.2:7101".parse().unwrap();
    let listener = server.listen(addr);
    let options = SocketOptions {
        keepalive: Some((1, 1, 3)),
        user_timeout_ms: None,
    };
    let _stream = client.connect(addr, &options).unwrap();
    let _accepted = listener.accept().unwrap();
    let before = client.counters();
    server.drop_everything();
    prometheus.wait_for(
        &format!("sum(ka_zombies_total{{kind=\"dead_peer_keepalive\",netns=\"{cn}\"}})"),
        1.0,
    );
    prometheus.wait_for(
        &format!("sum by (cause) (ka_connections_closed_total{{netns=\"{cn}\",cause=\"keepalive_timeout\"}})"),
        1.0,
    );
    let probes = common::lab::delta(&before, &client.counters(), "TcpExt.TCPKeepAlive");
    #[expect(clippy::cast_precision_loss, reason = "a handful of probes")]
    let probes = probes as f64;
    prometheus.wait_for(
        &format!("sum(ka_keepalive_probes_total{{netns=\"{cn}\"}})"),
        probes,
    );
    prometheus.wait_for("sum(ka_hook_attached{hook=\"inet_sock_set_state\"})", 1.0);
    prometheus.wait_for("max(ka_build_info)", 1.0);
    prometheus.wait_for("sum(up{job=\"ka\"})", 1.0);
}

/// Every dashboard panel and every alert rule, run by the real Prometheus
/// against the agent while a scenario gives each something to show: a
/// panel that can never show data, or an alert that cannot be evaluated,
/// is a bug.
#[test]
fn every_dashboard_panel_and_alert_rule_shows_the_scenario() {
    const TEST: &str = "every_dashboard_panel_and_alert_rule_shows_the_scenario";
    if !require_root(TEST) {
        return;
    }
    let Some(binary) = require_program("prometheus", TEST) else {
        return;
    };
    let (client, server) = pair("pd");
    // Inventories every second: a dead connection the test still holds is
    // known as held once an inventory saw it alive and one saw it dead.
    let agent = Agent::start(&["--idle-timeout", "2s", "--inventory-interval", "1s"]);
    let rules = common::dashboards::root().join("deploy/prometheus/ka-rules.yaml");
    let prometheus = Prometheus::start_with_rules(&binary, agent.addr, Some(&rules));
    let addr: SocketAddr = "198.18.10.2:7103".parse().unwrap();
    let listener = server.listen(addr);
    let keepalive = |idle, count| SocketOptions {
        keepalive: Some((idle, 1, count)),
        user_timeout_ms: None,
    };
    // A normal close after an exchange: idle before close, opened/closed.
    {
        let mut stream = client.connect(addr, &SocketOptions::default()).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        std::io::Write::write_all(&mut stream, b"ping").unwrap();
        let mut buf = [0u8; 4];
        std::io::Read::read_exact(&mut accepted, &mut buf).unwrap();
    }
    // Idle with keepalive off: at risk of the 2 s idle timeout.
    let _idle = (
        client.connect(addr, &SocketOptions::default()).unwrap(),
        listener.accept().unwrap(),
    );
    // A closed port: a reset sent by the server's kernel, received here.
    let _ = client.connect("198.18.10.2:9".parse().unwrap(), &SocketOptions::default());
    // The peer vanishes: keepalive 1 s x 3 dies (a zombie), 1 s x 60 keeps
    // probing, and a sender retransmits into the void.
    let _dying = (
        client.connect(addr, &keepalive(1, 3)).unwrap(),
        listener.accept().unwrap(),
    );
    let _probing = (
        client.connect(addr, &keepalive(1, 60)).unwrap(),
        listener.accept().unwrap(),
    );
    // Dies later (6 s idle, 2 probes), after an inventory named its socket
    // and this process (whose new sockets the process index may take up
    // to 5 s to rescan for), and stays held here.
    let _held_dead = (
        client.connect(addr, &keepalive(6, 2)).unwrap(),
        listener.accept().unwrap(),
    );
    let mut sending = client.connect(addr, &SocketOptions::default()).unwrap();
    let _sending_peer = listener.accept().unwrap();
    server.drop_everything();
    std::io::Write::write_all(&mut sending, b"into the void").unwrap();

    let queries = common::dashboards::panel_queries();
    assert!(queries.len() >= 20, "{queries:?}");
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let empty: Vec<&str> = queries
            .iter()
            .filter(|(_, expr)| prometheus.series(&common::dashboards::as_sent(expr)) == 0)
            .map(|(source, _)| source.as_str())
            .collect();
        if empty.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "panels without data: {empty:#?}\n{}",
            agent.metrics().text
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    // Alerts: zombies fire at once, at-risk waits its 15 minutes (pending),
    // the dead connection held here its 10 (pending),
    // and nothing was lost, no close went unexplained, no hook that matters
    // is missing, no pod list failed, no series folded, inventories keep up,
    // the agent is up.
    let expected = [
        ("KaZombieConnections", "firing"),
        ("KaConnectionsAtRisk", "pending"),
        ("KaDeadConnectionsHeld", "pending"),
        ("KaEventsLost", "inactive"),
        ("KaEventsUnreceived", "inactive"),
        ("KaClosesUnexplained", "inactive"),
        ("KaHookMissing", "inactive"),
        ("KaPodListFailing", "inactive"),
        ("KaSeriesOverflow", "inactive"),
        ("KaInventoryStale", "inactive"),
        ("KaInventoryOwnNamespaceOnly", "inactive"),
        ("KaOwnPidNamespace", "inactive"),
        ("KaAgentFileDescriptors", "inactive"),
        ("KaAgentDown", "inactive"),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let alerts = prometheus.alerts();
        let matches = expected.iter().all(|(name, state)| {
            alerts
                .iter()
                .any(|(n, health, s)| n == name && health == "ok" && s == state)
        });
        if matches && alerts.len() == expected.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alert rules: {alerts:?}, expected {expected:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn promtool_accepts_the_exposition() {
    const TEST: &str = "promtool_accepts_the_exposition";
    if !require_root(TEST) {
        return;
    }
    let Some(promtool) = require_program("promtool", TEST) else {
        return;
    };
    let agent = Agent::start(&["--peer-label", "cidr"]);
    // Some traffic so that every family has series.
    let (client, server) = pair("pt");
    let addr: SocketAddr = "198.18.10.2:7102".parse().unwrap();
    let listener = server.listen(addr);
    drop(client.connect(addr, &SocketOptions::default()).unwrap());
    drop(listener.accept().unwrap());
    let _ = client.connect("198.18.10.2:9".parse().unwrap(), &SocketOptions::default());
    std::thread::sleep(Duration::from_millis(1500));
    // promtool reads the text format; the OpenMetrics exposition is what the
    // real Prometheus of the test above negotiates and parses.
    let openmetrics = get_with_accept(agent.addr, "application/openmetrics-text; version=1.0.0");
    assert!(
        openmetrics.contains("# TYPE ka_events counter"),
        "{openmetrics}"
    );
    let body = get_with_accept(agent.addr, "text/plain");
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), body.as_bytes())
        .expect("write");
    let output = child.wait_with_output().expect("promtool");
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && complaints.trim().is_empty(),
        "{complaints}\n{body}"
    );
}

fn get_with_accept(addr: SocketAddr, accept: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    if accept.contains("openmetrics") {
        assert!(
            head.to_ascii_lowercase()
                .contains("application/openmetrics-text"),
            "{head}"
        );
        assert!(body.trim_end().ends_with("# EOF"));
    }
    body.to_owned()
}
