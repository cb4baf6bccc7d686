//! Pod namespace and name by pod UID, from the Kubernetes API, for the pods
//! of this node only (`fieldSelector=spec.nodeName=<node>`), with the
//! in-cluster service account. One paginated GET per refresh: the whole
//! client is a plain HTTPS request, so no Kubernetes client framework is
//! pulled in for it.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    path::Path,
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Where the kubelet mounts the service account.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Why the API could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("not in a Kubernetes cluster: {0} is not set")]
    NotInCluster(&'static str),
    #[error("cannot read the service account's {what}: {source}")]
    ServiceAccount {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid CA certificate: {0}")]
    Certificate(String),
    #[error("request to the Kubernetes API failed: {0}")]
    Request(String),
    #[error("the Kubernetes API answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("unexpected answer from the Kubernetes API: {0}")]
    Decode(#[from] serde_json::Error),
}

/// A pod's identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// Container names by container id (the id without its `runtime://`).
    #[serde(skip)]
    pub containers: BTreeMap<String, String>,
}

/// The pods of one node, by UID.
pub type PodsByUid = HashMap<String, PodRef>;

#[derive(Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
    #[serde(default)]
    metadata: ListMeta,
}

#[derive(Default, Deserialize)]
struct ListMeta {
    #[serde(rename = "continue", default)]
    continue_token: Option<String>,
}

#[derive(Deserialize)]
struct Pod {
    metadata: PodMeta,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Default, Deserialize)]
struct PodStatus {
    #[serde(rename = "containerStatuses", default)]
    container_statuses: Vec<ContainerStatus>,
    #[serde(rename = "initContainerStatuses", default)]
    init_container_statuses: Vec<ContainerStatus>,
}

#[derive(Deserialize)]
struct ContainerStatus {
    name: String,
    /// `containerd://<id>`, `cri-o://<id>`, `docker://<id>`; absent while
    /// the container is being created.
    #[serde(rename = "containerID", default)]
    container_id: String,
}

#[derive(Deserialize)]
struct PodMeta {
    uid: String,
    namespace: String,
    name: String,
}

/// A client for `GET /api/v1/pods` of one node.
pub struct KubernetesClient {
    base_url: String,
    token: Option<String>,
    node: String,
    agent: ureq::Agent,
}

impl KubernetesClient {
    /// The in-cluster configuration: `KUBERNETES_SERVICE_HOST`/`PORT`, the
    /// service account's token and CA certificate.
    pub fn in_cluster(node: &str) -> Result<Self, KubernetesError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .map_err(|_| KubernetesError::NotInCluster("KUBERNETES_SERVICE_HOST"))?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT")
            .map_err(|_| KubernetesError::NotInCluster("KUBERNETES_SERVICE_PORT"))?;
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        let token = std::fs::read_to_string(dir.join("token")).map_err(|source| {
            KubernetesError::ServiceAccount {
                what: "token",
                source,
            }
        })?;
        let ca = std::fs::read(dir.join("ca.crt")).map_err(|source| {
            KubernetesError::ServiceAccount {
                what: "ca.crt",
                source,
            }
        })?;
        let mut roots = Vec::new();
        for item in ureq::tls::parse_pem(&ca) {
            if let ureq::tls::PemItem::Certificate(cert) =
                item.map_err(|e| KubernetesError::Certificate(e.to_string()))?
            {
                roots.push(cert);
            }
        }
        if roots.is_empty() {
            return Err(KubernetesError::Certificate(
                "no certificate in ca.crt".to_owned(),
            ));
        }
        // An IPv6 service address needs brackets in a URL.
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
            .build();
        Ok(Self {
            base_url: format!("https://{host}:{port}"),
            token: Some(token.trim().to_owned()),
            node: node.to_owned(),
            agent: agent(Some(tls)),
        })
    }

    /// A client for another endpoint (plain HTTP allowed): tests, proxies
    /// (`kubectl proxy`).
    pub fn with_base_url(base_url: &str, token: Option<String>, node: &str) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            token,
            node: node.to_owned(),
            agent: agent(None),
        }
    }

    /// The pods scheduled on this node, by UID (all pages).
    pub fn pods_on_node(&self) -> Result<PodsByUid, KubernetesError> {
        let mut pods = PodsByUid::new();
        let mut continue_token: Option<String> = None;
        loop {
            let mut url = format!(
                "{}/api/v1/pods?fieldSelector=spec.nodeName%3D{}&limit=500",
                self.base_url,
                encode(&self.node)
            );
            if let Some(token) = &continue_token {
                url.push_str("&continue=");
                url.push_str(&encode(token));
            }
            let list = self.get(&url)?;
            for pod in list.items {
                pods.insert(
                    pod.metadata.uid,
                    PodRef {
                        namespace: pod.metadata.namespace,
                        name: pod.metadata.name,
                        containers: pod
                            .status
                            .container_statuses
                            .into_iter()
                            .chain(pod.status.init_container_statuses)
                            .filter_map(|c| {
                                let (_, id) = c.container_id.split_once("://")?;
                                Some((id.to_owned(), c.name))
                            })
                            .collect(),
                    },
                );
            }
            match list.metadata.continue_token {
                Some(token) if !token.is_empty() => continue_token = Some(token),
                _ => return Ok(pods),
            }
        }
    }

    fn get(&self, url: &str) -> Result<PodList, KubernetesError> {
        let mut request = self.agent.get(url).header("Accept", "application/json");
        if let Some(token) = &self.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let mut response = request
            .call()
            .map_err(|e| KubernetesError::Request(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| KubernetesError::Request(e.to_string()))?;
        if status != 200 {
            let body: String = body.chars().take(200).collect();
            return Err(KubernetesError::Status { status, body });
        }
        Ok(serde_json::from_str(&body)?)
    }
}

