//! The command line (docs/cli.md). Every option also reads `KA_<OPTION>`.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum, builder::BoolishValueParser};

use crate::{idle_timeout::IdleTimeout, track::PeerLabel};

#[derive(Debug, Parser)]
#[command(
    name = "ka-agent",
    version,
    about = "Finds zombie TCP connections from the kernel and exports them to Prometheus",
    after_help = "Examples:\n  ka-agent run                                 # defaults: 127.0.0.1:9977, idle timeout aws-nlb\n  ka-agent run --idle-timeout seed-dsr --idle-timeout 5m\n  ka-agent check                               # what this kernel allows\n  ka-agent top                                 # live view, worst connections first\n  ka-agent audit                               # who will lose connections, and the fix\n  ka-agent snapshot --json\n  ka-agent completions bash > /etc/bash_completion.d/ka-agent"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "KA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing's `EnvFilter` syntax, e.g. `info`, `ka_agent=debug`).
    #[arg(long, global = true, env = "KA_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load the kernel programs, serve /metrics and the API
    /// until SIGINT/SIGTERM, then detach everything.
    #[command(
        after_help = "Examples:\n  ka-agent run --listen 0.0.0.0:9977\n  ka-agent run --idle-timeout aws-nlb --idle-timeout 90s\n  KA_IDLE_TIMEOUT=seed-dsr ka-agent run"
    )]
    Run(RunArgs),
    /// Report, hook by hook, what this kernel and these privileges allow.
    /// Exit 0 when the agent can run.
    #[command(
        after_help = "Examples:\n  ka-agent check\n  ka-agent check --btf /path/to/vmlinux.btf"
    )]
    Check(KernelArgs),
    /// The keepalive audit: which processes and ports will lose connections
    /// to which idle timeout, and the fix. Needs no running agent.
    #[command(
        after_help = "Examples:\n  ka-agent audit\n  ka-agent audit --idle-timeout aws-nlb --idle-timeout 5m --json"
    )]
    Audit(AuditArgs),
    /// One inventory of the current connections (every network namespace)
    /// with keepalive status, idle time, owner and classification, as
    /// JSON, then exit. Needs no running agent.
    #[command(
        after_help = "Examples:\n  ka-agent snapshot --json\n  ka-agent snapshot --json --idle-timeout 90s"
    )]
    Snapshot(SnapshotArgs),
    /// Live terminal view of connections, worst first (zombies, probing,
    /// at risk, the rest), from a running agent's API. When no agent
    /// answers at --agent, top starts one as its own child process
    /// (`ka-agent run --listen 127.0.0.1:<free port>`, needs root) and stops
    /// it on exit. Keys: q quit, / filter, s sort column, r reverse,
    /// z/p/a/o class, 0 all classes, arrows scroll.
    #[command(
        after_help = "Examples:\n  ka-agent top                                 # the agent on 127.0.0.1:9977, or an own one\n  ka-agent top --agent http://10.0.0.7:9977 --class zombie\n  ka-agent top --filter :443 --refresh 2s\n  KA_AGENT=http://127.0.0.1:9977 ka-agent top --no-spawn"
    )]
    Top(TopArgs),
    /// Print a shell completion script for ka-agent.
    #[command(
        after_help = "Examples:\n  ka-agent completions bash > /etc/bash_completion.d/ka-agent\n  ka-agent completions zsh > \"${fpath[1]}/_ka-agent\"\n  ka-agent completions fish > ~/.config/fish/completions/ka-agent.fish"
    )]
    Completions(CompletionsArgs),
}

/// `ka-agent completions`.
#[derive(Clone, Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete in.
    #[arg(env = "KA_SHELL", value_enum)]
    pub shell: clap_complete::Shell,
}

