//! Tests of parsing, overrides and validation.

use super::*;

const FULL: &str = r#"
listen = "127.0.0.1:9181"
admin_listen = "127.0.0.1:9182"
public_url = "http://127.0.0.1:9181"

[primary]
uri = "http://127.0.0.1:8181"
auth = { type = "oauth2", client_id = "admin", client_secret = "${PRIMARY_SECRET}" }

[[storage]]
prefix = "s3://warehouse/"
endpoint = "http://127.0.0.1:8333"
region = "us-east-1"
path_style = true
access_key_id = "admin"
secret_access_key = "${S3_SECRET}"

[[destinations]]
name = "dr"
uri = "http://127.0.0.1:8281"
warehouse = "replica"
auth = { type = "oauth2", client_id = "admin", client_secret = "${REPLICA_SECRET}" }

[[rules]]
namespace = "*"
destinations = ["dr"]
"#;

fn env() -> MapEnv {
    MapEnv::from_pairs([("PRIMARY_SECRET", "p-secret"), ("S3_SECRET", "s3-secret"), ("REPLICA_SECRET", "r-secret")])
}

fn load_str(text: &str, env: &dyn Env) -> Result<Config, ConfigErrors> {
    let raw = parse(text, env)?;
    validate(raw)
}

fn keys(errors: &ConfigErrors) -> Vec<&str> {
    errors.0.iter().map(|e| e.key.as_str()).collect()
}

#[test]
fn the_documented_example_is_valid() {
    let c = load_str(FULL, &env()).expect("valid");
    assert_eq!(c.listen.to_string(), "127.0.0.1:9181");
    assert_eq!(c.primary.uri.as_str(), "http://127.0.0.1:8181/");
    match &c.primary.auth {
        AuthConfig::OAuth2 { client_id, client_secret, .. } => {
            assert_eq!(client_id, "admin");
            assert_eq!(client_secret.expose(), "p-secret");
        }
        other => panic!("unexpected auth {other:?}"),
    }
    assert_eq!(c.storage.len(), 1);
    assert_eq!(c.destinations[0].name, "dr");
    assert_eq!(c.rules[0].namespace, NamespacePattern::Any);
    // The expanded secrets never show in Debug output.
    let debug = format!("{c:?}");
    for secret in ["p-secret", "s3-secret", "r-secret"] {
        assert!(!debug.contains(secret), "{secret} leaked into {debug}");
    }
}

