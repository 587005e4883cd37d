//! `xks-proxy kms-commands`: the AWS CLI commands it prints are run, as an
//! operator would run them, by bash, with `aws` standing for
//! `scripts/awscli-parse.py`: the awscli package's own driver parses every
//! argument and validates the parameters against the KMS and EC2 service
//! models (plus the model's enums and patterns, and the members KMS requires
//! for external key stores), answers from canned responses, and never
//! reaches the network. Each call is logged, so the test checks what KMS
//! would be sent: the config's URI path and access key id, and the secret
//! read from its file (or variable) at run time, never printed.
//!
//! The awscli package (pinned) comes from the venv `scripts/check-deploy.sh
//! --python` creates or finds; without network access on first use, that
//! fails with pip's message.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::*;
use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The venv python that has the pinned awscli (created once per run).
fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo().join("scripts/check-deploy.sh"))
            .arg("--python")
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "scripts/check-deploy.sh --python failed (it installs the pinned awscli into a venv):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        PathBuf::from(path)
    })
}

/// A proxy configuration (the test harness's) with its certificates,
/// PIN and secret files, and no proxy running: `kms-commands` only reads it.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    secret_a: String,
    secret_b: String,
    secret_other: String,
}

/// Writes a secret as `credentials new` makes them (32 bytes in base64),
/// mode 600; returns it.
fn write_secret(dir: &Path, name: &str, byte: u8) -> String {
    use base64::Engine;
    let s = base64::engine::general_purpose::STANDARD.encode([byte; 32]);
    write_private(&dir.join(name), &format!("{s}\n"));
    s
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let secret_a = write_secret(dir.path(), "secret-a", 0xa1);
    let secret_other = write_secret(dir.path(), "secret-other", 0x07);
    // Credential B's secret is in $XKS_TEST_SECRET_B (the harness's config).
    let secret_b = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode([0xb2; 32])
    };
    write_private(&dir.path().join("hsm-pin"), "1234\n");
    let config = write_config(dir.path(), &certs, &Options::default());
    Setup {
        dir,
        config,
        secret_a,
        secret_b,
        secret_other,
    }
}

impl Setup {
    /// `xks-proxy kms-commands --config ... ARGS`.
    fn kms_commands(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("kms-commands")
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env("XKS_TEST_SECRET_B", &self.secret_b)
            .output()
            .unwrap()
    }

    /// The commands for `args`; asserts success and that no secret is in them.
    fn script(&self, args: &[&str]) -> String {
        let out = self.kms_commands(args);
        assert!(
            out.status.success(),
            "kms-commands {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout).unwrap();
        if !args.contains(&"--show-secret") {
            for secret in [&self.secret_a, &self.secret_b, &self.secret_other] {
                assert!(
                    !script.contains(secret.as_str()),
                    "a secret is printed:\n{script}"
                );
            }
        }
        script
    }

    /// Runs `script` in bash with `aws` = the offline AWS CLI check and
    /// `env`; returns the calls it made, in order.
    fn run(&self, script: &str, env: &[(&str, &str)]) -> Vec<Value> {
        let log = self.dir.path().join("aws-calls.jsonl");
        let _ = std::fs::remove_file(&log);
        let file = self.dir.path().join("commands.sh");
        std::fs::write(
            &file,
            format!(
                "set -euo pipefail\naws() {{ '{}' '{}' \"$@\"; }}\n{script}",
                python().display(),
                repo().join("scripts/awscli-parse.py").display()
            ),
        )
        .unwrap();
        let out = Command::new("bash")
            .arg(&file)
            .env("AWSCLI_PARSE_LOG", &log)
            .env_remove("XKS_KEY_ID")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the commands do not pass the AWS CLI's checks:\n{}\n{}\nscript:\n{script}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let calls: Vec<Value> = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for c in &calls {
            assert_eq!(c["problems"], serde_json::json!([]), "{c}");
        }
        calls
    }
}

fn operations(calls: &[Value]) -> Vec<String> {
    calls
        .iter()
        .map(|c| {
            format!(
                "{}:{}",
                c["service"].as_str().unwrap(),
                c["operation"].as_str().unwrap()
            )
        })
        .collect()
}

fn call<'a>(calls: &'a [Value], operation: &str) -> &'a Value {
    &calls
        .iter()
        .find(|c| c["operation"] == operation)
        .unwrap_or_else(|| panic!("no {operation} in {:?}", operations(calls)))["params"]
}

