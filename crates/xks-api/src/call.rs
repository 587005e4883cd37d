//! One key operation (GetKeyMetadata, Encrypt, Decrypt) once the pipeline
//! has routed, authenticated and admitted it: what it acts on, its body,
//! and secondary authorization — the key store's Cedar policies, asked after
//! the request validated and before any HSM work.

use serde::Deserialize;

use super::app::AppState;
use super::context::{RequestContext, Stage};
use xks_guard::authz::AuthzRequest;
use xks_spec::error::XksError;
use xks_spec::path::Operation;
use xks_spec::wire::{RequestMetadata, WithMetadata};
use xks_state::KeyStore;

/// A key operation's request, with what answering it needs.
pub struct KeyCall<'a, K> {
    pub app: &'a AppState<K>,
    pub target: Target<'a>,
    pub body: &'a [u8],
    pub ctx: &'a mut RequestContext,
}

impl<'a, K> KeyCall<'a, K> {
    /// The body as `T`, its metadata recorded in the request's context.
    pub fn parse<T: Deserialize<'a> + WithMetadata<'a>>(&mut self) -> Result<T, XksError> {
        self.ctx.parse(self.body)
    }

    /// Refuses Encrypt and Decrypt on a locked-down key store (see the
    /// `lockdown` layer).
    pub fn check_lock(&mut self) -> Result<(), XksError> {
        self.ctx.enter(Stage::Lockdown);
        if self.app.locks.unread() {
            return Err(XksError::DependencyTimeout(
                "the lockdown markers have not been read from any key manager yet; Encrypt and \
                 Decrypt wait until they are"
                    .into(),
            ));
        }
        match self.app.locks.check(&self.target.store.name) {
            None => Ok(()),
            Some(lock) => {
                self.ctx.locked_by(&lock.id);
                Err(XksError::InvalidState(
                    lock.message(&self.target.store.name),
                ))
            }
        }
    }

    /// Secondary authorization of this call.
    pub fn authorize(&mut self, md: &RequestMetadata<'_>) -> Result<(), XksError> {
        self.ctx.enter(Stage::Authorization);
        authorize(&self.target, md, self.ctx)
    }

    /// Every check passed: what happens now is the key manager's doing.
    pub fn reach_key_manager(&mut self) {
        self.ctx.enter(Stage::KeyManager);
    }
}

/// What a key operation acts on.
pub struct Target<'a> {
    pub store: &'a KeyStore,
    pub op: Operation,
    pub key_id: &'a str,
}

/// Secondary authorization, after validation and before any HSM work.
fn authorize(
    t: &Target<'_>,
    md: &RequestMetadata<'_>,
    ctx: &mut RequestContext,
) -> Result<(), XksError> {
    let Some(policies) = &t.store.policies else {
        return Ok(());
    };
    let verdict = policies.decide(&AuthzRequest {
        key_store: &t.store.name,
        action: t.op.as_str(),
        key_id: t.key_id,
        principal_arn: md.aws_principal_arn.as_deref().unwrap_or(""),
        kms_operation: md.kms_operation.as_deref().unwrap_or(""),
        kms_request_id: md.kms_request_id.as_deref().unwrap_or(""),
        kms_key_arn: md.kms_key_arn.as_deref(),
        kms_via_service: md.kms_via_service.as_deref(),
        aws_source_vpc: md.aws_source_vpc.as_deref(),
        aws_source_vpce: md.aws_source_vpce.as_deref(),
    });
    if !verdict.errors.is_empty() {
        tracing::warn!(key_store = %t.store.name, errors = ?verdict.errors, "policy evaluation errors");
    }
    ctx.authorized(verdict.decision, verdict.policies.join(","));
    if verdict.allowed {
        return Ok(());
    }
    let why = if verdict.policies.is_empty() {
        "no policy permits this request".to_string()
    } else {
        format!("denied by policy {}", verdict.policies.join(", "))
    };
    Err(XksError::AccessDenied(format!(
        "{} on key '{}' of key store '{}': {why}",
        t.op.as_str(),
        t.key_id,
        t.store.name
    )))
}
