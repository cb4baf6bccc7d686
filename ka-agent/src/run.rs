//! `ka-agent run`: wires the data path together.
//!
//! ring buffer → decode → tracker → observations → metrics; once a second the
//! tracker is swept (`CLOSE_WAIT` leaks, gauges, at-risk audit) and a snapshot
//! is published for the API.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{io::unix::AsyncFd, net::TcpListener, signal::unix::SignalKind};

use crate::{
    cli::RunArgs,
    decode::{self, Delivery},
    http::{self, ApiQuery, AtRisk, ConnectionView, Shared},
    idle_timeout::IdleTimeout,
    loader::{LoadOptions, Probes},
    metrics::{Metrics, SeriesLimits},
    model::TcpState,
    track::{Connection, LabelKey, Tracker, TrackerConfig},
};

/// How often the agent collects events the programs submitted without a
/// wake-up while events arrive: the latency of an event on the quiet path.
/// 25 ms used about 5 % less agent CPU under churn but churned slower in 4
/// of 5 interleaved rounds (0.936 against 0.956 of the rate without the
/// agent; cause not measured, perhaps bigger batches read from colder
/// memory).
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

/// The longest wait between drains, reached by doubling
/// [`DRAIN_INTERVAL`] after each drain that found nothing: an idle agent
/// woke 100 times a second only to find the ring empty, about 1 % of a
/// vCPU here (a VM's wake-ups are dear); now 10 times. The first event after
/// a quiet spell waits at most this long; the next drain is short again.
const IDLE_DRAIN_INTERVAL: Duration = Duration::from_millis(100);

/// The wait before the next drain, after one that read `records`.
fn next_drain_interval(current: Duration, records: usize) -> Duration {
    if records > 0 {
        DRAIN_INTERVAL
    } else {
        (current * 2).min(IDLE_DRAIN_INTERVAL)
    }
}

/// Why the agent stopped with an error; `exit_code` tells the status.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Preflight(#[from] crate::check::PreflightError),
    #[error(transparent)]
    Load(#[from] crate::loader::LoadError),
    #[error("reading kernel events: {0}")]
    Events(std::io::Error),
    #[error("{0}")]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
    #[error("cannot start the inventory: {0}")]
    Inventory(std::io::Error),
}

impl RunError {
    /// 2 for bad input (the operator can fix the command line), 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Listen { .. } => 2,
            Self::Preflight(e) => e.exit_code(),
            _ => 1,
        }
    }
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is the
    // clock of bpf_ktime_get_ns, so kernel and agent times compare.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

