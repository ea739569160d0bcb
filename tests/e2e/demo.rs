//! README's first command: `scripts/demo.sh` replicates a table between two
//! local catalogs and shows them side by side.

use std::process::Command;

use crate::harness::{repo_root, teststack};

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_replicates_and_shows_both_sides() {
    let dir = tempfile::tempdir().expect("dir");
    // Two SeaweedFS servers at base and base + 100, 17 ports each, below
    // 30000: the harness's SeaweedFS ranges (30000 and up) and the kernel's
    // ephemeral ports (32768 and up) must not take one between the check here
    // and the demo's start.
    let base = (0..200)
        .map(|i| 20000 + (std::process::id() % 20) as u16 * 400 + i * 7)
        .find(|b| (*b..=b + 117).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()))
        .expect("free ports");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(repo_root().join("scripts/demo.sh"))
            .env("ICERELAY_BIN", env!("CARGO_BIN_EXE_icerelay"))
            .env("ICERELAY_TESTSTACK", teststack())
            .env("DEMO_NO_WAIT", "1")
            .env("DEMO_DIR", dir.path().join("demo"))
            .env("DEMO_BASE_PORT", base.to_string())
            .output()
            .expect("run demo.sh")
    })
    .await
    .expect("demo task");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo.sh failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("\"status\": \"completed\""), "{stdout}");
    let side = |who: &str| -> Vec<String> {
        stdout
            .lines()
            .filter(|l| l.starts_with(who) && !l.contains("refs"))
            .map(|l| l[who.len()..].split("s3://").next().unwrap_or_default().trim().to_owned())
            .collect()
    };
    let (primary, replica) = (side("primary"), side("replica"));
    assert_eq!(primary.len(), 5, "{stdout}");
    assert_eq!(primary, replica, "same ids, sequence numbers, timestamps and rows on both sides");
    assert!(stdout.contains("s3://replica/demo/"), "the replica has its own paths: {stdout}");
}
