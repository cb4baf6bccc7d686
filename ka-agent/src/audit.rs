//! `ka-agent snapshot` and `ka-agent audit`: one inventory of the
//! connections that exist now (every network namespace), classified the way
//! the running agent classifies its table, without a running agent.
//!
//! The audit says, per process and service port, how many established
//! connections are at risk of which idle timeout (idle past it already, with
//! keepalive off or slower than the timeout: the agent's
//! `ka_connections_at_risk`), how many are exposed (same keepalive
//! configuration, not idle long enough yet), and the fix.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;

use crate::{
    attribution::Owner,
    http::{self, AtRisk},
    idle_timeout::IdleTimeout,
    inventory::{DiagTimer, InventoryUpdate, KeepaliveSysctls, NamespaceInventory, SocketEntry},
    model::{Direction, TcpState},
    run::{at_risk_of, ephemeral_ports},
    track::{Connection, KeepaliveSource, Tracker, TrackerConfig},
};

/// The name under which a namespace's own conntrack timeout is audited.
pub const CONNTRACK_TIMEOUT_NAME: &str = "nf_conntrack_tcp_timeout_established";

/// The idle timeouts that apply to connections of `namespace`: the given
/// ones, plus its conntrack established timeout when conntrack is loaded.
pub fn timeouts_for(namespace: &NamespaceInventory, given: &[IdleTimeout]) -> Vec<IdleTimeout> {
    let mut timeouts = given.to_vec();
    if let Some(seconds) = namespace.conntrack_established_secs {
        timeouts.push(IdleTimeout {
            name: CONNTRACK_TIMEOUT_NAME.to_owned(),
            seconds,
        });
    }
    timeouts
}

/// A table built from one inventory: the records the running agent would
/// have adopted from it.
pub fn table_from(update: &InventoryUpdate, ephemeral_ports: (u16, u16)) -> Tracker {
    let mut tracker = Tracker::new(TrackerConfig {
        ephemeral_ports,
        max_connections: usize::MAX,
        ..TrackerConfig::default()
    });
    tracker.reconcile(update);
    tracker
}

/// One connection of `ka-agent snapshot --json`.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotConnection {
    #[serde(flatten)]
    pub view: http::ConnectionView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<Owner>,
    pub inode: u64,
    pub uid: u32,
    /// Where the keepalive settings come from (a snapshot has no eBPF
    /// events: on/off from the pending timer, values from the sysctls).
    pub keepalive_source: KeepaliveSource,
    pub timer: DiagTimer,
    pub timer_expires_ms: u32,
    /// Keepalive or zero-window probes out now (`tcpi_probes`).
    pub probes_out: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

/// One namespace's settings in a snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotNamespace {
    pub netns: u32,
    pub keepalive: KeepaliveSysctls,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack_established_secs: Option<u64>,
    pub connections: usize,
    pub listening: usize,
}

/// `ka-agent snapshot --json`.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub idle_timeouts: Vec<IdleTimeout>,
    pub namespaces: Vec<SnapshotNamespace>,
    /// Worst first, then longest idle.
    pub connections: Vec<SnapshotConnection>,
    /// How long the inventory took: the `sock_diag` dump of every
    /// namespace, and the dump with the owners' attribution (/proc).
    pub took_ms: SnapshotTimings,
    /// Only the caller's own network namespace could be inventoried (no
    /// `CAP_SYS_ADMIN`); absent when every namespace was.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub own_namespace_only: bool,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct SnapshotTimings {
    pub dump: f64,
    pub inventory: f64,
}

/// A connection of the inventory with its table record.
struct Joined<'a> {
    entry: &'a SocketEntry,
    namespace: &'a NamespaceInventory,
    connection: &'a Connection,
    owner: Option<&'a Owner>,
}

fn joined<'a>(update: &'a InventoryUpdate, tracker: &'a Tracker) -> Vec<Joined<'a>> {
    let mut joined = Vec::new();
    for namespace in &update.inventory.namespaces {
        for entry in &namespace.sockets {
            // A fresh table keys every record by its cookie.
            if let Some(connection) = tracker.connection(entry.cookie) {
                joined.push(Joined {
                    entry,
                    namespace,
                    connection,
                    owner: update.owners.get(&entry.inode),
                });
            }
        }
    }
    joined
}

