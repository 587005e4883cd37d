//! Taking over from the AWS sample proxy (`aws-samples/aws-kms-xks-proxy`)
//! without losing a data key: ciphertexts made the sample's way, directly
//! through PKCS#11 on the proxy's own token, decrypt through the proxy on a
//! key store with `compat = "aws-sample"`; tampered ones are refused; a key
//! store without compat refuses them; our own ciphertexts are unchanged.
//!
//! `import-sample-config` turns the sample's settings into a configuration
//! that serves the same URI path and credential.
//!
//! The ciphertext test points this process's SoftHSM at the proxy's token
//! with `SOFTHSM2_CONF` (the import test passes it to its children only).

mod common;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use common::*;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use xks_proxy::client::{bodies, tls_config, HttpVersion, XksClient, XksResponse};

/// A ciphertext as the sample returned it to KMS.
struct SampleCiphertext {
    ciphertext: Vec<u8>,
    iv: Vec<u8>,
    tag: Vec<u8>,
    metadata: Vec<u8>,
    aad: Option<Vec<u8>>,
}

/// The sample's AAD for the HSM, written out here independently of the
/// proxy's code: `u16_be(len(aad)) || SHA-256(aad) || u8(len(md)) || md`,
/// the digest only when the request carried the AAD field (even empty).
fn sample_hsm_aad(aad: Option<&[u8]>, metadata: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(aad.map_or(0, |a| a.len()) as u16).to_be_bytes());
    if let Some(aad) = aad {
        out.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, aad).as_ref());
    }
    out.push(metadata.len() as u8);
    out.extend_from_slice(metadata);
    out
}

/// Encrypts as the sample does: a 12-byte IV from `C_GenerateRandom`, the
/// sample's AAD, AES-GCM with a 128-bit tag, on the given key.
fn sample_encrypt(
    session: &Session,
    key_label: &str,
    plaintext: &[u8],
    aad: Option<&[u8]>,
    metadata: &[u8],
) -> SampleCiphertext {
    let key = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(key_label.as_bytes().to_vec()),
        ])
        .unwrap()[0];
    let mut iv = session.generate_random_vec(12).unwrap();
    let hsm_aad = sample_hsm_aad(aad, metadata);
    let mut out = {
        let params = GcmParams::new(&mut iv, &hsm_aad, 128.into()).unwrap();
        session
            .encrypt(&Mechanism::AesGcm(params), key, plaintext)
            .unwrap()
    };
    let tag = out.split_off(plaintext.len());
    SampleCiphertext {
        ciphertext: out,
        iv,
        tag,
        metadata: metadata.to_vec(),
        aad: aad.map(<[u8]>::to_vec),
    }
}

fn decrypt_body(ct: &SampleCiphertext) -> Value {
    let mut encrypted = json!({
        "ciphertext": B64.encode(&ct.ciphertext),
        "initializationVector": B64.encode(&ct.iv),
        "authenticationTag": B64.encode(&ct.tag),
    });
    if !ct.metadata.is_empty() {
        encrypted["ciphertextMetadata"] = B64.encode(&ct.metadata).into();
    }
    bodies::decrypt_from(&encrypted, ct.aad.as_deref())
}

fn decrypt(c: &XksClient, key: &str, body: &Value) -> XksResponse {
    block_on(c.call(&format!("/keys/{key}/decrypt"), body.to_string())).unwrap()
}

fn plaintext_of(r: &XksResponse) -> Vec<u8> {
    assert_eq!(r.status, 200, "{:?}", r.body);
    B64.decode(r.json()["plaintext"].as_str().unwrap()).unwrap()
}