#[expect(
    clippy::too_many_lines,
    reason = "the wiring of the whole data path reads best in one place"
)]
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    // Bind first: a port in use must fail before anything is attached.
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: args.listen,
            source,
        })?;
    // Bad input (a garbage --btf) must stay one line on stderr: the
    // layout is logged once resolved (about a second).
    let layout = crate::check::preflight(&args.kernel)?;
    tracing::info!(
        kernel = %layout.kernel_release,
        hz = layout.hz,
        reset_reasons = layout.reset_reasons.len(),
        "kernel layout resolved from BTF and tracefs"
    );
    for note in &layout.notes {
        tracing::info!(note = %note, "kernel layout");
    }
    tracing::info!("loading and attaching the kernel programs");
    let mut probes = Probes::load(
        &layout,
        LoadOptions {
            ring_buffer_bytes: args.ring_buffer_bytes,
        },
    )?;
    // Parsing BTF and loading the programs took tens of megabytes of heap
    // that is free now; hand it back instead of carrying it for the
    // agent's whole life.
    // SAFETY: malloc_trim only releases free memory of glibc's allocator.
    unsafe { libc::malloc_trim(0) };
    let metrics = Arc::new(Metrics::new(SeriesLimits {
        max_series: usize::try_from(args.max_series).unwrap_or(usize::MAX),
        ttl: Duration::from_secs(args.series_ttl),
        pod_labels: args.node_name.is_some(),
    })?);
    // Kernel-side run time and count per program, while the agent runs,
    // only when asked for: the kernel then times every BPF program's runs,
    // on the whole host.
    let bpf_stats = args
        .program_run_stats
        .then(|| {
            aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .inspect_err(
                    |e| tracing::warn!(error = %e, "kernel BPF run-time stats unavailable"),
                )
                .ok()
        })
        .flatten();
    metrics
        .build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), layout.kernel_release.as_str()])
        .set(1);
    report_hooks(&probes, &metrics);
    // Fixed once loaded: every map is allocated at its full size up front.
    metrics
        .kernel_map_bytes
        .set(i64::try_from(crate::loader::own_map_bytes()).unwrap_or(i64::MAX));
    spawn_kernel_logger(&mut probes);
    let ring = probes.take_events()?;
    let mut stats = probes.take_stats()?;

    let (queries, mut asked) = tokio::sync::mpsc::channel::<ApiQuery>(16);
    let shared = Arc::new(Shared {
        metrics: Arc::clone(&metrics),
        ready: AtomicBool::new(false),
        queries,
    });
    let serving = listener.local_addr().map_err(|source| RunError::Listen {
        addr: args.listen,
        source,
    })?;
    let server = axum::serve(listener, http::router(Arc::clone(&shared)));
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut server_stop = stop_tx.subscribe();
    let server = tokio::spawn(async move {
        server
            .with_graceful_shutdown(async move {
                let _ = server_stop.changed().await;
            })
            .await
    });
    tracing::info!(listen = %args.listen, "serving /metrics, /healthz, /readyz, /api/v1/connections");

    let min_idle = args
        .idle_timeouts
        .iter()
        .map(|t| t.seconds)
        .min()
        .unwrap_or(350);
    let mut tracker = Tracker::new(TrackerConfig {
        hz: layout.hz,
        reset_after_idle_secs: min_idle,
        close_wait_leak_secs: args.close_wait_threshold,
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        reset_reasons: layout.reset_reasons.clone(),
        ephemeral_ports: ephemeral_ports(),
        peer_label: args.peer_label,
    });
    probe_own_pid(serving);
    // SAFETY: the ring buffer owns its map fd, which stays open and the same
    // for as long as the AsyncFd that owns the ring buffer lives.
    let mut ring = unsafe { AsyncFd::register(ring) }.map_err(|e| RunError::Events(e.into()))?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // The programs wake the agent only when the ring buffer fills up (a
    // wake-up per event costs more than the event): drain it on a timer,
    // which slows down while the ring stays empty.
    let mut drain_every = DRAIN_INTERVAL;
    let drain_timer = tokio::time::sleep(drain_every);
    tokio::pin!(drain_timer);
    tracing::info!("first inventory of every network namespace (sock_diag) started");
    let inventory_interval = args.inventory_interval.max(1);
    #[expect(clippy::cast_precision_loss, reason = "intervals are far below 2^52 s")]
    metrics.inventory.interval.set(inventory_interval as f64);
    // The sockets of dead connections their processes may still hold,
    // looked for at each inventory.
    let watched = crate::inventory::Watched::default();
    let mut inventory = crate::inventory::spawn(
        Duration::from_secs(inventory_interval),
        args.node_name.clone(),
        metrics.inventory.failures.clone(),
        std::sync::Arc::clone(&watched),
    )
    .map_err(RunError::Inventory)?;
    let mut gauges = GaugeState::default();
    let mut kernel_counts = KernelCounts::default();
    let mut evictions_seen = 0u64;
    let mut expiries_unseen_seen = 0u64;
    let mut dead_held_unwatched_seen = 0u64;
    let mut tick_count = 0u64;
    let mut program_stats = ProgramStats::default();
    let mut lost_seen = 0u64;
    let mut delivery = Delivery::default();
    let mut unreceived_seen = 0u64;
    let mut unreconciled_loss = false;
    let mut sigterm =
        tokio::signal::unix::signal(SignalKind::terminate()).map_err(RunError::Events)?;
    let mut sigint =
        tokio::signal::unix::signal(SignalKind::interrupt()).map_err(RunError::Events)?;
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.map_err(RunError::Events)?;
                let records = drain(guard.get_inner_mut(), &mut tracker, &metrics, &mut delivery);
                guard.clear_ready();
                // A burst after a quiet spell: drained often again from now,
                // not only after the idle wait that was running.
                drain_every = next_drain_interval(drain_every, records);
                drain_timer.as_mut().reset(tokio::time::Instant::now() + drain_every);
            }
            () = &mut drain_timer => {
                let records = drain(ring.get_mut(), &mut tracker, &metrics, &mut delivery);
                drain_every = next_drain_interval(drain_every, records);
                drain_timer.as_mut().reset(tokio::time::Instant::now() + drain_every);
            }
            _ = tick.tick() => {
                // The walks of the whole table below hold the event loop
                // (tens of milliseconds with 200,000 connections, more on
                // a busy CPU) while the programs keep submitting: they
                // start with an empty ring.
                let _ = drain(ring.get_mut(), &mut tracker, &metrics, &mut delivery);
                let now = monotonic_ns();
                tracker.sweep(now);
                if tracker.take_overdue_timers() > 0 {
                    // An expiry went unseen, perhaps a death: only a dump
                    // tells now.
                    inventory.request_now();
                }
                tracker.flush_observations(|batch| metrics.apply_all(batch));
                kernel_counts.update(&stats, &metrics);
                #[expect(clippy::cast_precision_loss, reason = "ring sizes are far below 2^52")]
                metrics.ring_fill.set(
                    stats.take_ring_high_water() as f64 / f64::from(args.ring_buffer_bytes.max(1)),
                );
                metrics.evictions.inc_by(tracker.evictions().saturating_sub(evictions_seen));
                evictions_seen = tracker.evictions();
                metrics.keepalive_expiries_unseen.inc_by(
                    tracker.keepalive_expiries_unseen().saturating_sub(expiries_unseen_seen),
                );
                expiries_unseen_seen = tracker.keepalive_expiries_unseen();
                metrics
                    .dead_held_unwatched
                    .inc_by(tracker.dead_held_unwatched().saturating_sub(dead_held_unwatched_seen));
                dead_held_unwatched_seen = tracker.dead_held_unwatched();
                metrics.own_pid_namespace.set(i64::from(tracker.own_pid_namespace()));
                let missed = program_stats.update(&probes, &metrics, bpf_stats.is_some());
                let lost = stats.lost();
                let unreceived = delivery.missing_total();
                if unreceived > unreceived_seen {
                    // Once a second at most: a defect that loses events
                    // would otherwise log at every drain.
                    tracing::warn!(
                        missing = unreceived - unreceived_seen,
                        state_changes_since_start = delivery.missing(ka_common::EventKind::StateChange),
                        since_start = unreceived,
                        "events submitted by the kernel programs were never read (ka_events_unreceived_total, by type): an inventory follows"
                    );
                }
                if missed > 0 || lost > lost_seen || unreceived > unreceived_seen {
                    tracker.note_loss(now);
                    unreconciled_loss = true;
                } else if unreconciled_loss {
                    // A close may have gone unseen: the inventory finds the
                    // connections that are gone and closes them. Asked for
                    // once the losses stop: during the overload an
                    // inventory (a dump, owners from /proc) takes the CPU
                    // the event loop is short of.
                    inventory.request_now();
                    unreconciled_loss = false;
                }
                lost_seen = lost;
                unreceived_seen = unreceived;
                if tick_count.is_multiple_of(60) {
                    metrics.expire_series();
                }
                tick_count += 1;
                publish(&tracker, &args.idle_timeouts, now, &metrics, &mut gauges);
                if let Ok(mut list) = watched.lock() {
                    *list = tracker.dead_held_watch();
                }
                // Ready once attached and the first inventory is in.
                if tracker.inventory_done() {
                    shared.ready.store(true, Ordering::Release);
                }
            }
            // A close waits a few milliseconds for its verdict (see
            // `Tracker::settle_closes`); give it without waiting for the tick.
            () = tokio::time::sleep(Duration::from_millis(25)), if tracker.has_closing() => {
                tracker.settle_closes(monotonic_ns());
                tracker.flush_observations(|batch| metrics.apply_all(batch));
            }
            Some(query) = asked.recv() => answer(query, &tracker, &args.idle_timeouts),
            Some(update) = inventory.updates.recv() => {
                // Every event submitted before the dump is read first: a
                // close still waiting in the ring is not a connection gone
                // without its close (which the reconciliation closes).
                let _ = drain(ring.get_mut(), &mut tracker, &metrics, &mut delivery);
                metrics.pod_list_failures.inc_by(u64::from(update.pod_list_failed));
                let first = !tracker.inventory_done();
                let reconcile_started = Instant::now();
                let report = tracker.reconcile(&update);
                metrics.inventory.reconciled(&update, &report, reconcile_started.elapsed());
                if first {
                    tracing::info!(
                        namespaces = report.namespaces,
                        adopted = report.adopted,
                        took_ms = update.took.as_millis(),
                        "first inventory of every network namespace reconciled: ready"
                    );
                } else if report.vanished > 0 {
                    tracing::info!(
                        vanished = report.vanished,
                        adopted = report.adopted,
                        took_ms = update.took.as_millis(),
                        "inventory reconciled: connections gone without their close event closed from their records"
                    );
                } else {
                    tracing::debug!(?report, took_ms = update.took.as_millis(), "inventory reconciled");
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = stop_rx.changed() => break,
        }
    }
    tracing::info!("stopping: detaching all programs");
    let _ = stop_tx.send(true);
    drop(ring);
    drop(stats);
    drop(probes);
    match server.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(RunError::Http(e)),
        Err(e) => Err(RunError::Http(std::io::Error::other(e))),
    }
}