/// `ka-agent top`.
#[derive(Clone, Debug, Args)]
pub struct TopArgs {
    /// The agent to read: `http://HOST:PORT` (its --listen address).
    #[arg(long, env = "KA_AGENT", default_value = "http://127.0.0.1:9977")]
    pub agent: AgentUrl,
    /// How often the view is refreshed (whole seconds: 1s, 5s).
    #[arg(long, env = "KA_REFRESH", default_value = "1s", value_parser = parse_refresh)]
    pub refresh: u64,
    /// Never start an own agent: keep retrying --agent instead.
    #[arg(long, env = "KA_NO_SPAWN", value_parser = BoolishValueParser::new())]
    pub no_spawn: bool,
    /// Show only this class at start (the z/p/a/o keys change it).
    #[arg(long, env = "KA_CLASS", value_parser = ["zombie", "probing", "at_risk", "ok", "closing"])]
    pub class: Option<String>,
    /// Show only connections whose process, pod, addresses, state or class
    /// contain this text at start (the / key changes it).
    #[arg(long, env = "KA_FILTER")]
    pub filter: Option<String>,
    /// Idle timeouts of an own agent, when top starts one (as for `run`).
    #[arg(
        long = "idle-timeout",
        env = "KA_IDLE_TIMEOUT",
        value_delimiter = ',',
        default_value = "aws-nlb"
    )]
    pub idle_timeouts: Vec<IdleTimeout>,
}

/// An agent's HTTP address: `http://HOST:PORT`, resolved once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentUrl {
    /// As the user should read it: `http://host:port`.
    pub url: String,
    pub addr: SocketAddr,
}

impl std::str::FromStr for AgentUrl {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        use std::net::ToSocketAddrs as _;
        let rest = match text.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "invalid agent URL {text:?}: scheme {scheme:?} is not supported (the agent speaks http://)"
                ));
            }
            None => text,
        };
        let hostport = rest.strip_suffix('/').unwrap_or(rest);
        if hostport.is_empty() || hostport.contains('/') {
            return Err(format!(
                "invalid agent URL {text:?}: expected http://HOST:PORT"
            ));
        }
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| format!("invalid agent URL {text:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("invalid agent URL {text:?}: {hostport} has no address"))?;
        Ok(Self {
            url: format!("http://{hostport}"),
            addr,
        })
    }
}

fn parse_refresh(text: &str) -> Result<u64, String> {
    match crate::idle_timeout::parse_duration(text) {
        Ok(0) => Err(format!("refresh interval {text:?} is zero")),
        Ok(seconds) if seconds > 3600 => Err(format!("refresh interval {text:?} is over an hour")),
        Ok(seconds) => Ok(seconds),
        Err(_) => Err(format!(
            "invalid refresh interval {text:?}: expected whole seconds like 1s or 5s"
        )),
    }
}

/// `ka-agent audit`.
#[derive(Clone, Debug, Args)]
pub struct AuditArgs {
    /// Middlebox idle timeout to audit against (duration or preset, as for
    /// `run`). Repeatable. A namespace's own
    /// `nf_conntrack_tcp_timeout_established` is added where conntrack is
    /// loaded.
    #[arg(
        long = "idle-timeout",
        env = "KA_IDLE_TIMEOUT",
        value_delimiter = ',',
        default_value = "aws-nlb"
    )]
    pub idle_timeouts: Vec<IdleTimeout>,
    /// Print JSON instead of a table.
    #[arg(long, env = "KA_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,
}

/// `ka-agent snapshot`.
#[derive(Clone, Debug, Args)]
pub struct SnapshotArgs {
    /// Idle timeouts for the at-risk classification (as for `run`).
    #[arg(
        long = "idle-timeout",
        env = "KA_IDLE_TIMEOUT",
        value_delimiter = ',',
        default_value = "aws-nlb"
    )]
    pub idle_timeouts: Vec<IdleTimeout>,
    /// Print JSON (the only format; accepted for the documented spelling).
    #[arg(long, env = "KA_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,
}

/// Where the kernel facts come from.
#[derive(Clone, Debug, Args)]
pub struct KernelArgs {
    /// BTF of the running kernel.
    #[arg(long, env = "KA_BTF", default_value = "/sys/kernel/btf/vmlinux")]
    pub btf: PathBuf,
    /// tracefs mount point (mounted there if missing).
    #[arg(long, env = "KA_TRACEFS", default_value = "/sys/kernel/tracing")]
    pub tracefs: PathBuf,
    /// Symbol table of the running kernel.
    #[arg(long, env = "KA_KALLSYMS", default_value = "/proc/kallsyms")]
    pub kallsyms: PathBuf,
    /// Attach every hook through its tracepoint, never a raw tracepoint
    /// (by default the hot hooks, and the hooks whose events are counts, run
    /// raw where this kernel's BTF declares their arguments, which costs
    /// less and is not skipped while another BPF tool's program runs).
    #[arg(long, env = "KA_NO_RAW_TRACEPOINTS", value_parser = BoolishValueParser::new())]
    pub no_raw_tracepoints: bool,
    /// Read kernel memory with `bpf_probe_read_kernel` only (by default,
    /// where the kernel has the `bpf_rdonly_cast` kfunc, the programs load
    /// socket and timer fields directly, which costs less).
    #[arg(long, env = "KA_NO_DIRECT_LOADS", value_parser = BoolishValueParser::new())]
    pub no_direct_loads: bool,
}

