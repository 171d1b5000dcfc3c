//! The tycoon example played in headless Chromium through its own web page (driven by
//! `tests/e2e/tycoon.mjs` with playwright-core): join, earn, buy, leave, rejoin, then a server
//! restart, checking the numbers the page shows each time. `scripts/ensure-browser` installs
//! Chromium and playwright-core; without them this test fails rather than pass unseen.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use blox_testkit::{Scratch, TestDatabase};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Server(Child, String);

impl Server {
    fn start(url: &str) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_blox"))
            .arg("serve")
            .arg(root().join("examples/tycoon"))
            .args(["--listen", "127.0.0.1:0"])
            .env("BLOX_DATABASE_URL", url)
            .stdout(Stdio::piped())
            .spawn()
            .expect("blox serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("blox serve prints its address");
        let base = line.trim().trim_start_matches("listening on ").to_owned();
        Server(child, base)
    }

    fn stop(mut self) {
        let killed = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(killed.success());
        assert!(self.0.wait().expect("exits").success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

fn page(args: &[&str]) -> String {
    let output = Command::new("node")
        .arg(root().join("tests/e2e/tycoon.mjs"))
        .args(args)
        .output()
        .expect("node runs (scripts/ensure-browser installs what it needs)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "the page run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn the_tycoon_page_keeps_progress_across_leaving_and_a_restart() {
    let scratch = Scratch::new(TestDatabase::Sqlite, "browser_tycoon");
    let server = Server::start(&scratch.url);
    let played = page(&["play", &server.1]);
    assert!(played.contains("money 40 speed 2"), "{played}");
    server.stop();
    let server = Server::start(&scratch.url);
    let resumed = page(&["expect", &server.1, "40", "2"]);
    assert!(resumed.contains("money 40 speed 2"), "{resumed}");
    server.stop();
}
