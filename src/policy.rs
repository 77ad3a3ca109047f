//! The two policy words that settings name and the scheduler obeys: how
//! backends are chosen ([`Routing`]) and how urgent a request is
//! ([`Priority`]). A leaf: `config` parses them, `fleet` acts on them.

/// How backends are chosen (`ROUTING`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Routing {
    /// Prefix, session and model warmth, bounded by load.
    #[default]
    CacheAware,
    /// Loaded model, then fewest in flight, then lowest port.
    LeastBusy,
}

/// How urgent a request is (`X-Corral-Priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Priority {
    /// Someone is waiting for the answer: goes first.
    #[default]
    Interactive = 0,
    /// Bulk work: takes what interactive leaves, plus its floor.
    Batch = 1,
}

impl Priority {
    /// `interactive` or `batch`, any case.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "interactive" => Some(Self::Interactive),
            "batch" => Some(Self::Batch),
            _ => None,
        }
    }

    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Batch => "batch",
        }
    }
}
