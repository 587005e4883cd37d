//! The access-log line of a request, rendered from its context.
//!
//! It carries what an operator needs to match it with KMS's CloudTrail
//! record (`kmsRequestId`), to see who asked and what came of it; never
//! plaintext, AAD, ciphertext or secrets.

use super::{Outcome, RequestContext};

impl RequestContext {
    /// Writes the line: `warn` for answers the proxy is to blame for (5xx),
    /// `info` for the rest.
    pub fn emit_access_line(&self, o: &Outcome) {
        let client_addr = self.conn.client.map(|a| a.to_string());
        let micros = o.elapsed.as_micros() as u64;
        let suppressed = (o.suppressed > 0).then_some(o.suppressed);
        macro_rules! access {
            ($lvl:ident) => {
                tracing::$lvl!(
                    target: "xks_proxy::access",
                    kms_request_id = self.kms_request_id.as_deref(),
                    kms_operation = self.kms_operation.as_deref(),
                    aws_principal_arn = self.aws_principal_arn.as_deref(),
                    kms_key_arn = self.kms_key_arn.as_deref(),
                    kms_via_service = self.kms_via_service.as_deref(),
                    aws_source_vpce = self.aws_source_vpce.as_deref(),
                    client_addr = client_addr.as_deref(),
                    proxy_vpce_id = self.conn.vpce_id.as_deref(),
                    key_store = self.key_store.as_deref(),
                    access_key_id = self.access_key_id.as_deref(),
                    operation = self.operation,
                    key_id = self.key_id.as_deref(),
                    status = o.status,
                    error_name = o.error_name,
                    error_message = self.error_message.as_deref(),
                    authz_decision = self.authz_decision,
                    authz_policies = self.authz_policies.as_deref(),
                    micros,
                    suppressed,
                    "request"
                )
            };
        }
        if o.status >= 500 {
            access!(warn);
        } else {
            access!(info);
        }
    }
}