#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    /// Address of the HTTP server (/metrics, /healthz, /readyz, /api/v1).
    #[arg(long, env = "KA_LISTEN", default_value = "127.0.0.1:9977")]
    pub listen: SocketAddr,
    /// Middlebox idle timeout: a duration (90s, 5m) or a preset (aws-nlb,
    /// aws-alb, aws-nat-gateway, azure-lb, gcp-nat, gcp-firewall, ipvs,
    /// conntrack, kube-proxy, seed-dsr). Repeatable; comma-separated in the
    /// environment.
    #[arg(
        long = "idle-timeout",
        env = "KA_IDLE_TIMEOUT",
        value_delimiter = ',',
        default_value = "aws-nlb"
    )]
    pub idle_timeouts: Vec<IdleTimeout>,
    /// A connection in `CLOSE_WAIT` longer than this is a `close_wait_leak`.
    #[arg(long, env = "KA_CLOSE_WAIT_THRESHOLD", default_value = "60s", value_parser = parse_seconds)]
    pub close_wait_threshold: u64,
    /// Most connections tracked at once (oldest evicted, counted).
    #[arg(long, env = "KA_MAX_CONNECTIONS", default_value_t = 262_144, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Size of the kernel→agent ring buffer in bytes (a power of two, at
    /// least 4096).
    #[arg(long, env = "KA_RING_BUFFER_BYTES", default_value_t = ka_common::DEFAULT_RING_BYTES, value_parser = parse_ring_bytes)]
    pub ring_buffer_bytes: u32,
    /// Remote address label on connection metrics: none (default), ip, or
    /// cidr (/24, /64). Raises cardinality; bounded by --max-series.
    #[arg(long, env = "KA_PEER_LABEL", value_enum, default_value_t = PeerLabel::None)]
    pub peer_label: PeerLabel,
    /// Most distinct connection label sets (netns, direction, port, comm,
    /// peer); more fold into `other` and count in `ka_series_overflow_total`.
    #[arg(long, env = "KA_MAX_SERIES", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_series: u32,
    /// Connection series unused this long are removed.
    #[arg(long, env = "KA_SERIES_TTL", default_value = "1h", value_parser = parse_seconds)]
    pub series_ttl: u64,
    /// How often the sockets of every network namespace are inventoried
    /// (`sock_diag`): adopts connections without events, corrects idle
    /// times, removes sockets gone without an event, names owners.
    #[arg(long, env = "KA_INVENTORY_INTERVAL", default_value = "30s", value_parser = parse_seconds)]
    pub inventory_interval: u64,
    /// This node's name, in Kubernetes (the `DaemonSet` sets it from
    /// `spec.nodeName`): connections of pods on this node get `namespace`,
    /// `pod` and `container` labels from the API (pods of this node only).
    #[arg(long, env = "KA_NODE_NAME")]
    pub node_name: Option<String>,
    /// Have the kernel time every BPF program run while the agent runs
    /// (`ka_program_runs_total`, `ka_program_run_seconds_total`). Off by
    /// default: the timing is host-wide (every BPF program on the node pays
    /// two clock reads per run, ka's and others'); the run counts are
    /// exported anyway whenever something else turned the timing on.
    #[arg(long, env = "KA_PROGRAM_RUN_STATS", value_parser = BoolishValueParser::new())]
    pub program_run_stats: bool,
    #[command(flatten)]
    pub kernel: KernelArgs,
}

fn parse_seconds(text: &str) -> Result<u64, String> {
    crate::idle_timeout::parse_duration(text).map_err(|e| e.to_string())
}

fn parse_ring_bytes(text: &str) -> Result<u32, String> {
    let bytes: u32 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of bytes"))?;
    if bytes < 4096 || !bytes.is_power_of_two() {
        return Err(format!("{bytes} is not a power of two of at least 4096"));
    }
    Ok(bytes)
}
