//! The agent's scenario tests on top of `ka-lab` (namespaces, veth links,
//! nftables rules, sockets created inside a namespace, the namespace's own
//! TCP counters): the fixed addresses the scenarios name, and failures as
//! panics that say what failed. Everything is removed on drop, also when a
//! test panics.

#![expect(
    clippy::expect_used,
    reason = "test helpers fail by panicking, naming what failed"
)]

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use ka_lab::{ConnectOpts, Lab};

/// A network namespace of its own lab (`kalab-<pid>-<n>-<tag>-ns`),
/// deleted with the lab on drop.
pub struct Netns {
    ns: ka_lab::Netns,
    _lab: Lab,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let lab = Lab::new(tag).expect("lab");
        let ns = lab.netns("ns").expect("network namespace");
        Self { ns, _lab: lab }
    }

    /// The `ip netns` name.
    pub fn name(&self) -> &str {
        self.ns.name()
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) {
        self.ns.ip(args).unwrap_or_else(|e| panic!("{e}"));
    }

    /// The namespace's inode: what the kernel reports as `net->ns.inum`.
    pub fn inode(&self) -> u64 {
        self.ns.inode().expect("netns inode")
    }

    /// `ip netns exec <ns> <program>`.
    pub fn command(&self, program: &str) -> Command {
        self.ns.command(program)
    }

    /// Loads an nftables ruleset inside the namespace.
    pub fn nft(&self, ruleset: &str) {
        self.ns
            .nft(ruleset)
            .unwrap_or_else(|e| panic!("{e}\n{ruleset}"));
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
        self.ns.sysctl(key, value).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Runs `f` on a thread inside the namespace: sockets it creates stay
    /// in the namespace.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.ns.run_in(f).unwrap_or_else(|e| panic!("{e}"))
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

    /// The kernel's own view of the namespace's TCP sockets (`ss -tanoie`),
    /// for failure messages: whether a socket the agent still holds is
    /// still there, its timers and retransmissions.
    pub fn sockets(&self) -> String {
        match self.command("ss").args(["-tanoie"]).output() {
            Ok(output) => String::from_utf8_lossy(&output.stdout).into_owned(),
            Err(e) => format!("ss: {e}"),
        }
    }

    /// TcpExt and Tcp counters of this namespace ("TcpExt.TCPKeepAlive").
    pub fn counters(&self) -> HashMap<String, i64> {
        self.ns
            .netstat()
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect()
    }
}

/// Counter deltas between two readings.
pub fn delta(before: &HashMap<String, i64>, after: &HashMap<String, i64>, key: &str) -> i64 {
    after.get(key).copied().unwrap_or(0) - before.get(key).copied().unwrap_or(0)
}

static LINKS: AtomicU32 = AtomicU32::new(0);

/// Links two namespaces with a veth pair: `a_addrs`/`b_addrs` are CIDRs
/// (IPv4 from `198.18.0.0/15`, IPv6 from `2001:db8::/32`). The pair goes
/// with the namespaces.
pub fn link(a: &Netns, a_addrs: &[&str], b: &Netns, b_addrs: &[&str]) {
    // Names only need to be unique inside a namespace, which can have
    // several links.
    let n = LINKS.fetch_add(1, Ordering::Relaxed);
    let (va, vb) = (format!("kva{n}"), format!("kvb{n}"));
    a.ip(&[
        "link",
        "add",
        &va,
        "type",
        "veth",
        "peer",
        "name",
        &vb,
        "netns",
        b.name(),
    ]);
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

/// Closes `stream` abortively (`SO_LINGER` 0): the kernel sends an RST and
/// moves the socket straight to CLOSE, with no FIN transition before.
pub fn close_with_reset(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(stream);
}

impl SocketOptions {
    pub fn apply(&self, stream: &TcpStream) {
        let mut options = ConnectOpts::new();
        if let Some((idle, interval, count)) = self.keepalive {
            options = options.keepalive(
                Duration::from_secs(idle.into()),
                Duration::from_secs(interval.into()),
                count,
            );
        }
        if let Some(ms) = self.user_timeout_ms {
            options = options.user_timeout(Duration::from_millis(ms.into()));
        }
        options.apply(stream).expect("socket options");
    }
}

pub fn enable_keepalive(stream: &TcpStream, idle: u32, interval: u32, count: u32) {
    SocketOptions {
        keepalive: Some((idle, interval, count)),
        user_timeout_ms: None,
    }
    .apply(stream);
}

/// A process started inside a namespace, killed (and reaped) on drop.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where a real peer program is, or `None` (a loud skip outside CI, a
/// failure in CI, where `cargo xtask test` installs it).
pub fn require_program(program: &str, test: &str) -> Option<std::path::PathBuf> {
    let found = ["/usr/sbin", "/usr/bin", "/usr/local/bin", "/sbin", "/bin"]
        .iter()
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|path| path.exists());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: {program} is not installed, and CI=true forbids skipping"
        );
        eprintln!("SKIPPED ({program} not installed): {test}");
    }
    found
}

/// An nginx serving `/` on `listen` inside `ns`, with its own config, logs
/// and pid file in a temporary directory (removed on drop).
pub struct Nginx {
    _child: ChildGuard,
    dir: std::path::PathBuf,
}

impl Nginx {
    pub fn start(
        ns: &Netns,
        nginx: &std::path::Path,
        listen: &str,
        keepalive_timeout_secs: u32,
    ) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ka-nginx-{}-{}", std::process::id(), ns.name()));
        std::fs::create_dir_all(&dir).expect("nginx dir");
        let config = format!(
            "daemon off;\nmaster_process off;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n access_log off;\n client_body_temp_path {dir};\n proxy_temp_path {dir};\n\
             fastcgi_temp_path {dir};\n uwsgi_temp_path {dir};\n scgi_temp_path {dir};\n\
             keepalive_timeout {keepalive_timeout_secs}s;\n\
             server {{ listen {listen}; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), config).expect("nginx.conf");
        let child = ns
            .command(&nginx.display().to_string())
            .args([
                "-c",
                &dir.join("nginx.conf").display().to_string(),
                "-p",
                &dir.display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx");
        let guard = ChildGuard(child);
        // Ready when it accepts connections.
        let addr: SocketAddr = listen.parse().expect("listen address");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ns
            .run_in(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)))
            .is_err()
        {
            assert!(std::time::Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { _child: guard, dir }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
