//! The trail's files on disk: their names, finding them, reading them line
//! by line in bounded memory, and compressing the rotated ones.
//!
//! **Names.** `<instance>.<first seq, 16 digits>-<UTC time>.jsonl`; a
//! rotated file may become `….jsonl.gz` (`audit.compress = "gzip"`). The
//! chain's hashes cover the *decompressed* lines, so compressing a file
//! changes nothing `verify` checks; every audit command reads both forms.
//!
//! **Compressing is crash-safe.** The compressed copy is written to
//! `….jsonl.gz.tmp`, synced, renamed to `….jsonl.gz` (so a `.gz` that exists
//! is complete), the directory synced, and only then is the plain file
//! removed. A crash leaves at worst both forms of one file: the plain one is
//! removed at the next start, and readers meanwhile take the `.gz` (see
//! [`expand`]) and fall back to it when the plain one vanishes under them
//! (see [`TrailFile::lines`]). The newest file of a chain, the one being
//! written, is never compressed.
//!
//! **Reading in bounded memory.** [`Lines`] hands out one line at a time
//! from a reused buffer; a line longer than [`MAX_LINE`] is cut there (it is
//! no record the proxy wrote; `verify` reports it as not a record). So
//! `verify`, `report` and `reconcile` use the same few hundred kilobytes
//! however long the trail.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

/// The longest line read whole: far above any record the proxy writes
/// (about 600 bytes; request fields are bounded by the request size limit).
pub const MAX_LINE: usize = 1 << 20;

/// The plain extension, and the one a compressed rotated file adds.
const PLAIN: &str = ".jsonl";
const GZIP: &str = ".jsonl.gz";
const TMP: &str = ".tmp";

/// How rotated files are kept (`audit.compress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// As written: about 570 bytes a request (see docs/audit.md).
    #[default]
    None,
    /// gzip (level 6) once rotated: read by every audit command, and by
    /// `zcat` / `gzip -t`.
    Gzip,
}

/// The file name without its trail extension, when it has one.
fn stem(name: &str) -> Option<&str> {
    name.strip_suffix(GZIP).or_else(|| name.strip_suffix(PLAIN))
}

/// Whether `name` is a file of `instance`'s chain (plain or compressed);
/// its first seq if so.
pub(crate) fn chain_file_seq(instance: &str, name: &str) -> Option<u64> {
    let middle = stem(name)?.strip_prefix(instance)?.strip_prefix('.')?;
    let digits = middle.get(..16)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) || !middle[16..].starts_with('-') {
        return None;
    }
    digits.parse().ok()
}

/// The files of `instance`'s chain in `dir`, oldest first; of a file that
/// exists in both forms (a compression cut short), the compressed one.
pub(crate) fn chain_files(dir: &Path, instance: &str) -> std::io::Result<Vec<String>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Regular files only: a device or a directory is never ours.
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            if let Some(seq) = chain_file_seq(instance, &name) {
                files.push((seq, name));
            }
        }
    }
    files.sort();
    let compressed: std::collections::HashSet<String> = files
        .iter()
        .filter_map(|(_, n)| n.strip_suffix(".gz").map(str::to_string))
        .collect();
    Ok(files
        .into_iter()
        .map(|(_, n)| n)
        .filter(|n| !compressed.contains(n))
        .collect())
}

/// The trail files under `paths`: files as given; of a directory, its
/// `*.jsonl` and `*.jsonl.gz` files (of a file in both forms, the `.gz`).
pub fn expand(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| stem(n).is_some())
                        && f.is_file()
                })
                .collect();
            found.sort();
            let gz: Vec<PathBuf> = found
                .iter()
                .filter(|f| f.to_string_lossy().ends_with(GZIP))
                .cloned()
                .collect();
            found.retain(|f| !gz.contains(&gzip_name(f)));
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// `x.jsonl` → `x.jsonl.gz`.
fn gzip_name(plain: &Path) -> PathBuf {
    let mut s = plain.as_os_str().to_owned();
    s.push(".gz");
    PathBuf::from(s)
}

