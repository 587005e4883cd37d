//! Seals checked in the HSM: the seal key in the configured key managers,
//! and the witnesses they hold.

use std::collections::BTreeMap;

use super::verdict::{SealCheck, SealCheckError};
use crate::witness::{Witness, APPLICATION};
use xks_hsm::config::HsmConfig;
use xks_hsm::{HmacKey, Token};

/// Checks seals with the seal key in the configured key managers (the
/// first that holds the key and says yes). Tokens are opened on first use.
pub struct TokenVerifier {
    hsm: HsmConfig,
    tokens: Vec<Option<Result<Token, String>>>,
    /// Per (key manager, label): the key, once found and checked.
    keys: BTreeMap<(usize, String), Option<HmacKey>>,
}

impl TokenVerifier {
    pub fn new(hsm: &HsmConfig) -> TokenVerifier {
        TokenVerifier {
            hsm: hsm.clone(),
            tokens: hsm.backends.iter().map(|_| None).collect(),
            keys: BTreeMap::new(),
        }
    }

    /// The newest witness of each instance among the configured key
    /// managers (see [`super::witness`]). An error when none could be read.
    pub fn witnesses(&mut self) -> Result<BTreeMap<String, Witness>, SealCheckError> {
        let answers: Vec<Result<_, String>> = (0..self.hsm.backends.len())
            .map(|i| match open_token(&mut self.tokens, &self.hsm, i) {
                Ok(t) => t.markers(APPLICATION).map_err(|e| e.to_string()),
                Err(e) => Err(e.clone()),
            })
            .collect();
        Witness::newest_among(answers).map_err(|e| SealCheckError::NoWitness(e.join("; ")))
    }
}

/// Key manager `i`'s token, opened on first use.
fn open_token<'a>(
    tokens: &'a mut [Option<Result<Token, String>>],
    hsm: &HsmConfig,
    i: usize,
) -> &'a Result<Token, String> {
    tokens[i].get_or_insert_with(|| Token::open(hsm, &hsm.backends[i]).map_err(|e| e.to_string()))
}

impl SealCheck for TokenVerifier {
    fn check(&mut self, key: &str, input: &[u8], mac: &[u8]) -> Result<bool, SealCheckError> {
        let mut errors = Vec::new();
        let mut holders = 0;
        for i in 0..self.hsm.backends.len() {
            let token = match open_token(&mut self.tokens, &self.hsm, i) {
                Ok(t) => t,
                Err(e) => {
                    errors.push(e.clone());
                    continue;
                }
            };
            let k = match self.keys.get(&(i, key.to_string())) {
                Some(k) => *k,
                None => {
                    let ekm = || token.ekm_info().id.clone();
                    let found = token
                        .hmac_key(key)
                        .map_err(|source| SealCheckError::Hsm { ekm: ekm(), source })?;
                    if found.is_some_and(|k| !k.is_protected()) {
                        return Err(SealCheckError::Unprotected {
                            key: key.to_string(),
                            ekm: ekm(),
                        });
                    }
                    self.keys.insert((i, key.to_string()), found);
                    found
                }
            };
            let Some(k) = k else { continue };
            holders += 1;
            if token
                .verify_hmac(&k, input, mac)
                .map_err(|source| SealCheckError::Hsm {
                    ekm: token.ekm_info().id.clone(),
                    source,
                })?
            {
                return Ok(true);
            }
        }
        if holders == 0 {
            return Err(if errors.is_empty() {
                SealCheckError::NoKey {
                    key: key.to_string(),
                }
            } else {
                SealCheckError::NoKeyManager(errors.join("; "))
            });
        }
        Ok(false)
    }
}
