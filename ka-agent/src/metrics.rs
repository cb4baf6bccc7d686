//! The Prometheus metrics of the public contract (docs/metrics.md).

use prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::track::{Labels, Observation};

/// Labels every connection metric carries.
pub const CONNECTION_LABELS: [&str; 4] = ["netns", "direction", "port", "comm"];

/// Buckets of `ka_idle_before_close_seconds`: from a second to a day, dense
/// around common keep-alive timeouts (5 s nginx/Node, 60 s ALB, 75 s nginx
/// default, 120 s, 350 s NLB, 900 s IPVS, 7200 s Linux keepalive).
pub const IDLE_BUCKETS: [f64; 20] = [
    0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 75.0, 90.0, 120.0, 180.0, 300.0, 350.0, 600.0,
    900.0, 1800.0, 3600.0, 7200.0, 86400.0,
];

/// Why a metric could not be registered (a programming error caught at
/// start-up).
#[derive(Debug, thiserror::Error)]
#[error("registering metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

pub struct Metrics {
    pub registry: Registry,
    pub build_info: IntGaugeVec,
    pub hook_attached: IntGaugeVec,
    pub events: IntCounterVec,
    pub events_lost: IntCounter,
    pub decode_errors: IntCounter,
    pub opened: IntCounterVec,
    pub closed: IntCounterVec,
    pub connections: IntGaugeVec,
    pub keepalive_probes: IntCounterVec,
    pub probing: IntGaugeVec,
    pub retransmits: IntCounterVec,
    pub resets_received: IntCounterVec,
    pub resets_sent: IntCounterVec,
    pub zombies: IntCounterVec,
    pub at_risk: GaugeVec,
    pub idle_before_close: HistogramVec,
    pub tracked: IntGauge,
    pub evictions: IntCounter,
}

