//! Secondary authorization with Cedar, per key store.
//!
//! SigV4 proves that a request comes from KMS; it says nothing about *whose*
//! request KMS is relaying. The spec lets the proxy apply its own rules on the
//! `requestMetadata` KMS sends, and Cedar (AWS's policy language, the same one
//! behind Amazon Verified Permissions) gives operators a reviewable, testable
//! way to write them:
//!
//! - principal: `Xks::Principal::"<awsPrincipalArn>"` with attributes `arn` and
//!   `account` (from the ARN), so policies can match an account, a role path
//!   (`principal.arn like "arn:aws:iam::111122223333:role/payments/*"`) or one ARN;
//! - action: `Xks::Action::"GetKeyMetadata" | "Encrypt" | "Decrypt"`;
//! - resource: `Xks::Key::"<externalKeyId>"` with attribute `keyStore`;
//! - context: `keyStore`, `kmsOperation`, `kmsRequestId` and, when KMS sent
//!   them, `kmsKeyArn`, `kmsViaService`, `awsSourceVpc`, `awsSourceVpce`.
//!
//! Policies are validated against that schema when loaded (a typo such as
//! `context.kmsViaServce` is a load error, not a silent deny). Every policy
//! should carry an `@id("…")` annotation: the access log names the policies
//! that decided. GetHealthStatus is never authorized here (the spec exempts it).
//! In dry-run mode a deny is logged as `would-deny` and the request proceeds.

use std::path::{Path, PathBuf};

#[cfg(feature = "authorization")]
mod cedar;
mod request;

#[cfg(not(feature = "authorization"))]
use absent::Engine;
#[cfg(feature = "authorization")]
use cedar::Engine;
#[cfg(feature = "authorization")]
pub use cedar::{CedarError, SCHEMA};
pub use request::AuthzRequest;

/// Why a key store's policies cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[cfg(feature = "authorization")]
    #[error(transparent)]
    Cedar(#[from] CedarError),
    /// Fails closed: a configuration that asks for policies does not load
    /// on a build that cannot enforce them.
    #[error(
        "{file}: this xks-proxy was built without Cedar policies (the `authorization` \
         feature); build it with default features, or remove the key store's [authorization]"
    )]
    NotBuilt { file: PathBuf },
}

/// Enforce decisions, or only log what would have been denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Enforce,
    DryRun,
}

/// The outcome: allowed or not, and the policies that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// `allow`, `deny` or (dry run) `would-deny`.
    pub decision: &'static str,
    /// Ids of the determining policies: the permits for an allow, the forbids
    /// for a deny (empty when nothing permitted the request).
    pub policies: Vec<String>,
    /// Policy evaluation errors (a policy that errors is skipped by Cedar).
    pub errors: Vec<String>,
}

/// One key store's policies.
pub struct Policies {
    engine: Engine,
    mode: Mode,
    file: PathBuf,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("file", &self.file)
            .field("mode", &self.mode)
            .field("count", &self.engine.count())
            .finish()
    }
}

impl Policies {
    /// Parses and validates policy text against the XKS schema (see
    /// `cedar`). `file` names the policies' origin in errors and logs.
    pub fn parse(text: &str, file: &Path, mode: Mode) -> Result<Policies, PolicyError> {
        Ok(Policies {
            engine: Engine::parse(text, file)?,
            mode,
            file: file.to_path_buf(),
        })
    }

    /// Decides one request.
    pub fn decide(&self, r: &AuthzRequest<'_>) -> Verdict {
        let dry_run = self.mode == Mode::DryRun;
        match self.engine.evaluate(r) {
            Ok((allowed, policies, errors)) => {
                let decision = match (allowed, self.mode) {
                    (true, _) => "allow",
                    (false, Mode::Enforce) => "deny",
                    (false, Mode::DryRun) => "would-deny",
                };
                Verdict {
                    allowed: allowed || dry_run,
                    decision,
                    policies,
                    errors,
                }
            }
            // A request we cannot even express is denied (or logged, in dry run).
            Err(e) => Verdict {
                allowed: dry_run,
                decision: if dry_run { "would-deny" } else { "deny" },
                policies: Vec::new(),
                errors: vec![e.to_string()],
            },
        }
    }
}

/// The engine of a build without Cedar: it cannot be made, so no key store
/// can have policies, and the configuration that asks for them is refused.
#[cfg(not(feature = "authorization"))]
mod absent {
    use std::path::Path;

