//! The HTTP server: /metrics, /healthz, /readyz, /api/v1/connections.
//! `/metrics` reads only atomics, so a scrape never waits for event
//! processing and event processing never waits for it. The API asks the
//! event loop, which answers between two batches of events from the table it
//! owns: no copy of the table is kept for it.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Serialize;

use crate::{metrics::Metrics, track::Connection};

/// A connection as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ConnectionView {
    #[serde(flatten)]
    pub connection: Connection,
    pub idle_secs: f64,
    pub class: &'static str,
    pub at_risk: Vec<AtRisk>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct AtRisk {
    pub reason: &'static str,
    pub idle_timeout: String,
}

/// What the handlers share.
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
    /// Questions for the event loop, which owns the connection table.
    pub queries: tokio::sync::mpsc::Sender<ApiQuery>,
}

/// Which connections a request wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionFilter {
    pub class: Option<String>,
    pub at_risk: Option<bool>,
    pub port: Option<u16>,
    pub limit: Option<usize>,
}

impl ConnectionFilter {
    pub fn matches(&self, view: &ConnectionView) -> bool {
        self.class.as_ref().is_none_or(|k| view.class == k.as_str())
            && self
                .at_risk
                .is_none_or(|want| want != view.at_risk.is_empty())
            && self.port.is_none_or(|p| {
                view.connection.local.port() == p || view.connection.remote.port() == p
            })
    }
}

/// A question to the event loop, answered between two batches of events.
pub enum ApiQuery {
    Connections {
        filter: ConnectionFilter,
        reply: tokio::sync::oneshot::Sender<Vec<ConnectionView>>,
    },
    Closed {
        cause: Option<crate::model::CloseCause>,
        /// Only those a process still holds (`Some(true)`), or only the
        /// others.
        held: Option<bool>,
        limit: usize,
        reply: tokio::sync::oneshot::Sender<Vec<crate::track::ClosedConnection>>,
    },
}

/// Asks the event loop; `None` when it does not answer in time.
async fn ask<T>(
    shared: &Shared,
    query: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> ApiQuery,
) -> Option<T> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    shared.queries.send(query(reply)).await.ok()?;
    tokio::time::timeout(std::time::Duration::from_secs(5), answer)
        .await
        .ok()?
        .ok()
}

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "error": "the agent's event loop did not answer in time" })),
    )
        .into_response()
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/connections", get(connections))
        .route("/api/v1/closed", get(closed))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>, headers: axum::http::HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            shared.metrics.render_openmetrics(),
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            shared.metrics.render(),
        )
            .into_response()
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

fn bad_request(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({ "error": message })),
    )
        .into_response()
}

const CLASSES: [&str; 5] = ["zombie", "probing", "at_risk", "ok", "closing"];

async fn connections(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let mut filter = ConnectionFilter::default();
    for (key, value) in &params {
        match key.as_str() {
            "class" if CLASSES.contains(&value.as_str()) => filter.class = Some(value.clone()),
            "class" => {
                return bad_request(&format!(
                    "invalid class {value:?}: expected one of {}",
                    CLASSES.join(", ")
                ));
            }
            "at_risk" => match value.as_str() {
                "true" => filter.at_risk = Some(true),
                "false" => filter.at_risk = Some(false),
                _ => {
                    return bad_request(&format!(
                        "invalid at_risk {value:?}: expected true or false"
                    ));
                }
            },
            "port" => match value.parse::<u16>() {
                Ok(p) => filter.port = Some(p),
                Err(_) => return bad_request(&format!("invalid port {value:?}: expected 0-65535")),
            },
            "limit" => match value.parse::<usize>() {
                Ok(l) => filter.limit = Some(l),
                Err(_) => {
                    return bad_request(&format!(
                        "invalid limit {value:?}: expected a non-negative integer"
                    ));
                }
            },
            other => return bad_request(&format!("unknown query parameter {other:?}")),
        }
    }
    let Some(selected) = ask(&shared, |reply| ApiQuery::Connections { filter, reply }).await else {
        return unavailable();
    };
    Json(serde_json::json!({ "connections": selected, "count": selected.len() })).into_response()
}

