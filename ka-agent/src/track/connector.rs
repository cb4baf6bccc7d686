//! Names for the processes the kernel program saw connecting outbound
//! sockets.
//!
//! The program sends the process id and the calling thread's name. A
//! thread's name is often not its process's (Java's `pool-1-thread-3`,
//! Envoy's `wrk:worker_0`), while an inventory names a socket's owner by
//! its process: so the process's own name is read from `/proc` once in a
//! while, and the thread's is only what is left when the process is gone.
//! In Kubernetes the process's cgroup is read with it, for its pod: a
//! connection opened and closed between two inventories is otherwise
//! never labelled with one.
//!
//! All of it holds only where `/proc` shows the kernel's process ids: an
//! agent in a PID namespace of its own (a container without `hostPID`)
//! would read another process's, or none. The agent connects once at
//! start-up from a thread named after its own id in `/proc`
//! ([`self_probe_thread`]); the kernel program's record of that connect
//! tells which case holds.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use ka_common::Connector;

use crate::{
    attribution::{PodLabels, Workload, kubernetes::PodsByUid, parse_proc_cgroup},
    model::Comm,
};

/// How long a process's name is taken as read: it changes only at `exec`
/// or when the process sets it (and its cgroup hardly ever).
const NAME_KEPT_NS: u64 = 10_000_000_000;

/// Processes and distinct names kept; past that the caches start over.
const NAMES_KEPT: usize = 4096;

/// What a connection is named after its connector.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ConnectorName {
    pub(super) comm: Comm,
    /// Its pod, in Kubernetes (`--node-name`), once this node's pods are
    /// listed.
    pub(super) pod: Option<PodLabels>,
}

/// One process as read from `/proc`.
#[derive(Debug)]
struct ProcessSeen {
    comm: Comm,
    /// Read only while pods are listed (`None` before).
    workload: Option<Workload>,
    read_at_ns: u64,
}

/// The agent's own process id as `proc` (a procfs mount) shows it.
pub fn own_pid_in(proc: &Path) -> Option<u32> {
    std::fs::read_link(proc.join("self"))
        .ok()?
        .to_str()?
        .parse()
        .ok()
}

/// The name of the thread the agent connects from once at start-up: its
/// own process id as `/proc` shows it (`pid`), in hex to fit a thread
/// name's 15 bytes. Unique to this agent on its host, whose other agents
/// (tests run many) see that connect too.
pub fn self_probe_thread(pid: u32) -> String {
    format!("ka-probe-{pid:x}")
}

/// The caches behind [`ConnectorNames::name`].
#[derive(Debug)]
pub(super) struct ConnectorNames {
    proc: PathBuf,
    /// The agent's process id in `proc`, and its probe thread's name as the
    /// kernel records a `comm` (NUL-padded).
    own: Option<(u32, [u8; 16])>,
    /// The agent's probe came with another process id than `proc` shows
    /// for it: `/proc/<pid>` of a connector is not that process. Names are
    /// then the threads' own, as the kernel recorded them, without pods.
    foreign_pids: bool,
    by_process: hashbrown::HashMap<u32, ProcessSeen>,
    /// One shared name per distinct text.
    interned: hashbrown::HashMap<String, Comm>,
    /// This node's pods, from the last inventory (`None` outside
    /// Kubernetes).
    pods: Option<Arc<PodsByUid>>,
}

impl ConnectorNames {
    pub(super) fn new() -> Self {
        Self::with_proc(Path::new("/proc"))
    }

    pub(super) fn with_proc(proc: &Path) -> Self {
        let own = own_pid_in(proc).map(|pid| {
            let mut comm = [0u8; 16];
            let name = self_probe_thread(pid);
            let len = name.len().min(15);
            comm[..len].copy_from_slice(&name.as_bytes()[..len]);
            (pid, comm)
        });
        Self {
            proc: proc.to_owned(),
            own,
            foreign_pids: false,
            by_process: hashbrown::HashMap::new(),
            interned: hashbrown::HashMap::new(),
            pods: None,
        }
    }

    /// The agent's probe came with another process id than `/proc` shows.
    pub(super) fn foreign_pids(&self) -> bool {
        self.foreign_pids
    }

    /// This node's pods as the last inventory listed them.
    pub(super) fn set_pods(&mut self, pods: Option<Arc<PodsByUid>>) {
        self.pods = pods;
    }

