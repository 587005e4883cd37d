//! SigV4 credential management: generate, add to a key store, list, revoke.
//!
//! The config file is edited with `toml_edit`, so the operator's comments and
//! layout survive. Every change is written to a temporary file, validated as a
//! whole configuration (exactly what a reload will do), and only then renamed
//! over the config; a running proxy picks it up by its file watch or SIGHUP.
//! Secrets go to their own files, created with mode 0600, never into the config.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use ring::rand::{SecureRandom, SystemRandom};
use toml_edit::{DocumentMut, Item, Table};
use zeroize::Zeroizing;

use xks_config::{Config, ConfigError};
use xks_spec::time::format_timestamp;
use xks_state::{created_or_modified, StateError};

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not valid TOML: {source}", .path.display())]
    Toml {
        path: PathBuf,
        source: toml_edit::TomlError,
    },
    /// The configuration as it is does not load.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the config has no [[key_stores]]")]
    NoKeyStores,
    #[error("no key store has the URI path or name '{selector}'; configured: {known}")]
    UnknownKeyStore { selector: String, known: String },
    #[error("credentials of this key store are not written as [[key_stores.credentials]] tables")]
    NotTables,
    #[error("the new credential did not end up in the selected key store")]
    NotLanded,
    #[error("no key store has the credential {0}")]
    UnknownCredential(String),
    #[error(
        "{access_key_id} is the only credential of key store '{key_store}'; KMS could no longer \
         connect. Add its replacement first (credentials new), update the key store in KMS, \
         then revoke"
    )]
    OnlyCredential {
        access_key_id: String,
        key_store: String,
    },
    #[error("{0} not found in the file")]
    NotInFile(String),
    /// The edited configuration does not load: nothing was changed.
    #[error("the changed configuration would not load, so nothing was changed: {0}")]
    Validation(ConfigError),
    #[error("the changed configuration would not load, so nothing was changed: {0}")]
    PolicyValidation(StateError),
    #[error("the system random generator failed")]
    Rng,
}

/// A freshly generated credential.
pub struct NewCredential {
    pub access_key_id: String,
    pub secret: Zeroizing<String>,
}

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// Generates a credential in the spec's formats: an access key id of 24
/// characters of `A-Z2-7` (`XKS` + 21 random, 105 bits) and a secret of 44
/// base64 characters from 33 random bytes (264 bits, no padding).
pub fn generate() -> Result<NewCredential, CredentialError> {
    use base64::Engine;
    let rng = SystemRandom::new();
    let mut id_bytes = [0u8; 21];
    rng.fill(&mut id_bytes).map_err(|_| CredentialError::Rng)?;
    // 256 is a multiple of 32: taking each byte mod 32 is unbiased.
    let access_key_id: String = "XKS"
        .chars()
        .chain(id_bytes.iter().map(|b| BASE32[(b % 32) as usize] as char))
        .collect();
    let mut secret_bytes = Zeroizing::new([0u8; 33]);
    rng.fill(secret_bytes.as_mut())
        .map_err(|_| CredentialError::Rng)?;
    let secret = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(*secret_bytes));
    Ok(NewCredential {
        access_key_id,
        secret,
    })
}

/// The KMS console's "proxy configuration file" for one credential.
pub fn console_json(uri_path: &str, cred: &NewCredential) -> Zeroizing<String> {
    Zeroizing::new(
        serde_json::to_string_pretty(&serde_json::json!({
            "XksProxyUriPath": uri_path,
            "XksProxyAuthenticationCredential": {
                "AccessKeyId": cred.access_key_id,
                "RawSecretAccessKey": cred.secret.as_str(),
            }
        }))
        .unwrap_or_default(),
    )
}

