//! Two key managers holding the same key, one of them a network HSM: a token
//! served by `p11-kit server` and reached through `p11-kit-client.so`. The
//! test kills that server under load and starts it again: requests keep
//! succeeding through the other key manager, each inside KMS's budget, and
//! the proxy recovers the lost one by itself (re-initializing the module).

mod common;

use std::time::{Duration, Instant};

use common::load::{Load, DEADLINE_BOUND};
use common::network_hsm::*;
use common::*;
use serde_json::Value;
use xks_proxy::client::bodies;

#[test]
fn a_lost_network_hsm_fails_over_and_recovers_without_restart() {
    let (p, net) = start(true, true);
    let c = p.h1();
    assert_statuses(&p, &c, "ACTIVE", "ACTIVE");
    let load = Load::start(&c, SHARED_KEY);
    load.wait_for(200, &p);

    // The network HSM goes away.
    let killed_at = Instant::now();
    net.kill();
    assert!(
        eventually(10, || status_of(&c, "hsm-network") == "UNAVAILABLE"),
        "{}",
        p.log()
    );
    let noticed = killed_at.elapsed();
    assert_eq!(status_of(&c, "hsm-local"), "ACTIVE");
    load.wait_for(300, &p);
    let during = load.ok();

    // It comes back; the proxy finds it again by itself.
    let restarted_at = Instant::now();
    net.restart(&p);
    assert!(
        eventually(15, || status_of(&c, "hsm-network") == "ACTIVE"),
        "not recovered; log:\n{}",
        p.log()
    );
    let recovered = restarted_at.elapsed();
    load.wait_for(200, &p);
    let (failures, slowest) = load.finish();
    eprintln!(
        "two key managers, network one killed: noticed UNAVAILABLE after {noticed:?}; {during} \
         round trips by then; restarted: ACTIVE again after {recovered:?}; {} failed requests; \
         slowest request {slowest:?}",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "requests failed during the outage: {:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(slowest < DEADLINE_BOUND, "slowest request {slowest:?}");
    assert!(
        p.wait_for_log("the key manager's token is back"),
        "{}",
        p.log()
    );

    // The recovered network HSM really serves: take the local one out of the
    // rotation (its health-check key deleted → UNAVAILABLE), then decrypt.
    let enc = block_on(async {
        c.call(
            &format!("/keys/{SHARED_KEY}/encrypt"),
            bodies::encrypt(b"before", None, false),
        )
        .await
        .unwrap()
        .json()
    });
    p.delete_health_key();
    assert!(eventually(10, || status_of(&c, "hsm-local") == "UNAVAILABLE"));
    let dec = block_on(async {
        c.call(
            &format!("/keys/{SHARED_KEY}/decrypt"),
            bodies::decrypt_from(&enc, None).to_string(),
        )
        .await
        .unwrap()
    });
    assert_eq!(dec.status, 200, "{:?}", dec.body);
    let health: Value = block_on(async {
        c.call("/health", bodies::health("KmsHealthCheck"))
            .await
            .unwrap()
            .json()
    });
    assert_eq!(health["ekmFleetDetails"].as_array().unwrap().len(), 2);
}

/// With no other key manager to fail over to, the outage shows: requests get
/// fast, spec-shaped errors (never a hang past KMS's 250 ms), and service
/// comes back by itself once the HSM does.
#[test]
fn the_only_key_manager_lost_gives_fast_errors_then_recovers() {
    let (p, net) = start(false, true);
    let c = p.h1();
    let load = Load::start(&c, SHARED_KEY);
    load.wait_for(100, &p);

    net.kill();
    let outage_start = Instant::now();
    assert!(
        eventually(10, || load.failures.lock().unwrap().len() >= 20),
        "no failures seen after the HSM went away; log:\n{}",
        p.log()
    );
    // Keep the HSM away for a while: every request meanwhile must fail fast.
    std::thread::sleep(Duration::from_secs(2).saturating_sub(outage_start.elapsed()));
    let before_restart = load.ok();
    let restarted_at = Instant::now();
    net.restart(&p);
    assert!(
        eventually(15, || load.ok() > before_restart),
        "no recovery; log:\n{}",
        p.log()
    );
    let recovered = restarted_at.elapsed();
    let outage = outage_start.elapsed();
    load.wait_for(100, &p);
    let (failures, slowest) = load.finish();

    let mut by_error = std::collections::BTreeMap::<String, usize>::new();
    for f in &failures {
        *by_error
            .entry(format!("{} {}", f.status, f.error_name))
            .or_default() += 1;
    }
    let slowest_failure = failures.iter().map(|f| f.took).max().unwrap_or_default();
    eprintln!(
        "one key manager, killed for {outage:?}: {} failed requests {by_error:?}, slowest failure \
         {slowest_failure:?}; first success {recovered:?} after the restart; slowest request \
         {slowest:?}",
        failures.len()
    );
    // What the proxy said meanwhile (for the operator; printed, not asserted).
    let mut said = std::collections::BTreeMap::<String, usize>::new();
    for line in p.log().lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["level"] == "WARN" || v["level"] == "ERROR" {
            let what = format!("{} {} {}", v["level"], v["message"], v["error"]);
            *said.entry(what.chars().take(200).collect()).or_default() += 1;
        }
    }
    eprintln!("proxy warnings during the outage: {said:#?}");
    for f in &failures {
        assert!(f.status >= 500, "{f:?}");
        assert!(
            ["InternalException", "DependencyTimeoutException"].contains(&f.error_name.as_str()),
            "{f:?}"
        );
    }
    assert!(slowest < DEADLINE_BOUND, "slowest request {slowest:?}");
}

/// A key manager that is down when the proxy starts does not keep the proxy
/// from serving with the others (a restart during a partial HSM outage must
/// not become a full outage); it is listed as UNAVAILABLE.
#[test]
fn a_key_manager_down_at_startup_leaves_the_others_serving() {
    let (p, _net) = start(true, false);
    let c = p.h1();
    assert_statuses(&p, &c, "ACTIVE", "UNAVAILABLE");
    let dec = block_on(async {
        let enc = c
            .call(
                &format!("/keys/{SHARED_KEY}/encrypt"),
                bodies::encrypt(b"data key", None, true),
            )
            .await
            .unwrap();
        assert_eq!(enc.status, 200, "{:?}", enc.body);
        c.call(
            &format!("/keys/{SHARED_KEY}/decrypt"),
            bodies::decrypt_from(&enc.json(), None).to_string(),
        )
        .await
        .unwrap()
    });
    assert_eq!(dec.status, 200, "{:?}", dec.body);
    assert!(p.wait_for_log("key manager not available at startup"));
}