fn compat_count(p: &Proxy, store: &str) -> u64 {
    let (_, metrics) = p.admin_get("/metrics");
    metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "xks_compat_decrypts_total{{key_store=\"{store}\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn ciphertexts_of_the_aws_sample_decrypt_where_compat_is_on_and_only_there() {
    let p = Proxy::start_with(Options {
        extra_key_store: "compat = \"aws-sample\"\ncompat_metadata_b64 = \"djAuMC4x\"".into(),
        ..Options::default()
    });
    // Before any other thread of this process touches the environment.
    std::env::set_var("SOFTHSM2_CONF", &p.hsm.conf);
    let pkcs11 = Pkcs11::new(SOFTHSM).unwrap();
    pkcs11
        .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .unwrap();
    let slot = pkcs11
        .get_slots_with_initialized_token()
        .unwrap()
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).unwrap().label().trim() == "xks-test")
        .unwrap();
    let session = pkcs11.open_rw_session(slot).unwrap();
    session
        .login(
            UserType::User,
            Some(&AuthPin::new(p.hsm.pin.clone().into())),
        )
        .unwrap();

    let c = p.h1();
    let aad = b"project=nile,department=marketing";
    let data_key = b"a 32-byte data key from KMS ....";
    let static_md = b"v0.0.1"; // "djAuMC4x", the sample's own example
    /// What the case is, the request's AAD field, the sample's metadata.
    type Case<'a> = (&'a str, Option<&'a [u8]>, &'a [u8]);
    let cases: Vec<Case> = vec![
        ("no AAD, no metadata", None, b""),
        ("AAD, no metadata", Some(aad), b""),
        ("empty AAD field", Some(b""), b""),
        ("AAD and the sample's static metadata", Some(aad), static_md),
        ("static metadata, no AAD", None, static_md),
    ];
    let mut expected_compat = 0;
    for (what, case_aad, md) in &cases {
        let ct = sample_encrypt(&session, "key-ed", data_key, *case_aad, md);
        let r = decrypt(&c, "key-ed", &decrypt_body(&ct));
        assert_eq!(plaintext_of(&r), data_key, "{what}");
        // Without an AAD field the two constructions coincide: no compat needed.
        if case_aad.is_some() {
            expected_compat += 1;
        }
        assert_eq!(compat_count(&p, "test"), expected_compat, "{what}");

        // Tampered: every field is bound into the tag.
        let mut tampered = vec![];
        let mut t = decrypt_body(&ct);
        let mut bytes = ct.ciphertext.clone();
        bytes[0] ^= 1;
        t["ciphertext"] = B64.encode(&bytes).into();
        tampered.push(("ciphertext", t));
        let mut t = decrypt_body(&ct);
        t["additionalAuthenticatedData"] = B64.encode(b"project=amazon").into();
        tampered.push(("AAD", t));
        let mut t = decrypt_body(&ct);
        let mut tag = ct.tag.clone();
        tag[15] ^= 0x80;
        t["authenticationTag"] = B64.encode(&tag).into();
        tampered.push(("tag", t));
        let mut t = decrypt_body(&ct);
        t["ciphertextMetadata"] = B64.encode(b"v0.0.2").into();
        tampered.push(("metadata", t));
        for (field, body) in tampered {
            let r = decrypt(&c, "key-ed", &body);
            assert_eq!(r.status, 400, "{what}, tampered {field}: {:?}", r.body);
            assert_eq!(
                r.error_name().as_deref(),
                Some("InvalidCiphertextException"),
                "{what}, tampered {field}"
            );
        }
        assert_eq!(compat_count(&p, "test"), expected_compat, "{what}");
    }

    // The key store without compat refuses the sample's ciphertexts with AAD,
    // and still reads the ones without (the constructions coincide).
    let other = c
        .with_uri_path(OTHER_URI_PATH)
        .with_credentials(AKID_OTHER, &p.secret_other);
    let with_aad = sample_encrypt(&session, "other-key", data_key, Some(aad), b"");
    let r = decrypt(&other, "other-key", &decrypt_body(&with_aad));
    assert_eq!(
        r.error_name().as_deref(),
        Some("InvalidCiphertextException"),
        "{:?}",
        r.body
    );
    let without = sample_encrypt(&session, "other-key", data_key, None, b"");
    assert_eq!(
        plaintext_of(&decrypt(&other, "other-key", &decrypt_body(&without))),
        data_key
    );
    assert_eq!(compat_count(&p, "other"), 0);

    // Ciphertexts with another proxy's metadata than the configured static
    // one are not tried the sample's way.
    let foreign = sample_encrypt(&session, "key-ed", data_key, Some(aad), b"other");
    let r = decrypt(&c, "key-ed", &decrypt_body(&foreign));
    assert_eq!(
        r.error_name().as_deref(),
        Some("InvalidCiphertextException")
    );

    // Our own ciphertexts are unchanged by compat: Encrypt always writes our
    // metadata and construction, and it decrypts without the compat path.
    let before = compat_count(&p, "test");
    let enc = block_on(c.call(
        "/keys/key-ed/encrypt",
        bodies::encrypt(data_key, Some(aad), true),
    ))
    .unwrap();
    assert_eq!(enc.status, 200, "{:?}", enc.body);
    assert_eq!(enc.json()["ciphertextMetadata"], "AQ==");
    let ours = bodies::decrypt_from(&enc.json(), Some(aad));
    assert_eq!(plaintext_of(&decrypt(&c, "key-ed", &ours)), data_key);
    // Ours, made the sample's way, would not authenticate: a ciphertext with
    // our metadata is never tried the other way.
    let lookalike = sample_encrypt(&session, "key-ed", data_key, Some(aad), &[0x01]);
    let r = decrypt(&c, "key-ed", &decrypt_body(&lookalike));
    assert_eq!(
        r.error_name().as_deref(),
        Some("InvalidCiphertextException")
    );
    assert_eq!(compat_count(&p, "test"), before);
    let _ = session.logout();
}

