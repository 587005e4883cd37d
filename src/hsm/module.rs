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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
    last_reinit: Mutex<Option<Instant>>,
}

impl Module {
    pub fn new(ctx: Pkcs11) -> Arc<Module> {
        Arc::new(Module {
            ctx,
            generation: AtomicU64::new(0),
            last_reinit: Mutex::new(None),
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
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
    /// the token is back. Rate-limited: concurrent or rapid callers return
    /// false without touching the module.
    pub fn reinitialize(&self, ekm: &str) -> bool {
        let mut last = self
            .module
            .last_reinit
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < REINIT_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
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
        match find_slot(ctx, &self.selector) {
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
