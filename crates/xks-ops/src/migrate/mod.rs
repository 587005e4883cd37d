//! Taking over from the AWS sample proxy: its settings file, as our config.
//!
//! `aws-samples/aws-kms-xks-proxy` keeps everything in one TOML file: the
//! listener, TLS and mTLS, the PKCS#11 module and the user PIN in clear, and
//! per logical key store its URI path prefix, its one SigV4 credential (the
//! secret in clear) and its key ids. [`import_sample_settings`] turns that
//! into this proxy's configuration, with every secret moved to a file of its
//! own, and lists what it could not carry over, so an operator can switch
//! behind the same NLB without touching KMS: same URI paths, same
//! credentials, same HSM and key labels. Each key store gets
//! `compat = "aws-sample"`, so that the ciphertexts the sample wrote keep
//! decrypting (see `spec::aead::AadLayout::AwsSample`).
//!
//! The conversion is pure: the caller writes the files, and tells it the
//! label of the token the sample would have used (the sample logs in to the
//! first slot its module lists), which only the module itself knows.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use toml::{Table, Value};
use zeroize::Zeroizing;

/// Why the settings could not be converted.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Only the parser's message and position: its full display quotes the
    /// offending line, which in the sample's file may hold the HSM PIN.
    #[error("not a TOML file: {message} (at byte {at})")]
    Toml { message: String, at: usize },
    #[error("{field}: {problem}")]
    Field { field: String, problem: String },
}

fn field_error(field: &str, problem: impl Into<String>) -> ImportError {
    ImportError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

/// A file the import writes next to the config (mode 0600: they hold secrets).
pub struct SecretFile {
    /// Relative to the output directory.
    pub path: PathBuf,
    pub content: Zeroizing<String>,
}

/// The result: the config text, the secret files, and the report.
pub struct Imported {
    pub config: String,
    pub secret_files: Vec<SecretFile>,
    /// What was carried over, one line each (no secret in them).
    pub mapped: Vec<String>,
    /// What was not, and what to do about it.
    pub unmapped: Vec<String>,
    /// The PKCS#11 module the config names (to look up the token label).
    pub module: PathBuf,
}

/// Reads the settings as a loose table, so that a field this import does
/// not know is reported rather than rejected.
struct Settings {
    table: Table,
    seen: BTreeSet<String>,
}

impl Settings {
    fn get(&mut self, section: &str, key: &str) -> Option<Value> {
        let v = self.table.get(section)?.as_table()?.get(key)?.clone();
        self.seen.insert(format!("{section}.{key}"));
        Some(v)
    }

    fn str(&mut self, section: &str, key: &str) -> Result<Option<String>, ImportError> {
        match self.get(section, key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(field_error(&format!("{section}.{key}"), "must be a string")),
        }
    }

    fn int(&mut self, section: &str, key: &str) -> Result<Option<i64>, ImportError> {
        match self.get(section, key) {
            None => Ok(None),
            Some(Value::Integer(i)) => Ok(Some(i)),
            Some(_) => Err(field_error(
                &format!("{section}.{key}"),
                "must be an integer",
            )),
        }
    }

    fn bool(&mut self, section: &str, key: &str) -> Result<Option<bool>, ImportError> {
        match self.get(section, key) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(b)),
            Some(_) => Err(field_error(
                &format!("{section}.{key}"),
                "must be true or false",
            )),
        }
    }

    /// Every `section.key` of the file that nothing read.
    fn unread(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (section, v) in &self.table {
            match v.as_table() {
                Some(t) => {
                    for key in t.keys() {
                        let name = format!("{section}.{key}");
                        if !self.seen.contains(&name) {
                            out.push(name);
                        }
                    }
                }
                None if section != "external_key_stores" => out.push(section.clone()),
                None => {}
            }
        }
        out
    }
}

