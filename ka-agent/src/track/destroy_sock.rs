//! Interprets `tcp:tcp_destroy_sock`: the socket is freed, so its address
//! may be reused; forget any record still keyed by it.

use ka_common::DestroySockEvent;

use super::Tracker;

impl Tracker {
    pub(super) fn on_destroy_sock(&mut self, event: &DestroySockEvent) {
        self.settle(event.sock.sk);
        self.connections.remove(&event.sock.sk);
    }
}
