//! A loaded PKCS#11 module and the token slot a key manager uses in it, with
//! recovery: when the module loses its device (a network HSM's connection
//! drops, a remote token goes away), opening sessions keeps failing until the
//! module is re-initialized. This does that, without restarting the proxy:
//! `C_Finalize`, `C_Initialize`, find the slot again by the configured label
//! or id (slot ids may change), and let every pool thread reopen and log in.
//!
//! Re-initialization invalidates every session of the module, so each module
//! has a *generation*: a thread holding a session from an older generation
//! forgets it instead of closing it (after `C_Initialize` the same handle
//! number may belong to another thread's new session).
//!
//! `C_Finalize` while another thread is inside the module is undefined
//! behaviour (PKCS#11 §5.4), and vendor libraries do crash on it. So every
//! pool job enters the module's [`Gate`], and re-initialization, which a job
//! itself starts when it finds the device gone, waits until it is the only
//! job inside (the others' calls are bounded by the HSM's own timeouts) and
//! holds new ones back until the module is usable again. The job then retries
//! at once, so a probe or request that arrives when the HSM is back succeeds.
//!
//! Several key managers may share one module (two partitions behind one
//! vendor library). Re-initializing it tears down every session of all of
//! them, so a key manager that loses *its* token does not re-initialize a
//! module that still serves another one: it only looks for its token again
//! (without `C_Finalize`) and stays UNAVAILABLE meanwhile. The module is
//! re-initialized only when none of its key managers can serve, i.e. when the
//! module itself (or its only token) is lost. Some modules (SoftHSM) see a
//! token that came back only after a re-initialization: with a healthy
//! neighbour, such a token rejoins at the next restart or the next time the
//! whole module is lost.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::slot::Slot;

use super::config::TokenSelector;
use super::token::find_slot;

/// Re-initialize a module at most this often.
const REINIT_INTERVAL: Duration = Duration::from_millis(500);
/// While re-initializations do not bring the token back, wait longer between
/// them, up to this (each one tears down every session of the module).
const REINIT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Per loaded module: its context and recovery state, shared by every key
/// manager that uses the module.
pub(crate) struct Module {
    pub ctx: Pkcs11,
    /// Where it was loaded from (token info is read through a second handle,
    /// see [`super::token_info`]).
    pub path: PathBuf,
    generation: AtomicU64,
    gate: Gate,
    /// Whether each key manager on this module (by index) can serve now,
    /// as its health probe last found.
    usable: Mutex<HashMap<usize, bool>>,
}

/// Who is inside the module: pool jobs, or one re-initialization.
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

struct GateState {
    /// Jobs inside the module.
    inside: usize,
    /// A re-initialization is waiting for the others to leave, or running.
    exclusive: bool,
    last_reinit: Option<Instant>,
    /// The wait before the next re-initialization (grows while they fail).
    backoff: Duration,
}

/// A pool job's pass into the module; see [`Module::enter`].
pub(crate) struct Inside<'m>(&'m Module);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        let mut s = self.0.lock_gate();
        s.inside -= 1;
        // Only a re-initialization waits for jobs to leave; without one,
        // skip the wake-up (a futex syscall on every HSM job otherwise).
        if s.exclusive {
            self.0.gate.changed.notify_all();
        }
    }
}

impl Module {
    pub fn new(ctx: Pkcs11, path: PathBuf) -> Arc<Module> {
        Arc::new(Module {
            ctx,
            path,
            generation: AtomicU64::new(0),
            gate: Gate {
                state: Mutex::new(GateState {
                    inside: 0,
                    exclusive: false,
                    last_reinit: None,
                    backoff: REINIT_INTERVAL,
                }),
                changed: Condvar::new(),
            },
            usable: Mutex::new(HashMap::new()),
        })
    }

    /// Records whether key manager `backend` (on this module) can serve.
    pub fn set_usable(&self, backend: usize, usable: bool) {
        self.usable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(backend, usable);
    }

    /// True when a key manager other than `backend` serves from this module:
    /// re-initializing it would disturb that one.
    fn others_usable(&self, backend: usize) -> bool {
        self.usable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(b, usable)| *b != backend && *usable)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Opening a key manager found no token: re-initialize the module, so
    /// that a token (or network HSM) that appeared since is seen, unless
    /// that would disturb another key manager serving from it. Not from a
    /// pool job (holds no [`Inside`]).
    pub fn reinitialize_for(&self, backend: usize, ekm: &str) {
        if !self.others_usable(backend) {
            self.reinitialize(ekm, 0);
        }
    }