/// Recently closed connections with their death cause, newest first;
/// `?cause=`, `?held=` and `?limit=` filter.
async fn closed(
    State(shared): State<Arc<Shared>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let mut cause = None;
    let mut held = None;
    let mut limit = usize::MAX;
    for (key, value) in &params {
        match key.as_str() {
            "cause" => {
                let all = crate::model::CloseCause::ALL;
                let Some(found) = all.iter().find(|c| c.name() == value) else {
                    let names: Vec<&str> = all.iter().map(|c| c.name()).collect();
                    return bad_request(&format!(
                        "invalid cause {value:?}: expected one of {}",
                        names.join(", ")
                    ));
                };
                cause = Some(*found);
            }
            "held" => match value.as_str() {
                "true" => held = Some(true),
                "false" => held = Some(false),
                _ => {
                    return bad_request(&format!("invalid held {value:?}: expected true or false"));
                }
            },
            "limit" => match value.parse() {
                Ok(l) => limit = l,
                Err(_) => {
                    return bad_request(&format!(
                        "invalid limit {value:?}: expected a non-negative integer"
                    ));
                }
            },
            other => return bad_request(&format!("unknown query parameter {other:?}")),
        }
    }
    let Some(selected) = ask(&shared, |reply| ApiQuery::Closed {
        cause,
        held,
        limit,
        reply,
    })
    .await
    else {
        return unavailable();
    };
    Json(serde_json::json!({ "connections": selected, "count": selected.len() })).into_response()
}

