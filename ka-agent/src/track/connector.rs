//! Names for the processes the kernel program saw connecting outbound
//! sockets.
//!
//! The program sends the process id and the calling thread's name. A
//! thread's name is often not its process's (Java's `pool-1-thread-3`,
//! Envoy's `wrk:worker_0`), while an inventory names a socket's owner by
//! its process: so the process's own name is read from `/proc` once in a
//! while, and the thread's is only what is left when the process is gone.

use std::path::{Path, PathBuf};

use ka_common::Connector;

use crate::model::Comm;

/// How long a process's name is taken as read: it changes only at `exec`
/// or when the process sets it.
const NAME_KEPT_NS: u64 = 10_000_000_000;

/// Processes and distinct names kept; past that the caches start over.
const NAMES_KEPT: usize = 4096;

/// The caches behind [`ConnectorNames::name`].
#[derive(Debug)]
pub(super) struct ConnectorNames {
    proc: PathBuf,
    /// By process id: its name and when it was read.
    by_process: hashbrown::HashMap<u32, (Comm, u64)>,
    /// One shared name per distinct text.
    interned: hashbrown::HashMap<String, Comm>,
}

impl ConnectorNames {
    pub(super) fn new() -> Self {
        Self::with_proc(Path::new("/proc"))
    }

    pub(super) fn with_proc(proc: &Path) -> Self {
        Self {
            proc: proc.to_owned(),
            by_process: hashbrown::HashMap::new(),
            interned: hashbrown::HashMap::new(),
        }
    }

    /// The name of the process `connector` describes, as of `now_ns`;
    /// `None` when the program recorded none.
    pub(super) fn name(&mut self, connector: &Connector, now_ns: u64) -> Option<Comm> {
        if connector.tgid == 0 {
            return None;
        }
        if let Some((comm, read_at)) = self.by_process.get(&connector.tgid)
            && now_ns.saturating_sub(*read_at) < NAME_KEPT_NS
        {
            return Some(comm.clone());
        }
        let path = self.proc.join(connector.tgid.to_string()).join("comm");
        let text = std::fs::read_to_string(path).map_or_else(
            |_| thread_name(&connector.comm),
            |text| text.trim_end_matches('\n').to_owned(),
        );
        let comm = self.intern(text);
        if self.by_process.len() >= NAMES_KEPT {
            self.by_process.clear();
        }
        self.by_process
            .insert(connector.tgid, (comm.clone(), now_ns));
        Some(comm)
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

    #[test]
    fn a_connector_is_named_after_its_process_not_its_thread() {
        let proc = std::env::temp_dir().join(format!("ka-connector-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&proc);
        std::fs::create_dir_all(proc.join("4242")).unwrap();
        std::fs::write(proc.join("4242/comm"), "envoy\n").unwrap();
        let mut names = ConnectorNames::with_proc(&proc);
        let worker = names.name(&connector(4242, "wrk:worker_0"), 1_000);
        assert_eq!(worker.as_ref().map(Comm::as_str), Some("envoy"));
        // A process gone: the thread's name is what is left.
        let gone = names.name(&connector(4343, "curl"), 1_000);
        assert_eq!(gone.as_ref().map(Comm::as_str), Some("curl"));
        // Read again only after a while: a renamed process shows then.
        std::fs::write(proc.join("4242/comm"), "envoy-1.30\n").unwrap();
        let kept = names.name(&connector(4242, "wrk:worker_1"), 2_000);
        assert_eq!(kept.as_ref().map(Comm::as_str), Some("envoy"));
        let reread = names.name(&connector(4242, "wrk:worker_1"), 1_000 + NAME_KEPT_NS);
        assert_eq!(reread.as_ref().map(Comm::as_str), Some("envoy-1.30"));
        // Nothing recorded: no name.
        assert!(names.name(&Connector::default(), 1_000).is_none());
        let _ = std::fs::remove_dir_all(&proc);
    }

    #[test]
    fn the_live_process_is_named_from_proc() {
        let own = std::fs::read_to_string("/proc/self/comm").unwrap();
        let mut names = ConnectorNames::new();
        let tgid = std::process::id();
        let this = names.name(&connector(tgid, "some-thread"), 1);
        assert_eq!(this.as_ref().map(Comm::as_str), Some(own.trim_end()));
    }
}
