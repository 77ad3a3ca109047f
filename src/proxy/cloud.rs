//! Cloud models (`gpt-oss:120b:cloud`, `gpt-oss:120b-cloud`): Ollama relays
//! them to ollama.com without a local model or a scheduler slot, so the
//! scheduler grants them a healthy backend without a slot either
//! (`Scheduler::grant_unslotted`), and they do not count against
//! MAX_CONCURRENT_PER_BACKEND. The name rules are OLLAMA_API_ADDENDUM.md §3.1.

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
