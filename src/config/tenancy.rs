//! The tenant settings: `PROXY_API_KEYS` entries (`name:key` or a bare key),
//! `TENANT_WEIGHTS` and `TENANT_PRIORITIES` (`name=value,...`).

use std::sync::Arc;

use crate::policy::Priority;

/// One client key and the tenant it stands for.
#[derive(Clone)]
pub struct ApiKey {
    /// The tenant: the entry's name, or `key-N` (its 1-based place in the
    /// list) for a bare key, so that the key itself is never shown.
    pub tenant: Arc<str>,
    /// The secret.
    pub key: String,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

/// Splits `PROXY_API_KEYS` entries into tenants and keys. A name is what
/// precedes the first `:`; an entry without one is a bare key.
pub fn api_keys(entries: &[String]) -> Vec<ApiKey> {
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| match entry.split_once(':') {
            Some((name, key)) if !name.trim().is_empty() => ApiKey {
                tenant: Arc::from(name.trim()),
                key: key.trim().to_owned(),
            },
            _ => ApiKey {
                tenant: Arc::from(format!("key-{}", i + 1)),
                key: entry.trim().to_owned(),
            },
        })
        .collect()
}

/// A `name=value,...` list, such as TENANT_WEIGHTS.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TenantMap<T>(pub Vec<(Arc<str>, T)>);

impl<T> TenantMap<T> {
    /// The tenant names it mentions.
    pub fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.0.iter().map(|(n, _)| n)
    }
}

fn parse_map<T>(
    s: &str,
    what: &str,
    value: impl Fn(&str) -> Option<T>,
) -> Result<TenantMap<T>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((name, v)) = item.split_once('=') else {
            return Err(format!("'{item}' is not name={what}"));
        };
        let name = name.trim();
        if name.is_empty() {
            return Err(format!("'{item}' has no tenant name"));
        }
        let v = value(v.trim()).ok_or_else(|| format!("'{item}': '{}' is not {what}", v.trim()))?;
        out.push((Arc::from(name), v));
    }
    Ok(TenantMap(out))
}

/// Parses TENANT_WEIGHTS: positive finite numbers.
pub fn parse_weights(s: &str) -> Result<TenantMap<f64>, String> {
    parse_map(s, "a positive weight", |v| {
        v.parse::<f64>().ok().filter(|w| w.is_finite() && *w > 0.0)
    })
}

/// Parses TENANT_PRIORITIES: `interactive` or `batch`.
pub fn parse_priorities(s: &str) -> Result<TenantMap<Priority>, String> {
    parse_map(s, "interactive or batch", Priority::parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_and_bare_keys_get_tenants_that_never_show_the_key() {
        let keys = api_keys(&["alice:s3cret".into(), "b4re".into(), ":odd".into()]);
        let tenants: Vec<&str> = keys.iter().map(|k| &*k.tenant).collect();
        assert_eq!(tenants, ["alice", "key-2", "key-3"]);
        assert_eq!(keys[0].key, "s3cret");
        assert_eq!(keys[1].key, "b4re");
        assert_eq!(keys[2].key, ":odd");
        assert!(!format!("{keys:?}").contains("s3cret"));
    }

    #[test]
    fn tenant_lists_parse_and_bad_entries_are_named() {
        let w = parse_weights("alice=2, bob=0.5,").unwrap();
        assert_eq!(
            w.0,
            vec![(Arc::from("alice"), 2.0), (Arc::from("bob"), 0.5)]
        );
        assert!(parse_weights("").unwrap().0.is_empty());
        assert!(parse_weights("alice=0").unwrap_err().contains("alice=0"));
        assert!(parse_weights("alice").unwrap_err().contains("'alice'"));
        assert!(parse_weights("=2").is_err());
        let p = parse_priorities("etl=batch,chat=Interactive").unwrap();
        assert_eq!(p.0[0].1, Priority::Batch);
        assert_eq!(p.0[1].1, Priority::Interactive);
        assert!(parse_priorities("etl=urgent").is_err());
    }
}
