//! Real-network tests of the lab itself (root; skipped loudly otherwise).
#![expect(clippy::unwrap_used, reason = "tests fail by panicking")]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ka_lab::{ConnectOpts, Counters, Lab, Netns, tcp_connect, tcp_listen, wait_until};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn connect_opts() -> ConnectOpts {
    ConnectOpts::new().connect_timeout(Duration::from_secs(3))
}

/// Connects from `from` to `listener` at `addr`, sends a line both ways.
fn echo_roundtrip(from: &Netns, listener: &TcpListener, addr: SocketAddr) {
    let mut conn = tcp_connect(from, addr, &connect_opts()).unwrap();
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let (mut peer, peer_addr) = listener.accept().unwrap();
    peer.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    assert_eq!(peer_addr, conn.local_addr().unwrap());
    conn.write_all(b"ping\n").unwrap();
    let mut buf = [0u8; 5];
    peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping\n");
    peer.write_all(&buf).unwrap();
    let mut back = [0u8; 5];
    conn.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping\n");
}

#[test]
fn two_namespaces_ipv4_and_ipv6_echo() {
    if !ka_lab::require_root("two_namespaces_ipv4_and_ipv6_echo") {
        return;
    }
    let lab = Lab::new("echo").unwrap();
    let client = lab.netns("client").unwrap();
    let server = lab.netns("server").unwrap();
    let link = lab.link(&client, &server).unwrap();
    assert!(link.a.ifname.len() <= 15 && link.b.ifname.len() <= 15);
    assert_eq!(link.a.v4.octets()[..2], [198, 18]);
    assert_eq!(link.b.v6.segments()[..2], [0x2001, 0xdb8]);
    assert_ne!(client.inode().unwrap(), server.inode().unwrap());

    for addr in [link.b.sock_v4(0), link.b.sock_v6(0)] {
        let listener = tcp_listen(&server, addr).unwrap();
        let addr = listener.local_addr().unwrap();
        echo_roundtrip(&client, &listener, addr);
    }

    // The listener lives in the server namespace: not reachable from the
    // client's own loopback.
    let listener = tcp_listen(&server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();
    let err = tcp_connect(
        &client,
        SocketAddr::from(([127, 0, 0, 1], port)),
        &connect_opts(),
    )
    .unwrap_err();
    assert_eq!(err.io_kind(), Some(ErrorKind::ConnectionRefused), "{err}");
}

#[test]
fn inode_matches_the_kernel_view() {
    if !ka_lab::require_root("inode_matches_the_kernel_view") {
        return;
    }
    let lab = Lab::new("inode").unwrap();
    let ns = lab.netns("a").unwrap();
    let inside = ns
        .run_in(|| std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino()))
        .unwrap()
        .unwrap();
    assert_eq!(ns.inode().unwrap(), inside);
    let host = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
    assert_ne!(host, inside);
}

#[test]
fn nft_drop_makes_connect_time_out() {
    if !ka_lab::require_root("nft_drop_makes_connect_time_out") {
        return;
    }
    let lab = Lab::new("drop").unwrap();
    let client = lab.netns("client").unwrap();
    let server = lab.netns("server").unwrap();
    let link = lab.link(&client, &server).unwrap();
    let listener = tcp_listen(&server, link.b.sock_v4(0)).unwrap();
    let addr = listener.local_addr().unwrap();
    server.drop_all_tcp().unwrap();

    let start = Instant::now();
    let opts = ConnectOpts::new().connect_timeout(Duration::from_millis(700));
    let err = tcp_connect(&client, addr, &opts).unwrap_err();
    assert_eq!(err.io_kind(), Some(ErrorKind::TimedOut), "{err}");
    assert!(start.elapsed() >= Duration::from_millis(600));

    // Flushing the rules restores connectivity.
    server.flush_nft().unwrap();
    echo_roundtrip(&client, &listener, addr);
}

