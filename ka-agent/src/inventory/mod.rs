//! Inventory of the TCP sockets that exist now, in every network namespace
//! of the host, through `NETLINK_SOCK_DIAG` (what `ss -tnoie` reads).
//!
//! A `sock_diag` dump only covers the network namespace of the netlink socket,
//! so each namespace is dumped from a thread of its own that first enters it
//! (`setns(CLONE_NEWNET)`) and only then creates the netlink socket. The same
//! thread reads the namespace's keepalive sysctls: `/proc/sys/net` answers
//! for the network namespace of the reading thread.
//!
//! `sock_diag` does not report `SO_KEEPALIVE` nor `TCP_KEEPIDLE`/`INTVL`/`CNT`.
//! What can be known without an eBPF event for the socket:
//! - keepalive is on when the keepalive timer is pending (`idiag_timer`
//!   2); on an established socket with no timer pending it is off (the
//!   timer is always re-armed while `SOCK_KEEPOPEN` is set); while a
//!   retransmission or zero-window probe timer is pending, it is unknown;
//! - the values are the namespace's sysctls unless the socket set its own;
//!   a socket's own `TCP_KEEPIDLE` longer than the sysctl shows as a pending
//!   keepalive timer further away than the sysctl (taken as a lower bound).
//!
//! What remains unknowable without reading the kernel's `struct tcp_sock`:
//! the per-socket `TCP_KEEPIDLE`/`INTVL`/`CNT` of a socket that never
//! produced an eBPF event (shorter than the sysctl, or set while keepalive
//! is off). Sockets with events carry the exact values (the eBPF snapshot),
//! and the tracker prefers those.

mod netlink;
mod task;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use serde::Serialize;

pub use task::{HeldSockets, InventoryTask, InventoryUpdate, Trigger, Watched, spawn, take};

use crate::model::TcpState;

/// Why an inventory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot open network namespace {path}: {source}")]
    OpenNamespace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {path} (needs CAP_SYS_ADMIN): {source}")]
    EnterNamespace {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sock_diag netlink: {0}")]
    Netlink(#[source] std::io::Error),
    #[error("undecodable sock_diag message: {0}")]
    Decode(String),
    #[error("cannot list network namespaces: {0}")]
    Enumerate(#[source] std::io::Error),
    #[error("the namespace thread died")]
    Thread,
}

/// Which timer of the socket is pending (`idiag_timer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiagTimer {
    None,
    Retransmit,
    Keepalive,
    TimeWait,
    ZeroWindowProbe,
}

/// The `tcp_info` fields the inventory needs (`INET_DIAG_INFO`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TcpInfoSummary {
    pub state: u8,
    pub retransmits: u8,
    /// `icsk_probes_out`: keepalive or zero-window probes sent and not
    /// answered yet.
    pub probes: u8,
    pub backoff: u8,
    pub last_data_sent_ms: u32,
    pub last_data_recv_ms: u32,
    pub last_ack_recv_ms: u32,
}

impl TcpInfoSummary {
    /// Idle time as the agent counts it: since the last data received,
    /// ACK received or data sent, whichever is most recent.
    pub fn idle_ms(&self) -> u32 {
        self.last_data_recv_ms
            .min(self.last_ack_recv_ms)
            .min(self.last_data_sent_ms)
    }
}

/// One TCP socket as `sock_diag` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SocketEntry {
    /// Network namespace inode (`net->ns.inum`).
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub state: TcpState,
    /// Socket inode: the `socket:[N]` of the owner's file descriptor
    /// (0 for request sockets and orphans).
    pub inode: u64,
    /// `sk_cookie`: equals the eBPF snapshot's cookie (the dump generates
    /// it when nobody had asked for it yet).
    pub cookie: u64,
    pub uid: u32,
    pub timer: DiagTimer,
    /// Milliseconds until the pending timer fires.
    pub timer_expires_ms: u32,
    /// `idiag_retrans`: retransmissions for the retransmit timer, probes
    /// out for the keepalive and zero-window timers.
    pub timer_retransmits: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_info: Option<TcpInfoSummary>,
    /// cgroup v2 id of the socket's cgroup (`INET_DIAG_CGROUP_ID`, 5.7+).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
}