fn read_doc(path: &Path) -> Result<(String, DocumentMut), CredentialError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let doc = text
        .parse::<DocumentMut>()
        .map_err(|source| CredentialError::Toml {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((text, doc))
}

/// Writes a file that only its owner can read, refusing to replace one.
pub fn write_private_new(path: &Path, content: &[u8]) -> Result<(), CredentialError> {
    let err = |source| CredentialError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(content).map_err(err)?;
    f.sync_all().map_err(err)
}

/// Validates `text` as the config at `path`, then atomically replaces it.
fn commit(path: &Path, text: &str) -> Result<Config, CredentialError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config".into());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let err = |source| CredentialError::Write {
        path: tmp.clone(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    std::fs::write(&tmp, text).map_err(err)?;
    if let Ok(meta) = std::fs::metadata(path) {
        std::fs::set_permissions(&tmp, meta.permissions()).map_err(err)?;
    }
    let checked = Config::load(&tmp)
        .map_err(CredentialError::Validation)
        .and_then(|cfg| match cfg.live(None) {
            Ok(_) => Ok(cfg),
            Err(e) => Err(CredentialError::PolicyValidation(e)),
        });
    let cfg = match checked {
        Ok(cfg) => cfg,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, path).map_err(|source| CredentialError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(cfg)
}

/// Index of the `[[key_stores]]` entry whose `uri_path` or `name` is `selector`.
fn find_store(doc: &DocumentMut, selector: &str) -> Result<usize, CredentialError> {
    let stores = doc
        .get("key_stores")
        .and_then(Item::as_array_of_tables)
        .ok_or(CredentialError::NoKeyStores)?;
    let mut known = Vec::new();
    for (i, t) in stores.iter().enumerate() {
        let uri = t.get("uri_path").and_then(Item::as_str).unwrap_or("");
        let name = t.get("name").and_then(Item::as_str).unwrap_or("");
        if uri == selector || name == selector {
            return Ok(i);
        }
        known.push(format!("{name} ({uri})"));
    }
    Err(CredentialError::UnknownKeyStore {
        selector: selector.to_string(),
        known: known.join(", "),
    })
}

/// Where a new secret file goes: `dir` if given, else next to the key store's
/// existing secret files, else `secrets/` beside the config.
fn secret_dir(cfg: &Config, uri_path: &str, config_dir: &Path, dir: Option<&Path>) -> PathBuf {
    if let Some(d) = dir {
        return d.to_path_buf();
    }
    cfg.key_stores
        .iter()
        .find(|k| k.uri_path == uri_path)
        .and_then(|k| k.credentials.iter().find_map(|c| c.secret_file.clone()))
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| config_dir.join("secrets"))
}

/// The path to write into the config: relative to the config's directory when
/// the file is below it, so the config stays relocatable.
fn config_relative(config_dir: &Path, file: &Path) -> String {
    let shown = file
        .strip_prefix(config_dir)
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| file.to_path_buf());
    shown.display().to_string()
}

/// Result of [`add`].
pub struct Added {
    pub credential: NewCredential,
    pub uri_path: String,
    pub key_store: String,
    pub secret_file: PathBuf,
}

/// Generates a credential, stores its secret in a new 0600 file and adds it
/// to the key store selected by URI path or name.
pub fn add(
    config_path: &Path,
    selector: &str,
    dir: Option<&Path>,
) -> Result<Added, CredentialError> {
    let current = Config::load(config_path)?;
    let (_, mut doc) = read_doc(config_path)?;
    let index = find_store(&doc, selector)?;
    let config_dir = config_path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let store = &current.key_stores[index];
    let (uri_path, key_store) = (store.uri_path.clone(), store.name.clone());

    let credential = generate()?;
    let dir = secret_dir(&current, &uri_path, &config_dir, dir);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| CredentialError::Write {
                path: dir.clone(),
                source,
            })?;
    }
    let secret_file = dir.join(format!("{}.secret", credential.access_key_id));
    let mut content = Zeroizing::new(credential.secret.as_bytes().to_vec());
    content.push(b'\n');
    write_private_new(&secret_file, &content)?;

    let mut entry = Table::new();
    entry["access_key_id"] = toml_edit::value(credential.access_key_id.as_str());
    entry["secret_file"] = toml_edit::value(config_relative(&config_dir, &secret_file));
    entry["created"] = toml_edit::value(format_timestamp(SystemTime::now()));
    let result = (|| {
        let store = doc["key_stores"]
            .as_array_of_tables_mut()
            .and_then(|a| a.get_mut(index))
            .ok_or(CredentialError::NoKeyStores)?;
        let creds = store
            .entry("credentials")
            .or_insert(Item::ArrayOfTables(Default::default()));
        creds
            .as_array_of_tables_mut()
            .ok_or(CredentialError::NotTables)?
            .push(entry);
        let cfg = commit(config_path, &doc.to_string())?;
        // Belt and braces: the credential must have landed in the right store.
        let landed = cfg.key_stores.iter().any(|k| {
            k.uri_path == uri_path
                && k.credentials
                    .iter()
                    .any(|c| c.access_key_id == credential.access_key_id)
        });
        if landed {
            Ok(())
        } else {
            Err(CredentialError::NotLanded)
        }
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&secret_file);
        return Err(e);
    }
    Ok(Added {
        credential,
        uri_path,
        key_store,
        secret_file,
    })
}

