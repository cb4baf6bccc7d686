//! Who owns a socket: socket inode → process (pid, comm) from the
//! `socket:[INODE]` links in `/proc/<pid>/fd`, and process → container →
//! Kubernetes pod from its cgroup path ([`cgroup`]), pod UID → namespace
//! and name from the Kubernetes API ([`kubernetes`]).

pub mod cgroup;
pub mod kubernetes;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::track::same_text;

pub use cgroup::{Runtime, Workload, parse_cgroup_path, parse_proc_cgroup};

/// The process that holds a socket open.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Owner {
    pub pid: u32,
    pub comm: crate::model::Comm,
    #[serde(flatten)]
    pub workload: Workload,
    /// Its pod and container, in Kubernetes (`--node-name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodLabels>,
}

/// Where a process runs in Kubernetes: the `namespace`, `pod` and
/// `container` labels of its connections.
#[derive(Clone, Debug, Default, Eq, Hash, PartialOrd, Ord, Serialize)]
#[expect(
    clippy::derived_hash_with_manual_eq,
    reason = "the manual equality is the derived one, minus memcmp calls on empty strings"
)]
pub struct PodLabels {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

impl PartialEq for PodLabels {
    /// Compared on every series lookup, mostly empty outside Kubernetes
    /// (see [`same_text`]).
    fn eq(&self, other: &Self) -> bool {
        let Self {
            namespace,
            pod,
            container,
        } = self;
        same_text(namespace, &other.namespace)
            && same_text(pod, &other.pod)
            && same_text(container, &other.container)
    }
}

impl PodLabels {
    /// The pod of `workload` (a pod UID from its cgroup) among this node's
    /// pods, with the container's name when its id is known.
    pub fn of(workload: &Workload, pods: &kubernetes::PodsByUid) -> Option<Self> {
        let pod = pods.get(workload.pod_uid.as_ref()?)?;
        let container = workload
            .container_id
            .as_ref()
            .and_then(|id| pod.containers.get(id))
            .cloned()
            .unwrap_or_default();
        Some(Self {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            container,
        })
    }
}

/// What was learnt about one process.
#[derive(Clone, Debug)]
struct ProcessRecord {
    /// `starttime` of `/proc/<pid>/stat`: tells a reused pid apart.
    start_time: u64,
    comm: crate::model::Comm,
    workload: Workload,
    sockets: Vec<u64>,
}

/// Socket inode → owning process, kept current cheaply: each refresh reads
/// the fds of new processes (and of pids reused by another process) only;
/// every process's fds are read again at most every `full_scan_every`, and
/// sooner only when asked about inodes nobody is known to own.
pub struct ProcessIndex {
    proc: PathBuf,
    processes: HashMap<u32, ProcessRecord>,
    by_inode: HashMap<u64, u32>,
    last_full_scan: Option<Instant>,
    full_scan_every: Duration,
    /// Never rescan everything more often than this, even for unknown
    /// inodes (a socket whose owner exited stays unknown).
    min_full_scan_gap: Duration,
}

impl ProcessIndex {
    pub fn new() -> Self {
        Self::with_proc(Path::new("/proc"))
    }

    /// An index over another procfs mount (a container's view, tests).
    pub fn with_proc(proc: &Path) -> Self {
        Self {
            proc: proc.to_owned(),
            processes: HashMap::new(),
            by_inode: HashMap::new(),
            last_full_scan: None,
            full_scan_every: Duration::from_mins(1),
            min_full_scan_gap: Duration::from_secs(5),
        }
    }

    /// The owner of a socket inode, as of the last refresh.
    pub fn owner(&self, inode: u64) -> Option<Owner> {
        let pid = *self.by_inode.get(&inode)?;
        let record = self.processes.get(&pid)?;
        Some(Owner {
            pid,
            comm: record.comm.clone(),
            workload: record.workload.clone(),
            pod: None,
        })
    }

    /// Which of `watched` (a socket inode in a process) are still among
    /// that process's descriptors, read now: the index itself may be a
    /// minute old for a process it knew.
    pub fn still_open(&self, watched: &[crate::track::Holder]) -> HashSet<u64> {
        let mut by_pid: HashMap<u32, HashSet<u64>> = HashMap::new();
        for holder in watched {
            by_pid.entry(holder.pid).or_default().insert(holder.inode);
        }
        let mut open = HashSet::new();
        for (pid, wanted) in by_pid {
            let Ok(fds) = std::fs::read_dir(self.proc.join(pid.to_string()).join("fd")) else {
                continue;
            };
            for fd in fds.flatten() {
                if let Ok(target) = std::fs::read_link(fd.path())
                    && let Some(inode) = socket_inode(&target)
                    && wanted.contains(&inode)
                {
                    open.insert(inode);
                }
            }
        }
        open
    }

    pub fn processes(&self) -> usize {
        self.processes.len()
    }

    /// Brings the index up to date for `wanted` socket inodes (0 ignored).
    pub fn refresh_for(&mut self, wanted: &[u64]) {
        let due = self
            .last_full_scan
            .is_none_or(|at| at.elapsed() >= self.full_scan_every);
        if due {
            self.scan(true);
            return;
        }
        self.scan(false);
        let missing = wanted
            .iter()
            .any(|inode| *inode != 0 && !self.by_inode.contains_key(inode));
        if missing
            && self
                .last_full_scan
                .is_none_or(|at| at.elapsed() >= self.min_full_scan_gap)
        {
            self.scan(true);
        }
    }

