use super::*;

const SAMPLE: &str = r#"
[server]
ip = "0.0.0.0"
port = 443
region = "eu-west-1"
service = "kms-xks-proxy"
ciphertext_metadata_b64 = "djAuMC4x"
[server.tcp_keepalive]
tcp_keepalive_secs = 60
[tracing]
is_stdout_writer_enabled = true
is_file_writer_enabled = true
level = "DEBUG"
[security]
is_sigv4_auth_enabled = true
is_tls_enabled = true
is_mtls_enabled = true
secondary_auth = "Oso"
[tls]
tls_cert_pem = "tls/server_cert.pem"
tls_key_pem = "tls/server_key.pem"
mtls_client_ca_pem = "tls/client_ca.pem"
mtls_client_dns_name = "cks.kms.eu-west-1.amazonaws.com"
[[external_key_stores]]
uri_path_prefix = "/example/uri/path/prefix"
sigv4_access_key_id = "BETWEEN2TENAND3TENCHARACTERS"
sigv4_secret_access_key = "PleaseReplaceThisWithSomeSecretOfLength43To64"
xks_key_id_set = ["foo", "bar"]
[[external_key_stores]]
uri_path_prefix = ""
sigv4_access_key_id = "AKIA2222222222222222"
sigv4_secret_access_key = "AnotherSecretOfLength43To64AnotherSecret4364"
xks_key_id_set = ["foo"]
[pkcs11]
session_pool_max_size = 30
user_pin = "1q@W3e$R"
PKCS11_HSM_MODULE = "/usr/lib/pkcs11-logger.so"
context_read_timeout_milli = 10
session_pool_timeout_milli = 500
session_eager_close = false
[pkcs11_logger]
PKCS11_LOGGER_LIBRARY_PATH = "/usr/safenet/lunaclient/lib/libCryptoki2_64.so"
PKCS11_LOGGER_LOG_FILE_PATH = "/var/log/pkcs11.log"
PKCS11_LOGGER_FLAGS = 0
[limits]
max_plaintext_in_base64 = 8192
max_aad_in_base64 = 16384
[hsm_capabilities]
can_generate_iv = true
is_zero_iv_required = false
"#;

#[test]
fn maps_every_setting_and_moves_secrets_to_files() {
    let out =
        import_sample_settings(SAMPLE, Path::new("/etc/sample"), |_| Some("luna".into())).unwrap();
    let cfg: Table = out.config.parse().unwrap();
    assert_eq!(cfg["server"]["listen"].as_str(), Some("0.0.0.0:443"));
    assert_eq!(cfg["server"]["ping_listen"].as_str(), Some("0.0.0.0:80"));
    assert_eq!(
        cfg["tls"]["cert"].as_str(),
        Some("/etc/sample/tls/server_cert.pem")
    );
    assert_eq!(
        cfg["tls"]["client_names"][0].as_str(),
        Some("cks.kms.eu-west-1.amazonaws.com")
    );
    assert_eq!(
        cfg["hsm"]["module"].as_str(),
        Some("/usr/safenet/lunaclient/lib/libCryptoki2_64.so")
    );
    assert_eq!(cfg["hsm"]["token_label"].as_str(), Some("luna"));
    assert_eq!(
        cfg["hsm"]["iv_source"].as_str(),
        Some("hsm-generated-appended")
    );
    assert_eq!(cfg["logging"]["level"].as_str(), Some("debug"));
    let stores = cfg["key_stores"].as_array().unwrap();
    assert_eq!(
        stores[0]["uri_path"].as_str(),
        Some("/example/uri/path/prefix/kms/xks/v1")
    );
    assert_eq!(stores[1]["uri_path"].as_str(), Some("/kms/xks/v1"));
    assert_eq!(stores[0]["compat"].as_str(), Some("aws-sample"));
    assert_eq!(stores[0]["compat_metadata_b64"].as_str(), Some("djAuMC4x"));
    assert_eq!(stores[0]["region"].as_str(), Some("eu-west-1"));
    // No secret is in the config text or the report.
    for secret in [
        "1q@W3e$R",
        "PleaseReplaceThisWithSomeSecretOfLength43To64",
        "AnotherSecretOfLength43To64AnotherSecret4364",
    ] {
        assert!(!out.config.contains(secret));
        assert!(!out.mapped.concat().contains(secret));
        assert!(out
            .secret_files
            .iter()
            .any(|f| f.content.as_str() == secret));
    }
    let unmapped = out.unmapped.join("\n");
    for expected in [
        "Oso",
        "tcp_keepalive",
        "limits",
        "stderr",
        "pkcs11.context_read_timeout_milli = 10: not carried over; instead: hsm.operation_timeout_ms",
        "pkcs11.session_pool_timeout_milli = 500: not carried over; instead: hsm.queue_timeout_ms",
        "pkcs11.session_eager_close = false",
        "pkcs11_logger.PKCS11_LOGGER_FLAGS",
        "pkcs11_logger.PKCS11_LOGGER_LOG_FILE_PATH",
    ] {
        assert!(unmapped.contains(expected), "{expected}: {unmapped}");
    }
}