/// One trail file: on disk (plain or gzip, by its name), or in memory
/// (tests, and callers that have the bytes already).
pub struct TrailFile {
    /// How reports name it.
    pub name: String,
    source: Source,
}

enum Source {
    Disk(PathBuf),
    Memory(Vec<u8>),
}

impl TrailFile {
    /// The file at `path`; nothing is read until [`TrailFile::lines`].
    pub fn at(path: &Path) -> TrailFile {
        TrailFile {
            name: path.display().to_string(),
            source: Source::Disk(path.to_path_buf()),
        }
    }

    /// A file's bytes, already in memory (as written: not compressed).
    pub fn in_memory(name: &str, bytes: Vec<u8>) -> TrailFile {
        TrailFile {
            name: name.to_string(),
            source: Source::Memory(bytes),
        }
    }

    /// Its lines, from the start. A plain file that is gone by now was
    /// compressed meanwhile: its `.gz` is read instead.
    pub fn lines(&self) -> std::io::Result<Lines<'_>> {
        let reader: Box<dyn BufRead + '_> = match &self.source {
            Source::Memory(b) => Box::new(&b[..]),
            Source::Disk(path) => open(path)?,
        };
        Ok(Lines::new(reader))
    }
}

/// A reader of the file at `path`, decompressing a `.gz`.
fn open(path: &Path) -> std::io::Result<Box<dyn BufRead>> {
    let gz = path.to_string_lossy().ends_with(GZIP);
    let file = match File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !gz => {
            return open(&gzip_name(path));
        }
        other => other?,
    };
    Ok(if gz {
        Box::new(BufReader::with_capacity(
            64 * 1024,
            flate2::read::MultiGzDecoder::new(BufReader::new(file)),
        ))
    } else {
        Box::new(BufReader::with_capacity(64 * 1024, file))
    })
}

/// One line of a trail file.
pub struct Line<'a> {
    /// Its number in the file, from 1.
    pub number: usize,
    /// Its bytes, without the line break (cut at [`MAX_LINE`]).
    pub bytes: &'a [u8],
    /// It ended with a line break. Only a file's last piece can lack one:
    /// a write the proxy did not finish (a crash), no part of the chain.
    pub complete: bool,
    /// Its full length, when longer than what `bytes` holds.
    pub len: usize,
}

/// The lines of one file, one at a time, in bounded memory.
pub struct Lines<'a> {
    reader: Box<dyn BufRead + 'a>,
    buf: Vec<u8>,
    number: usize,
}

impl<'a> Lines<'a> {
    fn new(reader: Box<dyn BufRead + 'a>) -> Lines<'a> {
        Lines {
            reader,
            buf: Vec::with_capacity(4096),
            number: 0,
        }
    }

    /// The next line, or `None` at the end of the file.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> std::io::Result<Option<Line<'_>>> {
        self.buf.clear();
        let mut len = 0usize;
        let mut complete = false;
        loop {
            let chunk = self.reader.fill_buf()?;
            if chunk.is_empty() {
                break;
            }
            let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (i, true),
                None => (chunk.len(), false),
            };
            let room = MAX_LINE.saturating_sub(self.buf.len());
            self.buf.extend_from_slice(&chunk[..take.min(room)]);
            len += take;
            self.reader.consume(take + usize::from(done));
            if done {
                complete = true;
                break;
            }
        }
        if len == 0 && !complete {
            return Ok(None);
        }
        self.number += 1;
        Ok(Some(Line {
            number: self.number,
            bytes: &self.buf,
            complete,
            len,
        }))
    }
}