#[test]
fn reject_with_reset_refuses_connect() {
    if !ka_lab::require_root("reject_with_reset_refuses_connect") {
        return;
    }
    let lab = Lab::new("rst").unwrap();
    let client = lab.netns("client").unwrap();
    let server = lab.netns("server").unwrap();
    let link = lab.link(&client, &server).unwrap();
    for bind in [link.b.sock_v4(0), link.b.sock_v6(0)] {
        let listener = tcp_listen(&server, bind).unwrap();
        let addr = listener.local_addr().unwrap();
        server.reject_tcp_with_reset(addr.port()).unwrap();
        let err = tcp_connect(&client, addr, &connect_opts()).unwrap_err();
        assert_eq!(err.io_kind(), Some(ErrorKind::ConnectionRefused), "{err}");
        assert_eq!(err.raw_os_error(), Some(libc::ECONNREFUSED));
        server.flush_nft().unwrap();
        echo_roundtrip(&client, &listener, addr);
    }
    // Arbitrary rulesets load too.
    server
        .nft("table inet custom {\n chain c { type filter hook input priority 0; }\n}\n")
        .unwrap();
    assert!(
        server
            .output(server.command("nft").args(["list", "tables"]))
            .unwrap()
            .contains("custom")
    );
}

#[test]
fn netstat_counters_move() {
    if !ka_lab::require_root("netstat_counters_move") {
        return;
    }
    let lab = Lab::new("count").unwrap();
    let client = lab.netns("client").unwrap();
    let server = lab.netns("server").unwrap();
    let link = lab.link(&client, &server).unwrap();

    // A SYN to a closed port: the server's kernel answers with a reset.
    let s0 = server.netstat().unwrap();
    let c0 = client.netstat().unwrap();
    assert!(s0.get("Tcp.OutRsts").is_some());
    assert!(s0.get("TcpExt.TCPKeepAlive").is_some());
    let err = tcp_connect(&client, link.b.sock_v4(9), &connect_opts()).unwrap_err();
    assert_eq!(err.io_kind(), Some(ErrorKind::ConnectionRefused), "{err}");
    let s1 = server.netstat().unwrap();
    let c1 = client.netstat().unwrap();
    let ds = Counters::delta(&s0, &s1);
    let dc = Counters::delta(&c0, &c1);
    assert_eq!(
        ds.value("Tcp.OutRsts"),
        1,
        "server delta:\n{}",
        ds.nonzero()
    );
    assert_eq!(
        dc.value("Tcp.AttemptFails"),
        1,
        "client delta:\n{}",
        dc.nonzero()
    );
    assert_eq!(
        dc.value("Tcp.OutRsts"),
        0,
        "client delta:\n{}",
        dc.nonzero()
    );

    // Keepalive against a peer that went silent: probes, then an abort.
    let listener = tcp_listen(&server, link.b.sock_v4(0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let opts = connect_opts().keepalive(Duration::from_secs(1), Duration::from_secs(1), 2);
    let mut conn = tcp_connect(&client, addr, &opts).unwrap();
    let (_peer, _) = listener.accept().unwrap();
    let c0 = client.netstat().unwrap();
    server.drop_all_tcp().unwrap();
    let aborted = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let c = client.netstat().unwrap();
        Counters::delta(&c0, &c).value("TcpExt.TCPAbortOnTimeout") >= 1
    });
    let dc = Counters::delta(&c0, &client.netstat().unwrap());
    assert!(aborted, "client delta:\n{}", dc.nonzero());
    assert_eq!(dc.value("TcpExt.TCPKeepAlive"), 2, "{}", dc.nonzero());
    assert_eq!(dc.value("TcpExt.TCPAbortOnTimeout"), 1, "{}", dc.nonzero());
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let err = conn.read(&mut [0u8; 1]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "{err}");
}

fn gone(names: &[String]) -> bool {
    names
        .iter()
        .all(|n| !Path::new("/run/netns").join(n).exists())
}

fn pid_gone(pid: u32) -> bool {
    !Path::new("/proc").join(pid.to_string()).exists()
}

#[test]
fn lab_drop_removes_namespaces_links_and_processes() {
    if !ka_lab::require_root("lab_drop_removes_namespaces_links_and_processes") {
        return;
    }
    let lab = Lab::new("drop").unwrap();
    let a = lab.netns("a").unwrap();
    let b = lab.netns("b").unwrap();
    let link = lab.link(&a, &b).unwrap();
    let names = lab.namespaces();
    assert_eq!(names.len(), 2);
    assert!(!gone(&names));
    assert!(a.ip(&["link", "show", &link.a.ifname]).is_ok());

    // A guard dropped before the lab kills its process...
    let early = a.spawn(a.command("sleep").arg("1000")).unwrap();
    let early_pid = early.id();
    assert!(early.try_wait().unwrap().is_none());
    drop(early);
    assert!(pid_gone(early_pid));
    // ...and the lab kills what is still running when it drops.
    let late = b.spawn(b.command("sleep").arg("1000")).unwrap();
    let late_pid = late.id();
    std::mem::forget(late);
    a.drop_all_tcp().unwrap();
    drop(lab);
    assert!(gone(&names), "{names:?}");
    assert!(pid_gone(late_pid));
}

