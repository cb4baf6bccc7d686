//! `ka-lab`: real network scenarios for tests, demos and benchmarks.
//!
//! A [`Lab`] owns network namespaces, the veth pairs between them and the
//! processes spawned inside them; all of it is removed when the `Lab` drops,
//! also while a test panics. Addresses come only from 198.18.0.0/15 and
//! `2001:db8::/32` (one /24 and one /64 per link).
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use std::time::Duration;
//! use ka_lab::{ConnectOpts, Lab, tcp_connect, tcp_listen};
//!
//! # fn main() -> Result<(), ka_lab::LabError> {
//! if !ka_lab::require_root("example") {
//!     return Ok(());
//! }
//! let lab = Lab::new("demo")?;
//! let client = lab.netns("client")?;
//! let server = lab.netns("server")?;
//! let link = lab.link(&client, &server)?;
//! let listener = tcp_listen(&server, link.b.sock_v4(8080))?;
//! let opts = ConnectOpts::new()
//!     .keepalive(Duration::from_secs(1), Duration::from_secs(1), 3)
//!     .connect_timeout(Duration::from_secs(2));
//! let mut conn = tcp_connect(&client, link.b.sock_v4(8080), &opts)?;
//! let (mut accepted, _) = listener.accept()?;
//! conn.write_all(b"ping")?;
//! let mut buf = [0; 4];
//! accepted.read_exact(&mut buf)?;
//! let before = server.netstat()?;
//! server.drop_all_tcp()?; // the server now looks dead to the client
//! let after = server.netstat()?;
//! let _delta = ka_lab::Counters::delta(&before, &after);
//! # Ok(())
//! # }
//! ```

mod counters;
pub mod exposition;
pub mod http;
mod sock;

use std::fs::File;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub use counters::Counters;
pub use sock::{ConnectOpts, tcp_connect, tcp_listen};

/// Every namespace a lab creates is named `kalab-<pid>-<n>-<tag>-<name>`.
pub const NETNS_PREFIX: &str = "kalab-";
/// Where `ip netns` keeps its namespace mounts.
pub const NETNS_DIR: &str = "/run/netns";
/// The nftables table the helpers of [`Netns`] use (family `inet`).
pub const NFT_TABLE: &str = "kalab";
/// IPv4 prefix length of each link (198.18.0.0/15 split in /24s).
pub const V4_PREFIX_LEN: u8 = 24;
/// IPv6 prefix length of each link (`2001:db8::/32` split in /64s).
pub const V6_PREFIX_LEN: u8 = 64;
/// Links a lab can make before 198.18.0.0/15 runs out of /24s.
pub const MAX_LINKS: usize = 512;

/// Errors of the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A tag or namespace name outside `[A-Za-z0-9_]{1,24}`.
    #[error("invalid lab name {0:?}: use 1-24 characters of [A-Za-z0-9_]")]
    InvalidName(String),
    /// An I/O error, with what was being done.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A command (`ip`, `nft`, ...) exited unsuccessfully.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// How it exited.
        status: ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// `setns(CLONE_NEWNET)` into a lab namespace failed.
    #[error("cannot enter network namespace {netns}: {source}")]
    Setns {
        /// The namespace.
        netns: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Both ends of a link in one namespace, or more than [`MAX_LINKS`].
    #[error("invalid link: {0}")]
    Link(String),
    /// Unexpected text in a kernel file.
    #[error("cannot parse {what}: {detail}")]
    Parse {
        /// Which file.
        what: String,
        /// What is wrong.
        detail: String,
    },
}

impl LabError {
    /// The underlying OS error, if any (e.g. of a failed connect).
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Self::Io { source, .. } | Self::Setns { source, .. } => Some(source),
            _ => None,
        }
    }

    /// The kind of the underlying OS error: a connect to a silent peer is
    /// `TimedOut`, one answered with a reset `ConnectionRefused`.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        self.io_error().map(io::Error::kind)
    }

    /// The raw errno of the underlying OS error.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.io_error().and_then(io::Error::raw_os_error)
    }
}

