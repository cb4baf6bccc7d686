//! `cargo xtask vm-test --kernel <debian-kernel-version> [-- <test filter>]`:
//! the root integration tests on a stock Debian kernel, in a virtual machine.
//!
//! Everything comes from Debian's packages and is unpacked (`dpkg -x`) into
//! `target/vm/`, never installed: the kernel, QEMU with its libraries and
//! firmware (called through a wrapper that sets `LD_LIBRARY_PATH` and `-L`),
//! and busybox for the initramfs of virtme-ng, which itself comes from the
//! Python package index when `vng` is missing. The guest shares the host's `/` read-only, so the
//! test binaries built here run there as root. QEMU runs in software
//! emulation (TCG): the machines' `/dev/kvm` is a nested PVM on which stock
//! kernels do not boot (`../shared/docs/kernel-matrix.md`).
//!
//! `vng` always exits 255 here (no udevd on the host), so the guest writes
//! each test binary's exit status, `ka-agent check`'s report and the tests'
//! output into `target/vm/results/<kernel>/`, and that is the result.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::cmd::{self, which};

/// The scenarios run when no filter is given: the suite does not fit in a
/// few minutes of software emulation, these cover every hook and the exact
/// kernel-counter agreement (binary, `cargo test` filter arguments).
pub const DEFAULT_SUBSET: &[(&str, &[&str])] = &[
    // The kprobe attaches where the kernel has kprobes; reset reasons are
    // reported exactly when BTF has enum sk_rst_reason.
    ("kernel_reach", &[]),
    // Every hook reported by `ka-agent check`, exit 0.
    ("cli", &["--exact", "check_reports_every_hook_and_exits_0"]),
    // The dead peer found by keepalive: probes and deaths equal TcpExt;
    // the socket inode read at a reset close (a cast load, or the helper
    // on 6.1) finds the process still holding it.
    (
        "keepalive",
        &[
            "--exact",
            "dead_peer_with_keepalive_ipv4",
            "a_connection_reset_before_any_inventory_is_counted_while_its_process_holds_it",
        ],
    ),
    // Lifecycle (IPv4 and IPv6), resets against OutRsts, retransmissions
    // against RetransSegs.
    ("foundation", &[]),
];

/// The kernels `cargo xtask test` runs the subset on: Debian 12's 6.1 LTS
/// (old `tcp_send_reset` layout, no reset reasons) and its 6.12 backport
/// (reset reasons, new layout); the newest package of each is taken.
pub const CI_KERNELS: &[&str] = &["6.1", "6.12"];

/// Wall time allowed for one virtual machine, boot to power-off.
pub const DEFAULT_TIMEOUT_SECS: u64 = 900;

/// Wall time allowed for one test binary inside the guest.
const BINARY_TIMEOUT_SECS: u64 = 420;

/// Packages unpacked into the QEMU folder besides QEMU's own libraries.
const QEMU_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-system-common",
    "qemu-system-data",
    "seabios",
    "ipxe-qemu",
    "busybox-static",
];

/// A download from Debian's mirrors failed: `cargo xtask test` skips the
/// matrix loudly outside CI, and fails under `CI=true`.
#[derive(Debug)]
pub struct DownloadFailed(pub String);

impl std::fmt::Display for DownloadFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot download from Debian's mirrors (no network?): {}",
            self.0
        )
    }
}

impl std::error::Error for DownloadFailed {}

/// `cargo xtask vm-test`: runs `filter` (or [`DEFAULT_SUBSET`]) on `kernel`.
pub fn vm_test(kernel: &str, timeout: Duration, filter: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let tools = Tools::prepare()?;
    let kernel = Kernel::prepare(kernel)?;
    eprintln!(
        "xtask: vm-test: {} ready in {:.0} s",
        kernel.version,
        started.elapsed().as_secs_f64()
    );
    let binaries = build_tests()?;
    let plan = plan(&binaries, filter)?;
    let results = boot(&tools, &kernel, &binaries.agent, &plan, timeout)?;
    let outcome = results.report(&plan);
    eprintln!(
        "xtask: vm-test: {} finished in {:.0} s (results in {})",
        kernel.version,
        started.elapsed().as_secs_f64(),
        results.dir.display()
    );
    outcome
}