    /// The name (and pod) of the process `connector` describes, as of
    /// `now_ns`; `None` when the program recorded none.
    pub(super) fn name(&mut self, connector: &Connector, now_ns: u64) -> Option<ConnectorName> {
        if connector.tgid == 0 {
            return None;
        }
        if let Some((pid, probe)) = self.own
            && connector.comm == probe
        {
            self.check_own_pid(pid, connector.tgid);
        }
        if self.foreign_pids {
            let comm = self.intern(thread_name(&connector.comm));
            return Some(ConnectorName { comm, pod: None });
        }
        let pods = self.pods.as_deref();
        let fresh = self.by_process.get(&connector.tgid).filter(|seen| {
            now_ns.saturating_sub(seen.read_at_ns) < NAME_KEPT_NS
                && (pods.is_none() || seen.workload.is_some())
        });
        if let Some(seen) = fresh {
            return Some(ConnectorName {
                comm: seen.comm.clone(),
                pod: pod_of(seen, pods),
            });
        }
        let seen = self.read(connector, now_ns);
        let name = ConnectorName {
            comm: seen.comm.clone(),
            pod: pod_of(&seen, self.pods.as_deref()),
        };
        if self.by_process.len() >= NAMES_KEPT {
            self.by_process.clear();
        }
        self.by_process.insert(connector.tgid, seen);
        Some(name)
    }

    /// Compares the id the kernel recorded for the agent's probe with the
    /// one `/proc` shows for the agent.
    fn check_own_pid(&mut self, in_proc: u32, in_kernel: u32) {
        if in_proc == in_kernel {
            tracing::debug!(
                pid = in_proc,
                "the kernel's process ids are /proc's: connections named after their process"
            );
        } else if !self.foreign_pids {
            self.foreign_pids = true;
            self.by_process.clear();
            tracing::warn!(
                in_proc,
                in_kernel,
                "the agent runs in a PID namespace of its own (a container without hostPID): \
                 outbound connections are named after the connecting thread, without pod \
                 labels, and inventories find no process outside this namespace"
            );
        }
    }

    /// Reads the process from `/proc`; the thread's name when it is gone.
    fn read(&mut self, connector: &Connector, now_ns: u64) -> ProcessSeen {
        let dir = self.proc.join(connector.tgid.to_string());
        let text = std::fs::read_to_string(dir.join("comm")).map_or_else(
            |_| thread_name(&connector.comm),
            |text| text.trim_end_matches('\n').to_owned(),
        );
        let workload = self.pods.is_some().then(|| {
            std::fs::read_to_string(dir.join("cgroup"))
                .map(|text| parse_proc_cgroup(&text))
                .unwrap_or_default()
        });
        ProcessSeen {
            comm: self.intern(text),
            workload,
            read_at_ns: now_ns,
        }
    }

    fn intern(&mut self, text: String) -> Comm {
        if let Some(comm) = self.interned.get(&text) {
            return comm.clone();
        }
        if self.interned.len() >= NAMES_KEPT {
            self.interned.clear();
        }
        let comm = Comm::new(&text);
        self.interned.insert(text, comm.clone());
        comm
    }
}

/// The pod of a process seen, among this node's pods.
fn pod_of(seen: &ProcessSeen, pods: Option<&PodsByUid>) -> Option<PodLabels> {
    PodLabels::of(seen.workload.as_ref()?, pods?)
}

