//! Generates one Rust test per Luau behaviour script in `tests/luau`, for each backend.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/luau");
    println!("cargo:rerun-if-changed={}", folder.display());
    let mut names: Vec<String> = std::fs::read_dir(&folder)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .filter_map(|entry| {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".luau").map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let mut code = String::new();
    for name in &names {
        let ident = name.replace(['-', '.'], "_");
        for backend in ["sqlite", "postgres"] {
            let _ = writeln!(
                code,
                "#[test]\nfn {backend}_{ident}() {{ run_luau_test({name:?}, TestDatabase::{}); }}",
                if backend == "sqlite" {
                    "Sqlite"
                } else {
                    "Postgres"
                }
            );
        }
    }
    let out =
        Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("luau_tests.rs");
    std::fs::write(out, code).expect("OUT_DIR is writable");
}
