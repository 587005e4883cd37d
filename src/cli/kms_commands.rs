//! `xks-proxy kms-commands`: the AWS CLI commands that create an external key
//! store for one of this proxy's key stores, connect it, wait until it is
//! connected, and create a KMS key for each of its external keys.
//!
//! Why generate them: KMS takes the URI path, the access key id and the
//! secret as it is given, and a typo surfaces only when KMS connects, as a
//! `ConnectionErrorCode`. The values here come from the same configuration
//! the proxy serves, so they agree with it by construction.
//!
//! The secret is not printed: the command reads it from the key store's
//! secret file (or environment variable) when it runs, so the output can be
//! pasted into a ticket or a terminal recording. `--show-secret` prints it
//! instead, for a host that cannot read the file.
//!
//! The commands are checked against the AWS CLI's own argument model
//! (`tests/kms_commands.rs` runs them through the awscli package offline).
//! One thing they do for that reason: the endpoint URL goes in
//! `--cli-input-json`, because AWS CLI v1 fetches any argument value that
//! starts with `https://` and would send the page it got instead
//! (`cli_follow_urlparam`, on by default in v1).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::Config;
use crate::ops::credentials::{self, CredentialError};
use crate::spec::names::{is_valid_key_id, is_valid_region};
use crate::state::AllowedKeys;

#[derive(Debug, Args)]
pub struct KmsCommandsArgs {
    /// The TOML configuration file the proxies serve.
    #[arg(long, short)]
    config: PathBuf,
    /// The key store: its name or its URI path (e.g. /payments/kms/xks/v1).
    #[arg(long)]
    key_store: String,
    /// The proxy's URL as KMS reaches it: https://FQDN (KMS always uses
    /// port 443). With --vpc-endpoint-service: the endpoint service's private
    /// DNS name (looked up by the commands when not given).
    #[arg(
        long,
        value_name = "URL",
        required_unless_present = "vpc_endpoint_service"
    )]
    endpoint: Option<String>,
    /// VPC endpoint service connectivity through this service
    /// (com.amazonaws.vpce.REGION.vpce-svc-ID), instead of a public endpoint.
    #[arg(long, value_name = "NAME")]
    vpc_endpoint_service: Option<String>,
    /// The credential to give KMS (default: the key store's newest).
    #[arg(long)]
    access_key_id: Option<String>,
    /// KMS's name for the key store (default: the key store's name).
    #[arg(long)]
    name: Option<String>,
    /// An external key id to create a KMS key for (repeatable; default: the
    /// key store's `keys`, or $XKS_KEY_ID when it allows every key).
    #[arg(long = "key-id", value_name = "ID")]
    key_ids: Vec<String>,
    /// The AWS Region of the key store (default: the key store's `region`,
    /// else the endpoint service's, else the AWS CLI's default).
    #[arg(long)]
    region: Option<String>,
    /// Print the secret itself instead of reading it from its file (or
    /// environment variable) when the commands run.
    #[arg(long)]
    show_secret: bool,
}

/// Why no commands could be written.
#[derive(Debug, thiserror::Error)]
pub enum KmsCommandsError {
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    #[error("no key store has the name or URI path '{selector}'; configured: {known}")]
    UnknownKeyStore { selector: String, known: String },
    #[error("key store '{key_store}' has no credential {access_key_id}")]
    UnknownCredential {
        key_store: String,
        access_key_id: String,
    },
    #[error("key store '{0}' has no credential; add one with `xks-proxy credentials new`")]
    NoCredential(String),
    #[error("--endpoint '{endpoint}': {rule}")]
    Endpoint {
        endpoint: String,
        rule: &'static str,
    },
    #[error(
        "--vpc-endpoint-service '{0}': expected com.amazonaws.vpce.REGION.vpce-svc-ID \
         (the endpoint service's name, not its id)"
    )]
    ServiceName(String),
    #[error(
        "--region {region}: the VPC endpoint service is in {service_region}; a key store can \
         only use an endpoint service of its own Region"
    )]
    RegionMismatch {
        region: String,
        service_region: String,
    },
    #[error("--region '{0}' is not an AWS Region name")]
    Region(String),
    #[error("--key-id '{0}': external key ids are 1-128 characters of A-Z a-z 0-9 . _ -")]
    KeyId(String),
    #[error("--name: KMS allows 1 to 256 characters")]
    Name,
    #[error("the secret of {0} could not be read from the configuration")]
    Secret(String),
}

