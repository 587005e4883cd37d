#!/usr/bin/env python3
"""Runs an `aws ...` command line through the AWS CLI's own code, offline.

    python3 scripts/awscli-parse.py kms create-custom-key-store --custom-key-store-name x ...

Used as a stand-in for `aws` (a shell function `aws() { python3 awscli-parse.py "$@"; }`)
so that commands written for an operator -- `xks-proxy kms-commands`, the ones
in docs/operating.md -- are checked the way the real CLI would take them:

- the awscli package's clidriver parses the arguments (global options,
  `--query`, `--output`, shorthand syntax such as `AccessKeyId=...,RawSecretAccessKey=...`),
  and botocore validates the parameters against the KMS service model
  (required members, types, lengths);
- this script adds what botocore leaves to the service: enum values, the
  model's `pattern`s, and the members the KMS API reference marks required
  for external key stores;
- an argument value starting with http:// or https:// is an error, since
  AWS CLI v1 would fetch that URL and use the page as the value;
- nothing is sent: a `before-call` handler answers with a canned response
  (so `--query` and `--output` are applied to something realistic and a
  polling loop ends), and a `before-send` handler fails the command if
  anything ever tried to reach the network.

Each call is appended as one JSON line (service, operation, parameters) to
the file named by $AWSCLI_PARSE_LOG, when set. Exit code: 0 when the command
parsed and validated, 252/255 (the CLI's own) or 2 when it did not.

Needs the `awscli` package (scripts/check-deploy.sh installs a pinned one
into a venv).
"""

import json
import os
import re
import sys

# No credentials, config file, instance metadata or network: set before the
# CLI reads its environment.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_CONFIG_FILE"] = os.devnull
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ.pop("AWS_PROFILE", None)

from awscli.clidriver import create_clidriver  # noqa: E402
from awscli import paramfile  # noqa: E402  (after clidriver: import order)

try:  # awscli >= 1.44 carries its own botocore
    from awscli.botocore.awsrequest import AWSResponse  # noqa: E402
except ImportError:  # pragma: no cover - older awscli with a separate botocore
    from botocore.awsrequest import AWSResponse  # noqa: E402

KEY_STORE_ID = "cks-1234567890abcdef0"
KEY_ID = "1234abcd-12ab-34cd-56ef-1234567890ab"

# What the service would answer, enough for --query and polling loops.
CANNED = {
    "CreateCustomKeyStore": {"CustomKeyStoreId": KEY_STORE_ID},
    "ConnectCustomKeyStore": {},
    "DisconnectCustomKeyStore": {},
    "UpdateCustomKeyStore": {},
    "DescribeCustomKeyStores": {
        "CustomKeyStores": [
            {
                "CustomKeyStoreId": KEY_STORE_ID,
                "CustomKeyStoreName": "example",
                "CustomKeyStoreType": "EXTERNAL_KEY_STORE",
                "ConnectionState": "CONNECTED",
            }
        ]
    },
    "DescribeVpcEndpointServiceConfigurations": {
        "ServiceConfigurations": [
            {
                "ServiceId": "vpce-svc-0123456789abcdef0",
                "ServiceName": "com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0",
                "AcceptanceRequired": False,
                "PrivateDnsName": "xks.example.com",
                "PrivateDnsNameConfiguration": {
                    "State": "verified",
                    "Type": "TXT",
                    "Name": "_0123456789abcdefghij",
                    "Value": "vpce:0123456789abcdefghij",
                },
            }
        ]
    },
    "StartVpcEndpointServicePrivateDnsVerification": {"ReturnValue": True},
    "CreateStack": {"StackId": "arn:aws:cloudformation:us-east-1:111122223333:stack/xks/1"},
    # Both templates' outputs (deploy/aws), for --query on describe-stacks
    # and for `aws cloudformation wait stack-create-complete`.
    "DescribeStacks": {
        "Stacks": [
            {
                "StackName": "xks",
                "StackStatus": "CREATE_COMPLETE",
                "CreationTime": "2026-01-01T00:00:00Z",
                "Outputs": [
                    {"OutputKey": k, "OutputValue": v}
                    for k, v in {
                        "VpcId": "vpc-0123456789abcdef0",
                        "VpcCidr": "10.42.0.0/16",
                        "SubnetA": "subnet-0123456789abcdef0",
                        "SubnetB": "subnet-0123456789abcdef1",
                        "PrivateRouteTableId": "rtb-0123456789abcdef0",
                        "XksProxyConnectivity": "VPC_ENDPOINT_SERVICE",
                        "XksProxyUriEndpoint": "https://xks.example.com",
                        "XksProxyVpcEndpointServiceName":
                            "com.amazonaws.vpce.us-east-1.vpce-svc-0123456789abcdef0",
                        "EndpointServiceId": "vpce-svc-0123456789abcdef0",
                        "DomainVerificationName": "_0123456789abcdefghij",
                        "DomainVerificationValue": "vpce:0123456789abcdefghij",
                        "TargetGroupArn": "arn:aws:elasticloadbalancing:us-east-1:111122223333:"
                                          "targetgroup/xks-fleet/0123456789abcdef",
                        "ProxySecurityGroupId": "sg-0123456789abcdef0",
                        "LoadBalancerDnsName": "xks-0123456789.elb.us-east-1.amazonaws.com",
                    }.items()
                ],
            }
        ]
    },
    "CreateKey": {
        "KeyMetadata": {
            "KeyId": KEY_ID,
            "Arn": "arn:aws:kms:us-east-1:111122223333:key/" + KEY_ID,
            "Origin": "EXTERNAL_KEY_STORE",
            "CustomKeyStoreId": KEY_STORE_ID,
            "XksKeyConfiguration": {"Id": "example-key"},
        }
    },
}