    /// `C_Finalize` + `C_Initialize`, once no thread but the caller (who
    /// holds `held` passes, 0 or 1) is inside, at most every
    /// [`REINIT_INTERVAL`] and backing off to [`REINIT_BACKOFF_MAX`] while
    /// the token stays away. Callers look for their token afterwards. A
    /// caller that finds another re-initialization under way waits for it
    /// instead.
    fn reinitialize(&self, ekm: &str, held: usize) {
        let mut s = self.lock_gate();
        if s.exclusive {
            // Someone else is at it: step out so that it can run, wait, step in.
            s.inside -= held;
            self.gate.changed.notify_all();
            while s.exclusive {
                s = self.wait(s);
            }
            s.inside += held;
            return;
        }
        if s.last_reinit.is_some_and(|t| t.elapsed() < s.backoff) {
            return;
        }
        s.last_reinit = Some(Instant::now());
        // Until a token is found again, each attempt waits longer.
        s.backoff = (s.backoff * 2).min(REINIT_BACKOFF_MAX);
        s.exclusive = true;
        while s.inside > held {
            s = self.wait(s);
        }
        drop(s);
        tracing::info!(ekm = %ekm, "re-initializing the PKCS#11 module");
        // Every session of the module dies here; bump the generation first so
        // no thread closes a handle that the new instance hands out again.
        self.generation.fetch_add(1, Ordering::AcqRel);
        let _ = self.ctx.clone().finalize();
        if let Err(e) = self
            .ctx
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            if !matches!(e, P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) {
                tracing::warn!(ekm = %ekm, error = %e, "PKCS#11 module re-initialization failed");
            }
        }
        let mut s = self.lock_gate();
        s.exclusive = false;
        self.gate.changed.notify_all();
    }

    /// A token answered again: the next loss re-initializes promptly.
    fn reset_backoff(&self) {
        self.lock_gate().backoff = REINIT_INTERVAL;
    }

    /// Held by a pool job for as long as it may call into the module; waits
    /// while the module is being re-initialized.
    pub fn enter(&self) -> Inside<'_> {
        let mut s = self.lock_gate();
        while s.exclusive {
            s = self.wait(s);
        }
        s.inside += 1;
        Inside(self)
    }

    fn lock_gate(&self) -> MutexGuard<'_, GateState> {
        self.gate.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'g>(&self, s: MutexGuard<'g, GateState>) -> MutexGuard<'g, GateState> {
        self.gate.changed.wait(s).unwrap_or_else(|p| p.into_inner())
    }
}

/// One key manager's view: the module and its token's slot.
pub(crate) struct ModuleSlot {
    pub module: Arc<Module>,
    /// The key manager's index (see [`Module::set_usable`]).
    backend: usize,
    selector: TokenSelector,
    slot: AtomicU64,
    /// Whether the last recovery found the token, to log changes only.
    last_found: std::sync::atomic::AtomicBool,
}

impl ModuleSlot {
    pub fn new(module: Arc<Module>, backend: usize, selector: TokenSelector, slot: Slot) -> Self {
        ModuleSlot {
            module,
            backend,
            selector,
            slot: AtomicU64::new(slot.id()),
            last_found: std::sync::atomic::AtomicBool::new(true),
        }
    }

    pub fn ctx(&self) -> &Pkcs11 {
        &self.module.ctx
    }

    /// The index of the key manager this slot belongs to.
    pub fn backend(&self) -> usize {
        self.backend
    }

    pub fn slot(&self) -> Option<Slot> {
        Slot::try_from(self.slot.load(Ordering::Acquire)).ok()
    }

    /// Recovers from a lost device or token; returns true when the token is
    /// back. Only from a pool job, i.e. holding exactly one [`Inside`].
    ///
    /// When another key manager serves from this module, the module is left
    /// alone and the token is only looked for again. Otherwise the module is
    /// re-initialized first (see [`Module::reinitialize`]).
    pub fn recover(&self, ekm: &str) -> bool {
        if !self.module.others_usable(self.backend) {
            self.module.reinitialize(ekm, 1);
        }
        self.refind_slot(ekm)
    }

    /// Finds this key manager's token in the module (after a
    /// re-initialization, or to see whether a lost token is back); logs only
    /// when that changes.
    fn refind_slot(&self, ekm: &str) -> bool {
        let found = find_slot(&self.module.ctx, &self.module.path, &self.selector);
        let was = self.last_found.swap(found.is_ok(), Ordering::AcqRel);
        match found {
            Ok((slot, _)) => {
                self.slot.store(slot.id(), Ordering::Release);
                if !was {
                    self.module.reset_backoff();
                    tracing::warn!(ekm = %ekm, slot = slot.id(), "the key manager's token is back");
                }
                true
            }
            Err(e) => {
                if was {
                    tracing::warn!(ekm = %ekm, error = %e, "the key manager's token is missing; retrying in the background");
                }
                false
            }
        }
    }
}

/// Errors after which the module itself must be re-initialized before the
/// token can be reached again.
pub(crate) fn module_lost(e: &P11Error) -> bool {
    matches!(
        e,
        P11Error::Pkcs11(
            RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SlotIdInvalid
                | RvError::CryptokiNotInitialized
                | RvError::GeneralError
                | RvError::FunctionFailed,
            _
        )
    )
}