/// The sample serves /ping on its main listener when both ports are
/// one (several of its shipped settings files do): before, the import
/// wrote two listeners on one address and `serve` could not bind.
#[test]
fn one_port_for_both_becomes_one_listener_that_validates() {
    let one = SAMPLE.replace("port = 443", "port = 443\nport_http_ping = 443");
    let out = import_sample_settings(&one, Path::new("/x"), |_| Some("t".into())).unwrap();
    let cfg: Table = out.config.parse().unwrap();
    assert_eq!(cfg["server"]["listen"].as_str(), Some("0.0.0.0:443"));
    assert!(cfg["server"].get("ping_listen").is_none(), "{}", out.config);
    assert!(out.mapped.concat().contains("no separate ping_listen"));
}

/// The sample's `is_tls_enabled = false` (TLS ended at the load
/// balancer) maps to `tls.termination = "load-balancer"`; its mTLS
/// settings cannot apply there and are named.
#[test]
fn tls_off_in_the_sample_is_tls_at_the_load_balancer() {
    let off = SAMPLE.replace("is_tls_enabled = true", "is_tls_enabled = false");
    let out = import_sample_settings(&off, Path::new("/x"), |_| Some("t".into())).unwrap();
    let cfg: Table = out.config.parse().unwrap();
    assert_eq!(cfg["tls"]["termination"].as_str(), Some("load-balancer"));
    assert!(cfg["tls"].get("cert").is_none(), "{}", out.config);
    assert!(out.mapped.concat().contains("tls.termination"));
    let unmapped = out.unmapped.join("\n");
    assert!(
        unmapped.contains("security.is_mtls_enabled: mutual TLS needs TLS at the proxy"),
        "{unmapped}"
    );
    assert!(
        unmapped.contains("tls.tls_cert_pem: not used"),
        "{unmapped}"
    );
}

/// The sample accepts one access key id for two prefixes; this proxy
/// does not, and the import says so before check-config does.
#[test]
fn a_shared_access_key_id_is_reported() {
    let shared = SAMPLE.replace("AKIA2222222222222222", "BETWEEN2TENAND3TENCHARACTERS");
    let out = import_sample_settings(&shared, Path::new("/x"), |_| Some("t".into())).unwrap();
    let unmapped = out.unmapped.join("\n");
    assert!(
        unmapped.contains("access key id BETWEEN2TENAND3TENCHARACTERS is also the one of prefix"),
        "{unmapped}"
    );
}

#[test]
fn an_unknown_token_is_reported() {
    let out = import_sample_settings(SAMPLE, Path::new("/x"), |_| None).unwrap();
    assert!(out.config.contains("CHANGE-ME"));
    assert!(out.unmapped.join("\n").contains("token_label"));
}
