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

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{
    Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet,
    Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

/// Why a policy file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}: {source}")]
    Parse {
        file: PathBuf,
        source: Box<cedar_policy::ParseErrors>,
    },
    #[error("{file}: {source}")]
    Set {
        file: PathBuf,
        source: Box<cedar_policy::PolicySetError>,
    },
    #[error("{file}: policy templates are not supported; write concrete policies")]
    Templates { file: PathBuf },
    #[error("{file}: two policies have the id '{id}'")]
    DuplicateId { file: PathBuf, id: String },
    #[error("{file}: policies do not fit the XKS schema: {}", .errors.join("; "))]
    Schema { file: PathBuf, errors: Vec<String> },
    #[error("the built-in XKS schema does not parse: {0}")]
    BuiltinSchema(Box<cedar_policy::CedarSchemaError>),
}

/// Why one request could not be put to the policies (it is then denied).
#[derive(Debug, thiserror::Error)]
#[error("the request cannot be expressed in Cedar: {0}")]
pub struct RequestError(Box<dyn std::error::Error + Send + Sync>);

fn request_error(e: impl std::error::Error + Send + Sync + 'static) -> RequestError {
    RequestError(Box::new(e))
}

/// The schema every policy file is validated against.
pub const SCHEMA: &str = r#"
namespace Xks {
  entity Principal = { arn: String, account: String };
  entity Key = { keyStore: String };
  action GetKeyMetadata, Encrypt, Decrypt appliesTo {
    principal: [Principal],
    resource: [Key],
    context: {
      keyStore: String,
      kmsOperation: String,
      kmsRequestId: String,
      kmsKeyArn?: String,
      kmsViaService?: String,
      awsSourceVpc?: String,
      awsSourceVpce?: String,
    }
  };
}
"#;

/// Enforce decisions, or only log what would have been denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Enforce,
    DryRun,
}

/// What a request is, for the policies.
pub struct AuthzRequest<'a> {
    pub key_store: &'a str,
    pub action: &'a str,
    pub key_id: &'a str,
    pub principal_arn: &'a str,
    pub kms_operation: &'a str,
    pub kms_request_id: &'a str,
    pub kms_key_arn: Option<&'a str>,
    pub kms_via_service: Option<&'a str>,
    pub aws_source_vpc: Option<&'a str>,
    pub aws_source_vpce: Option<&'a str>,
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
    set: PolicySet,
    mode: Mode,
    file: PathBuf,
    authorizer: cedar_policy::Authorizer,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("file", &self.file)
            .field("mode", &self.mode)
            .field("count", &self.set.policies().count())
            .finish()
    }
}

fn schema() -> Result<Schema, PolicyError> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(s, _)| s)
        .map_err(|e| PolicyError::BuiltinSchema(Box::new(e)))
}

impl Policies {
    /// Loads and validates a policy file. Policies named with `@id("…")` keep
    /// that id; others are called `policy0`, `policy1`, … by position.
    /// `file` names the policies' origin in errors and logs.
    pub fn parse(text: &str, file: &Path, mode: Mode) -> Result<Policies, PolicyError> {
        let file_buf = || file.to_path_buf();
        let parsed = PolicySet::from_str(text).map_err(|e| PolicyError::Parse {
            file: file_buf(),
            source: Box::new(e),
        })?;
        if parsed.templates().next().is_some() {
            return Err(PolicyError::Templates { file: file_buf() });
        }
        let mut seen = HashSet::new();
        let mut renamed = Vec::new();
        for p in parsed.policies() {
            let id = p
                .annotation("id")
                .map(str::to_owned)
                .unwrap_or_else(|| p.id().to_string());
            if !seen.insert(id.clone()) {
                return Err(PolicyError::DuplicateId {
                    file: file_buf(),
                    id,
                });
            }
            renamed.push(p.new_id(PolicyId::new(&id)));
        }
        let set = PolicySet::from_policies(renamed).map_err(|e| PolicyError::Set {
            file: file_buf(),
            source: Box::new(e),
        })?;
        let result = Validator::new(schema()?).validate(&set, ValidationMode::Strict);
        if !result.validation_passed() {
            return Err(PolicyError::Schema {
                file: file_buf(),
                errors: result.validation_errors().map(|e| e.to_string()).collect(),
            });
        }
        Ok(Policies {
            set,
            mode,
            file: file_buf(),
            authorizer: cedar_policy::Authorizer::new(),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Decides one request.
    pub fn decide(&self, r: &AuthzRequest<'_>) -> Verdict {
        match self.evaluate(r) {
            Ok((allowed, policies, errors)) => {
                let decision = match (allowed, self.mode) {
                    (true, _) => "allow",
                    (false, Mode::Enforce) => "deny",
                    (false, Mode::DryRun) => "would-deny",
                };
                Verdict {
                    allowed: allowed || self.mode == Mode::DryRun,
                    decision,
                    policies,
                    errors,
                }
            }
            // A request we cannot even express is denied (or logged, in dry run).
            Err(e) => Verdict {
                allowed: self.mode == Mode::DryRun,
                decision: if self.mode == Mode::DryRun {
                    "would-deny"
                } else {
                    "deny"
                },
                policies: Vec::new(),
                errors: vec![e.to_string()],
            },
        }
    }

    fn evaluate(
        &self,
        r: &AuthzRequest<'_>,
    ) -> Result<(bool, Vec<String>, Vec<String>), RequestError> {
        let uid = |ty: &str, id: &str| -> Result<EntityUid, RequestError> {
            let ty = EntityTypeName::from_str(ty).map_err(request_error)?;
            Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
        };
        let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
        let principal = uid("Xks::Principal", r.principal_arn)?;
        let action = uid("Xks::Action", r.action)?;
        let resource = uid("Xks::Key", r.key_id)?;
        let account = r.principal_arn.split(':').nth(4).unwrap_or("");
        let entities = Entities::from_entities(
            [
                Entity::new(
                    principal.clone(),
                    HashMap::from([
                        ("arn".to_owned(), s(r.principal_arn)),
                        ("account".to_owned(), s(account)),
                    ]),
                    HashSet::new(),
                )
                .map_err(request_error)?,
                Entity::new(
                    resource.clone(),
                    HashMap::from([("keyStore".to_owned(), s(r.key_store))]),
                    HashSet::new(),
                )
                .map_err(request_error)?,
            ],
            None,
        )
        .map_err(request_error)?;
        let mut pairs = vec![
            ("keyStore".to_owned(), s(r.key_store)),
            ("kmsOperation".to_owned(), s(r.kms_operation)),
            ("kmsRequestId".to_owned(), s(r.kms_request_id)),
        ];
        for (name, value) in [
            ("kmsKeyArn", r.kms_key_arn),
            ("kmsViaService", r.kms_via_service),
            ("awsSourceVpc", r.aws_source_vpc),
            ("awsSourceVpce", r.aws_source_vpce),
        ] {
            if let Some(v) = value {
                pairs.push((name.to_owned(), s(v)));
            }
        }
        let context = Context::from_pairs(pairs).map_err(request_error)?;
        let request =
            Request::new(principal, action, resource, context, None).map_err(request_error)?;
        let response = self
            .authorizer
            .is_authorized(&request, &self.set, &entities);
        let policies = response
            .diagnostics()
            .reason()
            .map(|id| id.to_string())
            .collect();
        let errors = response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect();
        Ok((response.decision() == Decision::Allow, policies, errors))
    }
}

#[cfg(test)]
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
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policies/example.cedar");
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