/// Connects once to the agent's own server from a thread named after the
/// agent's id in `/proc`: the kernel program records that connect with the
/// kernel's id, which tells whether `/proc` shows the kernel's process ids
/// (see `track::connector`). Nothing to learn when `/proc` has no `self`.
fn probe_own_pid(serving: std::net::SocketAddr) {
    let Some(pid) = crate::track::own_pid_in(std::path::Path::new("/proc")) else {
        tracing::warn!("/proc/self unreadable: connectors named from /proc unchecked");
        return;
    };
    let mut target = serving;
    if target.ip().is_unspecified() {
        target.set_ip(match target {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let spawned = std::thread::Builder::new()
        .name(crate::track::self_probe_thread(pid))
        .spawn(move || {
            // Refused or timed out, the connect left SYN_SENT and was
            // recorded: only its id matters. Other errors come before the
            // SYN, which leaves nothing to check.
            if let Err(error) = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2))
                && !matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::TimedOut
                )
            {
                tracing::warn!(%error, %target, "the probe of the agent's own process id could not connect: process ids unchecked");
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start the probe of the agent's own process id");
    }
}

fn report_hooks(probes: &Probes, metrics: &Metrics) {
    for (hook, status) in &probes.hooks {
        metrics
            .hook_attached
            .with_label_values(&[hook.program()])
            .set(i64::from(status.is_attached()));
        match status {
            crate::loader::HookStatus::Attached => {
                tracing::info!(hook = %hook, program = probes.program_of(*hook), "attached");
            }
            crate::loader::HookStatus::Unavailable(why)
            | crate::loader::HookStatus::Failed(why) => {
                tracing::warn!(hook = %hook, feature = hook.feature(), why = %why, "hook not attached; feature degraded");
            }
        }
    }
}

/// The in-kernel counters as last read, to export deltas.
#[derive(Default)]
struct KernelCounts {
    lost: u64,
    read_failures: u64,
    not_tcp: u64,
    connectors_unknown: u64,
    by_kind: HashMap<(ka_common::EventKind, Outcome), u64>,
}

/// What became of an event a kernel program produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Outcome {
    /// In the ring buffer: received by the agent or about to be.
    Submitted,
    /// The ring buffer was full.
    Lost,
    /// Not needed by the agent: counted in the kernel, never sent.
    Filtered,
}

impl Outcome {
    const fn name(self) -> &'static str {
        match self {
            Self::Submitted => "submitted",
            Self::Lost => "lost",
            Self::Filtered => "filtered",
        }
    }
}