impl From<io::Error> for LabError {
    fn from(source: io::Error) -> Self {
        Self::Io {
            what: "I/O".into(),
            source,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn valid_name(name: &str) -> Result<(), LabError> {
    if name.is_empty()
        || name.len() > 24
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(LabError::InvalidName(name.to_owned()));
    }
    Ok(())
}

fn cmd_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion (stdin from `input`), returning its stdout.
fn run(cmd: &mut Command, input: Option<&str>) -> Result<String, LabError> {
    let line = cmd_line(cmd);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| LabError::Io {
        what: format!("spawn `{line}`"),
        source,
    })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|source| LabError::Io {
                what: format!("write stdin of `{line}`"),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| LabError::Io {
        what: format!("wait for `{line}`"),
        source,
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: line,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String, LabError> {
    run(Command::new("ip").args(args), None)
}

type ChildSlot = Arc<Mutex<Option<Child>>>;

fn kill_slot(slot: &ChildSlot) {
    if let Some(mut child) = lock(slot).take() {
        // Already exited (and reaped by try_wait) is fine: kill is then a no-op.
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[derive(Default)]
struct State {
    namespaces: Vec<String>,
    nft_used: Vec<String>,
    links: Vec<(String, String)>,
    children: Vec<ChildSlot>,
    next_link: usize,
}

struct Shared {
    prefix: String,
    if_prefix: String,
    state: Mutex<State>,
}

impl Shared {
    fn cleanup(&self) {
        let mut st = lock(&self.state);
        for slot in st.children.drain(..) {
            kill_slot(&slot);
        }
        for ns in st.nft_used.drain(..) {
            if let Err(e) = run(
                Command::new("ip").args(["netns", "exec", &ns, "nft", "flush", "ruleset"]),
                None,
            ) {
                eprintln!("ka-lab: cleanup: {e}");
            }
        }
        for (ns, ifname) in st.links.drain(..) {
            // Deleting one end deletes the pair; the other end's entry then
            // fails harmlessly, and so does a namespace already gone.
            let _ = ip(&["-n", &ns, "link", "del", &ifname]);
        }
        for ns in st.namespaces.drain(..) {
            if let Err(e) = ip(&["netns", "del", &ns])
                && Path::new(NETNS_DIR).join(&ns).exists()
            {
                eprintln!("ka-lab: cleanup: {e}");
            }
        }
    }
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A set of network namespaces, links and processes, all removed on drop.
pub struct Lab {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.shared.prefix)
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// A new, empty lab. `tag` (`[A-Za-z0-9_]{1,24}`) goes into the names of
    /// its namespaces. First removes namespaces left by killed runs
    /// ([`cleanup_stale`]).
    pub fn new(tag: &str) -> Result<Self, LabError> {
        valid_name(tag)?;
        if let Err(e) = cleanup_stale(NETNS_PREFIX) {
            eprintln!("ka-lab: cleanup of stale namespaces: {e}");
        }
        let pid = std::process::id();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            shared: Arc::new(Shared {
                prefix: format!("{NETNS_PREFIX}{pid}-{n}-{tag}"),
                if_prefix: format!("k{pid:x}x{n:x}"),
                state: Mutex::new(State::default()),
            }),
        })
    }

    /// The prefix of this lab's namespace names (`kalab-<pid>-<n>-<tag>`).
    pub fn prefix(&self) -> &str {
        &self.shared.prefix
    }

    /// Names of the namespaces created so far.
    pub fn namespaces(&self) -> Vec<String> {
        lock(&self.shared.state).namespaces.clone()
    }

    /// Creates the namespace `<prefix>-<name>` with `lo` up.
    pub fn netns(&self, name: &str) -> Result<Netns, LabError> {
        valid_name(name)?;
        let full = format!("{}-{name}", self.shared.prefix);
        ip(&["netns", "add", &full])?;
        lock(&self.shared.state).namespaces.push(full.clone());
        ip(&["-n", &full, "link", "set", "lo", "up"])?;
        Ok(Netns {
            name: full,
            short: name.to_owned(),
            shared: Arc::clone(&self.shared),
        })
    }

    /// A veth pair between `a` and `b`, both ends up, addressed from
    /// 198.18.0.0/15 (/24) and `2001:db8::/32` (/64, `nodad`): link number `i`
    /// gets 198.(18 + i/256).(i%256).1 and `2001:db8:i::1` on `a`, `.2` and
    /// `::2` on `b`.
    pub fn link(&self, a: &Netns, b: &Netns) -> Result<Link, LabError> {
        if a.name == b.name {
            return Err(LabError::Link(format!("both ends in {}", a.name)));
        }
        let idx = {
            let mut st = lock(&self.shared.state);
            if st.next_link >= MAX_LINKS {
                return Err(LabError::Link(format!("more than {MAX_LINKS} links")));
            }
            st.next_link += 1;
            st.next_link - 1
        };
        let ifname = |side: char| {
            let long = format!("{}l{idx}{side}", self.shared.if_prefix);
            // IFNAMSIZ - 1; names only need to be unique inside a namespace.
            if long.len() <= 15 {
                long
            } else {
                format!("kal{idx}{side}")
            }
        };
        let a_end = LinkEnd::new(a, ifname('a'), idx, 1);
        let b_end = LinkEnd::new(b, ifname('b'), idx, 2);
        ip(&[
            "link",
            "add",
            "name",
            &a_end.ifname,
            "netns",
            &a.name,
            "type",
            "veth",
            "peer",
            "name",
            &b_end.ifname,
            "netns",
            &b.name,
        ])?;
        {
            let mut st = lock(&self.shared.state);
            st.links.push((a.name.clone(), a_end.ifname.clone()));
            st.links.push((b.name.clone(), b_end.ifname.clone()));
        }
        for end in [&a_end, &b_end] {
            let v4 = format!("{}/{V4_PREFIX_LEN}", end.v4);
            let v6 = format!("{}/{V6_PREFIX_LEN}", end.v6);
            let n = end.netns.as_str();
            let dev = end.ifname.as_str();
            ip(&["-n", n, "addr", "add", &v4, "dev", dev])?;
            ip(&["-n", n, "-6", "addr", "add", &v6, "dev", dev, "nodad"])?;
            ip(&["-n", n, "link", "set", dev, "up"])?;
        }
        Ok(Link { a: a_end, b: b_end })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.shared.cleanup();
    }
}

/// A veth pair made by [`Lab::link`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The end in the first namespace (`.1`, `::1`).
    pub a: LinkEnd,
    /// The end in the second namespace (`.2`, `::2`).
    pub b: LinkEnd,
}

impl Link {
    /// The link's IPv4 subnet, e.g. `198.18.0.0/24`.
    pub fn v4_subnet(&self) -> String {
        let [o1, o2, o3, _] = self.a.v4.octets();
        format!("{o1}.{o2}.{o3}.0/{V4_PREFIX_LEN}")
    }

    /// The link's IPv6 subnet, e.g. `2001:db8:0::/64`.
    pub fn v6_subnet(&self) -> String {
        let s = self.a.v6.segments();
        format!("{:x}:{:x}:{:x}::/{V6_PREFIX_LEN}", s[0], s[1], s[2])
    }
}

/// One end of a [`Link`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEnd {
    /// Full name of the namespace it is in.
    pub netns: String,
    /// Interface name (at most 15 characters).
    pub ifname: String,
    /// IPv4 address (prefix length [`V4_PREFIX_LEN`]).
    pub v4: Ipv4Addr,
    /// IPv6 address (prefix length [`V6_PREFIX_LEN`]).
    pub v6: Ipv6Addr,
}

impl LinkEnd {
    fn new(ns: &Netns, ifname: String, idx: usize, host: u8) -> Self {
        let hi = u8::try_from(18 + idx / 256).unwrap_or(19);
        let lo = u8::try_from(idx % 256).unwrap_or(0);
        let seg = u16::try_from(idx).unwrap_or(0);
        Self {
            netns: ns.name.clone(),
            ifname,
            v4: Ipv4Addr::new(198, hi, lo, host),
            v6: Ipv6Addr::new(0x2001, 0xdb8, seg, 0, 0, 0, 0, u16::from(host)),
        }
    }

    /// `v4:port`.
    pub fn sock_v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.v4), port)
    }

    /// `[v6]:port`.
    pub fn sock_v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.v6), port)
    }
}