impl SocketEntry {
    pub fn is_listening(&self) -> bool {
        self.state == TcpState::Listen
    }

    /// Idle seconds at the dump, when `tcp_info` came with it.
    pub fn idle_secs(&self) -> Option<f64> {
        self.tcp_info
            .as_ref()
            .map(|info| f64::from(info.idle_ms()) / 1000.0)
    }

    /// What the dump proves about keepalive (see the module docs).
    pub fn keepalive_evidence(&self) -> KeepaliveEvidence {
        match self.timer {
            DiagTimer::Keepalive => KeepaliveEvidence::On,
            DiagTimer::None if self.state == TcpState::Established => KeepaliveEvidence::Off,
            _ => KeepaliveEvidence::Unknown,
        }
    }
}

/// Keepalive as far as a `sock_diag` dump tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepaliveEvidence {
    /// The keepalive timer is pending.
    On,
    /// Established with no timer pending.
    Off,
    /// Another timer (retransmission, zero-window probe) hides it.
    Unknown,
}

/// `net.ipv4.tcp_keepalive_*` of one network namespace: what a socket
/// without its own `TCP_KEEP*` uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct KeepaliveSysctls {
    pub time_secs: u64,
    pub intvl_secs: u64,
    pub probes: u64,
}

impl Default for KeepaliveSysctls {
    /// The compiled defaults a new namespace starts from.
    fn default() -> Self {
        Self {
            time_secs: 7200,
            intvl_secs: 75,
            probes: 9,
        }
    }
}

/// Everything learnt inside one network namespace.
#[derive(Clone, Debug, Serialize)]
pub struct NamespaceInventory {
    pub netns: u32,
    /// Where the namespace was entered from (`None`: the caller's own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    pub keepalive: KeepaliveSysctls,
    /// `net.netfilter.nf_conntrack_tcp_timeout_established`, when conntrack
    /// is loaded in this namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack_established_secs: Option<u64>,
    /// `CLOCK_MONOTONIC` ns just before the dump started.
    #[serde(skip)]
    pub dumped_at_ns: u64,
    pub sockets: Vec<SocketEntry>,
}

/// Every namespace that could be dumped.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Inventory {
    pub namespaces: Vec<NamespaceInventory>,
}

impl Inventory {
    pub fn sockets(&self) -> impl Iterator<Item = &SocketEntry> {
        self.namespaces.iter().flat_map(|ns| ns.sockets.iter())
    }

    pub fn namespace(&self, netns: u32) -> Option<&NamespaceInventory> {
        self.namespaces.iter().find(|ns| ns.netns == netns)
    }
}

/// Dumps the TCP sockets of one network namespace: the one bound at
/// `netns_path` (`/proc/<pid>/ns/net`, `/run/netns/<name>`), or the
/// caller's when `None`. Runs on a thread of its own either way.
pub fn dump_namespace(netns_path: Option<&Path>) -> Result<NamespaceInventory, InventoryError> {
    let file = netns_path
        .map(|path| {
            std::fs::File::open(path).map_err(|source| InventoryError::OpenNamespace {
                path: path.to_owned(),
                source,
            })
        })
        .transpose()?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                if let (Some(file), Some(path)) = (&file, netns_path) {
                    // SAFETY: `file` is an open namespace file for the whole
                    // call; setns changes the network namespace of this
                    // thread only, which exists for this dump alone and
                    // ends with it.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        return Err(InventoryError::EnterNamespace {
                            path: path.to_owned(),
                            source: std::io::Error::last_os_error(),
                        });
                    }
                }
                inside_namespace(netns_path)
            })
            .join()
            .map_err(|_| InventoryError::Thread)?
    })
}

