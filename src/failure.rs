//! The kinds of backend failure: one enum from which the `kind` label of
//! `corral_backend_failures_total`, the failure-kinds table of docs/operations.md and the
//! series retired with a backend all derive.

/// Why an attempt on a backend failed, or how its answer broke; what each
/// kind means is its [`FailureKind::description`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    Connect,
    Timeout,
    Reset,
    Status5xx,
    Busy,
    Body,
    ModelMissing,
    MidStream,
    BrokenAnswer,
}

impl FailureKind {
    /// Every kind, in the order docs/operations.md lists them.
    pub const ALL: [Self; 9] = [
        Self::Connect,
        Self::Timeout,
        Self::Reset,
        Self::Status5xx,
        Self::Busy,
        Self::Body,
        Self::ModelMissing,
        Self::MidStream,
        Self::BrokenAnswer,
    ];

    /// The metric label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Reset => "reset",
            Self::Status5xx => "status_5xx",
            Self::Busy => "busy",
            Self::Body => "body",
            Self::ModelMissing => "model_missing",
            Self::MidStream => "mid_stream",
            Self::BrokenAnswer => "broken_answer",
        }
    }

    /// What the kind means and what corral does about it, one line.
    pub const fn description(self) -> &'static str {
        match self {
            Self::Connect => "TCP connect refused or timed out (BACKEND_CONNECT_TIMEOUT_SECONDS)",
            Self::Timeout => "no response head or first byte within BACKEND_READ_TIMEOUT_SECONDS",
            Self::Reset => "the connection broke before the first byte of the answer",
            Self::Status5xx => "the backend answered a 5xx status (other than `server busy`)",
            Self::Busy => {
                "Ollama's 503 `server busy`: its own queue is full; health unchanged, not counted against MAX_RETRIES"
            }
            Self::Body => "the answer was not HTTP that could be parsed",
            Self::ModelMissing => {
                "404 for a model the backend listed at the last scan (another server took its port); health unchanged, the model is struck off its list"
            }
            Self::MidStream => "the answer broke after its first byte reached the client",
            Self::BrokenAnswer => {
                "a clean end that is not a whole answer (no terminal event, or an `{\"error\"}` line); health unchanged"
            }
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows of the failure-kinds table in docs/operations.md: the first
    /// cell of each row between the `<!-- failure-kinds -->` markers,
    /// without backticks.
    fn documented_rows() -> Vec<(String, String)> {
        let doc = include_str!("../docs/operations.md");
        let start = doc
            .find("<!-- failure-kinds -->")
            .expect("docs/operations.md has a failure-kinds table");
        let end = doc[start..]
            .find("<!-- /failure-kinds -->")
            .expect("the table ends")
            + start;
        doc[start..end]
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split(" | ").collect();
                (
                    cells[0].trim().trim_matches('`').to_string(),
                    cells.get(1).map_or("", |c| c.trim()).to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn the_documented_table_lists_exactly_the_kinds_with_their_descriptions() {
        let rows = documented_rows();
        let labels: Vec<&str> = rows.iter().map(|(l, _)| l.as_str()).collect();
        let expected: Vec<&str> = FailureKind::ALL.iter().map(|k| k.label()).collect();
        assert_eq!(labels, expected);
        for (kind, (_, text)) in FailureKind::ALL.iter().zip(&rows) {
            assert_eq!(text, kind.description(), "{kind}");
        }
    }

    #[test]
    fn labels_are_distinct() {
        let mut labels: Vec<&str> = FailureKind::ALL.iter().map(|k| k.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), FailureKind::ALL.len());
    }
}