impl KmsCommandsError {
    fn exit_code(&self) -> ExitCode {
        match self {
            // Files that could not be read: a runtime failure.
            KmsCommandsError::Credentials(
                CredentialError::Read { .. }
                | CredentialError::Write { .. }
                | CredentialError::Toml { .. },
            ) => ExitCode::from(1),
            // The configuration or the request is wrong.
            _ => ExitCode::from(2),
        }
    }
}

pub fn run(args: KmsCommandsArgs) -> Result<(), ExitCode> {
    let script = commands(&args).map_err(|e| {
        eprintln!("xks-proxy: {e}");
        e.exit_code()
    })?;
    print!("{}", script.as_str());
    Ok(())
}

/// How KMS reaches the proxy.
enum Connectivity {
    Public {
        endpoint: String,
    },
    VpcEndpointService {
        service_name: String,
        service_id: String,
        /// `None`: looked up from the service when the commands run.
        endpoint: Option<String>,
    },
}

/// Where the secret comes from when the commands run.
enum SecretRef {
    File(PathBuf),
    Env(String),
    Literal(zeroize::Zeroizing<String>),
}

/// Everything the commands are written from.
struct Plan {
    config: PathBuf,
    key_store: String,
    kms_name: String,
    uri_path: String,
    access_key_id: String,
    other_credentials: usize,
    secret: SecretRef,
    connectivity: Connectivity,
    region: Option<String>,
    /// Empty: the key store allows every key; the commands use $XKS_KEY_ID.
    key_ids: Vec<String>,
}

fn commands(a: &KmsCommandsArgs) -> Result<zeroize::Zeroizing<String>, KmsCommandsError> {
    let plan = plan(a)?;
    Ok(render(&plan))
}

fn plan(a: &KmsCommandsArgs) -> Result<Plan, KmsCommandsError> {
    let cfg = Config::load(&a.config).map_err(CredentialError::from)?;
    let ks = cfg
        .key_stores
        .iter()
        .find(|k| k.name == a.key_store || k.uri_path == a.key_store)
        .ok_or_else(|| KmsCommandsError::UnknownKeyStore {
            selector: a.key_store.clone(),
            known: cfg
                .key_stores
                .iter()
                .map(|k| format!("{} ({})", k.name, k.uri_path))
                .collect::<Vec<_>>()
                .join(", "),
        })?;

    // `credentials list` knows where each secret comes from (file or
    // variable) and how old each credential is.
    let listed: Vec<_> = credentials::list(&a.config)?
        .into_iter()
        .filter(|c| c.key_store == ks.name)
        .collect();
    let chosen = match &a.access_key_id {
        Some(id) => listed
            .iter()
            .find(|c| &c.access_key_id == id)
            .ok_or_else(|| KmsCommandsError::UnknownCredential {
                key_store: ks.name.clone(),
                access_key_id: id.clone(),
            })?,
        // The newest: during a rotation, the one KMS should get next. A
        // credential of unknown age counts as the oldest; among equals the
        // last written wins (`credentials new` appends).
        None => listed
            .iter()
            .rev()
            .min_by(|x, y| {
                let age = |c: &credentials::Listed| c.age_days.unwrap_or(f64::INFINITY);
                age(x).total_cmp(&age(y))
            })
            .ok_or_else(|| KmsCommandsError::NoCredential(ks.name.clone()))?,
    };
    let secret = if a.show_secret {
        let c = ks
            .credentials
            .iter()
            .find(|c| c.access_key_id == chosen.access_key_id)
            .ok_or_else(|| KmsCommandsError::Secret(chosen.access_key_id.clone()))?;
        SecretRef::Literal(c.secret.clone())
    } else if let Some(var) = chosen.source.strip_prefix("env:") {
        SecretRef::Env(var.to_string())
    } else {
        let path = PathBuf::from(
            chosen
                .source
                .strip_prefix("file:")
                .unwrap_or(&chosen.source),
        );
        // Absolute, so the commands work from any directory.
        SecretRef::File(std::fs::canonicalize(&path).unwrap_or(path))
    };

    let endpoint = a.endpoint.as_deref().map(check_endpoint).transpose()?;
    let (connectivity, service_region) = match &a.vpc_endpoint_service {
        None => (
            Connectivity::Public {
                // clap requires --endpoint without --vpc-endpoint-service.
                endpoint: endpoint.unwrap_or_default(),
            },
            None,
        ),
        Some(name) => {
            let (region, id) = parse_service_name(name)
                .ok_or_else(|| KmsCommandsError::ServiceName(name.clone()))?;
            (
                Connectivity::VpcEndpointService {
                    service_name: name.clone(),
                    service_id: id.to_string(),
                    endpoint,
                },
                Some(region.to_string()),
            )
        }
    };
    let region = a.region.clone().or_else(|| ks.region.clone());
    if let Some(r) = &region {
        if !is_valid_region(r) {
            return Err(KmsCommandsError::Region(r.clone()));
        }
    }
    let region = match (region, service_region) {
        (Some(r), Some(s)) if r != s => {
            return Err(KmsCommandsError::RegionMismatch {
                region: r,
                service_region: s,
            })
        }
        (r, s) => r.or(s),
    };

    let key_ids = if a.key_ids.is_empty() {
        match &ks.keys {
            AllowedKeys::All => Vec::new(),
            AllowedKeys::Only(set) => {
                let mut ids: Vec<String> = set.iter().cloned().collect();
                ids.sort();
                ids
            }
        }
    } else {
        a.key_ids.clone()
    };
    if let Some(bad) = key_ids.iter().find(|k| !is_valid_key_id(k)) {
        return Err(KmsCommandsError::KeyId(bad.clone()));
    }
    let kms_name = a.name.clone().unwrap_or_else(|| ks.name.clone());
    if kms_name.is_empty() || kms_name.chars().count() > 256 {
        return Err(KmsCommandsError::Name);
    }

    Ok(Plan {
        config: a.config.clone(),
        key_store: ks.name.clone(),
        kms_name,
        uri_path: ks.uri_path.clone(),
        access_key_id: chosen.access_key_id.clone(),
        other_credentials: listed.len() - 1,
        secret,
        connectivity,
        region,
        key_ids,
    })
}

