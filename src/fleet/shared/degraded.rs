//! Degraded mode: where this instance stands with Redis ([`Link`]), and the
//! local cap it serves within whenever Redis cannot say what the other
//! instances hold ([`degraded_foreign`]): Redis unreachable, this
//! instance's leases not written there yet, or Redis back empty and the
//! instances still writing theirs again.

use std::collections::BTreeMap;

use super::SharedState;
use crate::fleet::scheduler::Scheduler;
use crate::fleet::{BackendId, Fleet};

/// Where this instance stands with Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Link {
    /// Redis answers and holds what this instance holds: slots are taken
    /// there. (Also the start: the first take finds out whether Redis
    /// lists this instance yet.)
    #[default]
    Shared,
    /// Redis answers, but a write failed or Redis no longer lists this
    /// instance: serve within the local cap until the next renewal has
    /// written the leases, drains and registrations again.
    Stale,
    /// Redis came back empty less than a lease TTL ago: serve within the
    /// local cap and keep the holders seen before, while every instance
    /// writes its leases again; `stale`: this one must write everything
    /// again too.
    Settling { stale: bool },
    /// Redis did not answer the last call: serve within the local cap, and
    /// write everything again once it does; `settling`: it was settling.
    Down { settling: bool },
}

impl Link {
    /// Slots are taken through Redis.
    pub(super) fn shares(self) -> bool {
        self == Self::Shared
    }

    /// Redis answered the last call.
    pub(super) fn reachable(self) -> bool {
        !matches!(self, Self::Down { .. })
    }

    /// The next renewal writes everything again.
    pub(super) fn stale(self) -> bool {
        matches!(
            self,
            Self::Stale | Self::Settling { stale: true } | Self::Down { .. }
        )
    }

    /// Redis came back empty and not every instance has written again.
    pub(super) fn settling(self) -> bool {
        matches!(self, Self::Settling { .. } | Self::Down { settling: true })
    }

    /// A write failed, or Redis lost this instance.
    pub(super) fn go_stale(&mut self) {
        *self = match *self {
            Self::Shared | Self::Stale => Self::Stale,
            Self::Settling { .. } => Self::Settling { stale: true },
            down @ Self::Down { .. } => down,
        };
    }

    /// A call failed.
    pub(super) fn go_down(&mut self) {
        *self = Self::Down {
            settling: self.settling(),
        };
    }

    /// A renewal went through (and wrote everything it was asked to).
    pub(super) fn renewed(settling: bool) -> Self {
        if settling {
            Self::Settling { stale: false }
        } else {
            Self::Shared
        }
    }
}

impl SharedState {
    /// A write failed: the next renewal writes everything again.
    pub(super) fn mark_stale(&self, error: &redis::RedisError) {
        tracing::debug!(error = %error, "shared state: write failed");
        self.inner().link.go_stale();
    }

    /// Redis failed: log once, and hold every backend to the local cap.
    pub(super) fn mark_down(&self, fleet: &Fleet, error: &redis::RedisError) {
        let (was_reachable, instances) = {
            let mut inner = self.inner();
            let was = inner.link.reachable();
            inner.link.go_down();
            (was, inner.instances)
        };
        if was_reachable {
            tracing::warn!(
                error = %error,
                instances,
                "shared state unreachable; serving within floor(cap / instances) per backend"
            );
        }
        self.hold_to_local_cap(fleet);
    }

    /// Counts on every backend the slots others may hold while Redis cannot
    /// say: see [`degraded_foreign`].
    pub(super) fn hold_to_local_cap(&self, fleet: &Fleet) {
        let instances = self.inner().instances;
        fleet.update(|s| {
            let ids: Vec<BackendId> = s.backends().keys().cloned().collect();
            for id in &ids {
                self.hold_one(s, id, instances);
            }
        });
    }

    /// Whether a slot granted on `id` fits the local cap (checked for a
    /// grant made before the mode changed, too).
    pub(super) fn fits_local_cap(&self, fleet: &Fleet, id: &BackendId) -> bool {
        let instances = self.inner().instances;
        fleet.update(|s| self.hold_one(s, id, instances) && s.within_cap(id))
    }

