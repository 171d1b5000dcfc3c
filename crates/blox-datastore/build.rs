//! Rebuilds the crate when a migration is added: `sqlx::migrate!` embeds the migration folders
//! at compile time, and Cargo does not otherwise watch them.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
