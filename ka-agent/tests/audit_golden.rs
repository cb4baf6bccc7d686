//! `ka-agent audit` for a prepared situation matches a golden file (stable
//! order). The inventory is built by hand, so the namespace inodes, pids and
//! idle times are fixed; `KA_BLESS=1` rewrites the golden files.

#![expect(clippy::unwrap_used, reason = "tests fail by panicking")]

use std::{collections::HashMap, path::Path, time::Duration};

use ka_agent::{
    attribution::{Owner, Workload},
    audit::{audit_with, render},
    idle_timeout::IdleTimeout,
    inventory::{
        DiagTimer, Inventory, InventoryUpdate, KeepaliveSysctls, NamespaceInventory, SocketEntry,
        TcpInfoSummary,
    },
    model::TcpState,
};

const NOW_NS: u64 = 10_000_000_000;

fn socket(
    netns: u32,
    cookie: u64,
    local: &str,
    remote: &str,
    keepalive: bool,
    idle_ms: u32,
) -> SocketEntry {
    SocketEntry {
        netns,
        local: local.parse().unwrap(),
        remote: remote.parse().unwrap(),
        state: TcpState::Established,
        inode: cookie + 100,
        cookie,
        uid: 0,
        timer: if keepalive {
            DiagTimer::Keepalive
        } else {
            DiagTimer::None
        },
        timer_expires_ms: 1000,
        timer_retransmits: 0,
        tcp_info: Some(TcpInfoSummary {
            state: 1,
            retransmits: 0,
            probes: 0,
            backoff: 0,
            last_data_sent_ms: idle_ms,
            last_data_recv_ms: idle_ms,
            last_ack_recv_ms: idle_ms,
        }),
        cgroup_id: None,
    }
}

fn listener(netns: u32, cookie: u64, local: &str) -> SocketEntry {
    SocketEntry {
        state: TcpState::Listen,
        remote: "0.0.0.0:0".parse().unwrap(),
        tcp_info: None,
        timer: DiagTimer::None,
        ..socket(netns, cookie, local, "0.0.0.0:0", false, 0)
    }
}

fn namespace(
    netns: u32,
    time_secs: u64,
    conntrack: Option<u64>,
    sockets: Vec<SocketEntry>,
) -> NamespaceInventory {
    NamespaceInventory {
        netns,
        path: None,
        keepalive: KeepaliveSysctls {
            time_secs,
            intvl_secs: 75,
            probes: 9,
        },
        conntrack_established_secs: conntrack,
        dumped_at_ns: NOW_NS,
        sockets,
    }
}

/// A web pod (netns 4026532001, keepalive sysctl 7200 s, conntrack loaded)
/// whose Python client keeps idle connections to a database without
/// keepalive and to an API with keepalive on the sysctl default, and whose
/// nginx serves clients; a batch namespace (4026532002, keepalive 60 s)
/// where keepalive is fine for every timeout.
fn prepared() -> InventoryUpdate {
    let web = 4_026_532_001;
    let batch = 4_026_532_002;
    let sockets_web = vec![
        listener(web, 1, "10.1.0.5:80"),
        socket(web, 2, "10.1.0.5:80", "10.1.9.1:51000", false, 400_000),
        socket(web, 3, "10.1.0.5:80", "10.1.9.2:51001", false, 10_000),
        socket(web, 4, "10.1.0.5:40001", "10.2.0.9:5432", false, 500_000),
        socket(web, 5, "10.1.0.5:40002", "10.2.0.9:5432", false, 500_000),
        socket(web, 6, "10.1.0.5:40003", "10.2.0.9:5432", false, 30_000),
        socket(web, 7, "10.1.0.5:40004", "10.3.0.1:443", true, 1_000_000),
        socket(web, 8, "10.1.0.5:40005", "10.3.0.1:443", true, 5_000),
    ];
    let sockets_batch = vec![
        socket(batch, 9, "10.4.0.2:40010", "10.2.0.9:5432", true, 900_000),
        socket(batch, 10, "10.4.0.2:40011", "10.2.0.9:6379", false, 200_000),
    ];
    let owner = |pid: u32, comm: &str| Owner {
        pid,
        comm: ka_agent::model::Comm::new(comm),
        workload: Workload::default(),
        pod: None,
    };
    let mut owners = HashMap::new();
    for cookie in 1..=3 {
        owners.insert(cookie + 100, owner(1200, "nginx"));
    }
    for cookie in 4..=8 {
        owners.insert(cookie + 100, owner(1300, "python3"));
    }
    owners.insert(109, owner(2400, "batch-worker"));
    owners.insert(110, owner(2400, "batch-worker"));
    InventoryUpdate {
        inventory: Inventory {
            namespaces: vec![
                namespace(web, 7200, Some(432_000), sockets_web),
                namespace(batch, 60, None, sockets_batch),
            ],
        },
        owners,
        took: Duration::ZERO,
        dump_took: Duration::ZERO,
        pod_list_failed: false,
        pods: None,
        own_namespace_only: false,
        trigger: ka_agent::inventory::Trigger::Start,
        holds: ka_agent::inventory::HeldSockets::default(),
    }
}

fn check_golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/audit")
        .join(name);
    if std::env::var("KA_BLESS").as_deref() == Ok("1") {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        actual, expected,
        "{name} differs from the golden file (KA_BLESS=1 to rewrite)"
    );
}

#[test]
fn audit_of_a_prepared_situation_matches_the_golden_files() {
    let timeouts: Vec<IdleTimeout> = ["aws-nlb", "aws-alb"]
        .iter()
        .map(|t| t.parse().unwrap())
        .collect();
    let report = audit_with(&prepared(), &timeouts, NOW_NS, (32768, 60999));
    check_golden("report.txt", &render(&report));
    check_golden(
        "report.json",
        &(serde_json::to_string_pretty(&report).unwrap() + "\n"),
    );
    // Stable: the same input gives the same output.
    let again = audit_with(&prepared(), &timeouts, NOW_NS, (32768, 60999));
    assert_eq!(render(&again), render(&report));
    assert_eq!(report.established, 9);
}
