//! The periodic inventory of the running agent: a background thread dumps
//! every namespace, finds the owners of the sockets and hands the result to
//! the event loop through a channel, so the loop never blocks on /proc or
//! netlink.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    time::{Duration, Instant},
};

use super::{Inventory, dump_all_namespaces};
use crate::attribution::{
    Owner, PodLabels, ProcessIndex,
    kubernetes::{KubernetesClient, PodsByUid},
};

/// One inventory with the owners of its sockets (by socket inode).
#[derive(Clone, Debug, Default)]
pub struct InventoryUpdate {
    pub inventory: Inventory,
    pub owners: HashMap<u64, Owner>,
    /// How long the dump and the attribution took.
    pub took: Duration,
    /// How long the `sock_diag` dump of every namespace took, alone.
    pub dump_took: Duration,
    /// Pod labels were asked for (`--node-name`) but this node's pods could
    /// not be listed for this inventory.
    pub pod_list_failed: bool,
    /// This node's pods as last listed (`--node-name`), for the event loop
    /// to label what no inventory sees: the connections a pod's process
    /// opens and closes between two (see `track::connector`).
    pub pods: Option<Arc<PodsByUid>>,
    /// Only the agent's own network namespace could be dumped: it may not
    /// enter the others (no `CAP_SYS_ADMIN`) or read them.
    pub own_namespace_only: bool,
    pub trigger: Trigger,
    /// The dead connections' sockets the event loop asked about, and which
    /// of them their processes still hold.
    pub holds: HeldSockets,
}

/// Which of a list of sockets (inode, in a process) are still open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeldSockets {
    /// The inodes looked for in their process's descriptors.
    pub checked: Vec<u64>,
    /// Those still among them.
    pub held: std::collections::HashSet<u64>,
    /// The processes found holding sockets watched without one (see
    /// [`crate::track::Holder::pid`]), by inode.
    pub found: std::collections::HashMap<u64, Owner>,
}

/// Looks for the watched sockets in their processes' descriptors; first,
/// for those whose process is not known, in every process's (the index
/// rescans them all at most every few seconds).
fn look_for_holders(
    index: &mut ProcessIndex,
    mut watching: Vec<crate::track::Holder>,
) -> HeldSockets {
    let unknown: Vec<u64> = watching
        .iter()
        .filter(|h| h.pid == 0)
        .map(|h| h.inode)
        .collect();
    let mut found = std::collections::HashMap::new();
    if !unknown.is_empty() {
        index.refresh_for(&unknown);
        for holder in watching.iter_mut().filter(|h| h.pid == 0) {
            if let Some(owner) = index.owner(holder.inode) {
                holder.pid = owner.pid;
                found.insert(holder.inode, owner);
            }
        }
    }
    watching.retain(|h| h.pid != 0);
    HeldSockets {
        checked: watching.iter().map(|h| h.inode).collect(),
        held: index.still_open(&watching),
        found,
    }
}

/// The sockets the event loop wants looked for at each inventory (see
/// [`HeldSockets`]), shared with the inventory thread.
pub type Watched = std::sync::Arc<std::sync::Mutex<Vec<crate::track::Holder>>>;

/// Why an inventory was taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Trigger {
    /// The agent's first, at start-up (also `snapshot` and `audit`).
    #[default]
    Start,
    /// `--inventory-interval` passed since the last one started.
    Interval,
    /// The event loop asked for it early: events were lost, and closes
    /// among them leave connections in the table that are gone.
    EventsLost,
}

impl Trigger {
    pub const ALL: [Self; 3] = [Self::Start, Self::Interval, Self::EventsLost];

    pub fn name(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Interval => "interval",
            Self::EventsLost => "events_lost",
        }
    }
}

/// The receiving end, owned by the event loop.
pub struct InventoryTask {
    pub updates: tokio::sync::mpsc::Receiver<InventoryUpdate>,
    /// Asks for the next inventory now rather than at the interval.
    early: SyncSender<()>,
}

impl InventoryTask {
    /// Takes the next inventory as soon as the current one (if any) is
    /// done: the tracker may hold connections whose close it missed.
    pub fn request_now(&self) {
        match self.early.try_send(()) {
            // Already asked: one early inventory covers both.
            Ok(()) | Err(TrySendError::Full(())) => {}
            Err(TrySendError::Disconnected(())) => {
                tracing::debug!("inventory thread gone; early inventory not taken");
            }
        }
    }
}

/// Waits out the rest of `interval` after `started`, or less if an early
/// inventory is asked for; why the next one is taken. `None` when the
/// event loop has gone.
fn wait_for_next(early: &Receiver<()>, interval: Duration, started: Instant) -> Option<Trigger> {
    match early.recv_timeout(interval.saturating_sub(started.elapsed())) {
        Ok(()) => Some(Trigger::EventsLost),
        Err(RecvTimeoutError::Timeout) => Some(Trigger::Interval),
        Err(RecvTimeoutError::Disconnected) => None,
    }
}