/// Public endpoint: create, connect, poll until CONNECTED, a key for each of
/// the key store's keys; the secret read from its file when the command runs.
#[test]
fn public_endpoint_commands_pass_the_aws_cli_and_carry_the_config() {
    let s = setup();
    let script = s.script(&[
        "--key-store",
        "other",
        "--endpoint",
        "https://xks.example.com",
    ]);
    assert!(script.contains("$(cat "), "{script}");
    let calls = s.run(&script, &[]);
    assert_eq!(
        operations(&calls),
        [
            "kms:CreateCustomKeyStore",
            "kms:ConnectCustomKeyStore",
            "kms:DescribeCustomKeyStores",
            "kms:CreateKey"
        ]
    );
    let create = call(&calls, "CreateCustomKeyStore");
    assert_eq!(create["CustomKeyStoreName"], "other");
    assert_eq!(create["CustomKeyStoreType"], "EXTERNAL_KEY_STORE");
    assert_eq!(create["XksProxyConnectivity"], "PUBLIC_ENDPOINT");
    assert_eq!(create["XksProxyUriEndpoint"], "https://xks.example.com");
    assert_eq!(create["XksProxyUriPath"], OTHER_URI_PATH);
    assert_eq!(
        create["XksProxyAuthenticationCredential"]["AccessKeyId"],
        AKID_OTHER
    );
    assert_eq!(
        create["XksProxyAuthenticationCredential"]["RawSecretAccessKey"],
        s.secret_other.as_str()
    );
    assert!(create.get("XksProxyVpcEndpointServiceName").is_none());
    // The key store id KMS answered flows into the later commands.
    let id = "cks-1234567890abcdef0";
    assert_eq!(
        call(&calls, "ConnectCustomKeyStore")["CustomKeyStoreId"],
        id
    );
    assert_eq!(
        call(&calls, "DescribeCustomKeyStores")["CustomKeyStoreId"],
        id
    );
    let key = call(&calls, "CreateKey");
    assert_eq!(key["Origin"], "EXTERNAL_KEY_STORE");
    assert_eq!(key["CustomKeyStoreId"], id);
    assert_eq!(key["XksKeyId"], "other-key");
}

