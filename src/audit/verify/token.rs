//! Seals checked in the HSM: the seal key in the configured key managers,
//! and the witnesses they hold.

use std::collections::BTreeMap;

use super::verdict::SealCheck;
use crate::audit::witness::{Witness, APPLICATION};
use crate::hsm::config::HsmConfig;
use crate::hsm::{HmacKey, Token};

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
    pub fn witnesses(&mut self) -> Result<BTreeMap<String, Witness>, String> {
        let mut errors = Vec::new();
        let mut read = false;
        let mut copies = Vec::new();
        for i in 0..self.hsm.backends.len() {
            let markers = match open_token(&mut self.tokens, &self.hsm, i) {
                Ok(t) => t.markers(APPLICATION).map_err(|e| e.to_string()),
                Err(e) => Err(e.clone()),
            };
            match markers {
                Ok(markers) => {
                    read = true;
                    copies.extend(
                        markers
                            .iter()
                            .filter_map(|m| Witness::parse(&m.label, &m.value)),
                    );
                }
                Err(e) => errors.push(e),
            }
        }
        if !read {
            return Err(format!(
                "cannot read the audit witnesses from the key managers: {}",
                errors.join("; ")
            ));
        }
        Ok(Witness::newest_per_instance(copies))
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
    fn check(&mut self, key: &str, input: &[u8], mac: &[u8]) -> Result<bool, String> {
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
                    let found = token.hmac_key(key).map_err(|e| e.to_string())?;
                    if let Some(k) = found {
                        if !k.is_protected() {
                            return Err(format!(
                                "the seal key '{key}' in key manager {} can leave the token \
                                 (extractable, not sensitive, or not generated in the token): a seal made with it proves \
                                 nothing",
                                token.ekm_info().id
                            ));
                        }
                    }
                    self.keys.insert((i, key.to_string()), found);
                    found
                }
            };
            let Some(k) = k else { continue };
            holders += 1;
            if token
                .verify_hmac(&k, input, mac)
                .map_err(|e| e.to_string())?
            {
                return Ok(true);
            }
        }
        if holders == 0 {
            return Err(if errors.is_empty() {
                format!("no configured key manager holds the seal key '{key}'")
            } else {
                format!("cannot open the key managers: {}", errors.join("; "))
            });
        }
        Ok(false)
    }
}
