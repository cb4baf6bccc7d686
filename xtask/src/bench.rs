//! `cargo xtask bench`: the performance benchmark of docs/benchmarks.md.
//!
//! A private nginx on loopback is loaded by `wrk` (connection churn with
//! `Connection: close`, then HTTP keep-alive), interleaved round by round
//! under each configuration: nothing attached, `ka-agent run`, libbpf-tools
//! `tcpstates` (the reference peer) and, when installed, a bpftrace one-liner
//! that only counts `inet_sock_set_state` in a map (near-ideal). Medians and
//! ratios against `none` come from the same run. Then, each in its own
//! bounded step with an agent of its own: a keepalive death's latency to
//! `/metrics`, the agent's memory with many tracked connections (kernel map
//! memory apart) and the inventory of them, and `/metrics` with many series.
//!
//! Everything is on loopback (the keepalive death in a network namespace of
//! its own); every process started here is stopped by a guard, also on
//! error. Results go to `target/bench/results.json`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use ka_lab::{ConnectOpts, Lab, exposition::Exposition};

use crate::cmd;

/// `cargo xtask bench` options.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Rounds of interleaved runs (each configuration once per round).
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds of each wrk run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Established loopback connections to hold for the memory step (both
    /// ends are tracked, so half as many pairs are opened).
    #[arg(long, default_value_t = 100_000)]
    connections: u32,
    /// Closed ports to connect to for the `/metrics` step: each refused
    /// connection makes two series of its own (`ka_resets_received_total`
    /// and `ka_connections_closed_total`), so 5,000 give the 10,000 series
    /// of the target.
    #[arg(long, default_value_t = 5_000)]
    ports: u32,
    /// CI mode: checks the harness works (1 round, 1-second runs, small
    /// counts); the figures mean nothing.
    #[arg(long)]
    quick: bool,
}

/// The configurations compared, in the order of the first round.
const CONFIGS: [Config; 4] = [
    Config::None,
    Config::Agent,
    Config::Tcpstates,
    Config::Bpftrace,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    None,
    Agent,
    Tcpstates,
    Bpftrace,
    /// A program that does nothing, on `timer:timer_start`: only timed, to
    /// show what the kernel's run timing reports for no work at all here.
    BpftraceEmpty,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Agent => "ka-agent",
            Self::Tcpstates => "tcpstates",
            Self::Bpftrace => "bpftrace-count",
            Self::BpftraceEmpty => "bpftrace-empty",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    Churn,
    KeepAlive,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::Churn => "churn",
            Self::KeepAlive => "keepalive",
        }
    }
}

/// A child process stopped (signal, then SIGKILL after 5 s) when dropped.
struct Proc {
    name: String,
    child: Option<Child>,
    signal: i32,
}

impl Proc {
    fn spawn(name: &str, command: &mut Command, signal: i32) -> anyhow::Result<Self> {
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            signal,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Fails when the process has already exited.
    fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(pid, self.signal) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("ka-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A JSON value, written by hand (xtask has no serde).
enum Json {
    Null,
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn obj<const N: usize>(pairs: [(&str, Json); N]) -> Self {
        Self::Obj(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    }

    fn opt(value: Option<f64>) -> Self {
        value.map_or(Self::Null, Self::Num)
    }

    fn write(&self, out: &mut String) {
        match self {
            Self::Num(n) if n.is_finite() => {
                let _ = write!(out, "{}", (n * 1000.0).round() / 1000.0);
            }
            Self::Null | Self::Num(_) => out.push_str("null"),
            Self::Str(s) => {
                out.push('"');
                for c in s.chars() {
                    match c {
                        '"' => out.push_str("\\\""),
                        '\\' => out.push_str("\\\\"),
                        c if u32::from(c) < 0x20 => {
                            let _ = write!(out, "\\u{:04x}", u32::from(c));
                        }
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            Self::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    item.write(out);
                }
                out.push(']');
            }
            Self::Obj(pairs) => {
                out.push('{');
                for (i, (key, value)) in pairs.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    Self::Str(key.clone()).write(out);
                    out.push(':');
                    value.write(out);
                }
                out.push('}');
            }
        }
    }
}

fn num<T: Into<u64>>(value: T) -> Json {
    Json::Num(float(value.into()))
}

#[expect(
    clippy::cast_precision_loss,
    reason = "counts and sizes far below 2^52"
)]
fn float(value: u64) -> f64 {
    value as f64
}

/// The ratios of one configuration's rounds to `none`'s in the same
/// rounds: their median and a confidence interval of it, how far the
/// machine's noise moves a ratio, which a verdict against a target must
/// not hide.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spread {
    median: f64,
    /// The interval's bounds: order statistics of the per-round ratios
    /// (see [`median_interval`]).
    low: f64,
    high: f64,
    /// How often such an interval holds the true median ratio.
    confidence: f64,
}

impl Spread {
    /// `None` without a round of both, or where `none` measured nothing.
    fn paired(values: &[f64], baseline: &[f64]) -> Option<Self> {
        let mut ratios: Vec<f64> = values
            .iter()
            .zip(baseline)
            .filter(|&(_, &b)| b > 0.0)
            .map(|(v, b)| v / b)
            .filter(|r| r.is_finite())
            .collect();
        let median = median(&ratios)?;
        ratios.sort_by(f64::total_cmp);
        let (k, confidence) = median_interval(ratios.len());
        Some(Self {
            median,
            low: ratios[k - 1],
            high: ratios[ratios.len() - k],
            confidence,
        })
    }

    /// Met if the whole interval is at or above the target, missed if it
    /// is all below, else the rounds cannot tell.
    fn against(self, target: f64) -> Verdict {
        if self.low >= target {
            Verdict::Met
        } else if self.high < target {
            Verdict::Missed
        } else {
            Verdict::WithinNoise
        }
    }
}

/// The distribution-free confidence interval of a median of `n` values
/// (`n` ≥ 1): the `k`-th smallest to the `k`-th largest value, for the
/// largest `k` that still covers the median with 95 % probability
/// (`1 - 2 P(B < k)`, `B` binomial with `n` trials of one half); the
/// whole range (`k` = 1) with its own, lower, coverage below 6 values.
/// Returns `k` and the coverage.
fn median_interval(n: usize) -> (usize, f64) {
    let one = 0.5f64.powi(i32::try_from(n).unwrap_or(i32::MAX)); // P(B = i) / C(n, i)
    let mut k = 1;
    let mut choose = 1.0; // C(n, k - 1)
    let mut tail = one; // P(B <= k - 1)
    loop {
        let next_choose = choose * float((n - k + 1) as u64) / float(k as u64);
        let next_tail = tail + next_choose * one;
        if k + 1 > n.div_ceil(2) || 1.0 - 2.0 * next_tail < 0.95 {
            return (k, 1.0 - 2.0 * tail);
        }
        choose = next_choose;
        tail = next_tail;
        k += 1;
    }
}

/// A target's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Met,
    Missed,
    /// Some rounds met it, some did not.
    WithinNoise,
    NotMeasured,
}