/// Classifies one inventory (see the module docs).
pub fn snapshot(update: &InventoryUpdate, timeouts: &[IdleTimeout], now_ns: u64) -> Snapshot {
    let tracker = table_from(update, ephemeral_ports());
    let mut connections: Vec<SnapshotConnection> = joined(update, &tracker)
        .into_iter()
        .map(|j| {
            let idle_secs = j.connection.idle_secs(now_ns);
            let risks = at_risk_of(
                j.connection,
                idle_secs,
                &timeouts_for(j.namespace, timeouts),
            );
            SnapshotConnection {
                view: http::ConnectionView {
                    class: http::class_of(j.connection, !risks.is_empty()),
                    connection: j.connection.clone(),
                    idle_secs,
                    at_risk: risks,
                },
                owner: j.owner.cloned(),
                inode: j.entry.inode,
                uid: j.entry.uid,
                keepalive_source: tracker.keepalive_source(j.connection.sk),
                timer: j.entry.timer,
                timer_expires_ms: j.entry.timer_expires_ms,
                probes_out: j.entry.tcp_info.as_ref().map_or(0, |i| i.probes),
                cgroup_id: j.entry.cgroup_id,
            }
        })
        .collect();
    connections.sort_by(|a, b| {
        rank(a.view.class)
            .cmp(&rank(b.view.class))
            .then(b.view.idle_secs.total_cmp(&a.view.idle_secs))
            .then(a.view.connection.local.cmp(&b.view.connection.local))
    });
    let namespaces = update
        .inventory
        .namespaces
        .iter()
        .map(|ns| SnapshotNamespace {
            netns: ns.netns,
            keepalive: ns.keepalive,
            conntrack_established_secs: ns.conntrack_established_secs,
            connections: connections
                .iter()
                .filter(|c| c.view.connection.netns == ns.netns)
                .count(),
            listening: ns.sockets.iter().filter(|s| s.is_listening()).count(),
        })
        .collect();
    Snapshot {
        idle_timeouts: timeouts.to_vec(),
        namespaces,
        connections,
        took_ms: SnapshotTimings {
            dump: update.dump_took.as_secs_f64() * 1000.0,
            inventory: update.took.as_secs_f64() * 1000.0,
        },
        own_namespace_only: update.own_namespace_only,
    }
}

fn rank(class: &str) -> u8 {
    match class {
        "zombie" => 0,
        "probing" => 1,
        "at_risk" => 2,
        "ok" => 3,
        _ => 4,
    }
}

/// Connections of one process and service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct AuditGroupKey {
    pub netns: u32,
    pub comm: crate::model::Comm,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    pub direction: Direction,
    /// Service port: local for inbound, remote for outbound.
    pub port: u16,
}

/// What threatens some connections of a group, and the fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuditFinding {
    pub idle_timeout: String,
    pub idle_timeout_secs: u64,
    /// `keepalive_disabled` or `keepalive_slower_than_idle_timeout`.
    pub reason: &'static str,
    /// Idle past the timeout already (`ka_connections_at_risk`).
    pub at_risk: usize,
    /// Will be once idle that long: keepalive cannot save them.
    pub exposed: usize,
    pub fix: String,
}

/// One group of the audit.
#[derive(Clone, Debug, Serialize)]
pub struct AuditGroup {
    #[serde(flatten)]
    pub key: AuditGroupKey,
    /// Established connections of the group.
    pub connections: usize,
    pub findings: Vec<AuditFinding>,
}

/// `ka-agent audit --json`.
#[derive(Clone, Debug, Serialize)]
pub struct AuditReport {
    pub idle_timeouts: Vec<IdleTimeout>,
    pub namespaces: Vec<SnapshotNamespace>,
    /// Groups with at least one finding, in a stable order.
    pub groups: Vec<AuditGroup>,
    pub established: usize,
    pub at_risk: usize,
    pub exposed: usize,
    /// See [`Snapshot::own_namespace_only`].
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub own_namespace_only: bool,
}

/// The fix for connections exposed to `timeout` for `reason`.
fn fix_for(
    reason: &str,
    connection: &Connection,
    namespace: &NamespaceInventory,
    timeout: &IdleTimeout,
) -> String {
    let limit = timeout.seconds;
    if reason == "keepalive_disabled" {
        enable_keepalive_fix(namespace, limit)
    } else {
        faster_keepalive_fix(connection, namespace, limit)
    }
}

/// Keepalive is off: turn it on, with socket values below the timeout
/// where the namespace's defaults are not.
fn enable_keepalive_fix(namespace: &NamespaceInventory, limit: u64) -> String {
    let sysctls = &namespace.keepalive;
    let options: Vec<&str> = [
        (sysctls.time_secs >= limit, "TCP_KEEPIDLE"),
        (sysctls.intvl_secs >= limit, "TCP_KEEPINTVL"),
    ]
    .into_iter()
    .filter_map(|(too_long, option)| too_long.then_some(option))
    .collect();
    if options.is_empty() {
        "enable SO_KEEPALIVE".to_owned()
    } else {
        format!(
            "enable SO_KEEPALIVE and set {} below {limit} s",
            options.join(" and ")
        )
    }
}