fn agent(tls: Option<ureq::tls::TlsConfig>) -> ureq::Agent {
    let mut config = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false);
    if let Some(tls) = tls {
        config = config.tls_config(tls);
    }
    config.build().into()
}

/// Percent-encodes a query value (node names and continue tokens are
/// mostly URL-safe, but tokens are base64 with `=`, `+`, `/`).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader, Write},
        net::TcpListener,
        sync::{Arc, Mutex},
    };

    use super::*;

    /// A real API server cannot run here (no cluster, no network): a local
    /// HTTP server answers with responses recorded from a real one
    /// (`kubectl get --raw '/api/v1/pods?fieldSelector=spec.nodeName=node-a&limit=500'`,
    /// trimmed to the fields read), and records the requests it got.
    fn recorded_server(pages: Vec<(u16, String)>) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen_by_server = Arc::clone(&seen);
        std::thread::spawn(move || {
            for (status, body) in pages {
                let Ok((mut stream, _)) = listener.accept() else {
                    return;
                };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push_str(&line);
                }
                seen_by_server.lock().unwrap().push(head);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        (format!("http://{addr}"), seen)
    }

    const PAGE_1: &str = r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"123456","continue":"eyJ2IjoibWV0YS5rOHMuaW8vdjEiLCJydiI6MTIzNDU2LCJzdGFydCI6ImRlZmF1bHQvd2ViLTEifQ=="},
      "items":[{"metadata":{"name":"web-7d4b9c8f6d-x2x9k","generateName":"web-7d4b9c8f6d-","namespace":"default","uid":"5d6f9a3e-1b2c-4d5e-8f9a-0b1c2d3e4f50","resourceVersion":"1000","labels":{"app":"web"}},"spec":{"nodeName":"node-a"},"status":{"phase":"Running","containerStatuses":[{"name":"nginx","containerID":"containerd://4f0c7d3b9e2a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e","ready":true},{"name":"sidecar","ready":false}]}}]}"#;
    const PAGE_2: &str = r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"123456"},
      "items":[{"metadata":{"name":"coredns-5d78c9869d-abcde","namespace":"kube-system","uid":"0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"},"spec":{"nodeName":"node-a"}}]}"#;

    #[test]
    fn lists_the_pods_of_the_node_across_pages() {
        let (url, seen) = recorded_server(vec![(200, PAGE_1.to_owned()), (200, PAGE_2.to_owned())]);
        let client = KubernetesClient::with_base_url(&url, Some("sa-token".to_owned()), "node-a");
        let pods = client.pods_on_node().unwrap();
        assert_eq!(pods.len(), 2);
        assert_eq!(
            pods["5d6f9a3e-1b2c-4d5e-8f9a-0b1c2d3e4f50"],
            PodRef {
                namespace: "default".to_owned(),
                name: "web-7d4b9c8f6d-x2x9k".to_owned(),
                // The sidecar has no container yet: no id to match.
                containers: BTreeMap::from([(
                    "4f0c7d3b9e2a5b6c7d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e".to_owned(),
                    "nginx".to_owned()
                )]),
            }
        );
        assert_eq!(
            pods["0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"].namespace,
            "kube-system"
        );
        let seen = seen.lock().unwrap();
        assert!(
            seen[0].starts_with(
                "GET /api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a&limit=500 HTTP/1.1"
            ),
            "{}",
            seen[0]
        );
        assert!(seen[0].contains("Bearer sa-token"), "{}", seen[0]);
        assert!(seen[1].contains("&continue=eyJ2Ijoib"), "{}", seen[1]);
        assert!(seen[1].contains("%3D%3D"), "{}", seen[1]);
    }

    #[test]
    fn forbidden_is_an_error_with_the_reason() {
        let body = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods is forbidden: User \"system:serviceaccount:ka:ka-agent\" cannot list resource \"pods\" in API group \"\" at the cluster scope","reason":"Forbidden","details":{"kind":"pods"},"code":403}"#;
        let (url, _) = recorded_server(vec![(403, body.to_owned())]);
        let client = KubernetesClient::with_base_url(&url, None, "node-a");
        match client.pods_on_node() {
            Err(KubernetesError::Status { status: 403, body }) => {
                assert!(body.contains("forbidden"), "{body}");
            }
            other => panic!("expected 403, got {other:?}"),
        }
    }

    #[test]
    fn not_in_cluster_without_the_environment() {
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            assert!(matches!(
                KubernetesClient::in_cluster("node-a"),
                Err(KubernetesError::NotInCluster(_))
            ));
        }
    }
}
