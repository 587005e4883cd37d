//! `xks-bench`: SigV4-signed XKS load over TLS, the way KMS sends it.
//!
//! Modes:
//! - closed loop (default): `--connections N` keep-alive connections, each
//!   sending its next request as soon as the previous one is answered;
//! - open loop: `--rate R` requests/s spread over the connections; latency is
//!   measured from each request's *intended* send time, so a server that falls
//!   behind shows the queueing instead of hiding it (no coordinated omission);
//! - `--new-connection full|resume`: a fresh TLS connection per request, with a
//!   full handshake or with session resumption;
//! - `--idle-connections N`: N more connections held open and idle all along
//!   (with `--server-pid`, the server's RSS then shows their cost).
//!
//! Every request is freshly signed. With `--server-pid` it also reports the
//! server's CPU time per request and its RSS, read from /proc.
//!
//! `--raw-hsm encrypt|encrypt-cdiv|decrypt` instead measures the bare PKCS#11
//! work of one request on the configuration's token (see `raw_hsm`): the
//! denominator of "proxy CPU per request ÷ HSM CPU per request".
//!
//! Example (against `scripts/dev-up.sh`):
//! `xks-bench --op encrypt --connections 64 --duration 20`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use xks_proxy::client::{bodies, tls_config, HttpVersion, XksClient};

mod audit_trail;
mod raw_hsm;
use raw_hsm::{RawLoad, RawOp};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Op {
    Health,
    Metadata,
    Encrypt,
    Decrypt,
    /// 45% encrypt, 45% decrypt, 5% metadata, 5% health.
    Mix,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum NewConnection {
    Full,
    Resume,
}

#[derive(Debug, Parser)]
#[command(
    name = "xks-bench",
    about = "Load generator for XKS proxies (SigV4 over TLS)"
)]
struct Args {
    /// Proxy address (IP:port).
    #[arg(long, default_value = "127.0.0.1:8443")]
    addr: SocketAddr,
    /// TLS server name (SNI, certificate name, Host header).
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// CA certificate (PEM) that signed the proxy's certificate.
    #[arg(long, default_value = "certs/ca.crt")]
    ca: PathBuf,
    #[arg(long, default_value = "/example/kms/xks/v1")]
    uri_path: String,
    #[arg(long, default_value = "XKSPROXYDEVEXAMPLEKEYA")]
    access_key_id: String,
    /// File holding the secret access key.
    #[arg(long, default_value = ".dev/secrets/dev-a.secret")]
    secret_file: PathBuf,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// External key id to use.
    #[arg(long, default_value = "demo-key")]
    key: String,
    #[arg(long, value_enum, default_value = "encrypt")]
    op: Op,
    /// Plaintext size in bytes (a data key is 32).
    #[arg(long, default_value_t = 32)]
    plaintext_bytes: usize,
    /// AAD size in bytes (KMS's encryption context).
    #[arg(long, default_value_t = 64)]
    aad_bytes: usize,
    /// Ask for a CDIV, as KMS does for GenerateDataKey.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    cdiv: bool,
    /// Concurrent connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Fixed request rate (open loop); omit for closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured warm-up seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Use HTTP/2 (default HTTP/1.1 keep-alive).
    #[arg(long)]
    http2: bool,
    /// Open a new TLS connection for every request.
    #[arg(long, value_enum)]
    new_connection: Option<NewConnection>,
    /// Hold this many extra connections open and idle (TLS done, no request)
    /// for the whole run, e.g. to measure the server's memory per connection.
    #[arg(long, default_value_t = 0)]
    idle_connections: usize,
    /// The proxy's pid, to report its CPU time per request and RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// Measure the bare HSM work of one request instead (no proxy involved).
    #[arg(long, value_enum)]
    raw_hsm: Option<RawOp>,
    /// With --raw-hsm: the proxy configuration naming the token and PIN.
    #[arg(long, default_value = "config/dev.toml")]
    config: PathBuf,
    /// With --raw-hsm: threads, one session each (default: the pool size
    /// the configuration gives the proxy).
    #[arg(long)]
    sessions: Option<usize>,
    /// Write this many request records through the audit trail that
    /// --config configures (sealed in its key managers), then exit: a
    /// trail to measure `xks-proxy audit verify` on.
    #[arg(long)]
    write_audit_trail: Option<u64>,
}

