//! The simulator's own tiny model-name matcher (Ollama's rules, OLLAMA_API.md
//! §6). Deliberately separate from `crate::model`: a fake that shares code
//! with the proxy would share its bugs.

const DEFAULT_HOST: &str = "registry.ollama.ai";
const DEFAULT_NAMESPACE: &str = "library";
const DEFAULT_TAG: &str = "latest";

/// A parsed model name with defaults filled in; parts keep their case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Name {
    host: String,
    namespace: String,
    model: String,
    tag: String,
}

impl Name {
    /// Parses `host/namespace/model:tag` (all but `model` optional); `None`
    /// when Ollama would answer `invalid model name`.
    pub fn parse(s: &str) -> Option<Name> {
        let (path, tag) = match s.rfind(':') {
            Some(i) if s.rfind('/').is_none_or(|j| i > j) => (&s[..i], &s[i + 1..]),
            _ => (s, DEFAULT_TAG),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (host, namespace, model) = match parts.as_slice() {
            [m] => (DEFAULT_HOST, DEFAULT_NAMESPACE, *m),
            [n, m] => (DEFAULT_HOST, *n, *m),
            [h, n, m] => (*h, *n, *m),
            _ => return None,
        };
        let ok = |p: &str, extra: &[char]| {
            let mut chars = p.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && chars
                    .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c) || extra.contains(&c))
        };
        let valid =
            ok(host, &['.', ':']) && ok(namespace, &[]) && ok(model, &['.']) && ok(tag, &['.']);
        valid.then(|| Name {
            host: host.into(),
            namespace: namespace.into(),
            model: model.into(),
            tag: tag.into(),
        })
    }

    /// Same model, comparing each part case-insensitively.
    pub fn matches(&self, other: &Name) -> bool {
        self.host.eq_ignore_ascii_case(&other.host)
            && self.namespace.eq_ignore_ascii_case(&other.namespace)
            && self.model.eq_ignore_ascii_case(&other.model)
            && self.tag.eq_ignore_ascii_case(&other.tag)
    }

    /// Display form: default host and namespace dropped, tag kept.
    pub fn display(&self) -> String {
        if self.host != DEFAULT_HOST {
            format!(
                "{}/{}/{}:{}",
                self.host, self.namespace, self.model, self.tag
            )
        } else if self.namespace != DEFAULT_NAMESPACE {
            format!("{}/{}:{}", self.namespace, self.model, self.tag)
        } else {
            format!("{}:{}", self.model, self.tag)
        }
    }

    /// The namespace (`owned_by` in `/v1/models`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A stable key for hashing: the lowercased display form.
    pub fn key(&self) -> String {
        self.display().to_ascii_lowercase()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_case_are_ignored_when_matching() {
        let a = Name::parse("llama3").unwrap();
        for b in [
            "llama3:latest",
            "library/llama3:latest",
            "registry.ollama.ai/library/llama3:latest",
            "Llama3",
        ] {
            assert!(a.matches(&Name::parse(b).unwrap()), "{b}");
        }
        assert!(!a.matches(&Name::parse("llama3:8b").unwrap()));
        assert_eq!(a.display(), "llama3:latest");
        assert_eq!(
            Name::parse("host:5000/ns/m").unwrap().display(),
            "host:5000/ns/m:latest"
        );
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in ["a b", "x:", "", "a/b/c/d", ".x"] {
            assert!(Name::parse(bad).is_none(), "{bad}");
        }
    }
}