/// The dump and sysctls, read from the thread that entered the namespace.
fn inside_namespace(path: Option<&Path>) -> Result<NamespaceInventory, InventoryError> {
    // /proc/self is the thread group leader; thread-self is this thread.
    let netns = std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| u32::try_from(m.ino()).unwrap_or(0))
        .map_err(InventoryError::Enumerate)?;
    let keepalive = read_keepalive_sysctls(Path::new("/proc/sys"));
    let conntrack_established_secs = read_sysctl(
        Path::new("/proc/sys"),
        "net/netfilter/nf_conntrack_tcp_timeout_established",
    );
    let dumped_at_ns = crate::run::monotonic_ns();
    let sockets = netlink::dump_tcp(netns)?;
    Ok(NamespaceInventory {
        netns,
        path: path.map(Path::to_owned),
        keepalive,
        conntrack_established_secs,
        dumped_at_ns,
        sockets,
    })
}

/// Reads `net.ipv4.tcp_keepalive_*` below `proc_sys` (normally
/// `/proc/sys`), falling back to the compiled defaults per value.
pub fn read_keepalive_sysctls(proc_sys: &Path) -> KeepaliveSysctls {
    let defaults = KeepaliveSysctls::default();
    KeepaliveSysctls {
        time_secs: read_sysctl(proc_sys, "net/ipv4/tcp_keepalive_time")
            .unwrap_or(defaults.time_secs),
        intvl_secs: read_sysctl(proc_sys, "net/ipv4/tcp_keepalive_intvl")
            .unwrap_or(defaults.intvl_secs),
        probes: read_sysctl(proc_sys, "net/ipv4/tcp_keepalive_probes").unwrap_or(defaults.probes),
    }
}

fn read_sysctl(proc_sys: &Path, key: &str) -> Option<u64> {
    std::fs::read_to_string(proc_sys.join(key))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Distinct network namespaces: inode → the paths it can be entered from,
/// from `/proc/*/ns/net` and the `ip netns` bind mounts in `/run/netns`.
pub fn list_namespaces(
    proc: &Path,
    run_netns: &Path,
) -> std::io::Result<BTreeMap<u32, Vec<PathBuf>>> {
    let mut namespaces: BTreeMap<u32, Vec<PathBuf>> = BTreeMap::new();
    let mut add = |path: PathBuf| {
        // A process that exited meanwhile is simply not there.
        if let Ok(meta) = std::fs::metadata(&path)
            && let Ok(inode) = u32::try_from(meta.ino())
        {
            let paths = namespaces.entry(inode).or_default();
            // A few spare paths in case the first process exits.
            if paths.len() < 4 {
                paths.push(path);
            }
        }
    };
    if let Ok(dir) = std::fs::read_dir(run_netns) {
        for entry in dir.flatten() {
            add(entry.path());
        }
    }
    for entry in std::fs::read_dir(proc)?.flatten() {
        if entry.file_name().to_str().is_some_and(is_pid) {
            add(entry.path().join("ns/net"));
        }
    }
    Ok(namespaces)
}

fn is_pid(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit())
}