/// The matrix step of `cargo xtask test`: [`DEFAULT_SUBSET`] on every kernel
/// of [`CI_KERNELS`], one virtual machine after the other.
pub fn matrix() -> anyhow::Result<()> {
    let started = Instant::now();
    let timeout = Duration::from_secs(DEFAULT_TIMEOUT_SECS);
    let mut failed = Vec::new();
    for kernel in CI_KERNELS {
        match vm_test(kernel, timeout, &[]) {
            Ok(()) => {}
            Err(error) if error.downcast_ref::<DownloadFailed>().is_some() => {
                if std::env::var("CI").as_deref() == Ok("true") {
                    return Err(error.context("the kernel matrix needs Debian's mirrors in CI"));
                }
                eprintln!(
                    "xtask: WARNING: kernel matrix SKIPPED (and it fails under CI=true): {error:#}"
                );
                return Ok(());
            }
            Err(error) => {
                eprintln!("xtask: vm-test {kernel}: FAILED: {error:#}");
                failed.push(format!("{kernel}: {error:#}"));
            }
        }
    }
    if !failed.is_empty() {
        bail!("kernel matrix failed:\n  {}", failed.join("\n  "));
    }
    eprintln!(
        "xtask: kernel matrix ({}) passed in {:.0} s",
        CI_KERNELS.join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `target/vm`, the private cache of everything the matrix unpacks.
fn cache() -> PathBuf {
    cmd::root().join("target").join("vm")
}

/// Runs `command` with a time limit, killing it when the limit passes.
fn run_bounded(command: &mut Command, limit: Duration) -> anyhow::Result<()> {
    let child = command
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    let mut guard = Group::new(child);
    let status = guard.wait(limit)?;
    match status {
        Some(status) if status.success() => Ok(()),
        Some(status) => bail!("{command:?} failed with {status}"),
        None => bail!("{command:?} did not finish in {} s", limit.as_secs()),
    }
}

/// Runs `command` with a time limit; returns its standard output.
fn output_bounded(command: &mut Command, limit: Duration) -> anyhow::Result<String> {
    let out = cache().join("tmp");
    fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let path = out.join(format!("output-{}", std::process::id()));
    let file =
        fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    let result = run_bounded(command.stdout(file), limit);
    let text = fs::read_to_string(&path).unwrap_or_default();
    let _ = fs::remove_file(&path);
    result.map(|()| text)
}

/// Set by SIGINT/SIGTERM while a guard waits, so the guard still cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// A child in a process group of its own (vng forks QEMU): the whole group
/// is killed when the guard is dropped, also on error or interruption.
struct Group {
    child: Option<Child>,
    /// The signal handlers replaced while waiting, restored on drop.
    previous: [libc::sighandler_t; 2],
}

impl Group {
    fn new(child: Child) -> Self {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        let previous = unsafe {
            [
                libc::signal(libc::SIGINT, handler),
                libc::signal(libc::SIGTERM, handler),
            ]
        };
        Self {
            child: Some(child),
            previous,
        }
    }

    /// Waits up to `limit`; `None` when the limit passed (the group is
    /// killed then).
    fn wait(&mut self, limit: Duration) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + limit;
        let Some(child) = self.child.as_mut() else {
            return Ok(None);
        };
        loop {
            if let Some(status) = child.try_wait().context("waiting for a child")? {
                self.kill();
                return Ok(Some(status));
            }
            if INTERRUPTED.load(Ordering::SeqCst) {
                self.kill();
                bail!("interrupted");
            }
            if Instant::now() >= deadline {
                self.kill();
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) on the process group this guard created.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
        // SAFETY: puts back the handlers `new` replaced.
        unsafe {
            libc::signal(libc::SIGINT, self.previous[0]);
            libc::signal(libc::SIGTERM, self.previous[1]);
        }
    }
}

/// `apt-get download` into `target/vm/debs` what is not there yet; returns
/// the package files in the order asked.
fn download(packages: &[String]) -> anyhow::Result<Vec<PathBuf>> {
    let debs = cache().join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("cannot create {}", debs.display()))?;
    let find = |package: &str| -> anyhow::Result<Option<PathBuf>> {
        let prefix = format!("{package}_");
        Ok(fs::read_dir(&debs)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| {
                path.extension().is_some_and(|e| e == "deb")
                    && path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix))
            }))
    };
    let mut missing = Vec::new();
    for package in packages {
        if find(package)?.is_none() {
            missing.push(package.clone());
        }
    }
    if !missing.is_empty() {
        eprintln!("xtask: vm-test: apt-get download {}", missing.join(" "));
        let attempt = |missing: &[String]| {
            run_bounded(
                Command::new("apt-get")
                    .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
                    .args(missing)
                    .current_dir(&debs),
                Duration::from_mins(10),
            )
        };
        if attempt(&missing).is_err() {
            // A stale package index names files the mirror no longer has.
            apt_update()?;
            attempt(&missing).map_err(|e| DownloadFailed(format!("{e:#}")))?;
        }
    }
    packages
        .iter()
        .map(|package| {
            find(package)?.with_context(|| format!("apt-get download left no {package}_*.deb"))
        })
        .collect()
}

