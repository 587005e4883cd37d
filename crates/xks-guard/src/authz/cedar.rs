//! The Cedar engine behind [`super`] (the `authorization` feature,
//! on by default): the XKS schema that policy files are validated against,
//! and the translation of one request into Cedar's principal, action,
//! resource and context (see `authz` for what they are).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{
    Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet,
    Request, RestrictedExpression, Schema, ValidationMode, Validator,
};

use super::request::AuthzRequest;

/// Why a policy file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CedarError {
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

fn schema() -> Result<Schema, CedarError> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(s, _)| s)
        .map_err(|e| CedarError::BuiltinSchema(Box::new(e)))
}

/// A validated policy set and the authorizer that evaluates it.
pub struct Engine {
    set: PolicySet,
    authorizer: cedar_policy::Authorizer,
}

impl Engine {
    /// `file` names the policies' origin in errors and logs.
    pub fn parse(text: &str, file: &Path) -> Result<Engine, CedarError> {
        let file_buf = || file.to_path_buf();
        let parsed = PolicySet::from_str(text).map_err(|e| CedarError::Parse {
            file: file_buf(),
            source: Box::new(e),
        })?;
        if parsed.templates().next().is_some() {
            return Err(CedarError::Templates { file: file_buf() });
        }
        let mut seen = HashSet::new();
        let mut renamed = Vec::new();
        for p in parsed.policies() {
            let id = p
                .annotation("id")
                .map(str::to_owned)
                .unwrap_or_else(|| p.id().to_string());
            if !seen.insert(id.clone()) {
                return Err(CedarError::DuplicateId {
                    file: file_buf(),
                    id,
                });
            }
            renamed.push(p.new_id(PolicyId::new(&id)));
        }
        let set = PolicySet::from_policies(renamed).map_err(|e| CedarError::Set {
            file: file_buf(),
            source: Box::new(e),
        })?;
        let result = Validator::new(schema()?).validate(&set, ValidationMode::Strict);
        if !result.validation_passed() {
            return Err(CedarError::Schema {
                file: file_buf(),
                errors: result.validation_errors().map(|e| e.to_string()).collect(),
            });
        }
        Ok(Engine {
            set,
            authorizer: cedar_policy::Authorizer::new(),
        })
    }

    /// How many policies there are.
    pub fn count(&self) -> usize {
        self.set.policies().count()
    }

    /// Whether the policies allow the request, the ids of those that decided,
    /// and evaluation errors (a policy that errors is skipped by Cedar).
    pub fn evaluate(
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