/// A network namespace of a [`Lab`] (a cheap handle; the lab owns it).
#[derive(Clone)]
pub struct Netns {
    name: String,
    short: String,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netns")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Netns {
    /// Full name (`ip netns` name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name given to [`Lab::netns`].
    pub fn short_name(&self) -> &str {
        &self.short
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// The namespace's inode number, what the kernel reports as
    /// `net->ns.inum` (and `ls -l /proc/<pid>/ns/net` shows).
    pub fn inode(&self) -> Result<u64, LabError> {
        std::fs::metadata(self.path())
            .map(|m| m.ino())
            .map_err(|source| LabError::Io {
                what: format!("stat {}", self.path().display()),
                source,
            })
    }

    /// `ip netns exec <name> <program>`: add arguments, then run it or
    /// hand it to [`Netns::spawn`].
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `cmd` (usually from [`Netns::command`]) to completion; its
    /// stdout, or [`LabError::Command`] with its stderr.
    pub fn output(&self, cmd: &mut Command) -> Result<String, LabError> {
        run(cmd, None)
    }

    /// Starts `cmd` in the background (usually from [`Netns::command`]).
    /// The process is killed (SIGKILL) and reaped when the guard or the lab
    /// drops, whichever is first.
    pub fn spawn(&self, cmd: &mut Command) -> Result<ChildGuard, LabError> {
        let line = cmd_line(cmd);
        let child = cmd.spawn().map_err(|source| LabError::Io {
            what: format!("spawn `{line}`"),
            source,
        })?;
        let pid = child.id();
        let slot = Arc::new(Mutex::new(Some(child)));
        lock(&self.shared.state).children.push(Arc::clone(&slot));
        Ok(ChildGuard { slot, pid, line })
    }

    /// Runs `f` on a new thread that has entered this namespace
    /// (`setns(CLONE_NEWNET)`) and returns its result. Sockets `f` creates
    /// belong to this namespace for life. A panic in `f` is resumed here.
    pub fn run_in<T, F>(&self, f: F) -> Result<T, LabError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let file = File::open(self.path()).map_err(|source| LabError::Setns {
            netns: self.name.clone(),
            source,
        })?;
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                // SAFETY: `file` is an open nsfs descriptor that outlives the
                // call; setns(CLONE_NEWNET) only changes the network
                // namespace of this dedicated thread, which ends after `f`.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(LabError::Setns {
                        netns: self.name.clone(),
                        source: io::Error::last_os_error(),
                    });
                }
                drop(file);
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// `ip -n <name> <args...>`; its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, LabError> {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        run(&mut cmd, None)
    }

    /// `ip route add <dst> via <via>` (`dst` like `198.18.1.0/24`,
    /// `2001:db8:1::/64` or `default`; the family follows `via`).
    pub fn route_add(&self, dst: &str, via: IpAddr) -> Result<(), LabError> {
        let family = if via.is_ipv6() { "-6" } else { "-4" };
        self.ip(&[family, "route", "add", dst, "via", &via.to_string()])
            .map(drop)
    }

    /// Writes a sysctl of this namespace (`net.ipv4.ip_forward`,
    /// `net.ipv4.tcp_keepalive_time`, ...).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), LabError> {
        let path = sysctl_path(key)?;
        let value = value.to_owned();
        self.run_in(move || std::fs::write(&path, value.as_bytes()))?
            .map_err(|source| LabError::Io {
                what: format!("sysctl {key} in {}", self.name),
                source,
            })
    }

    /// Reads a sysctl of this namespace (trimmed).
    pub fn sysctl_get(&self, key: &str) -> Result<String, LabError> {
        let path = sysctl_path(key)?;
        self.run_in(move || std::fs::read_to_string(&path))?
            .map(|s| s.trim().to_owned())
            .map_err(|source| LabError::Io {
                what: format!("sysctl {key} in {}", self.name),
                source,
            })
    }

    /// IPv4 and IPv6 forwarding on (for a router namespace).
    pub fn enable_forwarding(&self) -> Result<(), LabError> {
        self.sysctl("net.ipv4.ip_forward", "1")?;
        self.sysctl("net.ipv6.conf.all.forwarding", "1")
    }

    /// Loads `ruleset` with `nft -f -` inside this namespace.
    pub fn nft(&self, ruleset: &str) -> Result<(), LabError> {
        {
            let mut st = lock(&self.shared.state);
            if !st.nft_used.contains(&self.name) {
                st.nft_used.push(self.name.clone());
            }
        }
        run(
            Command::new("ip").args(["netns", "exec", &self.name, "nft", "-f", "-"]),
            Some(ruleset),
        )
        .map(drop)
    }

    fn nft_rule(&self, chain: &str, rule: &str) -> Result<(), LabError> {
        self.nft(&format!(
            "add table inet {NFT_TABLE}\n\
             add chain inet {NFT_TABLE} input {{ type filter hook input priority -10; policy accept; }}\n\
             add chain inet {NFT_TABLE} output {{ type filter hook output priority -10; policy accept; }}\n\
             add rule inet {NFT_TABLE} {chain} {rule}\n"
        ))
    }

    /// Drops every TCP packet in and out of this namespace, so that it
    /// looks dead to its peers. Call it on the namespace that should die,
    /// not on the one whose counters a test checks (a drop on output makes
    /// the local send fail with EPERM, which TCP counts differently).
    pub fn drop_all_tcp(&self) -> Result<(), LabError> {
        self.nft_rule("input", "meta l4proto tcp drop")?;
        self.nft_rule("output", "meta l4proto tcp drop")
    }

    /// Drops TCP packets to and from local `port` (both directions).
    pub fn drop_tcp_port(&self, port: u16) -> Result<(), LabError> {
        self.nft_rule("input", &format!("tcp dport {port} drop"))?;
        self.nft_rule("output", &format!("tcp sport {port} drop"))
    }

    /// Answers every TCP packet to local `port` with a reset (a connect
    /// then fails with ECONNREFUSED, an established peer sees a reset).
    pub fn reject_tcp_with_reset(&self, port: u16) -> Result<(), LabError> {
        self.nft_rule("input", &format!("tcp dport {port} reject with tcp reset"))
    }

    /// Removes all nftables rules of this namespace.
    pub fn flush_nft(&self) -> Result<(), LabError> {
        self.nft("flush ruleset\n")
    }

    /// The namespace's counters: `/proc/net/netstat` and `/proc/net/snmp`
    /// as seen from inside it, keyed like `"TcpExt.TCPKeepAlive"`,
    /// `"Tcp.RetransSegs"`.
    pub fn netstat(&self) -> Result<Counters, LabError> {
        let text = self.run_in(|| -> io::Result<String> {
            let mut text = std::fs::read_to_string("/proc/thread-self/net/netstat")?;
            text.push_str(&std::fs::read_to_string("/proc/thread-self/net/snmp")?);
            Ok(text)
        })?;
        let text = text.map_err(|source| LabError::Io {
            what: format!("read /proc/net/netstat in {}", self.name),
            source,
        })?;
        Counters::parse(&text)
    }
}