#[test]
fn upstream_alone_is_enough() {
    let mut raw = parse("", &MapEnv::default()).expect("empty file parses");
    apply_overrides(
        &mut raw,
        &Overrides {
            upstream: Some("http://127.0.0.1:8181".into()),
            listen: Some("127.0.0.1:0".into()),
            ..Default::default()
        },
    );
    let c = validate(raw).expect("valid");
    assert_eq!(c.primary.uri.as_str(), "http://127.0.0.1:8181/");
    assert_eq!(c.listen.port(), 0);
    assert_eq!(c.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
}

#[test]
fn unset_variable_names_key_and_variable() {
    let errors = load_str(FULL, &MapEnv::from_pairs([("PRIMARY_SECRET", "x")])).expect_err("two unset");
    assert_eq!(keys(&errors), ["destinations[0].auth.client_secret", "storage[0].secret_access_key"]);
    assert!(errors.0[0].message.contains("REPLICA_SECRET is not set"));
}

#[test]
fn unknown_key_is_rejected_with_its_path() {
    let errors = load_str("[primary]\nuri = \"http://h:1\"\nurl = \"x\"\n", &MapEnv::default()).expect_err("unknown");
    assert_eq!(errors.0.len(), 1);
    assert!(errors.0[0].key.starts_with("primary"), "{errors}");
    assert!(errors.0[0].message.contains("unknown field `url`"), "{errors}");
}

#[test]
fn wrong_auth_type_lists_the_valid_ones() {
    let text = "[primary]\nuri = \"http://h:1\"\nauth = { type = \"basic\" }\n";
    let errors = load_str(text, &MapEnv::default()).expect_err("bad type");
    assert!(errors.0[0].message.contains("none, bearer, oauth2, sigv4"), "{errors}");
}

#[test]
fn syntax_errors_carry_line_and_column() {
    let errors = load_str("listen = \"a\"\n[primary\n", &MapEnv::default()).expect_err("syntax");
    assert!(errors.0[0].key.starts_with("line 2"), "{errors}");
}

#[test]
fn every_semantic_problem_is_reported_at_once() {
    let text = r#"
listen = "nowhere"
public_url = "ftp://x"
[primary]
uri = "not a url"
connect_timeout = "0s"
[[storage]]
prefix = "gs://bucket/"
[[destinations]]
name = "a b"
uri = "http://h:1"
[[destinations]]
name = "dup"
uri = "http://h:2"
[[destinations]]
name = "dup"
uri = "http://h:3"
[[rules]]
namespace = "*"
table = "t"
destinations = ["missing"]
"#;
    let errors = load_str(text, &MapEnv::default()).expect_err("invalid");
    assert_eq!(
        keys(&errors),
        [
            "listen",
            "public_url",
            "primary.uri",
            "primary.connect_timeout",
            "storage[0].prefix",
            "destinations[0].name",
            "destinations[2].name",
            "rules[0].table",
            "rules[0].destinations[0]",
        ],
        "{errors}"
    );
    let text = errors.to_string();
    assert!(text.contains("expected IP:PORT"), "{text}");
    assert!(text.contains("\"missing\" is not a defined destination (defined: a b, dup, dup)"), "{text}");
}

#[test]
fn missing_primary_says_how_to_fix_it() {
    let errors = load_str("", &MapEnv::default()).expect_err("no primary");
    assert_eq!(keys(&errors), ["primary.uri"]);
    assert!(errors.0[0].message.contains("--upstream"));
}

#[test]
fn env_overrides_apply_before_validation() {
    let env = MapEnv::from_pairs([
        ("ICERELAY__PRIMARY__URI", "http://override:1"),
        ("ICERELAY__MAX_BODY_BYTES", "1024"),
        ("ICERELAY__DESTINATIONS__0__WAREHOUSE", "other"),
        ("PRIMARY_SECRET", "p"),
        ("S3_SECRET", "s"),
        ("REPLICA_SECRET", "r"),
    ]);
    let c = load_str(FULL, &env).expect("valid");
    assert_eq!(c.primary.uri.as_str(), "http://override:1/");
    assert_eq!(c.max_body_bytes, 1024);
    assert_eq!(c.destinations[0].warehouse.as_deref(), Some("other"));

    let env = MapEnv::from_pairs([("ICERELAY__DESTINATIONS__5__URI", "http://x:1")]);
    let errors = load_str("[primary]\nuri = \"http://h:1\"\n", &env).expect_err("no such entry");
    assert_eq!(keys(&errors), ["ICERELAY__DESTINATIONS__5__URI"]);
}

#[test]
fn urls_with_credentials_are_refused() {
    let errors = load_str("[primary]\nuri = \"http://user:pw@h:1\"\n", &MapEnv::default()).expect_err("userinfo");
    assert_eq!(keys(&errors), ["primary.uri"]);
    assert!(!errors.to_string().contains("pw@"), "the password must not be echoed: {errors}");
}

#[test]
fn replication_settings_are_validated_with_their_keys() {
    let text = FULL.replace(
        "[[rules]]\nnamespace = \"*\"\ndestinations = [\"dr\"]\n",
        "[replication]\nreconcile_interval = \"0s\"\nmax_concurrent_lanes = 0\n\n[[rules]]\nnamespace = \"sales\"\ndestinations = [\"dr\"]\ntarget_namespace = \"all..eu\"\non_drop = \"burn\"\nsource_prefixes = [\"s3://ok/sales\", \"warehouse/sales\", \"s3://\"]\n",
    )
    .replace("warehouse = \"replica\"\n", "warehouse = \"replica\"\nbootstrap = \"sometimes\"\nlocation = \"replica-bucket\"\n");
    let errors = load_str(&text, &env()).expect_err("invalid");
    let mut found = keys(&errors);
    found.sort_unstable();
    assert_eq!(
        found,
        [
            "destinations[0].bootstrap",
            "destinations[0].location",
            "replication.max_concurrent_lanes",
            "replication.reconcile_interval",
            "rules[0].on_drop",
            "rules[0].source_prefixes[1]",
            "rules[0].source_prefixes[2]",
            "rules[0].target_namespace",
        ],
        "{errors}"
    );

    let valid = format!("state_dir = \"/var/lib/icerelay\"\n{FULL}").replace(
        "[[rules]]\nnamespace = \"*\"\ndestinations = [\"dr\"]\n",
        "[[rules]]\nnamespace = \"eu\"\ndestinations = [\"dr\"]\ntarget_namespace = \"all.eu\"\non_drop = \"propagate\"\nsource_prefixes = [\"s3://wh/eu\", \"file:/data/eu/\"]\n",
    )
    .replace("warehouse = \"replica\"\n", "warehouse = \"replica\"\nbootstrap = \"create\"\nproperties = { owner = \"dr\" }\n");
    let c = load_str(&valid, &env()).expect("valid");
    assert_eq!(c.state_dir, PathBuf::from("/var/lib/icerelay"));
    assert_eq!(c.destinations[0].bootstrap, BootstrapMode::Create);
    assert_eq!(c.destinations[0].properties.get("owner").map(String::as_str), Some("dr"));
    assert_eq!(c.rules[0].target_namespace, Some(Namespace::from_dotted("all.eu")));
    assert_eq!(c.rules[0].on_drop, OnDrop::Propagate);
    assert_eq!(c.rules[0].source_prefixes, ["s3://wh/eu", "file:///data/eu/"], "file URLs in one form");
    assert_eq!(c.replication, ReplicationConfig::default());

    let transaction = valid.replace("bootstrap = \"create\"", "bootstrap = \"create-transaction\"");
    let c = load_str(&transaction, &env()).expect("valid");
    assert_eq!(c.destinations[0].bootstrap, BootstrapMode::CreateTransaction);
}

#[test]
fn env_values_for_string_keys_stay_strings_and_secrets_are_never_echoed() {
    // A secret made only of digits used to become a TOML integer, and the
    // type error printed it.
    let secret = "918273645546372819";
    let env = MapEnv::from_pairs([
        ("ICERELAY__PRIMARY__AUTH__CLIENT_SECRET", secret),
        ("ICERELAY__DESTINATIONS__0__AUTH__CLIENT_SECRET", "true"),
        ("ICERELAY__PROXY_WORKERS", "3"),
        ("ICERELAY__STORAGE__0__PATH_STYLE", "false"),
        ("PRIMARY_SECRET", "p"),
        ("S3_SECRET", "s"),
        ("REPLICA_SECRET", "r"),
    ]);
    let c = load_str(FULL, &env).expect("valid");
    match &c.primary.auth {
        AuthConfig::OAuth2 { client_secret, .. } => assert_eq!(client_secret.expose(), secret),
        other => panic!("unexpected auth {other:?}"),
    }
    match &c.destinations[0].auth {
        AuthConfig::OAuth2 { client_secret, .. } => assert_eq!(client_secret.expose(), "true"),
        other => panic!("unexpected auth {other:?}"),
    }
    assert_eq!(c.proxy_workers, 3);
    assert!(matches!(c.storage[0].kind, StorageKind::S3 { path_style: false, .. }));

    // A number written in the file for a secret key: an error without the value.
    let text = FULL.replace("client_secret = \"${PRIMARY_SECRET}\"", &format!("client_secret = {secret}"));
    let errors = load_str(&text, &self::env()).expect_err("a number is not a secret");
    assert_eq!(keys(&errors), ["primary.auth"]);
    assert!(!errors.to_string().contains(secret), "{errors}");
    // An auth written as a plain string (a token pasted in): not echoed either.
    let env_auth = MapEnv::from_pairs([
        ("ICERELAY__PRIMARY__AUTH", "tok-2231-secret"),
        ("S3_SECRET", "s"),
        ("REPLICA_SECRET", "r"),
    ]);
    let errors = load_str(FULL, &env_auth).expect_err("not a table");
    assert_eq!(keys(&errors), ["primary.auth"]);
    assert!(!errors.to_string().contains("tok-2231-secret"), "{errors}");
    // A malformed `${` inside a secret: an error without the value.
    let text = FULL.replace("${PRIMARY_SECRET}", "abc${not closed-x9q");
    let errors = load_str(&text, &self::env()).expect_err("malformed reference");
    assert!(!errors.to_string().contains("x9q"), "{errors}");
    // A number key given a word through the environment names the key.
    let env = MapEnv::from_pairs([
        ("ICERELAY__PROXY_WORKERS", "many"),
        ("PRIMARY_SECRET", "p"),
        ("S3_SECRET", "s"),
        ("REPLICA_SECRET", "r"),
    ]);
    let errors = load_str(FULL, &env).expect_err("not a number");
    assert_eq!(keys(&errors), ["proxy_workers"]);
}

#[test]
fn a_destination_that_is_the_primary_is_refused() {
    let text =
        FULL.replace("uri = \"http://127.0.0.1:8281\"\nwarehouse = \"replica\"", "uri = \"http://127.0.0.1:8181/\"");
    let errors = load_str(&text, &env()).expect_err("the primary itself");
    assert_eq!(keys(&errors), ["destinations[0].uri"]);
    assert!(errors.to_string().contains("is the primary itself"), "{errors}");
    // The same catalog with another warehouse is a different replica target.
    let text = FULL.replace("uri = \"http://127.0.0.1:8281\"", "uri = \"http://127.0.0.1:8181\"");
    load_str(&text, &env()).expect("another warehouse of the same catalog");
}

#[test]
fn a_reachable_admin_listener_needs_a_token_or_an_explicit_opt_out() {
    let open = FULL.replace("admin_listen = \"127.0.0.1:9182\"", "admin_listen = \"0.0.0.0:9182\"");
    let errors = load_str(&open, &env()).expect_err("open admin listener");
    assert_eq!(keys(&errors), ["admin_listen"]);
    assert!(errors.to_string().contains("admin_token"), "{errors}");
    let with_token = format!("admin_token = \"${{ADMIN}}\"\n{open}");
    let env =
        MapEnv::from_pairs([("PRIMARY_SECRET", "p"), ("S3_SECRET", "s"), ("REPLICA_SECRET", "r"), ("ADMIN", "t0k")]);
    let c = load_str(&with_token, &env).expect("token set");
    assert_eq!(c.admin.token.as_ref().map(Secret::expose), Some("t0k"));
    assert!(!c.admin.open_reads);
    let allowed = format!("admin_allow_unauthenticated = true\n{open}");
    assert_eq!(load_str(&allowed, &env).expect("explicitly open").admin.token, None);
}

#[test]
fn the_admin_token_can_come_from_a_file() {
    let dir = tempfile::tempdir().expect("dir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "  from-file\n").expect("write");
    let config = dir.path().join("icerelay.toml");
    std::fs::write(
        &config,
        format!("admin_token_file = {:?}\n[primary]\nuri = \"http://127.0.0.1:8181\"\n", token_file),
    )
    .expect("write");
    let c = load(Some(&config), &Overrides::default(), &MapEnv::default()).expect("valid");
    assert_eq!(c.admin.token.as_ref().map(Secret::expose), Some("from-file"));
    std::fs::write(&token_file, "\n").expect("write");
    let errors = load(Some(&config), &Overrides::default(), &MapEnv::default()).expect_err("empty");
    assert_eq!(keys(&errors), ["admin_token_file"]);
}

#[test]
fn connection_limits_have_defaults_and_are_checked() {
    let c = load_str(FULL, &env()).expect("valid");
    assert_eq!(c.connections, ConnectionLimits::default());
    let text = format!("header_read_timeout = \"0s\"\nmax_connections_per_worker = 0\n{FULL}");
    let errors = load_str(&text, &env()).expect_err("zero");
    assert_eq!(keys(&errors), ["header_read_timeout", "max_connections_per_worker"]);
}

#[test]
fn engine_auth_sigv4_needs_sigv4_credentials_and_a_loopback_listener() {
    let sigv4 = "{ type = \"sigv4\", service = \"s3tables\", region = \"us-east-1\" }";
    let text = |auth: &str, listen: &str, extra: &str| {
        format!(
            "listen = \"{listen}\"\n[primary]\nuri = \"http://127.0.0.1:8181\"\nauth = {auth}\nengine_auth = \"sigv4\"\n{extra}"
        )
    };
    let c = load_str(&text(sigv4, "127.0.0.1:9181", ""), &MapEnv::default()).expect("a loopback sidecar");
    assert_eq!(c.primary.engine_auth, EngineAuth::SigV4);
    let errors =
        load_str(&text("{ type = \"none\" }", "127.0.0.1:9181", ""), &MapEnv::default()).expect_err("no signer");
    assert_eq!(keys(&errors), ["primary.engine_auth"]);
    let errors = load_str(&text(sigv4, "0.0.0.0:9181", ""), &MapEnv::default()).expect_err("reachable");
    assert_eq!(keys(&errors), ["listen"]);
    assert!(errors.to_string().contains("allow_remote_engines"), "{errors}");
    load_str(&text(sigv4, "0.0.0.0:9181", "allow_remote_engines = true"), &MapEnv::default())
        .expect("explicitly allowed");
    let errors =
        load_str(&text(sigv4, "127.0.0.1:9181", "").replace("\"sigv4\"\n", "\"forward\"\n"), &MapEnv::default())
            .expect_err("unknown mode");
    assert_eq!(keys(&errors), ["primary.engine_auth"]);
}

#[test]
fn replica_write_settings_are_checked() {
    let with = |extra: &str| FULL.replace("path_style = true\n", &format!("path_style = true\n{extra}\n"));
    let c = load_str(&with("sse = \"aws:kms\"\nsse_kms_key_id = \"k1\"\nstorage_class = \"STANDARD_IA\""), &env())
        .expect("valid");
    match &c.storage[0].kind {
        StorageKind::S3 { sse, storage_class, .. } => {
            assert_eq!(sse, &Some(Sse::Kms { key_id: Some("k1".into()) }));
            assert_eq!(storage_class.as_deref(), Some("STANDARD_IA"));
        }
        other => panic!("{other:?}"),
    }
    let errors = load_str(&with("sse = \"aes256\"\nstorage_class = \"cold\""), &env()).expect_err("invalid");
    assert_eq!(keys(&errors), ["storage[0].sse", "storage[0].storage_class"]);
    let errors = load_str(&with("sse = \"AES256\"\nsse_kms_key_id = \"k1\""), &env()).expect_err("key without kms");
    assert_eq!(keys(&errors), ["storage[0].sse_kms_key_id"]);
}

#[test]
fn tls_settings_come_in_pairs_and_ca_files_only_with_https() {
    let text = r#"
tls_cert_file = "/etc/icerelay/tls.crt"
admin_tls_key_file = "/etc/icerelay/admin.key"
[primary]
uri = "http://127.0.0.1:8181"
ca_file = "/etc/icerelay/ca.pem"
[[storage]]
prefix = "file:///data/"
ca_file = "/etc/icerelay/ca.pem"
[[destinations]]
name = "dr"
uri = "https://replica.example:8443"
ca_file = ""
"#;
    let errors = load_str(text, &env()).expect_err("invalid");
    let mut found = keys(&errors);
    found.sort_unstable();
    assert_eq!(
        found,
        ["admin_tls_cert_file", "destinations[0].ca_file", "primary.ca_file", "storage[0].ca_file", "tls_key_file"],
        "{errors}"
    );
    let text = errors.to_string();
    assert!(text.contains("tls_key_file: is required with tls_cert_file"), "{text}");
    assert!(text.contains("applies only to https, and http://127.0.0.1:8181/ is http"), "{text}");

    let valid = load_str(
        r#"
tls_cert_file = "/etc/icerelay/tls.crt"
tls_key_file = "/etc/icerelay/tls.key"
[primary]
uri = "https://catalog.example"
ca_file = "/etc/icerelay/ca.pem"
"#,
        &env(),
    )
    .expect("valid");
    assert_eq!(valid.tls.map(|t| t.key_file), Some(PathBuf::from("/etc/icerelay/tls.key")));
    assert_eq!(valid.primary.ca_file, Some(PathBuf::from("/etc/icerelay/ca.pem")));
}

#[test]
fn tls_files_are_read_when_the_file_is_loaded() {
    let dir = tempfile::tempdir().expect("dir");
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate").expect("write");
    let config = dir.path().join("icerelay.toml");
    let missing = dir.path().join("tls.crt");
    std::fs::write(
        &config,
        format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n[primary]\nuri = \"https://catalog.example\"\nca_file = \"{}\"\n",
            missing.display(),
            missing.display(),
            not_pem.display()
        ),
    )
    .expect("write");
    let errors = load(Some(&config), &Overrides::default(), &env()).expect_err("unusable files");
    assert_eq!(keys(&errors), ["tls_cert_file", "primary.ca_file"], "{errors}");
    let text = errors.to_string();
    assert!(text.contains(&format!("cannot read {}", missing.display())), "{text}");
    assert!(text.contains("holds no PEM certificate"), "{text}");
}

#[test]
fn a_postgres_state_is_checked_without_ever_showing_its_url() {
    let with = |state: &str, env: &[(&str, &str)]| {
        let mut vars = env.to_vec();
        vars.extend([("PRIMARY_SECRET", "p"), ("S3_SECRET", "s"), ("REPLICA_SECRET", "r")]);
        load_str(&format!("{state}\n{FULL}"), &MapEnv::from_pairs(vars))
    };
    let url = "postgres://icerelay:hunter2@db.internal:5433/relay";
    let ok = with("state = { type = \"postgres\", url = \"${PG}\", schema = \"relay_state\" }", &[("PG", url)])
        .expect("valid");
    let StateBackend::Postgres(settings) = &ok.state else { panic!("postgres: {:?}", ok.state) };
    assert_eq!(settings.url.expose(), url);
    assert_eq!(settings.schema, "relay_state");
    assert!(!format!("{ok:?}").contains("hunter2"), "Debug never shows the URL");
    assert!(ok.replication.replicate);

    let errors = with("state = { type = \"postgres\" }", &[]).expect_err("no url");
    assert_eq!(keys(&errors), ["state.url"]);
    let errors = with("state = { type = \"postgres\", url = \"${PG}\", schema = \"Bad-Name\" }", &[("PG", url)])
        .expect_err("bad schema");
    assert_eq!(keys(&errors), ["state.schema"]);
    let errors = with(
        "state = { type = \"postgres\", url = \"${PG}\" }",
        &[("PG", "postgres://u:hunter2@h/db?sslmode=sometimes")],
    )
    .expect_err("bad url");
    assert_eq!(keys(&errors), ["state.url"]);
    assert!(!errors.to_string().contains("hunter2"), "{errors}");
    // An unencoded '@' in the password would put part of it in the host, which messages name.
    let errors = with("state = { type = \"postgres\", url = \"${PG}\" }", &[("PG", "postgres://u:hun@ter2@db/x")])
        .expect_err("unencoded @");
    assert_eq!(keys(&errors), ["state.url"]);
    assert!(errors.to_string().contains("%40") && !errors.to_string().contains("ter2"), "{errors}");
    let errors = with("state = { type = \"mysql\" }", &[]).expect_err("unknown type");
    assert_eq!(keys(&errors), ["state.type"]);
    let errors = with("state = { url = \"${PG}\" }", &[("PG", url)]).expect_err("url without postgres");
    assert_eq!(keys(&errors), ["state.url"]);
    // A hint-only instance needs somebody else to read its hints.
    let sidecar = format!("{FULL}\n[replication]\nreplicate = false\n");
    let env = MapEnv::from_pairs([("PRIMARY_SECRET", "p"), ("S3_SECRET", "s"), ("REPLICA_SECRET", "r")]);
    let errors = load_str(&sidecar, &env).expect_err("sidecar on sqlite");
    assert_eq!(keys(&errors), ["replication.replicate"]);
}