fn with_connection_labels<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut labels = extra.to_vec();
    labels.extend_from_slice(&CONNECTION_LABELS);
    labels
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let counter =
            |name: &str, help: &str, extra: &[&str]| -> Result<IntCounterVec, MetricsError> {
                let m = IntCounterVec::new(Opts::new(name, help), &with_connection_labels(extra))?;
                registry.register(Box::new(m.clone()))?;
                Ok(m)
            };
        let metrics = Self {
            build_info: IntGaugeVec::new(
                Opts::new("ka_build_info", "Always 1: the agent's version and the kernel it runs on."),
                &["version", "kernel"],
            )?,
            hook_attached: IntGaugeVec::new(
                Opts::new("ka_hook_attached", "1 when the kernel hook is attached, 0 when this kernel or these privileges do not allow it."),
                &["hook"],
            )?,
            events: IntCounterVec::new(
                Opts::new("ka_events_total", "Events received from the kernel programs."),
                &["type"],
            )?,
            events_lost: IntCounter::new(
                "ka_events_lost_total",
                "Events the kernel programs could not deliver (ring buffer full).",
            )?,
            decode_errors: IntCounter::new(
                "ka_event_decode_errors_total",
                "Ring-buffer records that were not valid events (agent/program mismatch).",
            )?,
            opened: counter("ka_connections_opened_total", "Connections that reached ESTABLISHED.", &[])?,
            closed: counter(
                "ka_connections_closed_total",
                "Connections that ended, by cause: normal, keepalive_timeout, retransmit_timeout, zero_window_timeout, reset_received, reset_sent, other.",
                &["cause"],
            )?,
            connections: IntGaugeVec::new(
                Opts::new("ka_connections", "Tracked connections by TCP state."),
                &with_connection_labels(&["state"]),
            )?,
            keepalive_probes: counter(
                "ka_keepalive_probes_total",
                "Keepalive probes sent (equals TcpExt TCPKeepAlive of the namespace).",
                &[],
            )?,
            probing: IntGaugeVec::new(
                Opts::new("ka_connections_probing", "Established connections with at least one unanswered keepalive probe."),
                &CONNECTION_LABELS,
            )?,
            retransmits: counter("ka_retransmits_total", "Retransmitted segments.", &[])?,
            resets_received: counter("ka_resets_received_total", "RSTs that reset a connection.", &[])?,
            resets_sent: counter(
                "ka_resets_sent_total",
                "RSTs sent, by the kernel's reset reason (unknown where the kernel reports none).",
                &["reason"],
            )?,
            zombies: counter(
                "ka_zombies_total",
                "Zombie connections found, by kind: dead_peer_keepalive, dead_peer_retransmit, reset_after_idle, close_wait_leak.",
                &["kind"],
            )?,
            at_risk: GaugeVec::new(
                Opts::new("ka_connections_at_risk", "Established connections idle past a middlebox idle timeout that keepalive will not prevent."),
                &with_connection_labels(&["reason", "idle_timeout"]),
            )?,
            idle_before_close: HistogramVec::new(
                HistogramOpts::new(
                    "ka_idle_before_close_seconds",
                    "Idle time before a normal close, by who sent the first FIN: reveals each peer's keep-alive timeout.",
                )
                .buckets(IDLE_BUCKETS.to_vec()),
                &with_connection_labels(&["closer"]),
            )?,
            tracked: IntGauge::new("ka_tracked_connections", "Connections in the agent's table.")?,
            evictions: IntCounter::new(
                "ka_connection_evictions_total",
                "Connections dropped from a full table (--max-connections).",
            )?,
            registry,
        };
        for collector in [
            Box::new(metrics.build_info.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.hook_attached.clone()),
            Box::new(metrics.events.clone()),
            Box::new(metrics.events_lost.clone()),
            Box::new(metrics.decode_errors.clone()),
            Box::new(metrics.connections.clone()),
            Box::new(metrics.probing.clone()),
            Box::new(metrics.at_risk.clone()),
            Box::new(metrics.idle_before_close.clone()),
            Box::new(metrics.tracked.clone()),
            Box::new(metrics.evictions.clone()),
        ] {
            metrics.registry.register(collector)?;
        }
        Ok(metrics)
    }

    /// Counts one observation of the tracker.
    pub fn apply(&self, observation: &Observation) {
        match observation {
            Observation::Opened(labels) => {
                self.opened.with_label_values(&values(&[], labels)).inc();
            }
            Observation::Closed {
                labels,
                cause,
                idle_before_close,
            } => {
                self.closed
                    .with_label_values(&values(&[cause.name()], labels))
                    .inc();
                if let Some((closer, idle)) = idle_before_close {
                    self.idle_before_close
                        .with_label_values(&values(&[closer.name()], labels))
                        .observe(*idle);
                }
            }
            Observation::ProbeSent(labels) => self
                .keepalive_probes
                .with_label_values(&values(&[], labels))
                .inc(),
            Observation::Retransmit(labels) => {
                self.retransmits
                    .with_label_values(&values(&[], labels))
                    .inc();
            }
            Observation::ResetReceived(labels) => self
                .resets_received
                .with_label_values(&values(&[], labels))
                .inc(),
            Observation::ResetSent {
                labels,
                netns,
                reason,
            } => {
                let values = match labels {
                    Some(labels) => values(&[reason], labels),
                    None => vec![
                        reason.clone(),
                        netns.to_string(),
                        "inbound".into(),
                        String::new(),
                        String::new(),
                    ],
                };
                self.resets_sent.with_label_values(&values).inc();
            }
            Observation::Zombie { labels, kind } => self
                .zombies
                .with_label_values(&values(&[kind.name()], labels))
                .inc(),
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

/// Label values: the metric's own first, then the connection labels.
pub fn values(extra: &[&str], labels: &Labels) -> Vec<String> {
    let mut v: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
    v.push(labels.netns.to_string());
    v.push(labels.direction.name().to_owned());
    v.push(labels.port.to_string());
    v.push(labels.comm.clone());
    v
}