/// The API class of a connection, worst first.
pub fn class_of(connection: &Connection, at_risk: bool) -> &'static str {
    use crate::model::TcpState;
    if connection.zombie.is_some() {
        "zombie"
    } else if connection.keepalive.unanswered > 0 && connection.state == TcpState::Established {
        "probing"
    } else if at_risk {
        "at_risk"
    } else if connection.state == TcpState::Established {
        "ok"
    } else {
        "closing"
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::{
        metrics::SeriesLimits,
        model::{Direction, TcpState, ZombieKind},
        track::{Connection, Keepalive},
    };

    fn connection(port: u16, state: TcpState, zombie: Option<ZombieKind>) -> Connection {
        let local: SocketAddr = format!("198.18.0.1:{port}").parse().unwrap();
        let remote: SocketAddr = "198.18.0.2:40000".parse().unwrap();
        let mut c = Connection::for_tests(local, remote, Direction::Inbound, state);
        c.zombie = zombie;
        c.keepalive = Keepalive::default();
        c
    }

    fn shared() -> Arc<Shared> {
        let views = [
            ConnectionView {
                connection: connection(80, TcpState::Established, Some(ZombieKind::ResetAfterIdle)),
                idle_secs: 1.0,
                class: "zombie",
                at_risk: Vec::new(),
            },
            ConnectionView {
                connection: connection(443, TcpState::Established, None),
                idle_secs: 500.0,
                class: "at_risk",
                at_risk: vec![AtRisk {
                    reason: "keepalive_disabled",
                    idle_timeout: "aws-nlb".into(),
                }],
            },
            ConnectionView {
                connection: connection(443, TcpState::Established, None),
                idle_secs: 2.0,
                class: "ok",
                at_risk: Vec::new(),
            },
        ];
        // The event loop's side, answering from a fixed table.
        let (queries, mut asked) = tokio::sync::mpsc::channel::<ApiQuery>(4);
        tokio::spawn(async move {
            while let Some(query) = asked.recv().await {
                match query {
                    ApiQuery::Connections { filter, reply } => {
                        let selected = views
                            .iter()
                            .filter(|v| filter.matches(v))
                            .take(filter.limit.unwrap_or(usize::MAX))
                            .cloned()
                            .collect();
                        let _ = reply.send(selected);
                    }
                    ApiQuery::Closed { reply, .. } => {
                        let _ = reply.send(Vec::new());
                    }
                }
            }
        });
        Arc::new(Shared {
            metrics: Arc::new(Metrics::new(SeriesLimits::default()).unwrap()),
            ready: AtomicBool::new(true),
            queries,
        })
    }

    async fn get(uri: &str) -> (StatusCode, serde_json::Value) {
        let response = router(shared())
            .oneshot(axum::http::Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test]
    async fn filters() {
        assert_eq!(get("/api/v1/connections").await.1["count"], 3);
        assert_eq!(get("/api/v1/connections?class=zombie").await.1["count"], 1);
        assert_eq!(get("/api/v1/connections?at_risk=true").await.1["count"], 1);
        assert_eq!(get("/api/v1/connections?at_risk=false").await.1["count"], 2);
        assert_eq!(get("/api/v1/connections?port=443").await.1["count"], 2);
        assert_eq!(
            get("/api/v1/connections?port=443&limit=1").await.1["count"],
            1
        );
        let (_, body) = get("/api/v1/connections?class=zombie").await;
        assert_eq!(body["connections"][0]["zombie"], "reset_after_idle");
        assert_eq!(body["connections"][0]["local"], "198.18.0.1:80");
    }

    #[tokio::test]
    async fn malformed_queries_are_400_with_a_message() {
        for uri in [
            "/api/v1/connections?class=undead",
            "/api/v1/connections?at_risk=maybe",
            "/api/v1/connections?port=70000",
            "/api/v1/connections?port=-1",
            "/api/v1/connections?limit=ten",
            "/api/v1/connections?colour=blue",
            "/api/v1/closed?cause=timeout",
            "/api/v1/closed?held=1",
            "/api/v1/closed?limit=many",
            "/api/v1/closed?port=80",
        ] {
            let (status, body) = get(uri).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
            assert!(
                body["error"].as_str().is_some_and(|m| !m.is_empty()),
                "{uri}: {body}"
            );
        }
        // What a value may be is named.
        assert_eq!(
            get("/api/v1/closed?held=1").await.1["error"],
            "invalid held \"1\": expected true or false"
        );
        assert_eq!(
            get("/api/v1/closed?cause=timeout").await.1["error"],
            "invalid cause \"timeout\": expected one of normal, keepalive_timeout, \
             retransmit_timeout, zero_window_timeout, reset_received, reset_sent, other"
        );
        let (status, body) = get("/api/v1/closed?cause=reset_received&held=true&limit=3").await;
        assert_eq!(
            (status, &body["count"]),
            (StatusCode::OK, &0.into()),
            "{body}"
        );
    }
}

#[cfg(test)]
mod documentation {
    use super::*;

    /// Every field the API serializes is documented in docs/api.md.
    #[test]
    fn documented_fields() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md"))
            .unwrap();
        let mut connection = crate::track::Connection::for_tests(
            "198.18.0.1:1".parse().unwrap(),
            "198.18.0.2:2".parse().unwrap(),
            crate::model::Direction::Inbound,
            crate::model::TcpState::Established,
        );
        connection.zombie = Some(crate::model::ZombieKind::CloseWaitLeak);
        connection.soft_error = 113;
        connection.keepalive.armed_in_secs = Some(1.0);
        let view = ConnectionView {
            connection: connection.clone(),
            idle_secs: 0.0,
            class: "ok",
            at_risk: vec![AtRisk {
                reason: "keepalive_disabled",
                idle_timeout: "x".into(),
            }],
        };
        let closed = crate::track::ClosedConnection {
            connection: Box::new(connection),
            cause: crate::model::CloseCause::Normal,
            closer: Some(crate::model::Closer::Peer),
            idle_before_close_secs: Some(1.0),
            error: Some("No route to host".into()),
            closed_at_ns: 1,
            held_by_pid: Some(7),
        };
        for value in [
            serde_json::to_value(&view).unwrap(),
            serde_json::to_value(&closed).unwrap(),
        ] {
            let object = value.as_object().unwrap();
            let keepalive = object["keepalive"].as_object().unwrap();
            for key in object.keys().chain(keepalive.keys()) {
                assert!(
                    doc.contains(&format!("`{key}`")),
                    "docs/api.md does not document `{key}`"
                );
            }
        }
    }
}
