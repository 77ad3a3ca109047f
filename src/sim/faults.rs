//! The deterministic fault plan: which inference request gets which fault,
//! from the rates of a [`FaultSpec`] and the per-request `x-sim-fault` header.

use super::spec::FaultSpec;

/// A fault injected into one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 500 before any byte.
    Error,
    /// 503 server busy.
    Busy,
    /// Connection reset after the first token(s).
    Reset,
    /// No answer until the client goes away.
    Hang,
    /// 200 with a body that is not JSON.
    Garbage,
    /// An `{"error"}` line after some tokens, then a clean end.
    MidStreamError,
}

impl Fault {
    /// Name used in the `x-sim-fault` header and in `Stats::faults`.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Error => "error",
            Fault::Busy => "busy",
            Fault::Reset => "reset",
            Fault::Hang => "hang",
            Fault::Garbage => "garbage",
            Fault::MidStreamError => "mid-stream-error",
        }
    }

    /// The fault named by an `x-sim-fault` header value.
    pub fn parse(s: &str) -> Option<Fault> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "error" => Fault::Error,
            "busy" => Fault::Busy,
            "reset" => Fault::Reset,
            "hang" => Fault::Hang,
            "garbage" => Fault::Garbage,
            "mid-stream-error" | "mid_stream_error" => Fault::MidStreamError,
            _ => return None,
        })
    }
}

/// True when request `n` (counting from 0) is one of the `rate` share,
/// spread evenly: `floor((n+1)*rate) > floor(n*rate)`.
pub fn hits(n: u64, rate: f64) -> bool {
    if rate <= 0.0 {
        return false;
    }
    if rate >= 1.0 {
        return true;
    }
    // The epsilon keeps 3 * (1/3) from landing just below 1.
    let at = |k: u64| (k as f64 * rate + 1e-9).floor();
    at(n + 1) > at(n)
}

/// The fault planned for inference request `n`, if any (first kind wins).
pub fn planned(spec: &FaultSpec, n: u64) -> Option<Fault> {
    [
        (spec.error_rate, Fault::Error),
        (spec.busy_rate, Fault::Busy),
        (spec.reset_rate, Fault::Reset),
        (spec.hang_rate, Fault::Hang),
        (spec.garbage_rate, Fault::Garbage),
        (spec.mid_stream_error_rate, Fault::MidStreamError),
    ]
    .into_iter()
    .find(|(rate, _)| hits(n, *rate))
    .map(|(_, f)| f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_third_hits_every_third_request() {
        let hit: Vec<u64> = (0..9).filter(|&n| hits(n, 1.0 / 3.0)).collect();
        assert_eq!(hit, vec![2, 5, 8]);
    }

    #[test]
    fn rate_counts_are_exact_over_a_window() {
        for rate in [0.0, 0.01, 0.1, 0.25, 0.5, 0.7, 1.0] {
            let n = (0..1000).filter(|&n| hits(n, rate)).count();
            assert_eq!(n, (1000.0 * rate + 1e-9) as usize, "rate {rate}");
        }
    }

    #[test]
    fn header_names_round_trip() {
        for f in [
            Fault::Error,
            Fault::Busy,
            Fault::Reset,
            Fault::Hang,
            Fault::Garbage,
            Fault::MidStreamError,
        ] {
            assert_eq!(Fault::parse(f.name()), Some(f));
        }
    }
}