impl KernelCounts {
    fn update(&mut self, stats: &crate::loader::KernelStats, metrics: &Metrics) {
        let lost = stats.lost();
        metrics.events_lost.inc_by(lost.saturating_sub(self.lost));
        self.lost = self.lost.max(lost);
        let failures = stats.read_failures();
        metrics
            .read_failures
            .inc_by(failures.saturating_sub(self.read_failures));
        self.read_failures = self.read_failures.max(failures);
        let not_tcp = stats.not_tcp();
        metrics
            .not_tcp_transitions
            .inc_by(not_tcp.saturating_sub(self.not_tcp));
        self.not_tcp = self.not_tcp.max(not_tcp);
        let connectors_unknown = stats.connectors_unknown();
        metrics
            .connectors_unknown
            .inc_by(connectors_unknown.saturating_sub(self.connectors_unknown));
        self.connectors_unknown = self.connectors_unknown.max(connectors_unknown);
        for kind in ka_common::EventKind::ALL {
            for outcome in [Outcome::Submitted, Outcome::Lost, Outcome::Filtered] {
                let now = match outcome {
                    Outcome::Submitted => stats.submitted(kind),
                    Outcome::Lost => stats.lost_of(kind),
                    Outcome::Filtered => stats.filtered(kind),
                };
                let seen = self.by_kind.entry((kind, outcome)).or_default();
                let delta = now.saturating_sub(*seen);
                if delta > 0 {
                    metrics
                        .kernel_events
                        .with_label_values(&[kind.name(), outcome.name()])
                        .inc_by(delta);
                }
                *seen = (*seen).max(now);
            }
        }
    }
}