fn sysctl_path(key: &str) -> Result<PathBuf, LabError> {
    if key.is_empty()
        || key.contains("..")
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(LabError::InvalidName(key.to_owned()));
    }
    Ok(Path::new("/proc/sys").join(key.replace('.', "/")))
}

/// A process started by [`Netns::spawn`]; killed (SIGKILL) and reaped on
/// drop.
#[derive(Debug)]
pub struct ChildGuard {
    slot: ChildSlot,
    pid: u32,
    line: String,
}

impl ChildGuard {
    /// Process id.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// The command line it was started with.
    pub fn command_line(&self) -> &str {
        &self.line
    }

    /// Its exit status if it has exited (`None` also after a kill).
    pub fn try_wait(&self) -> Result<Option<ExitStatus>, LabError> {
        match lock(&self.slot).as_mut() {
            Some(c) => c.try_wait().map_err(|source| LabError::Io {
                what: format!("wait for `{}`", self.line),
                source,
            }),
            None => Ok(None),
        }
    }

    /// Waits at most `timeout` (polling every 10 ms) for it to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its stdout, if it was piped (once).
    pub fn take_stdout(&self) -> Option<ChildStdout> {
        lock(&self.slot).as_mut().and_then(|c| c.stdout.take())
    }

    /// Its stderr, if it was piped (once).
    pub fn take_stderr(&self) -> Option<ChildStderr> {
        lock(&self.slot).as_mut().and_then(|c| c.stderr.take())
    }