/// Keepalive is on but leaves silences longer than the timeout: shorten
/// the idle time and/or the interval, where they are set.
fn faster_keepalive_fix(
    connection: &Connection,
    namespace: &NamespaceInventory,
    limit: u64,
) -> String {
    #[expect(clippy::cast_precision_loss, reason = "timeouts are far below 2^52 s")]
    let limit_secs = limit as f64;
    let keepalive = &connection.keepalive;
    // (value, set on the socket, socket option, sysctl)
    [
        (
            keepalive.idle_secs,
            keepalive.idle_from_socket,
            "TCP_KEEPIDLE",
            "tcp_keepalive_time",
        ),
        (
            keepalive.interval_secs,
            keepalive.interval_from_socket,
            "TCP_KEEPINTVL",
            "tcp_keepalive_intvl",
        ),
    ]
    .into_iter()
    .filter(|(secs, ..)| *secs >= limit_secs)
    .map(|(_, from_socket, option, sysctl)| {
        if from_socket {
            format!("set {option} below {limit} s")
        } else {
            format!(
                "lower net.ipv4.{sysctl} below {limit} s in namespace {}",
                namespace.netns
            )
        }
    })
    .collect::<Vec<_>>()
    .join(" and ")
}

/// (timeout seconds, timeout name, reason, fix) → (at risk, exposed): the
/// order of the key is the order of the output.
type FindingCounts = BTreeMap<(u64, String, &'static str, String), (usize, usize)>;

/// The keepalive audit of one inventory.
pub fn audit(update: &InventoryUpdate, timeouts: &[IdleTimeout], now_ns: u64) -> AuditReport {
    audit_with(update, timeouts, now_ns, ephemeral_ports())
}

/// [`audit`] with the ephemeral port range given (tests).
pub fn audit_with(
    update: &InventoryUpdate,
    timeouts: &[IdleTimeout],
    now_ns: u64,
    ephemeral_ports: (u16, u16),
) -> AuditReport {
    let tracker = table_from(update, ephemeral_ports);
    let mut groups: BTreeMap<AuditGroupKey, (usize, FindingCounts)> = BTreeMap::new();
    let (mut established, mut at_risk_total, mut exposed_total) = (0, 0, 0);
    for j in joined(update, &tracker) {
        let connection = j.connection;
        if connection.state != TcpState::Established {
            continue;
        }
        established += 1;
        let labels = connection.labels();
        let key = AuditGroupKey {
            netns: connection.netns,
            comm: j.owner.map(|o| o.comm.clone()).unwrap_or_default(),
            pid: j.owner.map(|o| o.pid),
            direction: connection.direction,
            port: labels.port,
        };
        let group = groups.entry(key).or_default();
        group.0 += 1;
        let applicable = timeouts_for(j.namespace, timeouts);
        let idle = connection.idle_secs(now_ns);
        let now_at_risk: Vec<AtRisk> = at_risk_of(connection, idle, &applicable);
        let ever: Vec<AtRisk> = at_risk_of(connection, f64::INFINITY, &applicable);
        if !now_at_risk.is_empty() {
            at_risk_total += 1;
        }
        if !ever.is_empty() {
            exposed_total += 1;
        }
        for risk in ever {
            let Some(timeout) = applicable.iter().find(|t| t.name == risk.idle_timeout) else {
                continue;
            };
            let fix = fix_for(risk.reason, connection, j.namespace, timeout);
            let counts = group
                .1
                .entry((timeout.seconds, timeout.name.clone(), risk.reason, fix))
                .or_default();
            counts.1 += 1;
            if now_at_risk.contains(&risk) {
                counts.0 += 1;
            }
        }
    }
    let groups = groups
        .into_iter()
        .filter(|(_, (_, findings))| !findings.is_empty())
        .map(|(key, (connections, findings))| AuditGroup {
            key,
            connections,
            findings: findings
                .into_iter()
                .map(
                    |((seconds, name, reason, fix), (at_risk, exposed))| AuditFinding {
                        idle_timeout: name,
                        idle_timeout_secs: seconds,
                        reason,
                        at_risk,
                        exposed,
                        fix,
                    },
                )
                .collect(),
        })
        .collect();
    let snapshot_namespaces = update
        .inventory
        .namespaces
        .iter()
        .map(|ns| SnapshotNamespace {
            netns: ns.netns,
            keepalive: ns.keepalive,
            conntrack_established_secs: ns.conntrack_established_secs,
            connections: ns
                .sockets
                .iter()
                .filter(|s| s.state == TcpState::Established)
                .count(),
            listening: ns.sockets.iter().filter(|s| s.is_listening()).count(),
        })
        .collect();
    AuditReport {
        idle_timeouts: timeouts.to_vec(),
        namespaces: snapshot_namespaces,
        groups,
        established,
        at_risk: at_risk_total,
        exposed: exposed_total,
        own_namespace_only: update.own_namespace_only,
    }
}

/// The audit as a table for people.
pub fn render(report: &AuditReport) -> String {
    let mut out = String::new();
    let timeouts: Vec<String> = report
        .idle_timeouts
        .iter()
        .map(ToString::to_string)
        .collect();
    let _ = writeln!(
        out,
        "Keepalive audit: {} established connections in {} network namespaces; idle timeouts: {}",
        report.established,
        report.namespaces.len(),
        timeouts.join(", ")
    );
    if report.own_namespace_only {
        let _ = writeln!(
            out,
            "  (only this process's own network namespace: the others need CAP_SYS_ADMIN)"
        );
    }
    for ns in &report.namespaces {
        let conntrack = ns
            .conntrack_established_secs
            .map_or_else(String::new, |s| format!(", {CONNTRACK_TIMEOUT_NAME}={s}"));
        let _ = writeln!(
            out,
            "  netns {}: tcp_keepalive_time={} tcp_keepalive_intvl={} tcp_keepalive_probes={}{conntrack}",
            ns.netns, ns.keepalive.time_secs, ns.keepalive.intvl_secs, ns.keepalive.probes
        );
    }
    if report.groups.is_empty() {
        let _ = writeln!(out, "No connection is exposed to these idle timeouts.");
        return out;
    }
    let _ = writeln!(
        out,
        "{} at risk now, {} exposed (will be at risk once idle that long):\n",
        report.at_risk, report.exposed
    );
    let _ = writeln!(
        out,
        "{:<12} {:<16} {:>8} {:<8} {:>5} {:>5}  {:<38} {:>7} {:>7}  FIX",
        "NETNS",
        "PROCESS",
        "PID",
        "DIR",
        "PORT",
        "CONNS",
        "IDLE TIMEOUT / REASON",
        "AT RISK",
        "EXPOSED"
    );
    for group in &report.groups {
        for finding in &group.findings {
            let pid = group
                .key
                .pid
                .map_or_else(|| "-".to_owned(), |p| p.to_string());
            let comm = if group.key.comm.is_empty() {
                "?"
            } else {
                group.key.comm.as_str()
            };
            let timeout = format!(
                "{} ({} s) {}",
                finding.idle_timeout,
                finding.idle_timeout_secs,
                short_reason(finding.reason)
            );
            let _ = writeln!(
                out,
                "{:<12} {:<16} {:>8} {:<8} {:>5} {:>5}  {:<38} {:>7} {:>7}  {}",
                group.key.netns,
                comm,
                pid,
                group.key.direction.name(),
                group.key.port,
                group.connections,
                timeout,
                finding.at_risk,
                finding.exposed,
                finding.fix
            );
        }
    }
    out
}

fn short_reason(reason: &str) -> &'static str {
    if reason == "keepalive_disabled" {
        "keepalive off"
    } else {
        "keepalive too slow"
    }
}