/// Starts the background inventory: one right away, then every `interval`
/// (or earlier, on [`InventoryTask::request_now`]). The thread ends when
/// the receiver is dropped. A failed inventory is counted in `failures`
/// (the table then goes on from events alone until one succeeds).
pub fn spawn(
    interval: Duration,
    node: Option<String>,
    failures: prometheus::IntCounter,
    watched: Watched,
) -> std::io::Result<InventoryTask> {
    // One pending update at most: a slow loop gets the newest, not a queue.
    let (sender, updates) = tokio::sync::mpsc::channel(1);
    let (early, asked_early) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("ka-inventory".to_owned())
        .spawn(move || {
            let mut index = ProcessIndex::new();
            let mut pods = node.as_deref().and_then(PodDirectory::in_cluster);
            let mut trigger = Trigger::Start;
            loop {
                let started = Instant::now();
                match take(&mut index) {
                    Ok(mut update) => {
                        match &mut pods {
                            Some(pods) => pods.label(&mut update),
                            None => update.pod_list_failed = node.is_some(),
                        }
                        let watching = watched.lock().map(|list| list.clone()).unwrap_or_default();
                        update.holds = look_for_holders(&mut index, watching);
                        update.took = started.elapsed();
                        update.trigger = trigger;
                        if sender.blocking_send(update).is_err() {
                            return;
                        }
                    }
                    Err(error) => {
                        failures.inc();
                        tracing::warn!(%error, "inventory failed");
                    }
                }
                match wait_for_next(&asked_early, interval, started) {
                    Some(next) if !sender.is_closed() => trigger = next,
                    _ => return,
                }
            }
        })?;
    Ok(InventoryTask { updates, early })
}

/// One inventory of all namespaces, with owners. Also what `snapshot` and
/// `audit` use.
pub fn take(index: &mut ProcessIndex) -> Result<InventoryUpdate, super::InventoryError> {
    let started = Instant::now();
    let mut own_namespace_only = false;
    let inventory = match dump_all_namespaces() {
        Ok(inventory) => inventory,
        // Without CAP_SYS_ADMIN no other namespace can be entered; the
        // agent's own is still worth its inventory.
        Err(error) if error.leaves_only_own_namespace() => {
            tracing::warn!(%error, "inventory limited to the agent's own network namespace");
            own_namespace_only = true;
            super::Inventory {
                namespaces: vec![super::dump_namespace(None)?],
            }
        }
        Err(error) => return Err(error),
    };
    let dump_took = started.elapsed();
    let inodes: Vec<u64> = inventory.sockets().map(|s| s.inode).collect();
    index.refresh_for(&inodes);
    let owners = inodes
        .iter()
        .filter_map(|inode| Some((*inode, index.owner(*inode)?)))
        .collect();
    Ok(InventoryUpdate {
        inventory,
        owners,
        took: started.elapsed(),
        dump_took,
        pod_list_failed: false,
        pods: None,
        own_namespace_only,
        trigger: Trigger::Start,
        holds: HeldSockets::default(),
    })
}

/// This node's pods from the Kubernetes API, asked again with every
/// inventory; the last good answer stays when the API does not answer.
struct PodDirectory {
    client: KubernetesClient,
    pods: Arc<PodsByUid>,
}

impl PodDirectory {
    fn in_cluster(node: &str) -> Option<Self> {
        match KubernetesClient::in_cluster(node) {
            Ok(client) => {
                tracing::info!(
                    node,
                    "pod labels from the Kubernetes API (pods of this node)"
                );
                Some(Self {
                    client,
                    pods: Arc::new(PodsByUid::new()),
                })
            }
            Err(error) => {
                tracing::warn!(%error, node, "no pod labels: the Kubernetes API is not reachable");
                None
            }
        }
    }

    fn label(&mut self, update: &mut InventoryUpdate) {
        match self.client.pods_on_node() {
            Ok(pods) => self.pods = Arc::new(pods),
            Err(error) => {
                tracing::warn!(%error, "listing this node's pods failed; keeping the last list");
                update.pod_list_failed = true;
            }
        }
        for owner in update.owners.values_mut() {
            owner.pod = PodLabels::of(&owner.workload, &self.pods);
        }
        update.pods = Some(Arc::clone(&self.pods));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unanswered_pod_list_is_reported_and_the_last_list_kept() {
        // A port nothing listens on: the API does not answer.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let last = PodsByUid::from([(
            "uid".to_owned(),
            crate::attribution::kubernetes::PodRef {
                namespace: "default".to_owned(),
                name: "web".to_owned(),
                containers: std::collections::BTreeMap::new(),
            },
        )]);
        let mut directory = PodDirectory {
            client: KubernetesClient::with_base_url(&url, None, "node-a"),
            pods: Arc::new(last.clone()),
        };
        let mut update = InventoryUpdate {
            inventory: Inventory {
                namespaces: Vec::new(),
            },
            owners: HashMap::new(),
            took: Duration::ZERO,
            dump_took: Duration::ZERO,
            pod_list_failed: false,
            pods: None,
            own_namespace_only: false,
            trigger: Trigger::Start,
            holds: HeldSockets::default(),
        };
        directory.label(&mut update);
        assert!(update.pod_list_failed);
        assert_eq!(*directory.pods, last);
        assert_eq!(update.pods.as_deref(), Some(&last));
    }
}