/// VPC endpoint service: the private DNS name is looked up from the service
/// (and its verification shown), the Region is the service's, and a key
/// store that allows every key takes the key id from $XKS_KEY_ID.
#[test]
fn vpc_endpoint_service_commands_pass_the_aws_cli() {
    let s = setup();
    let service = "com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0";
    let script = s.script(&["--key-store", URI_PATH, "--vpc-endpoint-service", service]);
    assert!(script.contains("--region us-east-1"), "{script}");
    let calls = s.run(&script, &[("XKS_KEY_ID", "key-ed")]);
    assert_eq!(
        operations(&calls),
        [
            "ec2:DescribeVpcEndpointServiceConfigurations",
            "ec2:DescribeVpcEndpointServiceConfigurations",
            "kms:CreateCustomKeyStore",
            "kms:ConnectCustomKeyStore",
            "kms:DescribeCustomKeyStores",
            "kms:CreateKey"
        ]
    );
    assert_eq!(
        call(&calls, "DescribeVpcEndpointServiceConfigurations")["ServiceIds"],
        serde_json::json!(["vpce-svc-0123456789abcdef0"])
    );
    let create = call(&calls, "CreateCustomKeyStore");
    assert_eq!(create["CustomKeyStoreName"], "test");
    assert_eq!(create["XksProxyConnectivity"], "VPC_ENDPOINT_SERVICE");
    assert_eq!(create["XksProxyVpcEndpointServiceName"], service);
    // The canned service's private DNS name.
    assert_eq!(create["XksProxyUriEndpoint"], "https://xks.example.com");
    assert_eq!(create["XksProxyUriPath"], URI_PATH);
    // Credential A: B's age is unknown (a variable), A's file is new.
    assert_eq!(
        create["XksProxyAuthenticationCredential"]["AccessKeyId"],
        AKID_A
    );
    assert_eq!(
        create["XksProxyAuthenticationCredential"]["RawSecretAccessKey"],
        s.secret_a.as_str()
    );
    assert_eq!(call(&calls, "CreateKey")["XksKeyId"], "key-ed");

    // With the private DNS name given, it is not looked up.
    let script = s.script(&[
        "--key-store",
        "test",
        "--vpc-endpoint-service",
        service,
        "--endpoint",
        "https://xks.payments.example.com",
        "--key-id",
        "key-e",
        "--key-id",
        "key-d",
        "--name",
        "payments store",
    ]);
    let calls = s.run(&script, &[]);
    assert_eq!(
        operations(&calls)
            .iter()
            .filter(|o| o.starts_with("ec2:"))
            .count(),
        1,
        "only the verification check"
    );
    let create = call(&calls, "CreateCustomKeyStore");
    assert_eq!(
        create["XksProxyUriEndpoint"],
        "https://xks.payments.example.com"
    );
    assert_eq!(create["CustomKeyStoreName"], "payments store");
    let keys: Vec<&str> = calls
        .iter()
        .filter(|c| c["operation"] == "CreateKey")
        .map(|c| c["params"]["XksKeyId"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["key-e", "key-d"]);
}

/// A credential whose secret is in a variable: the command reads that
/// variable; --show-secret prints the secret itself (and still parses).
#[test]
fn secrets_from_variables_and_shown_secrets() {
    let s = setup();
    let args = [
        "--key-store",
        "test",
        "--endpoint",
        "https://xks.example.com",
        "--access-key-id",
        AKID_B,
        "--key-id",
        "key-ed",
    ];
    let script = s.script(&args);
    assert!(script.contains("${XKS_TEST_SECRET_B:?"), "{script}");
    let calls = s.run(&script, &[("XKS_TEST_SECRET_B", s.secret_b.as_str())]);
    let credential = &call(&calls, "CreateCustomKeyStore")["XksProxyAuthenticationCredential"];
    assert_eq!(credential["AccessKeyId"], AKID_B);
    assert_eq!(credential["RawSecretAccessKey"], s.secret_b.as_str());

    let mut shown = args.to_vec();
    shown.push("--show-secret");
    let script = s.script(&shown);
    assert!(script.contains(&s.secret_b), "{script}");
    let calls = s.run(&script, &[]);
    let credential = &call(&calls, "CreateCustomKeyStore")["XksProxyAuthenticationCredential"];
    assert_eq!(credential["RawSecretAccessKey"], s.secret_b.as_str());
}

/// What KMS would refuse is refused here, with the reason (exit code 2).
#[test]
fn wrong_requests_are_refused_with_the_reason() {
    let s = setup();
    for (args, says) in [
        (
            &[
                "--key-store",
                "nope",
                "--endpoint",
                "https://xks.example.com",
            ][..],
            "no key store has the name or URI path 'nope'",
        ),
        (
            &[
                "--key-store",
                "test",
                "--endpoint",
                "https://xks.example.com:8443",
            ][..],
            "port 443",
        ),
        (
            &[
                "--key-store",
                "test",
                "--endpoint",
                "https://xks.example.com/test/kms/xks/v1",
            ][..],
            "no path",
        ),
        (&["--key-store", "test"][..], "--endpoint"),
        (
            &[
                "--key-store",
                "test",
                "--vpc-endpoint-service",
                "vpce-svc-0123456789abcdef0",
            ][..],
            "com.amazonaws.vpce.REGION.vpce-svc-ID",
        ),
        (
            &[
                "--key-store",
                "test",
                "--vpc-endpoint-service",
                "com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0",
                "--region",
                "eu-west-1",
            ][..],
            "endpoint service is in us-east-1",
        ),
        (
            &[
                "--key-store",
                "test",
                "--endpoint",
                "https://xks.example.com",
                "--access-key-id",
                AKID_OTHER,
            ][..],
            "has no credential",
        ),
        (
            &[
                "--key-store",
                "test",
                "--endpoint",
                "https://xks.example.com",
                "--key-id",
                "a/b",
            ][..],
            "external key ids",
        ),
    ] {
        let out = s.kms_commands(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}

/// The offline check is not a rubber stamp: commands KMS would refuse, or
/// that AWS CLI v1 would mangle, fail it.
#[test]
fn the_offline_aws_cli_check_refuses_wrong_commands() {
    let s = setup();
    for bad in [
        // A required member for external key stores missing.
        "aws kms create-custom-key-store --custom-key-store-name x --custom-key-store-type EXTERNAL_KEY_STORE \
         --xks-proxy-connectivity PUBLIC_ENDPOINT --cli-input-json '{\"XksProxyUriEndpoint\": \"https://xks.example.com\"}' \
         --xks-proxy-uri-path /x/kms/xks/v1",
        // A URI path KMS's pattern refuses.
        "aws kms create-custom-key-store --custom-key-store-name x --custom-key-store-type EXTERNAL_KEY_STORE \
         --xks-proxy-connectivity PUBLIC_ENDPOINT --cli-input-json '{\"XksProxyUriEndpoint\": \"https://xks.example.com\"}' \
         --xks-proxy-uri-path /x/kms/xks/v1/ \
         --xks-proxy-authentication-credential AccessKeyId=TESTACCESSKEYAAAAAAAAAAA,RawSecretAccessKey=oaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaE=",
        // The endpoint as a plain argument: AWS CLI v1 would fetch the URL.
        "aws kms create-custom-key-store --custom-key-store-name x --custom-key-store-type EXTERNAL_KEY_STORE \
         --xks-proxy-connectivity PUBLIC_ENDPOINT --xks-proxy-uri-endpoint https://xks.example.com \
         --xks-proxy-uri-path /x/kms/xks/v1 \
         --xks-proxy-authentication-credential AccessKeyId=TESTACCESSKEYAAAAAAAAAAA,RawSecretAccessKey=oaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaGhoaE=",
        // An option the CLI does not have (not a prefix of one: the AWS CLI
        // v1 accepts unambiguous abbreviations).
        "aws kms create-key --origin EXTERNAL_KEY_STORE --custom-key-store-id cks-1234567890abcdef0 --xks-key-name key-ed",
        // An enum value KMS does not have.
        "aws kms create-key --origin EXTERNAL --custom-key-store-id cks-1234567890abcdef0 --xks-key-id key-ed --key-usage ENCRYPT",
    ] {
        let out = Command::new(python())
            .arg(repo().join("scripts/awscli-parse.py"))
            .args(["--region", "us-east-1"])
            .args(shell_words(bad.strip_prefix("aws ").unwrap()))
            .env("AWSCLI_PARSE_LOG", s.dir.path().join("refused.jsonl"))
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "accepted: {bad}\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// Splits a command line on blanks, honouring single quotes (enough for
/// the commands above).
fn shell_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut started = false;
    for ch in s.chars() {
        match ch {
            '\'' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(word);
    }
    words
}