# Members the KMS API reference requires for external key stores, which the
# model cannot express (they depend on another member's value).
def conditional_problems(operation, params):
    problems = []
    need = []
    if operation == "CreateCustomKeyStore" and params.get("CustomKeyStoreType") == "EXTERNAL_KEY_STORE":
        need = ["XksProxyUriEndpoint", "XksProxyUriPath", "XksProxyAuthenticationCredential",
                "XksProxyConnectivity"]
        if params.get("XksProxyConnectivity") == "VPC_ENDPOINT_SERVICE":
            need.append("XksProxyVpcEndpointServiceName")
    if operation == "CreateKey" and params.get("Origin") == "EXTERNAL_KEY_STORE":
        need = ["CustomKeyStoreId", "XksKeyId"]
    for name in need:
        if name not in params:
            problems.append(f"{operation}: {name} is required here")
    return problems


def shape_problems(shape, value, path):
    """Enum and pattern checks, recursively (botocore checks the rest)."""
    problems = []
    if shape.type_name == "structure" and isinstance(value, dict):
        for name, member in shape.members.items():
            if name in value:
                problems += shape_problems(member, value[name], f"{path}.{name}")
    elif shape.type_name == "list" and isinstance(value, list):
        for i, item in enumerate(value):
            problems += shape_problems(shape.member, item, f"{path}[{i}]")
    elif shape.type_name == "string" and isinstance(value, str):
        if shape.enum and value not in shape.enum:
            problems.append(f"{path}: '{value}' is not one of {shape.enum}")
        pattern = shape.metadata.get("pattern")
        if pattern and not re.search(pattern, value):
            shown = "<sensitive>" if shape.metadata.get("sensitive") else repr(value)
            problems.append(f"{path}: {shown} does not match {pattern}")
    return problems


def refuse_url(prefix, uri):
    # AWS CLI v1 fetches any argument value that starts with http:// or
    # https:// (unless cli_follow_urlparam = false) and uses the page as the
    # value: an endpoint URL given as a plain argument would be replaced by
    # whatever that URL serves. A command meant for operators must not
    # depend on that setting, so this counts as an error.
    raise paramfile.ResourceLoadingError(
        f"AWS CLI v1 would fetch {uri} and use the page as the value "
        "(cli_follow_urlparam); pass URLs inside --cli-input-json"
    )


def main(argv):
    for prefix in paramfile.REMOTE_PREFIX_MAP:
        paramfile.REMOTE_PREFIX_MAP[prefix] = (refuse_url, {})
    log_path = os.environ.get("AWSCLI_PARSE_LOG")
    driver = create_clidriver()
    failures = []

    def record(params, model, **_):
        problems = shape_problems(model.input_shape, params, model.name)
        problems += conditional_problems(model.name, params)
        entry = {
            "service": model.service_model.service_name,
            "operation": model.name,
            "params": params,
            "problems": problems,
        }
        if log_path:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, default=str) + "\n")
        failures.extend(problems)

    def answer(model, **_):
        if failures:
            raise SystemExit("aws (offline check): " + "; ".join(failures))
        return AWSResponse("https://offline.invalid/", 200, {}, None), CANNED.get(model.name, {})

    def no_network(**_):
        raise SystemExit("aws (offline check): the command tried to reach the network")

    driver.session.register("before-parameter-build", record)
    driver.session.register("before-call", answer)
    driver.session.register("before-send", no_network)
    rc = driver.main(argv)
    if failures and rc == 0:
        rc = 2
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
