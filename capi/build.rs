//! Generates `unid.h` from `src/lib.rs` with cbindgen into `OUT_DIR` (the crate's test
//! `header_is_current` compares it with the checked-in `include/unid.h`); with
//! `UNID_CAPI_UPDATE_HEADER=1` it also writes `include/unid.h` (scripts/test-capi.sh --update).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=UNID_CAPI_UPDATE_HEADER");
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("unid.h");
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate unid.h")
        .write_to_file(&out);
    if std::env::var_os("UNID_CAPI_UPDATE_HEADER").is_some_and(|v| v == "1") {
        std::fs::copy(&out, dir.join("include/unid.h")).expect("write include/unid.h");
    }
}
