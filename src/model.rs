//! Model names as Ollama compares them: `llama3` ≡ `llama3:latest` ≡
//! `library/llama3:latest` ≡ `registry.ollama.ai/library/llama3:latest`,
//! case-insensitively. Pure logic: imports nothing from the crate.

use std::fmt;

const DEFAULT_HOST: &str = "registry.ollama.ai";
const DEFAULT_NAMESPACE: &str = "library";
const DEFAULT_TAG: &str = "latest";

/// A model name reduced to the form under which Ollama finds it: every part
/// present and lower-cased. Two names are the same model exactly when their
/// `ModelName`s are equal.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelName {
    /// `host/namespace/model:tag`, lower-cased, defaults filled in. Shared:
    /// a request's name is cloned into every attempt and queue entry.
    key: std::sync::Arc<str>,
}

impl ModelName {
    /// Parses a name as a client or `/api/tags` spells it. Never fails: a name
    /// Ollama would reject still gets a key, and the backend gives the error.
    pub fn parse(name: &str) -> Self {
        let name = name.trim();
        // The tag is what follows the last ':' when that ':' comes after the
        // last '/', so `host:5000/ns/m` has no tag.
        let (path, tag) = match (name.rfind(':'), name.rfind('/')) {
            (Some(colon), slash) if slash.is_none_or(|s| colon > s) => {
                (&name[..colon], &name[colon + 1..])
            }
            _ => (name, ""),
        };
        let tag = if tag.is_empty() { DEFAULT_TAG } else { tag };
        let mut parts = path.rsplitn(3, '/');
        let model = parts.next().unwrap_or_default();
        let namespace = parts.next().unwrap_or(DEFAULT_NAMESPACE);
        let host = parts.next().unwrap_or(DEFAULT_HOST);
        let key = format!("{host}/{namespace}/{model}:{tag}").to_lowercase();
        Self { key: key.into() }
    }

    /// The short form Ollama shows in `/api/tags`: default host and namespace
    /// dropped, tag always kept (`llama3:latest`, `user/m:q4`).
    pub fn display(&self) -> &str {
        let rest = self
            .key
            .strip_prefix(DEFAULT_HOST)
            .and_then(|r| r.strip_prefix('/'))
            .unwrap_or(&self.key);
        rest.strip_prefix(DEFAULT_NAMESPACE)
            .and_then(|r| r.strip_prefix('/'))
            .unwrap_or(rest)
    }

    /// The full, normalised key (`registry.ollama.ai/library/llama3:latest`).
    pub fn as_key(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.display())
    }
}

impl fmt::Debug for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelName({})", self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_tag_namespace_and_host_are_one_model() {
        let names = [
            "llama3",
            "llama3:latest",
            "library/llama3",
            "library/llama3:latest",
            "registry.ollama.ai/library/llama3:latest",
            "Llama3:LATEST",
            " llama3 ",
        ];
        for n in names {
            assert_eq!(ModelName::parse(n), ModelName::parse("llama3"), "{n}");
        }
    }

    #[test]
    fn different_tags_namespaces_and_hosts_differ() {
        let base = ModelName::parse("llama3");
        for n in [
            "llama3:8b",
            "user/llama3",
            "hf.co/library/llama3",
            "llama3.2",
        ] {
            assert_ne!(ModelName::parse(n), base, "{n}");
        }
    }

    #[test]
    fn display_drops_defaults_and_keeps_the_tag() {
        let cases = [
            ("llama3", "llama3:latest"),
            ("registry.ollama.ai/library/llama3:8b", "llama3:8b"),
            ("user/model", "user/model:latest"),
            (
                "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
                "hf.co/bartowski/llama-3.2-1b-instruct-gguf:q4_k_m",
            ),
        ];
        for (input, shown) in cases {
            assert_eq!(ModelName::parse(input).display(), shown, "{input}");
        }
    }

    #[test]
    fn a_colon_before_the_last_slash_is_a_port_not_a_tag() {
        let m = ModelName::parse("host:5000/ns/m");
        assert_eq!(m.as_key(), "host:5000/ns/m:latest");
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parse_never_panics_and_is_idempotent_through_display(name in ".{0,64}") {
            let once = ModelName::parse(&name);
            // A name without an explicit tag can end in ':' after display
            // only when the input was odd; equality must still hold for the key.
            prop_assert_eq!(ModelName::parse(once.as_key()), once);
        }

        #[test]
        fn every_spelling_of_a_default_name_is_the_same_model(
            model in "[a-z0-9][a-z0-9._-]{0,20}",
            upper in any::<bool>(),
        ) {
            let plain = ModelName::parse(&model);
            let spelled = if upper { model.to_uppercase() } else { model.clone() };
            for other in [
                format!("{spelled}:latest"),
                format!("library/{spelled}"),
                format!("registry.ollama.ai/library/{spelled}:latest"),
                format!("  {spelled}  "),
            ] {
                prop_assert_eq!(&ModelName::parse(&other), &plain, "{}", other);
            }
            prop_assert_eq!(ModelName::parse(plain.display()), plain.clone());
            prop_assert_eq!(plain.display(), format!("{model}:latest"));
        }

        #[test]
        fn different_tags_or_namespaces_are_different_models(
            model in "[a-z0-9][a-z0-9._-]{0,12}",
            t1 in "[a-z0-9][a-z0-9._-]{0,8}",
            t2 in "[a-z0-9][a-z0-9._-]{0,8}",
            ns in "[a-z0-9]{1,8}",
        ) {
            let a = ModelName::parse(&format!("{model}:{t1}"));
            let b = ModelName::parse(&format!("{model}:{t2}"));
            prop_assert_eq!(a == b, t1 == t2);
            let namespaced = ModelName::parse(&format!("{ns}/{model}:{t1}"));
            prop_assert_eq!(namespaced == a, ns == "library");
            prop_assert_eq!(ModelName::parse(namespaced.display()), namespaced);
        }
    }
}