fn apt_update() -> anyhow::Result<()> {
    eprintln!("xtask: vm-test: apt-get update");
    run_bounded(
        Command::new("apt-get").args(["-q", "update"]),
        Duration::from_mins(10),
    )
    .map_err(|e| DownloadFailed(format!("{e:#}")).into())
}

/// `dpkg -x` of `debs` into `dir`, once: a marker records completion.
fn unpack(debs: &[PathBuf], dir: &Path) -> anyhow::Result<()> {
    let marker = dir.join(".unpacked");
    if marker.exists() {
        return Ok(());
    }
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for deb in debs {
        run_bounded(
            Command::new("dpkg").arg("-x").arg(deb).arg(dir),
            Duration::from_mins(5),
        )?;
    }
    fs::write(&marker, "").with_context(|| format!("cannot write {}", marker.display()))
}

/// The tools every virtual machine uses: QEMU (wrapped), busybox, vng.
struct Tools {
    qemu: PathBuf,
    busybox: PathBuf,
    vng: PathBuf,
}

impl Tools {
    fn prepare() -> anyhow::Result<Self> {
        let root = cache().join("qemu");
        if !root.join(".unpacked").exists() {
            let mut packages: Vec<String> = QEMU_PACKAGES.iter().map(|&p| p.to_owned()).collect();
            packages.extend(missing_libraries("qemu-system-x86")?);
            let debs = download(&packages)?;
            unpack(&debs, &root)?;
        }
        let qemu = cache().join("qemu-system-x86_64");
        let libs = ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"]
            .map(|dir| root.join(dir).display().to_string())
            .join(":");
        let firmware = ["usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu"]
            .map(|dir| format!("-L '{}'", root.join(dir).display()))
            .join(" ");
        let wrapper = format!(
            "#!/bin/sh\n# Written by cargo xtask vm-test: QEMU unpacked from Debian's packages.\n\
             export LD_LIBRARY_PATH='{libs}'\n\
             exec '{}' {firmware} \"$@\"\n",
            root.join("usr/bin/qemu-system-x86_64").display()
        );
        if fs::read_to_string(&qemu).ok().as_deref() != Some(wrapper.as_str()) {
            fs::write(&qemu, &wrapper)
                .with_context(|| format!("cannot write {}", qemu.display()))?;
            fs::set_permissions(&qemu, fs::Permissions::from_mode(0o755))?;
        }
        output_bounded(
            Command::new(&qemu).arg("--version"),
            Duration::from_secs(30),
        )
        .context("the unpacked QEMU does not run (a library missing?)")?;
        let busybox = root.join("bin/busybox");
        if !busybox.is_file() {
            bail!(
                "{} missing after unpacking busybox-static",
                busybox.display()
            );
        }
        Ok(Self {
            qemu,
            busybox,
            vng: vng()?,
        })
    }
}