/// TOML string literal.
fn q(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// A key store name from the sample's URI path prefix.
fn store_name(prefix: &str, index: usize) -> String {
    let name: String = prefix
        .trim_matches('/')
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    if name.is_empty() {
        format!("key-store-{}", index + 1)
    } else {
        name
    }
}

/// Converts the sample's settings text. `settings_dir` resolves the
/// sample's relative paths (it read them from its working directory, usually
/// the settings file's); `token_label` is the label of the token in the
/// first slot of the module, when the caller could look it up.
pub fn import_sample_settings(
    text: &str,
    settings_dir: &Path,
    token_label: impl FnOnce(&Path) -> Option<String>,
) -> Result<Imported, ImportError> {
    let table: Table = text
        .parse()
        .map_err(|e: toml::de::Error| ImportError::Toml {
            message: e.message().to_string(),
            at: e.span().map_or(0, |s| s.start),
        })?;
    let mut s = Settings {
        table,
        seen: BTreeSet::new(),
    };
    let mut mapped = Vec::new();
    let mut unmapped = Vec::new();
    let mut secret_files = Vec::new();
    let abs = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            settings_dir.join(p)
        }
    };

    // [server]
    let ip = s.str("server", "ip")?.unwrap_or_else(|| "0.0.0.0".into());
    let port = s.int("server", "port")?.unwrap_or(443);
    let ping_port = s.int("server", "port_http_ping")?.unwrap_or(80);
    let region = s.str("server", "region")?;
    match s.str("server", "service")?.as_deref() {
        None | Some("kms-xks-proxy") => {}
        Some(other) => unmapped.push(format!(
            "server.service = {other:?}: KMS signs for kms-xks-proxy, which this proxy requires"
        )),
    }
    let metadata_b64 = s.str("server", "ciphertext_metadata_b64")?;
    if s.get("server", "tcp_keepalive").is_some() {
        unmapped.push(
            "server.tcp_keepalive: not configurable; idle connections are closed after \
             server.idle_timeout_secs instead"
                .into(),
        );
    }
    // The sample serves /ping on its main listener when both ports are one;
    // so does this proxy, always (over TLS): no second listener then (it
    // could not bind the same address).
    let ping_line = if ping_port == port {
        mapped.push(format!(
            "server.ip/port -> server.listen = {ip}:{port}; port_http_ping = port: /ping is served \
             on that listener (this proxy always serves it there), no separate ping_listen"
        ));
        String::new()
    } else {
        mapped.push(format!(
            "server.ip/port -> server.listen = {ip}:{port}; port_http_ping -> server.ping_listen = {ip}:{ping_port}"
        ));
        format!("ping_listen = {}\n", q(&format!("{ip}:{ping_port}")))
    };

    // [tracing]
    let level = s
        .str("tracing", "level")?
        .map(|l| l.to_ascii_lowercase())
        .unwrap_or_else(|| "info".into());
    if s.bool("tracing", "is_file_writer_enabled")? == Some(true) {
        unmapped.push(
            "tracing file writer: this proxy logs to stderr (journald, kubectl logs); \
             rotate with the platform's log tooling"
                .into(),
        );
    }
    for key in ["directory", "file_prefix", "rotation_kind"] {
        if s.get("tracing", key).is_some() {
            unmapped.push(format!(
                "tracing.{key}: this proxy writes no log files (stderr only; rotate with the \
                 platform's log tooling)"
            ));
        }
    }
    if s.bool("tracing", "is_stdout_writer_enabled")? == Some(false) {
        unmapped.push(
            "tracing.is_stdout_writer_enabled = false: this proxy always logs (to stderr); \
             logging.level = \"warn\" keeps it quiet"
                .into(),
        );
    }

    // [security]
    if s.bool("security", "is_sigv4_auth_enabled")? == Some(false) {
        unmapped.push(
            "security.is_sigv4_auth_enabled = false: this proxy always verifies SigV4".into(),
        );
    }
    // The sample without TLS sits behind a load balancer that ends it (an
    // NLB TLS listener): the same layout, said by name.
    let tls_at_load_balancer = s.bool("security", "is_tls_enabled")? == Some(false);
    if tls_at_load_balancer {
        mapped.push(
            "security.is_tls_enabled = false -> tls.termination = \"load-balancer\" (the XKS \
             listener speaks plain HTTP behind the load balancer that ends TLS; a warning at \
             every start)"
                .into(),
        );
    }
    let mtls = s.bool("security", "is_mtls_enabled")?.unwrap_or(false);
    if let Some(auth) = s.str("security", "secondary_auth")? {
        unmapped.push(format!(
            "security.secondary_auth = {auth:?}: Oso policies are not translated; write a Cedar \
             policy (config/policies/example.cedar) and set key_stores.authorization"
        ));
    }
    // Reported with secondary_auth.
    s.get("security", "oso");

    // [tls]
    let tls_section = if tls_at_load_balancer {
        for key in [
            "tls_cert_pem",
            "tls_key_pem",
            "mtls_client_ca_pem",
            "mtls_client_dns_name",
        ] {
            if s.get("tls", key).is_some() {
                unmapped.push(format!(
                    "tls.{key}: not used: TLS ends at the load balancer (is_tls_enabled = false)"
                ));
            }
        }
        if mtls {
            unmapped.push(
                "security.is_mtls_enabled: mutual TLS needs TLS at the proxy; with TLS ended at \
                 the load balancer there is no client certificate to check"
                    .into(),
            );
        }
        "[tls]\ntermination = \"load-balancer\"\n".to_string()
    } else {
        let cert = s.str("tls", "tls_cert_pem")?;
        let key = s.str("tls", "tls_key_pem")?;
        let client_ca = s.str("tls", "mtls_client_ca_pem")?;
        let client_name = s.str("tls", "mtls_client_dns_name")?;
        let (cert, key) = match (cert, key) {
            (Some(c), Some(k)) => (abs(&c), abs(&k)),
            _ => {
                unmapped.push(
                    "tls.tls_cert_pem / tls_key_pem missing: set tls.cert and tls.key".into(),
                );
                (
                    PathBuf::from("CHANGE-ME.crt"),
                    PathBuf::from("CHANGE-ME.key"),
                )
            }
        };
        mapped.push(format!(
            "tls.tls_cert_pem/tls_key_pem -> tls.cert = {}, tls.key = {} (the key file must be mode 0600)",
            cert.display(),
            key.display()
        ));
        let mut tls_extra = String::new();
        if mtls {
            match (client_ca, client_name) {
                (Some(ca), Some(name)) => {
                    tls_extra = format!(
                        "client_ca = {}\nclient_names = [{}]\n",
                        q(&abs(&ca).to_string_lossy()),
                        q(&name)
                    );
                    mapped.push(format!(
                        "mTLS -> tls.client_ca, tls.client_names = [{name:?}] (KMS presents \
                         cks.kms.<region>.amazonaws.com)"
                    ));
                }
                _ => unmapped.push(
                    "security.is_mtls_enabled without tls.mtls_client_ca_pem and \
                     mtls_client_dns_name: mTLS not configured"
                        .into(),
                ),
            }
        }
        format!(
            "[tls]\ncert = {}\nkey = {}\n{tls_extra}",
            q(&cert.to_string_lossy()),
            q(&key.to_string_lossy())
        )
    };

    // [pkcs11] and [pkcs11_logger]
    let mut module = s
        .str("pkcs11", "PKCS11_HSM_MODULE")?
        .ok_or_else(|| field_error("pkcs11.PKCS11_HSM_MODULE", "is required"))?;
    if let Some(real) = s.str("pkcs11_logger", "PKCS11_LOGGER_LIBRARY_PATH")? {
        if module.contains("pkcs11-logger") {
            mapped.push(format!(
                "pkcs11-logger in front of {real}: the config loads {real} directly"
            ));
            module = real;
        }
    }
    for key in ["PKCS11_LOGGER_LOG_FILE_PATH", "PKCS11_LOGGER_FLAGS"] {
        if s.get("pkcs11_logger", key).is_some() {
            unmapped.push(format!(
                "pkcs11_logger.{key}: no PKCS#11 call log is written; each HSM call's time is \
                 the metric xks_hsm_call_duration_seconds{{ekm_id,call}}, and the vendor's (or \
                 p11-kit's) own tracing logs the calls"
            ));
        }
    }
    let module = abs(&module);
    let pin = s
        .str("pkcs11", "user_pin")?
        .map(Zeroizing::new)
        .ok_or_else(|| field_error("pkcs11.user_pin", "is required"))?;
    secret_files.push(SecretFile {
        path: PathBuf::from("hsm-pin"),
        content: pin,
    });
    mapped.push("pkcs11.user_pin -> hsm.pin_file = hsm-pin (mode 0600)".into());
    let sessions = s
        .int("pkcs11", "session_pool_max_size")?
        .unwrap_or(8)
        .clamp(1, 64);
    for (key, instead) in [
        (
            "session_pool_timeout_milli",
            "hsm.queue_timeout_ms (how long a request waits for a free session; below 250, \
             default 150) and hsm.operation_timeout_ms",
        ),
        (
            "session_eager_close",
            "nothing: sessions are kept logged in and reused; one that fails is closed and \
             reopened",
        ),
        (
            "context_read_timeout_milli",
            "hsm.operation_timeout_ms bounds every HSM operation (below 250, default 200)",
        ),
    ] {
        if let Some(v) = s.get("pkcs11", key) {
            unmapped.push(format!(
                "pkcs11.{key} = {v}: not carried over; instead: {instead}"
            ));
        }
    }
    let token_line = match token_label(&module) {
        Some(label) => {
            mapped.push(format!(
                "the sample's token (first slot of the module) -> hsm.token_label = {label:?}"
            ));
            format!("token_label = {}", q(&label))
        }
        None => {
            unmapped.push(format!(
                "the token: the sample logs in to the first slot {} lists; it could not be \
                 loaded here, so set hsm.token_label (or slot_id) by hand",
                module.display()
            ));
            "token_label = \"CHANGE-ME\"".to_string()
        }
    };

    // [hsm_capabilities]
    let can_generate = s
        .bool("hsm_capabilities", "can_generate_iv")?
        .unwrap_or(false);
    let zero_iv = s
        .bool("hsm_capabilities", "is_zero_iv_required")?
        .unwrap_or(false);
    let iv_source = match (can_generate, zero_iv) {
        (false, _) => "hsm-rng",
        (true, true) => "hsm-generated",
        (true, false) => "hsm-generated-appended",
    };
    mapped.push(format!("hsm_capabilities -> hsm.iv_source = {iv_source:?}"));

    // [limits]
    let plaintext_limit = s.get("limits", "max_plaintext_in_base64");
    let aad_limit = s.get("limits", "max_aad_in_base64");
    if plaintext_limit.is_some() || aad_limit.is_some() {
        unmapped.push(
            "limits: this proxy accepts what the spec allows (4300 bytes of data, 8192 of AAD) \
             and bounds bodies with server.max_body_bytes"
                .into(),
        );
    }

    // [[external_key_stores]]
    let stores = match s.table.get("external_key_stores") {
        Some(Value::Array(a)) if !a.is_empty() => a.clone(),
        _ => {
            return Err(field_error(
                "external_key_stores",
                "at least one [[external_key_stores]] is required",
            ))
        }
    };
    let mut key_stores = String::new();
    // The sample lets two prefixes share one access key id; this proxy
    // looks a secret up by its access key id across all key stores, so
    // each must be one key store's (check-config refuses a repeat).
    let mut first_use: BTreeMap<String, String> = BTreeMap::new();
    for (i, store) in stores.iter().enumerate() {
        let field = format!("external_key_stores[{i}]");
        let t = store
            .as_table()
            .ok_or_else(|| field_error(&field, "must be a table"))?;
        let get = |k: &str| t.get(k).and_then(Value::as_str).map(str::to_owned);
        let prefix = get("uri_path_prefix").unwrap_or_default();
        let uri_path = format!("{}/kms/xks/v1", prefix.trim_end_matches('/'));
        let akid = get("sigv4_access_key_id")
            .ok_or_else(|| field_error(&format!("{field}.sigv4_access_key_id"), "is required"))?;
        if let Some(earlier) = first_use.insert(akid.clone(), prefix.clone()) {
            unmapped.push(format!(
                "{field}: access key id {akid} is also the one of prefix {earlier:?}: this proxy \
                 needs one access key id per key store, so check-config refuses the imported file \
                 until one of them gets its own credential (`xks-proxy credentials new`, then \
                 UpdateCustomKeyStore in KMS with the printed credential)"
            ));
        }
        let secret = Zeroizing::new(get("sigv4_secret_access_key").ok_or_else(|| {
            field_error(&format!("{field}.sigv4_secret_access_key"), "is required")
        })?);
        let keys: BTreeSet<String> = match t.get("xks_key_id_set") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            _ => BTreeSet::new(),
        };
        if keys.is_empty() {
            return Err(field_error(
                &format!("{field}.xks_key_id_set"),
                "lists no key ids",
            ));
        }
        for k in t.keys() {
            if !matches!(
                k.as_str(),
                "uri_path_prefix"
                    | "sigv4_access_key_id"
                    | "sigv4_secret_access_key"
                    | "xks_key_id_set"
            ) {
                unmapped.push(format!("{field}.{k}"));
            }
        }
        let name = store_name(&prefix, i);
        let secret_path = PathBuf::from("secrets").join(format!("{name}.secret"));
        secret_files.push(SecretFile {
            path: secret_path.clone(),
            content: secret,
        });
        let mut compat = "compat = \"aws-sample\"\n".to_string();
        if let Some(md) = &metadata_b64 {
            compat.push_str(&format!("compat_metadata_b64 = {}\n", q(md)));
        }
        let region_line = region
            .as_deref()
            .map(|r| format!("region = {}\n", q(r)))
            .unwrap_or_default();
        key_stores.push_str(&format!(
            "\n[[key_stores]]\nname = {}\nuri_path = {}\nkeys = [{}]\n{region_line}{compat}\n\
             [[key_stores.credentials]]\naccess_key_id = {}\nsecret_file = {}\n",
            q(&name),
            q(&uri_path),
            keys.iter().map(|k| q(k)).collect::<Vec<_>>().join(", "),
            q(&akid),
            q(&secret_path.to_string_lossy()),
        ));
        mapped.push(format!(
            "key store {uri_path}: access key id {akid}, secret -> {} (mode 0600), {} key id(s), \
             compat = \"aws-sample\"",
            secret_path.display(),
            keys.len()
        ));
    }
    if let Some(r) = &region {
        mapped.push(format!(
            "server.region -> key_stores.region = {r:?} (requests signed for another region are refused)"
        ));
    }
    if let Some(md) = &metadata_b64 {
        mapped.push(format!(
            "server.ciphertext_metadata_b64 -> key_stores.compat_metadata_b64 = {md:?}"
        ));
    }
    unmapped.extend(
        s.unread()
            .into_iter()
            .map(|k| format!("{k}: not used by this proxy")),
    );

    let config = format!(
        "# Imported from the AWS sample proxy's settings by `xks-proxy import-sample-config`.\n\
         # Same URI paths, credentials, HSM and key labels: KMS needs no change.\n\
         # See docs/migrate-from-aws-sample.md before switching traffic.\n\n\
         [server]\nlisten = {listen}\n{ping_line}fleet_size = 1\n\n\
         {tls_section}\n\
         [hsm]\nmodule = {module}\n{token_line}\npin_file = \"hsm-pin\"\nsessions = {sessions}\n\
         iv_source = {iv}\n\n\
         [health]\n# Created in the token at the first start (never served to KMS).\n\
         key_label = \"xks-proxy-health-check\"\n\n\
         [logging]\nformat = \"json\"\nlevel = {level}\n{key_stores}",
        listen = q(&format!("{ip}:{port}")),
        module = q(&module.to_string_lossy()),
        iv = q(iv_source),
        level = q(&level),
    );
    Ok(Imported {
        config,
        secret_files,
        mapped,
        unmapped,
        module,
    })
}

#[cfg(test)]
mod tests;
