//! The periodic inventory of the running agent: a background thread dumps
//! every namespace, finds the owners of the sockets and hands the result to
//! the event loop through a channel, so the loop never blocks on /proc or
//! netlink.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::{Inventory, dump_all_namespaces};
use crate::attribution::{Owner, ProcessIndex};

/// One inventory with the owners of its sockets (by socket inode).
#[derive(Clone, Debug, Default)]
pub struct InventoryUpdate {
    pub inventory: Inventory,
    pub owners: HashMap<u64, Owner>,
    /// How long the dump and the attribution took.
    pub took: Duration,
}

/// The receiving end, owned by the event loop.
pub struct InventoryTask {
    pub updates: tokio::sync::mpsc::Receiver<InventoryUpdate>,
}

/// Starts the background inventory: one right away, then every `interval`.
/// The thread ends when the receiver is dropped.
pub fn spawn(interval: Duration) -> std::io::Result<InventoryTask> {
    // One pending update at most: a slow loop gets the newest, not a queue.
    let (sender, updates) = tokio::sync::mpsc::channel(1);
    std::thread::Builder::new()
        .name("ka-inventory".to_owned())
        .spawn(move || {
            let mut index = ProcessIndex::new();
            loop {
                let started = Instant::now();
                match take(&mut index) {
                    Ok(mut update) => {
                        update.took = started.elapsed();
                        if sender.blocking_send(update).is_err() {
                            return;
                        }
                    }
                    Err(error) => tracing::warn!(%error, "inventory failed"),
                }
                std::thread::sleep(interval.saturating_sub(started.elapsed()));
                if sender.is_closed() {
                    return;
                }
            }
        })?;
    Ok(InventoryTask { updates })
}

/// One inventory of all namespaces, with owners. Also what `snapshot` and
/// `audit` use.
pub fn take(index: &mut ProcessIndex) -> Result<InventoryUpdate, super::InventoryError> {
    let inventory = match dump_all_namespaces() {
        Ok(inventory) => inventory,
        // Without CAP_SYS_ADMIN no other namespace can be entered; the
        // agent's own is still worth its inventory.
        Err(error) => {
            tracing::warn!(%error, "inventory limited to the agent's own network namespace");
            super::Inventory {
                namespaces: vec![super::dump_namespace(None)?],
            }
        }
    };
    let inodes: Vec<u64> = inventory.sockets().map(|s| s.inode).collect();
    index.refresh_for(&inodes);
    let owners = inodes
        .iter()
        .filter_map(|inode| Some((*inode, index.owner(*inode)?)))
        .collect();
    Ok(InventoryUpdate {
        inventory,
        owners,
        took: Duration::ZERO,
    })
}