/// The sample's settings for a SoftHSM token, as an operator would have them.
fn sample_settings(dir: &Path, hsm: &TestToken, certs: &Certs, secret: &str) -> String {
    format!(
        r#"
[server]
ip = "127.0.0.1"
port = 443
port_http_ping = 80
region = "us-east-1"
service = "kms-xks-proxy"
ciphertext_metadata_b64 = "djAuMC4x"

[server.tcp_keepalive]
tcp_keepalive_secs = 60

[tracing]
is_stdout_writer_enabled = true
is_file_writer_enabled = false
level = "INFO"

[security]
is_sigv4_auth_enabled = true
is_tls_enabled = true
is_mtls_enabled = false
secondary_auth = "Oso"

[security.oso]
polar_file_path = "configuration/oso.polar"

[tls]
tls_cert_pem = "{cert}"
tls_key_pem = "{key}"

[[external_key_stores]]
uri_path_prefix = "/example/uri/path/prefix"
sigv4_access_key_id = "{AKID_A}"
sigv4_secret_access_key = "{secret}"
xks_key_id_set = ["key-ed", "foo"]

[pkcs11]
session_pool_max_size = 4
session_pool_timeout_milli = 0
session_eager_close = false
user_pin = "{pin}"
PKCS11_HSM_MODULE = "{SOFTHSM}"
context_read_timeout_milli = 10

[limits]
max_plaintext_in_base64 = 8192
max_aad_in_base64 = 16384

[hsm_capabilities]
can_generate_iv = false
is_zero_iv_required = false
"#,
        cert = certs.cert.strip_prefix(dir).unwrap().display(),
        key = certs.key.strip_prefix(dir).unwrap().display(),
        pin = hsm.pin,
    )
}

#[test]
fn import_sample_config_keeps_uri_path_and_credentials_and_moves_secrets_to_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let hsm = make_token(dir.path(), "sample-token");
    let certs = make_certs(dir.path());
    let secret = "PleaseReplaceThisWithSomeSecretOfLength43To64";
    let settings = dir.path().join("settings.toml");
    std::fs::write(&settings, sample_settings(dir.path(), &hsm, &certs, secret)).unwrap();
    let out_dir = dir.path().join("imported");

    let out = Command::new(bin())
        .arg("import-sample-config")
        .arg(&settings)
        .arg("--out")
        .arg(&out_dir)
        .env("SOFTHSM2_CONF", &hsm.conf)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("check-config: OK"), "{report}");
    for unmapped in ["Oso", "tcp_keepalive", "limits"] {
        assert!(report.contains(unmapped), "{unmapped}: {report}");
    }
    // No secret in the report or the config; each in its own 0600 file.
    let config = std::fs::read_to_string(out_dir.join("config.toml")).unwrap();
    for s in [secret, hsm.pin.as_str()] {
        assert!(!report.contains(s) && !config.contains(s));
    }
    for (file, content) in [
        ("hsm-pin", hsm.pin.as_str()),
        ("secrets/example-uri-path-prefix.secret", secret),
    ] {
        let path = out_dir.join(file);
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim_end(), content);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{file} is {mode:o}");
    }
    assert!(
        config.contains("token_label = \"sample-token\""),
        "{config}"
    );
    assert!(config.contains("compat = \"aws-sample\""), "{config}");
    assert!(
        config.contains("compat_metadata_b64 = \"djAuMC4x\""),
        "{config}"
    );

    // Refuses to overwrite.
    let again = Command::new(bin())
        .arg("import-sample-config")
        .arg(&settings)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));

    // The imported proxy answers the sample's URI path and credential: KMS
    // needs no UpdateCustomKeyStore.
    let mut child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(out_dir.join("config.toml"))
        .args(["--listen", "127.0.0.1:0", "--ping-listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .env("SOFTHSM2_CONF", &hsm.conf)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let addr = listening_addr(&mut child);
    let client = XksClient::new(
        addr,
        "localhost",
        "/example/uri/path/prefix/kms/xks/v1",
        AKID_A,
        secret,
        "us-east-1",
        tls_config(&certs.ca, HttpVersion::Http2).unwrap(),
        HttpVersion::Http2,
    );
    let r = block_on(client.call("/health", bodies::health("ConnectCustomKeyStore"))).unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["ekmFleetDetails"][0]["healthStatus"], "ACTIVE");
    // The sample's region is pinned: a request signed for another is refused.
    let elsewhere = XksClient::new(
        addr,
        "localhost",
        "/example/uri/path/prefix/kms/xks/v1",
        AKID_A,
        secret,
        "eu-west-1",
        tls_config(&certs.ca, HttpVersion::Http1).unwrap(),
        HttpVersion::Http1,
    );
    let r = block_on(elsewhere.call("/health", bodies::health("KmsHealthCheck"))).unwrap();
    assert_eq!(r.status, 401, "{:?}", r.body);
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads the proxy's log until its "listening" line; returns the XKS address.
fn listening_addr(child: &mut std::process::Child) -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader};
    let stderr = child.stderr.take().unwrap();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if v["message"] == "listening" {
                return v["https_addr"].as_str().unwrap().parse().unwrap();
            }
        }
    }
    panic!("the imported proxy did not start");
}
