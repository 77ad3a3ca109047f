//! Cloud models (`gpt-oss:120b:cloud`, `gpt-oss:120b-cloud`): Ollama relays
//! them to ollama.com without a local model or a scheduler slot, so corral
//! sends them to a healthy backend without taking a slot either, and they do
//! not count against MAX_CONCURRENT_PER_BACKEND. The name rules are
//! OLLAMA_API_ADDENDUM.md §3.1.

use std::sync::Arc;

use crate::fleet::{BackendId, Fleet, Target};
use crate::model::ModelName;

/// Whether `name` asks explicitly for a cloud model: its last `:` part is
/// `cloud`, or its tag ends in `-cloud` (with no `/` after the last `:`);
/// case does not matter. A conflicting `:cloud:local` counts as cloud too:
/// the backend answers it with its own 400.
pub fn is_cloud(name: &str) -> bool {
    let name = name.trim();
    let Some((_, tag)) = name.rsplit_once(':') else {
        return false;
    };
    if tag.contains('/') {
        return false;
    }
    let tag = tag.to_ascii_lowercase();
    tag == "cloud" || tag.ends_with("-cloud")
}

/// A healthy backend for a request that takes no slot: not draining, not yet
/// tried; one that lists `model` first (it is signed in to the cloud), then
/// the fewest in flight, then the lowest id.
pub fn pick(fleet: &Fleet, model: Option<&ModelName>, tried: &[BackendId]) -> Option<Arc<Target>> {
    fleet.read(|s| {
        s.backends()
            .values()
            .filter(|b| b.healthy && !b.draining && !tried.contains(&b.target.id))
            .min_by_key(|b| (model.is_none_or(|m| !b.models.contains(m)), b.in_flight))
            .map(|b| Arc::clone(&b.target))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloud_names_follow_ollamas_suffix_rules() {
        for cloud in [
            "gpt-oss:120b:cloud",
            "qwen3:cloud",
            "gpt-oss:120b-cloud",
            "QWEN3:CLOUD",
            " deepseek-v3.1:671b-cloud ",
            "x:cloud:local:cloud",
        ] {
            assert!(is_cloud(cloud), "{cloud}");
        }
        for local in [
            "llama3.2",
            "gpt-oss:20b:local",
            "model-cloud",
            "host:5000/ns/m-cloud",
            "qwen3:8b",
            "",
        ] {
            assert!(!is_cloud(local), "{local}");
        }
    }
}
