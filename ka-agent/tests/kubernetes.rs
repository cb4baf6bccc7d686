//! Pod labels end to end: a process in a cgroup laid out as the kubelet's
//! systemd driver lays out a container's, holding a real connection; the
//! agent in its in-cluster configuration (service address in the
//! environment, service account token and CA certificate in their files)
//! lists this node's pods over TLS and labels the connection's series
//! with the pod's namespace, name and container. A connect the process
//! makes afterwards, refused at once, carries the pod's labels too: no
//! inventory sees such a connection, the kernel program names its process.
//!
//! The API server is the one fake: no Kubernetes API server can run on
//! this machine, so a python3 HTTPS server with a CA made for the test
//! answers the pod list with a recorded `PodList` (the format of the
//! unit tests' recorded responses). Everything else is real: cgroup v2,
//! `/proc/<pid>/cgroup`, the socket inventory, TLS verification.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "helpers of tests fail by panicking, with the value in the message"
)]

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use common::{
    Agent,
    lab::{ChildGuard, require_program},
    require_root,
};

const NODE: &str = "node-a";
const POD_UID: &str = "7c0e2a4d-3f1b-4c5d-9e8f-0a1b2c3d4e5f";
const CONTAINER_ID: &str = "9d1f4b2c6e8a0b3d5f7e9c1a2b4d6f8e0a1c3e5b7d9f1a3c5e7b9d1f3a5c7e9b";
const TOKEN: &str = "ka-test-token";

/// Where the agent reads its service account (`attribution::kubernetes`).
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The answer to this node's pod list.
fn pod_list() -> String {
    format!(
        r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{"resourceVersion":"1"}},"items":[{{"metadata":{{"name":"cart-0","namespace":"shop","uid":"{POD_UID}"}},"spec":{{"nodeName":"{NODE}"}},"status":{{"phase":"Running","containerStatuses":[{{"name":"app","containerID":"containerd://{CONTAINER_ID}","ready":true}}]}}}}]}}"#
    )
}

/// Answers GET /api/v1/pods for this node with the bearer token, 403
/// otherwise; prints its port.
const FAKE_API_PY: &str = r#"
import http.server, ssl, sys
body = open(sys.argv[3], 'rb').read()
class Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = (self.path.startswith('/api/v1/pods?')
              and 'spec.nodeName%3Dnode-a' in self.path
              and self.headers.get('Authorization') == 'Bearer ka-test-token')
        payload = body if ok else b'{"kind":"Status","code":403}'
        self.send_response(200 if ok else 403)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(('127.0.0.1', 0), Api)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(sys.argv[1], sys.argv[2])
server.socket = context.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// Waits for "go", connects, says "ready", holds the connection until its
/// input closes; meanwhile connects to each port it is sent a line with,
/// and says whether it was refused.
const CONTAINER_PY: &str = r"
import socket, sys
sys.stdin.readline()
connection = socket.create_connection(('127.0.0.1', int(sys.argv[1])))
print('ready', flush=True)
for line in sys.stdin:
    try:
        socket.create_connection(('127.0.0.1', int(line))).close()
        print('connected', flush=True)
    except ConnectionRefusedError:
        print('refused', flush=True)
";

/// A directory tree removed on drop, deepest first; `rmdir` for cgroups
/// (their files cannot be removed), `remove_dir_all` otherwise.
struct CreatedDirs {
    dirs: Vec<PathBuf>,
    cgroup: bool,
}

impl Container {
    /// Has the process connect to `port`; what it says of it.
    fn connect_to(&mut self, port: u16) -> String {
        writeln!(self.process.0.stdin.as_mut().unwrap(), "{port}").unwrap();
        let mut said = String::new();
        self.said.read_line(&mut said).unwrap();
        said.trim().to_owned()
    }
}

