//! The Prometheus metrics of the public contract (docs/metrics.md).

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

use crate::{
    attribution::PodLabels,
    track::{Labels, Observation},
};

/// Labels every connection metric carries.
pub const CONNECTION_LABELS: [&str; 8] = [
    "netns",
    "direction",
    "port",
    "comm",
    "peer",
    "namespace",
    "pod",
    "container",
];

/// The value of every connection label of a series folded by `--max-series`.
pub const OVERFLOW: &str = "other";

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
    pub own_pid_namespace: IntGauge,
    pub events: IntCounterVec,
    pub events_lost: IntCounter,
    pub events_unreceived: IntCounterVec,
    pub ring_fill: Gauge,
    pub decode_errors: IntCounter,
    pub pod_list_failures: IntCounter,
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
    pub dead_held: IntGaugeVec,
    pub idle_before_close: HistogramVec,
    pub tracked: IntGauge,
    pub evictions: IntCounter,
    pub keepalive_expiries_unseen: IntCounter,
    pub dead_held_unwatched: IntCounter,
    pub series_overflow: IntCounter,
    pub kernel_events: IntCounterVec,
    pub read_failures: IntCounter,
    pub not_tcp_transitions: IntCounter,
    pub connectors_unknown: IntCounter,
    pub program_runs: IntCounterVec,
    pub program_run_seconds: prometheus::CounterVec,
    pub program_misses: IntCounterVec,
    pub kernel_map_bytes: IntGauge,
    pub inventory: InventoryMetrics,
    series: Mutex<SeriesLimiter>,
    /// Connection series carry the Kubernetes labels.
    pod_labels: bool,
}

/// Buckets of `ka_inventory_duration_seconds`: a few milliseconds for a
/// quiet host to tens of seconds for hundreds of thousands of sockets
/// with their owners.
const INVENTORY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The agent's inventories (`sock_diag` dumps reconciled with the table):
/// whether they happen, what they cost and what they corrected.
pub struct InventoryMetrics {
    pub taken: IntCounterVec,
    pub failures: IntCounter,
    pub duration: HistogramVec,
    pub last_success: Gauge,
    pub interval: Gauge,
    pub namespaces: IntGauge,
    pub own_namespace_only: IntGauge,
    pub corrected: IntCounterVec,
}

impl InventoryMetrics {
    fn new() -> Result<Self, MetricsError> {
        let inventory = Self {
            taken: IntCounterVec::new(
                Opts::new(
                    "ka_inventories_total",
                    "Inventories reconciled with the table, by trigger: start, interval (--inventory-interval), events_lost (asked for early once events lost, skipped or never read stop).",
                ),
                &["trigger"],
            )?,
            failures: IntCounter::new(
                "ka_inventory_failures_total",
                "Inventories that failed (the reason is in the log): the table goes on from events alone until one succeeds.",
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "ka_inventory_duration_seconds",
                    "Time of each inventory phase: dump (sock_diag of every network namespace) and attribution (owners from /proc, pods) in a thread of their own; reconcile on the event loop, while events wait in the ring buffer.",
                )
                .buckets(INVENTORY_BUCKETS.to_vec()),
                &["phase"],
            )?,
            last_success: Gauge::new(
                "ka_inventory_last_success_timestamp_seconds",
                "Unix time of the last inventory reconciled with the table (0 before the first).",
            )?,
            interval: Gauge::new(
                "ka_inventory_interval_seconds",
                "The configured time between inventories (--inventory-interval).",
            )?,
            namespaces: IntGauge::new(
                "ka_inventory_namespaces",
                "Network namespaces the last inventory covered: every one on the host, or only the agent's own when it may not enter the others (see ka_inventory_own_namespace_only).",
            )?,
            own_namespace_only: IntGauge::new(
                "ka_inventory_own_namespace_only",
                "1 when the last inventory covered only the agent's own network namespace, as it may not enter the others (no CAP_SYS_ADMIN) or read them: connections in other namespaces whose events were lost are then never adopted nor found gone.",
            )?,
            corrected: IntCounterVec::new(
                Opts::new(
                    "ka_inventory_connections_total",
                    "Connections an inventory found the events had not told, by outcome: adopted (unknown to the table: open before the agent started, or their opening lost) and vanished (tracked, but gone from the kernel: their close lost; closed from what their record holds), which includes the connections left of a network namespace two inventories in a row no longer find (deleted while their closes were lost; a closing orphan, which keeps its namespace alive, waits for its own close unless events were lost since its last).",
                ),
                &["outcome"],
            )?,
        };
        for trigger in crate::inventory::Trigger::ALL {
            inventory.taken.with_label_values(&[trigger.name()]);
        }
        for phase in InventoryPhase::ALL {
            inventory.duration.with_label_values(&[phase.name()]);
        }
        for outcome in ["adopted", "vanished"] {
            inventory.corrected.with_label_values(&[outcome]);
        }
        Ok(inventory)
    }

    fn collectors(&self) -> [Box<dyn prometheus::core::Collector>; 8] {
        [
            Box::new(self.taken.clone()),
            Box::new(self.failures.clone()),
            Box::new(self.duration.clone()),
            Box::new(self.last_success.clone()),
            Box::new(self.interval.clone()),
            Box::new(self.namespaces.clone()),
            Box::new(self.own_namespace_only.clone()),
            Box::new(self.corrected.clone()),
        ]
    }

    /// Counts an inventory reconciled with the table.
    pub fn reconciled(
        &self,
        update: &crate::inventory::InventoryUpdate,
        report: &crate::track::ReconcileReport,
        reconcile_took: Duration,
    ) {
        let crate::track::ReconcileReport {
            adopted,
            refreshed: _,
            vanished,
            namespaces,
        } = *report;
        self.taken.with_label_values(&[update.trigger.name()]).inc();
        for (phase, took) in [
            (InventoryPhase::Dump, update.dump_took),
            (
                InventoryPhase::Attribution,
                update.took.saturating_sub(update.dump_took),
            ),
            (InventoryPhase::Reconcile, reconcile_took),
        ] {
            self.duration
                .with_label_values(&[phase.name()])
                .observe(took.as_secs_f64());
        }
        self.namespaces
            .set(i64::try_from(namespaces).unwrap_or(i64::MAX));
        self.own_namespace_only
            .set(i64::from(update.own_namespace_only));
        self.corrected
            .with_label_values(&["adopted"])
            .inc_by(adopted as u64);
        self.corrected
            .with_label_values(&["vanished"])
            .inc_by(vanished as u64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_success.set(now.as_secs_f64());
    }
}

