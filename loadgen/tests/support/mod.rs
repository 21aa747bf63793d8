//! Shared by loadgen's process tests: the `loadgen` binary and the `unid` binary they spawn.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The `loadgen` binary under test.
pub const LOADGEN: &str = env!("CARGO_BIN_EXE_loadgen");

/// The `unid` binary: `UNID_BIN`, else the one beside `loadgen` in the same target directory,
/// else built there (`cargo build -p unid-cli`).
pub fn unid_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("UNID_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "UNID_BIN={} is not a file", p.display());
        return p;
    }
    // <target>/<profile>/loadgen → <target>/<profile>/unid
    let loadgen = PathBuf::from(LOADGEN);
    let dir = loadgen.parent().expect("loadgen has a directory");
    let unid = dir.join(format!("unid{}", std::env::consts::EXE_SUFFIX));
    if !unid.is_file() {
        let target = dir.parent().expect("a profile directory has a parent");
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!(
            "building unid-cli into {} (set UNID_BIN to skip)",
            target.display()
        );
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "unid-cli", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(target);
        if dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build -p unid-cli");
        assert!(st.success(), "cargo build -p unid-cli failed");
    }
    assert!(unid.is_file(), "no unid binary at {}", unid.display());
    unid
}
