//! Builds the kernel programs (`ka-ebpf`) for the BPF target and leaves the
//! object in `OUT_DIR` for `include_bytes_aligned!`.

use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow::anyhow!("ka-agent has no parent directory"))?
        .join("ka-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    // The sub-build runs under the same rustup toolchain as this build; the
    // BPF target is tier 3, so it needs `-Z build-std=core`, which stable
    // rustc allows only with RUSTC_BOOTSTRAP (set for that sub-build only).
    let toolchain: &'static str = Box::leak(
        env::var("RUSTUP_TOOLCHAIN")
            .unwrap_or_else(|_| "stable".into())
            .into_boxed_str(),
    );
    // SAFETY: build scripts are single-threaded; nothing else reads the
    // environment concurrently.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ka-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(toolchain),
    )?;
    // With AYA_BUILD_SKIP (used by quick unit-test runs that need no kernel
    // programs) leave an empty object so the crate still compiles; loading it
    // then fails with a clear error.
    let object = PathBuf::from(env::var("OUT_DIR")?).join("ka");
    if !object.exists() {
        fs::write(&object, [])?;
    }
    Ok(())
}