/// The phases of `ka_inventory_duration_seconds`.
#[derive(Clone, Copy)]
enum InventoryPhase {
    Dump,
    Attribution,
    Reconcile,
}

impl InventoryPhase {
    const ALL: [Self; 3] = [Self::Dump, Self::Attribution, Self::Reconcile];

    fn name(self) -> &'static str {
        match self {
            Self::Dump => "dump",
            Self::Attribution => "attribution",
            Self::Reconcile => "reconcile",
        }
    }
}

/// Which counter or histogram a connection series belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Family {
    Opened,
    Closed,
    Probes,
    Retransmits,
    ResetsReceived,
    ResetsSent,
    Zombies,
    IdleBeforeClose,
}

/// Bounds the connection label sets (`--max-series`) and forgets the ones
/// not seen for `--series-ttl`.
struct SeriesLimiter {
    max: usize,
    ttl: Duration,
    /// Connection label values → last use and the full series made with them.
    admitted: HashMap<Vec<String>, AdmittedSet>,
    /// Every series observed, by what observations name.
    resolved: hashbrown::HashMap<SeriesKey, Resolved>,
    /// Admitted label sets by their values run together (see
    /// [`run_together`]).
    run_together: HashMap<String, Vec<String>>,
}

/// What the prometheus crate tells a vector's series apart by: it hashes
/// the label values one after the other with no separator and keeps one
/// series per hash, so two label sets whose values run together alike
/// (`comm` "python3" with `peer` "1.2.3.4", and "python" with "31.2.3.4")
/// would silently share one series. The second such set is folded into
/// `other` instead, and counted.
fn run_together(values: &[String]) -> String {
    values.concat()
}

/// A resolved series: its counter or histogram, and its label set's key in
/// the limiter.
struct Resolved {
    last_used: Instant,
    admitted_key: Vec<String>,
    child: Child,
}

#[derive(Clone)]
enum Child {
    Counter(IntCounter),
    Histogram(Histogram),
}

/// A series by what an observation names: its family, the metric's own
/// label value (cause, closer, kind, reason, or none) and the connection.
#[derive(PartialEq, Eq, Hash)]
struct SeriesKey {
    family: Family,
    own: String,
    labels: Labels,
}

/// [`SeriesKey`] borrowed: looking up a known series allocates nothing.
struct SeriesQuery<'a> {
    family: Family,
    own: &'a str,
    labels: &'a Labels,
}

impl std::hash::Hash for SeriesQuery<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The same sequence as the derived `Hash` of `SeriesKey` (a
        // `String` hashes as its `str`).
        self.family.hash(state);
        self.own.hash(state);
        self.labels.hash(state);
    }
}

impl hashbrown::Equivalent<SeriesKey> for SeriesQuery<'_> {
    fn equivalent(&self, key: &SeriesKey) -> bool {
        self.family == key.family
            && crate::track::same_text(self.own, &key.own)
            && *self.labels == key.labels
    }
}

fn own_labels(own: &str) -> Vec<&str> {
    if own.is_empty() {
        Vec::new()
    } else {
        vec![own]
    }
}

/// When a connection label set was last used, and every full series (with
/// the metric's own labels) made with it.
type AdmittedSet = (Instant, Vec<(Family, Vec<String>)>);

/// Limits on connection series.
#[derive(Clone, Copy, Debug)]
pub struct SeriesLimits {
    pub max_series: usize,
    pub ttl: Duration,
    /// With the Kubernetes `namespace`, `pod` and `container` labels
    /// (`--node-name`); without, the series do not carry them at all.
    pub pod_labels: bool,
}

impl Default for SeriesLimits {
    fn default() -> Self {
        Self {
            max_series: 10_000,
            ttl: Duration::from_hours(1),
            pod_labels: false,
        }
    }
}

/// The connection label names in use: the Kubernetes ones only with
/// `--node-name`.
fn connection_labels(pod_labels: bool) -> &'static [&'static str] {
    if pod_labels {
        &CONNECTION_LABELS
    } else {
        &CONNECTION_LABELS[..5]
    }
}