/// `vng`, installed from the Python package index when it is missing.
fn vng() -> anyhow::Result<PathBuf> {
    if let Some(vng) = which("vng") {
        return Ok(vng);
    }
    eprintln!("xtask: vm-test: pip install virtme-ng");
    let python = which("python3").context("virtme-ng needs python3 (and pip)")?;
    run_bounded(
        Command::new(python).args(["-m", "pip", "install", "--quiet", "virtme-ng"]),
        Duration::from_mins(10),
    )
    .map_err(|e| DownloadFailed(format!("pip install virtme-ng: {e:#}")))?;
    which("vng").context("pip installed virtme-ng but vng is not on PATH")
}

/// Whether a Debian package is installed on the host.
fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| out.stdout == b"installed")
}

/// The library packages `package` needs (recursively) that the host lacks.
fn missing_libraries(package: &str) -> anyhow::Result<Vec<String>> {
    let mut missing = Vec::new();
    let mut queue = vec![package.to_owned()];
    while let Some(next) = queue.pop() {
        let text = output_bounded(
            Command::new("apt-cache")
                .args(["depends", "--no-recommends", "--no-suggests"])
                .arg(&next),
            Duration::from_mins(1),
        )?;
        for dependency in library_dependencies(&text) {
            if !missing.contains(&dependency) && !installed(&dependency) {
                missing.push(dependency.clone());
                queue.push(dependency);
            }
        }
    }
    Ok(missing)
}

/// The `lib*` packages in `apt-cache depends` output (virtual ones skipped).
fn library_dependencies(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            line.trim()
                .trim_start_matches('|')
                .strip_prefix("Depends: ")
        })
        .filter(|name| name.starts_with("lib") && !name.starts_with('<'))
        .map(str::to_owned)
        .collect()
}

/// A Debian kernel unpacked into `target/vm/kernels/<version>`.
struct Kernel {
    version: String,
    vmlinuz: PathBuf,
}

impl Kernel {
    fn prepare(spec: &str) -> anyhow::Result<Self> {
        let version = resolve_kernel(spec)?;
        let dir = cache().join("kernels").join(&version);
        if !dir.join(".unpacked").exists() {
            let debs = download(&[format!("linux-image-{version}")])?;
            unpack(&debs, &dir)?;
        }
        let vmlinuz = dir.join("boot").join(format!("vmlinuz-{version}"));
        if !vmlinuz.is_file() {
            bail!("{} missing from linux-image-{version}", vmlinuz.display());
        }
        Ok(Self { version, vmlinuz })
    }
}

/// A full version (`6.1.0-56-amd64`) as given; a series (`6.1`, `6.12`) as
/// the newest generic amd64 kernel of that series in the package index.
fn resolve_kernel(spec: &str) -> anyhow::Result<String> {
    if spec.ends_with("-amd64") {
        if spec.contains("-cloud-") || spec.contains("-rt-") {
            bail!("{spec}: use the generic flavour (the cloud one lacks 9p)");
        }
        return Ok(spec.to_owned());
    }
    let search = || {
        output_bounded(
            Command::new("apt-cache").args([
                "search",
                "--names-only",
                &format!("^linux-image-{}\\.", spec.replace('.', "\\.")),
            ]),
            Duration::from_mins(1),
        )
    };
    let mut found = newest_kernel(spec, &search()?);
    if found.is_none() {
        apt_update()?;
        found = newest_kernel(spec, &search()?);
    }
    let version = found.with_context(|| {
        format!("no generic amd64 linux-image of series {spec} in the package index")
    })?;
    eprintln!("xtask: vm-test: kernel series {spec}: newest is {version}");
    Ok(version)
}