/// Dumps every network namespace of the host, one thread each, one after
/// the other. A namespace that vanishes on the way is skipped.
pub fn dump_all_namespaces() -> Result<Inventory, InventoryError> {
    let namespaces = list_namespaces(Path::new("/proc"), Path::new("/run/netns"))
        .map_err(InventoryError::Enumerate)?;
    if namespaces.is_empty() {
        return Err(InventoryError::Enumerate(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no readable /proc/*/ns/net",
        )));
    }
    dump_namespaces(namespaces)
}

/// Dumps each listed namespace through the first of its paths that still
/// leads to it. A namespace none of whose paths can be entered any more is
/// skipped (its processes exited), but not all of them: the list includes
/// the agent's own, so nothing dumped is a failure (out of file
/// descriptors, say), not an empty host.
fn dump_namespaces(namespaces: BTreeMap<u32, Vec<PathBuf>>) -> Result<Inventory, InventoryError> {
    let mut inventory = Inventory::default();
    let mut any_error = None;
    for (inode, paths) in namespaces {
        let mut last_error = None;
        for path in &paths {
            match dump_namespace(Some(path)) {
                Ok(dump) if dump.netns == inode => {
                    inventory.namespaces.push(dump);
                    last_error = None;
                    break;
                }
                // The pid was reused by a process of another namespace.
                Ok(_) => {}
                Err(error @ InventoryError::EnterNamespace { .. })
                    if error_is_permission(&error) =>
                {
                    return Err(error);
                }
                Err(error) => last_error = Some(error),
            }
        }
        if let Some(error) = last_error {
            tracing::debug!(netns = inode, %error, "network namespace skipped (gone)");
            any_error = Some(error);
        }
    }
    match any_error {
        Some(error) if inventory.namespaces.is_empty() => Err(error),
        _ => Ok(inventory),
    }
}

fn error_is_permission(error: &InventoryError) -> bool {
    matches!(
        error,
        InventoryError::EnterNamespace { source, .. }
            if source.kind() == std::io::ErrorKind::PermissionDenied
    )
}

impl InventoryError {
    /// Whether the agent may see its own namespace only (no
    /// `CAP_SYS_ADMIN`, or no other process's namespace readable), rather
    /// than failing to take an inventory at all.
    pub fn leaves_only_own_namespace(&self) -> bool {
        match self {
            Self::EnterNamespace { source, .. } | Self::OpenNamespace { source, .. } => {
                source.kind() == std::io::ErrorKind::PermissionDenied
            }
            Self::Enumerate(source) => source.kind() == std::io::ErrorKind::NotFound,
            Self::Netlink(_) | Self::Decode(_) | Self::Thread => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_fall_back_per_value() {
        let dir = std::env::temp_dir().join(format!("ka-sysctl-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("net/ipv4")).unwrap();
        std::fs::write(dir.join("net/ipv4/tcp_keepalive_time"), "600\n").unwrap();
        std::fs::write(dir.join("net/ipv4/tcp_keepalive_probes"), "garbage").unwrap();
        let sysctls = read_keepalive_sysctls(&dir);
        assert_eq!(
            sysctls,
            KeepaliveSysctls {
                time_secs: 600,
                intvl_secs: 75,
                probes: 9
            }
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keepalive_evidence_from_the_timer() {
        let mut entry = SocketEntry {
            netns: 1,
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
            state: TcpState::Established,
            inode: 1,
            cookie: 1,
            uid: 0,
            timer: DiagTimer::Keepalive,
            timer_expires_ms: 1000,
            timer_retransmits: 0,
            tcp_info: None,
            cgroup_id: None,
        };
        assert_eq!(entry.keepalive_evidence(), KeepaliveEvidence::On);
        entry.timer = DiagTimer::None;
        assert_eq!(entry.keepalive_evidence(), KeepaliveEvidence::Off);
        entry.timer = DiagTimer::Retransmit;
        assert_eq!(entry.keepalive_evidence(), KeepaliveEvidence::Unknown);
        entry.timer = DiagTimer::None;
        entry.state = TcpState::CloseWait;
        assert_eq!(entry.keepalive_evidence(), KeepaliveEvidence::Unknown);
    }

    #[test]
    fn own_namespace_is_listed() {
        let namespaces = list_namespaces(Path::new("/proc"), Path::new("/nonexistent")).unwrap();
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert!(namespaces.contains_key(&u32::try_from(own).unwrap()));
    }

    #[test]
    fn nothing_dumped_is_a_failure_not_an_empty_host() {
        let gone = |pid: &str| PathBuf::from(format!("/nonexistent/{pid}/ns/net"));
        let error = dump_namespaces(BTreeMap::from([(1, vec![gone("1")]), (2, vec![gone("2")])]))
            .expect_err("no namespace could be dumped");
        assert!(
            matches!(error, InventoryError::OpenNamespace { .. }),
            "{error}"
        );
        // Some gone, some dumped: the gone are skipped.
        let own = u32::try_from(std::fs::metadata("/proc/self/ns/net").unwrap().ino()).unwrap();
        if let Ok(inventory) = dump_namespaces(BTreeMap::from([
            (1, vec![gone("1")]),
            (own, vec![PathBuf::from("/proc/self/ns/net")]),
        ])) {
            assert_eq!(inventory.namespaces.len(), 1);
        }
    }
}
