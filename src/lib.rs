//! An AWS KMS External Key Store (XKS) proxy.
//!
//! KMS calls the proxy over HTTPS, signed with SigV4, for every use of a key in
//! an external key store; the proxy does the AES-256-GCM work in the customer's
//! HSM through PKCS#11.
//!
//! # The layers
//!
//! Each layer is a crate of the workspace (`crates/xks-<layer>`), re-exported
//! here under its layer's name (`xks_proxy::hsm` is the `xks-hsm` crate). A
//! crate's `Cargo.toml` lists exactly the layers of its "uses" column, so
//! the compiler refuses an import that points up or across, and `cargo
//! tree` shows these arrows and no others. This crate is the top: the
//! command line, the composition root, and the benchmark (`xks-bench`).
//!
//! | layer | what it is | uses |
//! |---|---|---|
//! | [`cli`] | the `xks-proxy` command line (`main.rs` only calls it) | everything below |
//! | [`serve`] | the composition root: config in, a running proxy out | everything below |
//! | [`ops`] | what an operator does to a running proxy or its files: hot reload, the admin listener, credentials, migration from the AWS sample | config, net, state, hsm, telemetry, spec |
//! | [`config`] | reads the TOML file, resolves paths, validates; each section becomes the type of the subsystem that owns it | the section types of net, audit, hsm, guard, state, telemetry; spec |
//! | [`client`] | a SigV4-signing XKS client, and `check` (a KMS simulator that tells whether a proxy will work with KMS) | net (PEM), guard (the service name), spec |
//! | [`api`] | the XKS API over HTTP: the request pipeline, one module per operation, the access log and audit records, faults → spec errors | lockdown (the locks in force), audit (the trail), net (connection info), state, guard, hsm (through a narrow trait), telemetry (metrics, log limits), spec |
//! | [`lockdown`] | the fleet-wide kill switch: locks as marker objects in the token, the board every request reads, the poller | audit (records what it sees), hsm (markers), telemetry, spec |
//! | [`audit`] | the tamper-evident audit trail: records, hash chain, seals computed in the HSM, verify, report, CloudTrail reconciliation | hsm (seals), telemetry, spec |
//! | [`net`] | listeners, connection caps, TLS, mutual TLS, PROXY protocol v2 | telemetry |
//! | [`state`] | the live key stores: the one place configuration becomes runtime objects (credential sets, compiled policies, buckets, replay caches) | guard, spec |
//! | [`guard`] | who may do what: SigV4, Cedar authorization, quotas, replay protection | spec |
//! | [`hsm`] | the key managers through PKCS#11, with their own fault type; knows nothing of HTTP | telemetry, spec |
//! | [`telemetry`] | logging and Prometheus metrics | — |
//! | [`spec`] | the XKS API itself as pure data and functions: wire types, the error table, AAD and CDIV, name rules | — |
//!
//! Why this order: the spec is the contract everything else serves, so it
//! depends on nothing. The HSM layer answers in its own terms ([`hsm::Fault`]),
//! and only `api` decides what a fault means to KMS, so failover and health
//! are decided on what the key manager did, not on an HTTP status. `state`
//! owns the runtime objects so that `config` stays a pure reader and a
//! reload is "read, validate, build, swap". `api` is generic over the key
//! service, so the pipeline and its order of checks are tested in-process.
//! The audit trail sits right under what produces its records (the API,
//! and the lockdown poller) and above the key managers that seal it, so the
//! seal goes through the HSM layer's own threads like every other PKCS#11
//! call.
//!
//! The PKCS#11 foreign-function calls stay inside the `cryptoki` crate, with
//! one exception: [`hsm::token_info`] reads `C_GetTokenInfo` itself, because
//! `cryptoki`'s strict conversion rejects tokens whose informational fields
//! are not standard (openCryptoki's clock), which then could not be found.
//! `unsafe` is denied in `xks-hsm` outside that module and forbidden in every
//! other crate.

#![forbid(unsafe_code)]

pub mod cli;
pub mod serve;

pub use xks_api as api;
pub use xks_audit as audit;
pub use xks_client as client;
pub use xks_config as config;
pub use xks_guard as guard;
pub use xks_hsm as hsm;
pub use xks_lockdown as lockdown;
pub use xks_net as net;
pub use xks_ops as ops;
pub use xks_spec as spec;
pub use xks_state as state;
pub use xks_telemetry as telemetry;

pub use spec::error::XksError;