/// `--raw-hsm`: runs the loop and reports it like a proxy run.
fn run_raw(args: &Args, op: RawOp) -> std::process::ExitCode {
    let load = RawLoad {
        config: &args.config,
        key: &args.key,
        op,
        plaintext_bytes: args.plaintext_bytes,
        aad_bytes: args.aad_bytes,
        sessions: args.sessions,
        warmup: Duration::from_secs_f64(args.warmup),
        duration: Duration::from_secs_f64(args.duration),
    };
    match raw_hsm::run(&load) {
        Ok(r) => {
            let rps = r.ops as f64 / r.secs;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "op": op.as_str(), "mode": "raw-hsm", "sessions": r.sessions,
                        "plaintext_bytes": args.plaintext_bytes, "aad_bytes": args.aad_bytes,
                        "duration_s": r.secs, "ops": r.ops, "rps": rps,
                        "cpu_us_per_op": r.cpu_us_per_op,
                    })
                );
            } else {
                println!(
                    "{} sessions={}: {rps:.0} ops/s, {:.1} us CPU/op",
                    op.as_str(),
                    r.sessions,
                    r.cpu_us_per_op
                );
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xks-bench: --raw-hsm: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// What one worker measured.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: BTreeMap<String, u64>,
}

struct Shared {
    client: XksClient,
    args: Args,
    decrypt_bodies: Vec<Bytes>,
    next: AtomicU64,
    /// Open loop: send times from the pacer thread, shared by the workers.
    tickets: Option<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<(u64, Instant)>>>,
}

/// Open-loop pacing on a thread of its own. Tokio's timer has a 1 ms
/// resolution, so a worker sleeping until each due time wakes up to 1 ms late
/// — and because latency is measured from the due time, that lateness would be
/// reported as server latency. `std::thread::sleep` (nanosleep) is precise to
/// tens of microseconds; the pacer releases request `i` at `start + i/rate`
/// and an idle worker sends it. When every worker is busy, the ticket waits,
/// and that wait is counted: queueing is never hidden.
fn pacer(
    tx: tokio::sync::mpsc::UnboundedSender<(u64, Instant)>,
    rate: f64,
    start: Instant,
    end: Instant,
) {
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut i = 0u64;
    loop {
        let due = start + interval.mul_f64(i as f64);
        if due >= end {
            return; // dropping `tx` ends the workers
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        if tx.send((i, due)).is_err() {
            return;
        }
        i += 1;
    }
}

fn body_for(shared: &Shared, op: Op, i: u64) -> (String, Bytes) {
    let a = &shared.args;
    let key = &a.key;
    match op {
        Op::Health => (
            "/health".into(),
            Bytes::from(bodies::health("KmsHealthCheck")),
        ),
        Op::Metadata => (
            format!("/keys/{key}/metadata"),
            Bytes::from(bodies::metadata()),
        ),
        Op::Encrypt => {
            let pt = vec![0x5au8; a.plaintext_bytes];
            let aad = vec![0x33u8; a.aad_bytes];
            let aad = (a.aad_bytes > 0).then_some(aad.as_slice());
            (
                format!("/keys/{key}/encrypt"),
                Bytes::from(bodies::encrypt(&pt, aad, a.cdiv)),
            )
        }
        Op::Decrypt => {
            let b = &shared.decrypt_bodies[(i as usize) % shared.decrypt_bodies.len()];
            (format!("/keys/{key}/decrypt"), b.clone())
        }
        Op::Mix => {
            let op = match i % 20 {
                0 => Op::Health,
                1 => Op::Metadata,
                n if n % 2 == 0 => Op::Encrypt,
                _ => Op::Decrypt,
            };
            body_for(shared, op, i)
        }
    }
}

async fn worker(shared: Arc<Shared>, measure_from: Instant, end: Instant) -> Tally {
    let mut tally = Tally::default();
    let mut conn = None;
    loop {
        let (i, intended) = match &shared.tickets {
            // Open loop: request i is due at start + i/rate, whoever sends it.
            Some(rx) => match rx.lock().await.recv().await {
                Some(ticket) => ticket,
                None => break,
            },
            None => {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                (shared.next.fetch_add(1, Ordering::Relaxed), now)
            }
        };
        let (suffix, body) = body_for(&shared, shared.args.op, i);
        let outcome = async {
            let req = shared
                .client
                .signed_request(&suffix, body, SystemTime::now())
                .map_err(|e| e.to_string())?;
            if shared.args.new_connection.is_some() || conn.is_none() {
                conn = Some(shared.client.connect().await.map_err(|e| e.to_string())?);
            }
            let c = conn.as_mut().ok_or("no connection")?;
            c.send(req).await.map_err(|e| e.to_string())
        }
        .await;
        let done = Instant::now();
        if intended < measure_from {
            continue;
        }
        match outcome {
            Ok(r) if r.status.is_success() => {
                tally.latencies_us.push(
                    done.duration_since(intended)
                        .as_micros()
                        .min(u32::MAX as u128) as u32,
                );
            }
            Ok(r) => {
                let name = r
                    .error_name()
                    .unwrap_or_else(|| format!("HTTP {}", r.status));
                *tally.errors.entry(name).or_default() += 1;
            }
            Err(e) => {
                conn = None;
                let kind = e.split(':').next().unwrap_or("transport").to_string();
                *tally.errors.entry(kind).or_default() += 1;
            }
        }
    }
    tally
}

/// utime+stime in clock ticks (100 Hz on Linux) and current/peak RSS in KiB.
fn proc_stats(pid: u32) -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((ticks, kib("VmRSS:")?, kib("VmHWM:")?))
}

