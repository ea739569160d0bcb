//! The `icerelay` command line as a user meets it.

use std::process::Command;

fn icerelay(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_icerelay")).args(args).output().expect("run icerelay")
}

fn write(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), text).expect("write");
    file
}

#[test]
fn check_config_accepts_the_readme_example() {
    let readme = std::fs::read_to_string(crate::harness::repo_root().join("README.md")).expect("README.md");
    let example = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README.md has a ```toml example");
    let file = write(example);
    let output = Command::new(env!("CARGO_BIN_EXE_icerelay"))
        .args(["check-config", &file.path().display().to_string()])
        .envs([("PRIMARY_SECRET", "a"), ("S3_SECRET", "b"), ("REPLICA_SECRET", "c"), ("REPLICA_S3_SECRET", "d")])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&output.stdout).contains(": ok"));
}

#[test]
fn check_config_lists_every_problem_with_its_key() {
    let file = write(
        r#"listen = "localhost"
[primary]
uri = "ftp://catalog"
auth = { type = "oauth2", client_id = "admin", client_secret = "${ICERELAY_TEST_UNSET_SECRET}" }
[[rules]]
namespace = "sales"
destinations = ["nowhere"]
"#,
    );
    let output = icerelay(&["check-config", &file.path().display().to_string()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("3 problem(s)") || stderr.contains("problem(s)"), "{stderr}");
    // The unset variable is found first (expansion precedes validation) and named.
    assert!(
        stderr.contains("primary.auth.client_secret: environment variable ICERELAY_TEST_UNSET_SECRET is not set"),
        "{stderr}"
    );

    let file = write(
        "listen = \"localhost\"\n[primary]\nuri = \"ftp://catalog\"\n[[rules]]\nnamespace = \"sales\"\ndestinations = [\"nowhere\"]\n",
    );
    let output = icerelay(&["check-config", &file.path().display().to_string()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "listen: \"localhost\" is not an address; expected IP:PORT",
        "primary.uri: \"ftp://catalog\" is not an http(s) URL",
        "rules[0].destinations[0]: \"nowhere\" is not a defined destination",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }
}

#[test]
fn check_config_reports_syntax_and_unknown_keys() {
    let file = write("[primary]\nuri = \"http://h:1\"\nretries = 3\n");
    let output = icerelay(&["check-config", &file.path().display().to_string()]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown field `retries`"), "{stderr}");

    let file = write("[primary\nuri = 1\n");
    let output = icerelay(&["check-config", &file.path().display().to_string()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("line 1"));

    let output = icerelay(&["check-config", "/nonexistent/icerelay.toml"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot read configuration file /nonexistent/icerelay.toml")
    );
}

#[test]
fn serve_with_an_invalid_configuration_exits_64_before_listening() {
    let output = icerelay(&["serve", "--upstream", "not-a-url", "--listen", "127.0.0.1:1"]);
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("primary.uri"));
    let output = icerelay(&["serve"]);
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--upstream"));
}

#[test]
fn help_explains_the_commands() {
    let output = icerelay(&["--help"]);
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    for word in ["serve", "check-config", "--log-format"] {
        assert!(text.contains(word), "{word} missing from --help:\n{text}");
    }
    let output = icerelay(&["serve", "--help"]);
    let text = String::from_utf8_lossy(&output.stdout);
    for word in
        ["--upstream", "--listen", "--admin-listen", "--config", "icerelay serve --upstream http://127.0.0.1:8181"]
    {
        assert!(text.contains(word), "{word} missing from serve --help:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_the_server_cleanly() {
    let stub = crate::harness::upstream::start(crate::harness::upstream::Behaviour::Echo).await;
    let mut relay = crate::harness::RelayProcess::start(&["serve", "--upstream", &stub.url], &[]).await;
    let response = reqwest::get(format!("{}/v1/config", relay.url)).await.expect("request");
    assert_eq!(response.status(), 200);
    let status = relay.terminate();
    assert!(status.success(), "exit status {status:?}\n{}", relay.logs());
    assert!(relay.logs().contains("shutting down"), "{}", relay.logs());
}