/// Run count and time of each program as last read, to export deltas.
#[derive(Default)]
struct ProgramStats {
    seen: HashMap<&'static str, (u64, Duration, u64)>,
}

/// Runs of `program` the kernel skipped because a BPF program was already
/// running on that CPU (`recursion_misses`, which aya's `ProgramInfo` does
/// not expose; the kernel prints it in the program fd's fdinfo).
fn recursion_misses(program: &aya::programs::Program) -> Option<u64> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = program.fd().ok()?.as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    recursion_misses_in(&info)
}

/// The `recursion_misses` count of a BPF program's fdinfo text (absent
/// before 5.12).
fn recursion_misses_in(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("recursion_misses:")?.trim().parse().ok())
}

impl ProgramStats {
    /// Exports what changed since the last call (run counts and times only
    /// `with_run_stats`, when the kernel keeps them); returns the runs of
    /// `inet_sock_set_state` skipped since then, whose close events are
    /// lost.
    fn update(&mut self, probes: &Probes, metrics: &Metrics, with_run_stats: bool) -> u64 {
        let mut missed_state_changes = 0;
        for (hook, status) in &probes.hooks {
            if !status.is_attached() {
                continue;
            }
            let Some(program) = probes.ebpf.program(probes.program_of(*hook)) else {
                continue;
            };
            let Ok(info) = program.info() else {
                continue;
            };
            let (runs, time) = (info.run_count(), info.run_time());
            let misses = recursion_misses(program).unwrap_or(0);
            let (seen_runs, seen_time, seen_misses) = self.seen.entry(hook.program()).or_default();
            let new_misses = misses.saturating_sub(*seen_misses);
            metrics
                .program_misses
                .with_label_values(&[hook.program()])
                .inc_by(new_misses);
            *seen_misses = misses;
            if *hook == crate::loader::Hook::InetSockSetState {
                missed_state_changes += new_misses;
            }
            // Without the timing on (ours or another tool's), the kernel
            // counts nothing: no series rather than a series of zeros.
            if !with_run_stats && runs == 0 {
                continue;
            }
            metrics
                .program_runs
                .with_label_values(&[hook.program()])
                .inc_by(runs.saturating_sub(*seen_runs));
            metrics
                .program_run_seconds
                .with_label_values(&[hook.program()])
                .inc_by(time.saturating_sub(*seen_time).as_secs_f64());
            *seen_runs = runs;
            *seen_time = time;
        }
        missed_state_changes
    }
}

/// Interprets every record waiting in the ring buffer; returns how many
/// there were.
fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    tracker: &mut Tracker,
    metrics: &Metrics,
    delivery: &mut Delivery,
) -> usize {
    // Counted per kind here and added once per drain: a labelled counter
    // lookup per event was a tenth of the agent's time under churn.
    let mut received = [0u64; ka_common::EventKind::ALL.len() + 1];
    let mut unreceived = [0u64; ka_common::EventKind::ALL.len() + 1];
    let mut records = 0;
    while let Some(record) = ring.next() {
        records += 1;
        match decode::decode(&record) {
            Ok(event) => {
                let kind = event.kind() as usize;
                if let Some(count) = received.get_mut(kind) {
                    *count += 1;
                }
                let skipped = delivery.note(event.header());
                if skipped > 0
                    && let Some(count) = unreceived.get_mut(kind)
                {
                    *count += u64::from(skipped);
                }
                tracker.handle(&event);
            }
            Err(error) => {
                metrics.decode_errors.inc();
                tracing::debug!(%error, "undecodable record");
            }
        }
    }
    for kind in ka_common::EventKind::ALL {
        let count = received.get(kind as usize).copied().unwrap_or(0);
        if count > 0 {
            metrics
                .events
                .with_label_values(&[kind.name()])
                .inc_by(count);
        }
        let missing = unreceived.get(kind as usize).copied().unwrap_or(0);
        if missing > 0 {
            metrics
                .events_unreceived
                .with_label_values(&[kind.name()])
                .inc_by(missing);
        }
    }
    tracker.settle_closes(monotonic_ns());
    tracker.flush_observations(|batch| metrics.apply_all(batch));
    records
}

