//! cgroup path → container runtime, container id, Kubernetes pod UID.
//!
//! The path encodes them for every common setup: the kubelet's systemd
//! driver (`kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope`)
//! and cgroupfs driver (`/kubepods/besteffort/pod<uid>/<id>`), containerd,
//! CRI-O, Docker and Podman, cgroup v1 (one line per hierarchy) and v2
//! (`0::/path`), nested (kind, Docker in Docker).

use serde::Serialize;

/// Who runs the container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    Podman,
    /// A bare id under a kubepods pod cgroup (cgroupfs driver): the runtime
    /// is not named in the path.
    Unknown,
}

/// What a cgroup path tells about the workload of a process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Workload {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Kubernetes pod UID, with dashes (systemd slices write `_`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

impl Workload {
    pub fn is_container(&self) -> bool {
        self.container_id.is_some()
    }
}

/// Parses the text of `/proc/<pid>/cgroup`. With cgroup v1 the most telling
/// hierarchy wins (one naming a container, then one naming a pod).
pub fn parse_proc_cgroup(text: &str) -> Workload {
    let mut best = Workload::default();
    for line in text.lines() {
        // hierarchy-ID:controller-list:cgroup-path; the path may contain ':'.
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let workload = parse_cgroup_path(path);
        let score =
            |w: &Workload| u8::from(w.container_id.is_some()) * 2 + u8::from(w.pod_uid.is_some());
        if score(&workload) > score(&best) {
            best = workload;
        }
    }
    best
}

/// Parses one cgroup path. The innermost container id wins (nested setups
/// such as kind put the node's own container id first).
pub fn parse_cgroup_path(path: &str) -> Workload {
    let mut workload = Workload::default();
    let mut inside_pod = false;
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        if let Some(uid) = pod_uid(segment) {
            workload.pod_uid = Some(uid);
            inside_pod = true;
            workload.runtime = None;
            workload.container_id = None;
            continue;
        }
        if let Some((runtime, id)) = container(segment, inside_pod) {
            workload.runtime = Some(runtime);
            workload.container_id = Some(id);
        }
    }
    workload
}

/// `pod<uid>` (cgroupfs) or `...-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".slice").unwrap_or(segment);
    let start = if name.starts_with("pod") {
        0
    } else {
        name.rfind("-pod")? + 1
    };
    // `-pod` inside a slice name only means a pod under the kubepods tree.
    if start != 0 && !name.contains("kubepods") {
        return None;
    }
    let uid = name[start..].strip_prefix("pod")?;
    let uid = uid.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