impl Verdict {
    fn of(ok: Option<bool>) -> Self {
        match ok {
            Some(true) => Self::Met,
            Some(false) => Self::Missed,
            None => Self::NotMeasured,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Met => "ok",
            Self::Missed => "MISSED",
            Self::WithinNoise => "within noise",
            Self::NotMeasured => "n/a",
        }
    }
}

fn median(values: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        f64::midpoint(sorted[mid - 1], sorted[mid])
    } else {
        sorted[mid]
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// How long an answer took, from the connect.
#[derive(Clone, Copy)]
struct Took {
    /// To its first byte: the agent's own work (`/metrics` is rendered
    /// whole before it is sent).
    first_byte: Duration,
    /// To its last byte: the first byte and the transfer over loopback.
    whole: Duration,
}

/// The body of `GET path` (HTTP/1.0), and how long the answer took.
fn get(addr: SocketAddr, path: &str) -> Option<(String, Took)> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut response = Vec::new();
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).ok()?;
    let first_byte = started.elapsed();
    response.push(first[0]);
    stream.read_to_end(&mut response).ok()?;
    let whole = started.elapsed();
    let response = String::from_utf8(response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| (body.to_owned(), Took { first_byte, whole }))
}

/// This network namespace's `TcpExt` counter `name`.
fn tcp_ext(name: &str) -> Option<i64> {
    let netstat = std::fs::read_to_string("/proc/net/netstat").ok()?;
    ka_lab::Counters::parse(&netstat)
        .ok()?
        .get(&format!("TcpExt.{name}"))
}

fn metrics(addr: SocketAddr) -> anyhow::Result<String> {
    get(addr, "/metrics")
        .map(|(body, _)| body)
        .context("the agent's /metrics did not answer")
}

/// Sum of metric `name` over the series that have every `(label, value)`.
fn sum(text: &str, name: &str, filter: &[(&str, &str)]) -> f64 {
    Exposition::parse(text).sum(name, filter)
}

/// The value of each series of metric `name` by its label `label`.
fn by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    Exposition::parse(text)
        .matching(name, &[])
        .filter_map(|s| Some((s.label(label)?.to_owned(), s.value)))
        .collect()
}

/// CPU time of all of a process's threads so far, in nanoseconds (the
/// scheduler's own count, `schedstat`: finer than the clock ticks of
/// `/proc/PID/stat`, which an idle agent stays within).
fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let schedstat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += schedstat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// The CPU an agent uses over a stretch of the caller's choosing: its
/// threads only, not its kernel programs, which run in the context of the
/// traffic they watch (and are timed apart).
struct CpuWindow {
    pid: u32,
    cpu_ns: u64,
    since: Instant,
}

impl CpuWindow {
    fn start(agent: &Agent) -> Option<Self> {
        let pid = agent.proc.pid();
        Some(Self {
            pid,
            cpu_ns: cpu_ns(pid)?,
            since: Instant::now(),
        })
    }

    /// What it has used since the start, in percent of one CPU.
    fn percent(&self) -> Option<f64> {
        let used = cpu_ns(self.pid)?.saturating_sub(self.cpu_ns);
        Some(float(used) / self.since.elapsed().as_secs_f64() / 1e7)
    }
}

/// A process's CPU over the next `window`, in percent of one CPU.
fn cpu_percent(pid: u32, window: Duration) -> Option<f64> {
    let before = cpu_ns(pid)?;
    std::thread::sleep(window);
    let used = cpu_ns(pid)?.saturating_sub(before);
    Some(float(used) / window.as_secs_f64() / 1e7)
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether a process holds a loaded BPF program (attached soon after).
fn holds_bpf_program(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-prog")
        })
    })
}

/// Run time and run count summed over the BPF programs `pid` holds, from
/// their fdinfo (counted while `kernel.bpf_stats_enabled` is on).
fn program_stats(pid: u32) -> (u64, u64) {
    let mut totals = (0, 0);
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return totals;
    };
    for fd in fds.flatten() {
        if !std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf-prog") {
            continue;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy());
        let Ok(text) = std::fs::read_to_string(info) else {
            continue;
        };
        let value = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        totals.0 += value("run_time_ns:");
        totals.1 += value("run_cnt:");
    }
    totals
}

/// Sets the kernel's BPF run-time statistics (`kernel.bpf_stats_enabled`)
/// for a phase of the benchmark, restoring the previous setting on drop:
/// off while throughput is compared (the timing costs every program two
/// clock reads per run, and the agent does not turn it on by default), on
/// for the timed run, so the reference tools' programs are timed like the
/// agent's.
struct BpfStats(Option<String>);

impl BpfStats {
    const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn set(on: bool) -> Self {
        let previous = std::fs::read_to_string(Self::SYSCTL).ok();
        if let Err(error) = std::fs::write(Self::SYSCTL, if on { "1" } else { "0" }) {
            eprintln!("bench: cannot set BPF stats ({error}): run times unknown or skewed");
        }
        Self(previous)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(previous) = &self.0 {
            let _ = std::fs::write(Self::SYSCTL, previous.trim());
        }
    }
}