impl Metrics {
    #[expect(
        clippy::too_many_lines,
        reason = "one declaration per metric of the contract, with its help text"
    )]
    pub fn new(limits: SeriesLimits) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let with_connection_labels = |extra: &[&'static str]| -> Vec<&'static str> {
            let mut names = extra.to_vec();
            names.extend_from_slice(connection_labels(limits.pod_labels));
            names
        };
        let counter = |name: &str,
                       help: &str,
                       extra: &[&'static str]|
         -> Result<IntCounterVec, MetricsError> {
            let m = IntCounterVec::new(Opts::new(name, help), &with_connection_labels(extra))?;
            registry.register(Box::new(Presorted(Box::new(m.clone()))))?;
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
            own_pid_namespace: IntGauge::new(
                "ka_own_pid_namespace",
                "1 when the agent runs in a PID namespace of its own (a container without hostPID), as the kernel program's record of the agent's start-up connect shows: its /proc does not show the kernel's process ids, so outbound connections are named after the connecting thread, without pod labels, and inventories find no process outside its namespace.",
            )?,
            events: IntCounterVec::new(
                Opts::new("ka_events_total", "Events received from the kernel programs."),
                &["type"],
            )?,
            events_lost: IntCounter::new(
                "ka_events_lost_total",
                "Events the kernel programs could not deliver (ring buffer full). The agent then takes an inventory as soon as the losses stop, which makes its table right again (connections found gone are closed, unknown ones adopted).",
            )?,
            events_unreceived: IntCounterVec::new(
                Opts::new(
                    "ka_events_unreceived_total",
                    "Events the kernel programs submitted to the ring buffer that the agent never read, by type: gaps in the numbers each CPU gives the events of each type. Nothing between the ring buffer and the agent is meant to drop an event, so this stays 0; it is counted so that such a loss is never silent, and handled like lost events (an inventory follows).",
                ),
                &["type"],
            )?,
            ring_fill: Gauge::new(
                "ka_ring_buffer_fill_ratio",
                "Highest fill of the event ring buffer during the last second, as a fraction of its size (--ring-buffer-bytes), sampled by the programs every 16th event of a kind on each CPU (0 while events are that rare); near 1 means events are about to be lost.",
            )?,
            decode_errors: IntCounter::new(
                "ka_event_decode_errors_total",
                "Ring-buffer records that were not valid events (agent/program mismatch).",
            )?,
            pod_list_failures: IntCounter::new(
                "ka_pod_list_failures_total",
                "Inventories (with --node-name) for which this node's pods could not be listed from the Kubernetes API: pod labels come from the last good list, or are missing.",
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
                connection_labels(limits.pod_labels),
            )?,
            retransmits: counter(
                "ka_retransmits_total",
                "Retransmitted segments, as the namespace's Tcp.RetransSegs counts them: each segment of a retransmission of several, by the socket's own counter (tcp_sock.total_retrans) read at every event of the connection, so a retransmission event the kernel skipped is counted at the connection's next.",
                &[],
            )?,
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
            dead_held: IntGaugeVec::new(
                Opts::new("ka_dead_connections_held", "Connections the kernel ended (keepalive, retransmission or zero-window timeout, reset received), by cause, whose socket their process still held open at the last inventory: the kernel has closed them and no ss lists them, but the application's next use of each fails (a pool hands them out). The socket is named by the inventory that saw the connection alive, or by the kernel at the close (its process then found in the next inventories)."),
                &with_connection_labels(&["cause"]),
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
            series_overflow: IntCounter::new(
                "ka_series_overflow_total",
                "Observations folded into the `other` series because --max-series label sets exist, or because their label values run together like another set's (the client library would merge the two series).",
            )?,
            kernel_events: IntCounterVec::new(
                Opts::new(
                    "ka_kernel_events_total",
                    "Events the kernel programs produced, by type and outcome: submitted to the ring buffer (= received + not yet read), lost (ring buffer full), or filtered (not needed by the agent, counted in the kernel and never sent).",
                ),
                &["type", "outcome"],
            )?,
            read_failures: IntCounter::new(
                "ka_kernel_read_failures_total",
                "Kernel memory reads of socket fields that failed (the field reads as 0).",
            )?,
            not_tcp_transitions: IntCounter::new(
                "ka_kernel_not_tcp_transitions_total",
                "State transitions of sockets that are not TCP (MPTCP, SCTP) the inet_sock_set_state program saw and did not send; also counted as filtered in ka_kernel_events_total. Apart so that a TCP close the agent never received can be told from a misread protocol.",
            )?,
            connectors_unknown: IntCounter::new(
                "ka_kernel_connectors_unknown_total",
                "Outbound connections that left SYN_SENT without the kernel having recorded the process that called connect() (it did so before the programs were attached, or another socket connecting at the same time took its slot: 1 in 4096 pairs): their comm label stays empty until an inventory finds their owner.",
            )?,
            program_runs: IntCounterVec::new(
                Opts::new("ka_program_runs_total", "Runs of each kernel program (kernel BPF stats, counted while the run timing is on: --program-run-stats)."),
                &["hook"],
            )?,
            program_run_seconds: prometheus::CounterVec::new(
                Opts::new("ka_program_run_seconds_total", "Time spent in each kernel program (kernel BPF stats, counted while the run timing is on: --program-run-stats)."),
                &["hook"],
            )?,
            program_misses: IntCounterVec::new(
                Opts::new(
                    "ka_program_misses_total",
                    "Runs of each kernel program the kernel skipped, the events lost: a tracepoint program is skipped when any BPF program is already running on that CPU (an interrupt during one), a raw tracepoint program (the hot hooks and those whose events are counts: tcp_retransmit_skb, tcp_receive_reset, tcp_send_reset; where the kernel allows) only when that same program is. A skipped inet_sock_set_state run makes the agent take an inventory as soon as the misses and losses stop (the next second without one), which closes the connections found gone; a connection whose socket address a new one takes first is closed then. Counted by kernels from 6.7 on.",
                ),
                &["hook"],
            )?,
            inventory: InventoryMetrics::new()?,
            pod_labels: limits.pod_labels,
            series: Mutex::new(SeriesLimiter {
                max: limits.max_series,
                ttl: limits.ttl,
                admitted: HashMap::new(),
                resolved: hashbrown::HashMap::new(),
                run_together: HashMap::new(),
            }),
            kernel_map_bytes: IntGauge::new(
                "ka_kernel_map_bytes",
                "Kernel memory of the agent's BPF maps, the event ring buffer included, as the kernel accounts it (memlock): outside the process's own memory (process_resident_memory_bytes).",
            )?,
            evictions: IntCounter::new(
                "ka_connection_evictions_total",
                "Connections dropped from a full table (--max-connections).",
            )?,
            keepalive_expiries_unseen: IntCounter::new(
                "ka_keepalive_expiries_unseen_total",
                "Keepalive timer expiries the kernel made and no kernel program reported, with no run counted as skipped (ka_program_misses_total): found from a timer that fired three quarters of an interval or more after it was due, or that was due with its last probe unanswered when its connection was found gone. The probes they sent are counted in ka_keepalive_probes_total (from the count of unanswered probes) and a death they caused is classified keepalive_timeout. A timer a second past that is overdue asks for an inventory (trigger events_lost). Seen only in the test suite, with many agents attaching and detaching programs; the cause is not known.",
            )?,
            dead_held_unwatched: IntCounter::new(
                "ka_dead_connections_unwatched_total",
                "Connections the kernel ended under their application (see ka_dead_connections_held) not watched for a process still holding them: the watch already had --max-connections of them.",
            )?,
            registry,
        };
        for collector in [
            Box::new(metrics.build_info.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.hook_attached.clone()),
            Box::new(metrics.own_pid_namespace.clone()),
            Box::new(metrics.events.clone()),
            Box::new(metrics.events_lost.clone()),
            Box::new(metrics.events_unreceived.clone()),
            Box::new(metrics.ring_fill.clone()),
            Box::new(metrics.decode_errors.clone()),
            Box::new(metrics.pod_list_failures.clone()),
            Box::new(metrics.connections.clone()),
            Box::new(metrics.probing.clone()),
            Box::new(metrics.at_risk.clone()),
            Box::new(metrics.dead_held.clone()),
            Box::new(metrics.idle_before_close.clone()),
            Box::new(metrics.tracked.clone()),
            Box::new(metrics.evictions.clone()),
            Box::new(metrics.keepalive_expiries_unseen.clone()),
            Box::new(metrics.dead_held_unwatched.clone()),
            Box::new(metrics.series_overflow.clone()),
            Box::new(metrics.kernel_events.clone()),
            Box::new(metrics.read_failures.clone()),
            Box::new(metrics.not_tcp_transitions.clone()),
            Box::new(metrics.connectors_unknown.clone()),
            Box::new(metrics.program_runs.clone()),
            Box::new(metrics.program_run_seconds.clone()),
            Box::new(metrics.program_misses.clone()),
            Box::new(metrics.kernel_map_bytes.clone()),
        ]
        .into_iter()
        .chain(metrics.inventory.collectors())
        {
            metrics.registry.register(Box::new(Presorted(collector)))?;
        }
        // The agent's own CPU, memory, threads and descriptors
        // (`process_*`, from /proc/self): what it costs where it runs.
        metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        // Zero from the start, for every type: an alert on it, and a test
        // that it stayed 0, need the series before the first gap.
        for kind in ka_common::EventKind::ALL {
            metrics.events_unreceived.with_label_values(&[kind.name()]);
        }
        Ok(metrics)
    }

    /// Counts one observation of the tracker.
    pub fn apply(&self, observation: &Observation) {
        self.apply_all(std::slice::from_ref(observation));
    }

    /// Applies a batch, with one clock read and one lock of the series
    /// for all of it (the series' last use only needs to be as fine as
    /// `--series-ttl`).
    pub fn apply_all(&self, observations: &[Observation]) {
        if observations.is_empty() {
            return;
        }
        let now = Instant::now();
        // A poisoned lock (a panic while it was held) still counts, with
        // series made afresh and no limit.
        let mut guard = self.series.lock().ok();
        let mut series = guard.as_deref_mut();
        for observation in observations {
            self.apply_at(series.as_deref_mut(), observation, now);
        }
    }

    /// Runs `set` (which sets metrics directly, not through `apply_all`
    /// or `expire_series`) under the lock a batch is applied under: a
    /// scrape sees all of its changes or none (see `render`).
    pub fn as_one_batch(&self, set: impl FnOnce()) {
        let _batch = self.series.lock();
        set();
    }

    fn apply_at(
        &self,
        mut series: Option<&mut SeriesLimiter>,
        observation: &Observation,
        now: Instant,
    ) {
        let mut count = |family, own: &str, labels: &Labels| {
            if let Child::Counter(c) = self.child(series.as_deref_mut(), family, own, labels, now) {
                c.inc();
            }
        };
        match observation {
            Observation::Opened(labels) => count(Family::Opened, "", labels),
            Observation::Closed {
                labels,
                cause,
                idle_before_close,
            } => {
                count(Family::Closed, cause.name(), labels);
                if let Some((closer, idle)) = idle_before_close
                    && let Child::Histogram(h) =
                        self.child(series, Family::IdleBeforeClose, closer.name(), labels, now)
                {
                    h.observe(*idle);
                }
            }
            Observation::ProbeSent(labels) => count(Family::Probes, "", labels),
            Observation::Retransmit { labels, segments } => {
                if let Child::Counter(c) = self.child(series, Family::Retransmits, "", labels, now)
                {
                    c.inc_by(u64::from(*segments));
                }
            }
            Observation::ResetReceived(labels) => count(Family::ResetsReceived, "", labels),
            Observation::ResetSent {
                labels,
                netns,
                reason,
            } => {
                // A reset answering a packet without a socket has no port or
                // process; it still belongs to a namespace.
                let unknown = Labels {
                    netns: *netns,
                    direction: crate::model::Direction::Inbound,
                    port: 0,
                    comm: crate::model::Comm::default(),
                    peer: String::new(),
                    pod: PodLabels::default(),
                };
                count(
                    Family::ResetsSent,
                    reason,
                    labels.as_ref().unwrap_or(&unknown),
                );
            }
            Observation::Zombie { labels, kind } => {
                count(Family::Zombies, kind.name(), labels);
            }
        }
    }

    /// The connection label values, in [`CONNECTION_LABELS`] order (the
    /// Kubernetes ones only with `--node-name`).
    pub fn connection_values(&self, labels: &Labels) -> Vec<String> {
        let mut values = vec![
            labels.netns.to_string(),
            labels.direction.name().to_owned(),
            if labels.port == 0 {
                String::new()
            } else {
                labels.port.to_string()
            },
            labels.comm.to_string(),
            labels.peer.clone(),
        ];
        if self.pod_labels {
            values.extend([
                labels.pod.namespace.clone(),
                labels.pod.pod.clone(),
                labels.pod.container.clone(),
            ]);
        }
        values
    }

    /// Label values: the metric's own first, then the connection labels
    /// (gauges, which are rebuilt every second and so need no limiter).
    pub fn values(&self, extra: &[&str], labels: &Labels) -> Vec<String> {
        let mut values: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        values.extend(self.connection_values(labels));
        values
    }

    /// The counter or histogram of a connection series. A series seen
    /// before is one hash lookup (events arrive by the ten thousand a
    /// second); a new one is admitted against `--max-series` first.
    fn child(
        &self,
        series: Option<&mut SeriesLimiter>,
        family: Family,
        own: &str,
        labels: &Labels,
        now: Instant,
    ) -> Child {
        let Some(limiter) = series else {
            return self.make_child(family, &self.values(&own_labels(own), labels));
        };
        let query = SeriesQuery {
            family,
            own,
            labels,
        };
        if let Some(resolved) = limiter.resolved.get_mut(&query) {
            resolved.last_used = now;
            return resolved.child.clone();
        }
        let (admitted_key, full) = self.admit(limiter, family, &own_labels(own), labels, now);
        let child = self.make_child(family, &full);
        if admitted_key.get(2).is_some_and(|port| port == OVERFLOW) {
            // Folded into `other`: not remembered, so a flood of new label
            // sets cannot grow this map, and each observation is counted
            // in `ka_series_overflow_total`.
            return child;
        }
        limiter.resolved.insert(
            SeriesKey {
                family,
                own: own.to_owned(),
                labels: labels.clone(),
            },
            Resolved {
                last_used: now,
                admitted_key,
                child: child.clone(),
            },
        );
        child
    }

    fn make_child(&self, family: Family, values: &[String]) -> Child {
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        let counter = match family {
            Family::IdleBeforeClose => {
                return Child::Histogram(self.idle_before_close.with_label_values(&values));
            }
            Family::Opened => &self.opened,
            Family::Closed => &self.closed,
            Family::Probes => &self.keepalive_probes,
            Family::Retransmits => &self.retransmits,
            Family::ResetsReceived => &self.resets_received,
            Family::ResetsSent => &self.resets_sent,
            Family::Zombies => &self.zombies,
        };
        Child::Counter(counter.with_label_values(&values))
    }

    /// Admits a connection label set (or folds it into `other` past
    /// `--max-series`): its key in the limiter and the full label values
    /// of the series, the metric's own first.
    fn admit(
        &self,
        limiter: &mut SeriesLimiter,
        family: Family,
        extra: &[&str],
        labels: &Labels,
        now: Instant,
    ) -> (Vec<String>, Vec<String>) {
        let key = self.connection_values(labels);
        let admitted = limiter.admitted.contains_key(&key)
            || (limiter.admitted.len() < limiter.max
                && !limiter.run_together.contains_key(&run_together(&key)));
        let key = if admitted {
            key
        } else {
            self.series_overflow.inc();
            self.folded(&key)
        };
        limiter
            .run_together
            .entry(run_together(&key))
            .or_insert_with(|| key.clone());
        let mut full: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        full.extend(key.iter().cloned());
        let entry = limiter
            .admitted
            .entry(key.clone())
            .or_insert_with(|| (now, Vec::new()));
        entry.0 = now;
        if !entry.1.iter().any(|(f, v)| *f == family && *v == full) {
            entry.1.push((family, full.clone()));
        }
        (key, full)
    }

    /// Connection label values folded into `other`: the network namespace
    /// and the direction kept, every other label `other`.
    fn folded(&self, connection_values: &[String]) -> Vec<String> {
        let mut folded = vec![OVERFLOW.to_owned(); connection_labels(self.pod_labels).len()];
        for (to, from) in folded.iter_mut().zip(connection_values).take(2) {
            from.clone_into(to);
        }
        folded
    }

    /// Gauge series (`own` labels of their own, then the connection
    /// labels) with their values summed; a label set whose values run
    /// together like another's (see [`run_together`]) is summed into its
    /// folded set instead. The first of such sets in label order keeps its
    /// own series, so the choice is the same every second.
    pub fn separate_gauges<V: std::ops::AddAssign>(
        &self,
        own: usize,
        series: HashMap<Vec<String>, V>,
    ) -> HashMap<Vec<String>, V> {
        let mut sorted: Vec<(Vec<String>, V)> = series.into_iter().collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut separated: HashMap<Vec<String>, V> = HashMap::with_capacity(sorted.len());
        for (key, value) in sorted {
            let key = if seen.insert(run_together(&key)) {
                key
            } else {
                let mut folded = key[..own.min(key.len())].to_vec();
                folded.extend(self.folded(key.get(own..).unwrap_or_default()));
                folded
            };
            match separated.entry(key) {
                std::collections::hash_map::Entry::Occupied(mut entry) => *entry.get_mut() += value,
                std::collections::hash_map::Entry::Vacant(entry) => {
                    entry.insert(value);
                }
            }
        }
        separated
    }

    /// Removes connection series not used for `--series-ttl` (their
    /// connections and processes are gone). Returns how many label sets expired.
    pub fn expire_series(&self) -> usize {
        let Ok(mut limiter) = self.series.lock() else {
            return 0;
        };
        let ttl = limiter.ttl;
        let SeriesLimiter {
            admitted, resolved, ..
        } = &mut *limiter;
        for series in resolved.values() {
            if let Some(set) = admitted.get_mut(&series.admitted_key) {
                set.0 = set.0.max(series.last_used);
            }
        }
        let stale: Vec<Vec<String>> = limiter
            .admitted
            .iter()
            .filter(|(_, (seen, _))| seen.elapsed() >= ttl)
            .map(|(key, _)| key.clone())
            .collect();
        if !stale.is_empty() {
            let stale: std::collections::HashSet<&Vec<String>> = stale.iter().collect();
            limiter
                .resolved
                .retain(|_, series| !stale.contains(&series.admitted_key));
        }
        for key in &stale {
            let joined = run_together(key);
            if limiter.run_together.get(&joined) == Some(key) {
                limiter.run_together.remove(&joined);
            }
            if let Some((_, series)) = limiter.admitted.remove(key) {
                for (family, values) in series {
                    let values: Vec<&str> = values.iter().map(String::as_str).collect();
                    let _ = match family {
                        Family::Opened => self.opened.remove_label_values(&values),
                        Family::Closed => self.closed.remove_label_values(&values),
                        Family::Probes => self.keepalive_probes.remove_label_values(&values),
                        Family::Retransmits => self.retransmits.remove_label_values(&values),
                        Family::ResetsReceived => self.resets_received.remove_label_values(&values),
                        Family::ResetsSent => self.resets_sent.remove_label_values(&values),
                        Family::Zombies => self.zombies.remove_label_values(&values),
                        Family::IdleBeforeClose => {
                            self.idle_before_close.remove_label_values(&values)
                        }
                    };
                }
            }
        }
        stale.len()
    }

    /// The Prometheus text exposition.
    ///
    /// The registry reads its collectors in no particular order while the
    /// event loop counts: gathering under the lock a batch is applied
    /// under makes a scrape see each batch whole or not at all (a death's
    /// zombie with its close, not the close alone). The event loop waits
    /// for the gathering (milliseconds with 10,000 series), not for the
    /// encoding.
    pub fn render(&self) -> String {
        let families = {
            // Held when poisoned too (`apply_all` then counts without it).
            let _batch = self.series.lock();
            self.registry.gather()
        };
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }

    /// The OpenMetrics 1.0 exposition (what a scraper asking for
    /// `application/openmetrics-text` gets).
    pub fn render_openmetrics(&self) -> String {
        to_openmetrics(&self.render())
    }
}

/// Rewrites the text format as OpenMetrics: counter families are named
/// without their `_total` suffix (their samples keep it) and the exposition
/// ends with `# EOF`.
pub fn to_openmetrics(text: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, "counter")) = rest.split_once(' ')
        {
            counters.insert(name.to_owned());
        }
    }
    let mut out = String::with_capacity(text.len() + 16);
    for line in text.lines() {
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) {
                    name.strip_suffix("_total").unwrap_or(name)
                } else {
                    name
                };
                out.push_str(prefix);
                out.push_str(name);
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out.push_str("# EOF\n");
    out
}

