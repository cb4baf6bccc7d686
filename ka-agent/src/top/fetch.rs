//! Reading the agent: a GET through `ureq` (the agent's own server, on a
//! trusted address), and the poller thread that fetches the connections
//! and `/metrics` so the UI never waits.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use super::view::{Row, Totals};

/// Largest answer read (a big table is a few MB; more is an error).
const MAX_BODY: u64 = 64 * 1024 * 1024;
/// Most connections asked for per refresh.
pub const FETCH_LIMIT: usize = 5000;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{addr}{path}: {source}")]
    Http {
        addr: SocketAddr,
        path: String,
        #[source]
        source: ureq::Error,
    },
    #[error("{addr}{path}: HTTP {code}")]
    Status {
        addr: SocketAddr,
        path: String,
        code: u16,
    },
    #[error("{addr}{path}: invalid JSON: {source}")]
    Json {
        addr: SocketAddr,
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The body of `GET path` when the answer is 200, within `timeout` for
/// the whole exchange.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<String, FetchError> {
    let http = |source| FetchError::Http {
        addr,
        path: path.to_owned(),
        source,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .get(format!("http://{addr}{path}"))
        .call()
        .map_err(http)?;
    let code = response.status().as_u16();
    if code != 200 {
        return Err(FetchError::Status {
            addr,
            path: path.to_owned(),
            code,
        });
    }
    response
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_string()
        .map_err(http)
}

/// True when something answers `/healthz` at `addr`.
pub fn answers(addr: SocketAddr, timeout: Duration) -> bool {
    http_get(addr, "/healthz", timeout).is_ok()
}

/// One refresh: the connections and the counters behind the rates.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub rows: Vec<Row>,
    pub totals: Totals,
    /// See [`super::view::held_by_process`].
    pub held_by: Vec<(String, u64)>,
    pub at: Instant,
}

/// Fetches the connections and the metrics once.
pub fn fetch(addr: SocketAddr, timeout: Duration) -> Result<Fetched, FetchError> {
    let path = format!("/api/v1/connections?limit={FETCH_LIMIT}");
    let body = http_get(addr, &path, timeout)?;
    let json: serde_json::Value =
        serde_json::from_str(&body).map_err(|source| FetchError::Json {
            addr,
            path: path.clone(),
            source,
        })?;
    let rows = json["connections"]
        .as_array()
        .map(|list| list.iter().filter_map(Row::from_json).collect())
        .unwrap_or_default();
    let metrics = http_get(addr, "/metrics", timeout)?;
    Ok(Fetched {
        rows,
        totals: Totals::from_metrics(&metrics),
        held_by: super::view::held_by_process(&metrics),
        at: Instant::now(),
    })
}

/// The poller: fetches every `every` until `stop` is set or the receiver is
/// gone; each result (or error text) goes to the returned channel.
pub fn spawn_poller(
    addr: SocketAddr,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::io::Result<mpsc::Receiver<Result<Fetched, String>>> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("ka-top-fetch".into())
        .spawn(move || {
            let timeout = every.max(Duration::from_secs(2));
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = fetch(addr, timeout).map_err(|e| e.to_string());
                if tx.send(result).is_err() {
                    return;
                }
                // Sleep in small steps so a quit is noticed quickly.
                while started.elapsed() < every && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    #[test]
    fn get_from_a_tiny_server() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            for answer in [
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                "HTTP/1.1 503 Service Unavailable\r\n\r\nbusy",
            ] {
                let (mut stream, _) = listener.accept().unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 512];
                while !request.ends_with(b"\r\n\r\n") {
                    let n = stream.read(&mut buf).unwrap();
                    assert!(n > 0, "request cut short");
                    request.extend_from_slice(&buf[..n]);
                }
                stream.write_all(answer.as_bytes()).unwrap();
            }
        });
        assert_eq!(
            http_get(addr, "/healthz", Duration::from_secs(2)).unwrap(),
            "ok"
        );
        assert!(matches!(
            http_get(addr, "/readyz", Duration::from_secs(2)),
            Err(FetchError::Status { code: 503, .. })
        ));
        server.join().unwrap();
        // Nothing listens there any more.
        assert!(!answers(addr, Duration::from_millis(500)));
    }
}
