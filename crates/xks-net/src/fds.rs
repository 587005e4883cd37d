//! File descriptors: the HSM must never be the one that runs out.
//!
//! A PKCS#11 module needs descriptors of its own: SoftHSM opens a file per
//! token object it reads, a network HSM's library a socket per session. If
//! client connections take the last descriptor, the module's calls fail, and
//! some modules (SoftHSM) then forget their objects until re-initialized: a
//! flood of `/ping` connections became a lasting outage that way. So at
//! startup the proxy raises its soft `RLIMIT_NOFILE` to the hard limit, keeps
//! a reserve for the module and itself, and sizes the listeners' connection
//! caps to fit in the rest.

/// The caps the listeners run with, after [`plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdPlan {
    pub xks: usize,
    pub ping: usize,
    pub admin: usize,
    /// The open-files limit the plan was made for.
    pub limit: u64,
    /// Descriptors kept for the HSM module, logging and the proxy itself.
    pub reserved: u64,
}

/// Descriptors kept back beyond the connections: the module (2 per pool
/// session, for libraries that use one socket or file per session, plus
/// 64 for its own files), listeners, the log pipe, config and certificate
/// reads.
pub fn reserve_for(sessions: usize) -> u64 {
    64 + 2 * sessions as u64
}

/// Raises the soft open-files limit to the hard one; returns the soft limit
/// now in force (unchanged when it cannot be raised).
pub fn raise_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(_) => rlimit::getrlimit(rlimit::Resource::NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024),
    }
}

/// Fits the wanted connection caps into `limit - reserved`, shrinking the
/// admin and `/ping` listeners first (they need few) and the XKS listener
/// with what is left. Each listener keeps at least a handful.
pub fn plan(limit: u64, reserved: u64, xks: usize, ping: usize, admin: usize) -> FdPlan {
    let budget = limit.saturating_sub(reserved).max(16) as usize;
    if xks + ping + admin <= budget {
        return FdPlan {
            xks,
            ping,
            admin,
            limit,
            reserved,
        };
    }
    let admin = admin.min((budget / 32).max(2));
    let ping = ping.min((budget / 8).max(4));
    let xks = xks.min(budget.saturating_sub(admin + ping).max(8));
    FdPlan {
        xks,
        ping,
        admin,
        limit,
        reserved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_fit_under_the_limit_with_the_reserve_kept() {
        // Plenty of descriptors: the configured caps stand.
        let p = plan(1_048_576, reserve_for(8), 4096, 256, 32);
        assert_eq!((p.xks, p.ping, p.admin), (4096, 256, 32));
        // 300 descriptors, as under `prlimit --nofile=300`.
        let p = plan(300, reserve_for(2), 4096, 256, 32);
        assert!(p.xks + p.ping + p.admin <= 300 - 68, "{p:?}");
        assert!(
            p.xks >= p.ping && p.ping >= p.admin && p.admin >= 2,
            "{p:?}"
        );
    }
}
