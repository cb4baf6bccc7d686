//! `cargo xtask demo`: the seed's story, for real, in two minutes.
//!
//! ```text
//!   client ── load balancer ──┬── backend A
//!  198.18.40.1   (VIP 198.18.43.100:80,   └── backend B
//!                 round-robin DNAT, idle timeout)
//! ```
//!
//! Four network namespaces: a client, a load balancer doing round-robin
//! DNAT of a virtual IP with nftables whose conntrack forgets established
//! flows after a short idle timeout (like the seed's DSR load balancer and
//! its 120 s), and two backends answering HTTP on kept-alive connections.
//! The agent watches all of it; every step is narrated with the agent's own
//! metrics that prove it. `--ci` shortens the timings, does not pause, and
//! fails on the first outcome the metrics do not show.
//!
//! Everything is removed on exit: namespaces and agent by drop guards, also
//! on error and on Ctrl-C, SIGTERM or SIGHUP (which interrupt the next wait).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use ka_lab::{ConnectOpts, Lab, exposition::Exposition};

use crate::cmd;

const VIP: &str = "198.18.43.100:80";

/// Timings of one run.
#[derive(Clone, Copy, Debug)]
struct Timing {
    /// The load balancer's idle timeout (conntrack established timeout).
    lb_idle: u64,
    /// Pause after each narrated step (0 under --ci).
    pause: Duration,
}

/// Everything the demo created; removed on drop.
struct World {
    /// Taken and dropped (namespaces, links, nftables removed) after the
    /// agent has stopped.
    lab: Option<Lab>,
    namespaces: Vec<ka_lab::Netns>,
    agent: Option<Child>,
    agent_log: PathBuf,
    interrupted: Arc<AtomicBool>,
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            // SAFETY: kill(2) on our own child's pid, not yet reaped.
            unsafe { libc::kill(i32::try_from(agent.id()).unwrap_or(0), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = agent.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = agent.kill();
            let _ = agent.wait();
        }
        drop(self.lab.take());
        let _ = std::fs::remove_file(&self.agent_log);
        eprintln!("demo: cleaned up (namespaces deleted, agent stopped)");
    }
}

impl World {
    fn ns(&self, role: usize) -> &ka_lab::Netns {
        &self.namespaces[role]
    }

    fn ip(&self, role: usize, args: &[&str]) -> anyhow::Result<()> {
        self.ns(role).ip(args)?;
        Ok(())
    }

    fn exec(&self, role: usize, args: &[&str]) -> anyhow::Result<()> {
        let (program, args) = args.split_first().context("no program")?;
        let ns = self.ns(role);
        ns.output(ns.command(program).args(args))?;
        Ok(())
    }

    fn nft(&self, role: usize, ruleset: &str) -> anyhow::Result<()> {
        Ok(self.ns(role).nft(ruleset)?)
    }

    /// The namespace's inode: the agent's `netns` label.
    fn inode(&self, role: usize) -> anyhow::Result<String> {
        Ok(self.ns(role).inode()?.to_string())
    }

    /// Runs `f` on a thread inside namespace `role`: sockets it creates
    /// stay there.
    fn run_in<T: Send>(
        &self,
        role: usize,
        f: impl FnOnce() -> std::io::Result<T> + Send,
    ) -> anyhow::Result<T> {
        Ok(self.ns(role).run_in(f)??)
    }

