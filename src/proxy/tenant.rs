//! Who a routed request is for and how urgent it is: its tenant (the name
//! of its API key when PROXY_API_KEYS is set, else `X-Corral-Tenant`, else
//! the client's address) and its priority (`X-Corral-Priority`, else the
//! tenant's TENANT_PRIORITIES entry, else interactive). With keys set the
//! header is ignored, so no client can pass for another key's tenant.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ConnectInfo;
use http::request::Parts;

use super::auth::matching_key;
use super::error::ProxyError;
use super::headers::{PRIORITY, TENANT};
use crate::config::ServeArgs;
use crate::config::tenancy::{self, ApiKey};
use crate::fleet::{Policy, Priority};

/// The metric label of every tenant not named in the settings.
pub const OTHER: &str = "other";
/// Longest tenant name a header may give.
const MAX_NAME: usize = 64;

/// The tenant settings, parsed once.
#[derive(Debug)]
pub struct Tenancy {
    /// PROXY_API_KEYS, split into tenants and keys.
    pub keys: Vec<ApiKey>,
    priorities: HashMap<Arc<str>, Priority>,
    /// Tenants named in the settings: the only `tenant` metric labels.
    labels: HashSet<Arc<str>>,
    /// The label [`OTHER`], made once.
    other: Arc<str>,
}

impl Tenancy {
    /// From the settings.
    pub fn new(args: &ServeArgs) -> Self {
        let keys = tenancy::api_keys(&args.api_keys);
        let labels = keys
            .iter()
            .map(|k| Arc::clone(&k.tenant))
            .chain(args.tenant_weights.names().cloned())
            .chain(args.tenant_priorities.names().cloned())
            .collect();
        Self {
            keys,
            priorities: args.tenant_priorities.0.iter().cloned().collect(),
            labels,
            other: Arc::from(OTHER),
        }
    }

    /// The scheduler's policy for these settings.
    pub fn policy(args: &ServeArgs) -> Policy {
        Policy {
            weights: args.tenant_weights.0.iter().cloned().collect(),
            max_queue_per_tenant: args.max_queue_per_tenant.unwrap_or(0),
            batch_floor_percent: args.batch_floor_percent,
            ..Policy::default()
        }
    }

    /// The tenant and priority of a request; 400 for a malformed header.
    pub fn of(&self, parts: &Parts) -> Result<(Arc<str>, Priority), ProxyError> {
        let tenant = self.tenant(parts)?;
        let priority = match parts.headers.get(PRIORITY) {
            Some(v) => v.to_str().ok().and_then(Priority::parse).ok_or_else(|| {
                ProxyError::BadRequest(format!(
                    "{PRIORITY} must be interactive or batch, not {v:?}"
                ))
            })?,
            None => self.priorities.get(&tenant).copied().unwrap_or_default(),
        };
        Ok((tenant, priority))
    }

    fn tenant(&self, parts: &Parts) -> Result<Arc<str>, ProxyError> {
        if !self.keys.is_empty() {
            let keys = self.keys.iter().map(|k| k.key.as_str());
            if let Some(i) = matching_key(&parts.headers, keys) {
                return Ok(Arc::clone(&self.keys[i].tenant));
            }
        } else if let Some(v) = parts.headers.get(TENANT) {
            let name = v.to_str().ok().map(str::trim).filter(|n| {
                !n.is_empty() && n.len() <= MAX_NAME && n.bytes().all(|b| b.is_ascii_graphic())
            });
            return name.map(Arc::from).ok_or_else(|| {
                ProxyError::BadRequest(format!(
                    "{TENANT} must be 1 to {MAX_NAME} visible ASCII characters"
                ))
            });
        }
        // Written on the stack: one allocation (the `Arc`) per request.
        let mut buf = [0u8; 64];
        let peer =
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .and_then(|ConnectInfo(addr)| {
                    let mut out = std::io::Cursor::new(&mut buf[..]);
                    write!(out, "{}", addr.ip()).ok()?;
                    let len = usize::try_from(out.position()).ok()?;
                    std::str::from_utf8(&buf[..len]).ok()
                });
        Ok(Arc::from(peer.unwrap_or("unknown")))
    }

    /// The metric label of a tenant: its name when the settings name it,
    /// else `other`, so that client addresses cannot grow the series.
    pub fn label(&self, tenant: &Arc<str>) -> Arc<str> {
        Arc::clone(self.labels.get(tenant).unwrap_or(&self.other))
    }
}