/// A `comm` as the kernel sends it: NUL-padded bytes.
fn thread_name(raw: &[u8; 16]) -> String {
    let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..len]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector(tgid: u32, thread: &str) -> Connector {
        let mut connector = Connector {
            tgid,
            ..Connector::default()
        };
        connector.comm[..thread.len()].copy_from_slice(thread.as_bytes());
        connector
    }

    /// The name given to a connector, as text.
    fn comm(names: &mut ConnectorNames, tgid: u32, thread: &str, at: u64) -> Option<String> {
        let name = names.name(&connector(tgid, thread), at);
        name.map(|n| n.comm.as_str().to_owned())
    }

    /// A procfs of the test's making: a directory per process, with the
    /// files given; removed on drop, also when the test fails.
    struct FakeProc(std::path::PathBuf);

    impl FakeProc {
        fn new(test: &str, processes: &[(&str, &[(&str, &str)])]) -> Self {
            let root = std::env::temp_dir().join(format!("ka-{test}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            for (pid, files) in processes {
                std::fs::create_dir_all(root.join(pid)).unwrap();
                for (file, text) in *files {
                    std::fs::write(root.join(pid).join(file), text).unwrap();
                }
            }
            Self(root)
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_connector_is_named_after_its_process_not_its_thread() {
        let fake = FakeProc::new("connector", &[("4242", &[("comm", "envoy\n")])]);
        let proc = &fake.0;
        let mut names = ConnectorNames::with_proc(proc);
        let worker = comm(&mut names, 4242, "wrk:worker_0", 1_000);
        assert_eq!(worker.as_deref(), Some("envoy"));
        // A process gone: the thread's name is what is left.
        let gone = comm(&mut names, 4343, "curl", 1_000);
        assert_eq!(gone.as_deref(), Some("curl"));
        // Read again only after a while: a renamed process shows then.
        std::fs::write(proc.join("4242/comm"), "envoy-1.30\n").unwrap();
        let kept = comm(&mut names, 4242, "wrk:worker_1", 2_000);
        assert_eq!(kept.as_deref(), Some("envoy"));
        let reread = comm(&mut names, 4242, "wrk:worker_1", 1_000 + NAME_KEPT_NS);
        assert_eq!(reread.as_deref(), Some("envoy-1.30"));
        // Nothing recorded: no name.
        assert!(names.name(&Connector::default(), 1_000).is_none());
    }

    #[test]
    fn the_live_process_is_named_from_proc() {
        let own = std::fs::read_to_string("/proc/self/comm").unwrap();
        let mut names = ConnectorNames::new();
        let tgid = std::process::id();
        let this = names.name(&connector(tgid, "some-thread"), 1);
        assert_eq!(this.as_ref().map(|n| n.comm.as_str()), Some(own.trim_end()));
    }

    /// The agent's probe, recorded with another id than `/proc` shows for
    /// the agent: from then on connectors are named after their thread,
    /// without reading `/proc`, whose ids are another namespace's.
    #[test]
    fn a_probe_with_a_foreign_pid_turns_to_thread_names() {
        let fake = FakeProc::new("connector-ns", &[("1", &[("comm", "ka-agent\n")])]);
        std::os::unix::fs::symlink("1", fake.0.join("self")).unwrap();
        let mut names = ConnectorNames::with_proc(&fake.0);
        // Before the probe: the host's process 1 read as this /proc's 1.
        let host_init = |names: &mut ConnectorNames| comm(names, 1, "systemd", 1_000);
        assert_eq!(host_init(&mut names).as_deref(), Some("ka-agent"));
        // Another agent's probe changes nothing.
        let other = comm(&mut names, 777, "ka-probe-2", 1_000);
        assert_eq!(other.as_deref(), Some("ka-probe-2"));
        assert_eq!(host_init(&mut names).as_deref(), Some("ka-agent"));
        // This agent's probe (process 1 here) with the kernel's id 4242.
        assert_eq!(self_probe_thread(1), "ka-probe-1");
        comm(&mut names, 4242, "ka-probe-1", 1_000);
        assert_eq!(host_init(&mut names).as_deref(), Some("systemd"));
    }

    /// The live agent's probe: this process, as the kernel would record it.
    #[test]
    fn a_probe_with_this_procs_pid_keeps_process_names() {
        let pid = own_pid_in(Path::new("/proc")).unwrap();
        assert_eq!(pid, std::process::id());
        let mut names = ConnectorNames::new();
        let probe = self_probe_thread(pid);
        names.name(&connector(pid, &probe), 1);
        assert!(!names.foreign_pids);
        let own = std::fs::read_to_string("/proc/self/comm").unwrap();
        let this = names.name(&connector(pid, "some-thread"), 2).unwrap();
        assert_eq!(this.comm.as_str(), own.trim_end());
    }

    /// In Kubernetes a connector's pod comes from its cgroup, read with its
    /// name, and this node's pods as the last inventory listed them.
    #[test]
    fn a_connector_in_a_pod_is_labelled_with_it() {
        const UID: &str = "7c0e2a4d-3f1b-4c5d-9e8f-0a1b2c3d4e5f";
        const ID: &str = "9d1f4b2c6e8a0b3d5f7e9c1a2b4d6f8e0a1c3e5b7d9f1a3c5e7b9d1f3a5c7e9b";
        let in_pod = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{ID}.scope\n",
            UID.replace('-', "_")
        );
        let fake = FakeProc::new(
            "connector-pod",
            &[
                ("4242", &[("comm", "cart\n"), ("cgroup", &in_pod)]),
                (
                    "4343",
                    &[
                        ("comm", "cron\n"),
                        ("cgroup", "0::/system.slice/cron.service\n"),
                    ],
                ),
            ],
        );
        let mut names = ConnectorNames::with_proc(&fake.0);
        // Outside Kubernetes, or before the first pod list: no pod.
        let before = names.name(&connector(4242, "cart"), 1_000).unwrap();
        assert_eq!(before.pod, None);
        let pods = PodsByUid::from([(
            UID.to_owned(),
            crate::attribution::kubernetes::PodRef {
                namespace: "shop".to_owned(),
                name: "cart-0".to_owned(),
                containers: std::collections::BTreeMap::from([(ID.to_owned(), "app".to_owned())]),
            },
        )]);
        names.set_pods(Some(Arc::new(pods)));
        // Listed since: the process is read again for its cgroup, at once.
        let in_pod = names.name(&connector(4242, "cart"), 2_000).unwrap();
        assert_eq!(
            in_pod.pod,
            Some(PodLabels {
                namespace: "shop".to_owned(),
                pod: "cart-0".to_owned(),
                container: "app".to_owned(),
            })
        );
        assert_eq!(in_pod.comm.as_str(), "cart");
        // A process outside any pod, and one gone: no pod.
        assert_eq!(
            names.name(&connector(4343, "cron"), 2_000).unwrap().pod,
            None
        );
        assert_eq!(
            names.name(&connector(4444, "gone"), 2_000).unwrap().pod,
            None
        );
    }
}
