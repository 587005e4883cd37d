//! Retiring a chain: `xks-proxy audit retire`.
//!
//! Each instance keeps one witness object in the HSM (see
//! [`super::witness`]). A fleet whose instance ids change (a new pod, a new
//! host) would pile them up in a token whose object storage is bounded, so
//! an instance that is gone for good is retired: once its trail is verified
//! whole and ending at a clean stop (the caller checks), a `retire` record
//! and a seal over it are appended to its newest file, and then the caller
//! removes the witness. `verify` then reads the chain as closed: it ends
//! sealed at a retirement, which no cut can produce without the seal key.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use super::error::AuditError;
use super::files::chain_files;
use super::record::{hash_line, hex, render, seal_input, RetireBody, SealBody};
use super::resume::resume_from;
use super::writer::lock_chain;
use xks_spec::time::format_timestamp_micros;

/// Computes a seal's HMAC in the HSM: (the key manager, the MAC).
pub type SealFn<'a> = dyn FnMut(&[u8]) -> Result<(String, Vec<u8>), String> + 'a;

/// Appends the `retire` record and its seal to `instance`'s newest file in
/// `dir`, holding the chain's lock (no proxy may be writing it). `seal`
/// computes the HMAC in the HSM: (the key manager, the MAC). Returns the
/// seal's seq.
pub fn retire(
    dir: &Path,
    instance: &str,
    key_label: &str,
    by: &str,
    seal: &mut SealFn<'_>,
) -> Result<u64, AuditError> {
    let dir_err = |source| AuditError::Dir {
        dir: dir.to_path_buf(),
        source,
    };
    let _lock = lock_chain(dir, instance)?;
    let mut resume = None;
    for name in chain_files(dir, instance).map_err(dir_err)?.iter().rev() {
        if let Some(r) = resume_from(dir, name)? {
            resume = Some(r);
            break;
        }
    }
    let r = resume.ok_or_else(|| AuditError::Resume {
        file: dir.join(instance),
        why: "no trail file of this instance".into(),
    })?;
    let time = format_timestamp_micros(SystemTime::now());
    let retire = render(
        r.seq,
        "retire",
        &time,
        instance,
        &RetireBody { by },
        &r.head,
    );
    let head = hash_line(&retire);
    let input = seal_input(instance, r.seq + 1, &time, 1, key_label, &head);
    let (ekm, mac) = seal(&input).map_err(|why| AuditError::Resume {
        file: dir.join(&r.file),
        why: format!("cannot seal the retirement in the HSM: {why}"),
    })?;
    let sealed = render(
        r.seq + 1,
        "seal",
        &time,
        instance,
        &SealBody {
            count: 1,
            key: key_label,
            ekm: &ekm,
            hmac: hex(&mac),
        },
        &head,
    );
    let path = dir.join(&r.file);
    let file_err = |source| AuditError::File {
        file: path.clone(),
        source,
    };
    let mut f = OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(file_err)?;
    let mut out = retire;
    out.push(b'\n');
    out.extend_from_slice(&sealed);
    out.push(b'\n');
    if r.file.ends_with(".gz") {
        // A compressed newest file (the plain ones after it were empty): a
        // gzip member of its own, which every reader (and zcat) reads on
        // after the others.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&out).map_err(file_err)?;
        out = gz.finish().map_err(file_err)?;
    }
    f.write_all(&out).map_err(file_err)?;
    f.sync_data().map_err(file_err)?;
    Ok(r.seq + 1)
}