/// 8-4-4-4-12 hexadecimal digits.
fn is_uid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_container_id(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A container scope or directory: `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `docker-<id>.scope`, `libpod-<id>.scope`, or a bare
/// 64-hex id (`/docker/<id>`, cgroupfs pods, `crio-<id>` directories).
fn container(segment: &str, inside_pod: bool) -> Option<(Runtime, String)> {
    const PREFIXES: [(&str, Runtime); 5] = [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
        ("libpod-", Runtime::Podman),
        ("containerd-", Runtime::Containerd),
    ];
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    for (prefix, runtime) in PREFIXES {
        if let Some(id) = name.strip_prefix(prefix)
            && is_container_id(id)
        {
            return Some((runtime, id.to_owned()));
        }
    }
    if is_container_id(name) {
        let runtime = if inside_pod {
            Runtime::Unknown
        } else {
            Runtime::Docker
        };
        return Some((runtime, name.to_owned()));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0f3c2c5e8d6a4b1e9f7a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7a";
    const ID2: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    const UID: &str = "5d6f9a3e-1b2c-4d5e-8f9a-0b1c2d3e4f50";

    fn w(runtime: Option<Runtime>, id: Option<&str>, pod: Option<&str>) -> Workload {
        Workload {
            runtime,
            container_id: id.map(str::to_owned),
            pod_uid: pod.map(str::to_owned),
        }
    }

    /// Paths as they appear on real nodes (ids replaced by `ID`/`UID`).
    #[test]
    #[expect(
        clippy::too_many_lines,
        reason = "one fixture per line reads best as one table"
    )]
    fn real_world_paths() {
        let uid_ = UID.replace('-', "_");
        let cases: Vec<(String, Workload)> = vec![
            // containerd, systemd driver, cgroup v2 (GKE, EKS AL2023, kubeadm).
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                w(Some(Runtime::Containerd), Some(ID), Some(UID)),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                w(Some(Runtime::Containerd), Some(ID), Some(UID)),
            ),
            // Guaranteed QoS: no QoS slice.
            (
                format!("/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope"),
                w(Some(Runtime::Containerd), Some(ID), Some(UID)),
            ),
            // containerd, cgroupfs driver (k3s, older EKS), v1 and v2.
            (
                format!("/kubepods/besteffort/pod{UID}/{ID}"),
                w(Some(Runtime::Unknown), Some(ID), Some(UID)),
            ),
            (
                format!("/kubepods/pod{UID}/{ID}"),
                w(Some(Runtime::Unknown), Some(ID), Some(UID)),
            ),
            (
                format!("/kubepods/burstable/pod{UID}/{ID}"),
                w(Some(Runtime::Unknown), Some(ID), Some(UID)),
            ),
            // CRI-O, systemd driver (OpenShift).
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/crio-{ID}.scope"
                ),
                w(Some(Runtime::CriO), Some(ID), Some(UID)),
            ),
            // CRI-O's conmon monitor is not the container.
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/crio-conmon-{ID}.scope"
                ),
                w(None, None, Some(UID)),
            ),
            // CRI-O, cgroupfs driver.
            (
                format!("/kubepods/burstable/pod{UID}/crio-{ID}"),
                w(Some(Runtime::CriO), Some(ID), Some(UID)),
            ),
            // Docker (dockershim / cri-dockerd), systemd driver.
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/docker-{ID}.scope"
                ),
                w(Some(Runtime::Docker), Some(ID), Some(UID)),
            ),
            // Plain Docker: systemd driver (v2) and cgroupfs driver (v1).
            (
                format!("/system.slice/docker-{ID}.scope"),
                w(Some(Runtime::Docker), Some(ID), None),
            ),
            (
                format!("/docker/{ID}"),
                w(Some(Runtime::Docker), Some(ID), None),
            ),
            // Podman, rootful and rootless.
            (
                format!("/machine.slice/libpod-{ID}.scope/container"),
                w(Some(Runtime::Podman), Some(ID), None),
            ),
            (
                format!(
                    "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"
                ),
                w(Some(Runtime::Podman), Some(ID), None),
            ),
            // kind: the node is a Docker container, the pod inside it.
            (
                format!(
                    "/docker/{ID2}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                w(Some(Runtime::Containerd), Some(ID), Some(UID)),
            ),
            // The pod's sandbox-level cgroup itself (pause process parent).
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice"
                ),
                w(None, None, Some(UID)),
            ),
            // Host processes.
            ("/system.slice/sshd.service".to_owned(), w(None, None, None)),
            (
                "/user.slice/user-0.slice/session-3.scope".to_owned(),
                w(None, None, None),
            ),
            ("/".to_owned(), w(None, None, None)),
            ("/init.scope".to_owned(), w(None, None, None)),
            // Not ids: wrong length, upper case, a pod-like word.
            (
                "/system.slice/docker-abc.scope".to_owned(),
                w(None, None, None),
            ),
            (
                "/system.slice/podman.service".to_owned(),
                w(None, None, None),
            ),
            (
                "/system.slice/pod-something.slice".to_owned(),
                w(None, None, None),
            ),
        ];
        for (path, want) in cases {
            assert_eq!(parse_cgroup_path(&path), want, "{path}");
        }
    }

    #[test]
    fn proc_cgroup_v2() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope\n",
            UID.replace('-', "_")
        );
        assert_eq!(
            parse_proc_cgroup(&text),
            w(Some(Runtime::Containerd), Some(ID), Some(UID))
        );
    }

    #[test]
    fn proc_cgroup_v1_picks_the_telling_hierarchy() {
        let text = format!(
            "12:pids:/kubepods/besteffort/pod{UID}/{ID}\n\
             11:hugetlb:/kubepods/besteffort/pod{UID}/{ID}\n\
             10:net_cls,net_prio:/kubepods/besteffort/pod{UID}/{ID}\n\
             5:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/besteffort/pod{UID}/{ID}\n\
             0::/\n"
        );
        assert_eq!(
            parse_proc_cgroup(&text),
            w(Some(Runtime::Unknown), Some(ID), Some(UID))
        );
        let docker_v1 = format!(
            "4:memory:/docker/{ID}\n1:name=systemd:/docker/{ID}\n0::/system.slice/docker.service\n"
        );
        assert_eq!(
            parse_proc_cgroup(&docker_v1),
            w(Some(Runtime::Docker), Some(ID), None)
        );
        assert_eq!(parse_proc_cgroup("0::/init.scope\n"), Workload::default());
        assert_eq!(parse_proc_cgroup("garbage"), Workload::default());
    }
}
