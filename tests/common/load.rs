//! Continuous encrypt → decrypt round trips on one keep-alive connection,
//! from a thread of their own, counting successes and failures.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use xks_proxy::client::{bodies, ClientError, Connection, XksClient, XksResponse};

use super::*;

/// Sends one request; records its time in `slowest_us` when it is the slowest.
async fn timed(
    conn: &mut Connection,
    req: http::Request<http_body_util::Full<bytes::Bytes>>,
    slowest_us: Arc<AtomicU64>,
) -> (Result<XksResponse, ClientError>, Duration) {
    let t = Instant::now();
    let r = conn.send(req).await;
    let took = t.elapsed();
    slowest_us.fetch_max(took.as_micros() as u64, Ordering::Relaxed);
    (r, took)
}

/// The longest a request may take, seen from the client, while a key
/// manager hangs, dies or comes back. The proxy's deadlines (queue 150 ms,
/// operation 200 ms by default, shorter in some tests) bound every request,
/// and this says so; a request that waited for the failed HSM would take
/// as long as the outage, seconds. It is not KMS's 250 ms: on a machine busy
/// with other work, a request's wall time also counts the time the client's
/// and the proxy's threads wait for a CPU, which no deadline bounds (271 ms
/// was seen with two test suites sharing two cores). The 250 ms budget is
/// met by the deadlines' configuration and measured by the benchmark.
pub const DEADLINE_BOUND: Duration = Duration::from_secs(1);

/// One failed request as the client saw it.
#[derive(Debug)]
pub struct Failure {
    pub status: u16,
    pub error_name: String,
    pub took: Duration,
}

/// Continuous encrypt → decrypt round trips on the shared key, on one
/// keep-alive connection, from a thread of its own.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    slowest_us: Arc<AtomicU64>,
    pub failures: Arc<Mutex<Vec<Failure>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(c: &XksClient, key: &'static str) -> Load {
        let mut load = Load {
            stop: Arc::default(),
            ok: Arc::default(),
            slowest_us: Arc::default(),
            failures: Arc::default(),
            thread: None,
        };
        let (c, stop, ok, slowest_us, failures) = (
            c.clone(),
            load.stop.clone(),
            load.ok.clone(),
            load.slowest_us.clone(),
            load.failures.clone(),
        );
        load.thread = Some(std::thread::spawn(move || {
            block_on(async move {
                let mut conn = c.connect().await.unwrap();
                while !stop.load(Ordering::Relaxed) {
                    let req = signed(
                        &c,
                        &format!("/keys/{key}/encrypt"),
                        bodies::encrypt(b"data key", None, true),
                    );
                    let (enc, took) = timed(&mut conn, req, slowest_us.clone()).await;
                    let (dec, took) = match enc {
                        Ok(r) if r.status == 200 => {
                            let body = bodies::decrypt_from(&r.json(), None).to_string();
                            let req = signed(&c, &format!("/keys/{key}/decrypt"), body);
                            timed(&mut conn, req, slowest_us.clone()).await
                        }
                        other => (other, took),
                    };
                    match dec {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            let error_name = serde_json::from_slice::<Value>(&r.body)
                                .ok()
                                .and_then(|v| v["errorName"].as_str().map(str::to_string))
                                .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into_owned());
                            failures.lock().unwrap().push(Failure {
                                status: r.status.as_u16(),
                                error_name,
                                took,
                            });
                        }
                        Err(e) => panic!("the connection failed: {e}"),
                    }
                }
            })
        }));
        load
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits for `n` more successful round trips.
    pub fn wait_for(&self, n: u64, p: &Proxy) {
        let target = self.ok() + n;
        assert!(
            eventually(20, || self.ok() >= target),
            "stalled; failures {:?}\nlog:\n{}",
            &self.failures.lock().unwrap()[..],
            p.log()
        );
    }

    /// Stops the load; returns the failures and the slowest request.
    pub fn finish(mut self) -> (Vec<Failure>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let failures = std::mem::take(&mut *self.failures.lock().unwrap());
        (
            failures,
            Duration::from_micros(self.slowest_us.load(Ordering::Relaxed)),
        )
    }
}
