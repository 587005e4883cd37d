//! The XKS Proxy API itself: what goes over the wire and what it means, as
//! pure functions and data. No I/O, no HTTP framework, no HSM: everything
//! above builds on this, and it can be tested against the spec's own
//! examples.
//!
//! - [`path`]: the API's URIs and operations;
//! - [`wire`]: request and response bodies, their parsing and validation into
//!   the key manager's inputs;
//! - [`error`]: the spec's error table (status + `errorName`) and message rules;
//! - [`aead`]: the AAD handed to the HSM, ciphertext metadata, the CDIV;
//! - [`names`]: external key ids, URI paths, credentials, Regions;
//! - [`time`]: SigV4 and configuration timestamps;
//! - [`text`]: text from outside made safe to print.
//!
//! **Crate `xks-spec`**, one layer of the workspace (the table of layers is
//! in the `xks-proxy` crate's `src/lib.rs`). It uses no other crate of the workspace;
//! its `Cargo.toml` lists exactly those, so the compiler holds it to them.

#![forbid(unsafe_code)]

pub mod aead;
pub mod error;
pub mod names;
pub mod path;
pub mod text;
pub mod time;
pub mod wire;
