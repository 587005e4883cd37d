//! The audit record of a request, rendered from its context, and the
//! guard that records a request dropped before its answer.

use super::{Outcome, RequestContext, Stage};
use xks_audit::{AuditTrail, Decision, RequestRecord};

impl RequestContext {
    /// The request's audit record, its fields taken out of the context
    /// (the access-log line has been written by then).
    fn take_record(&mut self, o: &Outcome) -> RequestRecord {
        let reached = self.stage == Stage::KeyManager;
        let decision = match o.status {
            0 => Decision::Abandoned,
            200..=299 => Decision::Allowed,
            _ if reached => Decision::Failed,
            _ => Decision::Denied,
        };
        let denied_by = (decision == Decision::Denied).then_some(self.stage.as_str());
        RequestRecord {
            received: self.received,
            kms_request_id: self.kms_request_id.take(),
            kms_operation: self.kms_operation.take(),
            operation: self.operation,
            key_store: self.key_store.take(),
            key_id: self.key_id.take(),
            key_version: self.key_version,
            aws_principal_arn: self.aws_principal_arn.take(),
            kms_key_arn: self.kms_key_arn.take(),
            kms_via_service: self.kms_via_service.take(),
            aws_source_vpc: self.aws_source_vpc.take(),
            aws_source_vpce: self.aws_source_vpce.take(),
            client_addr: self.conn.client,
            proxy_vpce_id: self.conn.vpce_id.as_deref().map(str::to_owned),
            access_key_id: self.access_key_id.take(),
            decision,
            denied_by,
            authz: self.authz_decision,
            authz_policies: self.authz_policies.take(),
            lock_id: self.lock_id.take(),
            status: o.status,
            error_name: o.error_name,
            latency_us: o.elapsed.as_micros() as u64,
            suppressed: o.suppressed,
        }
    }

    /// Writes the request's audit record: into its slot when it holds one,
    /// else when the trail has room (or it is counted as lost).
    pub fn audit(&mut self, trail: &AuditTrail, o: &Outcome) {
        if self.audit_skipped {
            return;
        }
        let slot = self.audit_slot.take();
        let record = self.take_record(o);
        match slot {
            Some(slot) => slot.commit(record),
            None => trail.record(record),
        }
    }
}

/// A request's context while it is in flight: if the request is dropped
/// before its answer (the client went away) and it holds an audit slot,
/// dropping this commits an `abandoned` record.
pub struct Trace(pub RequestContext);

impl Drop for Trace {
    fn drop(&mut self) {
        let ctx = &mut self.0;
        if let Some(slot) = ctx.audit_slot.take() {
            let o = Outcome {
                status: 0,
                error_name: None,
                elapsed: ctx.elapsed(),
                suppressed: 0,
            };
            let record = ctx.take_record(&o);
            slot.commit(record);
        }
    }
}
