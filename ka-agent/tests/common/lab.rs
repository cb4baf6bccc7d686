//! A small network lab for the agent's scenario tests: network namespaces,
//! veth links, nftables rules, sockets created inside a namespace, and the
//! namespace's own TCP counters. Everything is removed on drop, also when a
//! test panics.

#![expect(
    clippy::expect_used,
    reason = "test helpers fail by panicking, naming what failed"
)]

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
        let socket = socket2::SockRef::from(stream);
        if let Some((idle, interval, count)) = self.keepalive {
            socket.set_keepalive(true).expect("SO_KEEPALIVE");
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(Duration::from_secs(idle.into()))
                .with_interval(Duration::from_secs(interval.into()))
                .with_retries(count);
            socket
                .set_tcp_keepalive(&keepalive)
                .expect("TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT");
        }
        if let Some(ms) = self.user_timeout_ms {
            socket
                .set_tcp_user_timeout(Some(Duration::from_millis(ms.into())))
                .expect("TCP_USER_TIMEOUT");
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
        let dir = std::env::temp_dir().join(format!("ka-nginx-{}-{}", std::process::id(), ns.name));
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