/// Bridges aya-log records of the kernel programs into `tracing` (through
/// the `log` facade, which tracing-subscriber captures).
fn spawn_kernel_logger(probes: &mut Probes) {
    match aya_log::EbpfLogger::init(&mut probes.ebpf) {
        // SAFETY: the logger owns its ring-buffer fd for as long as the
        // AsyncFd that owns the logger lives.
        Ok(logger) => match unsafe { AsyncFd::register(logger) }.map_err(std::io::Error::from) {
            Ok(mut logger) => {
                tokio::spawn(async move {
                    while let Ok(mut guard) = logger.readable_mut().await {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                });
            }
            Err(error) => tracing::debug!(%error, "kernel log reader unavailable"),
        },
        Err(error) => tracing::debug!(%error, "no kernel-side log records in this build"),
    }
}

/// `net.ipv4.ip_local_port_range` of the caller's namespace.
pub fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(str::parse::<u16>);
            Some((parts.next()?.ok()?, parts.next()?.ok()?))
        })
        .unwrap_or((32768, 60999))
}

/// Label sets set on each gauge last time, to remove the ones that vanish.
#[derive(Default)]
struct GaugeState {
    connections: HashSet<Vec<String>>,
    probing: HashSet<Vec<String>>,
    at_risk: HashSet<Vec<String>>,
    dead_held: HashSet<Vec<String>>,
}

/// Which idle timeouts a connection is at risk of, and why.
pub fn at_risk_of(
    connection: &Connection,
    idle_secs: f64,
    timeouts: &[IdleTimeout],
) -> Vec<AtRisk> {
    risks(connection, idle_secs, timeouts)
        .map(|(reason, timeout)| AtRisk {
            reason,
            idle_timeout: timeout.name.clone(),
        })
        .collect()
}

/// [`at_risk_of`] without allocating: each reason with its timeout.
fn risks<'t>(
    connection: &Connection,
    idle_secs: f64,
    timeouts: &'t [IdleTimeout],
) -> impl Iterator<Item = (&'static str, &'t IdleTimeout)> {
    let established = connection.state == TcpState::Established;
    let keepalive_enabled = connection.keepalive.enabled;
    let longest_silence_secs = connection.keepalive.longest_silence_secs();
    timeouts
        .iter()
        .filter(move |_| established)
        .filter_map(move |timeout| {
            #[expect(clippy::cast_precision_loss, reason = "timeouts are far below 2^52 s")]
            let limit = timeout.seconds as f64;
            if idle_secs < limit {
                return None;
            }
            let reason = if !keepalive_enabled {
                "keepalive_disabled"
            } else if longest_silence_secs >= limit {
                "keepalive_slower_than_idle_timeout"
            } else {
                return None;
            };
            Some((reason, timeout))
        })
}