/// Runs `command` with its stdout in a file, killed after `timeout`.
fn run_bounded(command: &mut Command, timeout: Duration, out: &Path) -> anyhow::Result<String> {
    let file = std::fs::File::create(out)?;
    let mut proc = Proc::spawn(
        &format!("{command:?}"),
        command.stdout(file).stderr(Stdio::null()),
        libc::SIGKILL,
    )?;
    let deadline = Instant::now() + timeout;
    loop {
        let status = proc.child.as_mut().map(Child::try_wait).transpose()?;
        if let Some(Some(status)) = status {
            proc.child = None;
            if !status.success() {
                bail!("{command:?} failed with {status}");
            }
            break;
        }
        if Instant::now() > deadline {
            bail!("{command:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(std::fs::read_to_string(out)?)
}

/// The agent under test: `ka-agent run --listen 127.0.0.1:<free port>`.
struct Agent {
    proc: Proc,
    addr: SocketAddr,
}

impl Agent {
    fn start(binary: &Path, dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let log = std::fs::File::create(dir.join("agent.log"))?;
        let mut proc = Proc::spawn(
            "ka-agent",
            Command::new(binary)
                .args(["run", "--listen", &addr.to_string(), "--log", "warn"])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(log),
            libc::SIGTERM,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while get(addr, "/readyz").is_none_or(|(b, _)| !b.contains("ready")) {
            proc.alive().with_context(|| {
                format!(
                    "see {}",
                    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
                )
            })?;
            if Instant::now() > deadline {
                bail!("the agent was not ready within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self { proc, addr })
    }
}

/// A tool attached for one configuration of one round.
enum Attached {
    Nothing,
    Agent(Agent),
    Other(Proc),
}

fn attach(config: Config, binary: &Path, dir: &Path) -> anyhow::Result<Attached> {
    let (name, mut command, signal) = match config {
        Config::None => return Ok(Attached::Nothing),
        Config::Agent => return Ok(Attached::Agent(Agent::start(binary, dir, &[])?)),
        Config::Tcpstates => (
            "tcpstates",
            Command::new(tcpstates().context("tcpstates (libbpf-tools) is not installed")?),
            libc::SIGINT,
        ),
        Config::Bpftrace => {
            let mut command = Command::new("bpftrace");
            command.args([
                "-e",
                "tracepoint:sock:inet_sock_set_state { @[args->newstate] = count(); }",
            ]);
            ("bpftrace", command, libc::SIGINT)
        }
        Config::BpftraceEmpty => {
            let mut command = Command::new("bpftrace");
            command.args(["-e", "tracepoint:timer:timer_start { }"]);
            ("bpftrace", command, libc::SIGINT)
        }
    };
    let mut proc = Proc::spawn(
        name,
        command.stdout(Stdio::null()).stderr(Stdio::null()),
        signal,
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !holds_bpf_program(proc.pid()) {
        proc.alive()?;
        if Instant::now() > deadline {
            bail!("{name} loaded no program within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Loaded; attaching follows within moments.
    std::thread::sleep(Duration::from_secs(1));
    proc.alive()?;
    Ok(Attached::Other(proc))
}

fn tcpstates() -> Option<PathBuf> {
    cmd::which("tcpstates").or_else(|| {
        ["/usr/sbin/tcpstates", "/usr/bin/tcpstates"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
    })
}

/// The private nginx: one process, `access_log off`, a fixed small answer.
fn start_nginx(dir: &Path, port: u16) -> anyhow::Result<Proc> {
    let nginx = cmd::which("nginx")
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()))
        .context("nginx is not installed (cargo xtask setup --test-deps)")?;
    let d = dir.display();
    let config = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nworker_rlimit_nofile 65536;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n access_log off;\n client_body_temp_path {d};\n proxy_temp_path {d};\n\
         fastcgi_temp_path {d};\n uwsgi_temp_path {d};\n scgi_temp_path {d};\n\
         keepalive_requests 1000000;\n\
         server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), config)?;
    let mut proc = Proc::spawn(
        "nginx",
        Command::new(nginx)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        libc::SIGTERM,
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        proc.alive()?;
        if Instant::now() > deadline {
            bail!("nginx did not accept connections within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(proc)
}

/// Requests (= connections for churn) per second of one bounded wrk run.
fn wrk(port: u16, workload: Workload, seconds: u32, dir: &Path) -> anyhow::Result<f64> {
    let mut command = Command::new("wrk");
    command.args(["-t1", "-c20", &format!("-d{seconds}s"), "--timeout", "2s"]);
    if workload == Workload::Churn {
        command.args(["-H", "Connection: close"]);
    }
    command.arg(format!("http://127.0.0.1:{port}/"));
    let output = run_bounded(
        &mut command,
        Duration::from_secs(u64::from(seconds) + 15),
        &dir.join("wrk.out"),
    )?;
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .filter(|rate: &f64| *rate > 0.0)
        .with_context(|| format!("wrk reported no requests:\n{output}"))
}

/// What one agent run saw of its own programs during the churn run.
#[derive(Default)]
struct AgentRound {
    /// hook → (runs per second, mean ns per run).
    hooks: BTreeMap<String, (f64, f64)>,
    /// event type → events per second received during churn.
    events_per_sec: BTreeMap<String, f64>,
    lost: f64,
    /// Submitted and never read (gaps in the events' numbers).
    unreceived: f64,
    rss_kib: u64,
    metrics_ms: f64,
    metrics_series: usize,
    /// The agent process's CPU during the churn run, in percent of one CPU.
    churn_cpu_percent: Option<f64>,
    /// The same during the keep-alive run.
    keepalive_cpu_percent: Option<f64>,
}

fn series_count(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

/// The main comparison; returns the throughput samples and the agent's
/// own figures per round.
type Rates = BTreeMap<(Workload, Config), Vec<f64>>;
/// What the timed churn runs measured.
#[derive(Default)]
struct Timed {
    /// The agent's hooks: hook → (runs per second, mean ns per run).
    agent_hooks: BTreeMap<String, (f64, f64)>,
    /// A reference tool's mean run time per program invocation.
    reference_ns: BTreeMap<Config, f64>,
}

fn comparison(
    args: &BenchArgs,
    binary: &Path,
    dir: &Path,
    configs: &[Config],
) -> anyhow::Result<(Rates, Vec<AgentRound>, Timed)> {
    let port = free_port()?;
    let _nginx = start_nginx(dir, port)?;
    let mut rates: Rates = BTreeMap::new();
    let mut agent_rounds = Vec::new();
    let stats_off = BpfStats::set(false);
    for round in 0..args.rounds {
        // Rotate the order each round so no configuration always runs first.
        let shift = usize::try_from(round).unwrap_or(0) % configs.len();
        for &config in configs.iter().cycle().skip(shift).take(configs.len()) {
            let mut attached = attach(config, binary, dir)?;
            let agent = match &attached {
                Attached::Agent(agent) => Some(agent),
                _ => None,
            };
            let before = agent.map(|a| metrics(a.addr)).transpose()?;
            let cpu = agent.and_then(CpuWindow::start);
            let churn = wrk(port, Workload::Churn, args.seconds, dir)?;
            let churn_cpu_percent = cpu.and_then(|window| window.percent());
            let mut agent_round = None;
            if let (Some(agent), Some(before)) = (agent, &before) {
                // The agent reads the kernel's program stats once a second.
                std::thread::sleep(Duration::from_millis(1300));
                let after = metrics(agent.addr)?;
                agent_round = Some(AgentRound {
                    churn_cpu_percent,
                    ..agent_figures(before, &after, args.seconds)
                });
            }
            let cpu = agent.and_then(CpuWindow::start);
            let keepalive = wrk(port, Workload::KeepAlive, args.seconds, dir)?;
            let keepalive_cpu_percent = cpu.and_then(|window| window.percent());
            if let (Some(agent), Some(mut figures)) = (agent, agent_round) {
                figures.keepalive_cpu_percent = keepalive_cpu_percent;
                std::thread::sleep(Duration::from_millis(1300));
                let times: Vec<f64> = (0..5)
                    .filter_map(|_| get(agent.addr, "/metrics"))
                    .map(|(_, took)| took.whole.as_secs_f64() * 1000.0)
                    .collect();
                let text = metrics(agent.addr)?;
                figures.lost = sum(&text, "ka_events_lost_total", &[]);
                figures.unreceived = sum(&text, "ka_events_unreceived_total", &[]);
                figures.rss_kib = vm_rss_kib(agent.proc.pid()).unwrap_or(0);
                figures.metrics_ms = median(&times).unwrap_or(f64::NAN);
                figures.metrics_series = series_count(&text);
                agent_rounds.push(figures);
            }
            // A tool that died during the runs would make its figures those of `none`.
            match &mut attached {
                Attached::Agent(agent) => agent.proc.alive()?,
                Attached::Other(proc) => proc.alive()?,
                Attached::Nothing => {}
            }
            eprintln!(
                "bench: round {}/{} {:<15} churn {churn:>9.0} conn/s  keep-alive {keepalive:>9.0} req/s",
                round + 1,
                args.rounds,
                config.name()
            );
            rates
                .entry((Workload::Churn, config))
                .or_default()
                .push(churn);
            rates
                .entry((Workload::KeepAlive, config))
                .or_default()
                .push(keepalive);
            // Let TIME_WAIT and the detached programs settle.
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    drop(stats_off);
    let timed = timed_runs(args, binary, dir, configs, port)?;
    Ok((rates, agent_rounds, timed))
}

/// Program run times: one more churn run per tool with the kernel's timing
/// on, not counted in the throughput.
fn timed_runs(
    args: &BenchArgs,
    binary: &Path,
    dir: &Path,
    configs: &[Config],
    port: u16,
) -> anyhow::Result<Timed> {
    let _stats = BpfStats::set(true);
    let mut timed = Timed::default();
    let empty = configs
        .contains(&Config::Bpftrace)
        .then_some(Config::BpftraceEmpty);
    for &config in configs.iter().chain(&empty) {
        match attach(config, binary, dir)? {
            Attached::Nothing => {}
            Attached::Agent(mut agent) => {
                let before = metrics(agent.addr)?;
                wrk(port, Workload::Churn, args.seconds, dir)?;
                // The agent reads the kernel's program stats once a second.
                std::thread::sleep(Duration::from_millis(1300));
                let after = metrics(agent.addr)?;
                timed.agent_hooks = agent_figures(&before, &after, args.seconds).hooks;
                agent.proc.alive()?;
            }
            Attached::Other(mut proc) => {
                let (time, runs) = program_stats(proc.pid());
                wrk(port, Workload::Churn, args.seconds, dir)?;
                let (time_after, runs_after) = program_stats(proc.pid());
                if runs_after > runs {
                    let mean = float(time_after - time) / float(runs_after - runs);
                    timed.reference_ns.insert(config, mean);
                }
                proc.alive()?;
            }
        }
        eprintln!("bench: timed run {:<15} done", config.name());
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(timed)
}

fn agent_figures(before: &str, after: &str, seconds: u32) -> AgentRound {
    let secs = f64::from(seconds);
    let runs = (
        by_label(before, "ka_program_runs_total", "hook"),
        by_label(after, "ka_program_runs_total", "hook"),
    );
    let time = (
        by_label(before, "ka_program_run_seconds_total", "hook"),
        by_label(after, "ka_program_run_seconds_total", "hook"),
    );
    let mut hooks = BTreeMap::new();
    for (hook, after_runs) in &runs.1 {
        let delta_runs = after_runs - runs.0.get(hook).copied().unwrap_or(0.0);
        let delta_time =
            time.1.get(hook).copied().unwrap_or(0.0) - time.0.get(hook).copied().unwrap_or(0.0);
        let mean_ns = if delta_runs > 0.0 {
            delta_time * 1e9 / delta_runs
        } else {
            f64::NAN
        };
        hooks.insert(hook.clone(), (delta_runs / secs, mean_ns));
    }
    let mut events_per_sec = BTreeMap::new();
    let types = |text: &str| by_label(text, "ka_events_total", "type");
    let (b, a) = (types(before), types(after));
    for (kind, value) in &a {
        events_per_sec.insert(
            kind.clone(),
            (value - b.get(kind).copied().unwrap_or(0.0)) / secs,
        );
    }
    AgentRound {
        hooks,
        events_per_sec,
        lost: 0.0,
        unreceived: 0.0,
        rss_kib: 0,
        metrics_ms: f64::NAN,
        metrics_series: 0,
        churn_cpu_percent: None,
        keepalive_cpu_percent: None,
    }
}

/// Opens `argv[1]` established loopback connection pairs to a listener of
/// its own from source 127.0.`argv[3]`.1, prints `ready`, and holds them
/// until stdin closes (or `argv[2]` seconds pass).
const HOLD_CONNECTIONS_PY: &str = r#"
import resource, signal, socket, sys
signal.alarm(int(sys.argv[2]))
pairs = int(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
srv.listen(4096)
port = srv.getsockname()[1]
source = "127.0.%d.1" % int(sys.argv[3])
held = []
for i in range(pairs):
    c = socket.socket()
    c.bind((source, 0))
    c.connect(("127.0.0.1", port))
    s, _ = srv.accept()
    held.append((c, s))
print("ready", port, flush=True)
sys.stdin.read()
"#;

/// Connection pairs per helper process: both ends' descriptors stay under
/// a hard `RLIMIT_NOFILE` of 20,000 (raising it needs a capability a
/// container may not have), and one source address has enough ports.
const PAIRS_PER_HELPER: u32 = 9_000;

/// Agent memory with many tracked connections, kernel map memory, and the
/// time of an inventory of them.
struct Tracked {
    pairs: u32,
    count: f64,
    lost: f64,
    rss_idle_kib: u64,
    /// The agent's CPU with (almost) nothing to track, in percent of one
    /// CPU.
    idle_cpu_percent: Option<f64>,
    /// The same while it tracks the connections, over one inventory
    /// interval (nothing moves on them: the per-second gauges and one
    /// inventory of all of them).
    held_cpu_percent: Option<f64>,
    rss_kib: u64,
    map_bytes: f64,
    open_secs: f64,
    snapshot_secs: Option<f64>,
    /// The `sock_diag` dump of every namespace alone, as the snapshot
    /// reports it (`took_ms.dump`).
    dump_ms: Option<f64>,
}

fn tracked_memory(
    binary: &Path,
    dir: &Path,
    connections: u32,
    idle: Duration,
) -> anyhow::Result<Tracked> {
    let agent = Agent::start(binary, dir, &[])?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle_kib = vm_rss_kib(agent.proc.pid()).unwrap_or(0);
    let idle_cpu_percent = cpu_percent(agent.proc.pid(), idle);
    let pairs = connections.div_ceil(2);
    let python = cmd::which("python3").context("python3 is not installed")?;
    let started = Instant::now();
    let mut helpers = Vec::new();
    let mut left = pairs;
    let mut source = 1u32;
    while left > 0 && source < 250 {
        let these = left.min(PAIRS_PER_HELPER);
        let mut helper = Proc::spawn(
            "python3 (connection holder)",
            Command::new(&python)
                .args(["-c", HOLD_CONNECTIONS_PY])
                .args([these, 100, source].map(|n| n.to_string()))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit()),
            libc::SIGKILL,
        )?;
        let stdout = helper
            .child
            .as_mut()
            .and_then(|c| c.stdout.take())
            .context("helper stdout")?;
        // Bounded by the helper's own alarm (100 s).
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if !line.starts_with("ready") {
            helper.alive()?;
            bail!("the connection helper did not get ready: {line:?}");
        }
        helpers.push(helper);
        left -= these;
        source += 1;
    }
    let open_secs = started.elapsed().as_secs_f64();
    // Let the agent drain the burst and publish its gauges.
    let want = f64::from(pairs) * 2.0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut text = metrics(agent.addr)?;
    while sum(&text, "ka_tracked_connections", &[]) < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        text = metrics(agent.addr)?;
    }
    std::thread::sleep(Duration::from_secs(2));
    text = metrics(agent.addr)?;
    let rss_kib = vm_rss_kib(agent.proc.pid()).unwrap_or(0);
    // One inventory interval (30 s by default): the CPU it costs included.
    let held_cpu_percent = cpu_percent(agent.proc.pid(), idle * 3);
    // As the agent reports it (memlock of each of its maps).
    let map_bytes = sum(&text, "ka_kernel_map_bytes", &[]);
    // One inventory of every connection, with owners and JSON output: an
    // upper bound of the agent's periodic sock_diag inventory.
    let snapshot_started = Instant::now();
    let snapshot = Command::new(binary)
        .args(["snapshot", "--json"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success());
    let snapshot_secs = snapshot
        .as_ref()
        .map(|_| snapshot_started.elapsed().as_secs_f64());
    let dump_ms = snapshot
        .as_ref()
        .and_then(|o| snapshot_dump_ms(&String::from_utf8_lossy(&o.stdout)));
    // Their guards end the helpers.
    drop(helpers);
    Ok(Tracked {
        pairs,
        count: sum(&text, "ka_tracked_connections", &[]),
        lost: sum(&text, "ka_events_lost_total", &[]),
        rss_idle_kib,
        idle_cpu_percent,
        held_cpu_percent,
        rss_kib,
        map_bytes,
        open_secs,
        snapshot_secs,
        dump_ms,
    })
}

/// Milliseconds, one decimal, in order.
fn in_order(times_ms: &[f64]) -> String {
    times_ms
        .iter()
        .map(|ms| format!("{ms:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `took_ms.dump` of `ka-agent snapshot --json`.
fn snapshot_dump_ms(json: &str) -> Option<f64> {
    serde_json::from_str::<serde_json::Value>(json).ok()?["took_ms"]["dump"].as_f64()
}

/// `/metrics` with many series: connections refused by `ports` closed
/// ports each make series of their own.
struct Series {
    ports: u32,
    lines: usize,
    bytes: usize,
    overflow: f64,
    median_ms: f64,
    max_ms: f64,
    /// Every scrape's time, in order.
    times_ms: Vec<f64>,
    /// Every scrape's time to its first byte (the agent's rendering), in
    /// order.
    first_byte_ms: Vec<f64>,
    /// Zero-window probes the kernel sent during the scrapes
    /// (`TcpExtTCPWinProbe`): a transfer stalled on a zero receive window
    /// until the sender's probe timer reopened it.
    window_probes: Option<u64>,
}

fn metrics_with_series(binary: &Path, dir: &Path, ports: u32) -> anyhow::Result<Series> {
    let agent = Agent::start(binary, dir, &[])?;
    // Below the ephemeral range: nothing else uses most of these.
    let first: u16 = 10_000;
    let count = u16::try_from(ports.min(22_000)).unwrap_or(22_000);
    let deadline = Instant::now() + Duration::from_mins(1);
    for port in first..first + count {
        if Instant::now() > deadline {
            bail!("connecting to {count} closed ports took over 60 s");
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    }
    // Closes settle within 25 ms and series appear as they are applied.
    std::thread::sleep(Duration::from_secs(3));
    let mut times = Vec::new();
    let mut first_byte = Vec::new();
    let mut text = String::new();
    let probes_before = tcp_ext("TCPWinProbe");
    for _ in 0..10 {
        let (body, took) = get(agent.addr, "/metrics").context("/metrics did not answer")?;
        times.push(took.whole.as_secs_f64() * 1000.0);
        first_byte.push(took.first_byte.as_secs_f64() * 1000.0);
        text = body;
    }
    let window_probes = probes_before
        .zip(tcp_ext("TCPWinProbe"))
        .and_then(|(before, after)| u64::try_from(after - before).ok());
    Ok(Series {
        ports,
        lines: series_count(&text),
        bytes: text.len(),
        overflow: sum(&text, "ka_series_overflow_total", &[]),
        median_ms: median(&times).unwrap_or(f64::NAN),
        max_ms: times.iter().copied().fold(0.0, f64::max),
        times_ms: times,
        first_byte_ms: first_byte,
        window_probes,
    })
}

/// Keepalive after 1 s idle, every 1 s, 2 probes: a dead peer is found in
/// about 3 s.
fn fast_keepalive() -> ConnectOpts {
    ConnectOpts::new().keepalive(Duration::from_secs(1), Duration::from_secs(1), 2)
}

/// Milliseconds from a keepalive death (the application's read failing
/// with ETIMEDOUT) to `ka_connections_closed_total{cause="keepalive_timeout"}`
/// counting it, per trial. `None` without `ip`/`nft`.
fn keepalive_latency(binary: &Path, dir: &Path, trials: u32) -> anyhow::Result<Option<Vec<f64>>> {
    if cmd::which("ip").is_none() || cmd::which("nft").is_none() {
        eprintln!("bench: no ip/nft: the keepalive death latency is skipped");
        return Ok(None);
    }
    let lab = Lab::new("kabench")?;
    let netns = lab.netns("keepalive")?;
    netns.nft(
        "table inet kabench {\n set dead { type inet_service; }\n\
          chain out { type filter hook output priority 0; tcp dport @dead drop; tcp sport @dead drop; }\n}\n",
    )?;
    let agent = Agent::start(binary, dir, &[])?;
    let filter = &[("cause", "keepalive_timeout")];
    let mut latencies = Vec::new();
    for trial in 0..trials {
        let port = 7500 + u16::try_from(trial).unwrap_or(0);
        let before = sum(&metrics(agent.addr)?, "ka_connections_closed_total", filter);
        let (died, seen) = std::thread::scope(|scope| -> anyhow::Result<_> {
            let worker = scope.spawn(|| {
                netns.run_in(|| -> anyhow::Result<Instant> {
                    let listener = TcpListener::bind(("127.0.0.1", port))?;
                    let mut client = TcpStream::connect(("127.0.0.1", port))?;
                    let _accepted = listener.accept()?;
                    fast_keepalive().apply(&client)?;
                    client.set_read_timeout(Some(Duration::from_secs(15)))?;
                    netns.output(netns.command("nft").args([
                        "add",
                        "element",
                        "inet",
                        "kabench",
                        "dead",
                        &format!("{{ {port} }}"),
                    ]))?;
                    let mut buf = [0u8; 1];
                    let error = client.read(&mut buf);
                    let at = Instant::now();
                    match error {
                        Err(e) if e.raw_os_error() == Some(libc::ETIMEDOUT) => Ok(at),
                        other => bail!("expected a keepalive timeout, got {other:?}"),
                    }
                })
            });
            let deadline = Instant::now() + Duration::from_secs(25);
            let mut seen = None;
            while Instant::now() < deadline {
                let now = metrics(agent.addr)?;
                if sum(&now, "ka_connections_closed_total", filter) > before {
                    seen = Some(Instant::now());
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let died = worker
                .join()
                .map_err(|_| anyhow::anyhow!("keepalive worker panicked"))???;
            Ok((
                died,
                seen.context("the keepalive death never reached /metrics")?,
            ))
        })?;
        let latency = seen.saturating_duration_since(died).as_secs_f64() * 1000.0;
        eprintln!("bench: keepalive death visible on /metrics after {latency:.1} ms");
        latencies.push(latency);
    }
    Ok(Some(latencies))
}

#[expect(
    clippy::too_many_lines,
    reason = "the benchmark's steps and report, start to finish"
)]
pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("the benchmark needs root (kernel programs, BPF stats, network namespaces)");
    }
    let started = Instant::now();
    let mut args = args.clone();
    if args.quick {
        args.rounds = 1;
        args.seconds = 1;
        args.connections = args.connections.min(2_000);
        args.ports = args.ports.min(300);
    }
    if args.rounds == 0 || args.seconds == 0 {
        bail!("--rounds and --seconds must be at least 1");
    }
    for tool in ["wrk", "nginx"] {
        if cmd::which(tool).is_none() && !Path::new("/usr/sbin").join(tool).is_file() {
            bail!("{tool} is not installed (cargo xtask setup --test-deps)");
        }
    }
    let binary = cmd::build_agent(true)?;
    let dir = TempDir::new("run")?;
    let configs: Vec<Config> = CONFIGS
        .into_iter()
        .filter(|c| match c {
            Config::Tcpstates => {
                let found = tcpstates().is_some();
                if !found {
                    eprintln!("bench: tcpstates (libbpf-tools) not installed: skipped");
                }
                found
            }
            Config::Bpftrace => {
                let found = cmd::which("bpftrace").is_some();
                if !found {
                    eprintln!("bench: bpftrace not installed: its reference is skipped");
                }
                found
            }
            _ => true,
        })
        .collect();
    eprintln!(
        "bench: {} round(s) of {} s runs (churn, then keep-alive) under {}",
        args.rounds,
        args.seconds,
        configs
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (rates, agent_rounds, timed) = comparison(&args, &binary, &dir.0, &configs)?;
    eprintln!("bench: keepalive death latency");
    let latencies = keepalive_latency(&binary, &dir.0, if args.quick { 1 } else { 3 })?;
    eprintln!(
        "bench: memory with {} tracked connections",
        args.connections
    );
    let idle = Duration::from_secs(if args.quick { 1 } else { 10 });
    let tracked = tracked_memory(&binary, &dir.0, args.connections, idle)?;
    eprintln!("bench: /metrics after {} refused connections", args.ports);
    let series = metrics_with_series(&binary, &dir.0, args.ports)?;

    // Report.
    let mut json_rates = Vec::new();
    println!();
    println!(
        "throughput (medians of {} interleaved rounds, {} s each)",
        args.rounds, args.seconds
    );
    println!(
        "  {:<10} {:<15} {:>12} {:>8}  {:<24}  rounds",
        "workload", "config", "median/s", "vs none", "per round: med lo-hi conf"
    );
    let mut spreads = BTreeMap::new();
    for workload in [Workload::Churn, Workload::KeepAlive] {
        let baseline_rounds = rates
            .get(&(workload, Config::None))
            .cloned()
            .unwrap_or_default();
        let baseline = median(&baseline_rounds);
        for &config in &configs {
            let values = rates.get(&(workload, config)).cloned().unwrap_or_default();
            let med = median(&values);
            let ratio = med.zip(baseline).map(|(m, b)| m / b);
            let spread = Spread::paired(&values, &baseline_rounds);
            spreads.insert((workload, config), spread);
            println!(
                "  {:<10} {:<15} {:>12.0} {:>8.3}  {:<24}  {}",
                workload.name(),
                config.name(),
                med.unwrap_or(f64::NAN),
                ratio.unwrap_or(f64::NAN),
                spread.map_or_else(String::new, |s| format!(
                    "{:.3} {:.3}-{:.3} {:>3.0}%",
                    s.median,
                    s.low,
                    s.high,
                    s.confidence * 100.0
                )),
                values
                    .iter()
                    .map(|v| format!("{v:.0}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            json_rates.push(Json::obj([
                ("workload", Json::Str(workload.name().into())),
                ("config", Json::Str(config.name().into())),
                ("median_per_sec", Json::opt(med)),
                ("ratio_vs_none", Json::opt(ratio)),
                (
                    "ratio_per_round",
                    spread.map_or(Json::Null, |s| {
                        Json::obj([
                            ("median", Json::Num(s.median)),
                            ("low", Json::Num(s.low)),
                            ("high", Json::Num(s.high)),
                            ("confidence", Json::Num(s.confidence)),
                        ])
                    }),
                ),
                (
                    "rounds",
                    Json::Arr(values.into_iter().map(Json::Num).collect()),
                ),
            ]));
        }
    }

    let mut events: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for round in &agent_rounds {
        for (kind, rate) in &round.events_per_sec {
            events.entry(kind.clone()).or_default().push(*rate);
        }
    }
    println!(
        "\nka-agent kernel programs during churn (BPF stats, one timed run after the rounds; \
         the timing is off during the rounds)"
    );
    println!("  {:<24} {:>12} {:>10}", "hook", "runs/s", "mean ns");
    let mut json_hooks = Vec::new();
    for (hook, &(rate, ns)) in &timed.agent_hooks {
        println!("  {hook:<24} {rate:>12.0} {ns:>10.1}");
        json_hooks.push(Json::obj([
            ("hook", Json::Str(hook.clone())),
            ("runs_per_sec", Json::Num(rate)),
            ("mean_ns", Json::Num(ns)),
        ]));
    }
    // The floor any program on these hooks pays here: the reference tools'
    // own programs, timed the same way.
    let mut json_references = Vec::new();
    for (config, &ns) in &timed.reference_ns {
        println!(
            "  reference: {:<15} {ns:>23.1}   ({})",
            config.name(),
            if *config == Config::BpftraceEmpty {
                "an empty program on timer_start: the timing's floor here"
            } else {
                "mean per run of its programs, all hooks"
            }
        );
        json_references.push(Json::obj([
            ("config", Json::Str(config.name().into())),
            ("mean_ns", Json::Num(ns)),
        ]));
    }
    println!("  events received by the agent per second during churn:");
    let mut json_events = Vec::new();
    for (kind, rates) in &events {
        let rate = median(rates);
        println!("    {kind:<22} {:>12.0}", rate.unwrap_or(f64::NAN));
        json_events.push(Json::obj([
            ("type", Json::Str(kind.clone())),
            ("per_sec", Json::opt(rate)),
        ]));
    }
    let lost: f64 = agent_rounds.iter().map(|r| r.lost).sum();
    let unreceived: f64 = agent_rounds.iter().map(|r| r.unreceived).sum();
    let rss: Vec<f64> = agent_rounds.iter().map(|r| float(r.rss_kib)).collect();
    let scrape: Vec<f64> = agent_rounds.iter().map(|r| r.metrics_ms).collect();
    let scrape_series = agent_rounds.iter().map(|r| r.metrics_series).max();
    println!(
        "  lost events over all rounds: {lost} (ring full), {unreceived} submitted and never read"
    );
    let churn_cpu: Vec<f64> = agent_rounds
        .iter()
        .filter_map(|r| r.churn_cpu_percent)
        .collect();
    let keepalive_cpu: Vec<f64> = agent_rounds
        .iter()
        .filter_map(|r| r.keepalive_cpu_percent)
        .collect();
    // Per round: the CPU it took the agent to interpret one event.
    let us_per_event: Vec<f64> = agent_rounds
        .iter()
        .filter_map(|r| {
            let events: f64 = r.events_per_sec.values().sum();
            r.churn_cpu_percent
                .filter(|_| events > 0.0)
                .map(|percent| percent * 1e4 / events)
        })
        .collect();
    println!(
        "  agent CPU (its threads; its kernel programs run in the traffic's context, timed \
         above): churn median {:.1} % of a CPU ({:.2} µs per event received), keep-alive {:.1} %",
        median(&churn_cpu).unwrap_or(f64::NAN),
        median(&us_per_event).unwrap_or(f64::NAN),
        median(&keepalive_cpu).unwrap_or(f64::NAN),
    );
    println!(
        "  agent RSS after each round's runs: median {:.1} MiB",
        median(&rss).unwrap_or(f64::NAN) / 1024.0
    );
    println!(
        "  /metrics after the runs: median {:.2} ms ({} series)",
        median(&scrape).unwrap_or(f64::NAN),
        scrape_series.unwrap_or(0)
    );

    println!("\nextra steps");
    let latency = latencies.as_deref().and_then(median);
    match &latencies {
        Some(values) => println!(
            "  keepalive death visible on /metrics: median {:.1} ms ({})",
            latency.unwrap_or(f64::NAN),
            values
                .iter()
                .map(|v| format!("{v:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => println!("  keepalive death latency: skipped"),
    }
    println!(
        "  {} connection pairs opened in {:.1} s: {} tracked, {} lost events; agent RSS {:.1} MiB \
         ({:.1} MiB before); kernel maps {:.1} MiB (ka_kernel_map_bytes)",
        tracked.pairs,
        tracked.open_secs,
        tracked.count,
        tracked.lost,
        float(tracked.rss_kib) / 1024.0,
        float(tracked.rss_idle_kib) / 1024.0,
        tracked.map_bytes / 1_048_576.0,
    );
    let percent = |p: Option<f64>| p.map_or_else(|| "unknown".to_owned(), |p| format!("{p:.2} %"));
    println!(
        "  agent CPU: idle {} of a CPU; holding the {} connections {}",
        percent(tracked.idle_cpu_percent),
        tracked.count,
        percent(tracked.held_cpu_percent)
    );
    println!(
        "  ka-agent snapshot --json of them (inventory + owners + JSON): {}; the sock_diag dump alone: {}",
        tracked
            .snapshot_secs
            .map_or_else(|| "failed".to_owned(), |s| format!("{s:.2} s")),
        tracked.dump_ms.map_or_else(
            || "unknown".to_owned(),
            |ms| format!("{:.2} s", ms / 1000.0)
        )
    );
    println!(
        "  /metrics after {} refused connections: {} series, {} KiB, median {:.1} ms, max {:.1} ms \
         ({} folded into `other`); scrapes in order: {}; their first bytes (the agent's \
         rendering): {}; zero-window probes during them: {}",
        series.ports,
        series.lines,
        series.bytes / 1024,
        series.median_ms,
        series.max_ms,
        series.overflow,
        in_order(&series.times_ms),
        in_order(&series.first_byte_ms),
        series
            .window_probes
            .map_or_else(|| "unknown".to_owned(), |n| n.to_string()),
    );

    let throughput = |workload: Workload, target: f64| {
        spreads
            .get(&(workload, Config::Agent))
            .copied()
            .flatten()
            .map_or(Verdict::NotMeasured, |s| s.against(target))
    };
    let tcp_hooks_ns = timed
        .agent_hooks
        .iter()
        .filter(|(hook, _)| !hook.starts_with("timer_"))
        .map(|(_, &(_, ns))| ns)
        .filter(|ns| ns.is_finite())
        .fold(None, |max: Option<f64>, v| {
            Some(max.map_or(v, |m| m.max(v)))
        });
    let timer_ns = timed
        .agent_hooks
        .get("timer_start")
        .map(|&(_, ns)| ns)
        .filter(|ns| ns.is_finite());
    let floor = timed
        .reference_ns
        .get(&Config::BpftraceEmpty)
        .map_or_else(String::new, |ns| format!(" (an empty program: {ns:.0} ns)"));
    println!(
        "\ntargets{}",
        if args.quick {
            " (quick mode: figures mean nothing)"
        } else {
            ""
        }
    );
    let targets = [
        (
            "churn throughput ratio >= 0.97 (interval)",
            throughput(Workload::Churn, 0.97),
        ),
        (
            "keep-alive throughput ratio >= 0.99 (interval)",
            throughput(Workload::KeepAlive, 0.99),
        ),
        (
            "no lost events during churn",
            Verdict::of(Some(lost == 0.0 && unreceived == 0.0)),
        ),
        (
            &format!("TCP hooks <= 150 ns{floor}"),
            Verdict::of(tcp_hooks_ns.map(|n| n <= 150.0)),
        ),
        (
            &format!("timer_start (mostly non-keepalive) <= 40 ns{floor}"),
            Verdict::of(timer_ns.map(|n| n <= 40.0)),
        ),
        (
            "RSS with 100,000 tracked <= 64 MiB",
            Verdict::of((args.connections >= 100_000).then_some(tracked.rss_kib <= 64 * 1024)),
        ),
        (
            "/metrics with 10,000 series <= 50 ms",
            Verdict::of((series.lines >= 10_000).then_some(series.median_ms <= 50.0)),
        ),
        (
            "inventory (sock_diag dump) of 100,000 <= 1 s",
            Verdict::of(
                (args.connections >= 100_000)
                    .then_some(tracked.dump_ms.is_some_and(|ms| ms <= 1000.0)),
            ),
        ),
        (
            "keepalive death on /metrics <= 1 s",
            Verdict::of(latency.map(|l| l <= 1000.0)),
        ),
    ];
    for (what, ok) in &targets {
        println!("  {:<52} {}", what, ok.name());
    }

    let machine = Json::obj([
        (
            "nproc",
            num(std::thread::available_parallelism().map_or(0, |n| n.get() as u64)),
        ),
        (
            "kernel",
            Json::Str(
                std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            ),
        ),
        (
            "cpu",
            Json::Str(
                std::fs::read_to_string("/proc/cpuinfo")
                    .unwrap_or_default()
                    .lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
                    .unwrap_or_default(),
            ),
        ),
    ]);
    let json = Json::obj([
        ("quick", Json::Str(args.quick.to_string())),
        ("rounds", num(args.rounds)),
        ("seconds", num(args.seconds)),
        ("machine", machine),
        ("throughput", Json::Arr(json_rates)),
        ("programs_during_churn", Json::Arr(json_hooks)),
        (
            "reference_programs_during_churn",
            Json::Arr(json_references),
        ),
        ("events_per_sec_during_churn", Json::Arr(json_events)),
        ("lost_events", Json::Num(lost)),
        ("unreceived_events", Json::Num(unreceived)),
        ("agent_cpu_percent_churn", Json::opt(median(&churn_cpu))),
        (
            "agent_cpu_us_per_event_churn",
            Json::opt(median(&us_per_event)),
        ),
        (
            "agent_cpu_percent_keepalive",
            Json::opt(median(&keepalive_cpu)),
        ),
        ("agent_rss_kib_median", Json::opt(median(&rss))),
        ("metrics_ms_after_runs", Json::opt(median(&scrape))),
        (
            "keepalive_death_to_metrics_ms",
            latencies.map_or(Json::Null, |v| {
                Json::Arr(v.into_iter().map(Json::Num).collect())
            }),
        ),
        (
            "tracked",
            Json::obj([
                ("pairs", num(tracked.pairs)),
                ("tracked_connections", Json::Num(tracked.count)),
                ("lost_events", Json::Num(tracked.lost)),
                ("open_secs", Json::Num(tracked.open_secs)),
                ("agent_rss_kib_idle", num(tracked.rss_idle_kib)),
                (
                    "agent_cpu_percent_idle",
                    Json::opt(tracked.idle_cpu_percent),
                ),
                (
                    "agent_cpu_percent_holding",
                    Json::opt(tracked.held_cpu_percent),
                ),
                ("agent_rss_kib", num(tracked.rss_kib)),
                ("kernel_map_bytes", Json::Num(tracked.map_bytes)),
                ("snapshot_secs", Json::opt(tracked.snapshot_secs)),
                ("inventory_dump_ms", Json::opt(tracked.dump_ms)),
            ]),
        ),
        (
            "metrics_series",
            Json::obj([
                ("refused_ports", num(series.ports)),
                ("series", num(series.lines as u64)),
                ("bytes", num(series.bytes as u64)),
                ("folded_other", Json::Num(series.overflow)),
                ("median_ms", Json::Num(series.median_ms)),
                ("max_ms", Json::Num(series.max_ms)),
                (
                    "first_byte_median_ms",
                    Json::opt(median(&series.first_byte_ms)),
                ),
                (
                    "window_probes",
                    series.window_probes.map_or(Json::Null, num),
                ),
            ]),
        ),
        (
            "targets",
            Json::Obj(
                targets
                    .iter()
                    .map(|(what, ok)| ((*what).to_owned(), Json::Str(ok.name().to_owned())))
                    .collect(),
            ),
        ),
        ("took_secs", Json::Num(started.elapsed().as_secs_f64())),
    ]);
    let mut text = String::new();
    json.write(&mut text);
    text.push('\n');
    let out = cmd::root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let file = out.join(if args.quick {
        "results-quick.json"
    } else {
        "results.json"
    });
    std::fs::write(&file, text)?;
    println!(
        "\nbench: results in {} ({:.0} s)",
        file.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_dump_time_is_read_from_the_snapshot() {
        let json =
            r#"{"idle_timeouts":[],"connections":[],"took_ms":{"dump":261.5,"inventory":2400.0}}"#;
        assert_eq!(super::snapshot_dump_ms(json), Some(261.5));
        assert_eq!(super::snapshot_dump_ms("not json"), None);
    }

    #[test]
    fn a_ratio_target_is_met_only_if_its_confidence_interval_meets_it() {
        use super::{Spread, Verdict};
        let none = [100.0, 200.0, 100.0];
        let spread = Spread::paired(&[98.0, 190.0, 99.0], &none).expect("three rounds");
        assert_eq!(
            spread,
            Spread {
                median: 0.98,
                low: 0.95,
                high: 0.99,
                confidence: 0.75,
            }
        );
        assert_eq!(spread.against(0.95), Verdict::Met);
        assert_eq!(spread.against(0.97), Verdict::WithinNoise);
        assert_eq!(spread.against(0.995), Verdict::Missed);
        assert_eq!(Spread::paired(&[1.0], &[0.0]), None);
        assert_eq!(Spread::paired(&[], &none), None);

        // Fifteen rounds: the 4th to the 12th smallest ratio.
        let none = [100.0; 15];
        let values: Vec<f64> = (1..=15).map(f64::from).map(|v| 90.0 + v).collect();
        let spread = Spread::paired(&values, &none).expect("fifteen rounds");
        assert_eq!((spread.low, spread.median, spread.high), (0.94, 0.98, 1.02));
        assert_eq!(spread.against(0.93), Verdict::Met);
        assert_eq!(spread.against(0.99), Verdict::WithinNoise);
    }

    #[test]
    fn the_median_interval_is_the_binomial_one() {
        use super::median_interval;
        let check = |n, k, coverage: f64| {
            let (got_k, got) = median_interval(n);
            assert_eq!(got_k, k, "n = {n}");
            assert!((got - coverage).abs() < 5e-4, "n = {n}: {got}");
        };
        check(1, 1, 0.0);
        check(3, 1, 0.75);
        check(5, 1, 0.9375);
        check(6, 1, 0.9688);
        check(7, 1, 0.9844);
        check(9, 2, 0.9609);
        check(15, 4, 0.9648);
        check(21, 6, 0.9734);
    }
}
