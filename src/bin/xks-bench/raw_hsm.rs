//! `--raw-hsm`: the bare PKCS#11 cost of what the proxy asks the HSM for one
//! request, on the same token, the same key and the same machine, so that a
//! report can state the proxy's CPU per request as a multiple of the HSM's
//! own.
//!
//! One thread per session (as the proxy's pool has), each looping on its own
//! lane (`xks_proxy::hsm::raw`: its own session, the key handle looked up
//! once, IVs fetched in batches as the proxy does, the spec's AAD with its
//! length prefix). The CPU time is this
//! process's (utime + stime from /proc), which with an in-process module
//! like SoftHSM is the HSM's cost; a network HSM's own CPU is elsewhere and
//! this measures only the client side of it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use xks_proxy::config::Config;
use xks_proxy::hsm::raw::RawLane;
use xks_proxy::hsm::{HsmError, Token};
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
    Hsm(#[from] HsmError),
    #[error("cannot read this process's CPU time from /proc")]
    Proc,
}

/// One operation on a lane.
fn one(lane: &mut RawLane, op: RawOp) -> Result<(), HsmError> {
    match op {
        RawOp::Encrypt => lane.encrypt(),
        RawOp::EncryptCdiv => lane.encrypt_and_verify(),
        RawOp::Decrypt => lane.decrypt(),
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
    let sessions = load
        .sessions
        .unwrap_or_else(|| backend.sessions.unwrap_or(cfg.hsm.sessions))
        .max(1);
    // The AAD the proxy hands the HSM for a version-0 key: the spec's
    // length-prefixed encryption context, no ciphertext metadata.
    let aad = hsm_aad(&vec![0x33; load.aad_bytes], &[]);
    let lanes = (0..sessions)
        .map(|_| {
            RawLane::open(
                &token,
                load.key,
                vec![0x5a; load.plaintext_bytes],
                aad.clone(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;

    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = lanes
        .into_iter()
        .map(|mut lane| {
            let (measuring, stop, ops, op) =
                (measuring.clone(), stop.clone(), ops.clone(), load.op);
            std::thread::spawn(move || -> Result<(), HsmError> {
                while !stop.load(Ordering::Relaxed) {
                    one(&mut lane, op)?;
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
