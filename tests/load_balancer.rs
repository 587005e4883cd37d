//! A fleet of three proxy instances behind a real load balancer: HAProxy in
//! TCP mode (a stand-in for an NLB), sending PROXY protocol v2 and checking
//! each instance's `/ping`. Under continuous load one instance is killed
//! (SIGKILL: a crash, not a drain); clients lose at most the requests that
//! were in flight on it, the others keep serving, and the instance rejoins
//! when it starts again. Loopback only; about ten seconds.

mod common;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::load::DEADLINE_BOUND;
use common::*;
use xks_proxy::client::{bodies, XksClient};

/// Client connections, each a keep-alive loop of encrypt calls.
const CONNECTIONS: usize = 6;
/// Requests per connection before it reconnects, so that new connections
/// spread over the fleet as it changes (KMS opens new connections too).
const REQUESTS_PER_CONNECTION: u64 = 40;

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// HAProxy in the foreground; killed when dropped.
struct Haproxy(Child);

impl Haproxy {
    fn start(dir: &Path, front: SocketAddr, fleet: &[&Proxy]) -> Haproxy {
        let servers: String = fleet
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "  server xks{i} {} send-proxy-v2 check port {} inter 200ms fall 2 rise 2\n",
                    p.addr,
                    p.ping_addr.port()
                )
            })
            .collect();
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 2000\n\
                 defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 30s\n  \
                 timeout server 30s\n  retries 2\n  option redispatch\n\
                 frontend xks\n  bind {front}\n  default_backend fleet\n\
                 backend fleet\n  balance leastconn\n  option httpchk GET /ping\n  \
                 http-check expect status 200\n{servers}"
            ),
        )
        .unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy (Debian package haproxy) must be installed");
        let up = eventually(10, || TcpStream::connect(front).is_ok());
        assert!(up, "haproxy did not start");
        Haproxy(child)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Requests served by one instance, from its access log.
fn served(p: &Proxy) -> usize {
    p.log()
        .lines()
        .filter(|l| l.contains("\"message\":\"request\"") && l.contains("\"status\":200"))
        .count()
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    /// Failed requests, with what the client saw.
    failures: Mutex<Vec<String>>,
    slowest_ok_us: AtomicU64,
}

/// One client connection loop; reconnects after errors and every
/// [`REQUESTS_PER_CONNECTION`] requests.
fn client_loop(c: XksClient, stop: Arc<AtomicBool>, n: Arc<Counters>) {
    block_on(async move {
        while !stop.load(Ordering::Relaxed) {
            let mut conn = match c.connect().await {
                Ok(conn) => conn,
                Err(e) => {
                    n.failures.lock().unwrap().push(format!("connect: {e}"));
                    continue;
                }
            };
            for _ in 0..REQUESTS_PER_CONNECTION {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let t = Instant::now();
                let req = signed(
                    &c,
                    "/keys/key-ed/encrypt",
                    bodies::encrypt(b"data key", None, true),
                );
                match conn.send(req).await {
                    Ok(r) if r.status == 200 => {
                        n.ok.fetch_add(1, Ordering::Relaxed);
                        n.slowest_ok_us
                            .fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        n.failures
                            .lock()
                            .unwrap()
                            .push(format!("HTTP {}", r.status));
                    }
                    Err(e) => {
                        n.failures.lock().unwrap().push(format!("in flight: {e}"));
                        break;
                    }
                }
            }
        }
    })
}

#[test]
fn a_fleet_behind_haproxy_survives_losing_an_instance_and_takes_it_back() {
    let first = Proxy::start_with(Options {
        extra_server: "proxy_protocol = true\n".into(),
        ..Options::default()
    });
    let second = first.sibling();
    let mut third = first.sibling();
    let front = free_port();
    let _lb = Haproxy::start(first.dir.path(), front, &[&first, &second, &third]);
    let c = first.h1_via(front);

    let stop = Arc::new(AtomicBool::new(false));
    let n = Arc::new(Counters::default());
    let clients: Vec<_> = (0..CONNECTIONS)
        .map(|_| {
            let (c, stop, n) = (c.clone(), stop.clone(), n.clone());
            std::thread::spawn(move || client_loop(c, stop, n))
        })
        .collect();
    let ok_after = |more: u64| {
        let target = n.ok.load(Ordering::Relaxed) + more;
        assert!(
            eventually(20, || n.ok.load(Ordering::Relaxed) >= target),
            "load stalled; failures: {:?}",
            n.failures.lock().unwrap()
        );
    };

    // Every instance serves while all are up.
    ok_after(300);
    let all_up = [served(&first), served(&second), served(&third)];
    assert!(
        all_up.iter().all(|&s| s > 0),
        "served per instance: {all_up:?}"
    );
    // Through HAProxy's PROXY v2 header the access log shows the client's own
    // address (a loopback client port), not the balancer's.
    assert!(first.log().contains("\"client_addr\":\"127.0.0.1:"));

    // One instance crashes.
    let failed_before = n.failures.lock().unwrap().len();
    third.kill();
    let killed_at = Instant::now();
    ok_after(600);
    let failed_by_crash = n.failures.lock().unwrap().len() - failed_before;
    let served_while_down = [served(&first), served(&second)];

    // It starts again on its ports; HAProxy's checks find it and new
    // connections reach it.
    let before_rejoin = served(&third);
    third.start_again();
    let restarted_at = Instant::now();
    let down = restarted_at - killed_at;
    assert!(
        eventually(15, || served(&third) > before_rejoin),
        "the restarted instance got no traffic; failures: {:?}",
        n.failures.lock().unwrap()
    );
    let rejoined = restarted_at.elapsed();
    ok_after(200);
    stop.store(true, Ordering::Relaxed);
    for t in clients {
        t.join().unwrap();
    }

    let failures = n.failures.lock().unwrap();
    let slowest = Duration::from_micros(n.slowest_ok_us.load(Ordering::Relaxed));
    eprintln!(
        "3 instances, {CONNECTIONS} connections: {} ok; one instance killed and down for {down:?}: \
         {failed_by_crash} failed requests ({:?}); the other two had served {served_while_down:?} \
         by then; restarted instance served again {rejoined:?} after its restart; {} failures in \
         the whole run; slowest success {slowest:?}",
        n.ok.load(Ordering::Relaxed),
        &failures[failed_before..failed_before + failed_by_crash],
        failures.len(),
    );
    // A crash loses at most what was in flight on it: per client connection
    // on the killed instance, the request it was waiting for (or the TLS
    // handshake it was in). Never an error status: nobody answered badly.
    assert!(
        failed_by_crash <= CONNECTIONS && failures.len() <= CONNECTIONS,
        "{failed_by_crash} failures from one crash: {:?}",
        &failures[..]
    );
    assert!(
        failures.iter().all(|f| !f.starts_with("HTTP")),
        "only connections to the killed instance may fail: {:?}",
        &failures[..]
    );
    assert!(slowest < DEADLINE_BOUND, "slowest success {slowest:?}");
}