#[test]
fn lab_drop_cleans_up_after_a_panic() {
    if !ka_lab::require_root("lab_drop_cleans_up_after_a_panic") {
        return;
    }
    let names = std::sync::Mutex::new(Vec::new());
    let pid = std::sync::Mutex::new(0);
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::new("panic").unwrap();
        let a = lab.netns("a").unwrap();
        let b = lab.netns("b").unwrap();
        lab.link(&a, &b).unwrap();
        let child = a.spawn(a.command("sleep").arg("1000")).unwrap();
        *pid.lock().unwrap() = child.id();
        names.lock().unwrap().extend(lab.namespaces());
        panic!("scenario failed");
    });
    assert!(result.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 2);
    assert!(gone(&names), "{names:?}");
    assert!(pid_gone(pid.into_inner().unwrap()));
}

#[test]
fn cleanup_stale_removes_namespaces_of_dead_runs_only() {
    if !ka_lab::require_root("cleanup_stale_removes_namespaces_of_dead_runs_only") {
        return;
    }
    // A pid that existed and is gone.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = format!("kalabtest-{dead}-0-x-y");
    let live = format!("kalabtest-{}-0-x-y", std::process::id());
    for n in [&stale, &live] {
        assert!(
            Command::new("ip")
                .args(["netns", "add", n])
                .status()
                .unwrap()
                .success()
        );
    }
    let removed = ka_lab::cleanup_stale("kalabtest-");
    let live_exists = Path::new("/run/netns").join(&live).exists();
    let _ = Command::new("ip").args(["netns", "del", &live]).status();
    let _ = Command::new("ip")
        .args(["netns", "del", &stale])
        .stderr(std::process::Stdio::null())
        .status();
    let removed = removed.unwrap();
    assert!(removed.contains(&stale), "{removed:?}");
    assert!(!removed.contains(&live), "{removed:?}");
    assert!(live_exists);
}

#[test]
fn three_namespaces_routed_through_a_router() {
    if !ka_lab::require_root("three_namespaces_routed_through_a_router") {
        return;
    }
    let lab = Lab::new("route").unwrap();
    let client = lab.netns("client").unwrap();
    let router = lab.netns("router").unwrap();
    let server = lab.netns("server").unwrap();
    let front = lab.link(&client, &router).unwrap();
    let back = lab.link(&router, &server).unwrap();
    assert_ne!(front.v4_subnet(), back.v4_subnet());
    router.enable_forwarding().unwrap();
    assert_eq!(router.sysctl_get("net.ipv4.ip_forward").unwrap(), "1");
    client
        .route_add(&back.v4_subnet(), front.b.v4.into())
        .unwrap();
    client
        .route_add(&back.v6_subnet(), front.b.v6.into())
        .unwrap();
    server.route_add("default", back.a.v4.into()).unwrap();
    server.route_add("default", back.a.v6.into()).unwrap();

    // Per-namespace sysctls.
    client.sysctl("net.ipv4.tcp_keepalive_time", "17").unwrap();
    assert_eq!(
        client.sysctl_get("net.ipv4.tcp_keepalive_time").unwrap(),
        "17"
    );
    assert_ne!(
        server.sysctl_get("net.ipv4.tcp_keepalive_time").unwrap(),
        "17"
    );

    for bind in [back.b.sock_v4(0), back.b.sock_v6(0)] {
        let listener = tcp_listen(&server, bind).unwrap();
        let addr = listener.local_addr().unwrap();
        echo_roundtrip(&client, &listener, addr);
    }

    // A process spawned in the client reaches the server too.
    let out = client
        .output(
            client
                .command("ip")
                .args(["-4", "route", "get", &back.b.v4.to_string()]),
        )
        .unwrap();
    assert!(out.contains(&format!("via {}", front.b.v4)), "{out}");

    // Without forwarding the router stops passing traffic.
    router.sysctl("net.ipv4.ip_forward", "0").unwrap();
    let listener = tcp_listen(&server, back.b.sock_v4(0)).unwrap();
    let opts = ConnectOpts::new().connect_timeout(Duration::from_millis(500));
    let err = tcp_connect(&client, listener.local_addr().unwrap(), &opts).unwrap_err();
    assert!(
        matches!(
            err.io_kind(),
            Some(ErrorKind::TimedOut | ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable)
        ),
        "{err}"
    );
}