/// Compresses the rotated file `dir/name` to `name.gz` and removes it (see
/// the module docs for the order of steps). Returns the bytes before and
/// after.
pub(crate) fn compress(dir: &Path, name: &str) -> std::io::Result<(u64, u64)> {
    let plain = dir.join(name);
    let done = gzip_name(&plain);
    let mut tmp = done.as_os_str().to_owned();
    tmp.push(TMP);
    let tmp = PathBuf::from(tmp);
    let mut input = File::open(&plain)?;
    let before = input.metadata()?.len();
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let out = o.open(&tmp)?;
    let mut gz = flate2::write::GzEncoder::new(
        std::io::BufWriter::with_capacity(64 * 1024, out),
        flate2::Compression::default(),
    );
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        gz.write_all(&buf[..n])?;
    }
    let out = gz.finish()?.into_inner().map_err(|e| e.into_error())?;
    out.sync_all()?;
    let after = out.metadata()?.len();
    std::fs::rename(&tmp, &done)?;
    File::open(dir)?.sync_all()?;
    std::fs::remove_file(&plain)?;
    Ok((before, after))
}

/// Tidies what a compression cut short by a crash: a `.gz.tmp` is removed
/// (never renamed, so never complete), and a plain file whose `.gz` exists
/// is removed (the `.gz` is complete: it was renamed after its sync).
/// Returns the rotated plain files of `instance` left to compress: all but
/// the newest.
pub(crate) fn tidy(dir: &Path, instance: &str) -> std::io::Result<Vec<String>> {
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(base) = name.strip_suffix(TMP) {
            if chain_file_seq(instance, base).is_some() {
                std::fs::remove_file(dir.join(&name))?;
            }
        } else if name.ends_with(GZIP) && chain_file_seq(instance, &name).is_some() {
            let plain = dir.join(&name[..name.len() - 3]);
            if plain.exists() {
                std::fs::remove_file(plain)?;
            }
        }
    }
    let mut files = chain_files(dir, instance)?;
    // The newest is being written (or about to be): never compressed.
    files.pop();
    files.retain(|n| n.ends_with(PLAIN));
    Ok(files)
}

/// The thread that compresses rotated files, one at a time, away from the
/// writer (a rotated file of 128 MiB takes seconds of one core; the writer
/// must not stop taking records meanwhile). Dropping it lets the thread end
/// after the file at hand; a file it does not finish is done at the next
/// start (see [`tidy`]).
pub(crate) struct Compressor {
    queue: std::sync::mpsc::Sender<String>,
}

impl Compressor {
    /// Starts the thread for the files of `dir`.
    pub(crate) fn start(dir: &Path) -> std::io::Result<Compressor> {
        let (queue, names) = std::sync::mpsc::channel::<String>();
        let dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("xks-audit-gzip".into())
            .spawn(move || {
                for name in names {
                    match compress(&dir, &name) {
                        Ok((before, after)) => tracing::info!(
                            file = %name, before, after,
                            "rotated audit file compressed"
                        ),
                        Err(e) => tracing::warn!(
                            file = %name, error = %e,
                            "cannot compress the rotated audit file; it stays as it is (retried \
                             at the next start)"
                        ),
                    }
                }
            })?;
        Ok(Compressor { queue })
    }