impl Drop for CreatedDirs {
    fn drop(&mut self) {
        for dir in self.dirs.iter().rev() {
            if self.cgroup {
                // A killed process leaves its cgroup a moment later.
                for _ in 0..50 {
                    if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            } else {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

fn run_ok(command: &mut Command) {
    let output = command.output().expect("spawn");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, and a certificate for 127.0.0.1 it signed.
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run_ok(
        Command::new("openssl")
            .current_dir(dir)
            .args(["req", "-x509"])
            .args(ec)
            .args(["-keyout", "ca.key", "-out", "ca.crt", "-days", "1"])
            .args(["-subj", "/CN=ka-test-ca"]),
    );
    run_ok(
        Command::new("openssl")
            .current_dir(dir)
            .arg("req")
            .args(ec)
            .args(["-keyout", "server.key", "-out", "server.csr"])
            .args(["-subj", "/CN=127.0.0.1"]),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run_ok(
        Command::new("openssl")
            .current_dir(dir)
            .args(["x509", "-req", "-in", "server.csr", "-CA", "ca.crt"])
            .args(["-CAkey", "ca.key", "-CAcreateserial", "-out", "server.crt"])
            .args(["-days", "1", "-extfile", "server.ext"]),
    );
}

/// Where the unified (v2) cgroup hierarchy is mounted: `/sys/fs/cgroup`,
/// or `/sys/fs/cgroup/unified` on a hybrid setup.
fn unified_hierarchy() -> PathBuf {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .expect("a cgroup2 mount (the unified hierarchy)")
}

/// A process in the container's cgroup, connected to a local port.
struct Container {
    process: ChildGuard,
    said: BufReader<std::process::ChildStdout>,
    port: u16,
    _accepted: std::net::TcpStream,
    /// Kept listening: the inventory tells each end's direction by the
    /// listener (both ports are ephemeral, which alone says nothing).
    _server: TcpListener,
}

fn container_connected(cgroup: &Path) -> Container {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let mut process = ChildGuard(
        Command::new("python3")
            .arg("-c")
            .arg(CONTAINER_PY)
            .arg(port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3"),
    );
    std::fs::write(cgroup.join("cgroup.procs"), process.0.id().to_string()).unwrap();
    writeln!(process.0.stdin.as_mut().unwrap(), "go").unwrap();
    let mut said = BufReader::new(process.0.stdout.take().unwrap());
    let mut ready = String::new();
    said.read_line(&mut ready).unwrap();
    assert_eq!(ready.trim(), "ready");
    let (accepted, _) = server.accept().unwrap();
    Container {
        process,
        said,
        port,
        _accepted: accepted,
        _server: server,
    }
}

/// The fake API server's process and port.
fn fake_api(work: &Path) -> (ChildGuard, String) {
    let mut api = ChildGuard(
        Command::new("python3")
            .arg("-c")
            .arg(FAKE_API_PY)
            .arg(work.join("server.crt"))
            .arg(work.join("server.key"))
            .arg(work.join("pods.json"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3"),
    );
    let mut port = String::new();
    BufReader::new(api.0.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let port = port.trim().to_owned();
    assert!(port.parse::<u16>().is_ok(), "fake API: {port:?}");
    (api, port)
}

#[test]
fn a_pods_connections_carry_its_namespace_pod_and_container() {
    const TEST: &str = "a_pods_connections_carry_its_namespace_pod_and_container";
    if !require_root(TEST) {
        return;
    }
    let (Some(_), Some(_)) = (
        require_program("openssl", TEST),
        require_program("python3", TEST),
    ) else {
        return;
    };
    let hierarchy = unified_hierarchy();
    // On a real Kubernetes node the service account is the pod's own: never
    // overwrite it.
    let secrets = Path::new("/var/run/secrets");
    assert!(
        !secrets.exists(),
        "{TEST}: {} exists (a Kubernetes pod?): not touching it",
        secrets.display()
    );

    let work = std::env::temp_dir().join(format!("ka-kubernetes-test-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let _work = CreatedDirs {
        dirs: vec![work.clone()],
        cgroup: false,
    };
    certificates(&work);
    std::fs::write(work.join("pods.json"), pod_list()).unwrap();

    let _secrets = CreatedDirs {
        dirs: vec![secrets.to_owned()],
        cgroup: false,
    };
    std::fs::create_dir_all(SERVICE_ACCOUNT_DIR).unwrap();
    let account = Path::new(SERVICE_ACCOUNT_DIR);
    std::fs::write(account.join("token"), TOKEN).unwrap();
    std::fs::copy(work.join("ca.crt"), account.join("ca.crt")).unwrap();
    std::fs::write(account.join("namespace"), "ka-system").unwrap();

    let (_api, api_port) = fake_api(&work);

    // The kubelet's systemd-driver layout, under a parent of the test's own.
    let parent = hierarchy.join(format!("ka-test-{}", std::process::id()));
    let pod = parent.join(format!(
        "kubepods-besteffort-pod{}.slice",
        POD_UID.replace('-', "_")
    ));
    let container = pod.join(format!("cri-containerd-{CONTAINER_ID}.scope"));
    let _cgroups = CreatedDirs {
        dirs: vec![parent.clone(), pod.clone(), container.clone()],
        cgroup: true,
    };
    std::fs::create_dir_all(&container).unwrap();
    let mut connected = container_connected(&container);

    let agent = Agent::start_via(
        &[],
        &[
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
            ("KUBERNETES_SERVICE_PORT", &api_port),
        ],
        &["--node-name", NODE],
    );
    let port = connected.port.to_string();
    let m = agent.wait_metrics(
        Duration::from_secs(30),
        "the pod's connection labelled with its pod",
        |m| {
            m.count(
                "ka_connections",
                &[
                    ("namespace", "shop"),
                    ("pod", "cart-0"),
                    ("container", "app"),
                    ("direction", "outbound"),
                    ("port", &port),
                ],
            ) == 1
        },
    );
    assert_eq!(m.count("ka_pod_list_failures_total", &[]), 0, "{}", m.text);
    // The server's end belongs to no pod: empty pod labels.
    assert_eq!(
        m.count(
            "ka_connections",
            &[("pod", ""), ("direction", "inbound"), ("port", &port)]
        ),
        1,
        "{}",
        m.text
    );
    let (code, body) = agent.get("/api/v1/connections");
    assert_eq!(code, 200);
    assert!(
        body.contains("\"cart-0\"") && body.contains("\"shop\""),
        "{body}"
    );
    a_refused_connect_is_labelled_with_its_pod(&agent, &mut connected);
    drop(agent);
    // Killed before its cgroup is removed (the guards drop in reverse).
    drop(connected.process);
}

/// A connect refused within microseconds, which no inventory can see: the
/// kernel program names its process, whose cgroup gives the pod.
fn a_refused_connect_is_labelled_with_its_pod(agent: &Agent, container: &mut Container) {
    let refusing = TcpListener::bind("127.0.0.1:0").unwrap();
    let refused_port = refusing.local_addr().unwrap().port();
    drop(refusing);
    assert_eq!(container.connect_to(refused_port), "refused");
    let refused_port = refused_port.to_string();
    let pod_of_refused = [
        ("namespace", "shop"),
        ("pod", "cart-0"),
        ("container", "app"),
        ("comm", "python3"),
        ("direction", "outbound"),
        ("port", refused_port.as_str()),
    ];
    let m = agent.wait_metrics(
        Duration::from_secs(10),
        "the refused connect labelled with its pod",
        |m| m.count("ka_connections_closed_total", &pod_of_refused) == 1,
    );
    assert_eq!(
        m.count("ka_connections_closed_total", &[("port", &refused_port)]),
        1,
        "{}",
        m.text
    );
}
