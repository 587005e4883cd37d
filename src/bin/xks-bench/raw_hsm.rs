//! `--raw-hsm`: the bare PKCS#11 cost of what the proxy asks the HSM for one
//! request, on the same token, the same key and the same machine, so that a
//! report can state the proxy's CPU per request as a multiple of the HSM's
//! own.
//!
//! One thread per session (as the proxy's pool has), each looping on its own
//! session with the key handle looked up once: `C_EncryptInit` +
//! `C_Encrypt` with AES-GCM (a 12-byte IV from `C_GenerateRandom`, fetched
//! 256 at a time as the proxy does, the spec's AAD with its length prefix),
//! then for `encrypt-cdiv` the verification decrypt the proxy does, and for
//! `decrypt` a decrypt of one fixed ciphertext. The CPU time is this
//! process's (utime + stime from /proc), which with an in-process module
//! like SoftHSM is the HSM's cost; a network HSM's own CPU is elsewhere and
//! this measures only the client side of it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::ObjectHandle;
use cryptoki::session::Session;
use xks_proxy::config::Config;
use xks_proxy::hsm::Token;
use xks_proxy::spec::aead::hsm_aad;

/// Which HSM work one request costs.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum RawOp {
    /// Encrypt (no CDIV): one GCM encryption.
    Encrypt,
    /// Encrypt with a CDIV: the encryption and the verification decrypt.
    EncryptCdiv,
    /// Decrypt: one GCM decryption.
    Decrypt,
}

impl RawOp {
    pub fn as_str(self) -> &'static str {
        match self {
            RawOp::Encrypt => "raw-encrypt",
            RawOp::EncryptCdiv => "raw-encrypt-cdiv",
            RawOp::Decrypt => "raw-decrypt",
        }
    }
}

/// What a raw run measured.
pub struct RawResult {
    pub ops: u64,
    pub secs: f64,
    /// This process's CPU time per operation, in µs.
    pub cpu_us_per_op: f64,
    pub sessions: usize,
}

/// How the load is shaped.
pub struct RawLoad<'a> {
    pub config: &'a Path,
    pub key: &'a str,
    pub op: RawOp,
    pub plaintext_bytes: usize,
    pub aad_bytes: usize,
    /// Threads (one session each); default: the configuration's pool size.
    pub sessions: Option<usize>,
    pub warmup: Duration,
    pub duration: Duration,
}

/// Why the raw run could not start.
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error(transparent)]
    Config(#[from] xks_proxy::config::ConfigError),
    #[error("the configuration has no [[hsm.backends]]")]
    NoBackend,
    #[error(transparent)]
    Hsm(#[from] xks_proxy::hsm::HsmError),
    #[error("PKCS#11: {0}")]
    Pkcs11(#[from] cryptoki::error::Error),
    #[error("cannot read this process's CPU time from /proc")]
    Proc,
}

const TAG_BITS: u64 = 128;
const IV_LEN: usize = 12;
const IV_BATCH: usize = 256;

/// One thread's session and what it encrypts.
struct Lane {
    session: Session,
    key: ObjectHandle,
    plaintext: Vec<u8>,
    aad: Vec<u8>,
    ivs: Vec<u8>,
    iv_pos: usize,
    /// For `decrypt`: one ciphertext+tag and its IV.
    sealed: Vec<u8>,
    sealed_iv: Vec<u8>,
}

impl Lane {
    fn next_iv(&mut self) -> Result<Vec<u8>, cryptoki::error::Error> {
        if self.iv_pos + IV_LEN > self.ivs.len() {
            self.session.generate_random_slice(&mut self.ivs)?;
            self.iv_pos = 0;
        }
        let iv = self.ivs[self.iv_pos..self.iv_pos + IV_LEN].to_vec();
        self.iv_pos += IV_LEN;
        Ok(iv)
    }

    fn encrypt(&mut self) -> Result<(Vec<u8>, Vec<u8>), cryptoki::error::Error> {
        let mut iv = self.next_iv()?;
        let params = GcmParams::new(&mut iv, &self.aad, TAG_BITS.into())?;
        let sealed = self
            .session
            .encrypt(&Mechanism::AesGcm(params), self.key, &self.plaintext)?;
        Ok((iv, sealed))
    }

    fn decrypt(&self, iv: &[u8], sealed: &[u8]) -> Result<Vec<u8>, cryptoki::error::Error> {
        let mut iv = iv.to_vec();
        let params = GcmParams::new(&mut iv, &self.aad, TAG_BITS.into())?;
        self.session
            .decrypt(&Mechanism::AesGcm(params), self.key, sealed)
    }

    fn one(&mut self, op: RawOp) -> Result<(), cryptoki::error::Error> {
        match op {
            RawOp::Encrypt => self.encrypt().map(drop),
            RawOp::EncryptCdiv => {
                let (iv, sealed) = self.encrypt()?;
                self.decrypt(&iv, &sealed).map(drop)
            }
            RawOp::Decrypt => self.decrypt(&self.sealed_iv, &self.sealed).map(drop),
        }
    }
}

/// utime + stime of this process, in clock ticks (100 Hz).
fn own_cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

pub fn run(load: &RawLoad<'_>) -> Result<RawResult, RawError> {
    let cfg = Config::load(load.config)?;
    let backend = cfg.hsm.backends.first().ok_or(RawError::NoBackend)?;
    let token = Token::open(&cfg.hsm, backend)?;
    let key = token.key_handle(load.key)?;
    let sessions = load
        .sessions
        .unwrap_or_else(|| backend.sessions.unwrap_or(cfg.hsm.sessions))
        .max(1);
    // The AAD the proxy hands the HSM for a version-0 key: the spec's
    // length-prefixed encryption context, no ciphertext metadata.
    let aad = hsm_aad(&vec![0x33; load.aad_bytes], &[]);
    let mut lanes = Vec::with_capacity(sessions);
    for _ in 0..sessions {
        let mut lane = Lane {
            session: token.open_session()?,
            key,
            plaintext: vec![0x5a; load.plaintext_bytes],
            aad: aad.clone(),
            ivs: vec![0; IV_LEN * IV_BATCH],
            iv_pos: IV_LEN * IV_BATCH,
            sealed: Vec::new(),
            sealed_iv: Vec::new(),
        };
        let (iv, sealed) = lane.encrypt()?;
        lane.sealed_iv = iv;
        lane.sealed = sealed;
        lanes.push(lane);
    }

    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = lanes
        .into_iter()
        .map(|mut lane| {
            let (measuring, stop, ops, op) =
                (measuring.clone(), stop.clone(), ops.clone(), load.op);
            std::thread::spawn(move || -> Result<(), cryptoki::error::Error> {
                while !stop.load(Ordering::Relaxed) {
                    lane.one(op)?;
                    if measuring.load(Ordering::Relaxed) {
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(load.warmup);
    let cpu0 = own_cpu_ticks().ok_or(RawError::Proc)?;
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    std::thread::sleep(load.duration);
    measuring.store(false, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = own_cpu_ticks().ok_or(RawError::Proc)?;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        if let Ok(Err(e)) = t.join() {
            return Err(e.into());
        }
    }
    let ops = ops.load(Ordering::Relaxed);
    // Ticks are 10 ms; the loop threads are all this process does.
    let cpu_us = (cpu1 - cpu0) as f64 * 10_000.0;
    Ok(RawResult {
        ops,
        secs,
        cpu_us_per_op: if ops > 0 { cpu_us / ops as f64 } else { 0.0 },
        sessions,
    })
}