/// KMS's `XksProxyUriEndpoint`: `https://` and a host name of letters,
/// digits, dots and dashes, 10-128 characters; no port (KMS always uses 443)
/// and no path (that is the URI path).
fn check_endpoint(e: &str) -> Result<String, KmsCommandsError> {
    let fail = |rule| KmsCommandsError::Endpoint {
        endpoint: e.to_string(),
        rule,
    };
    let host = e
        .strip_prefix("https://")
        .ok_or_else(|| fail("KMS only connects over HTTPS: start with https://"))?;
    if host.contains(':') {
        return Err(fail(
            "no port: KMS always connects to port 443 (put the load balancer's listener there)",
        ));
    }
    if host.contains('/') {
        return Err(fail(
            "no path: the path is the key store's URI path, taken from the config",
        ));
    }
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
    {
        return Err(fail(
            "the host name may only hold letters, digits, dots and dashes",
        ));
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(fail(
            "KMS needs a DNS name its certificate check can match, not an IP address",
        ));
    }
    if !(10..=128).contains(&e.len()) {
        return Err(fail("KMS allows 10 to 128 characters"));
    }
    Ok(e.to_string())
}

/// `com.amazonaws.vpce.<region>.vpce-svc-<id>` → (region, `vpce-svc-<id>`),
/// as KMS's model allows it (`(com|eu).amazonaws.vpce`, 20-64 characters).
fn parse_service_name(name: &str) -> Option<(&str, &str)> {
    if !(20..=64).contains(&name.len()) {
        return None;
    }
    let rest = name
        .strip_prefix("com.amazonaws.vpce.")
        .or_else(|| name.strip_prefix("eu.amazonaws.vpce."))?;
    let (region, id) = rest.split_once('.')?;
    let parts: Vec<&str> = region.split('-').collect();
    let (number, words) = parts.split_last()?;
    let region_ok = (2..=3).contains(&words.len())
        && words
            .iter()
            .all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
        && !number.is_empty()
        && number.bytes().all(|b| b.is_ascii_digit());
    let id_ok = id.strip_prefix("vpce-svc-").is_some_and(|s| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    });
    (region_ok && id_ok).then_some((region, id))
}