    /// Compresses `name` (a rotated file of the directory) when its turn
    /// comes.
    pub(crate) fn queue(&self, name: String) {
        // The thread ends only when this handle is dropped.
        let _ = self.queue.send(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_files_are_recognized_by_instance_and_seq() {
        assert_eq!(
            chain_file_seq("a", "a.0000000000000042-20260101T000000Z.jsonl"),
            Some(42)
        );
        assert_eq!(
            chain_file_seq("a", "a.0000000000000042-20260101T000000Z-2.jsonl"),
            Some(42)
        );
        assert_eq!(
            chain_file_seq("a", "a.0000000000000042-20260101T000000Z.jsonl.gz"),
            Some(42)
        );
        assert_eq!(
            chain_file_seq("a", "a.b.0000000000000042-20260101T000000Z.jsonl"),
            None
        );
        assert_eq!(chain_file_seq("a", "a.00000000000042-x.jsonl"), None);
        assert_eq!(chain_file_seq("a", "a.lock"), None);
        assert_eq!(
            chain_file_seq("a", "a.0000000000000042-20260101T000000Z.jsonl.gz.tmp"),
            None
        );
    }

    fn lines_of(bytes: &[u8]) -> Vec<(usize, Vec<u8>, bool, usize)> {
        let f = TrailFile::in_memory("t", bytes.to_vec());
        let mut l = f.lines().unwrap();
        let mut out = Vec::new();
        while let Some(line) = l.next().unwrap() {
            out.push((line.number, line.bytes.to_vec(), line.complete, line.len));
        }
        out
    }

    #[test]
    fn lines_are_numbered_and_a_cut_off_last_one_is_marked() {
        assert_eq!(
            lines_of(b"a\n\nbc\nd"),
            vec![
                (1, b"a".to_vec(), true, 1),
                (2, b"".to_vec(), true, 0),
                (3, b"bc".to_vec(), true, 2),
                (4, b"d".to_vec(), false, 1),
            ]
        );
        assert!(lines_of(b"").is_empty());
    }

    #[test]
    fn a_line_longer_than_the_limit_is_cut_and_the_next_one_is_whole() {
        let mut b = vec![b'x'; MAX_LINE + 10];
        b.extend_from_slice(b"\nnext\n");
        let l = lines_of(&b);
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].1.len(), MAX_LINE);
        assert_eq!(l[0].3, MAX_LINE + 10);
        assert_eq!(l[1].1, b"next".to_vec());
    }

    #[test]
    fn a_compressed_file_reads_as_the_plain_one_and_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let old = "i.0000000000000000-20260101T000000Z.jsonl";
        let new = "i.0000000000000009-20260101T000100Z.jsonl";
        let text: Vec<u8> = (0..5000)
            .flat_map(|n| format!("{{\"line\":{n}}}\n").into_bytes())
            .collect();
        std::fs::write(dir.path().join(old), &text).unwrap();
        std::fs::write(dir.path().join(new), b"{}\n").unwrap();
        assert_eq!(tidy(dir.path(), "i").unwrap(), vec![old.to_string()]);
        let stale = TrailFile::at(&dir.path().join(old));
        let (before, after) = compress(dir.path(), old).unwrap();
        assert_eq!(before, text.len() as u64);
        assert!(after < before / 4, "{after} of {before}");
        assert!(!dir.path().join(old).exists());
        // A reader that listed the plain file before it went reads the .gz.
        let mut l = stale.lines().unwrap();
        let mut got = Vec::new();
        while let Some(line) = l.next().unwrap() {
            got.extend_from_slice(line.bytes);
            got.push(b'\n');
        }
        assert_eq!(got, text);
        let listed = expand(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed[0].to_string_lossy().ends_with(".jsonl.gz"));
        assert_eq!(chain_files(dir.path(), "i").unwrap().len(), 2);
    }

    #[test]
    fn a_compression_cut_short_is_tidied_and_never_read_twice() {
        let dir = tempfile::tempdir().unwrap();
        let old = "i.0000000000000000-20260101T000000Z.jsonl";
        let new = "i.0000000000000009-20260101T000100Z.jsonl";
        std::fs::write(dir.path().join(old), b"{\"a\":1}\n").unwrap();
        std::fs::write(dir.path().join(new), b"{}\n").unwrap();
        compress(dir.path(), old).unwrap();
        // A crash after the rename, before the plain file went; and one
        // during the next compression.
        std::fs::write(dir.path().join(old), b"{\"a\":1}\n").unwrap();
        std::fs::write(dir.path().join(format!("{new}.gz.tmp")), b"partial").unwrap();
        assert_eq!(expand(&[dir.path().to_path_buf()]).unwrap().len(), 2);
        assert_eq!(chain_files(dir.path(), "i").unwrap().len(), 2);
        assert!(tidy(dir.path(), "i").unwrap().is_empty());
        assert!(!dir.path().join(old).exists());
        assert!(!dir.path().join(format!("{new}.gz.tmp")).exists());
        assert!(dir.path().join(new).exists());
    }
}