/// Context switches (voluntary + involuntary) of each of the server's
/// threads, summed per thread name (`/proc/PID/task/*/status`): where the
/// hand-offs between threads go. A thread that ends between two samples
/// takes its count with it.
fn ctxt_switches(pid: u32) -> Option<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(task) = task else { continue };
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let mut name = String::new();
        let mut n = 0u64;
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("Name:") {
                name = v.trim().to_string();
            } else if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                n += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
        *out.entry(name).or_default() += n;
    }
    Some(out)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(n) = args.write_audit_trail {
        return match audit_trail::write(&args.config, n) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("xks-bench: {e}");
                std::process::ExitCode::from(1)
            }
        };
    }
    if let Some(op) = args.raw_hsm {
        return run_raw(&args, op);
    }
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        eprintln!("xks-bench: --rate must be a positive number of requests per second");
        return std::process::ExitCode::from(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime"); // ok: a benchmark without a runtime cannot run at all
    runtime.block_on(run(args))
}

async fn run(args: Args) -> std::process::ExitCode {
    let secret = match std::fs::read_to_string(&args.secret_file) {
        Ok(s) => s.trim().to_string(),
        Err(e) => {
            eprintln!("xks-bench: cannot read {}: {e}", args.secret_file.display());
            return std::process::ExitCode::from(2);
        }
    };
    let version = if args.http2 {
        HttpVersion::Http2
    } else {
        HttpVersion::Http1
    };
    let mut tls = match tls_config(&args.ca, version) {
        Ok(t) => (*t).clone(),
        Err(e) => {
            eprintln!("xks-bench: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.new_connection == Some(NewConnection::Full) {
        tls.resumption = rustls::client::Resumption::disabled();
    }
    let client = XksClient::new(
        args.addr,
        &args.server_name,
        &args.uri_path,
        &args.access_key_id,
        &secret,
        &args.region,
        Arc::new(tls),
        version,
    );

    // Ciphertexts to decrypt, made once up front.
    let mut decrypt_bodies = Vec::new();
    if matches!(args.op, Op::Decrypt | Op::Mix) {
        let pt = vec![0x5au8; args.plaintext_bytes];
        let aad = vec![0x33u8; args.aad_bytes];
        let aad = (args.aad_bytes > 0).then_some(aad.as_slice());
        for _ in 0..64 {
            match client
                .call(
                    &format!("/keys/{}/encrypt", args.key),
                    bodies::encrypt(&pt, aad, false),
                )
                .await
            {
                Ok(r) if r.status.is_success() => decrypt_bodies.push(Bytes::from(
                    bodies::decrypt_from(&r.json(), aad).to_string(),
                )),
                Ok(r) => {
                    eprintln!("xks-bench: setup encrypt failed: {} {:?}", r.status, r.body);
                    return std::process::ExitCode::from(1);
                }
                Err(e) => {
                    eprintln!("xks-bench: setup encrypt failed: {e}");
                    return std::process::ExitCode::from(1);
                }
            }
        }
    }

    // Idle connections, opened before the measured load and held to the end.
    let mut idle = Vec::with_capacity(args.idle_connections);
    for i in 0..args.idle_connections {
        match client.connect().await {
            Ok(c) => idle.push(c),
            Err(e) => {
                eprintln!("xks-bench: idle connection {i} failed: {e}");
                return std::process::ExitCode::from(1);
            }
        }
    }

    let connections = args.connections.max(1);
    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + warmup;
    let end = measure_from + duration;
    let tickets = args.rate.map(|rate| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || pacer(tx, rate, start, end));
        tokio::sync::Mutex::new(rx)
    });
    let shared = Arc::new(Shared {
        client,
        args,
        decrypt_bodies,
        next: AtomicU64::new(0),
        tickets,
    });

    // Server CPU is sampled at the warm-up boundary and at the end.
    let pid = shared.args.server_pid;
    let sampler = tokio::spawn(async move {
        let pid = pid?;
        tokio::time::sleep_until(measure_from.into()).await;
        let before = (proc_stats(pid)?, ctxt_switches(pid)?);
        tokio::time::sleep_until(end.into()).await;
        let after = (proc_stats(pid)?, ctxt_switches(pid)?);
        Some((before, after))
    });

    let mut tasks = Vec::with_capacity(connections);
    for _ in 0..connections {
        tasks.push(tokio::spawn(worker(shared.clone(), measure_from, end)));
    }
    let mut all = Tally::default();
    for t in tasks {
        if let Ok(t) = t.await {
            all.latencies_us.extend(t.latencies_us);
            for (k, v) in t.errors {
                *all.errors.entry(k).or_default() += v;
            }
        }
    }
    let stats = sampler.await.ok().flatten();
    let idle_held = idle.len();
    drop(idle);
    all.latencies_us.sort_unstable();
    let ok = all.latencies_us.len() as u64;
    let errors: u64 = all.errors.values().sum();
    let secs = duration.as_secs_f64();
    let l = &all.latencies_us;
    let requests = (ok + errors).max(1) as f64;
    let cpu_us_per_req = stats.as_ref().map(|(((t0, _, _), _), ((t1, _, _), _))| {
        (t1.saturating_sub(*t0)) as f64 * 10_000.0 / requests
    });
    // Context switches per request, per thread name and in all.
    let ctxt: Option<BTreeMap<String, f64>> = stats.as_ref().map(|((_, c0), (_, c1))| {
        c1.iter()
            .map(|(name, n)| {
                let before = c0.get(name).copied().unwrap_or(0);
                (name.clone(), n.saturating_sub(before) as f64 / requests)
            })
            .filter(|(_, v)| *v > 0.0)
            .collect()
    });
    let ctxt_total = ctxt.as_ref().map(|c| c.values().sum::<f64>());
    let stats = stats.map(|((a, _), (b, _))| (a, b));
    let a = &shared.args;
    let mode = match (a.rate, a.new_connection) {
        (_, Some(NewConnection::Full)) => "new-connection-full-handshake",
        (_, Some(NewConnection::Resume)) => "new-connection-resumed",
        (Some(_), None) => "open-loop",
        (None, None) => "closed-loop",
    };
    let result = serde_json::json!({
        "op": format!("{:?}", a.op).to_lowercase(),
        "mode": mode,
        "http": if a.http2 { "h2" } else { "http/1.1" },
        "connections": connections,
        "idle_connections": idle_held,
        "target_rate": a.rate,
        "duration_s": secs,
        "requests_ok": ok,
        "errors": all.errors,
        "rps": (ok + errors) as f64 / secs,
        "latency_ms": {
            "p50": percentile(l, 50.0), "p90": percentile(l, 90.0), "p99": percentile(l, 99.0),
            "p99_9": percentile(l, 99.9), "max": l.last().map(|v| *v as f64 / 1000.0).unwrap_or(0.0),
        },
        "server_cpu_us_per_request": cpu_us_per_req,
        "server_rss_kib": stats.map(|(_, (_, rss, _))| rss),
        "server_peak_rss_kib": stats.map(|(_, (_, _, hwm))| hwm),
        "server_ctxt_switches_per_request": ctxt_total,
        "server_ctxt_switches_per_request_by_thread": ctxt,
    });
    if a.json {
        println!("{result}");
    } else {
        println!(
            "{} {} {} conns={} rate={}: {:.0} req/s, ok={} errors={:?}\n  latency ms: p50={:.3} p90={:.3} p99={:.3} p99.9={:.3} max={:.3}",
            result["op"].as_str().unwrap_or(""),
            mode,
            result["http"].as_str().unwrap_or(""),
            connections,
            a.rate.map(|r| r.to_string()).unwrap_or_else(|| "max".into()),
            result["rps"].as_f64().unwrap_or(0.0),
            ok,
            all.errors,
            percentile(l, 50.0),
            percentile(l, 90.0),
            percentile(l, 99.0),
            percentile(l, 99.9),
            l.last().map(|v| *v as f64 / 1000.0).unwrap_or(0.0),
        );
        if let Some(cpu) = cpu_us_per_req {
            println!(
                "  server: {:.1} us CPU/request, RSS {} KiB (peak {} KiB)",
                cpu, result["server_rss_kib"], result["server_peak_rss_kib"]
            );
        }
        if let (Some(total), Some(by)) = (ctxt_total, &ctxt) {
            let by: Vec<String> = by.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
            println!(
                "  server: {total:.2} context switches/request ({})",
                by.join(", ")
            );
        }
    }
    if errors > 0 {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    }
}