    /// Kills (SIGKILL) and reaps it now.
    pub fn kill(&self) {
        kill_slot(&self.slot);
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        kill_slot(&self.slot);
    }
}

/// Removes namespaces named `<prefix><pid>-...` whose creating process
/// `<pid>` no longer exists (left by killed runs): kills the processes
/// still inside, then `ip netns del`. Namespaces of live processes are
/// left alone, so concurrent test binaries are safe. Returns the names
/// removed.
pub fn cleanup_stale(prefix: &str) -> Result<Vec<String>, LabError> {
    let dir = match std::fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LabError::Io {
                what: format!("read {NETNS_DIR}"),
                source,
            });
        }
    };
    let mut removed = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some(pid) = rest
            .split('-')
            .next()
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if pid <= 0 || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        if let Ok(pids) = ip(&["netns", "pids", &name]) {
            for p in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<libc::pid_t>().ok())
                .filter(|p| *p > 0)
            {
                // SAFETY: plain kill(2) of a positive pid; no memory is shared.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        ip(&["netns", "del", &name])?;
        removed.push(name);
    }
    Ok(removed)
}

/// True when running as root. Otherwise prints a loud
/// `SKIPPED (not root): <test_name>` and returns false — except with
/// `CI=true`, where a skip is a failure and this panics.
pub fn require_root(test_name: &str) -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test_name}: needs root, and CI=true makes a skip a failure"
    );
    // Written to the stderr handle, not with eprintln!, so that the test
    // harness's output capture does not hide it.
    let _ = writeln!(
        io::stderr().lock(),
        "\n=== SKIPPED (not root): {test_name} ===\n"
    );
    false
}

