//! The fleet: backends, slots, the wait queue and discovery.