/// Sets the gauges that describe the whole table: connections by state,
/// probing, at risk, tracked.
fn publish(
    tracker: &Tracker,
    timeouts: &[IdleTimeout],
    now: u64,
    metrics: &Metrics,
    gauges: &mut GaugeState,
) {
    // Counted per label set first (one lookup of a borrowed key per
    // connection), label values built once per set: built per connection
    // (six strings, two of them formatted numbers, hashed as a vector, per
    // gauge) they were three quarters of an idle agent's CPU with 100,000
    // connections. The walk holds the event loop (see `run`).
    let mut sets: hashbrown::HashMap<LabelKey, LabelSetCounts> = hashbrown::HashMap::new();
    for connection in tracker.connections() {
        let counts = sets
            .entry(connection.label_key())
            .or_insert_with(|| LabelSetCounts::of(connection));
        add(&mut counts.by_state, connection.state, 1);
        if connection.state == TcpState::Established && connection.keepalive.unanswered > 0 {
            counts.probing += 1;
        }
        for (reason, timeout) in risks(connection, connection.idle_secs(now), timeouts) {
            add(&mut counts.at_risk, (reason, timeout.name.as_str()), 1.0);
        }
    }
    let mut by_state: HashMap<Vec<String>, i64> = HashMap::new();
    let mut probing: HashMap<Vec<String>, i64> = HashMap::new();
    let mut at_risk: HashMap<Vec<String>, f64> = HashMap::new();
    // Sets that differ only in labels the series do not carry (pod labels
    // outside Kubernetes) are summed.
    for counts in sets.values() {
        let labels = &counts.first.labels();
        for (state, count) in &counts.by_state {
            *by_state
                .entry(metrics.values(&[state.name()], labels))
                .or_default() += count;
        }
        if counts.probing > 0 {
            *probing.entry(metrics.values(&[], labels)).or_default() += counts.probing;
        }
        for ((reason, timeout), count) in &counts.at_risk {
            *at_risk
                .entry(metrics.values(&[reason, timeout], labels))
                .or_default() += count;
        }
    }
    let mut dead_held: HashMap<Vec<String>, i64> = HashMap::new();
    for dead in tracker.dead_held() {
        *dead_held
            .entry(metrics.values(&[dead.cause.name()], &dead.labels))
            .or_default() += 1;
    }
    let by_state = metrics.separate_gauges(1, by_state);
    let probing = metrics.separate_gauges(0, probing);
    let at_risk = metrics.separate_gauges(2, at_risk);
    let dead_held = metrics.separate_gauges(1, dead_held);
    // Set as one: a scrape sees this second's table, not half of it.
    metrics.as_one_batch(|| {
        sync_int_gauge(&metrics.connections, &by_state, &mut gauges.connections);
        sync_int_gauge(&metrics.probing, &probing, &mut gauges.probing);
        sync_int_gauge(&metrics.dead_held, &dead_held, &mut gauges.dead_held);
        let keys: HashSet<Vec<String>> = at_risk.keys().cloned().collect();
        for (key, value) in &at_risk {
            metrics.at_risk.with_label_values(key).set(*value);
        }
        for gone in gauges.at_risk.difference(&keys) {
            let _ = metrics
                .at_risk
                .remove_label_values(&gone.iter().map(String::as_str).collect::<Vec<_>>());
        }
        gauges.at_risk = keys;
        metrics
            .tracked
            .set(i64::try_from(tracker.len()).unwrap_or(i64::MAX));
    });
}

/// The table gauges' counts of one label set.
struct LabelSetCounts<'t> {
    /// The set's first connection, whose labels are the set's.
    first: &'t Connection,
    by_state: Vec<(TcpState, i64)>,
    probing: i64,
    /// By reason and idle timeout name.
    at_risk: Vec<((&'static str, &'t str), f64)>,
}

impl<'t> LabelSetCounts<'t> {
    fn of(first: &'t Connection) -> Self {
        Self {
            first,
            by_state: Vec::new(),
            probing: 0,
            at_risk: Vec::new(),
        }
    }
}

/// Adds `count` to `key`'s entry of a short list (a few states, a few
/// timeouts: a scan costs less than hashing).
fn add<K: PartialEq, V: std::ops::AddAssign>(list: &mut Vec<(K, V)>, key: K, count: V) {
    match list.iter_mut().find(|(k, _)| *k == key) {
        Some((_, total)) => *total += count,
        None => list.push((key, count)),
    }
}

/// Answers a question of the API from the table, worst first.
fn answer(query: ApiQuery, tracker: &Tracker, timeouts: &[IdleTimeout]) {
    match query {
        ApiQuery::Connections { filter, reply } => {
            let now = monotonic_ns();
            let mut views: Vec<ConnectionView> = tracker
                .connections()
                .filter_map(|connection| {
                    let idle_secs = connection.idle_secs(now);
                    let risks = at_risk_of(connection, idle_secs, timeouts);
                    let view = ConnectionView {
                        class: http::class_of(connection, !risks.is_empty()),
                        connection: connection.clone(),
                        idle_secs,
                        at_risk: risks,
                    };
                    filter.matches(&view).then_some(view)
                })
                .collect();
            views.sort_by(|a, b| {
                rank(a)
                    .cmp(&rank(b))
                    .then(b.idle_secs.total_cmp(&a.idle_secs))
            });
            views.truncate(filter.limit.unwrap_or(usize::MAX));
            let _ = reply.send(views);
        }
        ApiQuery::Closed {
            cause,
            held,
            limit,
            reply,
        } => {
            let closed = tracker
                .recently_closed()
                .into_iter()
                .filter(|c| cause.is_none_or(|want| c.cause == want))
                .filter(|c| held.is_none_or(|want| c.held_by_pid.is_some() == want))
                .take(limit)
                .cloned()
                .collect();
            let _ = reply.send(closed);
        }
    }
}

fn rank(view: &ConnectionView) -> u8 {
    match view.class {
        "zombie" => 0,
        "probing" => 1,
        "at_risk" => 2,
        "ok" => 3,
        _ => 4,
    }
}

