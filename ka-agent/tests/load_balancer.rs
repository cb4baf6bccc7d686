//! The seed's scenario: a load balancer that forgets idle flows.
//!
//! client ── lb ── backend A
//!               └─ backend B
//!
//! The load balancer is a namespace doing round-robin DNAT of a virtual IP
//! with nftables; its conntrack forgets established flows after 3 s (the
//! namespace's `nf_conntrack_tcp_timeout_established`). The next packet of
//! a forgotten flow is picked up as new and may go to the other backend,
//! which has no such connection and answers with an RST — what the seed's
//! DSR load balancer does after its 120 s idle timeout.

#![expect(
    clippy::unwrap_used,
    reason = "helpers of tests fail by panicking, with the value in the message"
)]

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use common::{
    Agent, api_json,
    lab::{Netns, SocketOptions, link},
    require_root, wait_api,
};

const VIP: &str = "198.18.30.100:80";
const LB_IDLE_SECS: u32 = 3;

struct World {
    client: Netns,
    _lb: Netns,
    backend_a: Netns,
    backend_b: Netns,
    listener_a: TcpListener,
    _listener_b: TcpListener,
}

fn build(tag: &str) -> World {
    let client = Netns::new(&format!("{tag}c"));
    let lb = Netns::new(&format!("{tag}l"));
    let backend_a = Netns::new(&format!("{tag}a"));
    let backend_b = Netns::new(&format!("{tag}b"));
    link(&client, &["198.18.20.1/24"], &lb, &["198.18.20.254/24"]);
    link(&backend_a, &["198.18.21.2/24"], &lb, &["198.18.21.254/24"]);
    link(&backend_b, &["198.18.22.2/24"], &lb, &["198.18.22.254/24"]);
    client.ip(&["route", "add", "default", "via", "198.18.20.254"]);
    backend_a.ip(&["route", "add", "default", "via", "198.18.21.254"]);
    backend_b.ip(&["route", "add", "default", "via", "198.18.22.254"]);
    lb.sysctl("net.ipv4.ip_forward", "1");
    lb.nft(
        "table ip kalab_lb {\n\
         chain pre {\n\
         type nat hook prerouting priority dstnat;\n\
         ip daddr 198.18.30.100 tcp dport 80 dnat to numgen inc mod 2 map { 0 : 198.18.21.2, 1 : 198.18.22.2 }\n\
         }\n\
         }\n",
    );
    // The load balancer's idle timeout (conntrack is loaded by the NAT rule).
    lb.sysctl(
        "net.netfilter.nf_conntrack_tcp_timeout_established",
        &LB_IDLE_SECS.to_string(),
    );
    let listener_a = backend_a.listen("198.18.21.2:80".parse().unwrap());
    let listener_b = backend_b.listen("198.18.22.2:80".parse().unwrap());
    World {
        client,
        _lb: lb,
        backend_a,
        backend_b,
        listener_a,
        _listener_b: listener_b,
    }
}

/// One request/response on the kept-alive connection.
fn exchange(client: &mut TcpStream, backend: &mut TcpStream) {
    client.write_all(b"GET /").unwrap();
    let mut buf = [0u8; 5];
    backend.read_exact(&mut buf).unwrap();
    backend.write_all(b"200 OK").unwrap();
    let mut buf = [0u8; 6];
    client.read_exact(&mut buf).unwrap();
}

#[test]
fn forgotten_flow_is_reset_after_idle_and_backend_keeps_a_zombie() {
    if !require_root("forgotten_flow_is_reset_after_idle_and_backend_keeps_a_zombie") {
        return;
    }
    let agent = Agent::start(&["--idle-timeout", "3s"]);
    let world = build("lb");
    let cn = world.client.inode().to_string();
    let vip: SocketAddr = VIP.parse().unwrap();
    let mut client = world
        .client
        .connect(vip, &SocketOptions::default())
        .unwrap();
    let (mut backend, _) = world.listener_a.accept().unwrap();
    exchange(&mut client, &mut backend);
    // Idle longer than the load balancer's timeout, then the next request.
    std::thread::sleep(Duration::from_millis(4500));
    client.write_all(b"GET /").unwrap();
    let mut buf = [0u8; 6];
    let error = client.read(&mut buf).unwrap_err();
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionReset,
        "backend B answered with RST"
    );

    let m = agent.wait_metrics(Duration::from_secs(5), "reset_after_idle", |m| {
        m.count(
            "ka_zombies_total",
            &[("netns", &cn), ("kind", "reset_after_idle")],
        ) == 1
            && m.count("ka_connections_closed_total", &[("netns", &cn)]) == 1
    });
    assert_eq!(m.count("ka_resets_received_total", &[("netns", &cn)]), 1);
    assert_eq!(
        m.count(
            "ka_connections_closed_total",
            &[("netns", &cn), ("cause", "reset_received")]
        ),
        1
    );
    // Backend B answered the stray segment with an RST (its kernel names the
    // reason; 6.18 says tcp_flags).
    let bn = world.backend_b.inode().to_string();
    assert_eq!(
        m.count("ka_resets_sent_total", &[("netns", &bn)]),
        1,
        "{}",
        m.text
    );

    // Backend A never heard of any of it: its connection is still
    // ESTABLISHED, idle past the idle timeout with keepalive off.
    let zombie = wait_api(
        &agent,
        "/api/v1/connections?at_risk=true",
        "backend A's connection",
        |c| c["netns"].as_u64() == Some(world.backend_a.inode()),
    );
    assert_eq!(zombie["state"], "ESTABLISHED");
    assert_eq!(zombie["keepalive"]["enabled"], false);
    assert_eq!(zombie["at_risk"][0]["reason"], "keepalive_disabled");
    assert_eq!(zombie["at_risk"][0]["idle_timeout"], "3s");
    let an = world.backend_a.inode().to_string();
    let m = agent.metrics();
    assert_eq!(
        m.count(
            "ka_connections_at_risk",
            &[("netns", &an), ("reason", "keepalive_disabled")]
        ),
        1
    );
    drop(backend);
}

