//! `GET` from the agent's HTTP server on loopback, for the tests and the
//! tools (the bench times its scrapes byte by byte and keeps its own).

use std::{net::SocketAddr, time::Duration};

/// Largest body read: `/metrics` and the API of a busy test agent are a few
/// MiB at most.
const MAX_BODY: u64 = 256 * 1024 * 1024;

/// The status and body of `GET path` from `addr`; `None` when nothing
/// answered (2 s to connect, 7 s for the whole exchange).
#[must_use]
pub fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(2)))
        .timeout_global(Some(Duration::from_secs(7)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent.get(format!("http://{addr}{path}")).call().ok()?;
    let code = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_string()
        .ok()?;
    Some((code, body))
}

/// The body of `GET path` when the answer is 200.
#[must_use]
pub fn get_ok(addr: SocketAddr, path: &str) -> Option<String> {
    get(addr, path).and_then(|(code, body)| (code == 200).then_some(body))
}