fn sync_int_gauge(
    gauge: &prometheus::IntGaugeVec,
    values: &HashMap<Vec<String>, i64>,
    previous: &mut HashSet<Vec<String>>,
) {
    let keys: HashSet<Vec<String>> = values.keys().cloned().collect();
    for (key, value) in values {
        gauge.with_label_values(key).set(*value);
    }
    for gone in previous.difference(&keys) {
        let _ = gauge.remove_label_values(&gone.iter().map(String::as_str).collect::<Vec<_>>());
    }
    *previous = keys;
}

#[cfg(test)]
mod tests {
    use super::recursion_misses_in;

    #[test]
    fn drains_slow_down_while_the_ring_stays_empty_and_speed_up_at_the_first_record() {
        use super::{DRAIN_INTERVAL, IDLE_DRAIN_INTERVAL, next_drain_interval};
        let mut every = DRAIN_INTERVAL;
        let mut waits = Vec::new();
        for _ in 0..6 {
            every = next_drain_interval(every, 0);
            waits.push(every.as_millis());
        }
        assert_eq!(waits, [20, 40, 80, 100, 100, 100]);
        assert_eq!(every, IDLE_DRAIN_INTERVAL);
        assert_eq!(next_drain_interval(every, 1), DRAIN_INTERVAL);
        assert_eq!(next_drain_interval(DRAIN_INTERVAL, 500), DRAIN_INTERVAL);
    }

    #[test]
    fn connections_whose_labels_come_out_alike_share_one_gauge_series() {
        use super::{GaugeState, publish};
        use crate::{
            idle_timeout::IdleTimeout,
            metrics::{Metrics, SeriesLimits},
            model::{Direction, TcpState},
            track::{Connection, PeerLabel, Tracker, TrackerConfig},
        };

        // Grouped by keys finer than their labels: the whole peer address
        // under `--peer-label cidr`, no pod apart from an empty pod.
        let mut tracker = Tracker::new(TrackerConfig {
            peer_label: PeerLabel::Cidr,
            ..TrackerConfig::default()
        });
        let local = "198.19.0.1:40000".parse().unwrap();
        for (sk, remote, pod) in [
            (1, "198.18.0.1:443", None),
            (2, "198.18.0.2:443", Some(Box::default())),
            (3, "198.18.0.3:443", None),
            (4, "198.18.1.1:443", None),
        ] {
            let mut connection = Connection::for_tests(
                local,
                remote.parse().unwrap(),
                Direction::Outbound,
                TcpState::Established,
            );
            connection.sk = sk;
            connection.pod = pod;
            tracker.insert_for_tests(connection);
        }
        let metrics = Metrics::new(SeriesLimits::default()).unwrap();
        let timeouts = [IdleTimeout {
            name: "aws-nlb".into(),
            seconds: 350,
        }];
        let mut gauges = GaugeState::default();
        // Idle since the epoch of the monotonic clock: past the timeout.
        publish(&tracker, &timeouts, 400_000_000_000, &metrics, &mut gauges);
        let text = metrics.render();
        let series = |name: &str| -> Vec<String> {
            text.lines()
                .filter(|line| line.starts_with(&format!("{name}{{")))
                .map(|line| {
                    let (labels, value) = line.rsplit_once(' ').unwrap();
                    let peer = labels.split("peer=\"").nth(1).unwrap();
                    format!("{} {value}", &peer[..peer.find('"').unwrap()])
                })
                .collect()
        };
        assert_eq!(
            series("ka_connections"),
            ["198.18.0.0/24 3", "198.18.1.0/24 1"]
        );
        assert_eq!(
            series("ka_connections_at_risk"),
            ["198.18.0.0/24 3", "198.18.1.0/24 1"]
        );
    }

    #[test]
    fn recursion_misses_come_from_the_fdinfo_line() {
        // A BPF program's fdinfo on 6.18 (tabs as the kernel prints them).
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t2071\n\
                      prog_type:\t5\nprog_jited:\t1\nprog_tag:\t3b185187f1855c4c\n\
                      memlock:\t4096\nprog_id:\t512\nrun_time_ns:\t61394214\n\
                      run_cnt:\t519026\nrecursion_misses:\t17\nverified_insns:\t98\n";
        assert_eq!(recursion_misses_in(fdinfo), Some(17));
        // Kernels before 5.12 print no such line.
        assert_eq!(recursion_misses_in("run_cnt:\t3\n"), None);
        assert_eq!(recursion_misses_in("recursion_misses:\tmany\n"), None);
    }
}