    /// Reads `/proc`: every process's fds when `full`, otherwise only the
    /// fds of processes not seen before (or whose pid was reused).
    fn scan(&mut self, full: bool) {
        let Ok(dir) = std::fs::read_dir(&self.proc) else {
            return;
        };
        let mut alive = HashSet::new();
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Some(start_time) = start_time(&self.proc, pid) else {
                continue;
            };
            alive.insert(pid);
            let known = self
                .processes
                .get(&pid)
                .is_some_and(|r| r.start_time == start_time);
            if known && !full {
                continue;
            }
            let record = read_process(&self.proc, pid, start_time);
            self.processes.insert(pid, record);
        }
        self.processes.retain(|pid, _| alive.contains(pid));
        self.by_inode.clear();
        // Sockets shared by several processes (fork, SCM_RIGHTS) go to the
        // lowest pid: usually the parent that created them.
        let mut pids: Vec<&u32> = self.processes.keys().collect();
        pids.sort_unstable();
        for pid in pids {
            if let Some(record) = self.processes.get(pid) {
                for inode in &record.sockets {
                    self.by_inode.entry(*inode).or_insert(*pid);
                }
            }
        }
        if full {
            self.last_full_scan = Some(Instant::now());
        }
    }
}

impl Default for ProcessIndex {
    fn default() -> Self {
        Self::new()
    }
}

/// Field 22 of `/proc/<pid>/stat`, after the parenthesised comm (which may
/// contain spaces and parentheses).
fn start_time(proc: &Path, pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields from 3 (state) on; starttime is field 22.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

fn read_process(proc: &Path, pid: u32, start_time: u64) -> ProcessRecord {
    let dir = proc.join(pid.to_string());
    let comm = std::fs::read_to_string(dir.join("comm"))
        .map(|c| c.trim_end_matches('\n').to_owned())
        .unwrap_or_default();
    let workload = std::fs::read_to_string(dir.join("cgroup"))
        .map(|text| parse_proc_cgroup(&text))
        .unwrap_or_default();
    let mut sockets = Vec::new();
    if let Ok(fds) = std::fs::read_dir(dir.join("fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && let Some(inode) = socket_inode(&target)
            {
                sockets.push(inode);
            }
        }
    }
    ProcessRecord {
        start_time,
        comm: crate::model::Comm::new(&comm),
        workload,
        sockets,
    }
}

/// `socket:[12345]` → 12345.
fn socket_inode(target: &Path) -> Option<u64> {
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn socket_link_targets() {
        assert_eq!(socket_inode(Path::new("socket:[4026]")), Some(4026));
        assert_eq!(socket_inode(Path::new("pipe:[4026]")), None);
        assert_eq!(socket_inode(Path::new("/dev/null")), None);
    }

    #[test]
    fn finds_its_own_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let inode = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino();
        let mut index = ProcessIndex::new();
        index.refresh_for(&[inode]);
        let owner = index.owner(inode).unwrap();
        assert_eq!(owner.pid, std::process::id());
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(owner.comm, comm.trim_end());
        // A socket opened after the full scan is found by the rescan that
        // an unknown inode triggers (after the minimum gap).
        let second = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&second);
        let inode2 = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino();
        index.min_full_scan_gap = Duration::ZERO;
        index.refresh_for(&[inode2]);
        assert_eq!(index.owner(inode2).map(|o| o.pid), Some(std::process::id()));
    }

    /// Read now, not from the index: a socket closed since the last scan
    /// is not open; nor is any socket of a process that is gone.
    #[test]
    fn still_open_reads_the_descriptors_now() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&listener);
        let inode = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino();
        let index = ProcessIndex::new();
        let pid = std::process::id();
        let watched = [crate::track::Holder { pid, inode }];
        assert_eq!(index.still_open(&watched), HashSet::from([inode]));
        let elsewhere = [crate::track::Holder {
            pid: u32::MAX,
            inode,
        }];
        assert!(index.still_open(&elsewhere).is_empty());
        drop(listener);
        assert!(index.still_open(&watched).is_empty());
    }

    #[test]
    fn stat_with_spaces_in_comm() {
        let dir = std::env::temp_dir().join(format!("ka-proc-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("42")).unwrap();
        std::fs::write(
            dir.join("42/stat"),
            "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10\n",
        )
        .unwrap();
        assert_eq!(start_time(&dir, 42), Some(123_456));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_process_in_a_pod_gets_its_pod_and_container_names() {
        let workload = parse_cgroup_path(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod5d6f9a3e_1b2c_4d5e_8f9a_0b1c2d3e4f50.slice/cri-containerd-4f0c7d3b9e2a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e.scope",
        );
        let pods = kubernetes::PodsByUid::from([(
            "5d6f9a3e-1b2c-4d5e-8f9a-0b1c2d3e4f50".to_owned(),
            kubernetes::PodRef {
                namespace: "default".to_owned(),
                name: "web-7d4b9c8f6d-x2x9k".to_owned(),
                containers: std::collections::BTreeMap::from([(
                    "4f0c7d3b9e2a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e".to_owned(),
                    "nginx".to_owned(),
                )]),
            },
        )]);
        assert_eq!(
            PodLabels::of(&workload, &pods),
            Some(PodLabels {
                namespace: "default".to_owned(),
                pod: "web-7d4b9c8f6d-x2x9k".to_owned(),
                container: "nginx".to_owned(),
            })
        );
        // A pod of another node, or a process outside any pod: no labels.
        assert_eq!(
            PodLabels::of(&workload, &kubernetes::PodsByUid::new()),
            None
        );
        assert_eq!(PodLabels::of(&Workload::default(), &pods), None);
    }
}
