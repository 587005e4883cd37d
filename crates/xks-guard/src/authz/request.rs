//! What the policies decide about: one key operation, as Cedar sees it.

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
