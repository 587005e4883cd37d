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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::slot::Slot;

use super::token::find_slot;
use crate::config::TokenSelector;

/// Re-initialize a module at most this often.
const REINIT_INTERVAL: Duration = Duration::from_millis(500);

/// Per loaded module: its context and recovery state, shared by every key
/// manager that uses the module.
pub(crate) struct Module {
    pub ctx: Pkcs11,
    generation: AtomicU64,
    gate: Gate,
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
    pub fn new(ctx: Pkcs11) -> Arc<Module> {
        Arc::new(Module {
            ctx,
            generation: AtomicU64::new(0),
            gate: Gate {
                state: Mutex::new(GateState {
                    inside: 0,
                    exclusive: false,
                    last_reinit: None,
                }),
                changed: Condvar::new(),
            },
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
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
    selector: TokenSelector,
    slot: AtomicU64,
}

impl ModuleSlot {
    pub fn new(module: Arc<Module>, selector: TokenSelector, slot: Slot) -> Self {
        ModuleSlot {
            module,
            selector,
            slot: AtomicU64::new(slot.id()),
        }
    }

    pub fn ctx(&self) -> &Pkcs11 {
        &self.module.ctx
    }

    pub fn slot(&self) -> Option<Slot> {
        Slot::try_from(self.slot.load(Ordering::Acquire)).ok()
    }

    /// Re-initializes the module and finds the token again. Returns true when
    /// the token is back. Only from a pool job, i.e. holding exactly one
    /// [`Inside`]. Rate-limited to once per [`REINIT_INTERVAL`]; a caller that
    /// finds another thread re-initializing steps out of the module, waits for
    /// it, and then looks for its own token in the new module instance.
    pub fn reinitialize(&self, ekm: &str) -> bool {
        let m = &self.module;
        let mut s = m.lock_gate();
        if s.exclusive {
            // Someone else is at it: step out so that it can run, wait, step in.
            s.inside -= 1;
            m.gate.changed.notify_all();
            while s.exclusive {
                s = m.wait(s);
            }
            s.inside += 1;
            drop(s);
            // The module is new; this key manager's slot id may have changed.
            return self.refind_slot(ekm);
        }
        if s.last_reinit.is_some_and(|t| t.elapsed() < REINIT_INTERVAL) {
            return false;
        }
        s.last_reinit = Some(Instant::now());
        s.exclusive = true;
        while s.inside > 1 {
            s = m.wait(s);
        }
        drop(s);
        let back = self.reinitialize_exclusive(ekm);
        let mut s = m.lock_gate();
        s.exclusive = false;
        m.gate.changed.notify_all();
        drop(s);
        back
    }

    /// The re-initialization itself; no other thread is inside the module.
    fn reinitialize_exclusive(&self, ekm: &str) -> bool {
        let ctx = &self.module.ctx;
        // Every session of the module dies here; bump the generation first so
        // no thread closes a handle that the new instance hands out again.
        self.module.generation.fetch_add(1, Ordering::AcqRel);
        let _ = ctx.clone().finalize();
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => {
                tracing::warn!(ekm = %ekm, error = %e, "PKCS#11 module re-initialization failed");
                return false;
            }
        }
        self.refind_slot(ekm)
    }

    /// Finds this key manager's token in the (re-initialized) module.
    fn refind_slot(&self, ekm: &str) -> bool {
        match find_slot(&self.module.ctx, &self.selector) {
            Ok(slot) => {
                self.slot.store(slot.id(), Ordering::Release);
                tracing::warn!(ekm = %ekm, slot = slot.id(), "re-initialized the PKCS#11 module; the token is back");
                true
            }
            Err(e) => {
                tracing::warn!(ekm = %ekm, error = %e, "PKCS#11 module re-initialized; the token is still missing");
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