    /// Sleeps, unless the demo was interrupted (Ctrl-C, SIGTERM, SIGHUP).
    fn sleep(&self, duration: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            if self.interrupted.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

const CLIENT: usize = 0;
const LB: usize = 1;
const BACKEND_A: usize = 2;
const BACKEND_B: usize = 3;

/// Builds the four namespaces and their links.
fn build(world: &mut World, timing: Timing) -> anyhow::Result<()> {
    let lab = world.lab.as_ref().context("the demo's lab is gone")?;
    for role in ["client", "lb", "backend_a", "backend_b"] {
        let ns = lab.netns(role)?;
        world.namespaces.push(ns);
    }
    // (namespace, its address; the LB's address on that link)
    let links = [
        (
            CLIENT,
            "198.18.40.1/24",
            "198.18.40.254/24",
            "198.18.40.254",
        ),
        (
            BACKEND_A,
            "198.18.41.2/24",
            "198.18.41.254/24",
            "198.18.41.254",
        ),
        (
            BACKEND_B,
            "198.18.42.2/24",
            "198.18.42.254/24",
            "198.18.42.254",
        ),
    ];
    for (i, (role, addr, lb_addr, gateway)) in links.into_iter().enumerate() {
        let (outer, inner) = (format!("kd{i}x"), format!("kd{i}y"));
        world.ip(
            role,
            &[
                "link",
                "add",
                &outer,
                "type",
                "veth",
                "peer",
                "name",
                &inner,
                "netns",
                world.ns(LB).name(),
            ],
        )?;
        world.ip(role, &["addr", "add", addr, "dev", &outer])?;
        world.ip(role, &["link", "set", &outer, "up"])?;
        world.ip(LB, &["addr", "add", lb_addr, "dev", &inner])?;
        world.ip(LB, &["link", "set", &inner, "up"])?;
        world.ip(role, &["route", "add", "default", "via", gateway])?;
    }
    world.exec(LB, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    world.nft(
        LB,
        "table ip kademo_lb {\n\
         chain pre {\n\
         type nat hook prerouting priority dstnat;\n\
         ip daddr 198.18.43.100 tcp dport 80 dnat to numgen inc mod 2 map { 0 : 198.18.41.2, 1 : 198.18.42.2 }\n\
         }\n\
         }\n",
    )?;
    // The load balancer's idle timeout (conntrack is loaded by the NAT rule).
    world.exec(
        LB,
        &[
            "sysctl",
            "-qw",
            &format!(
                "net.netfilter.nf_conntrack_tcp_timeout_established={}",
                timing.lb_idle
            ),
        ],
    )?;
    Ok(())
}

/// Sum of a metric over the series that have every `(label, value)`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    Exposition::parse(text).sum(name, labels)
}

/// One narrated expectation: a metric, its labels, and what it must be.
struct Expect<'a> {
    name: &'a str,
    labels: Vec<(&'a str, &'a str)>,
    /// Shown instead of the netns inode.
    shown: &'a str,
    holds: fn(f64) -> bool,
    wanted: &'a str,
}

/// The demo's state: the world, the agent's address, the checks so far.
struct Demo {
    world: World,
    agent: SocketAddr,
    ci: bool,
    failures: Vec<String>,
    timing: Timing,
}

impl Demo {
    fn step(&self, n: u32, title: &str) -> anyhow::Result<()> {
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            println!("\n\x1b[1m{n}. {title}\x1b[0m");
        } else {
            println!("\n{n}. {title}");
        }
        self.world.sleep(self.timing.pause)
    }

    /// Waits (bounded) until every expectation holds, then prints each
    /// metric with its value; a missing outcome fails (`--ci`: at once).
    fn prove(&mut self, timeout: Duration, expects: &[Expect<'_>]) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let text = loop {
            let text = ka_lab::http::get_ok(self.agent, "/metrics").unwrap_or_default();
            let all = expects
                .iter()
                .all(|e| (e.holds)(metric(&text, e.name, &e.labels)));
            if all || Instant::now() >= deadline {
                break text;
            }
            self.world.sleep(Duration::from_millis(250))?;
        };
        for e in expects {
            let value = metric(&text, e.name, &e.labels);
            let ok = (e.holds)(value);
            let extra: Vec<String> = e
                .labels
                .iter()
                .filter(|(k, _)| *k != "netns")
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect();
            let labels = if extra.is_empty() {
                e.shown.to_owned()
            } else {
                format!("{},{}", e.shown, extra.join(","))
            };
            // An absent series sums to -0.0: show counts as integers.
            let value = format!("{:.0}", value.abs());
            println!(
                "   {} {}{{{labels}}} = {value}{}",
                if ok { "\u{2713}" } else { "\u{2717}" },
                e.name,
                if ok {
                    String::new()
                } else {
                    format!("   (expected {})", e.wanted)
                }
            );
            if !ok {
                let failure = format!("{}{{{labels}}} = {value}, expected {}", e.name, e.wanted);
                if self.ci {
                    bail!("the demo's outcome did not show in the metrics: {failure}");
                }
                self.failures.push(failure);
            }
        }
        Ok(())
    }
}

fn say(text: &str) {
    println!("{text}");
}

fn one(v: f64) -> bool {
    (v - 1.0).abs() < 0.5
}
fn zero(v: f64) -> bool {
    v.abs() < 0.5
}
fn at_least_two(v: f64) -> bool {
    v >= 1.5
}

