//! A small network lab for the agent's scenario tests: network namespaces,
//! veth links, nftables rules, sockets created inside a namespace, and the
//! namespace's own TCP counters. Everything is removed on drop, also when a
//! test panics.

use std::{
    collections::HashMap,
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

/// A network namespace named `ka<pid>-<n>-<tag>`, deleted on drop.
pub struct Netns {
    pub name: String,
}

fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().expect("spawn");
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Netns {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("ka{}-{n}-{tag}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full);
    }

    /// The namespace's inode: what the kernel reports as `net->ns.inum`.
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .expect("netns file")
            .ino()
    }

    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// Loads an nftables ruleset inside the namespace.
    pub fn nft(&self, ruleset: &str) {
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(ruleset.as_bytes())
            .expect("write ruleset");
        let output = child.wait_with_output().expect("nft");
        assert!(
            output.status.success(),
            "nft: {}\n{ruleset}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Drops every packet in and out: the host looks dead.
    pub fn drop_everything(&self) {
        self.nft(
            "table inet kalab_drop {\n\
             chain in { type filter hook input priority 0; policy drop; }\n\
             chain out { type filter hook output priority 0; policy drop; }\n\
             }\n",
        );
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        let output = self
            .command("sysctl")
            .args(["-qw", &format!("{key}={value}")])
            .output()
            .expect("sysctl");
        assert!(
            output.status.success(),
            "sysctl {key}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Runs `f` on a thread inside the namespace: sockets it creates stay
    /// in the namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let file = std::fs::File::open(&path).expect("open netns");
                    // SAFETY: setns on a valid namespace fd affects only this
                    // thread, which exists only to run `f`.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("netns thread")
        })
    }

    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        self.run_in(|| TcpListener::bind(addr).expect("bind"))
    }

    pub fn connect(&self, addr: SocketAddr, options: &SocketOptions) -> std::io::Result<TcpStream> {
        self.run_in(|| {
            let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            options.apply(&stream);
            Ok(stream)
        })
    }

    /// TcpExt and Tcp counters of this namespace ("TcpExt.TCPKeepAlive").
    pub fn counters(&self) -> HashMap<String, i64> {
        let mut counters = HashMap::new();
        for file in ["/proc/net/netstat", "/proc/net/snmp"] {
            let output = self.command("cat").arg(file).output().expect("cat");
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            let lines: Vec<&str> = text.lines().collect();
            for pair in lines.chunks(2) {
                let [header, values] = pair else { continue };
                let mut names = header.split_whitespace();
                let mut nums = values.split_whitespace();
                let prefix = names
                    .next()
                    .unwrap_or_default()
                    .trim_end_matches(':')
                    .to_owned();
                nums.next();
                for (name, value) in names.zip(nums) {
                    counters.insert(format!("{prefix}.{name}"), value.parse().unwrap_or(0));
                }
            }
        }
        counters
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Counter deltas between two readings.
pub fn delta(before: &HashMap<String, i64>, after: &HashMap<String, i64>, key: &str) -> i64 {
    after.get(key).copied().unwrap_or(0) - before.get(key).copied().unwrap_or(0)
}

/// Links two namespaces with a veth pair: `a_addrs`/`b_addrs` are CIDRs
/// (IPv4 from `198.18.0.0/15`, IPv6 from `2001:db8::/32`).
pub fn link(a: &Netns, a_addrs: &[&str], b: &Netns, b_addrs: &[&str]) {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let (va, vb) = (
        format!("kva{}x{n}", std::process::id() % 10000),
        format!("kvb{}x{n}", std::process::id() % 10000),
    );
    run(
        "ip",
        &[
            "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns",
            &b.name,
        ],
    );
    for (ns, dev, addrs) in [(a, &va, a_addrs), (b, &vb, b_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ns.ip(&["addr", "add", addr, "dev", dev, "nodad"]);
            } else {
                ns.ip(&["addr", "add", addr, "dev", dev]);
            }
        }
        ns.ip(&["link", "set", dev, "up"]);
    }
}

/// Socket options a scenario's client sets.
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketOptions {
    pub keepalive: Option<(u32, u32, u32)>,
    pub user_timeout_ms: Option<u32>,
}

fn setsockopt(stream: &TcpStream, level: i32, name: i32, value: i32) {
    // SAFETY: a valid fd and a pointer to an int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            u32::try_from(size_of::<i32>()).unwrap_or(4),
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt {name}: {}",
        std::io::Error::last_os_error()
    );
}

impl SocketOptions {
    pub fn apply(&self, stream: &TcpStream) {
        if let Some((idle, interval, count)) = self.keepalive {
            setsockopt(stream, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
            setsockopt(
                stream,
                libc::IPPROTO_TCP,
                libc::TCP_KEEPIDLE,
                i32::try_from(idle).unwrap_or(1),
            );
            setsockopt(
                stream,
                libc::IPPROTO_TCP,
                libc::TCP_KEEPINTVL,
                i32::try_from(interval).unwrap_or(1),
            );
            setsockopt(
                stream,
                libc::IPPROTO_TCP,
                libc::TCP_KEEPCNT,
                i32::try_from(count).unwrap_or(1),
            );
        }
        if let Some(ms) = self.user_timeout_ms {
            setsockopt(
                stream,
                libc::IPPROTO_TCP,
                libc::TCP_USER_TIMEOUT,
                i32::try_from(ms).unwrap_or(1000),
            );
        }
    }
}

pub fn enable_keepalive(stream: &TcpStream, idle: u32, interval: u32, count: u32) {
    SocketOptions {
        keepalive: Some((idle, interval, count)),
        user_timeout_ms: None,
    }
    .apply(stream);
}