/// One configured credential, for `credentials list`.
#[derive(Debug, serde::Serialize)]
pub struct Listed {
    pub key_store: String,
    pub uri_path: String,
    pub access_key_id: String,
    /// `file:<path>` or `env:<VAR>`.
    pub source: String,
    pub created: Option<String>,
    pub age_days: Option<f64>,
}

/// Every credential of every key store (loads and validates the config).
pub fn list(config_path: &Path) -> Result<Vec<Listed>, CredentialError> {
    let cfg = Config::load(config_path)?;
    let (_, doc) = read_doc(config_path)?;
    let now = SystemTime::now();
    let mut out = Vec::new();
    for (i, ks) in cfg.key_stores.iter().enumerate() {
        for (j, c) in ks.credentials.iter().enumerate() {
            let source = match &c.secret_file {
                Some(p) => format!("file:{}", p.display()),
                None => {
                    let var = doc["key_stores"][i]["credentials"][j]["secret_env"]
                        .as_str()
                        .unwrap_or("?");
                    format!("env:{var}")
                }
            };
            let created = created_or_modified(c);
            out.push(Listed {
                key_store: ks.name.clone(),
                uri_path: ks.uri_path.clone(),
                access_key_id: c.access_key_id.clone(),
                source,
                created: created.map(format_timestamp),
                age_days: created
                    .and_then(|t| now.duration_since(t).ok())
                    .map(|d| (d.as_secs_f64() / 86_400.0 * 10.0).round() / 10.0),
            });
        }
    }
    Ok(out)
}

/// Result of [`revoke`].
pub struct Revoked {
    pub key_store: String,
    pub deleted_secret_file: Option<PathBuf>,
}

/// Removes a credential from its key store. Refuses to remove a key store's
/// last credential (KMS could no longer connect at all); add the replacement
/// first. Deletes the secret file unless `keep_secret_file`.
pub fn revoke(
    config_path: &Path,
    access_key_id: &str,
    keep_secret_file: bool,
) -> Result<Revoked, CredentialError> {
    let current = Config::load(config_path)?;
    let (i, ks) = current
        .key_stores
        .iter()
        .enumerate()
        .find(|(_, k)| {
            k.credentials
                .iter()
                .any(|c| c.access_key_id == access_key_id)
        })
        .ok_or_else(|| CredentialError::UnknownCredential(access_key_id.to_string()))?;
    if ks.credentials.len() == 1 {
        return Err(CredentialError::OnlyCredential {
            access_key_id: access_key_id.to_string(),
            key_store: ks.name.clone(),
        });
    }
    let secret_file = ks
        .credentials
        .iter()
        .find(|c| c.access_key_id == access_key_id)
        .and_then(|c| c.secret_file.clone());
    let (_, mut doc) = read_doc(config_path)?;
    let creds = doc["key_stores"][i]["credentials"]
        .as_array_of_tables_mut()
        .ok_or(CredentialError::NotTables)?;
    let position = creds
        .iter()
        .position(|t| t.get("access_key_id").and_then(Item::as_str) == Some(access_key_id))
        .ok_or_else(|| CredentialError::NotInFile(access_key_id.to_string()))?;
    creds.remove(position);
    commit(config_path, &doc.to_string())?;
    let deleted_secret_file = match secret_file {
        Some(p) if !keep_secret_file => std::fs::remove_file(&p).ok().map(|_| p),
        _ => None,
    };
    Ok(Revoked {
        key_store: ks.name.clone(),
        deleted_secret_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_credentials_meet_the_spec() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert!(xks_spec::names::is_valid_access_key_id(&a.access_key_id));
        assert!(xks_spec::names::is_valid_secret(&a.secret));
        assert_eq!(a.secret.len(), 44);
        assert_ne!(a.access_key_id, b.access_key_id);
        assert_ne!(*a.secret, *b.secret);
        let json: serde_json::Value =
            serde_json::from_str(&console_json("/p/kms/xks/v1", &a)).unwrap();
        assert_eq!(json["XksProxyUriPath"], "/p/kms/xks/v1");
        assert_eq!(
            json["XksProxyAuthenticationCredential"]["AccessKeyId"],
            a.access_key_id.as_str()
        );
        assert_eq!(
            json["XksProxyAuthenticationCredential"]["RawSecretAccessKey"],
            a.secret.as_str()
        );
    }
}
