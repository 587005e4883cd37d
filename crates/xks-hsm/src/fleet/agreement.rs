//! Whether the key managers that hold a key under one label hold the same
//! key: the comparisons behind [`KeyManagers::check_agreement`] and the
//! rule of which key manager may serve meanwhile (the verdicts themselves
//! are [`crate::agreement`]'s).

use super::*;

impl KeyManagers {
    /// Whether key manager `index` may serve `label`: unless another open
    /// key manager is known to hold the label too, yes; else by the
    /// verdict of a comparison (see [`crate::agreement`]). With no verdict
    /// yet, the comparison runs now, within `deadline`; an old verdict
    /// stands while a new comparison runs in the background. A comparison
    /// that cannot tell (the reference is down) leaves what was known: a key
    /// manager never compared serves.
    pub(super) async fn may_serve(&self, label: &str, index: usize, deadline: Instant) -> bool {
        if self
            .backends()
            .iter()
            .filter(|b| b.pool().is_some())
            .count()
            < 2
        {
            return true;
        }
        match self.inner.agreement.known(label, index) {
            Known::Fresh(v) => v == Verdict::Same,
            Known::Stale(v) => {
                let fleet = self.clone();
                let label = label.to_owned();
                tokio::spawn(async move {
                    let deadline = Instant::now() + AGREEMENT_BUDGET;
                    fleet.compare(&label, index, deadline).await;
                });
                v == Verdict::Same
            }
            Known::Unknown => self
                .compare(label, index, deadline)
                .await
                .is_none_or(|v| v == Verdict::Same),
        }
    }

    /// Compares the key labelled `label` in key manager `candidate` with the
    /// reference's: the first key manager in the configuration that holds
    /// it and answers encrypts a random probe, the candidate decrypts it.
    /// Records and returns the verdict; `None` when it cannot tell.
    async fn compare(&self, label: &str, candidate: usize, deadline: Instant) -> Option<Verdict> {
        let cand = self.backends().get(candidate)?.pool()?;
        let mut plaintext = zeroize::Zeroizing::new(vec![0u8; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut plaintext).ok()?;
        let aad = crate::gcm::PROBE_AAD.to_vec();
        let probe = Arc::new(EncryptInput {
            plaintext: plaintext.clone(),
            aad: aad.clone(),
            cdiv: false,
        });
        // Only when every key manager before the candidate said it lacks
        // the key is the candidate the reference: one that is down may be
        // the reference the candidate differs from.
        let mut all_lack_it = true;
        for b in self.backends() {
            if b.index == candidate {
                return all_lack_it.then(|| self.settle(label, candidate, Verdict::Same));
            }
            // One known to be down is not asked: a hung reference would
            // cost the request its whole budget.
            let reference = b.pool().filter(|p| {
                b.health.current(Some(p), &self.inner.health).0 != EkmStatus::Unavailable
            });
            let Some(reference) = reference else {
                all_lack_it = false;
                continue;
            };
            let sealed = match reference.encrypt(label, probe.clone(), deadline).await {
                Ok(sealed) => sealed,
                Err(Fault::KeyNotFound { .. }) => continue,
                Err(e) if e.is_key_manager_fault() => {
                    all_lack_it = false;
                    continue;
                }
                // Disabled, or no ENCRYPT usage: nothing to compare with.
                Err(_) => return None,
            };
            let input = Arc::new(DecryptInput {
                ciphertext: sealed.ciphertext,
                iv: sealed.iv,
                tag: sealed.tag,
                aad: Some(aad),
                metadata: sealed.metadata,
                layouts: &[xks_spec::aead::AadLayout::Spec],
            });
            let verdict = match cand.decrypt(label, input, deadline).await {
                Ok(out) if *out.plaintext == *plaintext => Verdict::Same,
                Ok(_) | Err(Fault::BadCiphertext) => Verdict::Differs {
                    reference: reference.ekm_info().id.clone(),
                },
                // Missing here, or a fault: the request path answers that.
                Err(_) => return None,
            };
            return Some(self.settle(label, candidate, verdict));
        }
        None
    }

    /// Records a verdict, and says so when it changes.
    fn settle(&self, label: &str, candidate: usize, verdict: Verdict) -> Verdict {
        let b = &self.backends()[candidate];
        let before = self
            .inner
            .agreement
            .record(label, candidate, verdict.clone());
        if before.as_ref() != Some(&verdict) {
            match &verdict {
                Verdict::Differs { reference } => tracing::error!(
                    key = %label,
                    ekm = %b.info().id,
                    reference = %reference,
                    "this key manager holds different key material for the key than the reference \
                     key manager: it is not used for the key (what one encrypts, the other cannot \
                     decrypt); make the key managers hold the same key (replication, or restore \
                     the key from the reference)"
                ),
                Verdict::Same if before.is_some() => tracing::warn!(
                    key = %label,
                    ekm = %b.info().id,
                    "this key manager holds the same key as the reference again; it serves the key"
                ),
                Verdict::Same => {}
            }
        }
        self.inner
            .metrics
            .hsm_keys_diverging
            .with_label_values(&[b.info().id.as_str()])
            .set(self.inner.agreement.diverging(candidate).len() as i64);
        verdict
    }

    /// Compares every key that two or more open key managers hold (at
    /// startup; `only` when one key manager joins). Logs what differs.
    pub async fn check_agreement(&self, only: Option<usize>) {
        let holders = |label: &String| {
            self.backends()
                .iter()
                .filter(|b| b.pool().is_some())
                .filter(|b| {
                    b.labels
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .contains(label)
                })
                .map(|b| b.index)
                .collect::<Vec<_>>()
        };
        let mut labels: Vec<String> = self
            .backends()
            .iter()
            .flat_map(|b| b.labels.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect();
        labels.sort();
        labels.dedup();
        for label in labels {
            let held = holders(&label);
            if held.len() < 2 {
                continue;
            }
            for index in held {
                if only.is_none_or(|o| o == index) {
                    self.compare(&label, index, Instant::now() + AGREEMENT_BUDGET)
                        .await;
                }
            }
        }
    }
}