/// The newest generic amd64 kernel of `series` in `apt-cache search` output.
fn newest_kernel(series: &str, search: &str) -> Option<String> {
    let key = |version: &str| -> Vec<u64> {
        version
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    search
        .lines()
        .filter_map(|line| line.split_whitespace().next()?.strip_prefix("linux-image-"))
        .filter(|v| {
            v.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with('.'))
                && v.ends_with("-amd64")
                && !v.contains("-cloud-")
                && !v.contains("-rt-")
        })
        .max_by_key(|v| key(v))
        .map(str::to_owned)
}

/// The test binaries of ka-agent and the agent they start.
struct Binaries {
    tests: BTreeMap<String, PathBuf>,
    agent: PathBuf,
}

/// `cargo test -p ka-agent --no-run`, on the host: the binaries the guest
/// runs (it sees the host's `/`).
fn build_tests() -> anyhow::Result<Binaries> {
    eprintln!("xtask: vm-test: cargo test -p ka-agent --no-run");
    let output = cmd::cargo()
        .args([
            "test",
            "--package",
            "ka-agent",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo test --no-run")?;
    if !output.status.success() {
        bail!("cargo test --no-run failed with {}", output.status);
    }
    let mut tests = BTreeMap::new();
    let mut agent = None;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some((name, kind, path)) = artifact(line) else {
            continue;
        };
        match kind.as_str() {
            "test" => {
                tests.insert(name, path);
            }
            "bin" if name == "ka-agent" => agent = Some(path),
            _ => {}
        }
    }
    let agent = agent.unwrap_or_else(|| cmd::root().join("target/debug/ka-agent"));
    if !agent.is_file() {
        bail!("the ka-agent binary is missing at {}", agent.display());
    }
    Ok(Binaries { tests, agent })
}

/// An executable `compiler-artifact` of cargo's JSON messages: target name,
/// first kind (`bin` only for the program itself, not its unit tests),
/// path. (Cargo writes one compact object per line.)
fn artifact(line: &str) -> Option<(String, String, PathBuf)> {
    if !line.contains(r#""reason":"compiler-artifact""#) {
        return None;
    }
    let string_after = |key: &str, from: &str| -> Option<String> {
        let start = from.find(key)? + key.len();
        let end = from[start..].find('"')?;
        Some(from[start..start + end].to_owned())
    };
    let executable = string_after(r#""executable":""#, line)?;
    let target = &line[line.find(r#""target":{"#)?..];
    let kind = string_after(r#""kind":[""#, target)?;
    let name = string_after(r#""name":""#, target)?;
    let profile = &line[line.find(r#""profile":{"#)?..];
    let unit_tests = profile[..profile.find('}')?].contains(r#""test":true"#);
    let kind = if unit_tests && kind != "test" {
        format!("{kind} unit tests")
    } else {
        kind
    };
    Some((name, kind, PathBuf::from(executable)))
}

/// One test binary to run in the guest, with its arguments.
struct Step {
    name: String,
    binary: PathBuf,
    args: Vec<String>,
}

/// The default subset, or every integration test binary with `filter`.
fn plan(binaries: &Binaries, filter: &[String]) -> anyhow::Result<Vec<Step>> {
    let step = |name: &str, args: Vec<String>| -> anyhow::Result<Step> {
        let binary = binaries
            .tests
            .get(name)
            .with_context(|| format!("no test binary {name} among {:?}", binaries.tests.keys()))?;
        Ok(Step {
            name: name.to_owned(),
            binary: binary.clone(),
            args,
        })
    };
    if filter.is_empty() {
        DEFAULT_SUBSET
            .iter()
            .map(|(name, args)| step(name, args.iter().map(|&a| a.to_owned()).collect()))
            .collect()
    } else {
        // Integration tests only: the library's unit tests need no kernel.
        binaries
            .tests
            .keys()
            .filter(|name| name.as_str() != "ka_agent" && name.as_str() != "ka-agent")
            .map(|name| step(name, filter.to_vec()))
            .collect()
    }
}

/// Single-quoted for `sh`.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// The script the guest runs as root: tracefs, `ka-agent check`, then each
/// step bounded by `timeout`; every result lands in `out`.
fn guest_script(out: &Path, agent: &Path, plan: &[Step]) -> String {
    let ci = std::env::var("CI").unwrap_or_default();
    let mut script = format!(
        "#!/bin/sh\n# Written by cargo xtask vm-test; runs as root in the guest.\n\
         out={out}\n\
         cd {root}\n\
         export CI={ci} RUST_BACKTRACE=1 KA_TEST_READY_SECS=120\n\
         grep -q ' /sys/kernel/tracing ' /proc/mounts || mount -t tracefs tracefs /sys/kernel/tracing\n\
         grep -q ' /sys/fs/bpf ' /proc/mounts || mount -t bpf bpf /sys/fs/bpf\n\
         uname -r > \"$out/uname\"\n\
         timeout -k 10 120 {agent} check > \"$out/check.txt\" 2>&1\n\
         echo $? > \"$out/check.status\"\n\
         step() {{\n\
         \x20 name=$1; shift\n\
         \x20 echo \"=== $name: $*\" >> \"$out/tests.log\"\n\
         \x20 start=$(date +%s)\n\
         \x20 timeout -k 10 {BINARY_TIMEOUT_SECS} \"$@\" --test-threads=1 >> \"$out/tests.log\" 2>&1\n\
         \x20 echo \"$? $(( $(date +%s) - start ))\" > \"$out/$name.status\"\n\
         }}\n",
        out = quote(&out.display().to_string()),
        root = quote(&cmd::root().display().to_string()),
        ci = quote(&ci),
        agent = quote(&agent.display().to_string()),
    );
    for step in plan {
        let args: Vec<String> = step.args.iter().map(|a| quote(a)).collect();
        let _ = writeln!(
            script,
            "step {} {} {}",
            quote(&step.name),
            quote(&step.binary.display().to_string()),
            args.join(" ")
        );
    }
    script.push_str("echo done > \"$out/finished\"\n");
    script
}

/// What the guest left in `target/vm/results/<kernel>`.
struct Results {
    dir: PathBuf,
}

/// Boots `kernel` with vng and runs `plan` in it, bounded by `timeout`;
/// once more if the VM never started (vng gone within seconds, the guest
/// script never ran: seen once in CI, the next boot of the same kernel
/// passed), never when the guest ran.
fn boot(
    tools: &Tools,
    kernel: &Kernel,
    agent: &Path,
    plan: &[Step],
    timeout: Duration,
) -> anyhow::Result<Results> {
    let first = boot_once(tools, kernel, agent, plan, timeout);
    let dir = cache().join("results").join(&kernel.version);
    // The console has the guest kernel's log (`--verbose`), so an empty one
    // is not the test: the script's first act is writing `uname`.
    let never_started = !dir.join("uname").exists()
        && fs::read_to_string(dir.join("console.log"))
            .is_ok_and(|c| !c.contains("starting script"));
    match first {
        Err(error) if never_started => {
            eprintln!("xtask: vm-test: the VM never started ({error:#}); booting it once more");
            boot_once(tools, kernel, agent, plan, timeout)
        }
        other => other,
    }
}

fn boot_once(
    tools: &Tools,
    kernel: &Kernel,
    agent: &Path,
    plan: &[Step],
    timeout: Duration,
) -> anyhow::Result<Results> {
    let dir = cache().join("results").join(&kernel.version);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let script = dir.join("guest.sh");
    fs::write(&script, guest_script(&dir, agent, plan))
        .with_context(|| format!("cannot write {}", script.display()))?;
    let console = dir.join("console.log");
    let log = fs::File::create(&console)
        .with_context(|| format!("cannot create {}", console.display()))?;
    let mut command = Command::new(&tools.vng);
    command
        .arg("--disable-kvm")
        // The guest kernel's log on the console: an oops shows in the tail
        // a failure prints.
        .arg("--verbose")
        .arg("--qemu")
        .arg(&tools.qemu)
        .arg("--busybox")
        .arg(&tools.busybox)
        .arg("--run")
        .arg(&kernel.vmlinuz)
        .args(["--cpus", "2", "--memory", "2G", "--user", "root"])
        // One host thread runs both vCPUs. With a thread per vCPU (QEMU's
        // default here), the 6.12 guest oopsed in 3 of 6 boots on an int3
        // left in `enqueue_timer` after detaching the `timer_start` program
        // had re-patched that tracepoint's call site (`tracepoint_probe_
        // unregister` -> `call_srcu` -> `__mod_timer` on the patching CPU
        // itself, most likely the emulator running stale code); 9 of 9
        // boots passed with one thread (or one vCPU), about 15 % slower.
        .arg("--qemu-opts=-accel tcg,thread=single")
        .arg("--rwdir")
        .arg(&dir)
        .arg("--exec")
        .arg(format!("sh {}", quote(&script.display().to_string())))
        .current_dir(cmd::root())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    eprintln!(
        "xtask: vm-test: booting {} (software emulation, at most {} s; console in {})",
        kernel.version,
        timeout.as_secs(),
        console.display()
    );
    let started = Instant::now();
    let child = command
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    let mut vm = Group::new(child);
    let status = vm.wait(timeout)?;
    drop(vm);
    let finished = dir.join("finished").exists();
    eprintln!(
        "xtask: vm-test: guest {} after {:.0} s (vng: {})",
        if finished {
            "finished"
        } else {
            "did NOT finish"
        },
        started.elapsed().as_secs_f64(),
        status.map_or_else(|| "killed at the time limit".to_owned(), |s| s.to_string()),
    );
    if !finished {
        let tail = tail(&fs::read_to_string(&console).unwrap_or_default(), 40);
        let tests = tail_of(&dir.join("tests.log"), 60);
        // vng exiting early (it always exits 255 after a guest, see the
        // module comment) means the VM never ran, not that it was slow.
        let why = match status {
            None => format!("did not finish in {} s", timeout.as_secs()),
            Some(status) => format!(
                "stopped after {:.0} s without finishing (vng: {status})",
                started.elapsed().as_secs_f64()
            ),
        };
        bail!(
            "the guest on {} {why}\n--- tests (tail) ---\n{tests}\n--- console (tail) ---\n{tail}",
            kernel.version
        );
    }
    Ok(Results { dir })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn tail_of(path: &Path, lines: usize) -> String {
    tail(&fs::read_to_string(path).unwrap_or_default(), lines)
}

impl Results {
    /// Prints `ka-agent check` and each step's verdict; fails if any failed.
    fn report(&self, plan: &[Step]) -> anyhow::Result<()> {
        let read = |name: &str| fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        println!("--- guest kernel {} ---", read("uname").trim());
        println!(
            "--- ka-agent check (exit {}) ---",
            read("check.status").trim()
        );
        print!("{}", read("check.txt"));
        println!("--- tests ---");
        let log = read("tests.log");
        let mut failed = Vec::new();
        if read("check.status").trim() != "0" {
            failed.push("ka-agent check".to_owned());
        }
        for step in plan {
            let status = read(&format!("{}.status", step.name));
            let mut fields = status.split_whitespace();
            let code = fields.next().unwrap_or("missing");
            let secs = fields.next().unwrap_or("?");
            let summary = step_summary(&log, &step.name);
            println!(
                "{:<14} {} ({secs} s) {}",
                step.name,
                if code == "0" { "ok" } else { "FAILED" },
                summary
            );
            if code != "0" {
                failed.push(format!("{} (exit {code})", step.name));
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        println!("--- test output ---\n{}", tail(&log, 200));
        bail!("failed in the guest: {}", failed.join(", "))
    }
}

/// The names of the tests that passed or failed in `step`'s section of the
/// log, and its `test result:` line.
fn step_summary(log: &str, step: &str) -> String {
    let header = format!("=== {step}:");
    let Some(start) = log.find(&header) else {
        return String::new();
    };
    let section = &log[start + header.len()..];
    let section = &section[..section.find("\n=== ").unwrap_or(section.len())];
    let mut words = Vec::new();
    for line in section.lines() {
        if let Some(rest) = line.strip_prefix("test ")
            && let Some((name, verdict)) = rest.rsplit_once(" ... ")
        {
            words.push(format!("{name}={verdict}"));
        }
    }
    let result = section
        .lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or("no test result");
    format!("[{}] {result}", words.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_generic_kernel_of_a_series_is_chosen() {
        let search = "\
linux-image-6.1.0-9-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-56-amd64 - Linux 6.1 for 64-bit PCs (signed)
linux-image-6.1.0-56-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)
linux-image-6.1.0-56-rt-amd64 - Linux 6.1 for 64-bit PCs, PREEMPT_RT (signed)
linux-image-6.1.0-56-amd64-unsigned - Linux 6.1 for 64-bit PCs
linux-image-6.12.9+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
linux-image-6.12.117+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
linux-image-6.12.117+deb12-amd64-dbg - Debug symbols for linux-image-6.12.117+deb12-amd64
";
        assert_eq!(
            newest_kernel("6.1", search).as_deref(),
            Some("6.1.0-56-amd64")
        );
        assert_eq!(
            newest_kernel("6.12", search).as_deref(),
            Some("6.12.117+deb12-amd64")
        );
        assert_eq!(newest_kernel("5.15", search), None);
    }

    #[test]
    fn library_dependencies_skip_virtual_and_non_library_packages() {
        let text = "qemu-system-x86\n  Depends: libaio1\n |Depends: libfdt1\n  Depends: <libvirt>\n  Depends: seabios\n  Breaks: libfoo\n";
        assert_eq!(library_dependencies(text), ["libaio1", "libfdt1"]);
    }

    #[test]
    fn cargo_artifacts_name_test_binaries() {
        let line = r#"{"reason":"compiler-artifact","package_id":"path+file:///r/ka-agent#0.1.0","manifest_path":"/r/ka-agent/Cargo.toml","target":{"kind":["test"],"crate_types":["bin"],"name":"keepalive","src_path":"/r/ka-agent/tests/keepalive.rs","edition":"2024","doc":false,"doctest":false,"test":true},"profile":{"test":true},"features":[],"filenames":["/r/target/debug/deps/keepalive-0a1b"],"executable":"/r/target/debug/deps/keepalive-0a1b","fresh":true}"#;
        assert_eq!(
            artifact(line),
            Some((
                "keepalive".to_owned(),
                "test".to_owned(),
                PathBuf::from("/r/target/debug/deps/keepalive-0a1b")
            ))
        );
        assert_eq!(
            artifact(r#"{"reason":"build-finished","success":true}"#),
            None
        );
    }

    #[test]
    fn the_guest_script_quotes_and_bounds_every_step() {
        let plan = [Step {
            name: "keepalive".into(),
            binary: PathBuf::from("/t/keepalive-1"),
            args: vec!["--exact".into(), "it's".into()],
        }];
        let script = guest_script(Path::new("/out"), Path::new("/t/ka-agent"), &plan);
        assert!(script.contains("step 'keepalive' '/t/keepalive-1' '--exact' 'it'\\''s'"));
        assert!(script.contains("timeout -k 10 120 '/t/ka-agent' check"));
        assert!(script.contains(&format!("timeout -k 10 {BINARY_TIMEOUT_SECS} ")));
    }
}