/// Calls `cond` every `poll` until it returns true (then true) or
/// `timeout` has passed (then false). Checks at least once.
pub fn wait_until(timeout: Duration, poll: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    let poll = poll.max(Duration::from_millis(1));
    // Bounded in count too, should the clock misbehave.
    let max_iter = timeout.as_millis() / poll.as_millis().max(1) + 2;
    for _ in 0..max_iter {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(poll.min(deadline - now));
    }
    cond()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("client").is_ok());
        assert!(valid_name("lb_1").is_ok());
        for bad in ["", "a-b", "../x", "a b", &"x".repeat(25)] {
            assert!(valid_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sysctl_paths() {
        assert_eq!(
            sysctl_path("net.ipv4.tcp_keepalive_time").unwrap(),
            Path::new("/proc/sys/net/ipv4/tcp_keepalive_time")
        );
        assert!(sysctl_path("net/../x").is_err());
        assert!(sysctl_path("").is_err());
    }

    #[test]
    fn wait_until_is_bounded() {
        let start = Instant::now();
        assert!(!wait_until(
            Duration::from_millis(50),
            Duration::from_millis(5),
            || false
        ));
        assert!(start.elapsed() < Duration::from_secs(2));
        let mut n = 0;
        assert!(wait_until(
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                n += 1;
                n >= 3
            }
        ));
    }
}