fn start_agent(
    world: &mut World,
    binary: &std::path::Path,
    timing: Timing,
) -> anyhow::Result<SocketAddr> {
    let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let log = std::fs::File::create(&world.agent_log)?;
    let child = Command::new(binary)
        .args(["run", "--listen", &addr.to_string()])
        .args(["--idle-timeout", &format!("{}s", timing.lb_idle)])
        .args(["--inventory-interval", "5s"])
        .env_remove("KA_LISTEN")
        .env("KA_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    world.agent = Some(child);
    let deadline = Instant::now() + Duration::from_mins(1);
    while ka_lab::http::get_ok(addr, "/readyz").is_none() {
        if let Some(status) = world
            .agent
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            let log = std::fs::read_to_string(&world.agent_log).unwrap_or_default();
            bail!("the agent exited with {status}:\n{log}");
        }
        if Instant::now() > deadline {
            bail!("the agent was not ready within a minute");
        }
        world.sleep(Duration::from_millis(100))?;
    }
    Ok(addr)
}

/// A kept-alive HTTP connection: the client's end and the backend's.
struct Http {
    client: TcpStream,
    backend: TcpStream,
    backend_name: &'static str,
}

/// Opens a connection from the client to the VIP; the load balancer picks
/// the backend, which accepts it.
fn open(
    demo: &Demo,
    listeners: &[(&'static str, TcpListener)],
    keepalive: bool,
) -> anyhow::Result<Http> {
    let vip: SocketAddr = VIP.parse()?;
    let client = demo.world.run_in(CLIENT, || {
        let stream = TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        if keepalive {
            the_fix().apply(&stream)?;
        }
        Ok(stream)
    })?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        for (name, listener) in listeners {
            if let Ok((backend, _)) = listener.accept() {
                backend.set_nonblocking(false)?;
                backend.set_read_timeout(Some(Duration::from_secs(5)))?;
                return Ok(Http {
                    client,
                    backend,
                    backend_name: name,
                });
            }
        }
        if Instant::now() > deadline {
            bail!("no backend accepted the connection");
        }
        demo.world.sleep(Duration::from_millis(20))?;
    }
}

/// The keepalive the demo's fix turns on: probes after 1 s idle, every
/// 1 s, 3 of them, well inside the load balancer's idle timeout.
fn the_fix() -> ConnectOpts {
    ConnectOpts::new().keepalive(Duration::from_secs(1), Duration::from_secs(1), 3)
}

/// One request and its response on the kept-alive connection.
fn exchange(http: &mut Http) -> std::io::Result<String> {
    http.client
        .write_all(b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n")?;
    let mut request = Vec::new();
    let mut buf = [0u8; 256];
    while !request.ends_with(b"\r\n\r\n") && request.len() < 4096 {
        let n = http.backend.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let body = format!("hello from backend {}\n", http.backend_name);
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
        body.len()
    );
    http.backend.write_all(response.as_bytes())?;
    let mut answer = vec![0u8; response.len()];
    http.client.read_exact(&mut answer)?;
    Ok(body.trim().to_owned())
}

pub fn demo(ci: bool) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!(
            "the demo needs root (network namespaces, the agent's kernel programs): sudo -E cargo xtask demo"
        );
    }
    for program in ["ip", "nft"] {
        if cmd::which(program).is_none() {
            bail!("the demo needs {program}: cargo xtask setup --test-deps installs it");
        }
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = Arc::clone(&interrupted);
        ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed))
            .context("cannot install the handler of Ctrl-C and SIGTERM")?;
    }
    let timing = if ci {
        Timing {
            lb_idle: 3,
            pause: Duration::ZERO,
        }
    } else {
        Timing {
            lb_idle: 10,
            pause: Duration::from_secs(2),
        }
    };
    eprintln!("demo: building the agent");
    let binary = cmd::build_agent(false)?;
    let world = World {
        lab: Some(Lab::new("kademo")?),
        namespaces: Vec::new(),
        agent: None,
        agent_log: std::env::temp_dir().join(format!("ka-demo-agent-{}.log", std::process::id())),
        interrupted,
    };
    let mut demo = Demo {
        world,
        agent: "127.0.0.1:9".parse()?,
        ci,
        failures: Vec::new(),
        timing,
    };
    let started = Instant::now();
    story(&mut demo, &binary).inspect_err(|_| {
        if demo.world.interrupted.load(Ordering::Relaxed) {
            return;
        }
        let log = std::fs::read_to_string(&demo.world.agent_log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        eprintln!("demo: the agent's last log lines:");
        for line in tail.iter().rev() {
            eprintln!("  {line}");
        }
    })?;
    if !demo.failures.is_empty() {
        bail!(
            "{} narrated outcome(s) did not show in the metrics: {}",
            demo.failures.len(),
            demo.failures.join("; ")
        );
    }
    println!(
        "\nEvery step above is in the agent's own metrics. Took {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[expect(
    clippy::too_many_lines,
    reason = "the story reads best as one narrative, step by step"
)]
fn story(demo: &mut Demo, binary: &std::path::Path) -> anyhow::Result<()> {
    let lb = demo.timing.lb_idle;
    let path = format!("client 198.18.40.1 ── LB (VIP {VIP}, round robin, idle timeout {lb} s) ──");
    say(&format!(
        "ka demo: a load balancer that forgets idle flows (the seed's DSR load balancer)\n\n\
         {path}┬── backend A 198.18.41.2\n{}└── backend B 198.18.42.2",
        " ".repeat(path.chars().count())
    ));
    build(&mut demo.world, demo.timing)?;
    demo.agent = start_agent(&mut demo.world, binary, demo.timing)?;
    say(&format!(
        "   the agent watches every namespace: ka-agent run --idle-timeout {lb}s (metrics on http://{}/metrics)",
        demo.agent
    ));
    let (client_ns, a_ns, b_ns) = (
        demo.world.inode(CLIENT)?,
        demo.world.inode(BACKEND_A)?,
        demo.world.inode(BACKEND_B)?,
    );
    let listeners = [
        (
            "A",
            demo.world.run_in(BACKEND_A, || {
                let l = TcpListener::bind("198.18.41.2:80")?;
                l.set_nonblocking(true)?;
                Ok(l)
            })?,
        ),
        (
            "B",
            demo.world.run_in(BACKEND_B, || {
                let l = TcpListener::bind("198.18.42.2:80")?;
                l.set_nonblocking(true)?;
                Ok(l)
            })?,
        ),
    ];

    demo.step(
        1,
        "The client opens an HTTP keep-alive connection (TCP keepalive off, as most clients)",
    )?;
    let mut http = open(demo, &listeners, false)?;
    let answer = exchange(&mut http)?;
    say(&format!(
        "   GET / → \"{answer}\": the LB mapped the flow to backend {}",
        http.backend_name
    ));
    if http.backend_name != "A" {
        bail!("the first connection should go to backend A (round robin starts there)");
    }
    demo.prove(
        Duration::from_secs(5),
        &[Expect {
            name: "ka_connections_opened_total",
            labels: vec![("netns", &client_ns)],
            shown: "netns=client",
            holds: one,
            wanted: "1",
        }],
    )?;

    demo.step(
        2,
        &format!(
            "Nobody talks for {} s: the LB's idle timeout ({lb} s) passes and it forgets the flow",
            lb + 2
        ),
    )?;
    demo.world.sleep(Duration::from_secs(lb + 2))?;
    say("   the agent already knows both ends are at risk: idle past the timeout, keepalive off");
    demo.prove(
        Duration::from_secs(5),
        &[
            Expect {
                name: "ka_connections_at_risk",
                labels: vec![("netns", &client_ns), ("reason", "keepalive_disabled")],
                shown: "netns=client",
                holds: one,
                wanted: "1",
            },
            Expect {
                name: "ka_connections_at_risk",
                labels: vec![("netns", &a_ns), ("reason", "keepalive_disabled")],
                shown: "netns=backend-a",
                holds: one,
                wanted: "1",
            },
        ],
    )?;

    demo.step(
        3,
        "The client sends its next request on the kept-alive socket",
    )?;
    let failed = exchange_client_only(&mut http);
    say(&format!(
        "   the LB has no mapping: it picks backend B, which never saw this connection and answers RST\n   the client's request fails: {failed}"
    ));
    demo.prove(
        Duration::from_secs(5),
        &[
            Expect {
                name: "ka_zombies_total",
                labels: vec![("netns", &client_ns), ("kind", "reset_after_idle")],
                shown: "netns=client",
                holds: one,
                wanted: "1",
            },
            Expect {
                name: "ka_resets_received_total",
                labels: vec![("netns", &client_ns)],
                shown: "netns=client",
                holds: one,
                wanted: "1",
            },
            Expect {
                name: "ka_resets_sent_total",
                labels: vec![("netns", &b_ns)],
                shown: "netns=backend-b",
                holds: one,
                wanted: "1",
            },
        ],
    )?;

    demo.step(
        4,
        "Backend A never heard of any of it: its socket is still ESTABLISHED — a zombie",
    )?;
    say(
        "   holding memory and a slot in A's connection pool; the agent shows it at risk, keepalive off",
    );
    demo.prove(
        Duration::from_secs(5),
        &[
            Expect {
                name: "ka_connections",
                labels: vec![("netns", &a_ns), ("state", "ESTABLISHED")],
                shown: "netns=backend-a",
                holds: one,
                wanted: "1",
            },
            Expect {
                name: "ka_connections_at_risk",
                labels: vec![("netns", &a_ns), ("reason", "keepalive_disabled")],
                shown: "netns=backend-a",
                holds: one,
                wanted: "1",
            },
        ],
    )?;

    demo.step(
        5,
        "Fix, server side: backend A turns TCP keepalive on (1 s/1 s×3); its probe finds out",
    )?;
    the_fix().apply(&http.backend)?;
    say(
        "   A's probe reaches the client, which has no such connection any more: RST; A's zombie is gone",
    );
    demo.prove(
        Duration::from_secs(10),
        &[
            Expect {
                name: "ka_keepalive_probes_total",
                labels: vec![("netns", &a_ns)],
                shown: "netns=backend-a",
                holds: |v| v >= 0.5,
                wanted: "at least 1",
            },
            Expect {
                name: "ka_connections_closed_total",
                labels: vec![("netns", &a_ns), ("cause", "reset_received")],
                shown: "netns=backend-a",
                holds: one,
                wanted: "1",
            },
            Expect {
                name: "ka_connections",
                labels: vec![("netns", &a_ns), ("state", "ESTABLISHED")],
                shown: "netns=backend-a",
                holds: zero,
                wanted: "0",
            },
        ],
    )?;
    drop(http);

    demo.step(
        6,
        &format!(
            "Fix, client side: keepalive shorter than the LB timeout (1 s < {lb} s) keeps the flow"
        ),
    )?;
    let mut http = open(demo, &listeners, true)?;
    let first = exchange(&mut http)?;
    say(&format!(
        "   GET / → \"{first}\"; now {} s of silence from the application",
        lb + 2
    ));
    demo.world.sleep(Duration::from_secs(lb + 2))?;
    let second = exchange(&mut http).context("the request after the idle period failed")?;
    say(&format!(
        "   GET / → \"{second}\": same backend, no reset; the probes kept the LB's mapping alive"
    ));
    demo.prove(
        Duration::from_secs(5),
        &[
            Expect {
                name: "ka_keepalive_probes_total",
                labels: vec![("netns", &client_ns)],
                shown: "netns=client",
                holds: at_least_two,
                wanted: "at least 2",
            },
            Expect {
                name: "ka_resets_received_total",
                labels: vec![("netns", &client_ns)],
                shown: "netns=client",
                holds: one,
                wanted: "still 1 (from step 3)",
            },
            Expect {
                name: "ka_zombies_total",
                labels: vec![("netns", &client_ns)],
                shown: "netns=client",
                holds: one,
                wanted: "still 1 (from step 3)",
            },
            Expect {
                name: "ka_connections_at_risk",
                labels: vec![("netns", &client_ns)],
                shown: "netns=client",
                holds: zero,
                wanted: "0",
            },
        ],
    )?;
    if first != second {
        bail!("the kept flow moved from \"{first}\" to \"{second}\"");
    }
    say(&format!(
        "\nThe lesson of the seed: keepalive does not keep a connection alive by itself —\n\
         it probes. Probing more often than the middlebox forgets ({lb} s here, 350 s on an\n\
         AWS NLB) keeps the flow; probing at all lets the survivor find its zombie.\n\
         On your own machine: ka-agent audit (who is at risk), ka-agent top (live)."
    ));
    Ok(())
}

/// The request after the idle period: only the client acts (the backend
/// that would answer is the wrong one). Returns what the client saw.
fn exchange_client_only(http: &mut Http) -> String {
    if let Err(e) = http
        .client
        .write_all(b"GET / HTTP/1.1\r\nHost: shop.example\r\n\r\n")
    {
        return e.to_string();
    }
    let mut buf = [0u8; 64];
    match http.client.read(&mut buf) {
        Ok(0) => "connection closed".to_owned(),
        Ok(_) => "an answer (unexpected)".to_owned(),
        Err(e) => e.to_string(),
    }
}