/// A collector handing its series out in the order `Registry::gather`
/// sorts them into, so that the registry's sort finds them sorted: one
/// comparison per series instead of some 17 for 10,000 series.
///
/// Why: most connection series carry empty labels (`comm` of a socket no
/// process owned, `peer` without `--peer-label`), and the registry compares
/// label values with `==`, a `memcmp` call even for two empty strings. On
/// the AMD machines here glibc's EVEX `memcmp` does that with a masked load
/// from the empty string's dangling pointer, which the CPU completes in
/// microcode: that was 57 % of a scrape's time with 10,000 series. This
/// sort never calls `memcmp` for an empty value.
struct Presorted(Box<dyn prometheus::core::Collector>);

impl prometheus::core::Collector for Presorted {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.0.collect();
        for family in &mut families {
            family
                .mut_metric()
                .sort_by(|a, b| by_label_values(a.get_label(), b.get_label()));
        }
        families
    }
}

/// The registry's order of two series of one family: by label count, then
/// by each label's value (names are the family's, in the same order).
fn by_label_values(
    a: &[prometheus::proto::LabelPair],
    b: &[prometheus::proto::LabelPair],
) -> std::cmp::Ordering {
    a.len().cmp(&b.len()).then_with(|| {
        a.iter()
            .zip(b)
            .map(|(a, b)| match (a.value(), b.value()) {
                ("", "") => std::cmp::Ordering::Equal,
                ("", _) => std::cmp::Ordering::Less,
                (_, "") => std::cmp::Ordering::Greater,
                (a, b) => a.cmp(b),
            })
            .find(|order| order.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    })
}

/// One observation of every kind, for `labels`.
fn one_of_each(labels: &Labels) -> [Observation; 7] {
    [
        Observation::Opened(labels.clone()),
        Observation::Closed {
            labels: labels.clone(),
            cause: crate::model::CloseCause::Normal,
            idle_before_close: Some((crate::model::Closer::Peer, 1.0)),
        },
        Observation::ProbeSent(labels.clone()),
        Observation::Retransmit {
            labels: labels.clone(),
            segments: 1,
        },
        Observation::ResetReceived(labels.clone()),
        Observation::ResetSent {
            labels: None,
            netns: 1,
            reason: "unknown".into(),
        },
        Observation::Zombie {
            labels: labels.clone(),
            kind: crate::model::ZombieKind::CloseWaitLeak,
        },
    ]
}

/// The metrics reference (docs/metrics.md), generated from the registry so
/// it cannot drift from the code.
pub fn reference_markdown() -> Result<String, MetricsError> {
    use std::fmt::Write as _;

    // With every label the agent can use (the Kubernetes ones too).
    let metrics = Metrics::new(SeriesLimits {
        pod_labels: true,
        ..SeriesLimits::default()
    })?;
    // Vector metrics appear in a gather only once they have a series.
    let labels = Labels {
        netns: 1,
        direction: crate::model::Direction::Inbound,
        port: 80,
        comm: crate::model::Comm::default(),
        peer: String::new(),
        pod: PodLabels::default(),
    };
    for observation in one_of_each(&labels) {
        metrics.apply(&observation);
    }
    let values = metrics.values(&["x", "y"], &labels);
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    metrics.at_risk.with_label_values(&values).set(0.0);
    metrics.connections.with_label_values(&values[1..]).set(0);
    metrics.probing.with_label_values(&values[2..]).set(0);
    metrics.dead_held.with_label_values(&values[1..]).set(0);
    metrics.build_info.with_label_values(&["v", "k"]).set(1);
    metrics.hook_attached.with_label_values(&["h"]).set(1);
    metrics.events.with_label_values(&["t"]).inc();
    metrics.program_runs.with_label_values(&["h"]).inc();
    metrics.program_run_seconds.with_label_values(&["h"]).inc();
    metrics.program_misses.with_label_values(&["h"]).inc();
    metrics
        .kernel_events
        .with_label_values(&["t", "lost"])
        .inc();

    let mut out = String::from(
        "# ka metrics reference\n\n\
         Generated from the code by `KA_BLESS=1 cargo test -p ka-agent --lib metrics::tests::reference_is_current`; \
         the test fails when this file and the code disagree.\n\n\
         Connection labels (on every metric that lists `…conn`): `netns` (network namespace inode), \
         `direction` (`inbound`/`outbound`), `port` (service port: local for inbound, remote for outbound; \
         never an ephemeral port), `comm` (process name: the socket's owner as the last inventory found \
         it; until then an accepted connection's listener, or the process that called connect() for \
         an outbound one, as the kernel recorded it (the process's name, not the calling thread's, \
         unless the process is gone or the agent runs in a PID namespace of its own: \
         ka_own_pid_namespace); empty when none is known: an outbound connection \
         whose connect() came before the agent started, see ka_kernel_connectors_unknown_total), \
         `peer` (remote address or network, only with `--peer-label ip|cidr`), and in Kubernetes \
         (`--node-name`) `namespace`, `pod` and `container` (absent elsewhere), of the same process \
         as `comm` (for a connector, from its cgroup, once this node's pods are listed). Past `--max-series` label sets, new ones fold into `other` \
         (`ka_series_overflow_total`), as does a set whose values, run together, equal another's \
         (\"python3\" + \"1.2.3.4\", \"python\" + \"31.2.3.4\": the prometheus crate tells series apart \
         by that alone); sets unused for `--series-ttl` are removed.\n\n\
         A scrape counts each batch of kernel events whole or not at all: a connection's close, its \
         cause and the zombie its death revealed appear in the same scrape; the table's gauges \
         (`ka_connections`, `ka_connections_probing`, `ka_connections_at_risk`, \
         `ka_tracked_connections`) are all of the same second.\n\n\
         | metric | type | labels | meaning |\n|---|---|---|---|\n",
    );
    for family in metrics.registry.gather() {
        let kind = format!("{:?}", family.get_field_type()).to_lowercase();
        let mut label_names: Vec<String> = family
            .get_metric()
            .first()
            .map(|m| m.get_label().iter().map(|l| l.name().to_owned()).collect())
            .unwrap_or_default();
        let conn = CONNECTION_LABELS
            .iter()
            .all(|c| label_names.iter().any(|l| l == c));
        if conn {
            label_names.retain(|l| !CONNECTION_LABELS.contains(&l.as_str()));
            label_names.push("…conn".to_owned());
        }
        let labels = label_names
            .iter()
            .map(|l| format!("`{l}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "| `{}` | {kind} | {labels} | {} |",
            family.name(),
            family.help().replace('|', "\\|")
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The series of each family in gathered order, as label values.
    fn gathered(registry: &Registry) -> Vec<Vec<Vec<String>>> {
        registry
            .gather()
            .iter()
            .map(|family| {
                family
                    .get_metric()
                    .iter()
                    .map(|m| m.get_label().iter().map(|l| l.value().to_owned()).collect())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn presorted_series_come_out_as_the_registry_orders_them() {
        // Values that cannot run together (see `run_together`), empty
        // ones among them.
        let (comms, peers) = (["", "a", "b"], ["", "x", "y"]);
        let plain = Registry::new();
        let presorted = Registry::new();
        let vec = IntCounterVec::new(Opts::new("t_total", "t"), &["comm", "peer", "port"]).unwrap();
        plain.register(Box::new(vec.clone())).unwrap();
        presorted
            .register(Box::new(Presorted(Box::new(vec.clone()))))
            .unwrap();
        for comm in comms {
            for peer in peers {
                for port in ["80", "", "443"] {
                    vec.with_label_values(&[comm, peer, port]).inc();
                }
            }
        }
        let order = gathered(&presorted);
        assert_eq!(order, gathered(&plain));
        let series = &order[0];
        assert!(series.windows(2).all(|w| w[0] < w[1]), "{series:?}");
        assert_eq!(series.len(), 27);
    }

    #[test]
    fn empty_label_values_sort_first() {
        let pair = |value: &str| {
            let mut pair = prometheus::proto::LabelPair::default();
            pair.set_value(value.to_owned());
            pair
        };
        for (a, b) in [("", ""), ("", "x"), ("x", ""), ("x", "y"), ("y", "y")] {
            assert_eq!(
                by_label_values(&[pair(a)], &[pair(b)]),
                a.cmp(b),
                "{a:?} {b:?}"
            );
        }
        assert!(by_label_values(&[pair("z")], &[pair(""), pair("")]).is_lt());
    }

    #[test]
    fn reference_is_current() {
        let generated = reference_markdown().unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md");
        if std::env::var("KA_BLESS").as_deref() == Ok("1") {
            std::fs::write(&path, &generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            on_disk, generated,
            "docs/metrics.md is stale: run KA_BLESS=1 cargo test -p ka-agent --lib metrics::tests"
        );
    }

    #[test]
    fn contract_metrics_exist() {
        let reference = reference_markdown().unwrap();
        for name in [
            "ka_build_info",
            "ka_hook_attached",
            "ka_events_total",
            "ka_events_lost_total",
            "ka_connections_opened_total",
            "ka_connections_closed_total",
            "ka_connections",
            "ka_keepalive_probes_total",
            "ka_connections_probing",
            "ka_retransmits_total",
            "ka_resets_received_total",
            "ka_resets_sent_total",
            "ka_zombies_total",
            "ka_connections_at_risk",
            "ka_idle_before_close_seconds",
        ] {
            assert!(
                reference.contains(&format!("| `{name}` |")),
                "{name} missing"
            );
        }
    }

    #[test]
    fn series_are_capped_and_overflow_counted() {
        let metrics = Metrics::new(SeriesLimits {
            max_series: 10,
            ttl: Duration::from_secs(0),
            pod_labels: false,
        })
        .unwrap();
        for port in 0..1000u16 {
            metrics.apply(&Observation::ResetReceived(Labels {
                netns: 1,
                direction: crate::model::Direction::Outbound,
                port: 1000 + port,
                comm: crate::model::Comm::default(),
                peer: format!("198.18.{}.{}", port / 256, port % 256),
                pod: PodLabels::default(),
            }));
        }
        let families = metrics.registry.gather();
        let resets = families
            .iter()
            .find(|f| f.name() == "ka_resets_received_total")
            .unwrap();
        assert_eq!(resets.get_metric().len(), 11, "10 admitted + 1 other");
        assert_eq!(metrics.series_overflow.get(), 990);
        assert_eq!(metrics.expire_series(), 11);
        let after = metrics.registry.gather();
        assert!(
            after
                .iter()
                .all(|f| f.name() != "ka_resets_received_total" || f.get_metric().is_empty())
        );
    }

    /// The first sample of `family` (its name and the `{` or space after
    /// it) in an exposition, 0 if absent.
    fn first_sample(text: &str, family: &str) -> i64 {
        text.lines()
            .find(|l| l.starts_with(family))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Scrapes while another thread runs `batch` `times` times: every
    /// scrape must show `a` and `b` alike. Returns the last exposition.
    fn scrapes_see_alike(
        metrics: &Metrics,
        batch: impl Fn() + Sync,
        times: usize,
        (a, b): (&str, &str),
    ) -> String {
        std::thread::scope(|scope| {
            let writing = scope.spawn(|| {
                for _ in 0..times {
                    batch();
                }
            });
            let mut scrapes = 0;
            while !writing.is_finished() || scrapes == 0 {
                let text = metrics.render();
                assert_eq!(
                    first_sample(&text, a),
                    first_sample(&text, b),
                    "a scrape split a batch:\n{text}"
                );
                scrapes += 1;
            }
        });
        metrics.render()
    }

    fn small_metrics() -> Metrics {
        Metrics::new(SeriesLimits {
            max_series: 100,
            ttl: Duration::from_mins(10),
            pod_labels: false,
        })
        .unwrap()
    }

    #[test]
    fn a_scrape_sees_a_batch_whole_or_not_at_all() {
        let metrics = small_metrics();
        let labels = Labels {
            netns: 1,
            direction: crate::model::Direction::Outbound,
            port: 443,
            comm: crate::model::Comm::new("client"),
            peer: String::new(),
            pod: PodLabels::default(),
        };
        // What `conclude` pushes for a keepalive death, in its order.
        let death = [
            Observation::Zombie {
                labels: labels.clone(),
                kind: crate::model::ZombieKind::DeadPeerKeepalive,
            },
            Observation::Closed {
                labels,
                cause: crate::model::CloseCause::KeepaliveTimeout,
                idle_before_close: None,
            },
        ];
        let text = scrapes_see_alike(
            &metrics,
            || metrics.apply_all(&death),
            20_000,
            ("ka_zombies_total{", "ka_connections_closed_total{"),
        );
        assert_eq!(first_sample(&text, "ka_zombies_total{"), 20_000);
    }

    #[test]
    fn a_scrape_sees_gauges_set_as_one_batch_whole() {
        let metrics = small_metrics();
        let text = scrapes_see_alike(
            &metrics,
            || {
                metrics.as_one_batch(|| {
                    metrics.tracked.inc();
                    metrics.evictions.inc();
                });
            },
            20_000,
            ("ka_tracked_connections ", "ka_connection_evictions_total "),
        );
        assert_eq!(first_sample(&text, "ka_tracked_connections "), 20_000);
    }

    #[test]
    fn label_sets_that_run_together_never_share_a_series() {
        let metrics = Metrics::new(SeriesLimits {
            max_series: 100,
            ttl: Duration::from_secs(0),
            pod_labels: false,
        })
        .unwrap();
        let labels = |comm: &str, peer: &str| Labels {
            netns: 1,
            direction: crate::model::Direction::Outbound,
            port: 443,
            comm: crate::model::Comm::new(comm),
            peer: peer.to_owned(),
            pod: PodLabels::default(),
        };
        // Both run together as "1outbound443python31.2.3.4".
        let first = labels("python3", "1.2.3.4");
        let second = labels("python", "31.2.3.4");
        assert_eq!(
            run_together(&metrics.connection_values(&first)),
            run_together(&metrics.connection_values(&second))
        );
        for _ in 0..3 {
            metrics.apply(&Observation::ResetReceived(first.clone()));
        }
        for _ in 0..2 {
            metrics.apply(&Observation::ResetReceived(second.clone()));
        }
        let text = metrics.render();
        let resets: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("ka_resets_received_total{"))
            .collect();
        assert_eq!(
            resets,
            [
                r#"ka_resets_received_total{comm="other",direction="outbound",netns="1",peer="other",port="other"} 2"#,
                r#"ka_resets_received_total{comm="python3",direction="outbound",netns="1",peer="1.2.3.4",port="443"} 3"#,
            ]
        );
        assert_eq!(metrics.series_overflow.get(), 2);
        // Expired, the first set's values no longer hold the second out.
        assert_eq!(metrics.expire_series(), 2);
        metrics.apply(&Observation::ResetReceived(second.clone()));
        assert!(metrics.render().contains(
            r#"comm="python",direction="outbound",netns="1",peer="31.2.3.4",port="443"} 1"#
        ),);

        // Gauges: the same sets; the first in label order ("python" before
        // "python3") keeps its series, the other is summed into its folded
        // set.
        let values = |l: &Labels| metrics.values(&["ESTABLISHED"], l);
        let gauges = metrics.separate_gauges(
            1,
            HashMap::from([
                (values(&first), 3_i64),
                (values(&second), 2),
                (values(&labels("a", "")), 1),
            ]),
        );
        let mut folded = vec!["ESTABLISHED".to_owned()];
        folded.extend(metrics.folded(&metrics.connection_values(&first)));
        assert_eq!(
            gauges,
            HashMap::from([
                (values(&second), 2),
                (folded, 3),
                (values(&labels("a", "")), 1)
            ])
        );
    }

    #[test]
    fn openmetrics_names_counter_families_without_total() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n# TYPE g gauge\ng 2\n";
        assert_eq!(
            to_openmetrics(text),
            "# HELP a A.\n# TYPE a counter\na_total 1\n# TYPE g gauge\ng 2\n# EOF\n"
        );
    }
}
