//! `--write-audit-trail N`: writes N request records through the configured
//! audit trail, sealed in the configured key managers as `serve` seals them,
//! so that `xks-proxy audit verify` can be measured on a trail of any size
//! (scripts/bench-audit.sh). The records carry every field KMS's requests
//! fill, at their usual lengths, so the bytes per record are a real trail's.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use xks_proxy::audit::config::default_instance_id;
use xks_proxy::audit::{AuditTrail, Decision, HsmSealer, RequestRecord};
use xks_proxy::config::Config;
use xks_proxy::hsm::lanes::Placement;
use xks_proxy::hsm::KeyManagers;
use xks_proxy::telemetry::metrics::Metrics;

/// One request as KMS makes it: a Decrypt of a data key by S3.
fn record(n: u64) -> RequestRecord {
    RequestRecord {
        received: Some(SystemTime::now()),
        kms_request_id: Some(format!("6d0e8e5a-3b1f-4c2e-9a7d-{:012x}", n)),
        kms_operation: Some("Decrypt".into()),
        operation: Some("Decrypt"),
        key_store: Some("example".into()),
        key_id: Some("prod-key-0001".into()),
        key_version: Some(1),
        aws_principal_arn: Some("arn:aws:sts::111122223333:assumed-role/app-role/i-0abc123".into()),
        kms_key_arn: Some(
            "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab".into(),
        ),
        kms_via_service: Some("s3.us-east-1.amazonaws.com".into()),
        client_addr: Some(SocketAddr::from((
            [10, 0, 3, 17],
            40000 + (n % 20000) as u16,
        ))),
        access_key_id: Some("AKIA4EXAMPLEXKSPROXY".into()),
        decision: Decision::Allowed,
        status: 200,
        latency_us: 180 + n % 90,
        ..RequestRecord::default()
    }
}

/// Writes `n` records; prints what was written.
pub fn write(config: &Path, n: u64) -> Result<(), String> {
    let cfg = Config::load(config).map_err(|e| e.to_string())?;
    let audit = cfg
        .audit
        .as_ref()
        .ok_or("the configuration has no [audit] section")?;
    let metrics = Metrics::new();
    let keys = KeyManagers::open(&cfg.hsm, &Placement::unpinned(), &cfg.health, &metrics)
        .map_err(|e| e.to_string())?;
    let instance = audit
        .instance_id
        .clone()
        .unwrap_or_else(|| default_instance_id(cfg.net.listen.port()));
    let sealer = Box::new(HsmSealer {
        keys: keys.clone(),
        label: audit.seal_key_label.clone(),
    });
    let trail = AuditTrail::start(audit, instance.clone(), Some(sealer), &metrics)
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut written = 0;
    while written < n {
        // The queue is bounded: wait for the writer when it is full.
        let Some(slot) = trail.reserve() else {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        };
        slot.commit(record(written));
        written += 1;
    }
    trail.close();
    keys.close();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"instance\":\"{instance}\",\"records\":{n},\"seconds\":{secs:.1},\"records_per_second\":{:.0}}}",
        n as f64 / secs
    );
    Ok(())
}
