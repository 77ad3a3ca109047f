//! Backends that registered themselves (`POST /__proxy/backends`) and their
//! leases. Plain bookkeeping with the clock passed in: discovery probes what
//! is registered, drains what expired or was deregistered, and forgets it
//! once nothing is in flight there. Nothing here survives a restart: a
//! restarted corral relearns its fleet from the next renewals (or at once
//! from the shared state, with SHARED_STATE).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{BackendId, Target};

#[derive(Debug)]
struct Registration {
    target: Arc<Target>,
    /// `None`: registered without a lease, stays until deregistered.
    expires: Option<Instant>,
    /// Expired or deregistered: drained, forgotten when idle.
    retiring: bool,
}

/// What a registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// A backend corral did not know.
    New,
    /// A renewal of a live lease.
    Renewed,
    /// A renewal of a lease that had expired (or was deregistered) while the
    /// backend was still draining: it comes back and must be undrained.
    Revived,
}

/// The registered backends, shared by the admin endpoints and discovery.
#[derive(Debug, Default)]
pub struct Registry {
    registrations: Mutex<BTreeMap<BackendId, Registration>>,
    /// Woken on every new registration, so discovery probes it at once.
    pub changed: Notify,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<BackendId, Registration>> {
        self.registrations.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers (or renews) the backend at `base`, its lease running `lease`
    /// from `now` (`None`: until deregistered).
    pub fn register(
        &self,
        base: &http::Uri,
        lease: Option<Duration>,
        now: Instant,
    ) -> (Arc<Target>, Registered) {
        let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
        let id = BackendId::Url(authority.into());
        let expires = lease.map(|l| now + l);
        let mut leases = self.lock();
        let outcome = match leases.get_mut(&id) {
            Some(l) => {
                l.expires = expires;
                let what = match std::mem::replace(&mut l.retiring, false) {
                    true => Registered::Revived,
                    false => Registered::Renewed,
                };
                (Arc::clone(&l.target), what)
            }
            None => {
                let target = Arc::new(Target::new(id.clone(), base));
                leases.insert(
                    id,
                    Registration {
                        target: Arc::clone(&target),
                        expires,
                        retiring: false,
                    },
                );
                (target, Registered::New)
            }
        };
        drop(leases);
        if outcome.1 == Registered::New {
            self.changed.notify_one();
        }
        outcome
    }

    /// Deregisters: the backend is to be drained and forgotten. False when
    /// it is not a registered backend.
    pub fn deregister(&self, id: &BackendId) -> bool {
        self.lock().get_mut(id).map(|l| l.retiring = true).is_some()
    }

    /// Whether `id` is a registered backend (live or retiring).
    pub fn contains(&self, id: &BackendId) -> bool {
        self.lock().contains_key(id)
    }

    /// Whether `id` is registered and not retiring.
    pub fn is_live(&self, id: &BackendId) -> bool {
        self.lock().get(id).is_some_and(|l| !l.retiring)
    }

    /// Leases that ran out by `now` and were live: they start retiring, and
    /// the caller drains them.
    pub fn expire(&self, now: Instant) -> Vec<BackendId> {
        let mut leases = self.lock();
        leases
            .iter_mut()
            .filter(|(_, l)| !l.retiring && l.expires.is_some_and(|e| e <= now))
            .map(|(id, l)| {
                l.retiring = true;
                id.clone()
            })
            .collect()
    }

    /// The live registrations, to probe.
    pub fn live(&self) -> Vec<Arc<Target>> {
        self.lock()
            .values()
            .filter(|l| !l.retiring)
            .map(|l| Arc::clone(&l.target))
            .collect()
    }

    /// The live registrations with what is left of their leases at `now`
    /// (`None`: no lease), to write them into the shared state again.
    pub fn live_leases(&self, now: Instant) -> Vec<(Arc<Target>, Option<Duration>)> {
        self.lock()
            .values()
            .filter(|l| !l.retiring)
            .map(|l| {
                let left = l.expires.map(|e| e.saturating_duration_since(now));
                (Arc::clone(&l.target), left)
            })
            .collect()
    }

    /// The retiring registrations, to forget once idle.
    pub fn retiring(&self) -> Vec<BackendId> {
        self.lock()
            .iter()
            .filter(|(_, l)| l.retiring)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Forgets a retiring registration (a renewal since keeps it).
    pub fn forget(&self, id: &BackendId) -> bool {
        let mut leases = self.lock();
        let retiring = leases.get(id).is_some_and(|l| l.retiring);
        if retiring {
            leases.remove(id);
        }
        retiring
    }

    /// Whether no backend is registered (live or retiring).
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> http::Uri {
        s.parse().unwrap()
    }

    #[test]
    fn a_lease_runs_out_unless_renewed() {
        let r = Registry::default();
        let t0 = Instant::now();
        let (target, what) =
            r.register(&url("http://gpu7:11434"), Some(Duration::from_secs(30)), t0);
        assert_eq!(what, Registered::New);
        assert_eq!(target.id, BackendId::Url("gpu7:11434".into()));
        assert_eq!(&*target.label, "gpu7:11434");
        assert!(r.expire(t0 + Duration::from_secs(29)).is_empty());
        // Renewed at 20 s: runs to 50 s.
        let (_, what) = r.register(
            &url("http://gpu7:11434"),
            Some(Duration::from_secs(30)),
            t0 + Duration::from_secs(20),
        );
        assert_eq!(what, Registered::Renewed);
        assert!(r.expire(t0 + Duration::from_secs(49)).is_empty());
        assert_eq!(
            r.expire(t0 + Duration::from_secs(50)),
            vec![target.id.clone()]
        );
        // Expired once: not again, not probed, retiring.
        assert!(r.expire(t0 + Duration::from_secs(60)).is_empty());
        assert!(r.live().is_empty());
        assert_eq!(r.retiring(), vec![target.id.clone()]);
        assert!(r.forget(&target.id));
        assert!(r.is_empty());
    }

    #[test]
    fn a_renewal_while_draining_revives_and_a_forget_then_misses() {
        let r = Registry::default();
        let t0 = Instant::now();
        let lease = Some(Duration::from_secs(5));
        let (target, _) = r.register(&url("http://10.0.0.2:11434"), lease, t0);
        assert!(r.deregister(&target.id));
        assert!(!r.is_live(&target.id));
        let (again, what) = r.register(&url("http://10.0.0.2:11434"), lease, t0);
        assert_eq!(what, Registered::Revived);
        assert!(Arc::ptr_eq(&again, &target), "same target, same slots");
        assert!(
            !r.forget(&target.id),
            "a live registration is not forgotten"
        );
        assert!(r.is_live(&target.id));
        assert!(!r.deregister(&BackendId::Port(24001)));
    }

    #[test]
    fn without_a_lease_a_registration_stays_until_deregistered() {
        let r = Registry::default();
        let t0 = Instant::now();
        r.register(&url("http://gpu1:11434"), None, t0);
        assert!(r.expire(t0 + Duration::from_secs(86_400 * 365)).is_empty());
        assert_eq!(r.live().len(), 1);
    }
}
