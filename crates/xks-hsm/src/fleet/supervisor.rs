//! One supervisor task per key manager: it probes the key manager (see
//! [`crate::health`]) and opens it when it is not open yet, so a key manager
//! that was down at startup joins by itself when it answers.

use super::*;

impl KeyManagers {
    /// One round of health work for key manager `b`: open it if it is not
    /// open; else, when `deep`, probe it with the health-check key, or else
    /// check that it answers at all (a heartbeat). Returns when the next deep
    /// probe is due.
    async fn supervise_once(&self, b: &Backend, deep: bool, open_retry: &mut Duration) -> Duration {
        let cfg = &self.inner.health;
        let Some(pool) = b.pool() else {
            let fleet = self.clone();
            let index = b.index;
            let opened =
                tokio::task::spawn_blocking(move || fleet.open_backend(&fleet.backends()[index]))
                    .await;
            return match opened {
                Ok(Ok(())) => {
                    tracing::warn!(ekm = %b.info().id, "key manager opened; it joins the fleet");
                    // Its token may hold other keys than before: compare anew.
                    self.inner.agreement.forget(b.index);
                    let (fleet, index) = (self.clone(), b.index);
                    tokio::spawn(async move { fleet.check_agreement(Some(index)).await });
                    *open_retry = RETRY_INTERVAL;
                    Duration::ZERO
                }
                Ok(Err(e)) => {
                    b.health.record(
                        &b.info().id,
                        EkmStatus::Unavailable,
                        Some(format!("not open: {e}")),
                    );
                    let wait = *open_retry;
                    *open_retry = (*open_retry * 2).min(OPEN_RETRY_MAX);
                    wait
                }
                Err(e) => {
                    tracing::error!(error = %e, "opening a key manager panicked");
                    OPEN_RETRY_MAX
                }
            };
        };
        let started = Instant::now();
        let deadline = started + cfg.unresponsive_after;
        let result = if deep {
            pool.probe(deadline).await
        } else {
            match pool.heartbeat(deadline).await {
                // Alive: the last deep result stands until the next probe.
                Ok(()) => return cfg.interval,
                // Not answering: find out properly, now.
                Err(e) => Err(e),
            }
        };
        let (status, detail) = classify(
            &result,
            started.elapsed(),
            cfg,
            pool.stalled(cfg.unresponsive_after),
        );
        b.health.record(&pool.ekm_info().id, status, detail);
        pool.set_usable(status != EkmStatus::Unavailable);
        if status == EkmStatus::Active {
            cfg.interval
        } else {
            RETRY_INTERVAL
        }
    }

    /// Probes every open key manager once (at startup, before serving).
    pub async fn probe_all(&self) {
        let mut retry = RETRY_INTERVAL;
        for b in self.backends() {
            if b.pool().is_some() {
                self.supervise_once(b, true, &mut retry).await;
            }
        }
    }

    /// Starts one supervisor per key manager. Every second it checks that
    /// the key manager answers (a heartbeat, or an attempt to open it when
    /// it is not open); when the deep probe is due (`interval_secs` while
    /// ACTIVE, every second otherwise, and at once when a heartbeat fails)
    /// it probes with the health-check key. So a key manager that hangs is
    /// found out within about `unresponsive_after` plus a second, even with
    /// no traffic. They run until aborted.
    pub fn spawn_supervisors(&self) -> Vec<tokio::task::JoinHandle<()>> {
        (0..self.backends().len())
            .map(|index| {
                let fleet = self.clone();
                tokio::spawn(async move {
                    let b = &fleet.backends()[index];
                    let mut open_retry = RETRY_INTERVAL;
                    let mut next_deep = Instant::now()
                        + if b.health.last() == EkmStatus::Active {
                            fleet.inner.health.interval
                        } else {
                            RETRY_INTERVAL
                        };
                    let mut pause = RETRY_INTERVAL;
                    loop {
                        tokio::time::sleep(pause).await;
                        let deep = Instant::now() >= next_deep;
                        let wait = fleet.supervise_once(b, deep, &mut open_retry).await;
                        if b.pool().is_none() {
                            // Not open: the next attempt backs off.
                            pause = wait;
                            continue;
                        }
                        if deep || wait < fleet.inner.health.interval {
                            next_deep = Instant::now() + wait;
                        }
                        pause = RETRY_INTERVAL;
                    }
                })
            })
            .collect()
    }
}