#[test]
fn backend_keepalive_clears_the_zombie_the_load_balancer_left() {
    if !require_root("backend_keepalive_clears_the_zombie_the_load_balancer_left") {
        return;
    }
    let agent = Agent::start(&["--idle-timeout", "3s"]);
    let world = build("lk");
    let an = world.backend_a.inode().to_string();
    let vip: SocketAddr = VIP.parse().unwrap();
    let mut client = world
        .client
        .connect(vip, &SocketOptions::default())
        .unwrap();
    let (mut backend, _) = world.listener_a.accept().unwrap();
    // Keepalive slower than the load balancer's timeout: it does not keep
    // the flow, but it finds out the flow is gone.
    common::lab::enable_keepalive(&backend, 5, 1, 2);
    exchange(&mut client, &mut backend);
    std::thread::sleep(Duration::from_millis(4500));
    client.write_all(b"GET /").unwrap();
    let mut buf = [0u8; 6];
    assert!(client.read(&mut buf).is_err());
    // A's first probe reaches the client, which has no such connection any
    // more and resets it.
    let m = agent.wait_metrics(
        Duration::from_secs(10),
        "backend A's connection cleared",
        |m| m.count("ka_connections_closed_total", &[("netns", &an)]) == 1,
    );
    assert!(m.count("ka_keepalive_probes_total", &[("netns", &an)]) >= 1);
    assert_eq!(
        m.count(
            "ka_connections_closed_total",
            &[("netns", &an), ("cause", "reset_received")]
        ),
        1,
        "{}",
        m.text
    );
    let closed = wait_api(&agent, "/api/v1/closed", "backend A's death", |c| {
        c["netns"].as_u64() == Some(world.backend_a.inode())
    });
    assert_eq!(closed["cause"], "reset_received");
    let open = api_json(&agent, "/api/v1/connections?port=80");
    assert!(
        !open["connections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["netns"].as_u64() == Some(world.backend_a.inode())),
        "{open}"
    );
}

#[test]
fn keepalive_shorter_than_the_idle_timeout_keeps_the_flow() {
    if !require_root("keepalive_shorter_than_the_idle_timeout_keeps_the_flow") {
        return;
    }
    let agent = Agent::start(&["--idle-timeout", "3s"]);
    let world = build("lr");
    let cn = world.client.inode().to_string();
    let vip: SocketAddr = VIP.parse().unwrap();
    // The seed's remedy: probe more often than the load balancer forgets.
    let options = SocketOptions {
        keepalive: Some((1, 1, 3)),
        user_timeout_ms: None,
    };
    let mut client = world.client.connect(vip, &options).unwrap();
    let (mut backend, _) = world.listener_a.accept().unwrap();
    exchange(&mut client, &mut backend);
    std::thread::sleep(Duration::from_millis(4500));
    exchange(&mut client, &mut backend); // still reaches backend A
    let m = agent.wait_metrics(Duration::from_secs(5), "probes counted", |m| {
        m.count("ka_keepalive_probes_total", &[("netns", &cn)]) >= 3
    });
    assert_eq!(m.count("ka_resets_received_total", &[("netns", &cn)]), 0);
    assert_eq!(m.count("ka_zombies_total", &[("netns", &cn)]), 0);
    let an = world.backend_a.inode().to_string();
    assert_eq!(m.count("ka_zombies_total", &[("netns", &an)]), 0);
    assert_eq!(m.count("ka_connections_at_risk", &[("netns", &cn)]), 0);
}