    /// Counts on `id` the slots others may hold; false when there is no
    /// such backend.
    fn hold_one<W>(&self, s: &mut Scheduler<W>, id: &BackendId, instances: usize) -> bool {
        let Some(holders) = s.backends().get(id).map(|b| b.holders.clone()) else {
            return false;
        };
        let foreign = degraded_foreign(self.cap, instances, &self.instance, &holders);
        s.set_foreign(id, foreign, holders);
        true
    }
}

/// The slots of a backend this instance must count as taken by others
/// while Redis is gone: its local cap is `floor(cap / instances)` (0 when it
/// never saw any), and less when other instances held more than their share
/// when last seen, so that the instances together never exceed `cap`
/// whatever each of them does meanwhile.
pub fn degraded_foreign(
    cap: u32,
    instances: usize,
    me: &str,
    holders: &BTreeMap<String, u32>,
) -> u32 {
    if cap == 0 {
        return 0;
    }
    let share = cap
        .checked_div(u32::try_from(instances).unwrap_or(u32::MAX))
        .unwrap_or(0);
    let others: Vec<u32> = holders
        .iter()
        .filter(|(i, _)| i.as_str() != me)
        .map(|(_, n)| *n)
        .collect();
    let silent = instances.saturating_sub(1).saturating_sub(others.len());
    let reserved: u32 = others.iter().map(|n| (*n).max(share)).sum::<u32>()
        + share * u32::try_from(silent).unwrap_or(u32::MAX);
    let local = share.min(cap.saturating_sub(reserved));
    cap - local
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holders(list: &[(&str, u32)]) -> BTreeMap<String, u32> {
        list.iter().map(|(i, n)| (i.to_string(), *n)).collect()
    }

    #[test]
    fn local_cap_is_the_floor_of_the_share() {
        assert_eq!(degraded_foreign(4, 3, "a", &holders(&[])), 3);
        assert_eq!(degraded_foreign(6, 3, "a", &holders(&[])), 4);
        assert_eq!(degraded_foreign(1, 3, "a", &holders(&[])), 1);
        assert_eq!(degraded_foreign(2, 1, "a", &holders(&[])), 0);
    }

    #[test]
    fn never_seen_means_wait() {
        assert_eq!(degraded_foreign(4, 0, "a", &holders(&[])), 4);
    }

    #[test]
    fn others_over_their_share_shrink_ours() {
        // cap 3, 3 instances, b held 2 when last seen: b keeps its 2 and the
        // one left is c's (or a's) share: a and c may each use none.
        assert_eq!(degraded_foreign(3, 3, "a", &holders(&[("b", 2)])), 3);
        assert_eq!(degraded_foreign(3, 3, "c", &holders(&[("b", 2)])), 3);
        assert_eq!(
            // b keeps its 3, c its share of 2: a may use 1.
            degraded_foreign(6, 3, "a", &holders(&[("b", 3), ("a", 1)])),
            5
        );
    }

    #[test]
    fn the_local_caps_never_sum_above_cap() {
        for cap in 1..8u32 {
            for n in 1..5usize {
                for b_held in 0..=cap {
                    let h = holders(&[("i1", b_held)]);
                    let total: u32 = (0..n)
                        .map(|k| {
                            let me = format!("i{k}");
                            let held = if k == 1 { b_held } else { 0 };
                            held.max(cap - degraded_foreign(cap, n, &me, &h))
                        })
                        .sum();
                    assert!(total <= cap, "cap {cap} n {n} held {b_held}: {total}");
                }
            }
        }
    }

    #[test]
    fn the_link_keeps_what_it_must_write_again() {
        let mut link = Link::default();
        assert!(link.shares() && !link.stale());
        link.go_stale();
        assert_eq!(link, Link::Stale);
        assert!(link.reachable() && !link.shares());
        link.go_down();
        assert_eq!(link, Link::Down { settling: false });
        link.go_stale();
        assert_eq!(link, Link::Down { settling: false }, "down is stale");
        let mut link = Link::renewed(true);
        assert!(!link.shares() && !link.stale() && link.settling());
        link.go_stale();
        assert_eq!(link, Link::Settling { stale: true });
        link.go_down();
        assert_eq!(link, Link::Down { settling: true });
        assert!(link.stale() && link.settling() && !link.reachable());
        assert_eq!(Link::renewed(false), Link::Shared);
    }
}