/// `s` as one shell word: unchanged when it holds nothing the shell would
/// interpret, else in single quotes.
fn sh_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'_' | b'.' | b'/' | b':' | b'=' | b',' | b'@' | b'%' | b'+' | b'-'
                )
        });
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The commands, as a bash script to read and run step by step.
fn render(p: &Plan) -> zeroize::Zeroizing<String> {
    // The secret may end up in here (--show-secret): wipe it when done.
    let mut s = zeroize::Zeroizing::new(String::with_capacity(4096));
    let region = p
        .region
        .as_deref()
        .map(|r| format!(" --region {}", sh_quote(r)))
        .unwrap_or_default();
    let o = &mut *s;
    // Writing into a String cannot fail.
    let _ = writeln!(
        o,
        "# AWS CLI commands for xks-proxy key store '{}' ({}),\n\
         # written by `xks-proxy kms-commands` from {}.\n\
         # Run them in bash, step by step, with AWS credentials allowed to call\n\
         # kms:CreateCustomKeyStore, kms:ConnectCustomKeyStore, kms:DescribeCustomKeyStores\n\
         # and kms:CreateKey{}.",
        p.key_store,
        p.uri_path,
        p.config.display(),
        if matches!(
            p.connectivity,
            Connectivity::VpcEndpointService { endpoint: None, .. }
        ) {
            " (and ec2:DescribeVpcEndpointServiceConfigurations)"
        } else {
            ""
        }
    );
    let credential_note = if p.other_credentials > 0 {
        format!(
            " (the newest of the key store's {} credentials; --access-key-id picks another)",
            p.other_credentials + 1
        )
    } else {
        String::new()
    };
    let secret_expr: zeroize::Zeroizing<String> = match &p.secret {
        SecretRef::File(path) => {
            let _ = writeln!(
                o,
                "# Credential {}{credential_note}: its secret is read from\n\
                 # {} when the command runs, so run this where that file is readable.",
                p.access_key_id,
                path.display()
            );
            format!("$(cat {})", sh_quote(&path.to_string_lossy())).into()
        }
        SecretRef::Env(var) => {
            let _ = writeln!(
                o,
                "# Credential {}{credential_note}: its secret is read from ${var}, as the\n\
                 # proxy reads it; set that variable in this shell first.",
                p.access_key_id
            );
            format!("${{{var}:?set {var} to the secret of {}}}", p.access_key_id).into()
        }
        SecretRef::Literal(secret) => {
            let _ = writeln!(
                o,
                "# Credential {}{credential_note}. The secret is printed below\n\
                 # (--show-secret): keep this text out of tickets and shell history.",
                p.access_key_id
            );
            secret.clone()
        }
    };
    let secret_expr: &str = &secret_expr;

    // 0. VPC endpoint service: the private DNS name KMS will use.
    let (connectivity, endpoint_json, service_arg) = match &p.connectivity {
        Connectivity::Public { endpoint } => (
            "PUBLIC_ENDPOINT",
            sh_quote(&format!("{{\"XksProxyUriEndpoint\": \"{endpoint}\"}}")),
            String::new(),
        ),
        Connectivity::VpcEndpointService {
            service_name,
            service_id,
            endpoint,
        } => {
            let _ = writeln!(
                o,
                "\n# 0. The endpoint service must have a verified private DNS name; this prints\n\
                 #    the name and \"verified\" (else: docs/operating.md, private DNS name)."
            );
            let _ = writeln!(
                o,
                "aws ec2 describe-vpc-endpoint-service-configurations{region} --service-ids {} \\\n    \
                 --query 'ServiceConfigurations[0].[PrivateDnsName,PrivateDnsNameConfiguration.State]' --output text",
                sh_quote(service_id)
            );
            let json = match endpoint {
                Some(e) => sh_quote(&format!("{{\"XksProxyUriEndpoint\": \"{e}\"}}")),
                None => {
                    let _ = writeln!(
                        o,
                        "XKS_PRIVATE_DNS=$(aws ec2 describe-vpc-endpoint-service-configurations{region} \
                         --service-ids {} \\\n    \
                         --query 'ServiceConfigurations[0].PrivateDnsName' --output text)",
                        sh_quote(service_id)
                    );
                    "\"{\\\"XksProxyUriEndpoint\\\": \\\"https://$XKS_PRIVATE_DNS\\\"}\""
                        .to_string()
                }
            };
            (
                "VPC_ENDPOINT_SERVICE",
                json,
                format!(
                    "    --xks-proxy-vpc-endpoint-service-name {} \\\n",
                    sh_quote(service_name)
                ),
            )
        }
    };

    // 1. Create.
    let _ = writeln!(
        o,
        "\n# 1. Create the external key store.{} The endpoint URL is passed in\n\
         #    --cli-input-json because AWS CLI v1 would fetch any https:// argument.",
        if connectivity == "PUBLIC_ENDPOINT" {
            " KMS calls the proxy's GetHealthStatus now:\n#    the endpoint must already be reachable from the internet."
        } else {
            ""
        }
    );
    let _ = write!(
        o,
        "XKS_KEY_STORE_ID=$(aws kms create-custom-key-store{region} \\\n    \
         --custom-key-store-name {} \\\n    \
         --custom-key-store-type EXTERNAL_KEY_STORE \\\n    \
         --xks-proxy-connectivity {connectivity} \\\n    \
         --cli-input-json {endpoint_json} \\\n\
         {service_arg}    \
         --xks-proxy-uri-path {} \\\n    \
         --xks-proxy-authentication-credential \"AccessKeyId={},RawSecretAccessKey={secret_expr}\" \\\n    \
         --query CustomKeyStoreId --output text) && echo \"key store: $XKS_KEY_STORE_ID\"\n",
        sh_quote(&p.kms_name),
        sh_quote(&p.uri_path),
        p.access_key_id,
    );

    // 2. Connect.
    let _ = writeln!(
        o,
        "\n# 2. Connect it: KMS calls GetHealthStatus (kmsOperation ConnectCustomKeyStore).\n\
         aws kms connect-custom-key-store{region} --custom-key-store-id \"$XKS_KEY_STORE_ID\""
    );

    // 3. Wait.
    let describe = format!(
        "aws kms describe-custom-key-stores{region} --custom-key-store-id \"$XKS_KEY_STORE_ID\""
    );
    let _ = writeln!(
        o,
        "\n# 3. Wait for CONNECTED (at most 10 minutes). FAILED prints the ConnectionErrorCode;\n\
         #    `xks-proxy check` tells what to fix for each.\n\
         for XKS_TRY in $(seq 40); do\n  \
           XKS_STATE=$({describe} \\\n      \
             --query 'CustomKeyStores[0].ConnectionState' --output text)\n  \
           echo \"connection state: $XKS_STATE\"\n  \
           case \"$XKS_STATE\" in\n    \
             CONNECTED) break ;;\n    \
             FAILED) {describe} \\\n        \
               --query 'CustomKeyStores[0].ConnectionErrorCode' --output text; break ;;\n  \
           esac\n  \
           sleep 15\n\
         done"
    );

    // 4. Keys.
    let _ = writeln!(
        o,
        "\n# 4. A KMS key for each external key (its id is the key's label in the HSM)."
    );
    let key_ids: Vec<String> = if p.key_ids.is_empty() {
        let _ = writeln!(
            o,
            "#    This key store allows every key of the token: set XKS_KEY_ID (or give --key-id)."
        );
        vec!["\"${XKS_KEY_ID:?set XKS_KEY_ID to an external key id}\"".to_string()]
    } else {
        p.key_ids.iter().map(|k| sh_quote(k)).collect()
    };
    for (id, shown) in key_ids.iter().zip(
        p.key_ids
            .iter()
            .map(String::as_str)
            .chain(std::iter::repeat("$XKS_KEY_ID")),
    ) {
        let _ = writeln!(
            o,
            "aws kms create-key{region} --origin EXTERNAL_KEY_STORE \\\n    \
             --custom-key-store-id \"$XKS_KEY_STORE_ID\" --xks-key-id {id} \\\n    \
             --description \"xks-proxy key store {}: {shown}\" \\\n    \
             --query KeyMetadata.Arn --output text",
            p.kms_name.replace(['"', '$', '`', '\\'], "_"),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_as_kms_checks_them() {
        assert!(check_endpoint("https://xks.example.com").is_ok());
        for (bad, says) in [
            ("http://xks.example.com", "HTTPS"),
            ("https://xks.example.com:8443", "port 443"),
            ("https://xks.example.com/", "no path"),
            ("https://xks.example.com/payments", "no path"),
            ("https://10.0.0.12", "IP address"),
            ("https://xks_example.com", "letters"),
            ("https://a", "10 to 128"),
        ] {
            let e = check_endpoint(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn service_names_give_region_and_id() {
        assert_eq!(
            parse_service_name("com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0"),
            Some(("us-east-1", "vpce-svc-0123456789abcdef0"))
        );
        assert_eq!(
            parse_service_name("com.amazonaws.vpce.us-gov-west-1.vpce-svc-0a1b2c"),
            Some(("us-gov-west-1", "vpce-svc-0a1b2c"))
        );
        for bad in [
            "vpce-svc-0123456789abcdef0",
            "com.amazonaws.vpce.us-east-1.vpce-0123456789abcdef0",
            "com.amazonaws.vpce.useast1.vpce-svc-0123456789abcdef0",
            "com.amazonaws.vpce.us-east-1.vpce-svc-0123456789ABCDEF0",
            "org.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0",
        ] {
            assert_eq!(parse_service_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn shell_quoting_keeps_plain_words_and_quotes_the_rest() {
        assert_eq!(sh_quote("/payments/kms/xks/v1"), "/payments/kms/xks/v1");
        assert_eq!(sh_quote("my store"), "'my store'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote("$(rm -rf /)"), "'$(rm -rf /)'");
        assert_eq!(sh_quote(""), "''");
    }
}