    use super::request::AuthzRequest;
    use super::PolicyError;

    pub enum Engine {}

    impl Engine {
        pub fn parse(_: &str, file: &Path) -> Result<Engine, PolicyError> {
            Err(PolicyError::NotBuilt {
                file: file.to_path_buf(),
            })
        }

        pub fn count(&self) -> usize {
            match *self {}
        }

        pub fn evaluate(
            &self,
            _: &AuthzRequest<'_>,
        ) -> Result<(bool, Vec<String>, Vec<String>), std::convert::Infallible> {
            match *self {}
        }
    }
}

#[cfg(all(test, feature = "authorization"))]
mod tests {
    use super::*;

    fn req<'a>(action: &'a str, arn: &'a str, vpce: Option<&'a str>) -> AuthzRequest<'a> {
        AuthzRequest {
            key_store: "payments",
            action,
            key_id: "pay-key",
            principal_arn: arn,
            kms_operation: "Decrypt",
            kms_request_id: "r-1",
            kms_key_arn: Some("arn:aws:kms:us-east-1:111122223333:key/k"),
            kms_via_service: None,
            aws_source_vpc: None,
            aws_source_vpce: vpce,
        }
    }

    const POLICIES: &str = r#"
        @id("payments-roles")
        permit (principal, action, resource)
        when { principal.account == "111122223333" &&
               principal.arn like "arn:aws:iam::111122223333:role/payments/*" };

        @id("decrypt-only-through-vpce")
        forbid (principal, action == Xks::Action::"Decrypt", resource)
        unless { context has awsSourceVpce && context.awsSourceVpce == "vpce-0abc" };
    "#;

    #[test]
    fn decisions_name_the_deciding_policies() {
        let p = Policies::parse(POLICIES, Path::new("t.cedar"), Mode::Enforce).unwrap();
        let role = "arn:aws:iam::111122223333:role/payments/app";
        let v = p.decide(&req("Encrypt", role, None));
        assert_eq!((v.allowed, v.decision), (true, "allow"));
        assert_eq!(v.policies, vec!["payments-roles"]);
        let v = p.decide(&req("Decrypt", role, None));
        assert_eq!((v.allowed, v.decision), (false, "deny"));
        assert_eq!(v.policies, vec!["decrypt-only-through-vpce"]);
        assert!(p.decide(&req("Decrypt", role, Some("vpce-0abc"))).allowed);
        let v = p.decide(&req(
            "Encrypt",
            "arn:aws:iam::999999999999:role/payments/app",
            None,
        ));
        assert_eq!((v.allowed, v.policies.len()), (false, 0));

        let dry = Policies::parse(POLICIES, Path::new("t.cedar"), Mode::DryRun).unwrap();
        let v = dry.decide(&req("Decrypt", role, None));
        assert_eq!((v.allowed, v.decision), (true, "would-deny"));
    }

    #[test]
    fn the_example_policy_file_is_valid() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/policies/example.cedar");
        let text = std::fs::read_to_string(&path).unwrap();
        let p = Policies::parse(&text, &path, Mode::Enforce).unwrap();
        let role = "arn:aws:iam::111122223333:role/payments/batch";
        let mut r = req("Decrypt", role, None);
        assert!(!p.decide(&r).allowed);
        r.kms_via_service = Some("ebs");
        assert!(p.decide(&r).allowed);
        let v = p.decide(&req(
            "Encrypt",
            "arn:aws:iam::444455556666:role/auditor",
            None,
        ));
        assert!(!v.allowed);
    }

    #[test]
    fn bad_policies_are_load_errors() {
        for bad in [
            "permit (principal, action, resource) when { context.kmsViaServce == \"ebs\" };",
            "permit (principal, action == Xks::Action::\"Sign\", resource);",
            "permit (principal, action, resource",
            "@id(\"a\") permit (principal, action, resource); @id(\"a\") forbid (principal, action, resource);",
        ] {
            assert!(
                Policies::parse(bad, Path::new("t.cedar"), Mode::Enforce).is_err(),
                "{bad}"
            );
        }
    }
}

#[cfg(all(test, not(feature = "authorization")))]
mod without_cedar {
    use super::*;

    #[test]
    fn policies_are_refused_with_the_reason() {
        let e = Policies::parse(
            "permit (principal, action, resource);",
            Path::new("p.cedar"),
            Mode::Enforce,
        )
        .unwrap_err();
        assert!(e.to_string().contains("built without Cedar"), "{e}");
    }
}