/// Takes one inventory of every namespace, with owners.
fn take_inventory() -> Result<InventoryUpdate, crate::inventory::InventoryError> {
    crate::inventory::take(&mut crate::attribution::ProcessIndex::new())
}

/// `ka-agent audit`: the exit status.
pub fn audit_command(args: &crate::cli::AuditArgs) -> i32 {
    let update = match take_inventory() {
        Ok(update) => update,
        Err(error) => {
            eprintln!("ka-agent: {error}");
            return 1;
        }
    };
    let report = audit(&update, &args.idle_timeouts, crate::run::monotonic_ns());
    if args.json {
        print_json(&report)
    } else {
        print!("{}", render(&report));
        0
    }
}

/// `ka-agent snapshot --json`: the exit status.
pub fn snapshot_command(args: &crate::cli::SnapshotArgs) -> i32 {
    let update = match take_inventory() {
        Ok(update) => update,
        Err(error) => {
            eprintln!("ka-agent: {error}");
            return 1;
        }
    };
    print_json(&snapshot(
        &update,
        &args.idle_timeouts,
        crate::run::monotonic_ns(),
    ))
}

fn print_json(value: &impl Serialize) -> i32 {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            0
        }
        Err(error) => {
            eprintln!("ka-agent: cannot write JSON: {error}");
            1
        }
    }
}
